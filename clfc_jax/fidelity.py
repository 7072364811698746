"""How faithful a pseudo-normal T1 is: MAE and SSIM against the subject's healthy T1.

Only synthetic cohorts know the healthy T1, so this scores the IntroVAE on the demo. Two regions
of the brain: the tumour (label > 0) and the healthy tissue (the rest of the brain). Each is
scored for the pseudo-normal and, as the reference point, for the input (tumour) T1 the
IntroVAE was given: in healthy tissue the input is almost the healthy T1 (same noise, same
bias field), inside the tumour the pseudo-normal should be much closer than the input.
Every volume is [Z, H, W] in the IntroVAE's [-1, 1] units. Pure numpy / scipy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

REGIONS = ('healthy', 'tumor')
SOURCES = ('pseudo', 'input')
# SSIM constants (Wang et al. 2004): K1, K2 and the Gaussian window's sigma in voxels.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def regions(brain, label) -> dict:
  """{'healthy': brain without tumour, 'tumor': brain & label > 0} as bool volumes."""
  brain = np.asarray(brain, bool)
  tumor = brain & (np.asarray(label) > 0)
  return {'healthy': brain & ~tumor, 'tumor': tumor}


def ssim_map(a, b, *, data_range: float = 2.0, sigma=(0.0, 1.5, 1.5)) -> np.ndarray:
  """Per-voxel SSIM of two volumes with a Gaussian window (σ per axis, in voxels).

  skimage is not in the environment, and its structural_similarity returns one number per
  image (or a map whose border it crops), while we need the map to average over a region; the
  Gaussian-window SSIM is five scipy filters. σ = 0 along Z by default: the pseudo-normal is
  made slice by slice, so its slices are compared as the 2D images they are.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'ssim_map: shapes differ, {a.shape} vs {b.shape}')
  blur = lambda x: ndi.gaussian_filter(x, sigma, mode='nearest', truncate=3.5)
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a ** 2
  var_b = blur(b * b) - mu_b ** 2
  cov = blur(a * b) - mu_a * mu_b
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  return ((2 * mu_a * mu_b + c1) * (2 * cov + c2) /
          ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))


def _mean_in(values, region) -> Optional[float]:
  return float(np.mean(values[region])) if region.any() else None


def case_fidelity(pseudo, tumor_t1, healthy_t1, brain, label, *, data_range: float = 2.0,
                  ssim_sigma: Sequence[float] = (0.0, 1.5, 1.5)) -> dict:
  """MAE and SSIM against `healthy_t1` of the pseudo-normal and of the input, per region.

  Keys: healthy_voxels, tumor_voxels, and {mae,ssim}_{healthy,tumor}_{pseudo,input} (None for
  an empty region, e.g. a tumour lost in the crop).
  """
  healthy_t1 = np.asarray(healthy_t1, np.float32)
  shapes = {np.shape(pseudo), np.shape(tumor_t1), healthy_t1.shape, np.shape(brain),
            np.shape(label)}
  if len(shapes) != 1:
    raise ValueError(f'case_fidelity: volumes of different shapes {sorted(shapes)}')
  masks = regions(brain, label)
  out = {f'{r}_voxels': int(masks[r].sum()) for r in REGIONS}
  for source, volume in (('pseudo', pseudo), ('input', tumor_t1)):
    volume = np.asarray(volume, np.float32)
    error = np.abs(volume - healthy_t1)
    ssim = ssim_map(volume, healthy_t1, data_range=data_range, sigma=ssim_sigma)
    for r in REGIONS:
      out[f'mae_{r}_{source}'] = _mean_in(error, masks[r])
      out[f'ssim_{r}_{source}'] = _mean_in(ssim, masks[r])
  return out


FIELDS = tuple(f'{metric}_{r}_{s}' for metric in ('mae', 'ssim') for r in REGIONS
               for s in SOURCES)


def summarize(rows: Sequence[dict]) -> dict:
  """Means over cases of every field, and how the pseudo-normal fares inside the tumour.

  tumor_closer: cases whose pseudo-normal MAE in the tumour is below the input's, out of
  cases_with_tumor; tumor_reduction: 1 − mean pseudo MAE / mean input MAE in the tumour
  (the means the issue quotes, so that one small tumour cannot swing it).
  """
  mean = {}
  for field in FIELDS:
    values = [r[field] for r in rows if r.get(field) is not None]
    mean[field] = float(np.mean(values)) if values else None
  with_tumor = [r for r in rows if r.get('mae_tumor_pseudo') is not None]
  closer = sum(r['mae_tumor_pseudo'] < r['mae_tumor_input'] for r in with_tumor)
  reduction = None
  if with_tumor and mean['mae_tumor_input']:
    reduction = 1.0 - mean['mae_tumor_pseudo'] / mean['mae_tumor_input']
  return {'n': len(rows), 'cases_with_tumor': len(with_tumor), 'tumor_closer': int(closer),
          'tumor_reduction': reduction, 'mean': mean}


def verdict(summary: dict, *, noise_floor: float, healthy_factor: float,
            tumor_reduction: float) -> str:
  """One line: PASS/FAIL against the targets, with the numbers that decide it.

  Targets: healthy-tissue MAE <= healthy_factor × noise_floor; inside the tumour the
  pseudo-normal closer than the input in every case, and its mean MAE lower by at least
  `tumor_reduction` (a fraction).
  """
  mean = summary['mean']
  healthy = mean['mae_healthy_pseudo']
  limit = healthy_factor * noise_floor
  healthy_ok = healthy is not None and healthy <= limit
  n_tumor, closer = summary['cases_with_tumor'], summary['tumor_closer']
  reduction = summary['tumor_reduction']
  tumor_ok = n_tumor > 0 and closer == n_tumor and reduction is not None and (
      reduction >= tumor_reduction)
  fmt = lambda v, f: '–' if v is None else format(v, f)
  return (f'{"PASS" if healthy_ok and tumor_ok else "FAIL"}: healthy MAE {fmt(healthy, ".4f")} '
          f'{"<=" if healthy_ok else ">"} {limit:.4f} ({healthy_factor:g}x noise floor '
          f'{noise_floor:.4f}); tumour: closer than the input in {closer}/{n_tumor}, MAE '
          f'{fmt(mean["mae_tumor_pseudo"], ".4f")} vs {fmt(mean["mae_tumor_input"], ".4f")} '
          f'({fmt(None if reduction is None else 100 * reduction, ".0f")}% lower, need '
          f'>= {100 * tumor_reduction:.0f}% and every case)')
