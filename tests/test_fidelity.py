"""Pseudo-normal fidelity: MAE / SSIM per region, the summary and the verdict."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from clfc_jax import fidelity


def _phantom(seed=0, shape=(6, 40, 36)):
  """A [-1, 1] 'T1' with structure at several scales, a brain ellipse and a tumour blob."""
  rng = np.random.default_rng(seed)
  z, y, x = np.indices(shape)
  brain = ((y - shape[1] / 2) / 17) ** 2 + ((x - shape[2] / 2) / 15) ** 2 < 1
  texture = ndi.gaussian_filter(rng.standard_normal(shape), (0, 1.0, 1.0))
  t1 = np.where(brain, np.clip(0.3 + 2.0 * texture, -0.9, 0.9), -1.0).astype(np.float32)
  label = np.zeros(shape, np.uint8)
  label[:, 14:22, 12:20] = 2
  label[~brain] = 0
  return t1, brain, label


def test_identical_volumes_score_perfectly():
  t1, brain, label = _phantom()
  row = fidelity.case_fidelity(t1, t1, t1, brain, label)
  for r in fidelity.REGIONS:
    for s in fidelity.SOURCES:
      assert row[f'mae_{r}_{s}'] == 0.0
      assert row[f'ssim_{r}_{s}'] == pytest.approx(1.0, abs=1e-9)
  assert row['tumor_voxels'] == int((label > 0).sum()) > 0
  assert row['healthy_voxels'] == int(brain.sum()) - row['tumor_voxels']


def test_blurred_copy_scores_worse_than_a_sharp_one():
  t1, brain, label = _phantom()
  blurred = np.where(brain, ndi.gaussian_filter(t1, (0, 2.0, 2.0)), -1.0)
  noisy = np.where(brain, t1 + 0.02 * np.random.default_rng(1).standard_normal(t1.shape), -1.0)
  sharp = fidelity.case_fidelity(noisy, t1, t1, brain, label)
  blur = fidelity.case_fidelity(blurred, t1, t1, brain, label)
  assert blur['mae_healthy_pseudo'] > 2 * sharp['mae_healthy_pseudo']
  assert blur['ssim_healthy_pseudo'] < sharp['ssim_healthy_pseudo'] - 0.2
  assert sharp['ssim_healthy_pseudo'] < 1.0


def test_regions_are_respected():
  """An error only inside the tumour shows up only there; MAE equals the hand value."""
  t1, brain, label = _phantom()
  tumor = label > 0
  pseudo = np.where(tumor, t1 + 0.5, t1)
  tumor_input = np.where(tumor, -0.8, t1)
  row = fidelity.case_fidelity(pseudo, tumor_input, t1, brain, label)
  assert row['mae_healthy_pseudo'] == 0.0 and row['mae_healthy_input'] == 0.0
  assert row['mae_tumor_pseudo'] == pytest.approx(0.5, abs=1e-6)
  assert row['mae_tumor_input'] == pytest.approx(np.mean(np.abs(-0.8 - t1[tumor])), rel=1e-5)
  assert row['ssim_tumor_pseudo'] < 1.0
  # Voxels outside the brain never count, however wrong they are.
  outside = np.where(brain, t1, 1.0)
  assert fidelity.case_fidelity(outside, t1, t1, brain, label)['mae_healthy_pseudo'] == 0.0
  # No tumour: its fields are None, the healthy ones are still scored.
  empty = fidelity.case_fidelity(t1, t1, t1, brain, np.zeros_like(label))
  assert empty['mae_tumor_pseudo'] is None and empty['ssim_tumor_input'] is None
  assert empty['mae_healthy_pseudo'] == 0.0


def test_shape_mismatch_is_a_clear_error():
  t1, brain, label = _phantom()
  with pytest.raises(ValueError, match='different shapes'):
    fidelity.case_fidelity(t1[:-1], t1, t1, brain, label)


def _row(healthy, tumor_pseudo, tumor_input):
  row = {f: 0.9 for f in fidelity.FIELDS}
  row.update(mae_healthy_pseudo=healthy, mae_tumor_pseudo=tumor_pseudo,
             mae_tumor_input=tumor_input)
  return row


def test_summary_and_verdict():
  rows = [_row(0.05, 0.1, 0.3), _row(0.07, 0.2, 0.3)]
  summary = fidelity.summarize(rows)
  assert summary['n'] == 2 and summary['tumor_closer'] == 2
  assert summary['mean']['mae_healthy_pseudo'] == pytest.approx(0.06)
  assert summary['tumor_reduction'] == pytest.approx(0.5)
  line = fidelity.verdict(summary, noise_floor=0.04, healthy_factor=2.0, tumor_reduction=0.3)
  assert line.startswith('PASS') and '2/2' in line
  # Healthy MAE above 2x the floor fails, and so does one case where the input is closer.
  assert fidelity.verdict(summary, noise_floor=0.02, healthy_factor=2.0,
                          tumor_reduction=0.3).startswith('FAIL')
  worse = fidelity.summarize(rows + [_row(0.05, 0.4, 0.35)])
  assert worse['tumor_closer'] == 2 and worse['cases_with_tumor'] == 3
  assert fidelity.verdict(worse, noise_floor=0.04, healthy_factor=2.0,
                          tumor_reduction=0.3).startswith('FAIL')
