"""Preprocessing cost per case at full size: 1 mm, 240x240x155, 4 modalities + label + healthy T1.

`python -m benchmarks.prep [--repeats=2] [--threads=2] [--cohort=4] [--set reg.iterations=50]`
writes a synthetic BraTS-like case with data_prep.synthetic at 1 mm, then times
`prepare.prepare_case` split into load/validate, registration, resampling (+ masking, cropping,
scaling) and save. The one-off template build (once per worker process) is reported apart.
`--cohort=N` also runs `prepare.prepare_cohort` on N copies of the case with
config.prep.num_workers processes: wall seconds per case of the whole stage, pool start-up and
per-worker template builds included. It also reports how
well the case comes back: Dice of the whole-tumor label after MNI and back to the native grid,
and the distance between the registered tumor centroid and where the generator placed it (MNI
mm). `cpu` is the process's CPU seconds (all threads) per case: unlike wall time it hardly
depends on how busy the machine is. Results go to benchmarks/results/prep.json (and one JSON line on stdout).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
import platform
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from benchmarks import tables
from configs import default
from data_prep import prepare, register, synthetic
from data_prep.case import Case, ImageRef


RESULTS = Path(__file__).parent / 'results' / 'prep.json'


def make_case(folder: Path, seed: int = 0):
  """One 1 mm synthetic tumor case on disk; returns (Case, the generator's tumor centre)."""
  subject = synthetic.make_tumor_subject(synthetic.subject_rng(seed, 'tumor', 0, 'plain'),
                                         spacing=1.0, profile='plain')
  case_id = synthetic.tumor_case_id(0)
  path = synthetic.write_tumor_subject(subject, case_id, folder)
  images = {m: ImageRef(path / f'{case_id}_{m}.nii.gz') for m in synthetic.MODALITIES}
  case = Case(case_id, images, label=ImageRef(path / f'{case_id}_seg.nii.gz'),
              group=subject.info['group'],
              healthy_t1=ImageRef(path / f'{case_id}_t1_healthy.nii.gz'))
  return case, np.asarray(subject.info['centre_mm']), subject.label


def _accuracy(pc, centre_mm, native_label) -> dict:
  box, grid = pc.meta['crop_box'], pc.meta['mni_grid']
  zz, hh, ww = np.nonzero(pc.label > 0)
  index = np.array([ww.mean() + box[2][0], hh.mean() + box[1][0], zz.mean() + box[0][0]])
  centre = np.array(grid['origin']) * [-1, -1, 1] + index * np.array(grid['spacing'])
  back = register.to_native(pc.label > 0, pc.meta, 'nearest') > 0
  truth = native_label > 0
  dice = 2.0 * (back & truth).sum() / (back.sum() + truth.sum())
  return {'tumor_centre_error_mm': round(float(np.linalg.norm(centre - centre_mm)), 2),
          'round_trip_dice': round(float(dice), 4)}


def _machine(threads) -> dict:
  return {'platform': platform.platform(), 'cpus': os.cpu_count(), 'sitk_threads': threads,
          'sitk': sitk.Version.VersionString(), 'loadavg_1m': round(os.getloadavg()[0], 2)}


def _cohort_seconds(case, config, n: int, out_dir: Path) -> dict:
  copies = [dataclasses.replace(case, case_id=f'{case.case_id}_copy{i}') for i in range(n)]
  tick = time.perf_counter()
  summary = prepare.prepare_cohort(copies, config, out_dir, progress=False)
  wall = time.perf_counter() - tick
  if summary['skipped']:
    raise RuntimeError(f'cohort benchmark skipped cases: {summary["skipped"]}')
  return {'cases': n, 'workers': summary['workers'], 'wall_s': round(wall, 2),
          'wall_s_per_case': round(wall / n, 2),
          'case_s_median': round(float(np.median(list(summary['seconds_per_case'].values()))), 2)}


def run(repeats: int, threads: int, cohort: int = 0, overrides=()) -> dict:
  config = default.get_config()
  for item in overrides:
    key, value = item.split('=', 1)
    node = config.prep
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    with config.unlocked():
      node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) \
          else value
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    tick = time.perf_counter()
    case, centre_mm, native_label = make_case(Path(tmp) / 'BraTS')
    generate_s = time.perf_counter() - tick
    tick = time.perf_counter()
    prepare.mni_space(config)
    template_s = time.perf_counter() - tick
    runs = []
    for i in range(repeats):
      cpu = time.process_time()
      pc = prepare.prepare_case(case, config, Path(tmp) / f'prep{i}')
      runs.append(dict(pc.meta['seconds'], cpu=round(time.process_time() - cpu, 3)))
    accuracy = _accuracy(pc, centre_mm, native_label)
    cohort_result = _cohort_seconds(case, config, cohort, Path(tmp) / 'cohort') if cohort else None
  parts = ('load', 'register', 'resample', 'save', 'total', 'cpu')
  return {
      'suite': 'prep', 'case': '240x240x155 1 mm, 4 modalities + seg + healthy T1 (synthetic)',
      'mni_grid': pc.meta['mni_grid']['size'], 'crop': [b - a for a, b in pc.meta['crop_box']],
      'reg': dict(config.prep.reg), 'overrides': list(overrides),
      'seconds_per_case': {k: round(float(np.median([r[k] for r in runs])), 2) for k in parts},
      'runs': runs, 'template_once_s': round(template_s, 2),
      'generate_case_s': round(generate_s, 2),
      'registration_metric': round(pc.meta['registration_metric'], 4),
      'cohort': cohort_result, **accuracy, 'machine': _machine(threads),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--threads', type=int, default=2, help='SimpleITK threads')
  parser.add_argument('--cohort', type=int, default=4, help='copies through prepare_cohort')
  parser.add_argument('--set', nargs='*', default=[], help='prep overrides: reg.iterations=50')
  parser.add_argument('--out', default=str(RESULTS))
  args = parser.parse_args()
  tables.emit(run(args.repeats, args.threads, args.cohort, args.set), args.out)


if __name__ == '__main__':
  main()
