"""Spawned worker processes that start without re-importing the parent's main module.

Why: a 'spawn' worker first imports the parent's __main__ again (multiprocessing prepares
`__mp_main__` from __main__.__spec__ or __file__). For `python -m clfc_jax.main` that is JAX,
flax, orbax and TFDS: 2.6 s per worker on the demo machine, paid by every pool of the prep
and pseudo-normal stages. Our workers only run functions of data_prep modules, which they
import themselves, so the main module is hidden while a worker starts (0.04 s).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import sys


@contextlib.contextmanager
def hidden_main():
  """__main__ without __spec__ / __file__ (restored after): a worker spawned meanwhile does not
  import it."""
  main = sys.modules.get('__main__')
  saved = {k: getattr(main, k) for k in ('__spec__', '__file__') if hasattr(main, k)}
  try:
    if main is not None:
      main.__spec__ = None
      if hasattr(main, '__file__'):
        del main.__file__
    yield
  finally:
    for key, value in saved.items():
      setattr(main, key, value)


class _SpawnPool(concurrent.futures.ProcessPoolExecutor):
  # ProcessPoolExecutor starts spawn workers inside submit() (one per call while none is idle).
  def submit(self, *args, **kwargs):
    with hidden_main():
      return super().submit(*args, **kwargs)


def spawn_pool(workers: int, initializer=None, initargs=()) -> concurrent.futures.Executor:
  """A ProcessPoolExecutor of `workers` spawned processes (no fork of a process that may run
  JAX threads) that skip the parent's main module. Submit module-level functions only."""
  return _SpawnPool(workers, mp_context=multiprocessing.get_context('spawn'),
                    initializer=initializer, initargs=initargs)


def imported_parent_main(_=None) -> bool:
  """Whether this process imported its parent's main module (as a spawned worker does); the
  argument is ignored (for map). A worker's own __main__ (a built-in module, no file) is
  aliased as __mp_main__ either way; the parent's has a file."""
  return getattr(sys.modules.get('__mp_main__'), '__file__', None) is not None

