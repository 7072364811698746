"""The benchmark suite: train step, whole-patient inference, input pipeline, data prep, scaling.

usage: python -m benchmarks.run [--suite train_step,inference,pipeline,prep,scaling]
                                [--dtype fp32|bf16] [--methods clfc,baseline1,baseline2]
                                [--quick] [--out benchmarks/results]
writes benchmarks/results/<suite>.json and benchmarks/results/summary.md (a Markdown table per
suite under a description of the machine). Every measurement runs in a child process, so one
configuration's compile caches and peak memory do not leak into the next; this process never
starts a jax backend (on a GPU it would hold memory the children need). Suites whose libraries
are missing (TensorFlow on a GPU box) are recorded as skipped, never crash the run.
Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
import subprocess
import sys
import statistics
import threading
from typing import Optional

from benchmarks import machine
from benchmarks import scaling
from benchmarks import tables
from clfc_jax import host_memory
from configs import default

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
TORCH_REFERENCE = REPO.parent / 'shared' / 'bench' / 'torch_reference.py'
SUITES = tuple(tables.SECTIONS)
# Import names each suite needs beyond jax/flax/optax (the train step and scaling need none).
REQUIRES = {'pipeline': ('tensorflow', 'tensorflow_datasets'),
            'prep': ('SimpleITK', 'nibabel', 'nilearn'),
            'inference': ('SimpleITK', 'nibabel', 'nilearn')}
DTYPES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16', 'bfloat16': 'bfloat16'}


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--suite', default=','.join(SUITES), help='comma-separated, from ' +
                  ','.join(SUITES))
  ap.add_argument('--dtype', default='fp32', choices=tuple(DTYPES),
                  help='activations of the train step / inference (bf16 = config.model.dtype '
                       'bfloat16; PyTorch then runs --amp)')
  ap.add_argument('--methods', default='clfc,baseline1,baseline2')
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--h', type=int, default=192)
  ap.add_argument('--w', type=int, default=160)
  ap.add_argument('--k', type=int, default=2)
  ap.add_argument('--width', type=float, default=1.0)
  ap.add_argument('--steps', type=int, default=5, help='timed train steps per configuration')
  ap.add_argument('--torch', default='auto', choices=('auto', 'no'),
                  help='auto: the PyTorch reference beside clfc when torch is installed')
  ap.add_argument('--torch-script', default=str(TORCH_REFERENCE))
  ap.add_argument('--rounds', type=int, default=3,
                  help='clfc beside PyTorch: alternating fresh processes of each, this many times')
  ap.add_argument('--search-max-batch', default='auto', choices=('auto', 'yes', 'no'),
                  help='largest batch that fits: auto = on a GPU only')
  ap.add_argument('--max-batch-limit', type=int, default=4096,
                  help='the search stops doubling past this batch')
  ap.add_argument('--cpu-peak-gflops', type=float, default=0.0,
                  help="this CPU's peak GFLOP/s, for an MFU on CPUs")
  ap.add_argument('--pipeline-seconds', type=float, default=20.0)
  ap.add_argument('--prep-repeats', type=int, default=2)
  ap.add_argument('--prep-cohort', type=int, default=4)
  ap.add_argument('--inference-cases', type=int, default=2,
                  help='patients timed (the first includes compilation)')
  ap.add_argument('--scaling-counts', default='1,2,4,8')
  ap.add_argument('--quick', action='store_true',
                  help='smoke run: width 0.25, 96x80, 2 steps, fewer repeats (not for numbers)')
  ap.add_argument('--cheap-compile', action='store_true', help=argparse.SUPPRESS)  # tests
  ap.add_argument('--out', default=str(RESULTS))
  args = ap.parse_args(argv)
  args.dtype = DTYPES[args.dtype]
  unknown = set(args.suite.split(',')) - set(SUITES)
  if unknown:
    ap.error(f'unknown suite(s) {sorted(unknown)}; choose from {SUITES}')
  if args.quick:   # smaller values for what the command line left at its default
    quick = {'rounds': 1, 'width': 0.25, 'h': 96, 'w': 80, 'steps': 2, 'pipeline_seconds': 5.0,
             'prep_repeats': 1, 'prep_cohort': 0, 'scaling_counts': '1,2'}
    for name, value in quick.items():
      if getattr(args, name) == ap.get_default(name):
        setattr(args, name, value)
  return args


def log(message: str) -> None:
  print(f'benchmarks.run: {message}', file=sys.stderr, flush=True)


def module_available(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def missing_requirement(suite: str) -> Optional[str]:
  """'<module> not installed' for the first library the suite lacks, else None."""
  for name in REQUIRES.get(suite, ()):
    if not module_available(name):
      return f'{name.lower()} not installed'
  return None


def child(module: str, argv, env: Optional[dict] = None) -> dict:
  """Runs `python -m module argv`; its last JSON stdout line, or {'error': ...}."""
  return run_json([sys.executable, '-m', module, *map(str, argv)], env)


def run_json(cmd, env: Optional[dict] = None) -> dict:
  """Runs cmd; its last JSON stdout line, or {'error': ...}.

  The child's stderr (progress) is passed through as it comes and its tail kept for errors.
  """
  env = dict(os.environ, **(env or {}))
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
  log(' '.join(cmd[1:]))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=REPO)
  tail = []

  def pump():
    for line in proc.stderr:
      sys.stderr.write(line)
      tail[:] = (tail + [line.rstrip()])[-20:]
  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  stdout = proc.stdout.read()
  proc.wait()
  reader.join()
  lines = [l for l in stdout.strip().splitlines() if l.startswith('{') or l.startswith('[')]
  if proc.returncode or not lines:
    errors = [l for l in tail if 'Error' in l or 'error' in l] or tail or ['no output']
    return {'error': f'{Path(cmd[1]).name if cmd[1] != "-m" else cmd[2]} exited '
                     f'{proc.returncode}: {errors[-1]}'}
  return json.loads(lines[-1])


def torch_reference(args, devices: dict) -> dict:
  """The PyTorch reference's step at the suite's size, in its own process (on a GPU the JAX
  child's preallocated memory is gone by then): plain on a CPU; --channels-last on a GPU,
  --amp for bf16."""
  stack = 2 * args.k + 1
  cmd = [sys.executable, args.torch_script, '--batch', args.batch, '--h', args.h,
         '--w', args.w, '--in-ch', len(default.get_config().dataset.modalities) * stack,
         '--norm-ch', stack, '--steps', args.steps]
  if args.dtype == 'bfloat16':
    cmd.append('--amp')
  if devices.get('backend') == 'gpu':
    cmd.append('--channels-last')
  return run_json([str(c) for c in cmd])


def _step_argv(args, method: str, batch: int) -> list:
  return ['--method', method, '--batch', batch, '--h', args.h, '--w', args.w, '--k', args.k,
          '--width', args.width, '--dtype', args.dtype, '--steps', args.steps,
          '--cpu-peak-gflops', args.cpu_peak_gflops, '--results', ''] + (
              ['--cheap-compile'] if args.cheap_compile else [])


def clfc_beside_torch(args, devices: dict) -> dict:
  """clfc's step and the PyTorch reference's in alternating fresh processes, args.rounds times.

  One process of each swings by ~5% on a shared 2-core CPU (huge-page luck, neighbours), so the
  ratio is the median of the rounds' ratios, with its range and every round kept. The row is
  the JAX round of median step time, its `torch` the reference round of median step time.
  """
  rounds = []
  for _ in range(max(1, args.rounds)):
    jax_row = child('benchmarks.train_step', _step_argv(args, 'clfc', args.batch))
    torch_row = torch_reference(args, devices)
    rounds.append((jax_row, torch_row))
    if 'step_s' not in jax_row or 'step_s' not in torch_row:
      break
  return combine_rounds(rounds)


def combine_rounds(rounds) -> dict:
  """[(jax record, torch record)] -> one row: median step times, median ratio, its range."""
  timed = [(j, t) for j, t in rounds if 'step_s' in j and 'step_s' in t]
  if not timed:
    jax_row, torch_row = rounds[-1]
    return dict(jax_row, torch=torch_row)
  by_time = lambda rows: sorted(rows, key=lambda x: x['step_s'])[(len(rows) - 1) // 2]
  row = dict(by_time([j for j, _ in timed]))
  row['torch'] = by_time([t for _, t in timed])
  ratios = [t['step_s'] / j['step_s'] for j, t in timed]
  row['torch_over_jax'] = round(statistics.median(ratios), 2)
  row['rounds'] = [{'jax_step_s': j['step_s'], 'torch_step_s': t['step_s'],
                    'torch_over_jax': round(t['step_s'] / j['step_s'], 3)} for j, t in timed]
  if len(timed) > 1:
    row['note'] = (f'median of {len(timed)} alternating rounds; torch/jax '
                   f'{min(ratios):.2f}-{max(ratios):.2f}')
  return row


def train_step_suite(args, devices: dict) -> dict:
  """Per method: B=args.batch (clfc beside PyTorch) and, on a GPU, the largest B that fits."""
  search = args.search_max_batch == 'yes' or (args.search_max_batch == 'auto' and
                                              devices.get('backend') == 'gpu')
  torch_skip = ('torch not installed' if not module_available('torch') else
                f'{args.torch_script} not found' if not Path(args.torch_script).exists() else
                'disabled (--torch no)' if args.torch == 'no' else
                'only at width 1 (its channels are fixed)' if args.width != 1.0 else None)
  rows = []
  for method in args.methods.split(','):
    if method == 'clfc' and not torch_skip:
      row = clfc_beside_torch(args, devices)
    else:
      row = child('benchmarks.train_step', _step_argv(args, method, args.batch))
      if method == 'clfc':
        row['note'] = f'PyTorch reference: {torch_skip}'
    row.setdefault('method', method)
    row.setdefault('batch', args.batch)
    rows.append(row)
    if not search:
      rows.append({'method': method, 'batch': 'max', 'note': 'not searched on CPU'})
      continue
    found = child('benchmarks.train_step', _step_argv(args, method, args.batch) +
                  ['--search-max-batch', '--max-batch-limit', args.max_batch_limit])
    best = found.get('max_batch')
    if not best:
      rows.append({'method': method, 'batch': 'max',
                   'error': found.get('error', f'batch {args.batch} does not fit')})
      continue
    big = child('benchmarks.train_step', _step_argv(args, method, best))
    big.setdefault('method', method)
    big.setdefault('batch', best)
    big['note'] = ('largest B that fits (doubling until out of memory; tried '
                   f"{found.get('tried')}{', search limit hit' if found.get('hit_limit') else ''})")
    rows.append(big)
  return {'suite': 'train_step', 'rows': rows,
          'config': {'hw': [args.h, args.w], 'k': args.k, 'width': args.width,
                     'dtype': args.dtype, 'steps': args.steps, 'methods': args.methods,
                     'rounds': args.rounds}}


def _step_demand(train_step_result: dict) -> dict:
  """Slices/s the train step consumes per H x W (clfc at the base batch first), if measured."""
  rows = [r for r in train_step_result.get('rows', []) if r.get('slices_per_s') and r.get('hw')]
  rows.sort(key=lambda r: (r.get('method') != 'clfc', r.get('note') is not None))
  demand = {}
  for r in rows:
    demand.setdefault(tuple(r['hw']), r)
  return demand


def pipeline_suite(args, results: dict) -> dict:
  out = Path(args.out) / 'pipeline.rows.tmp'
  done = child('benchmarks.pipeline', ['--sizes', 'demo,full,brats', '--seconds',
                                       args.pipeline_seconds, '--out', out])
  if 'error' in done:
    return {'suite': 'pipeline', 'error': done['error'], 'rows': []}
  rows = json.loads(out.read_text())
  out.unlink()
  # The demand: the train step of this run, else the last train_step suite result kept.
  source = results.get('train_step')
  earlier = Path(args.out) / 'train_step.json'
  if source is None and earlier.exists():
    source = json.loads(earlier.read_text())
  demand = _step_demand(source or {})
  for row in rows:
    step = demand.get(tuple(row['crop_hw']))
    if 'slices_per_s' not in row:   # the 'brats' row: shard bytes and build time only.
      continue
    row['demand_slices_per_s'] = step['slices_per_s'] if step else None
    row['headroom'] = round(row['slices_per_s'] / step['slices_per_s'], 2) if step else None
    if step:
      row['demand_from'] = (f"{step['method']} B={step['batch']} {step.get('dtype')}, "
                            f"train_step suite of {source.get('machine', {}).get('time')}")
  return {'suite': 'pipeline', 'rows': rows}


def prep_suite(args) -> dict:
  out = Path(args.out) / 'prep.json'
  done = child('benchmarks.prep', ['--repeats', args.prep_repeats, '--cohort', args.prep_cohort,
                                   '--out', out])
  return done if 'error' in done else json.loads(out.read_text())


def inference_suite(args) -> dict:
  return child('benchmarks.inference', ['--cases', args.inference_cases, '--dtype', args.dtype,
                                        '--out', ''] + (['--quick'] if args.quick else []))


def scaling_suite(args, devices: dict) -> dict:
  ns = scaling.parse_args(['--counts', args.scaling_counts, '--dtype', args.dtype,
                           '--steps', str(max(args.steps, 1)), '--out', ''])
  return scaling.run(ns, devices)


def run_suite(name: str, args, devices: dict, results: dict) -> dict:
  """One suite's record; its 'machine' is this machine as the suite started (time, load)."""
  at_start = dict(machine.describe(with_jax=False), **devices)
  log(f'suite {name} (load {at_start["loadavg_1m"]})')
  skip = missing_requirement(name)
  suites = {'train_step': lambda: train_step_suite(args, devices),
            'pipeline': lambda: pipeline_suite(args, results),
            'prep': lambda: prep_suite(args), 'inference': lambda: inference_suite(args),
            'scaling': lambda: scaling_suite(args, devices)}
  if skip:
    log(f'{name}: skipped ({skip})')
    result = {'suite': name, 'skipped': skip}
  else:
    try:
      result = suites[name]()
    except Exception as e:  # pylint: disable=broad-except  (one suite must not stop the rest)
      log(f'{name} failed: {type(e).__name__}: {e}')
      result = {'suite': name, 'error': f'{type(e).__name__}: {e}'}
  result.setdefault('suite', name)
  own = {k: v for k, v in result.get('machine', {}).items() if k not in ('time', 'loadavg_1m')}
  result['machine'] = dict(at_start, **own)
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  devices = machine.probe_devices()
  start = dict(machine.describe(with_jax=False), **devices)
  log(f"{start['cpu_model']} x{start['cpu_count']}, backend {devices.get('backend')}, "
      f"load {start['loadavg_1m']}")
  results = {}
  for name in args.suite.split(','):
    results[name] = run_suite(name, args, devices, results)
    (out / f'{name}.json').write_text(json.dumps(results[name], indent=1))
  # The summary shows every suite result in the folder: this run's and earlier ones (each
  # section says when it ran).
  every = {}
  for name in SUITES:
    path = out / f'{name}.json'
    if path.exists():
      every[name] = json.loads(path.read_text())
  (out / 'summary.md').write_text(tables.summary_markdown(every, start))
  log(f'wrote {out}/summary.md')
  return results


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  main()
