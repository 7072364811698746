"""Table 1 and Wilcoxon on small hand-made cohorts, checked against numpy/scipy directly."""
import csv

import numpy as np
import pytest
from scipy import stats as scipy_stats

from clfc_jax import stats
from data_prep.case import CaseError

PATIENTS = [f'P{i:02d}' for i in range(12)]


@pytest.fixture
def cohort():
  rng = np.random.default_rng(3)
  base = rng.uniform(0.80, 0.95, len(PATIENTS))
  per_patient = {}
  for method, shift in [('clfc', 0.02), ('baseline1', 0.0), ('baseline2', 0.01)]:
    dice = np.clip(base + shift + rng.normal(0, 0.01, len(PATIENTS)), 0, 1)
    per_patient[method] = {
        'patient': list(PATIENTS), 'fold': [i % 3 for i in range(len(PATIENTS))],
        'dice': dice, 'sensitivity': np.clip(dice + 0.01, 0, 1),
        'hd95': rng.uniform(2.0, 9.0, len(PATIENTS))}
  return per_patient


def test_table1_mean_and_std_in_paper_units(cohort):
  rows = {row['method']: row for row in stats.table1(cohort)}
  clfc = cohort['clfc']
  assert rows['clfc']['n'] == len(PATIENTS)
  assert rows['clfc']['dice_mean'] == pytest.approx(100 * np.mean(clfc['dice']))
  assert rows['clfc']['dice_std'] == pytest.approx(100 * np.std(clfc['dice'], ddof=1))
  assert rows['clfc']['sensitivity_mean'] == pytest.approx(100 * np.mean(clfc['sensitivity']))
  assert rows['clfc']['hd95_mean'] == pytest.approx(np.mean(clfc['hd95']))
  assert rows['clfc']['hd95_std'] == pytest.approx(np.std(clfc['hd95'], ddof=1))


def test_wilcoxon_matches_scipy_and_pairs_by_id(cohort):
  expected = {m: scipy_stats.wilcoxon(cohort['clfc']['dice'], cohort[m]['dice']).pvalue
              for m in ('baseline1', 'baseline2')}
  # Shuffle one method's patient order: pairing must follow the ids, not the positions.
  order = np.random.default_rng(0).permutation(len(PATIENTS))
  shuffled = dict(cohort)
  shuffled['baseline1'] = {k: [v[i] for i in order] for k, v in cohort['baseline1'].items()}
  p = stats.wilcoxon_vs(shuffled, reference='clfc', metric='dice')
  assert set(p) == {'baseline1', 'baseline2'}
  for method, value in expected.items():
    assert p[method] == pytest.approx(value, rel=1e-12)
  # Positional pairing would give a different answer, so the test can tell the two apart.
  assert scipy_stats.wilcoxon(cohort['clfc']['dice'],
                              shuffled['baseline1']['dice']).pvalue != pytest.approx(p['baseline1'])


def test_wilcoxon_identical_results_give_one(cohort):
  same = {'clfc': cohort['clfc'], 'copy': dict(cohort['clfc'])}
  assert stats.wilcoxon_vs(same) == {'copy': 1.0}


def test_wilcoxon_rejects_different_patients(cohort):
  cohort['baseline2'] = {k: list(v)[:-1] for k, v in cohort['baseline2'].items()}
  with pytest.raises(ValueError, match=r"only in 'clfc': \['P11'\]"):
    stats.wilcoxon_vs(cohort)
  with pytest.raises(ValueError, match='no results'):
    stats.wilcoxon_vs(cohort, reference='unet')


def test_write_table1_markdown_and_csv(tmp_path, cohort):
  cohort['clfc']['dice'] = np.array([0.9, 0.95] * 6)
  rows = stats.write_table1(tmp_path / 't.md', tmp_path / 't.csv', cohort)
  markdown = (tmp_path / 't.md').read_text().splitlines()
  assert markdown[0].startswith('| Method | n | Dice (%) | Sensitivity (%) | HD95 (mm) | p (dice')
  clfc_line = next(line for line in markdown if line.startswith('| CLFC (ours)'))
  std = 100 * np.std([0.9, 0.95] * 6, ddof=1)
  assert f'| 92.50 ± {std:.2f} |' in clfc_line and clfc_line.endswith('| — |')
  p_b1 = stats.wilcoxon_vs(cohort)['baseline1']
  assert any(line.startswith('| Baseline-1') and line.endswith(f'| {stats.format_p(p_b1)} |')
             for line in markdown)
  with open(tmp_path / 't.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['method'] for r in table] == ['clfc', 'baseline1', 'baseline2']
  assert float(table[1]['p']) == pytest.approx(p_b1)
  assert float(table[0]['dice_mean']) == pytest.approx(92.5) == rows[0]['dice_mean']


def test_format_p():
  assert stats.format_p(2.7976e-7) == '2.7976e-07'
  assert stats.format_p(0.0185) == '0.0185'


def test_per_patient_csv_round_trip(tmp_path, cohort):
  paths = []
  for method, results in cohort.items():
    for fold in range(3):
      records = [{'patient': p, 'dice': d, 'sensitivity': s, 'hd95': h, 'fold': f,
                  'method': method}
                 for p, d, s, h, f in zip(results['patient'], results['dice'],
                                          results['sensitivity'], results['hd95'],
                                          results['fold']) if f == fold]
      paths.append(tmp_path / method / f'fold{fold}' / 'per_patient.csv')
      stats.write_per_patient(paths[-1], records)
  read = stats.read_per_patient(paths)
  assert set(read) == set(cohort)
  for method in cohort:
    assert sorted(read[method]['patient']) == PATIENTS
  assert stats.wilcoxon_vs(read) == pytest.approx(stats.wilcoxon_vs(cohort), rel=1e-12)
  assert stats.table1(read)[0]['dice_mean'] == pytest.approx(stats.table1(cohort)[0]['dice_mean'])


def test_read_per_patient_names_the_fault(tmp_path):
  bad = tmp_path / 'bad.csv'
  bad.write_text('patient,dice,fold,method\nP1,0.9,0,clfc\n')
  with pytest.raises(CaseError, match=r"bad.csv: missing columns \['sensitivity', 'hd95'\]"):
    stats.read_per_patient([bad])
  bad.write_text('patient,dice,sensitivity,hd95,fold,method\nP1,0.9,x,3,0,clfc\n')
  with pytest.raises(CaseError, match=r"line 2: column 'sensitivity' is not a number"):
    stats.read_per_patient([bad])
  bad.write_text('patient,dice,sensitivity,hd95,fold,method\n'
                 'P1,0.9,0.9,3,0,clfc\nP1,0.8,0.9,3,1,clfc\n')
  with pytest.raises(CaseError, match='appears twice'):
    stats.read_per_patient([bad])
