"""Speed of one jitted segmentation train step on synthetic device arrays (no TensorFlow).

usage: python -m benchmarks.train_step [--batch 4 --h 192 --w 160 --k 2 --method clfc
                                        --dtype float32 --width 1 --steps 5 --torch --breakdown]
       python -m benchmarks.train_step --search-max-batch   # largest B that fits (GPU)
prints: one JSON line (compile seconds, median step seconds, slices/s, model FLOPs per step from
XLA's cost analysis, peak memory, MFU, and with --torch the PyTorch reference's step time and
the ratio), also appended to benchmarks/results/train_step.jsonl with the machine it ran on and
its load average (other processes skew CPU timings).
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

from benchmarks import machine
from clfc_jax import host_memory, sharding
from clfc_jax.train import steps as train
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
  ap.add_argument('--channels-last', default='auto', choices=('auto', 'yes', 'no'),
                  help='PyTorch --channels-last: auto = on a GPU only')
  ap.add_argument('--cpu-peak-gflops', type=float, default=0.0,
                  help="this CPU's peak GFLOP/s for MFU (default: MFU is null on CPUs)")
  ap.add_argument('--search-max-batch', action='store_true',
                  help='only find the largest batch that fits (doubling from --batch until '
                       'the device runs out of memory) and print it')
  ap.add_argument('--cheap-compile', action='store_true',
                  help='XLA:CPU -O0 (train.CHEAP_CPU_COMPILE): quicker compile, slower steps; '
                       'smoke tests only')
  ap.add_argument('--max-batch-limit', type=int, default=4096,
                  help='stop the search here (a CPU never runs out of memory politely)')
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


def compiler_options(args):
  cheap = args.cheap_compile and jax.default_backend() == 'cpu'
  return train.CHEAP_CPU_COMPILE if cheap else None


def model_flops(compiled, num_devices: int):
  """FLOPs of one step from XLA's cost analysis, or None when this backend gives none.

  The compiled program is the per-device (SPMD-partitioned) one, so its count is multiplied
  by the number of devices. Older jax versions return a list of one dict per program.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) * num_devices if flops and flops > 0 else None


def peak_memory(compiled, devices):
  """(peak bytes on the busiest device, how it was measured).

  GPUs report the allocator's peak since the process started (run one configuration per
  process); XLA:CPU has no allocator statistics, so there it is the compiled program's
  argument + output + temporary buffers (aliased donated buffers counted once).
  """
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [s['peak_bytes_in_use'] for s in stats if 'peak_bytes_in_use' in s]
  if peaks:
    return int(max(peaks)), 'device.memory_stats peak_bytes_in_use'
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return int(total), 'compiled.memory_analysis argument+output+temp-alias (per device)'
  except Exception:  # pylint: disable=broad-except
    return None, 'unavailable'


def is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def fits(args, batch_size: int) -> bool:
  """Whether one train step at this batch compiles and runs; False only on out-of-memory."""
  trial = argparse.Namespace(**{**vars(args), 'batch': batch_size})
  config = make_config(trial)
  mesh = sharding.make_mesh()
  steps = train.make_jitted_steps(config, mesh, segmenter.build_segmenter(config))
  try:
    state = steps.init(jax.random.key(config.seed))
    batch = sharding.global_batch(synthetic_batch(config, batch_size), mesh)
    jax.block_until_ready(steps.train(state, batch))
    return True
  except Exception as e:  # pylint: disable=broad-except
    if is_out_of_memory(e):
      return False
    raise
  finally:
    state = batch = None
    jax.clear_caches()


def largest_batch(args) -> dict:
  """Doubles the batch from args.batch while a step fits; the largest that did, and the trials."""
  tried, best, b = {}, None, args.batch
  while b <= args.max_batch_limit:
    print(f'train_step: trying batch {b}', file=sys.stderr, flush=True)
    tried[b] = fits(args, b)
    if not tried[b]:
      break
    best, b = b, 2 * b
  return {'max_batch': best, 'tried': {str(k): v for k, v in tried.items()},
          'hit_limit': b > args.max_batch_limit}


def run_torch(args, config):
  if args.width != 1.0 or args.method != 'clfc':
    # The reference is the full-width CLFC network: any other ratio would compare two models.
    return {'error': 'the PyTorch reference is the clfc network at width 1 only'}
  stack = 2 * config.data.k + 1
  cmd = [sys.executable, args.torch_script, '--batch', str(args.batch), '--h', str(args.h),
         '--w', str(args.w), '--in-ch', str(len(config.dataset.modalities) * stack),
         '--norm-ch', str(stack), '--steps', str(args.steps)]
  if args.dtype == 'bfloat16':
    cmd.append('--amp')
  on_gpu = jax.default_backend() == 'gpu'
  if args.channels_last == 'yes' or (args.channels_last == 'auto' and on_gpu):
    cmd.append('--channels-last')
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
  info = machine.describe()
  info.update({'platform': platform.platform(), 'cpu_count': os.cpu_count(),
               'jax': jax.__version__, 'backend': jax.default_backend(),
               'device_kind': dev.device_kind, 'device_count': jax.device_count(),
               'loadavg_1m': round(os.getloadavg()[0], 2)})
  return info


def main(argv=None):
  args = parse_args(argv)
  if args.search_max_batch:
    result = {'impl': 'jax', 'method': args.method, 'hw': [args.h, args.w], 'k': args.k,
              'width': args.width, 'dtype': args.dtype, **largest_batch(args),
              'machine': machine_info()}
    print(json.dumps(result))
    return result
  result = measure(args)
  line = json.dumps(result)
  print(line)
  if args.results:
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('a') as f:
      f.write(line + '\n')
  return result


def measure(args) -> dict:
  """Compiles and times the train step (and optionally the reference); the result record."""
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
  result.update(efficiency(args, compiled, mesh, step_s))
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
  return result


def efficiency(args, compiled, mesh, step_s) -> dict:
  """Model FLOPs per step, peak memory and MFU (FLOP/s achieved over the devices' peak)."""
  devices = list(mesh.devices.flat)
  flops = model_flops(compiled, len(devices))
  mem, mem_source = peak_memory(compiled, devices)
  peak = machine.peak_flops(devices[0].device_kind, args.dtype, args.cpu_peak_gflops)
  mfu = flops / step_s / (peak * len(devices)) if flops and peak else None
  return {'devices': len(devices), 'flops_per_step': flops,
          'tflops_per_s': round(flops / step_s / 1e12, 4) if flops else None,
          'peak_memory_bytes': mem, 'peak_memory_source': mem_source,
          'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          'device_peak_flops': peak, 'mfu': round(mfu, 4) if mfu is not None else None}


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  main()
