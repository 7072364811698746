"""External (nnU-Net) native-space predictions scored against prepared cases' label files."""
import json

import nibabel as nib
import numpy as np
import pytest

from clfc_jax import external, metrics, stats
from configs import default
from data_prep.case import CaseError

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.0, 1.0, 2.5, 1.0])   # anisotropic: HD95 must use 2.5 mm along z.
SPACING = (1.0, 1.0, 2.5)


def _nifti(path, data, affine=AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
  return path


def _truth(seed):
  """BraTS 2021 labels: edema 2 around a core 1 holding enhancing 4."""
  rng = np.random.default_rng(seed)
  label = np.zeros(SHAPE, np.uint8)
  x, y, z = rng.integers(3, 6, 3)
  label[x - 3:x + 4, y - 3:y + 4, z - 2:z + 3] = 2
  label[x - 2:x + 2, y - 2:y + 2, z - 1:z + 2] = 1
  label[x - 1:x + 1, y - 1:y + 2, z:z + 2] = 4
  return label


def _as_nnunet(label):
  """BraTS 2021 -> nnU-Net's BraTS numbering (1 edema, 2 non-enhancing, 3 enhancing)."""
  return np.select([label == 2, label == 1, label == 4], [1, 2, 3], 0).astype(np.uint8)


def _cohort(tmp_path, ids=('P1', 'P2')):
  cases = tmp_path / 'prep' / 'cases'
  cases.mkdir(parents=True)
  truths = {}
  for i, cid in enumerate(ids):
    truths[cid] = _truth(i)
    label_file = _nifti(tmp_path / 'raw' / cid / f'{cid}_seg.nii.gz', truths[cid])
    (cases / f'{cid}.json').write_text(json.dumps({
        'case_id': cid, 'label_file': str(label_file), 'native_shape': list(SHAPE),
        'native_affine': AFFINE.tolist()}))
  return cases, truths


def _config(regions='wt_tc_et'):
  c = default.get_config()
  c.task.regions = regions
  return c


def test_scores_nnunet_folder_per_region_and_writes_csv(tmp_path):
  cases, truths = _cohort(tmp_path)
  preds = tmp_path / 'nnunet_val'
  pred_labels = {}
  for cid, truth in truths.items():
    pred = np.roll(truth, 1, axis=2)                # one slice off along z.
    pred[0, 0, 0] = 4                               # a speck of ET far away.
    pred_labels[cid] = pred
    name = f'{cid}.nii.gz' if cid == 'P1' else f'{cid}_seg.nii.gz'   # both namings found.
    _nifti(preds / name, _as_nnunet(pred))
  rows = external.score_folder(preds, cases, ['P2', 'P1'], _config(), method='nnunet', fold=3,
                               pred_convention='msd')
  assert list(rows) == ['wt', 'tc', 'et']
  values = {'wt': (1, 2, 4), 'tc': (1, 4), 'et': (4,)}
  for region, region_rows in rows.items():
    assert [r['patient'] for r in region_rows] == ['P1', 'P2']
    for row in region_rows:
      p = np.isin(pred_labels[row['patient']], values[region])
      t = np.isin(truths[row['patient']], values[region])
      assert row['fold'] == 3 and row['method'] == 'nnunet'
      assert row['dice'] == pytest.approx(metrics.dice(p, t))
      assert row['sensitivity'] == pytest.approx(metrics.sensitivity(p, t))
      assert row['hd95'] == pytest.approx(metrics.hd95(p, t, SPACING))
      assert row['hd95'] != pytest.approx(metrics.hd95(p, t, 1.0))   # spacing matters here.
  assert 0 < rows['et'][0]['dice'] < 1
  paths = external.write_folder_scores(tmp_path / 'eval', rows)
  assert [p.name for p in paths] == ['per_patient.csv', 'per_patient_tc.csv',
                                     'per_patient_et.csv']
  back = stats.read_per_patient([paths[0]])['nnunet']
  assert back['patient'] == ['P1', 'P2'] and back['fold'] == [3, 3]
  np.testing.assert_allclose(back['dice'], [r['dice'] for r in rows['wt']])
  np.testing.assert_allclose(back['hd95'], [r['hd95'] for r in rows['wt']])


def test_whole_tumour_default_and_lesion_columns(tmp_path):
  cases, truths = _cohort(tmp_path, ids=('P1',))
  # A WT-only prediction written as 1 (config.eval.wt_label) is whole tumour in BraTS 2021.
  _nifti(tmp_path / 'p' / 'P1_seg.nii.gz', (truths['P1'] > 0).astype(np.uint8))
  c = _config('wt')
  c.task.lesion.min_volume_mm3 = 0.0
  rows = external.score_folder(tmp_path / 'p', cases, ['P1'], c, method='ext', fold=0,
                               lesion=True)
  (row,) = rows['wt']
  assert list(rows) == ['wt']
  assert (row['dice'], row['hd95'], row['lesion_dice'], row['lesion_hd95']) == (1, 0, 1, 0)


def test_missing_and_misshaped_predictions_name_the_file(tmp_path):
  cases, truths = _cohort(tmp_path)
  preds = tmp_path / 'p'
  _nifti(preds / 'P1.nii.gz', truths['P1'])
  with pytest.raises(CaseError, match=r"no prediction for patient 'P2'.*P2_seg.nii.gz") as e:
    external.score_folder(preds, cases, ['P1', 'P2'], _config(), method='m', fold=0)
  assert e.value.path.endswith('P2.nii.gz')
  _nifti(preds / 'P2.nii.gz', truths['P2'][:, :, :-1])
  with pytest.raises(CaseError, match=r'prediction has shape \(12, 10, 7\).*\(12, 10, 8\)') as e:
    external.score_folder(preds, cases, ['P1', 'P2'], _config(), method='m', fold=0)
  assert e.value.path.endswith('P2.nii.gz')
  flipped = AFFINE.copy()
  flipped[0, 0] = -1.0
  _nifti(preds / 'P2.nii.gz', truths['P2'], affine=flipped)
  with pytest.raises(CaseError, match='not on the native grid') as e:
    external.score_folder(preds, cases, ['P2'], _config(), method='m', fold=0)
  assert e.value.path.endswith('P2.nii.gz')
  # A prediction in another label convention than declared.
  _nifti(preds / 'P2.nii.gz', truths['P2'])          # holds 4, not an 'msd' label.
  with pytest.raises(CaseError, match=r"prediction: label values \[4\].*'msd'") as e:
    external.score_folder(preds, cases, ['P2'], _config(), method='m', fold=0,
                          pred_convention='msd')
  assert e.value.path.endswith('P2.nii.gz')
  (preds / 'P2.nii.gz').write_bytes(b'not a nifti')
  with pytest.raises(CaseError, match='cannot read the prediction'):
    external.score_folder(preds, cases, ['P2'], _config(), method='m', fold=0)
  with pytest.raises(CaseError, match='no readable prepared case'):
    external.score_folder(preds, cases, ['P9'], _config(), method='m', fold=0)
