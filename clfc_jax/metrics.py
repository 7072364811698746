"""Patient-wise segmentation metrics in native space (SPEC §8): Dice, sensitivity, HD95 in mm.

Masks are 2-D or 3-D arrays (anything non-zero is foreground), `spacing` is the voxel size in
mm per axis (anisotropic allowed).

Definitions (pinned down so that the numbers are reproducible):
  * surface(M): voxels of M with at least one background face neighbour (4-neighbourhood in
    2-D, 6 in 3-D); everything outside the array counts as background, so mask voxels on the
    array's border are surface voxels.
  * distance from surface(A) to B: for every voxel of surface(A), the Euclidean distance in mm
    between voxel centres to the nearest voxel of surface(B) (not to B's interior: a voxel of
    A deep inside B still has a positive distance), computed exactly with
    scipy.ndimage.distance_transform_edt(~surface(B), sampling=spacing).
  * HD95 = max(P95(d(surface(A) -> B)), P95(d(surface(B) -> A))), P95 being numpy.percentile
    with its default linear interpolation. (medpy's hd95 takes one P95 over both directions
    pooled instead, from the same surfaces and distances; tests compare the two like for like.)
  * Empty masks (BraTS convention): both empty -> Dice 1, sensitivity 1, HD95 0; exactly one
    empty -> Dice 0, HD95 = the image's diagonal in mm, sqrt(sum((shape * spacing)^2)).
    Sensitivity = TP / (TP + FN) depends on the truth only through its positives: with an empty
    truth there is nothing to miss, so it is 1 whatever the prediction (false positives are
    what Dice and HD95 punish). Keeps every value finite so that tables never average NaNs.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _as_pair(pred, truth):
  pred = np.asarray(pred) != 0
  truth = np.asarray(truth) != 0
  if pred.shape != truth.shape:
    raise ValueError(f'prediction shape {pred.shape} differs from truth shape {truth.shape}')
  if pred.ndim not in (2, 3):
    raise ValueError(f'masks must be 2-D or 3-D, got shape {pred.shape}')
  return pred, truth


def _as_spacing(spacing, ndim):
  spacing = np.broadcast_to(np.asarray(spacing, np.float64), (ndim,)).copy()
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'spacing must be positive and finite, got {spacing.tolist()}')
  return spacing


def dice(pred, truth) -> float:
  """2|P∩T| / (|P| + |T|); 1 when both are empty."""
  pred, truth = _as_pair(pred, truth)
  total = int(pred.sum()) + int(truth.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.count_nonzero(pred & truth)) / total


def sensitivity(pred, truth) -> float:
  """TP / (TP + FN); 1 when the truth is empty (see the module docstring)."""
  pred, truth = _as_pair(pred, truth)
  positives = int(truth.sum())
  if positives == 0:
    return 1.0
  return int(np.count_nonzero(pred & truth)) / positives


def surface(mask) -> np.ndarray:
  """Mask voxels with a background face neighbour; outside the array is background."""
  mask = np.asarray(mask, bool)
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def directed_surface_distances(a, b, spacing) -> np.ndarray:
  """Distances (mm) from every surface voxel of `a` to the nearest surface voxel of `b`.

  Both masks must be non-empty.
  """
  a, b = _as_pair(a, b)
  spacing = _as_spacing(spacing, a.ndim)
  if not (a.any() and b.any()):
    raise ValueError('surface distances need two non-empty masks')
  a, b = _crop_to_union(a, b)
  to_b = ndimage.distance_transform_edt(~surface(b), sampling=spacing)
  return to_b[surface(a)]


def _crop_to_union(a, b):
  """Crops to the bounding box of a|b plus one background voxel on every side.

  Exact, not an approximation: every surface voxel lies in the box, the one-voxel frame keeps
  the erosion's view of the array border (both are background), and the nearest surface voxel
  of b is always inside the box. Makes HD95 cost scale with the tumor, not the volume.
  """
  box = ndimage.find_objects((a | b).view(np.uint8))[0]
  return np.pad(a[box], 1), np.pad(b[box], 1)


def hd95(pred, truth, spacing) -> float:
  """95th-percentile symmetric Hausdorff distance in mm (definitions in the module docstring)."""
  pred, truth = _as_pair(pred, truth)
  spacing = _as_spacing(spacing, pred.ndim)
  has_pred, has_truth = bool(pred.any()), bool(truth.any())
  if not has_pred and not has_truth:
    return 0.0
  if has_pred != has_truth:
    return float(np.sqrt(np.sum((np.asarray(pred.shape) * spacing) ** 2)))
  forward = directed_surface_distances(pred, truth, spacing)
  backward = directed_surface_distances(truth, pred, spacing)
  return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def case_metrics(pred, truth, spacing) -> dict:
  """{'dice', 'sensitivity', 'hd95'} for one patient (floats; HD95 in mm)."""
  return {
      'dice': dice(pred, truth),
      'sensitivity': sensitivity(pred, truth),
      'hd95': hd95(pred, truth, spacing),
  }
