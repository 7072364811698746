"""Table 1 (mean ± std per method and metric) and the patient-wise Wilcoxon test (SPEC §8).

Per-patient results travel as `per_patient[method] = {'patient': [ids], 'dice': [...],
'sensitivity': [...], 'hd95': [...], 'fold': [...]}` (one entry per test patient, folds
concatenated); Dice and sensitivity are fractions in [0, 1], HD95 is in mm. The per-patient CSV
(`per_patient.csv`, one per method and fold) has the columns of `PER_PATIENT_COLUMNS`.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from data_prep.case import CaseError

METRICS = ('dice', 'sensitivity', 'hd95')
PER_PATIENT_COLUMNS = ('patient', 'dice', 'sensitivity', 'hd95', 'fold', 'method')
# BraTS 2023 lesion-wise metrics (metrics.lesion_wise): optional columns of a per-patient CSV,
# written when every record has them (task.regions 'wt_tc_et') and read when the file has them.
LESION_METRICS = ('lesion_dice', 'lesion_hd95')
# Table 1 shows Dice and sensitivity in %, HD95 in mm.
METRIC_SCALE = {'dice': 100.0, 'sensitivity': 100.0, 'hd95': 1.0, 'lesion_dice': 100.0,
                'lesion_hd95': 1.0}
METRIC_HEADER = {'dice': 'Dice (%)', 'sensitivity': 'Sensitivity (%)', 'hd95': 'HD95 (mm)',
                 'lesion_dice': 'Lesion Dice (%)', 'lesion_hd95': 'Lesion HD95 (mm)'}
METHOD_NAMES = {'clfc': 'CLFC (ours)', 'baseline1': 'Baseline-1', 'baseline2': 'Baseline-2',
                'unet': 'U-Net', 'nnunet': 'nnU-Net'}


def table1(per_patient: Mapping[str, Mapping[str, Sequence]], metrics=METRICS, ddof=1) -> list:
  """One row per method: {'method', 'n', '<metric>_mean', '<metric>_std'} in Table 1 units.

  `ddof=1`: the sample standard deviation over patients (the paper does not say which).
  """
  rows = []
  for method, results in per_patient.items():
    row = {'method': method, 'n': len(results['patient'])}
    for metric in metrics:
      values = np.asarray(results[metric], np.float64) * METRIC_SCALE[metric]
      row[f'{metric}_mean'] = float(values.mean())
      row[f'{metric}_std'] = float(values.std(ddof=ddof)) if len(values) > ddof else 0.0
    rows.append(row)
  return rows


def _by_patient(per_patient, method, metric) -> dict:
  if method not in per_patient:
    raise ValueError(f'no results for method {method!r}; have {sorted(per_patient)}')
  ids = [str(p) for p in per_patient[method]['patient']]
  values = per_patient[method][metric]
  if len(set(ids)) != len(ids):
    raise ValueError(f'method {method!r} lists a patient more than once')
  return dict(zip(ids, (float(v) for v in values)))


def paired(per_patient, method_a: str, method_b: str, metric: str = 'dice'):
  """The two methods' values for the same patients, in one order (sorted ids)."""
  a = _by_patient(per_patient, method_a, metric)
  b = _by_patient(per_patient, method_b, metric)
  if a.keys() != b.keys():
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    raise ValueError(
        f'{method_a!r} and {method_b!r} were scored on different patients: only in '
        f'{method_a!r}: {only_a[:5]}{"..." if len(only_a) > 5 else ""}; only in {method_b!r}: '
        f'{only_b[:5]}{"..." if len(only_b) > 5 else ""}')
  ids = sorted(a)
  return np.array([a[i] for i in ids]), np.array([b[i] for i in ids])


def wilcoxon_vs(per_patient, reference: str = 'clfc', metric: str = 'dice') -> dict:
  """{method: two-sided p} of scipy's paired Wilcoxon signed-rank test against `reference`.

  Patients are paired by id, whatever their order. Identical results for every patient give
  p = 1 (no evidence of a difference; scipy would warn and depends on its version there).
  """
  p_values = {}
  for method in per_patient:
    if method == reference:
      continue
    ref, other = paired(per_patient, reference, method, metric)
    if np.all(ref == other):
      p_values[method] = 1.0
    else:
      p_values[method] = float(scipy_stats.wilcoxon(ref, other).pvalue)
  return p_values


