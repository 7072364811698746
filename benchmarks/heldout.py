"""Generalisation check: a trained workdir's models on a cohort the training generator never made.

`python -m benchmarks.heldout --workdir=workdir/demo [--cases 16] [--seed 2027] [--spacing 1.5]`
writes a synthetic cohort with data_prep.synthetic's `heldout` profile (its own seed stream and
ranges the `train` profile never draws: other grids and orientations, lower gain, harsher
contrast, blur, bias and noise, thicker slices, small and multi-focal tumours), segments every
patient as a new one (clfc_jax.segment: no label is read), and scores each mask against the
patient's label file in its own native space with clfc_jax.metrics (Dice, sensitivity, HD95 in
mm). Results: benchmarks/results/heldout.json (per case and mean ± std, also by tumour size).
It never feeds back into training or model selection: it only reads the workdir.

`--shifts=all` (or a comma list of SHIFT_GROUPS) also scores cohorts of the `train` profile with
one group of the held-out ranges at a time, on the held-out seed stream: which shift costs the
Dice (`train` alone is the same generator with new subjects).

`--ceiling` also scores, per cohort, what a model that reproduced its training targets exactly
would score: each patient's label is taken through the same preparation as its images (into the
model's MNI grid and crop, as training labels are made) and written back the way `segment`
writes a prediction (brain mask, linear resampling, threshold, the validation-chosen component
cleaning). The distance between it and 100% is what the model's grid costs on its own: a small
tumour on a 2 mm grid cannot come back to a 1 mm native grid whole.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

from benchmarks import machine
from benchmarks import tables
from clfc_jax import evaluate, host_memory, metrics, segment
from clfc_jax import workdir as workdir_lib
from configs import default
from data_prep import prepare, readers, synthetic, validate
from data_prep.case import ImageRef

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'heldout.json'
SMALL_ML = 5.0   # tumours below this (whole tumour, ml) are reported apart: the hardest ones
# data_prep.synthetic.Profile fields by the kind of shift they make.
SHIFT_GROUPS = {
    'train': (),
    'grid': ('orientations', 'inplane_voxel', 'inplane_aspect', 'slice_voxel', 'oblique_deg'),
    'intensity': ('gain', 'offset', 'contrast_jitter', 'gamma'),
    'degradation': ('bias_strength', 'bias_cell_mm', 'noise_std', 'psf_sigma', 'thick_prob',
                    'slice_thickness'),
    'skull_strip': ('rim_prob', 'rim_width', 'rim_cover', 'cut_prob', 'cut_depth', 'cut_cover',
                    'outlier_fraction'),
    'tumour': ('tumor_ml', 'foci_probs', 'site_probs', 'infiltration'),
}


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True, help='a finished clfc_jax.main workdir')
  ap.add_argument('--method', default=None, help="default: the workdir config's method")
  # 16: on 8 patients the mean Dice of one model moved by 22 points between two seeds of the
  # cohort (the profile's tumours are 0.3-20 ml, log-uniform: how many tiny ones a cohort
  # draws decides much of its mean).
  ap.add_argument('--cases', type=int, default=16)
  ap.add_argument('--seed', type=int, default=2027, help='the held-out cohort seed')
  ap.add_argument('--spacing', type=float, default=1.5, help='nominal mm of the cohort')
  ap.add_argument('--profile', default='heldout', help='data_prep.synthetic profile')
  ap.add_argument('--tta', action='store_true', help='mirroring test-time augmentation')
  ap.add_argument('--shifts', default='',
                  help="'all' or a comma list of SHIFT_GROUPS: also one held-out shift at a time")
  ap.add_argument('--ceiling', action='store_true',
                  help="also score each patient's own label through the model's grid")
  ap.add_argument('--keep', default='', help='folder to keep the cohort and masks in')
  ap.add_argument('--out', default=str(RESULTS), help="JSON to write; '' = none")
  return ap.parse_args(argv)


def read_truth(label_path):
  """(label image, whole-tumour mask, voxel spacing in mm) of a label file."""
  label_img = nib.load(str(label_path))
  spacing = tuple(float(z) for z in label_img.header.get_zooms()[:3])
  return label_img, np.asanyarray(label_img.dataobj) > 0, spacing


def score_mask(pred_path, label_path, truth=None) -> dict:
  """Dice, sensitivity, HD95 (mm) of a written mask against a label file on the same grid
  (`truth`: read_truth(label_path) when the caller has it already)."""
  label_img, truth, spacing = truth or read_truth(label_path)
  pred_img = nib.load(str(pred_path))
  pred = np.asanyarray(pred_img.dataobj) > 0
  if pred.shape != truth.shape or not np.allclose(pred_img.affine, label_img.affine, atol=1e-3):
    raise ValueError(f'{pred_path}: not on the grid of {label_path} ({pred.shape} vs '
                     f'{truth.shape})')
  out = metrics.case_metrics(pred, truth, spacing)
  out['tumor_ml'] = float(truth.sum() * np.prod(spacing) / 1000.0)
  return out


def ceiling_mask(case, label_path, models) -> np.ndarray:
  """A perfect model's mask of `case`, written back as `segment` writes a prediction: the label,
  prepared into the model's grid like a training label, then brain-masked, resampled to the
  native grid linearly, thresholded and cleaned (boolean, on the native grid)."""
  config = models.config
  case = dataclasses.replace(case, label=ImageRef(Path(label_path)))
  pc = prepare.prepare_loaded(validate.load_case(case, config, require_label=True), config)
  mask, _ = evaluate.native_mask((pc.label > 0).astype(np.float32), pc.meta, config,
                                 brain=pc.brain, min_volume_ml=models.min_volume_ml)
  return mask


def _mean_std(rows, key) -> dict:
  values = np.asarray([r[key] for r in rows], np.float64)
  if not len(values):
    return {'mean': None, 'std': None}
  return {'mean': round(float(values.mean()), 4),
          'std': round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)}


def summarize(rows) -> dict:
  """Mean ± sample std of every metric, over all cases and by tumour size."""
  groups = {'all': rows, f'< {SMALL_ML:g} ml': [r for r in rows if r['tumor_ml'] < SMALL_ML],
            f'>= {SMALL_ML:g} ml': [r for r in rows if r['tumor_ml'] >= SMALL_ML]}
  return {name: dict(n=len(group), **{m: _mean_std(group, m)
                                      for m in ('dice', 'sensitivity', 'hd95')})
          for name, group in groups.items()}


def shift_profile(group: str) -> synthetic.Profile:
  """The `train` profile with SHIFT_GROUPS[group]'s ranges of `heldout`, on heldout's stream."""
  if group not in SHIFT_GROUPS:
    raise ValueError(f'unknown shift group {group!r}; expected one of {sorted(SHIFT_GROUPS)}')
  train, held = synthetic.PROFILES['train'], synthetic.PROFILES['heldout']
  return dataclasses.replace(train, name=f'train+{group}', stream=held.stream,
                             **{f: getattr(held, f) for f in SHIFT_GROUPS[group]})


def shift_groups(spec: str) -> list:
  return list(SHIFT_GROUPS) if spec == 'all' else [g for g in spec.split(',') if g]


def run(args, models=None) -> dict:
  """The record; `models` (segment.load_models) replaces loading them from args.workdir."""
  workdir = Path(args.workdir).expanduser().resolve()
  config = workdir_lib.read_config(workdir_lib.Workdir(workdir).config)
  config = default.method_config(config, args.method)
  models = models or segment.load_models(None, workdir, method=args.method,
                                         tta=True if getattr(args, 'tta', False) else None)
  record = _score_cohort(args, config, models, synthetic.get_profile(args.profile),
                         Path(args.keep).expanduser() if args.keep else None)
  shifts = {}
  for group in shift_groups(getattr(args, 'shifts', '')):
    keep = Path(args.keep).expanduser() / f'shift_{group}' if args.keep else None
    scored = _score_cohort(args, config, models, shift_profile(group), keep)
    shifts[group] = scored['summary']
    if 'ceiling' in scored:
      shifts[group] = dict(scored['summary'], ceiling=scored['ceiling']['summary']['all'])
  return {'suite': 'heldout', 'workdir': str(workdir), 'method': models.method,
          'folds': [m.fold for m in models.members],
          'tta': bool(models.members[0].config.eval.tta),
          'cohort': {'profile': args.profile, 'seed': args.seed, 'spacing_mm': args.spacing,
                     'cases': args.cases},
          **record, **({'shifts': shifts} if shifts else {}),
          'machine': machine.describe(with_jax=False)}


def _score_cohort(args, config, models, profile, keep) -> dict:
  """{'summary', 'cases', 'seconds_per_case'} of a fresh cohort of `profile`."""
  with tempfile.TemporaryDirectory() as tmp:
    root = keep or Path(tmp)
    log(f'writing {args.cases} {profile.name} patients into {root}')
    cohort = synthetic.generate_cohort(root / 'cohort', args.cases, 0, args.seed, args.spacing,
                                       progress=False, profile=profile)
    cases, problems = readers.find_patients(root / 'cohort' / 'BraTS', config)
    if problems:
      raise ValueError(f'held-out cohort: unreadable patients {problems}')
    tick = time.perf_counter()
    done = segment.segment_cases(models, cases, root / 'masks', progress=False, overwrite=True)
    seconds = time.perf_counter() - tick
    if done['failed']:
      raise RuntimeError(f'segment failed on {done["failed"]}')
    info = {c['id']: c for c in cohort['tumor_cases']}
    rows, ceiling = [], []
    for case in cases:
      label = root / 'cohort' / info[case.case_id]['path'] / f'{case.case_id}_seg.nii.gz'
      truth = read_truth(label)
      row = score_mask(root / 'masks' / f'{case.case_id}{segment.OUTPUT_SUFFIXES["seg"]}', label,
                       truth)
      grid = info[case.case_id]['grid']
      rows.append(dict(case=case.case_id, shape=grid['shape'],
                       **{k: round(v, 4) for k, v in row.items()}))
      if getattr(args, 'ceiling', False):
        _, mask, spacing = truth
        best = metrics.case_metrics(ceiling_mask(case, label, models), mask, spacing)
        ceiling.append(dict(case=case.case_id, tumor_ml=round(row['tumor_ml'], 4),
                            **{k: round(float(v), 4) for k, v in best.items()}))
  out = {'summary': summarize(rows), 'cases': rows,
         'seconds_per_case': round(seconds / max(len(cases), 1), 2)}
  if ceiling:
    out['ceiling'] = {'summary': summarize(ceiling), 'cases': ceiling}
  return out


def _cell(s, m, scale):
  return f'{scale * s[m]["mean"]:.2f} ± {scale * s[m]["std"]:.2f}' if s[m]['mean'] is not None \
      else '–'


def markdown(result) -> str:
  lines = ['| cases | n | Dice (%) | Sensitivity (%) | HD95 (mm) |', '|---|---|---|---|---|']
  for name, s in result['summary'].items():
    if not s['n']:
      continue
    lines.append(f'| {name} | {s["n"]} | {_cell(s, "dice", 100)} | '
                 f'{_cell(s, "sensitivity", 100)} | {_cell(s, "hd95", 1)} |')
  if result.get('ceiling'):
    for name, s in result['ceiling']['summary'].items():
      if s['n']:
        lines.append(f'| ceiling (own label through the grid), {name} | {s["n"]} | '
                     f'{_cell(s, "dice", 100)} | {_cell(s, "sensitivity", 100)} | '
                     f'{_cell(s, "hd95", 1)} |')
  if result.get('shifts'):
    lines += ['', '| train profile + held-out ranges of | n | Dice (%) | Sensitivity (%) | '
              'HD95 (mm) |', '|---|---|---|---|---|']
    for group, summary in result['shifts'].items():
      s = summary['all']
      lines.append(f'| {"nothing (new subjects)" if group == "train" else group} | {s["n"]} | '
                   f'{_cell(s, "dice", 100)} | {_cell(s, "sensitivity", 100)} | '
                   f'{_cell(s, "hd95", 1)} |')
      if 'ceiling' in summary:
        c = summary['ceiling']
        lines.append(f'| ... its ceiling | {c["n"]} | {_cell(c, "dice", 100)} | '
                     f'{_cell(c, "sensitivity", 100)} | {_cell(c, "hd95", 1)} |')
  return '\n'.join(lines)


def log(message: str) -> None:
  print(f'heldout: {message}', file=sys.stderr, flush=True)


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  log('\n' + markdown(result))
  return tables.emit(result, args.out)


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  main()
