"""Metrics against a brute-force reference (every pairwise surface distance), hand cases, medpy."""
import time

import numpy as np
import pytest

from clfc_jax import metrics


def brute_surface(mask):
  """Face-neighbour boundary written out by hand: pad with background, look along each axis."""
  padded = np.pad(mask, 1)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  boundary = np.zeros_like(mask)
  for axis in range(mask.ndim):
    for step in (-1, 1):
      boundary |= ~np.roll(padded, step, axis=axis)[inner]
  return mask & boundary


def brute_directed(a, b, spacing):
  pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
  pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
  return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def brute_hd95(a, b, spacing):
  return max(np.percentile(brute_directed(a, b, spacing), 95),
             np.percentile(brute_directed(b, a, spacing), 95))


def random_mask(rng, shape):
  """Noise, boxes or both, so that surfaces range from speckle to solid blobs."""
  kind = rng.integers(3)
  mask = np.zeros(shape, bool)
  if kind in (0, 2):
    mask |= rng.random(shape) < rng.uniform(0.05, 0.5)
  if kind in (1, 2):
    for _ in range(rng.integers(1, 4)):
      lo = [rng.integers(0, s) for s in shape]
      hi = [rng.integers(l + 1, s + 1) for l, s in zip(lo, shape)]
      mask[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
  if not mask.any():
    mask[tuple(rng.integers(0, s) for s in shape)] = True
  return mask


@pytest.mark.parametrize('shape', [(13, 17), (7, 9, 11)])
def test_hd95_matches_brute_force(shape):
  rng = np.random.default_rng(len(shape))
  for _ in range(40):
    a, b = random_mask(rng, shape), random_mask(rng, shape)
    spacing = rng.uniform(0.3, 3.0, size=len(shape))
    np.testing.assert_allclose(metrics.hd95(a, b, spacing), brute_hd95(a, b, spacing),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sort(metrics.directed_surface_distances(a, b, spacing)),
                               np.sort(brute_directed(a, b, spacing)), rtol=0, atol=1e-6)
    assert metrics.dice(a, b) == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert metrics.sensitivity(a, b) == pytest.approx((a & b).sum() / b.sum())


def test_surface_treats_outside_as_background():
  full = np.ones((4, 5, 6), bool)
  shell = metrics.surface(full)
  assert shell.sum() == full.size - 2 * 3 * 4
  np.testing.assert_array_equal(shell, brute_surface(full))


def test_single_voxels_anisotropic():
  a = np.zeros((6, 7, 3), bool)
  b = np.zeros_like(a)
  a[0, 0, 0] = True
  b[3, 4, 2] = True
  spacing = (2.0, 1.0, 3.0)
  expected = np.sqrt(6.0**2 + 4.0**2 + 6.0**2)
  assert metrics.hd95(a, b, spacing) == pytest.approx(expected)
  assert metrics.case_metrics(a, b, spacing) == pytest.approx(
      {'dice': 0.0, 'sensitivity': 0.0, 'hd95': expected})


def test_shifted_slabs():
  """Two full-width slabs 3 voxels apart along axis 0: every surface distance is 3 * s0."""
  a = np.zeros((8, 5, 4), bool)
  b = np.zeros_like(a)
  a[1] = True
  b[4] = True
  assert metrics.hd95(a, b, (1.5, 0.7, 2.0)) == pytest.approx(4.5)


def test_nested_squares_filling_the_array():
  """5x5 full array vs its centred 3x3: A's ring is 12 voxels at 1 and 4 corners at sqrt(2).

  P95 of [1]*12 + [sqrt2]*4 (linear interpolation at rank 14.25) is sqrt(2); B's ring is at 1.
  """
  a = np.ones((5, 5), bool)
  b = np.zeros_like(a)
  b[1:4, 1:4] = True
  assert metrics.hd95(a, b, (1.0, 1.0)) == pytest.approx(np.sqrt(2.0))
  assert metrics.dice(b, a) == pytest.approx(18 / 34)
  assert metrics.sensitivity(b, a) == pytest.approx(9 / 25)
  assert metrics.sensitivity(a, b) == pytest.approx(1.0)


def test_identical_masks():
  rng = np.random.default_rng(0)
  a = random_mask(rng, (9, 8, 7))
  assert metrics.case_metrics(a, a, (1.0, 2.0, 0.5)) == {
      'dice': 1.0, 'sensitivity': 1.0, 'hd95': 0.0}


def test_empty_mask_conventions():
  shape, spacing = (10, 20, 5), (1.0, 0.5, 3.0)
  empty = np.zeros(shape, bool)
  some = np.zeros(shape, bool)
  some[2:4, 3:9, 1] = True
  diagonal = np.sqrt(10.0**2 + 10.0**2 + 15.0**2)
  assert metrics.case_metrics(empty, empty, spacing) == {
      'dice': 1.0, 'sensitivity': 1.0, 'hd95': 0.0}
  assert metrics.case_metrics(empty, some, spacing) == pytest.approx(
      {'dice': 0.0, 'sensitivity': 0.0, 'hd95': diagonal})
  # Empty truth: nothing to miss, sensitivity 1; the false positives cost Dice and HD95.
  assert metrics.case_metrics(some, empty, spacing) == pytest.approx(
      {'dice': 0.0, 'sensitivity': 1.0, 'hd95': diagonal})


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='shape'):
    metrics.dice(np.zeros((3, 4)), np.zeros((4, 3)))
  with pytest.raises(ValueError, match='2-D or 3-D'):
    metrics.dice(np.zeros(5), np.zeros(5))
  with pytest.raises(ValueError, match='spacing'):
    metrics.hd95(np.ones((3, 3)), np.ones((3, 3)), (1.0, 0.0))
  with pytest.raises(ValueError, match='non-empty'):
    metrics.directed_surface_distances(np.ones((3, 3)), np.zeros((3, 3)), (1.0, 1.0))


def test_brats_sized_case_is_fast():
  shape, spacing = (240, 240, 155), (1.0, 1.0, 1.0)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]
  truth = sum((g - c) ** 2 / r**2 for g, c, r in zip(grid, (120, 110, 80), (30, 25, 20))) <= 1
  pred = sum((g - c) ** 2 / r**2 for g, c, r in zip(grid, (123, 110, 78), (28, 27, 20))) <= 1
  start = time.perf_counter()
  result = metrics.case_metrics(pred, truth, spacing)
  elapsed = time.perf_counter() - start
  assert 0.8 < result['dice'] < 1.0 and 0.0 < result['hd95'] < 10.0
  assert elapsed < 5.0, f'case_metrics took {elapsed:.2f} s on a 240x240x155 case'


def test_agrees_with_medpy():
  """medpy uses the same surfaces but pools both directions into one P95; compare like for like."""
  binary = pytest.importorskip('medpy.metric.binary')
  rng = np.random.default_rng(7)
  for shape in [(13, 17), (7, 9, 11)] * 10:
    a, b = random_mask(rng, shape), random_mask(rng, shape)
    spacing = rng.uniform(0.3, 3.0, size=len(shape))
    forward = metrics.directed_surface_distances(a, b, spacing)
    backward = metrics.directed_surface_distances(b, a, spacing)
    assert metrics.dice(a, b) == pytest.approx(binary.dc(a, b))
    assert np.percentile(np.hstack([forward, backward]), 95) == pytest.approx(
        binary.hd95(a, b, voxelspacing=spacing), abs=1e-6)
    assert max(forward.max(), backward.max()) == pytest.approx(
        binary.hd(a, b, voxelspacing=spacing), abs=1e-6)
