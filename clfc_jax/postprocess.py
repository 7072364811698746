"""Prediction hygiene (numpy/scipy): keep tumor inside the brain, drop small stray components.

Why: on scans from elsewhere the network fires on a few scattered voxels far from the tumor;
each costs little Dice but sets HD95 to tens of mm. Two steps, config under `c.postprocess`:
  * restrict_to_brain: nothing outside the brain mask (a probability map or a mask).
  * remove_small_components: connected components (6/18/26 neighbours) below min_volume_ml,
    measured in ml with the voxel spacing, are removed; the largest component is kept whatever
    its size when keep_largest (a patient is never emptied by the cleaning alone).
choose_min_volume picks min_volume_ml nnU-Net style: the candidate with the highest mean
Dice over a VALIDATION set (never the test fold: the caller passes validation data only), and
no removal at all unless removal beats it by more than min_gain.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

_CONNECTIVITY = {6: 1, 18: 2, 26: 3}    # neighbours -> scipy's rank-connectivity (3-D).


def _structure(connectivity: int, ndim: int):
  if connectivity not in _CONNECTIVITY:
    raise ValueError(f'postprocess.connectivity must be one of {sorted(_CONNECTIVITY)}, got '
                     f'{connectivity}')
  return ndimage.generate_binary_structure(ndim, min(_CONNECTIVITY[connectivity], ndim))


def _voxel_ml(spacing, ndim) -> float:
  spacing = np.broadcast_to(np.asarray(spacing, np.float64), (ndim,))
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'spacing must be positive and finite, got {spacing.tolist()}')
  return float(np.prod(spacing)) / 1000.0


def restrict_to_brain(pred: np.ndarray, brain: np.ndarray) -> np.ndarray:
  """`pred` (probabilities or mask, any dtype) set to 0 outside `brain`."""
  pred, brain = np.asarray(pred), np.asarray(brain, bool)
  if pred.shape != brain.shape:
    raise ValueError(f'prediction shape {pred.shape} differs from brain mask shape '
                     f'{brain.shape}')
  return np.where(brain, pred, np.zeros((), pred.dtype))


def components(mask: np.ndarray, spacing, connectivity: int = 26):
  """(labels int32 array, volumes_ml float64 [n + 1]; entry 0 is the background)."""
  mask = np.asarray(mask) != 0
  labels, n = ndimage.label(mask, _structure(connectivity, mask.ndim))
  sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
  volumes = sizes * _voxel_ml(spacing, mask.ndim)
  volumes[0] = 0.0
  return labels, volumes


def _kept(volumes, min_volume_ml, keep_largest):
  """Bool [n + 1]: which components survive (the background never does)."""
  keep = volumes >= float(min_volume_ml)
  if keep_largest and len(volumes) > 1:
    keep[1 + int(np.argmax(volumes[1:]))] = True
  keep[0] = False
  return keep


def remove_small_components(mask: np.ndarray, spacing, min_volume_ml: float,
                            connectivity: int = 26, keep_largest: bool = True) -> np.ndarray:
  """Bool mask without the connected components smaller than min_volume_ml (ml, spacing in mm).

  min_volume_ml <= 0 keeps everything.
  """
  mask = np.asarray(mask) != 0
  if min_volume_ml <= 0 or not mask.any():
    return mask
  labels, volumes = components(mask, spacing, connectivity)
  return _kept(volumes, min_volume_ml, keep_largest)[labels]


def _as_mask(pred, threshold):
  pred = np.asarray(pred)
  if np.issubdtype(pred.dtype, np.floating):
    if threshold is None:
      raise ValueError('postprocess: a probability map needs a threshold (config.eval.threshold)')
    return pred > float(threshold)
  return pred != 0


def apply(pred: np.ndarray, spacing, pp, brain: Optional[np.ndarray] = None,
          threshold: Optional[float] = None) -> np.ndarray:
  """The configured chain on one patient: bool mask.

  pred: a mask, or probabilities thresholded at `threshold`. pp: config.postprocess. The
  brain mask is used when given and pp.brain_mask; min_volume_ml comes from pp.
  """
  mask = _as_mask(pred, threshold)
  if brain is not None and pp.brain_mask:
    mask = restrict_to_brain(mask, brain)
  return remove_small_components(mask, spacing, pp.min_volume_ml, pp.connectivity,
                                 pp.keep_largest)


def choose_min_volume(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                      spacings: Sequence, pp, brains: Optional[Sequence[np.ndarray]] = None,
                      threshold: Optional[float] = None) -> dict:
  """min_volume_ml maximising mean Dice over validation patients, from pp.min_volume_candidates.

  predictions: per patient masks or probabilities (thresholded at `threshold`); truths: label
  arrays (any non-zero is tumor); spacings: mm per axis. Only validation patients belong here.
  Returns {'min_volume_ml': chosen, 'mean_dice': {candidate: mean Dice}, 'baseline_dice':
  mean Dice without removal, 'cases': n}. A candidate must beat no removal by more than
  pp.min_gain. Ties go to the smaller volume, or with pp.min_volume_ties='larger' to the
  larger one (nnU-Net's rule: remove whenever removing does not cost validation Dice; a
  validation set without stray components cannot tell the candidates apart, and test scans
  may have them).
  """
  ties = pp.get('min_volume_ties', 'smaller')
  if ties not in ('smaller', 'larger'):
    raise ValueError(f"postprocess.min_volume_ties={ties!r}; expected 'smaller' or 'larger'")
  n = len(predictions)
  if n == 0 or len(truths) != n or len(spacings) != n or (brains is not None and
                                                          len(brains) != n):
    raise ValueError(f'postprocess: need as many truths, spacings (and brains) as predictions '
                     f'(> 0), got {n}, {len(truths)}, {len(spacings)}'
                     f'{"" if brains is None else f", {len(brains)}"}')
  candidates = sorted({0.0, *(float(c) for c in pp.min_volume_candidates)})
  dice = np.zeros((n, len(candidates)))
  for i, (pred, truth, spacing) in enumerate(zip(predictions, truths, spacings)):
    mask = _as_mask(pred, threshold)
    truth = np.asarray(truth) != 0
    if truth.shape != mask.shape:
      raise ValueError(f'postprocess: case {i}: prediction shape {mask.shape} differs from '
                       f'truth shape {truth.shape}')
    if brains is not None and pp.brain_mask:
      mask = restrict_to_brain(mask, brains[i])
    labels, volumes = components(mask, spacing, pp.connectivity)
    sizes = np.bincount(labels.reshape(-1), minlength=len(volumes))
    overlap = np.bincount(labels[truth], minlength=len(volumes))
    n_truth = int(truth.sum())
    for j, c in enumerate(candidates):
      keep = _kept(volumes, c, pp.keep_largest) if c > 0 else np.arange(len(volumes)) > 0
      total = int(sizes[keep].sum()) + n_truth
      dice[i, j] = 1.0 if total == 0 else 2.0 * int(overlap[keep].sum()) / total
  mean = dice.mean(0)
  baseline = float(mean[0])
  best = 0
  floor = baseline + float(pp.min_gain)
  for j in range(1, len(candidates)):   # ascending: a later one must be better (or tie).
    if ties == 'larger':
      take = mean[j] >= mean[best] and mean[j] >= floor
    else:
      take = mean[j] > mean[best] and mean[j] > floor
    if take:
      best = j
  return {'min_volume_ml': candidates[best],
          'mean_dice': {c: float(m) for c, m in zip(candidates, mean)},
          'baseline_dice': baseline, 'cases': n}


def choose_threshold_and_min_volume(probabilities: Sequence[np.ndarray],
                                    truths: Sequence[np.ndarray], spacings: Sequence, pp,
                                    default_threshold: float,
                                    brains: Optional[Sequence[np.ndarray]] = None) -> dict:
  """The probability threshold (pp.threshold_candidates and default_threshold) and, at it, the
  min_volume_ml (choose_min_volume) with the best mean validation Dice.

  Why: a briefly trained network is under-confident at the tumour's rim (the demo's model
  reaches 0.81 sensitivity at 0.93 precision), and more so on scans unlike its training ones;
  nnU-Net fixes post-processing on validation folds, and so does this, for the threshold too.
  A threshold other than the default must beat it by more than pp.min_gain; ties go to the
  default, then to the candidate nearest it. Returns choose_min_volume's record at the chosen
  threshold plus 'threshold' and 'threshold_dice' {candidate: mean Dice at its best min volume}.
  """
  default_threshold = float(default_threshold)
  candidates = sorted({default_threshold, *(float(t) for t in pp.get('threshold_candidates', ()))})
  per = {t: choose_min_volume(probabilities, truths, spacings, pp, brains, threshold=t)
         for t in candidates}
  score = {t: per[t]['mean_dice'][per[t]['min_volume_ml']] for t in candidates}
  best = default_threshold
  for t in sorted(candidates, key=lambda t: abs(t - default_threshold)):   # ties: nearest
    if score[t] > score[best] and score[t] > score[default_threshold] + float(pp.min_gain):
      best = t
  return dict(per[best], threshold=best, threshold_dice=score)
