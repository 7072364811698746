"""Pseudo-normal by inpainting: the input T1, except where the IntroVAE finds it abnormal.

Why: the demo's small, briefly trained vector-latent IntroVAE reconstructs a blurred mean brain.
Dec(μ(x)) as the pseudo-normal (SPEC §6) loses the subject's anatomy (healthy-tissue MAE ten
times the noise floor), and restoring towards it moves little of the tumour, because the model
has nothing sharp to move it to (experiments/restore_results.md). The same blur is still a good
*expectation*: on T1, necrosis, edema and non-enhancing tumour are darker than a healthy brain
at that place, in blobs; the subject is darker than the blur too, mostly along thin structures
(the cortical ribbon, sulci, ventricle edges). So

  M = dilate(open(polarity · G_σ * (x − Dec(μ(x))) > τ)) ∩ brain

takes in the lesion without labels. It is not a lesion detector: on the demo it also covers
much of the cortex (20-30% of the brain in all), where the fill changes little. Inside M the
pseudo-normal is the subject's own tissue around it (normalised Gaussian convolution, widened until every voxel of M is reached:
the multi-scale form of Knutsson & Westin's normalised convolution). Outside M it is the input,
so healthy anatomy is kept exactly. Beyond the paper: `introvae.inference='inpaint'`.

Pure numpy / scipy.ndimage (a few filters on one volume; no library does this composite).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Each wider pass of the fill doubles σ, at most this many times (2^6 x σ covers any brain).
FILL_PASSES = 7
# A voxel is filled by the first pass whose kept-voxel weight there reaches this.
FILL_MIN_WEIGHT = 1e-2


def _ball(radius: int) -> np.ndarray:
  """A 3-D structuring element: the voxel L1 ball of `radius` (radius 0 = one voxel)."""
  if radius <= 0:
    return np.ones((1, 1, 1), bool)
  return ndi.iterate_structure(ndi.generate_binary_structure(3, 1), radius)


def anomaly_mask(unit, expected, brain, *, threshold: float, polarity: int = -1,
                 smooth_vox: float = 1.0, opening_vox: int = 2, dilation_vox: int = 1
                 ) -> np.ndarray:
  """Voxels of `brain` where `unit` departs from `expected` by more than `threshold`.

  unit, expected: [Z, H, W] in [-1, 1]; polarity -1 = darker than expected (T1 lesions), +1 =
  brighter (e.g. an enhancing T1c), 0 = either. The residual is smoothed in-plane (σ in voxels:
  the pseudo-normal is made slice by slice), opened with an L1 ball (drops thin structures a
  blur also misses) and dilated (the lesion's partial-volume rim).
  """
  unit = np.asarray(unit, np.float32)
  expected = np.asarray(expected, np.float32)
  brain = np.asarray(brain, bool)
  if unit.shape != expected.shape or unit.shape != brain.shape:
    raise ValueError(f'anomaly_mask: shapes differ, input {unit.shape}, expected '
                     f'{expected.shape}, brain {brain.shape}')
  if polarity not in (-1, 0, 1):
    raise ValueError(f'anomaly_mask: polarity must be -1, 0 or 1, got {polarity!r}')
  residual = ndi.gaussian_filter(unit - expected, (0.0, smooth_vox, smooth_vox))
  score = np.abs(residual) if polarity == 0 else polarity * residual
  mask = brain & (score > threshold)
  if opening_vox > 0:
    mask = ndi.binary_opening(mask, _ball(opening_vox))
  if dilation_vox > 0:
    mask = ndi.binary_dilation(mask, _ball(dilation_vox))
  return mask & brain


def fill_from_surroundings(unit, keep, hole, sigma_vox: float) -> np.ndarray:
  """`unit` with every voxel of `hole` replaced by a Gaussian average of `unit` over `keep`.

  Normalised convolution (Σ G·keep·unit / Σ G·keep) at σ, then 2σ, 4σ, ... for voxels the
  narrower pass did not reach (a large lesion's centre); a hole no pass reaches keeps `unit`.
  """
  unit = np.asarray(unit, np.float32)
  keep = np.asarray(keep, bool) & ~np.asarray(hole, bool)
  out = unit.copy()
  todo = np.asarray(hole, bool).copy()
  values = np.where(keep, unit, 0.0).astype(np.float64)
  weights = keep.astype(np.float64)
  sigma = float(sigma_vox)
  for _ in range(FILL_PASSES):
    if not todo.any():
      break
    w = ndi.gaussian_filter(weights, sigma)
    v = ndi.gaussian_filter(values, sigma)
    reached = todo & (w >= FILL_MIN_WEIGHT)
    out[reached] = (v[reached] / w[reached]).astype(np.float32)
    todo &= ~reached
    sigma *= 2.0
  return out


def inpaint(unit, expected, brain, iv, spacing_mm: float) -> np.ndarray:
  """The inpainting pseudo-normal of one volume under the introvae config `iv` (mm -> voxels
  at the prepared grid's `spacing_mm`); -1 outside the brain, like Dec(μ)."""
  vox = lambda mm: float(mm) / float(spacing_mm)
  brain = np.asarray(brain, bool)
  mask = anomaly_mask(unit, expected, brain, threshold=float(iv.inpaint_threshold),
                      polarity=int(iv.inpaint_polarity), smooth_vox=vox(iv.inpaint_smooth_mm),
                      opening_vox=int(round(vox(iv.inpaint_opening_mm))),
                      dilation_vox=int(round(vox(iv.inpaint_dilation_mm))))
  filled = fill_from_surroundings(unit, brain, mask, vox(iv.inpaint_fill_mm))
  return np.where(brain, np.clip(filled, -1.0, 1.0), -1.0).astype(np.float32)
