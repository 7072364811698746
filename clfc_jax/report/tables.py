"""Table 1 and its companions as markdown: patient-wise mean ± std per method with Wilcoxon
p-values against CLFC (clfc_jax.stats), per-fold means, and the paper's numbers beside ours."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from clfc_jax import stats

REFERENCE_METHOD = 'clfc'
# The paper's Table 1 (BraTS 2019, 5-fold, WT; Dice and sensitivity in %, HD95 in mm).
PAPER_TABLE1 = {
    'nnU-Net': (90.53, 89.51, 8.05),
    'Baseline-1': (90.54, 90.00, 4.63),
    'Baseline-2': (91.18, 90.79, 4.23),
    'CLFC (ours)': (91.86, 91.90, 3.84),
}


def method_name(method):
  return stats.METHOD_NAMES.get(method, method)


def _same_patients(per_patient) -> bool:
  sets = [frozenset(map(str, r['patient'])) for r in per_patient.values()]
  return all(s == sets[0] for s in sets)


def fold_means(per_patient, folds, metrics=stats.METRICS) -> list:
  """Rows {'method', 'fold', 'n', <metric>: mean in Table 1 units} per method and fold."""
  rows = []
  for method, results in per_patient.items():
    fold_of = np.asarray(results['fold'])
    for k in folds:
      sel = fold_of == int(k)
      row = {'method': method, 'fold': int(k), 'n': int(sel.sum())}
      for m in metrics:
        values = np.asarray(results[m], np.float64)[sel] * stats.METRIC_SCALE[m]
        row[m] = float(values.mean()) if sel.any() else float('nan')
      rows.append(row)
  return rows


REGION_TITLES = {'wt': 'whole tumor', 'tc': 'tumor core', 'et': 'enhancing tumor'}


def lesion_columns(per_patient) -> tuple:
  """stats.LESION_METRICS when every method has them (region runs), else ()."""
  has = [all(m in r for m in stats.LESION_METRICS) for r in per_patient.values()]
  return stats.LESION_METRICS if has and all(has) else ()


def table1(per_patient, path_md, path_csv, region: str = '') -> str:
  """Writes table1.md / table1.csv and returns the markdown section with its note.

  `region` ('wt', 'tc', 'et'; '' = the paper's WT-only table) titles a block of a region run,
  which also gets the lesion-wise columns when every method has them.
  """
  if REFERENCE_METHOD not in per_patient:
    reference, note = None, f'No {method_name(REFERENCE_METHOD)} results: no p-values.'
  elif not _same_patients(per_patient):   # only in partial reports (allow_missing)
    reference, note = None, 'Methods were scored on different patients: no p-values.'
  else:
    reference = REFERENCE_METHOD
    note = ('p: two-sided Wilcoxon signed-rank test of patient-wise Dice against '
            f'{method_name(REFERENCE_METHOD)}.')
  # A reference that is not among the results makes write_table1 leave p out.
  metrics = stats.METRICS + lesion_columns(per_patient)
  stats.write_table1(path_md, path_csv, per_patient, reference=reference or 'none',
                     metrics=metrics)
  title = ('Table 1: whole tumor' if not region else
           f'Table 1, {region.upper()}: {REGION_TITLES.get(region, region)}')
  lesion_note = (' Lesion-wise: BraTS 2023 lesion-wise Dice and HD95 (missed or false-positive '
                 'lesions score 0 and 374 mm).' if len(metrics) > len(stats.METRICS) else '')
  return (f'## {title}, native space\n\n' + Path(path_md).read_text()
          + f'\nMean ± sample std over patients. {note}{lesion_note}\n')


def volume_strata(volumes: Mapping[str, float], edges_ml: Sequence[float]) -> list:
  """[(label, {patients})] of the whole-tumour volume bins cut at `edges_ml` (ml), ascending;
  a patient exactly on an edge goes to the bin above it."""
  edges = sorted({float(e) for e in edges_ml})
  if any(not math.isfinite(e) or e <= 0 for e in edges):
    raise ValueError(f'report.volume_strata_ml must be positive volumes in ml, got {edges_ml}')
  bounds = [0.0, *edges, math.inf]
  strata = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    label = (f'< {hi:g} ml' if lo == 0.0 else f'>= {lo:g} ml' if math.isinf(hi) else
             f'{lo:g}-{hi:g} ml')
    strata.append((label, {p for p, v in volumes.items() if lo <= v < hi}))
  return strata


def _restrict(per_patient, patients) -> dict:
  """per_patient with only the rows of `patients`."""
  out = {}
  for method, results in per_patient.items():
    keep = [i for i, p in enumerate(results['patient']) if str(p) in patients]
    out[method] = {k: [v[i] for i in keep] for k, v in results.items()}
  return out


def volume_table(per_patient, volumes: Mapping[str, float], edges_ml: Sequence[float],
                 left_out: Sequence[str] = ()) -> str:
  """Table 1 split by each patient's whole-tumour volume (its native label), with the
  Wilcoxon p of Dice against CLFC within each bin.

  Why: a mean over patients hides where a method wins; small tumours are where a scan from
  elsewhere is missed first, and where a comparison with the normal appearance should help.
  """
  reference = REFERENCE_METHOD if (REFERENCE_METHOD in per_patient
                                   and _same_patients(per_patient)) else None
  lines = ['## Table 1 by tumour volume', '',
           '| Whole-tumour volume | Method | n | '
           + ' | '.join(stats.METRIC_HEADER[m] for m in stats.METRICS)
           + f' | p (Dice vs {method_name(REFERENCE_METHOD)}) |',
           '|' + '---|' * (4 + len(stats.METRICS))]
  for label, patients in volume_strata(volumes, edges_ml):
    sub = _restrict(per_patient, patients)
    if not any(r['patient'] for r in sub.values()):
      continue
    p_values = stats.wilcoxon_vs(sub, reference) if reference else {}
    for row in stats.table1(sub):
      if row['n'] == 0:
        continue
      cells = stats.mean_std_cells(row)
      p = ('—' if row['method'] == reference or row['method'] not in p_values
           else stats.format_p(p_values[row['method']]))
      lines.append(f'| {label} | {method_name(row["method"])} | {row["n"]} | '
                   + ' | '.join(cells) + f' | {p} |')
  lines += ['', 'Volume: the whole tumour of each test patient\'s native label file (ml). p: '
            'two-sided Wilcoxon signed-rank test of patient-wise Dice within the bin.']
  if left_out:
    lines.append(f'Left out (no prepared case or label file): {", ".join(sorted(left_out))}.')
  return '\n'.join(lines) + '\n'


def fold_means_table(per_patient, folds) -> str:
  lines = ['## Per-fold means', '', '| Method | Fold | n | '
           + ' | '.join(stats.METRIC_HEADER[m] for m in stats.METRICS) + ' |',
           '|' + '---|' * (3 + len(stats.METRICS))]
  for row in fold_means(per_patient, folds):
    cells = ['—' if row['n'] == 0 else f'{row[m]:.2f}' for m in stats.METRICS]
    lines.append(f'| {method_name(row["method"])} | {row["fold"]} | {row["n"]} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def paper_table() -> str:
  lines = ['## For comparison: the paper (BraTS 2019, 5-fold)', '',
           '| Method | Dice (%) | Sensitivity (%) | HD95 (mm) |', '|---|---|---|---|']
  lines += [f'| {name} | {d:.2f} | {s:.2f} | {h:.2f} |' for name, (d, s, h) in
            PAPER_TABLE1.items()]
  return '\n'.join(lines) + '\n'
