"""Data-parallel scaling: one global batch split over 1, 2, 4, 8 devices gives the same step.

`python -m benchmarks.scaling [--counts 1,2,4,8] [--method clfc --width 0.25 --h 96 --w 80
--batch 8]` runs the train step in one child process per device count, each with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before jax starts),
and reports step time, its overhead over 1 device, and correctness: how far the loss and the
updated parameters after one step are from the 1-device result. On a machine with more than
one GPU it also compares 1 GPU with all of them. Results: benchmarks/results/scaling.json.

Forced CPU devices share the same cores, so on a CPU the 'speed-up' is an overhead: what the
sharded program (collectives for BatchNorm statistics and gradients) costs over one device.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import machine
from benchmarks import tables
from benchmarks import train_step
from clfc_jax import host_memory, sharding
from clfc_jax.train import steps as train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'scaling.json'


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--counts', default='1,2,4,8', help='forced CPU device counts')
  ap.add_argument('--method', default='clfc')
  ap.add_argument('--width', type=float, default=0.25)
  ap.add_argument('--h', type=int, default=96)
  ap.add_argument('--w', type=int, default=80)
  ap.add_argument('--k', type=int, default=2)
  ap.add_argument('--batch', type=int, default=8, help='global batch, the same for every count')
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--steps', type=int, default=3, help='timed steps after the first')
  ap.add_argument('--gpus', default='auto', choices=('auto', 'no'),
                  help='auto: also 1 GPU vs all GPUs when more than one is present')
  ap.add_argument('--worker', default='', help=argparse.SUPPRESS)   # npz path: child mode
  ap.add_argument('--out', default=str(RESULTS), help="JSON to write; '' = none")
  return ap.parse_args(argv)


def step_config(args):
  """The train step's config for these arguments (shared with benchmarks.train_step)."""
  ns = argparse.Namespace(method=args.method, h=args.h, w=args.w, k=args.k, dtype=args.dtype,
                          width=args.width, upsample=None, batch=args.batch)
  return train_step.make_config(ns)


def measure_devices(config, devices, steps: int = 3):
  """One train step from the same initial state over these devices, then timed steps.

  Returns (timing record, loss after the first step, updated parameters as one flat vector).
  """
  mesh = sharding.make_mesh(devices)
  cheap = config.train.get('cheap_cpu_compile', False) and devices[0].platform == 'cpu'
  fns = train.make_jitted_steps(config, mesh,
                                compiler_options=train.CHEAP_CPU_COMPILE if cheap else None)
  state = fns.init(jax.random.key(config.seed, impl=config.train.get('rng_impl', None)))
  batch = sharding.global_batch(train_step.synthetic_batch(config, config.train.batch_size), mesh)
  t0 = time.perf_counter()
  compiled = fns.train.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flat = lambda tree: np.concatenate([np.asarray(x, np.float64).ravel()
                                      for x in jax.tree.leaves(jax.device_get(tree))])
  initial = flat(state.params)   # before the step: the state is donated to it
  state, metrics = compiled(state, batch)
  loss = float(metrics['loss'])
  params = flat(state.params)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) if times else None
  record = {'devices': len(devices), 'device_kind': devices[0].device_kind,
            'update_max_abs': float(np.max(np.abs(params - initial))),
            'batch': int(config.train.batch_size), 'compile_s': round(compile_s, 3),
            'step_s': round(step_s, 4) if step_s else None,
            'slices_per_s': round(config.train.batch_size / step_s, 2) if step_s else None}
  return record, loss, params


def differences(reference, other) -> dict:
  """Max abs difference of the loss and of the updated parameters from the reference, and the
  latter over the reference's largest update (float noise: ~1e-3 or less; a gradient that
  depends on the device count: a sizeable fraction)."""
  (record0, loss0, params0), (_, loss1, params1) = reference, other
  diff = float(np.max(np.abs(params1 - params0)))
  update = record0.get('update_max_abs')
  return {'loss_abs_diff': float(abs(loss1 - loss0)), 'params_max_abs_diff': diff,
          'diff_over_update': round(diff / update, 5) if update else None}


