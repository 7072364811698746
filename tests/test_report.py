"""Table 1 and the index page from hand-made per-patient CSVs."""
import csv

import numpy as np
import pytest
from scipy import stats as scipy_stats

from clfc_jax import report, stats
from configs import demo

METHODS = ('clfc', 'baseline1', 'baseline2')
FOLDS = (0, 1)


def _results(seed=0, n_per_fold=6):
  """{method: {fold: [(patient, dice, sens, hd95)]}}; clfc a little better than the others."""
  rng = np.random.default_rng(seed)
  out = {}
  for mi, method in enumerate(METHODS):
    out[method] = {}
    for k in FOLDS:
      rows = []
      for j in range(n_per_fold):
        base = 0.8 + 0.01 * j + 0.02 * k
        dice = base - 0.03 * mi + rng.uniform(-0.01, 0.01)
        rows.append((f'P{k}{j:02d}', dice, dice + 0.02, 3.0 + 2 * mi + rng.uniform(0, 1)))
      out[method][k] = rows
  return out


def _write(workdir, results):
  for method, by_fold in results.items():
    for k, rows in by_fold.items():
      stats.write_per_patient(
          workdir / 'eval' / method / f'fold{k}' / 'per_patient.csv',
          [{'patient': p, 'dice': d, 'sensitivity': s, 'hd95': h, 'fold': k, 'method': method}
           for p, d, s, h in rows])


def _config():
  c = demo.get_config()
  c.methods = METHODS
  c.data.num_folds = len(FOLDS)
  return c


def test_table1_means_stds_and_wilcoxon(tmp_path):
  results = _results()
  _write(tmp_path, results)
  paths = report.write_report(_config(), tmp_path)
  assert paths['table1_md'] == tmp_path / 'report' / 'table1.md'
  with open(paths['table1_csv'], newline='') as f:
    table = {r['method']: r for r in csv.DictReader(f)}
  assert list(table) == list(METHODS)
  dice = {m: {p: d for k in FOLDS for p, d, _, _ in results[m][k]} for m in METHODS}
  for m in METHODS:
    values = np.array([dice[m][p] for p in sorted(dice[m])]) * 100
    hd = np.array([h for k in FOLDS for _, _, _, h in results[m][k]])
    assert int(table[m]['n']) == 12
    assert float(table[m]['dice_mean']) == pytest.approx(values.mean())
    assert float(table[m]['dice_std']) == pytest.approx(values.std(ddof=1))
    assert float(table[m]['hd95_mean']) == pytest.approx(hd.mean())
  for m in ('baseline1', 'baseline2'):
    ids = sorted(dice['clfc'])
    expected = scipy_stats.wilcoxon([dice['clfc'][i] for i in ids],
                                    [dice[m][i] for i in ids]).pvalue
    assert float(table[m]['p']) == pytest.approx(expected)
    assert expected < 0.01   # clfc is better for every patient
  index = paths['index'].read_text()
  assert paths['table1_md'].read_text() in index
  assert 'Per-fold means' in index and 'Missing' not in index
  # Per-fold means: fold 1 of baseline2 by hand.
  fold1 = np.mean([d for _, d, _, _ in results['baseline2'][1]]) * 100
  assert f'| Baseline-2 | 1 | 6 | {fold1:.2f} |' in index


def test_missing_method_or_fold_is_named(tmp_path):
  results = _results()
  del results['baseline2']
  results['baseline1'].pop(1)
  _write(tmp_path, results)
  with pytest.raises(FileNotFoundError) as e:
    report.write_report(_config(), tmp_path)
  message = str(e.value)
  assert 'baseline2 fold 0' in message and 'baseline2 fold 1' in message
  assert 'baseline1 fold 1' in message and 'clfc' not in message.split('(missing')[0]
  # A partial report on request: lists what is missing, no p-value on unequal patient sets.
  paths = report.write_report(_config(), tmp_path, allow_missing=True)
  index = paths['index'].read_text()
  assert 'Missing results' in index and 'baseline2/fold1/per_patient.csv' in index
  assert 'different patients' in index


def test_a_csv_in_the_wrong_place_is_refused(tmp_path):
  results = _results()
  _write(tmp_path, results)
  src = tmp_path / 'eval' / 'clfc' / 'fold0' / 'per_patient.csv'
  (tmp_path / 'eval' / 'clfc' / 'fold1' / 'per_patient.csv').write_text(src.read_text())
  with pytest.raises(ValueError, match='expected only fold 1'):
    report.write_report(_config(), tmp_path)
