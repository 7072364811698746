"""A real two-process jax.distributed training run on localhost CPUs (gloo collectives).

Each process has one CPU device and draws its own half of every global batch; the global
batch is sharded over both, so both must end with bitwise identical parameters. Subprocess
timeouts turn a hang (a collective waiting for a peer) into a failure.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.pipeline import toy_prepared_cohort
from clfc_jax import input_pipeline, run_log
from data_prep import tfds_builders

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name('distributed_worker.py')
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker_env():
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env.update(XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]))
  return env


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  sys.path.insert(0, str(REPO / 'tests'))
  import distributed_worker  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('dist')
  toy_prepared_cohort(root / 'prep', num_cases=6, z=8, seed=2)
  tfds_builders.build(tfds_builders.tumor_slices_builder(distributed_worker.tiny_config(0, 0),
                                                         root / 'tfds'))
  port = _free_port()
  outs = [root / f'process{i}.json' for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(port), str(root / 'tfds'), str(root / 'work'),
       str(outs[i])], env=_worker_env(), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f'two-process run did not finish within {TIMEOUT_S} s')
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'process {i} exited {p.returncode}:\n{log[-4000:]}'
  return [json.loads(o.read_text()) for o in outs], root, logs


def test_both_processes_join_one_job(two_process_run):
  results, _, _ = two_process_run
  assert [r['process_index'] for r in results] == [0, 1]
  assert all(r['process_count'] == 2 and r['devices'] == 2 and r['local_devices'] == 1
             for r in results)
  assert all(r['summary']['status'] == 'done' and r['step'] == 4 for r in results)


def test_processes_end_with_identical_parameters(two_process_run):
  results, _, logs = two_process_run
  assert results[0]['params_hash'] == results[1]['params_hash']
  assert all(f"params sha256 {results[0]['params_hash']}" in log for log in logs)


def test_processes_read_their_parts_of_one_global_batch(two_process_run):
  """Each step, process 0 holds the first half of the global batch and process 1 the second:
  together exactly what one process draws for the same epoch seeds (samples are drawn with
  replacement, so the two halves may share a slice)."""
  results, root, _ = two_process_run
  import distributed_worker  # pylint: disable=g-import-not-at-top
  c = distributed_worker.tiny_config(0, 0)
  spe = int(c.train.steps_per_epoch)
  # 2 local rows per step, 2 epochs of 2 steps each.
  assert all(len(r['read']) == 2 * 4 for r in results)
  for epoch in range(2):
    it = input_pipeline.train_iterator(
        c, root / 'tfds', 0, global_batch_size=int(c.train.batch_size),
        seed=run_log.epoch_seed(c.seed, epoch), process_index=0, process_count=1)
    with contextlib.closing(it):
      for t in range(spe):
        b = next(it)
        want = [(p.decode(), int(s)) for p, s in zip(b['patient'], b['slice'])]
        step = epoch * spe + t
        got = [(p, s) for r in results for p, s, at in r['read'] if at == step]
        assert got == want, step


def test_only_process_zero_writes_logs(two_process_run):
  _, root, _ = two_process_run
  run = root / 'work' / 'runs' / 'baseline1' / 'fold0'
  events = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  starts = [e for e in events if e['event'] == 'start']
  assert len(starts) == 1 and starts[0]['processes'] == 2 and starts[0]['devices'] == 2
  assert json.loads((run / 'summary.json').read_text())['final_step'] == 4
