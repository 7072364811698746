"""Markdown tables of the suites' JSON results: benchmarks/results/summary.md.

One section per suite result found, each saying when it ran and at what load, under a header
describing the machine of the latest run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


def emit(result: dict, out: Optional[str]) -> dict:
  """A benchmark's result: one JSON line on stdout (benchmarks.run reads it) and, when `out`
  names a file, the same JSON indented there."""
  print(json.dumps(result), flush=True)
  if out:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
  return result


def _cell(value) -> str:
  if value is None:
    return '–'
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    return '×'.join(str(v) for v in value)
  return str(value).replace('|', '\\|')


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
  """columns: (header, key or function of the row)."""
  lines = ['| ' + ' | '.join(h for h, _ in columns) + ' |',
           '|' + '|'.join(' --- ' for _ in columns) + '|']
  for row in rows:
    cells = [_cell(key(row) if callable(key) else row.get(key)) for _, key in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _gib(n) -> Optional[float]:
  return None if n is None else round(n / 2**30, 3)


def _when(result: dict) -> str:
  m = result.get('machine', {})
  return f"_measured {m.get('time', '?')}, load average {m.get('loadavg_1m', '?')} at start_"


def machine_header(m: dict) -> str:
  v = m.get('versions', {})
  gpus = m.get('gpus') or []
  rows = [('CPU', f"{m.get('cpu_model')} ({m.get('cpu_count')} cores)"),
          ('GPU', ', '.join(gpus) if gpus else 'none'),
          ('jax backend', f"{m.get('backend')} ({m.get('device_count')} × {m.get('device_kind')})"),
          ('python', m.get('python')),
          ('jax / jaxlib / flax / optax', ' / '.join(str(v.get(p)) for p in
                                                     ('jax', 'jaxlib', 'flax', 'optax'))),
          ('torch', v.get('torch') or 'not installed'),
          ('tensorflow', v.get('tensorflow-cpu') or v.get('tensorflow') or 'not installed'),
          ('platform', m.get('platform')), ('started', m.get('time')),
          ('load average at start', m.get('loadavg_1m')), ('command', m.get('argv'))]
  return markdown_table([{'k': k, 'v': val} for k, val in rows], [('machine', 'k'), ('', 'v')])


def train_step_section(r: dict) -> str:
  c = r.get('config', {})
  head = (f"clfc_jax.train step on synthetic device arrays, {_cell(c.get('hw'))}, "
          f"K={c.get('k')}, width {c.get('width')}, {c.get('dtype')}. "
          'FLOPs per step from XLA\'s cost analysis of the compiled step; MFU = FLOP/s over '
          'the device peak (none for CPUs). torch/jax = PyTorch reference step time over ours '
          f"(>1: JAX faster), same run: the median over {c.get('rounds', 1)} alternating "
          'rounds of fresh processes (each round in results/train_step.json).')
  rows = [dict(x, torch_step_s=(x.get('torch') or {}).get('step_s')) for x in r['rows']]
  table = markdown_table(rows, [
      ('method', 'method'), ('B', 'batch'), ('step s', 'step_s'),
      ('slices/s', 'slices_per_s'), ('compile s', 'compile_s'),
      ('GFLOP/step', lambda x: x['flops_per_step'] / 1e9 if x.get('flops_per_step') else None),
      ('TFLOP/s', 'tflops_per_s'), ('MFU', 'mfu'),
      ('peak mem GiB', lambda x: _gib(x.get('peak_memory_bytes'))),
      ('torch step s', 'torch_step_s'), ('torch/jax', 'torch_over_jax'),
      ('note', lambda x: x.get('note') or x.get('error'))])
  sources = sorted({x.get('peak_memory_source') for x in r['rows'] if x.get('peak_memory_source')})
  return '\n\n'.join([head, table, 'peak memory: ' + '; '.join(sources) if sources else ''])


def inference_section(r: dict) -> str:
  phases = ('load', 'preprocess', 'introvae', 'segment', 'write', 'total')
  rows = [dict(r[k], case=label) for k, label in
          (('first_case_s', 'first (with compile)'), ('steady_case_s', 'steady state'))
          if r.get(k)]
  return '\n\n'.join([
      f"Seconds per whole patient: {r.get('case')}, method {r.get('method')}, "
      f"{r.get('dtype')}. {r.get('weights', '')}",
      markdown_table(rows, [('case', 'case')] + [(p, p) for p in phases])])


def pipeline_section(r: dict) -> str:
  table = markdown_table(r['rows'], [
      ('size', 'size'), ('H×W', 'crop_hw'), ('K', 'k'), ('channels', 'channels'),
      ('pipeline slices/s', 'slices_per_s'), ('train step demand slices/s', 'demand_slices_per_s'),
      ('pipeline / demand', 'headroom'), ('slices/case', 'slices_per_case'),
      ('shard MB/case', 'mb_per_case'), ('pseudo-normal MB/case', 'pseudo_normal_mb_per_case'),
      ('build s/case', 'build_s_per_case'), ('build workers', 'shard_workers'),
      ('demand from', 'demand_from')])
  return ('input_pipeline.train_iterator (augmentation on, one process) vs what the train step '
          'of the same H×W consumes (its batch / step time, from the train_step suite of this '
          'run, else the last one kept). Shards: one tumor set for every fold (toy volumes of '
          'smooth noise; the brats row is 192×160×155, BraTS at 1 mm after the crop), plus one '
          'pseudo-normal companion per IntroVAE.\n\n' + table)


def prep_section(r: dict) -> str:
  s = r.get('seconds_per_case', {})
  row = dict(s, reg=f"{r.get('reg', {}).get('iterations')} it @ {r.get('reg', {}).get('spacing')} mm")
  cohort = r.get('cohort') or {}
  row['cohort'] = (f"{cohort.get('wall_s_per_case')} s/case over {cohort.get('cases')} cases, "
                   f"{cohort.get('workers')} workers") if cohort else None
  return (f"data_prep.prepare_case per case: {r.get('case')}.\n\n" + markdown_table([row], [
      ('load', 'load'), ('register', 'register'), ('resample', 'resample'), ('save', 'save'),
      ('total s', 'total'), ('CPU s', 'cpu'), ('registration', 'reg'), ('cohort', 'cohort')]))


def scaling_section(r: dict) -> str:
  c = r.get('config', {})
  cols = [('devices', 'devices'), ('device', 'device_kind'), ('global B', 'batch'),
          ('step s', 'step_s'), ('slices/s', 'slices_per_s'), ('vs 1 device', 'overhead_vs_1'),
          ('compile s', 'compile_s'), ('loss Δ (abs)', 'loss_abs_diff'),
          ('param Δ (max abs)', 'params_max_abs_diff'),
          ('Δ / largest update', 'diff_over_update'), ('error', 'error')]
  out = [f"One global batch split over N devices, {c.get('method')} width {c.get('width')}, "
         f"{_cell(c.get('hw'))}, K={c.get('k')}, B={c.get('global_batch')}, {c.get('dtype')}. "
         'Differences: after one step, against 1 device; Δ / largest update is the parameter '
         'difference over the largest parameter change the step made (float noise is ~1e-3 '
         'or less). Forced CPU devices share the same '
         'cores, so on a CPU the ratio is the sharded program\'s overhead, not a speed-up.',
         markdown_table(r.get('cpu', []), cols)]
  if r.get('gpu'):
    out += ['GPUs:', markdown_table(r['gpu'], cols)]
  return '\n\n'.join(out)


SECTIONS = {'train_step': train_step_section, 'inference': inference_section,
            'pipeline': pipeline_section, 'prep': prep_section, 'scaling': scaling_section}


def section(name: str, result: dict) -> str:
  body = (f"skipped: {result['skipped']}" if result.get('skipped')
          else f"failed: {result['error']}" if result.get('error') and 'rows' not in result
          else SECTIONS[name](result))
  return f'## {name}\n\n{_when(result)}\n\n{body}\n'


def summary_markdown(results: dict, machine: dict) -> str:
  """results: suite name -> its JSON record (suites in SECTIONS order)."""
  parts = ['# Benchmark summary\n', machine_header(machine) + '\n',
           'Reproduce: `python -m benchmarks.run` (see benchmarks/README.md).\n']
  parts += [section(name, results[name]) for name in SECTIONS if name in results]
  return '\n'.join(parts)