def format_p(p: float) -> str:
  """Four significant digits, scientific below 1e-3 (the paper writes 2.7976 × 10^-7)."""
  if math.isnan(p):
    return 'n/a'
  return f'{p:.4e}' if p < 1e-3 else f'{p:.4f}'


def mean_std_cells(row, metrics=METRICS) -> list:
  """A table1() row's `mean ± std` cells (Table 1 units, two decimals), one per metric."""
  return [f'{row[f"{m}_mean"]:.2f} ± {row[f"{m}_std"]:.2f}' for m in metrics]


def write_table1(path_md, path_csv, per_patient, reference: str = 'clfc',
                 test_metric: str = 'dice', metrics=METRICS) -> list:
  """Writes Table 1 as Markdown (`91.86 ± 4.63`) and CSV (full precision); returns the rows."""
  rows = table1(per_patient, metrics)
  p_values = wilcoxon_vs(per_patient, reference, test_metric) if reference in per_patient else {}
  p_header = f'p ({test_metric} vs {METHOD_NAMES.get(reference, reference)})'
  for row in rows:
    row['p'] = p_values.get(row['method'], math.nan)

  lines = ['| Method | n | ' + ' | '.join(METRIC_HEADER[m] for m in metrics) + f' | {p_header} |',
           '|' + '---|' * (len(metrics) + 3)]
  for row in rows:
    cells = mean_std_cells(row, metrics)
    p = '—' if row['method'] == reference else format_p(row['p'])
    lines.append(f'| {METHOD_NAMES.get(row["method"], row["method"])} | {row["n"]} | '
                 + ' | '.join(cells) + f' | {p} |')
  Path(path_md).parent.mkdir(parents=True, exist_ok=True)
  Path(path_md).write_text('\n'.join(lines) + '\n')

  fields = ['method', 'n'] + [f'{m}_{s}' for m in metrics for s in ('mean', 'std')] + ['p']
  Path(path_csv).parent.mkdir(parents=True, exist_ok=True)
  with open(path_csv, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return rows


def write_per_patient(path, records: Iterable[Mapping]) -> None:
  """Writes one method/fold's per-patient metrics (dicts with PER_PATIENT_COLUMNS, plus
  LESION_METRICS when every record has them)."""
  records = list(records)
  columns = PER_PATIENT_COLUMNS
  if records and all(all(m in r for m in LESION_METRICS) for r in records):
    columns = PER_PATIENT_COLUMNS + LESION_METRICS
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(records)


def read_per_patient(paths: Iterable) -> dict:
  """Reads per-patient CSVs (any number of methods and folds) into the `per_patient` layout."""
  per_patient = {}
  for path in paths:
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      missing = [c for c in PER_PATIENT_COLUMNS if c not in (reader.fieldnames or ())]
      if missing:
        raise CaseError(path, f'missing columns {missing}; expected {list(PER_PATIENT_COLUMNS)}')
      extra = tuple(m for m in LESION_METRICS if m in reader.fieldnames)
      for line, record in enumerate(reader, start=2):
        results = per_patient.setdefault(
            record['method'], {'patient': [], 'fold': [], **{m: [] for m in METRICS + extra}})
        if record['patient'] in results['patient']:
          raise CaseError(path, f'line {line}: patient {record["patient"]!r} appears twice for '
                          f'method {record["method"]!r}')
        if any(m not in results for m in extra) or (
            results['patient'] and any(m in results for m in LESION_METRICS if m not in extra)):
          raise CaseError(path, f'lesion-wise columns {list(extra)} differ from the other '
                          f'files of method {record["method"]!r}')
        results['patient'].append(record['patient'])
        for column in METRICS + extra + ('fold',):
          try:
            value = float(record[column])
          except (TypeError, ValueError):
            raise CaseError(path, f'line {line}: column {column!r} is not a number: '
                            f'{record[column]!r}') from None
          results[column].append(int(value) if column == 'fold' else value)
  return per_patient
