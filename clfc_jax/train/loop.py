"""What the segmentation and the IntroVAE training loops share: resuming from the latest
checkpoint at an epoch end, one epoch of jitted steps with logging and NaN stops, and the
error a diverged run raises.

Exact resume: epoch e's batches are a pure function of (seed, e) (the caller re-creates its
iterator each epoch with run_log.epoch_seed), checkpoints sit at epoch ends and the state holds
everything else (rng included), so a run killed after a checkpoint and resumed ends bitwise
equal to an uninterrupted one (same device count, same compiler).
"""
from __future__ import annotations

import json
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from clfc_jax import checkpoints as checkpoints_lib
from clfc_jax import run_log
from clfc_jax import sharding as sharding_lib
from data_prep import store


class Diverged(RuntimeError):
  """A loss term became NaN/Inf at `step`; no checkpoint holds the bad state."""

  WHAT = 'training'
  HINT = 'lower the learning rate, or check the input data'

  def __init__(self, step: int, terms, directory, last_good_step: Optional[int]):
    self.step, self.terms = int(step), tuple(terms)
    self.term = self.terms[0]
    self.last_good_step = last_good_step
    super().__init__(
        f'{self.WHAT} diverged at step {self.step}: non-finite {", ".join(self.terms)}; '
        f'the last good checkpoint is step {last_good_step} in {directory}/checkpoints '
        f'({self.HINT})')


def every(epoch: int, interval) -> bool:
  """Whether `epoch` (1-based) is a multiple of `interval`; 0 or less: never (only the end)."""
  return int(interval) > 0 and epoch % int(interval) == 0


def resume(ckpt: checkpoints_lib.Checkpointer, abstract_state, fresh: Callable[[], object],
           steps_per_epoch: int, last_epoch: int):
  """(state, extra, first_epoch): the latest checkpoint, or `fresh()` at epoch 0.

  A checkpoint that is not at an epoch end of `steps_per_epoch` steps, or past `last_epoch`,
  means the settings changed under the run: a clear error rather than a silently other run.
  """
  restored = ckpt.restore_latest(abstract_state)
  if restored is None:
    return fresh(), {}, 0
  state, extra = restored
  first_epoch = int(extra.get('epoch', 0))
  if int(state.step) != first_epoch * steps_per_epoch:
    raise ValueError(f'{ckpt.directory}: checkpoint at step {int(state.step)} is not the end of '
                     f'epoch {first_epoch} ({steps_per_epoch} steps per epoch): did the batch '
                     'size, steps per epoch or the data change?')
  if first_epoch > last_epoch:
    raise ValueError(f'{ckpt.directory}: trained {first_epoch} epochs, more than the '
                     f'{last_epoch} configured; use a fresh run directory')
  return state, extra, first_epoch


def run_epoch(step_fn, state, batches: Iterator[dict], *, epoch: int, num_epochs: int,
              steps_per_epoch: int, fields: Sequence[str], mesh, log: run_log.RunLog,
              log_every: int, check_every: int, diverged: Callable[[int, list], Diverged],
              params_of: Callable, term_order: Sequence[str] = (),
              tb_prefix: Optional[str] = None, desc: str = 'epoch',
              postfix: Callable[[dict], dict] = lambda scalars: {},
              batch_hook: Optional[Callable[[dict, int], dict]] = None, is_main: bool = True):
  """One epoch of `step_fn(state, global_batch) -> (state, metrics)`; returns (state, the last
  log window's mean metrics).

  NaN/Inf check (every metric: a NaN input can leave the loss finite but not the gradient):
  fetching a step's metrics blocks the host until that step ends, so step i's are read only
  after step i+1 is dispatched (the device never idles; the bad state is one step old when
  caught), every `check_every` steps; every step of a log window is checked when it is logged,
  and the parameters at the end of the epoch, before any checkpoint. `diverged(step, terms)`
  makes the error raised (and logged).
  """
  log_every, check_every = max(int(log_every), 1), max(int(check_every), 1)

  def check(step, host_metrics):
    bad = run_log.nonfinite_terms(host_metrics, term_order)
    if bad:
      err = diverged(step, bad)
      log.event('diverged', step, epoch=epoch, terms=bad, message=str(err))
      raise err

  pending, window, last = None, [], {}
  window_start = time.perf_counter()
  bar = tqdm(total=steps_per_epoch, desc=f'{desc} {epoch + 1}/{num_epochs}',
             disable=not is_main, leave=False)
  try:
    for i in range(steps_per_epoch):
      step = epoch * steps_per_epoch + i
      host = next(batches)
      if batch_hook is not None:
        host = batch_hook(host, step)
      batch = sharding_lib.global_batch({k: host[k] for k in fields if k in host}, mesh)
      state, metrics = step_fn(state, batch)
      window.append((step, metrics))
      bar.update(1)
      if pending is not None:
        check(pending[0], jax.device_get(pending[1]))
        pending = None
      if (step + 1) % check_every == 0:
        pending = (step, metrics)
      if (step + 1) % log_every == 0 or i == steps_per_epoch - 1:
        host_window = jax.device_get([m for _, m in window])
        for (s, _), m in zip(window, host_window):
          check(s, m)
        seconds = time.perf_counter() - window_start
        last = {k: float(np.mean([m[k] for m in host_window])) for k in host_window[0]}
        log.event('train', step + 1, dict(last, steps_per_s=len(window) / max(seconds, 1e-9)),
                  tb_prefix=tb_prefix, epoch=epoch + 1)
        bar.set_postfix(**postfix(last))
        pending, window, window_start = None, [], time.perf_counter()
    if not bool(run_log.all_finite(params_of(state))):
      check(epoch * steps_per_epoch + steps_per_epoch - 1, {'params': np.nan})
  finally:
    bar.close()
  return state, last


def write_summary_if_done(path, summary: dict, is_main: bool) -> None:
  """summary.json, written last and only by process 0 once the run reached its last epoch: its
  presence marks the run as done (a stopped run leaves none, so it resumes)."""
  if summary['status'] == 'done' and is_main:
    store.write_text(path, json.dumps(summary, indent=1))
