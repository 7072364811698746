"""clfc_jax.postprocess: brain restriction, spacing-aware component removal, and the choice of
the minimum volume on validation patients (checked against a brute-force search)."""
import numpy as np
import pytest

from clfc_jax import metrics
from clfc_jax import postprocess
from configs import default


def _pp(**changes):
  pp = default.get_config().postprocess
  for key, value in changes.items():
    pp[key] = value
  return pp


def _ball(shape, centre, radius):
  idx = np.indices(shape)
  return ((idx - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius ** 2


def test_restrict_to_brain_zeroes_outside_and_keeps_dtype():
  prob = np.random.default_rng(0).uniform(size=(6, 7, 8)).astype(np.float32)
  brain = np.zeros(prob.shape, bool)
  brain[1:5, 2:6, 3:7] = True
  out = postprocess.restrict_to_brain(prob, brain)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out[brain], prob[brain])
  assert np.all(out[~brain] == 0)
  with pytest.raises(ValueError, match='brain mask shape'):
    postprocess.restrict_to_brain(prob, brain[1:])


def test_component_volumes_use_the_spacing():
  mask = np.zeros((20, 20, 20), bool)
  mask[2:4, 2:4, 2:4] = True        # 8 voxels
  mask[10:15, 10:15, 10:15] = True  # 125 voxels
  _, volumes = postprocess.components(mask, (1.0, 1.0, 1.0))
  np.testing.assert_allclose(sorted(volumes[1:]), [0.008, 0.125])
  # The same 8 voxels are 0.008 ml at 1 mm and 0.064 ml at 2 mm; anisotropic spacing works.
  assert not postprocess.remove_small_components(mask, 1.0, 0.01)[2, 2, 2]
  assert postprocess.remove_small_components(mask, 2.0, 0.01)[2, 2, 2]
  assert postprocess.remove_small_components(mask, (1.0, 1.0, 1.5), 0.01)[2, 2, 2]
  assert not postprocess.remove_small_components(mask, (1.0, 1.0, 1.2), 0.01)[2, 2, 2]
  # The large component always stays; a threshold of 0 removes nothing.
  assert postprocess.remove_small_components(mask, 1.0, 0.01)[12, 12, 12]
  np.testing.assert_array_equal(postprocess.remove_small_components(mask, 1.0, 0.0), mask)


def test_connectivity_decides_what_touches():
  mask = np.zeros((5, 5, 5), bool)
  mask[1, 1, 1] = mask[2, 2, 2] = True       # corners touch: one component at 26, two at 6
  assert postprocess.components(mask, 1.0, 26)[1].size == 2
  assert postprocess.components(mask, 1.0, 18)[1].size == 3
  assert postprocess.components(mask, 1.0, 6)[1].size == 3
  with pytest.raises(ValueError, match='connectivity'):
    postprocess.components(mask, 1.0, 8)


def test_keep_largest_never_empties_a_patient():
  mask = np.zeros((10, 10, 10), bool)
  mask[1, 1, 1] = True
  mask[5:7, 5, 5] = True
  kept = postprocess.remove_small_components(mask, 1.0, 1.0, keep_largest=True)
  assert kept.sum() == 2 and kept[5, 5, 5]
  assert not postprocess.remove_small_components(mask, 1.0, 1.0, keep_largest=False).any()


def test_apply_runs_the_configured_chain():
  prob = np.zeros((20, 20, 20), np.float32)
  prob[_ball(prob.shape, (10, 10, 10), 4)] = 0.9
  prob[1, 1, 1] = 0.8           # a stray voxel, outside the brain
  prob[15, 3, 3] = 0.8          # a stray voxel, inside the brain
  brain = np.ones(prob.shape, bool)
  brain[:3] = False
  pp = _pp(min_volume_ml=0.005)
  out = postprocess.apply(prob, 1.0, pp, brain=brain, threshold=0.5)
  np.testing.assert_array_equal(out, prob > 0.85)
  kept = postprocess.apply(prob, 1.0, _pp(min_volume_ml=0.0), brain=brain, threshold=0.5)
  assert kept[15, 3, 3] and not kept[1, 1, 1]
  no_brain = postprocess.apply(prob, 1.0, _pp(min_volume_ml=0.0, brain_mask=False), brain=brain,
                               threshold=0.5)
  assert no_brain[1, 1, 1]
  with pytest.raises(ValueError, match='threshold'):
    postprocess.apply(prob, 1.0, pp)


def _validation_set(seed, stray=True):
  """Tumors of ~0.1-3 ml at 2 mm, every other one with a true 0.26 ml satellite, and, when
  `stray`, scattered false-positive specks of 1-4 voxels (0.008-0.032 ml)."""
  rng = np.random.default_rng(seed)
  shape = (32, 32, 32)
  preds, truths = [], []
  for i in range(6):
    truth = _ball(shape, rng.integers(10, 22, 3), rng.uniform(1.5, 4.5))
    if i % 2:
      truth |= _ball(shape, (4, 4, 27), 2.0)
    pred = truth.copy()
    pred &= rng.uniform(size=shape) > 0.1          # misses a few voxels
    if stray:
      for _ in range(rng.integers(1, 6)):
        x = rng.integers(0, 31, 3)
        pred[x[0]:x[0] + 2, x[1]:x[1] + rng.integers(1, 3), x[2]] = True
    preds.append(pred)
    truths.append(truth)
  return preds, truths, [(2.0, 2.0, 2.0)] * len(preds)


def _brute_force(preds, truths, spacings, pp):
  means = {}
  for c in sorted({0.0, *pp.min_volume_candidates}):
    means[c] = np.mean([metrics.dice(postprocess.remove_small_components(
        p, s, c, pp.connectivity, pp.keep_largest), t) for p, t, s in zip(preds, truths, spacings)])
  return means


def test_choose_min_volume_matches_brute_force_and_removes_specks():
  preds, truths, spacings = _validation_set(0)
  pp = _pp(min_volume_candidates=(0.01, 0.05, 0.1, 1.0, 5.0))
  report = postprocess.choose_min_volume(preds, truths, spacings, pp)
  brute = _brute_force(preds, truths, spacings, pp)
  assert report['mean_dice'] == pytest.approx(brute)
  assert report['cases'] == 6 and report['baseline_dice'] == pytest.approx(brute[0.0])
  best = max(brute.values())
  assert report['mean_dice'][report['min_volume_ml']] == pytest.approx(best)
  assert min(c for c, v in brute.items() if v == best) == report['min_volume_ml']
  assert report['min_volume_ml'] > 0 and best > brute[0.0]       # the specks go ...
  assert brute[1.0] < best and brute[5.0] < best                  # ... not satellites


def test_no_removal_unless_it_helps():
  preds, truths, spacings = _validation_set(1, stray=False)
  pp = _pp(min_volume_candidates=(0.01, 0.05), keep_largest=False)
  report = postprocess.choose_min_volume(preds, truths, spacings, pp)
  assert report['min_volume_ml'] == 0.0
  # A required gain larger than what removal brings keeps it off too.
  preds, truths, spacings = _validation_set(0)
  report = postprocess.choose_min_volume(preds, truths, spacings, _pp(min_gain=0.5))
  assert report['min_volume_ml'] == 0.0


def test_ties_go_to_the_larger_volume_only_when_asked():
  """Without stray specks, removing components below 0.01-0.05 ml changes no validation Dice:
  'smaller' keeps everything, 'larger' (nnU-Net) takes the largest candidate that costs
  nothing, and never one that removes a true satellite."""
  preds, truths, spacings = _validation_set(1, stray=False)
  pp = _pp(min_volume_candidates=(0.01, 0.05, 1.0))
  brute = _brute_force(preds, truths, spacings, pp)
  assert brute[0.01] == brute[0.05] == brute[0.0] > brute[1.0]   # 1 ml drops satellites.
  assert postprocess.choose_min_volume(preds, truths, spacings, pp)['min_volume_ml'] == 0.0
  larger = postprocess.choose_min_volume(preds, truths, spacings,
                                         _pp(min_volume_candidates=(0.01, 0.05, 1.0),
                                             min_volume_ties='larger'))
  assert larger['min_volume_ml'] == 0.05
  # With specks, both rules take the best candidate.
  preds, truths, spacings = _validation_set(0)
  chosen = [postprocess.choose_min_volume(preds, truths, spacings,
                                          _pp(min_volume_ties=t))['min_volume_ml']
            for t in ('smaller', 'larger')]
  brute = _brute_force(preds, truths, spacings, _pp())
  assert all(brute[c] == max(brute.values()) for c in chosen)
  with pytest.raises(ValueError, match='min_volume_ties'):
    postprocess.choose_min_volume(preds, truths, spacings, _pp(min_volume_ties='middle'))


def test_choose_min_volume_restricts_to_the_brain_and_thresholds_probabilities():
  preds, truths, spacings = _validation_set(2)
  probs = [np.where(p, 0.9, 0.1).astype(np.float32) for p in preds]
  brains = [np.ones(t.shape, bool) for t in truths]
  a = postprocess.choose_min_volume(probs, truths, spacings, _pp(), brains=brains, threshold=0.5)
  b = postprocess.choose_min_volume(preds, truths, spacings, _pp())
  assert a == b
  # Everything outside the brain goes before the components are counted.
  outside = [~t for t in truths]
  c = postprocess.choose_min_volume(preds, truths, spacings, _pp(), brains=[~o for o in outside])
  assert c['baseline_dice'] == pytest.approx(np.mean([metrics.dice(p & t, t)
                                                      for p, t in zip(preds, truths)]))
  with pytest.raises(ValueError, match='as many'):
    postprocess.choose_min_volume(preds, truths[:-1], spacings, _pp())
  with pytest.raises(ValueError, match='threshold'):
    postprocess.choose_min_volume(probs, truths, spacings, _pp())


def _under_confident(seed):
  """Probabilities of a model unsure at the tumour's rim: 0.35 on its outer shell, 0.9 inside,
  0.05 elsewhere with a few 0.45 specks."""
  rng = np.random.default_rng(seed)
  probs, truths = [], []
  for _ in range(4):
    shape = (24, 24, 24)
    centre, radius = rng.integers(9, 15, 3), rng.uniform(4, 7)
    truth = _ball(shape, centre, radius)
    prob = np.full(shape, 0.05, np.float32)
    prob[truth] = 0.35
    prob[_ball(shape, centre, radius - 2)] = 0.9
    x = rng.integers(0, 22, 3)
    prob[x[0]:x[0] + 2, x[1], x[2]] = 0.45
    probs.append(prob)
    truths.append(truth)
  return probs, truths, [(2.0, 2.0, 2.0)] * len(probs)


def test_threshold_is_chosen_with_the_min_volume_on_validation_probabilities():
  probs, truths, spacings = _under_confident(0)
  pp = _pp(threshold_candidates=(0.2, 0.3, 0.4), min_volume_candidates=(0.01, 0.1))
  report = postprocess.choose_threshold_and_min_volume(probs, truths, spacings, pp, 0.5)
  assert report['threshold'] == 0.3 and set(report['threshold_dice']) == {0.2, 0.3, 0.4, 0.5}
  for t, dice in report['threshold_dice'].items():   # each: its best min volume's Dice
    at_t = postprocess.choose_min_volume(probs, truths, spacings, pp, threshold=t)
    assert dice == pytest.approx(at_t['mean_dice'][at_t['min_volume_ml']])
  assert report['threshold_dice'][0.3] == pytest.approx(1.0)
  assert report['threshold_dice'][0.5] < 0.9
  # At 0.3 the 0.45 specks are in the mask too: the volume chosen with it removes them.
  assert report['min_volume_ml'] > 0
  # No candidates, or a gain required beyond what they bring: the default threshold.
  assert postprocess.choose_threshold_and_min_volume(
      probs, truths, spacings, _pp(threshold_candidates=()), 0.5)['threshold'] == 0.5
  assert postprocess.choose_threshold_and_min_volume(
      probs, truths, spacings, _pp(min_gain=0.9), 0.5)['threshold'] == 0.5
  # A confident model keeps the default (ties go to it).
  sure = [np.where(t, 0.95, 0.01).astype(np.float32) for t in truths]
  assert postprocess.choose_threshold_and_min_volume(sure, truths, spacings, pp, 0.5)[
      'threshold'] == 0.5
