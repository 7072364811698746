"""BraTS 2023 lesion-wise Dice / HD95 against a set-based brute force and hand-made cases."""
import itertools

import numpy as np
import pytest

from clfc_jax import metrics
from configs import default

MISS = 374.0


# --- brute force: voxel sets, explicit neighbourhoods, all pairwise surface distances ---------
def _offsets(max_l1):
  """Non-zero offsets in {-1,0,1}^3 with at most `max_l1` non-zero steps (3: 26, 2: 18)."""
  return [o for o in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, o)) <= max_l1]


def _inside(v, shape):
  return all(0 <= x < n for x, n in zip(v, shape))


def _neighbours(v, offsets, shape):
  for o in offsets:
    w = tuple(a + b for a, b in zip(v, o))
    if _inside(w, shape):
      yield w


def _components(voxels, shape):
  """Connected components (26-neighbourhood) of a voxel set, by breadth-first search."""
  todo, out = set(voxels), []
  while todo:
    seed = todo.pop()
    comp, frontier = {seed}, [seed]
    while frontier:
      v = frontier.pop()
      for w in _neighbours(v, _offsets(3), shape):
        if w in todo:
          todo.remove(w)
          comp.add(w)
          frontier.append(w)
    out.append(comp)
  return out


def _dilate(voxels, times, shape):
  grown = set(voxels)
  for _ in range(times):
    grown |= {w for v in grown for w in _neighbours(v, _offsets(2), shape)}
  return grown


def _surface(voxels, shape):
  """Voxels with a face neighbour outside the set (or outside the array)."""
  faces = _offsets(1)
  return [v for v in voxels
          if any(tuple(a + b for a, b in zip(v, o)) not in voxels for o in faces)]


def _hd95(a, b, spacing, shape):
  sa = np.array(_surface(a, shape)) * spacing
  sb = np.array(_surface(b, shape)) * spacing
  d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
  return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def brute_lesion_wise(pred, truth, spacing, dilation, min_volume):
  shape = pred.shape
  truth_set = set(map(tuple, np.argwhere(truth)))
  pred_comps = _components(set(map(tuple, np.argwhere(pred))), shape)
  lesions = [c & truth_set for c in _components(_dilate(truth_set, dilation, shape), shape)]
  voxel = float(np.prod(spacing))
  matched_any, scores = set(), []
  for lesion in lesions:
    zone = _dilate(lesion, dilation, shape)
    hits = [i for i, c in enumerate(pred_comps) if c & zone]
    matched_any.update(hits)
    if len(lesion) * voxel <= min_volume:
      continue
    if not hits:
      scores.append((0.0, MISS))
      continue
    p = set().union(*(pred_comps[i] for i in hits))
    scores.append((2 * len(p & lesion) / (len(p) + len(lesion)),
                   _hd95(p, lesion, spacing, shape)))
  fp = len(pred_comps) - len(matched_any)
  n = len(scores) + fp
  if n == 0:
    return 1.0, 0.0, fp
  return (sum(s[0] for s in scores) / n, (sum(s[1] for s in scores) + MISS * fp) / n, fp)


