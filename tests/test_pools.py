"""data_prep.pools: spawned workers that skip the parent's main module, results unchanged."""
import concurrent.futures
import importlib.util
import multiprocessing
import sys

import pytest

from data_prep import pools


@pytest.fixture
def script_main(tmp_path, monkeypatch):
  """__main__ as when a script file runs (as `python -m clfc_jax.main` has a spec)."""
  path = tmp_path / 'a_main_script.py'
  path.write_text('LOADED = True\n')
  spec = importlib.util.spec_from_file_location('__main__', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.__spec__ = None   # as for `python a_main_script.py`: the file is what a worker reruns
  monkeypatch.setitem(sys.modules, '__main__', module)
  return module


def test_workers_skip_the_parents_main_module_and_main_is_restored(script_main):
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context('spawn')) as plain:
    assert plain.submit(pools.imported_parent_main).result()   # what a plain pool pays for
  with pools.spawn_pool(2) as pool:
    assert not any(pool.map(pools.imported_parent_main, range(4)))
    assert list(pool.map(abs, [-3, 2, -1])) == [3, 2, 1]   # in order, as map promises
  assert script_main.__file__.endswith('a_main_script.py') and script_main.__spec__ is None


def test_hidden_main_restores_on_error(script_main):
  path = script_main.__file__
  with pytest.raises(RuntimeError):
    with pools.hidden_main():
      assert not hasattr(script_main, '__file__')
      raise RuntimeError('boom')
  assert script_main.__file__ == path
