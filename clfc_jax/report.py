"""The report (SPEC §8): Table 1 with Wilcoxon p-values, per-fold means, an index page.

Reads WORKDIR/eval/<method>/fold<k>/per_patient.csv for every method and fold, writes
WORKDIR/report/table1.{md,csv} (stats.write_table1) and WORKDIR/report/index.md. The index is a
list of sections, each a function `(context) -> markdown`; figures (a later issue) become more
sections that also save files under WORKDIR/report/figures/.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

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


@dataclasses.dataclass
class ReportContext:
  """What every section may use."""
  config: object
  methods: Sequence[str]
  folds: Sequence[int]
  per_patient: dict          # stats' layout, methods in `methods` order
  report_dir: Path
  paths: dict                # name -> written file (sections add theirs)
  missing: Sequence[str]     # per-patient CSVs that were not there (allow_missing=True)


def per_patient_paths(workdir, methods, folds) -> dict:
  """{(method, fold): WORKDIR/eval/<method>/fold<k>/per_patient.csv}."""
  root = Path(workdir) / 'eval'
  return {(m, int(k)): root / m / f'fold{k}' / 'per_patient.csv' for m in methods for k in folds}


def load_results(workdir, methods, folds, *, allow_missing: bool = False):
  """(per_patient for the methods found, missing CSV paths); raises if any is missing.

  Each CSV must hold its own method and fold only (a copied file is caught here).
  """
  paths = per_patient_paths(workdir, methods, folds)
  missing = [str(p) for p in paths.values() if not p.exists()]
  if missing and not allow_missing:
    lacking = sorted({f'{m} fold {k}' for (m, k), p in paths.items() if not p.exists()})
    raise FileNotFoundError(
        f'no per-patient results for {", ".join(lacking)}; run the evaluate stage for them '
        f'(missing: {", ".join(missing)})')
  per_patient = {}
  for (method, fold), path in paths.items():
    if not path.exists():
      continue
    found = stats.read_per_patient([path])
    if set(found) - {method}:
      raise ValueError(f'{path}: holds results of {sorted(found)}, expected only {method!r}')
    results = found.get(method)
    if results is None:
      continue
    wrong = sorted({f for f in results['fold'] if f != fold})
    if wrong:
      raise ValueError(f'{path}: rows of folds {wrong}, expected only fold {fold}')
    merged = per_patient.setdefault(
        method, {'patient': [], 'fold': [], **{m: [] for m in stats.METRICS}})
    for key, values in results.items():
      merged[key].extend(values)
  if not per_patient:
    raise FileNotFoundError(f'no per-patient results at all under {Path(workdir) / "eval"}')
  return per_patient, missing


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


# --- sections of index.md ----------------------------------------------------------------------
def _name(method):
  return stats.METHOD_NAMES.get(method, method)


def _same_patients(per_patient) -> bool:
  sets = [frozenset(map(str, r['patient'])) for r in per_patient.values()]
  return all(s == sets[0] for s in sets)


def section_table1(ctx: ReportContext) -> str:
  if REFERENCE_METHOD not in ctx.per_patient:
    reference, note = None, f'No {_name(REFERENCE_METHOD)} results: no p-values.'
  elif not _same_patients(ctx.per_patient):   # only in partial reports (allow_missing)
    reference, note = None, 'Methods were scored on different patients: no p-values.'
  else:
    reference = REFERENCE_METHOD
    note = ('p: two-sided Wilcoxon signed-rank test of patient-wise Dice against '
            f'{_name(REFERENCE_METHOD)}.')
  # A reference that is not among the results makes write_table1 leave p out.
  stats.write_table1(ctx.paths['table1_md'], ctx.paths['table1_csv'], ctx.per_patient,
                     reference=reference or 'none')
  return ('## Table 1: whole tumor, native space\n\n'
          + Path(ctx.paths['table1_md']).read_text() + f'\nMean ± sample std over patients. {note}\n')


def section_fold_means(ctx: ReportContext) -> str:
  lines = ['## Per-fold means', '', '| Method | Fold | n | '
           + ' | '.join(stats.METRIC_HEADER[m] for m in stats.METRICS) + ' |',
           '|' + '---|' * (3 + len(stats.METRICS))]
  for row in fold_means(ctx.per_patient, ctx.folds):
    cells = ['—' if row['n'] == 0 else f'{row[m]:.2f}' for m in stats.METRICS]
    lines.append(f'| {_name(row["method"])} | {row["fold"]} | {row["n"]} | '
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def section_paper(ctx: ReportContext) -> str:
  del ctx
  lines = ['## For comparison: the paper (BraTS 2019, 5-fold)', '',
           '| Method | Dice (%) | Sensitivity (%) | HD95 (mm) |', '|---|---|---|---|']
  lines += [f'| {name} | {d:.2f} | {s:.2f} | {h:.2f} |' for name, (d, s, h) in
            PAPER_TABLE1.items()]
  return '\n'.join(lines) + '\n'


def section_missing(ctx: ReportContext) -> str:
  if not ctx.missing:
    return ''
  return ('## Missing results\n\nThis report is partial; no per-patient CSV at:\n\n'
          + '\n'.join(f'- `{p}`' for p in ctx.missing) + '\n')


SECTIONS: list[Callable[[ReportContext], str]] = [
    section_missing, section_table1, section_fold_means, section_paper]


def write_report(config, workdir, methods: Optional[Sequence[str]] = None,
                 folds: Optional[Sequence[int]] = None, *, allow_missing: bool = False) -> dict:
  """Writes WORKDIR/report/{table1.md, table1.csv, index.md}; returns {name: path}.

  `methods` / `folds` default to config.methods and every fold. Raises FileNotFoundError
  naming each missing method/fold unless `allow_missing` (then the index lists them).
  """
  methods = list(methods if methods is not None else config.methods)
  folds = [int(k) for k in (folds if folds is not None else range(config.data.num_folds))]
  per_patient, missing = load_results(workdir, methods, folds, allow_missing=allow_missing)
  report_dir = Path(workdir) / 'report'
  report_dir.mkdir(parents=True, exist_ok=True)
  ctx = ReportContext(config=config, methods=methods, folds=folds,
                      per_patient={m: per_patient[m] for m in methods if m in per_patient},
                      report_dir=report_dir, missing=missing,
                      paths={'table1_md': report_dir / 'table1.md',
                             'table1_csv': report_dir / 'table1.csv'})
  header = (f'# CLFC report: {config.dataset.name}\n\n'
            f'Methods: {", ".join(_name(m) for m in methods)}; test folds: '
            f'{", ".join(map(str, folds))} of {config.data.num_folds}; whole tumor scored in '
            'each patient\'s native space.\n')
  body = [header] + [text for text in (section(ctx) for section in SECTIONS) if text]
  index = report_dir / 'index.md'
  index.write_text('\n'.join(body))
  paths = {k: Path(v) for k, v in ctx.paths.items() if isinstance(v, (str, Path))}
  paths['index'] = index
  return paths