def _blobs(rng, shape, count):
  """A few boxes (some touching or close, so dilation merges them) plus speckle."""
  mask = np.zeros(shape, bool)
  for _ in range(count):
    lo = [rng.integers(0, n - 1) for n in shape]
    hi = [min(l + rng.integers(1, 5), n) for l, n in zip(lo, shape)]
    mask[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
  mask |= rng.random(shape) < 0.004
  # Diagonal chains: voxels that touch only at edges or corners.
  for _ in range(rng.integers(0, 3)):
    v = np.array([rng.integers(0, n) for n in shape])
    step = rng.choice([-1, 1], size=3) * (rng.random(3) < 0.7)
    for _ in range(rng.integers(2, 5)):
      if all(0 <= x < n for x, n in zip(v, shape)):
        mask[tuple(v)] = True
      v = v + step
  return mask


def _lesion_wise(pred, truth, spacing, dilation, min_volume):
  return metrics.lesion_wise(pred, truth, spacing, dilation=dilation,
                             min_volume_mm3=min_volume, miss_hd95_mm=MISS)


def test_matches_brute_force_on_random_multi_lesion_masks():
  rng = np.random.default_rng(0)
  shape = (16, 14, 12)
  seen_fp = seen_ignored = seen_merge = 0
  for trial in range(30):
    truth = _blobs(rng, shape, rng.integers(0, 5))
    pred = truth.copy() if trial % 3 else np.zeros(shape, bool)
    pred ^= _blobs(rng, shape, rng.integers(0, 4))   # misses, extra lesions, shifted parts.
    spacing = rng.uniform(0.6, 2.0, 3)
    dilation = int(rng.integers(0, 3))
    min_volume = float(rng.choice([0.0, 4.0, 20.0]))
    got = _lesion_wise(pred, truth, spacing, dilation, min_volume)
    dice, hd, fp = brute_lesion_wise(pred, truth, spacing, dilation, min_volume)
    assert got['fp'] == fp
    assert got['lesion_dice'] == pytest.approx(dice, abs=1e-12)
    assert got['lesion_hd95'] == pytest.approx(hd, abs=1e-9)
    seen_fp += fp > 0
    seen_ignored += got['ignored'] > 0
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    seen_merge += ndimage.label(truth, np.ones((3,) * 3))[1] > got['gt_lesions'] + got['ignored']
  # The random cases exercise every rule.
  assert seen_fp and seen_ignored and seen_merge


def _box(shape, *slices):
  m = np.zeros(shape, bool)
  m[slices] = True
  return m


def test_hand_made_rules():
  shape = (30, 12, 12)
  # Two 4x4x4 GT lesions 4 voxels apart: one lesion with dilation 3 (gap <= 2*3), two with 1.
  a = _box(shape, slice(2, 6), slice(4, 8), slice(4, 8))
  b = _box(shape, slice(10, 14), slice(4, 8), slice(4, 8))
  truth = a | b
  pred = a.copy()    # finds a only.
  merged = _lesion_wise(pred, truth, 1.0, 3, 0.0)
  assert merged['gt_lesions'] == 1 and merged['tp'] == 1 and merged['fp'] == 0
  assert merged['lesion_dice'] == pytest.approx(2 * 64 / (64 + 128))
  split = _lesion_wise(pred, truth, 1.0, 1, 0.0)
  assert (split['gt_lesions'], split['tp'], split['fn']) == (2, 1, 1)
  assert split['lesion_dice'] == pytest.approx(0.5)
  assert split['lesion_hd95'] == pytest.approx(MISS / 2)
  # A far false positive: Dice 0 and HD95 374 for it.
  fp = _box(shape, slice(24, 27), slice(1, 3), slice(1, 3))
  with_fp = _lesion_wise(a | fp, a, 1.0, 3, 0.0)
  assert with_fp['fp'] == 1 and with_fp['lesion_dice'] == pytest.approx(0.5)
  assert with_fp['lesion_hd95'] == pytest.approx(MISS / 2)
  # A prediction touching only the dilated lesion (2 voxels away) is matched, not a FP.
  near = _box(shape, slice(8, 9), slice(4, 8), slice(4, 8))
  assert _lesion_wise(near, a, 1.0, 3, 0.0)['fp'] == 0
  assert _lesion_wise(near, a, 1.0, 1, 0.0)['fp'] == 1


def test_connectivity_26_and_dilation_18():
  shape = (10, 10, 10)
  # Two voxels touching at a corner are one lesion (26-connectivity).
  corner = np.zeros(shape, bool)
  corner[2, 2, 2] = corner[3, 3, 3] = True
  one = _lesion_wise(corner, corner, 1.0, 0, 0.0)
  assert (one['gt_lesions'], one['tp'], one['fp']) == (1, 1, 0)
  # Dilation uses the 18-neighbourhood: a voxel diagonal across a corner (offset 1,1,1) is not
  # reached by one dilation, one across an edge (offset 1,1,0) is.
  lesion = _box(shape, slice(2, 5), slice(2, 5), slice(2, 5))
  across_corner = np.zeros(shape, bool)
  across_corner[5, 5, 5] = True
  across_edge = np.zeros(shape, bool)
  across_edge[5, 5, 3] = True
  assert _lesion_wise(across_corner, lesion, 1.0, 1, 0.0)['fp'] == 1
  assert _lesion_wise(across_edge, lesion, 1.0, 1, 0.0)['fp'] == 0
  assert _lesion_wise(across_corner, lesion, 1.0, 2, 0.0)['fp'] == 0


def test_volume_threshold_is_in_mm3_and_inclusive():
  shape = (12, 12, 12)
  small = _box(shape, slice(2, 4), slice(2, 4), slice(2, 4))   # 8 voxels.
  big = _box(shape, slice(6, 11), slice(6, 11), slice(6, 11))
  truth = small | big
  pred = truth.copy()
  # 8 voxels of 2 mm^3 = 16 mm^3: ignored at a 16 mm^3 threshold, kept just below it.
  spacing = (2.0, 1.0, 1.0)
  kept = _lesion_wise(pred, truth, spacing, 1, 15.9)
  dropped = _lesion_wise(pred, truth, spacing, 1, 16.0)
  assert (kept['gt_lesions'], kept['ignored']) == (2, 0)
  assert (dropped['gt_lesions'], dropped['ignored'], dropped['fp']) == (1, 1, 0)
  # The ignored lesion's prediction is no false positive; missing it costs nothing either.
  assert _lesion_wise(big, truth, spacing, 1, 16.0)['lesion_dice'] == 1.0


def test_empty_cases():
  shape = (8, 8, 8)
  empty = np.zeros(shape, bool)
  blob = _box(shape, slice(2, 5), slice(2, 5), slice(2, 5))
  assert _lesion_wise(empty, empty, 1.0, 3, 50.0)['lesion_dice'] == 1.0
  assert _lesion_wise(empty, empty, 1.0, 3, 50.0)['lesion_hd95'] == 0.0
  assert _lesion_wise(blob, empty, 1.0, 3, 50.0) == {
      'lesion_dice': 0.0, 'lesion_hd95': MISS, 'tp': 0, 'fn': 0, 'fp': 1, 'gt_lesions': 0,
      'ignored': 0}
  missed = _lesion_wise(empty, blob, 1.0, 3, 0.0)
  assert (missed['lesion_dice'], missed['lesion_hd95'], missed['fn']) == (0.0, MISS, 1)


def test_config_settings_and_legacy_metrics_unchanged():
  lesion = default.get_config().task.lesion
  assert (lesion.dilation, lesion.min_volume_mm3, lesion.miss_hd95_mm) == (3, 50.0, 374.0)
  shape = (10, 10, 10)
  blob = _box(shape, slice(1, 5), slice(1, 5), slice(1, 5))
  shifted = np.roll(blob, 1, axis=0)
  scores = metrics.lesion_wise(shifted, blob, 1.0, **lesion)
  assert scores['lesion_dice'] == pytest.approx(metrics.dice(shifted, blob))
  assert scores['lesion_hd95'] == pytest.approx(metrics.hd95(shifted, blob, 1.0))
