"""Speed of one jitted segmentation train step on synthetic device arrays (no TensorFlow).

usage: python -m benchmarks.train_step [--batch 4 --h 192 --w 160 --k 2 --method clfc
                                        --dtype float32 --width 1 --steps 5 --torch --breakdown]
prints: one JSON line (compile seconds, median step seconds, slices/s, and with --torch the
PyTorch reference's step time and the ratio), also appended to benchmarks/results/train_step.jsonl
with the machine it ran on and its load average (other processes skew CPU timings).
"""
import argparse
import collections
import gzip
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from clfc_jax import sharding
from clfc_jax import train
from clfc_jax.losses import segmentation_loss
from clfc_jax.models import segmenter
from configs import default

REPO = Path(__file__).resolve().parents[1]
TORCH_REFERENCE = REPO.parent / 'shared' / 'bench' / 'torch_reference.py'
RESULTS = REPO / 'benchmarks' / 'results' / 'train_step.jsonl'


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--batch', type=int, default=4, help='global batch')
  ap.add_argument('--h', type=int, default=192)
  ap.add_argument('--w', type=int, default=160)
  ap.add_argument('--k', type=int, default=2, help='2.5D half-width')
  ap.add_argument('--method', default='clfc', choices=default.METHODS)
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--width', type=float, default=1.0, help='channel multiplier')
  ap.add_argument('--upsample', default=None, help="model.upsample override ('phase', ...)")
  ap.add_argument('--steps', type=int, default=5, help='timed steps after one warm-up')
  ap.add_argument('--breakdown', action='store_true',
                  help='also time forward (inference), forward+loss and gradient alone')
  ap.add_argument('--profile', default='',
                  help='trace one more step into this folder (jax.profiler, Perfetto JSON) '
                       'and report the most expensive XLA ops')
  ap.add_argument('--torch', action='store_true', help='also run the PyTorch reference')
  ap.add_argument('--torch-script', default=str(TORCH_REFERENCE))
  ap.add_argument('--results', default=str(RESULTS), help="JSONL to append to; '' = none")
  return ap.parse_args(argv)


def make_config(args):
  config = default.get_config()
  default.apply_method(config, args.method)
  config.prep.crop_hw = (args.h, args.w)
  config.data.k = args.k
  config.model.dtype = args.dtype
  config.model.width = args.width
  if args.upsample:
    config.model.upsample = args.upsample
  config.train.batch_size = args.batch
  return config


def synthetic_batch(config, batch, seed=0):
  """Host numpy batch in the ARCHITECTURE.md contract, about 10% tumor pixels."""
  rng = np.random.default_rng(seed)
  h, w = config.prep.crop_hw
  stack = 2 * config.data.k + 1
  out = {
      'image': rng.standard_normal((batch, h, w, len(config.dataset.modalities) * stack),
                                   dtype=np.float32),
      'label': (rng.random((batch, h, w)) > 0.9).astype(np.int32),
      'brain': np.ones((batch, h, w), bool),
  }
  if config.model.use_normal_net:
    out['normal'] = rng.standard_normal((batch, h, w, stack), dtype=np.float32)
  return out