def compare(runs) -> list:
  """Rows for runs [(record, loss, params), ...], the first being the 1-device reference."""
  rows = []
  base = runs[0][0]['step_s']
  for run in runs:
    row = dict(run[0], **differences(runs[0], run))
    row['overhead_vs_1'] = round(row['step_s'] / base, 3) if base and row['step_s'] else None
    rows.append(row)
  return rows


def _worker(args):
  config = step_config(args)
  gpus = [d for d in jax.devices() if d.platform == 'gpu']
  if gpus:   # one GPU vs all of them, in this process.
    runs = [measure_devices(config, gpus[:1], args.steps), measure_devices(config, gpus,
                                                                         args.steps)]
    print(json.dumps(compare(runs)))
    return
  record, loss, params = measure_devices(config, jax.devices(), args.steps)
  np.savez(args.worker, loss=loss, params=params)
  print(json.dumps(record))


def _child(args, env_extra: dict, npz: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, '-m', 'benchmarks.scaling', '--worker', npz, '--method', args.method,
         '--width', str(args.width), '--h', str(args.h), '--w', str(args.w), '--k', str(args.k),
         '--batch', str(args.batch), '--dtype', args.dtype, '--steps', str(args.steps)]
  env = dict(os.environ, **env_extra)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)


def _fail(done) -> str:
  return (done.stderr.strip().splitlines() or ['failed'])[-1]


def cpu_scaling(args) -> list:
  """One child per forced CPU device count; rows compared with the first count."""
  runs, errors = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for n in [int(c) for c in args.counts.split(',')]:
      print(f'scaling: {n} CPU device(s)', file=sys.stderr, flush=True)
      if args.batch % n:
        errors.append({'devices': n, 'error': f'batch {args.batch} does not split over {n}'})
        continue
      npz = str(Path(tmp) / f'{n}.npz')
      done = _child(args, {'JAX_PLATFORMS': 'cpu',
                           'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}, npz)
      if done.returncode:
        errors.append({'devices': n, 'error': _fail(done)})
        continue
      record = json.loads(done.stdout.strip().splitlines()[-1])
      with np.load(npz) as z:
        runs.append((record, float(z['loss']), z['params']))
  return (compare(runs) if runs else []) + errors


def gpu_scaling(args, devices: dict) -> list:
  """1 GPU vs all GPUs (one child, no forced flags); [] with fewer than 2 GPUs in `devices`."""
  if args.gpus == 'no' or len(devices.get('gpus', [])) < 2:
    return []
  print('scaling: 1 GPU vs all GPUs', file=sys.stderr, flush=True)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.scaling', '--worker', 'gpu', '--method', args.method,
       '--width', str(args.width), '--h', str(args.h), '--w', str(args.w), '--k', str(args.k),
       '--batch', str(args.batch), '--dtype', args.dtype, '--steps', str(args.steps)],
      capture_output=True, text=True, env=env, cwd=REPO, check=False)
  if done.returncode:
    return [{'devices': 'all GPUs', 'error': _fail(done)}]
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(args, devices=None) -> dict:
  """The suite's record; devices: machine.probe_devices() (asked here when not given)."""
  devices = devices or machine.probe_devices()
  info = machine.describe(with_jax=False)
  return {'suite': 'scaling',
          'config': {'method': args.method, 'width': args.width, 'hw': [args.h, args.w],
                     'k': args.k, 'global_batch': args.batch, 'dtype': args.dtype},
          'cpu': cpu_scaling(args), 'gpu': gpu_scaling(args, devices),
          'machine': dict(info, **devices)}


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    _worker(args)
    return None
  return tables.emit(run(args), args.out)


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  main()