def timed(fn, n):
  """Median wall seconds of n calls of fn (which must block on its result)."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def breakdown(config, model, state, batch, n):
  """Seconds for parts of the step, to see where time goes."""
  image, normal, label = batch['image'], batch.get('normal'), batch['label']
  variables = state.variables

  @jax.jit
  def forward(v):
    return model.apply(v, image, normal, train=False)['logits']

  def loss(params, v):
    out, _ = model.apply({'params': params, 'batch_stats': v['batch_stats']}, image, normal,
                         label=label, train=True, mutable=['batch_stats'])
    return segmentation_loss(out, label, config)[0]

  fwd_loss = jax.jit(loss)
  grad = jax.jit(lambda p, v: jax.grad(loss)(p, v))
  parts = {}
  for name, fn, args in (('forward_s', forward, (variables,)),
                         ('forward_loss_s', fwd_loss, (state.params, variables)),
                         ('grad_s', grad, (state.params, variables))):
    jax.block_until_ready(fn(*args))
    parts[name] = round(timed(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), n), 4)
  return parts


def _op_scopes(hlo_text):
  """HLO instruction name -> 'module fwd|bwd' from the jax op_name inside what it calls."""
  first_op_name, calls, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      current = head.group(1)
      continue
    call = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*?calls=%([\w.\-]+)', line)
    if call:
      calls[call.group(1)] = call.group(2)
    op_name = re.search(r'op_name="([^"]+)"', line)
    if current and op_name:
      first_op_name.setdefault(current, op_name.group(1))
  scopes = {}
  for name, comp in calls.items():
    op_name = first_op_name.get(comp, '')
    module = re.search(r'Segmenter\)+/(\w+)', op_name)
    if module:
      scopes[name] = f"{module.group(1)} {'bwd' if 'transpose(' in op_name else 'fwd'}"
  return scopes


def profile_step(compiled, state, batch, directory, top=12):
  """Traces one step; returns (state, time per model scope and per XLA op, summed over threads).

  Ops are named by the flax module their HLO came from ('simsiam3 fwd'); fusions XLA made
  without that metadata (mostly weight-gradient convolutions) keep their op kind.
  """
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  trace_file = max(Path(directory).rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
  with gzip.open(trace_file) as f:
    events = json.load(f)['traceEvents']
  scopes = _op_scopes(compiled.as_text())
  per_scope, per_op = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get('name', '')
    # Complete events of XLA ops; Python frames ('$...') and runtime bookkeeping are skipped.
    if e.get('ph') != 'X' or name.startswith(('$', 'Thunk', 'Slinky', 'end:', 'PjitFunction',
                                              'CommonPjRt')):
      continue
    ms = e['dur'] / 1e3
    per_op[name] += ms
    per_scope[scopes.get(name, re.sub(r'\.\d+$', '', name))] += ms
  rounded = lambda counter: {k: round(v, 1) for k, v in counter.most_common(top)}
  return state, {'ops_total_ms': round(sum(per_op.values()), 1),
                 'top_scopes_ms': rounded(per_scope), 'top_ops_ms': rounded(per_op)}


def run_torch(args, config):
  stack = 2 * config.data.k + 1
  cmd = [sys.executable, args.torch_script, '--batch', str(args.batch), '--h', str(args.h),
         '--w', str(args.w), '--in-ch', str(len(config.dataset.modalities) * stack),
         '--norm-ch', str(stack), '--steps', str(args.steps)]
  if args.dtype == 'bfloat16':
    cmd.append('--amp')
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode:
    return {'error': done.stderr.strip().splitlines()[-1:] or ['failed']}
  out = json.loads(done.stdout.strip().splitlines()[-1])
  # CPU seconds of the whole run (model build + 2 warm-up + timed steps) per step: an upper
  # bound on its per-step CPU, comparable with step_cpu_s when the machine is busy.
  cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
  out['cpu_per_step_upper_s'] = round(cpu / (args.steps + 2), 3)
  return out


def machine_info():
  dev = jax.devices()[0]
  return {'platform': platform.platform(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'backend': jax.default_backend(),
          'device_kind': dev.device_kind, 'device_count': jax.device_count(),
          'loadavg_1m': round(os.getloadavg()[0], 2)}


def main(argv=None):
  args = parse_args(argv)
  config = make_config(args)
  mesh = sharding.make_mesh()
  model = segmenter.build_segmenter(config)
  steps = train.make_jitted_steps(config, mesh, model)

  t0 = time.perf_counter()
  state = jax.block_until_ready(steps.init(jax.random.key(config.seed)))
  init_s = time.perf_counter() - t0
  batch = sharding.global_batch(synthetic_batch(config, args.batch), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))

  t0, c0 = time.perf_counter(), time.process_time()
  compiled = steps.train.lower(state, batch).compile()
  compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0

  state, metrics = compiled(state, batch)   # warm-up
  jax.block_until_ready(metrics)
  times, cpu_times = [], []
  for _ in range(args.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  step_s = statistics.median(times)

  result = {'impl': 'jax', 'method': args.method, 'batch': args.batch, 'hw': [args.h, args.w],
            'k': args.k, 'width': args.width, 'dtype': args.dtype,
            'upsample': config.model.upsample, 'params': int(n_params),
            'init_s': round(init_s, 3), 'compile_s': round(compile_s, 3),
            'compile_cpu_s': round(compile_cpu_s, 3),
            'step_s': round(step_s, 4), 'step_min_s': round(min(times), 4),
            'step_cpu_s': round(statistics.median(cpu_times), 4),
            'slices_per_s': round(args.batch / step_s, 2),
            'loss': float(metrics['loss'])}
  if args.profile:
    state, result['profile'] = profile_step(compiled, state, batch, args.profile)
  if args.breakdown:
    result.update(breakdown(config, model, state, batch, args.steps))
  if args.torch:
    ref = run_torch(args, config)
    result['torch'] = ref
    if 'step_s' in ref:
      result['torch_over_jax'] = round(ref['step_s'] / step_s, 2)
      result['torch_over_jax_cpu'] = round(ref['cpu_per_step_upper_s'] / result['step_cpu_s'], 2)
  result['machine'] = machine_info()
  result['time'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
  line = json.dumps(result)
  print(line)
  if args.results:
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('a') as f:
      f.write(line + '\n')
  return result


if __name__ == '__main__':
  main()
