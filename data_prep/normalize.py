"""Histogram matching: Nyul & Udupa landmark standardisation, fitted on a training split only.

Each volume's landmarks are percentiles (config.prep.hist.percentiles) of its brain voxels. The
standard scale is the mean, over the training patients, of their landmarks after mapping each
patient's first/last landmark linearly onto config.prep.hist.scale. A volume is standardised
by the piecewise-linear map from its own landmarks onto the standard ones (linear
extrapolation beyond the end landmarks), and set to 0 outside the brain.

Why not SimpleITK's HistogramMatchingImageFilter: it matches to ONE reference image, while the
paper's reference must be learned from the whole training split (and only from it); the
Nyul map is a few lines of numpy on top of np.percentile / np.interp.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from data_prep import folds as folds_lib
from data_prep import store
from data_prep.case import CaseError

_MIN_STEP = 1e-6   # keeps landmarks strictly increasing on flat histograms.


def case_landmarks(volume, brain, percentiles: Sequence[float]) -> np.ndarray:
  """Percentiles of the brain voxels of one volume (float64, non-decreasing)."""
  voxels = np.asarray(volume)[np.asarray(brain, bool)]
  if voxels.size == 0:
    raise ValueError('histogram matching: the brain mask is empty')
  return np.percentile(voxels.astype(np.float64), percentiles)


def _to_scale(landmarks, scale) -> np.ndarray:
  """Maps a case's landmarks linearly so that the end ones land on `scale`."""
  lo, hi = landmarks[0], landmarks[-1]
  span = max(hi - lo, _MIN_STEP)
  return scale[0] + (landmarks - lo) / span * (scale[1] - scale[0])


def _strictly_increasing(x) -> np.ndarray:
  x = np.maximum.accumulate(np.asarray(x, np.float64))
  return x + _MIN_STEP * np.arange(len(x))


def fit_references(cases: Iterable, modalities: Sequence[str], config) -> dict:
  """Standard-scale landmarks per modality, the mean over `cases` (PreparedCase, read once)."""
  h = config.prep.hist
  mapped = {m: [] for m in modalities}
  for case in cases:
    for m in modalities:
      if m not in case.modalities:
        raise CaseError(case.case_id, f'prepared case lacks modality {m!r} '
                        f'(has {case.modalities})')
      try:
        lm = case_landmarks(case.modality(m), case.brain, h.percentiles)
      except ValueError as e:
        raise CaseError(case.case_id, f'{m}: {e}') from None
      mapped[m].append(_to_scale(lm, h.scale))
  refs = {}
  for m, rows in mapped.items():
    if not rows:
      raise ValueError(f'histogram references: no training case holds modality {m!r}')
    refs[m] = np.mean(rows, axis=0)
  return refs


def map_landmarks(values, source, target) -> np.ndarray:
  """The piecewise-linear map of `values` from landmarks `source` onto `target` (float64), with
  the end segments extended linearly (Nyul & Udupa; np.interp alone would clamp)."""
  v = np.asarray(values, np.float64)
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  out = np.interp(v, source, target)
  low, high = v < source[0], v > source[-1]
  slope_lo = (target[1] - target[0]) / (source[1] - source[0])
  slope_hi = (target[-1] - target[-2]) / (source[-1] - source[-2])
  out[low] = target[0] + (v[low] - source[0]) * slope_lo
  out[high] = target[-1] + (v[high] - source[-1]) * slope_hi
  return out


def _check_target(source, target):
  if np.shape(source) != np.shape(target):
    raise ValueError(f'histogram matching: {len(target)} reference landmarks for '
                     f'{len(source)} percentiles; refit the references')


def apply_reference(volume, brain, landmarks, config) -> np.ndarray:
  """The volume on the standard scale `landmarks` (float32, 0 outside `brain`)."""
  brain = np.asarray(brain, bool)
  volume = np.asarray(volume, np.float32)
  source = _strictly_increasing(case_landmarks(volume, brain, config.prep.hist.percentiles))
  _check_target(source, landmarks)
  result = np.zeros(volume.shape, np.float32)
  result[brain] = map_landmarks(volume[brain], source, landmarks)
  return result


# --- The fold-independent half (what the shards store) -----------------------------------------
# A fold's histogram matching is the composition of a linear, fold-independent map (each
# volume's own end landmarks onto config.prep.hist.scale) and a piecewise-linear map onto the
# fold's references. The shards store the first half's result (float16) with the volume's
# landmarks on that scale, and the loader applies the second half per slice: one shard set
# serves every fold (issue 14). Evaluation and new patients go through the same two halves.

def stored_scale(volume, brain, config) -> tuple:
  """(float32 volume mapped linearly so that its own first/last landmark land on
  config.prep.hist.scale, 0 outside `brain`; float32 [P] landmarks on that scale)."""
  h = config.prep.hist
  brain = np.asarray(brain, bool)
  volume = np.asarray(volume, np.float32)
  source = _strictly_increasing(case_landmarks(volume, brain, h.percentiles))
  lo, hi = source[0], source[-1]
  gain = (h.scale[1] - h.scale[0]) / max(hi - lo, _MIN_STEP)
  out = np.zeros(volume.shape, np.float32)
  out[brain] = h.scale[0] + (volume[brain].astype(np.float64) - lo) * gain
  landmarks = _strictly_increasing(h.scale[0] + (source - lo) * gain).astype(np.float32)
  for i in range(1, len(landmarks)):   # float32 rounding must not merge two landmarks.
    if landmarks[i] <= landmarks[i - 1]:
      landmarks[i] = np.nextafter(landmarks[i - 1], np.float32(np.inf))
  return out, landmarks


_FAR = 1e6   # stored-scale units: apply_stored's end segments reach this far (exactly linear).


def apply_stored(values, brain, stored_landmarks, landmarks) -> np.ndarray:
  """Stored values (stored_scale's) on the standard scale `landmarks`: float32, 0 outside
  `brain` (any shape, e.g. a [H, W, 2K+1] stack with its brain stack).

  One np.interp over every voxel: the end segments are extended to ±_FAR as two more
  landmarks, which is map_landmarks' linear extrapolation for any value a scan holds, and
  avoids gathering the brain voxels (this runs per slice in the loader)."""
  _check_target(stored_landmarks, landmarks)
  xp = np.asarray(stored_landmarks, np.float64)
  fp = np.asarray(landmarks, np.float64)
  slope_lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
  slope_hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
  xp = np.concatenate([[xp[0] - _FAR], xp, [xp[-1] + _FAR]])
  fp = np.concatenate([[fp[0] - _FAR * slope_lo], fp, [fp[-1] + _FAR * slope_hi]])
  out = np.interp(np.asarray(values, np.float32), xp, fp)
  return np.where(np.asarray(brain, bool), out, 0.0).astype(np.float32)


_FLOAT16_VALUES = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)


def stored_lut(stored_landmarks, landmarks) -> np.ndarray:
  """float32 [65536]: apply_stored of every float16 bit pattern (brain everywhere), so that
  apply_stored(v, brain, ...) == where(brain, lut[v.view(uint16)], 0) bitwise for float16 v:
  the loader maps a slice with one gather instead of an interpolation."""
  with np.errstate(invalid='ignore'):
    return apply_stored(_FLOAT16_VALUES, True, stored_landmarks, landmarks)


def save_references(refs: dict, path, fitted_on: Optional[Sequence[str]] = None) -> Path:
  """Writes {modality: landmarks} (and the ids they were fitted on) as JSON, atomically."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = {'landmarks': {m: [float(x) for x in v] for m, v in refs.items()}}
  if fitted_on is not None:
    record['fitted_on'] = sorted(fitted_on)
  return store.write_text(path, json.dumps(record, indent=1))


def load_references(path) -> dict:
  """{modality: float64 landmarks} from save_references' JSON."""
  path = Path(path)
  try:
    record = json.loads(path.read_text())
    return {m: np.asarray(v, np.float64) for m, v in record['landmarks'].items()}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CaseError(path, f'not a histogram-reference file ({e})') from None


def references_fitted_on(path) -> Optional[list]:
  """The case ids a reference file was fitted on, or None when it does not say."""
  try:
    return json.loads(Path(path).read_text()).get('fitted_on')
  except (OSError, ValueError):
    return None


def load_or_fit_references(path, prep_dir, ids: Sequence[str], modalities, config) -> dict:
  """The references at `path` if they were fitted on `ids`; else fits (lazily loading) and saves.

  A file that does not record its ids (written by the prep stage) is trusted as is.
  """
  path = Path(path)
  if path.exists():
    fitted_on = references_fitted_on(path)
    refs = load_references(path)
    n = len(config.prep.hist.percentiles)
    if ((fitted_on is None or sorted(fitted_on) == sorted(ids)) and
        all(m in refs and len(refs[m]) == n for m in modalities)):
      return {m: refs[m] for m in modalities}
  refs = fit_references((store.load_prepared(prep_dir, i) for i in ids), modalities, config)
  save_references(refs, path, fitted_on=ids)
  return refs


def to_unit_range(matched, brain, config) -> np.ndarray:
  """Standard-scale volume -> [-1, 1] (the IntroVAE's range); -1 outside the brain."""
  lo, hi = config.prep.hist.scale
  out = np.clip((np.asarray(matched, np.float32) - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)
  return np.where(np.asarray(brain, bool), out, -1.0).astype(np.float32)


def reference_path(prep_dir, fold: int) -> Path:
  """prep/hist_refs_fold<k>.json: fold k's references, fitted on its training patients."""
  return Path(prep_dir) / f'hist_refs_fold{int(fold)}.json'


def normal_reference_path(prep_dir, fold: Optional[int] = None) -> Path:
  """prep/hist_refs_normal.json (normal cohort) or its per-fold fallback file."""
  name = 'hist_refs_normal.json' if fold is None else f'hist_refs_normal_fold{fold}.json'
  return Path(prep_dir) / name


def normal_t1_reference(prep_dir, config, fold: Optional[int] = None) -> np.ndarray:
  """Landmarks that normal-appearance T1 slices are matched to (IntroVAE and pseudo-normal).

  With a normal cohort (prep/normal/): fitted on all its subjects (`fold` does not matter).
  Without one (fallback): fitted on fold `fold`'s training (train+val) tumor cases, never on
  its test fold.
  """
  prep_dir = Path(prep_dir)
  modality = config.dataset.normal_modality
  normal_ids = store.prepared_ids(prep_dir / store.NORMAL_DIR)
  if normal_ids:
    return load_or_fit_references(normal_reference_path(prep_dir), prep_dir / store.NORMAL_DIR,
                                  normal_ids, (modality,), config)[modality]
  if fold is None:
    raise CaseError(prep_dir / store.NORMAL_DIR, 'no prepared normal subjects: the IntroVAE '
                    "falls back to a fold's own training patients, so name the fold")
  split = folds_lib.prepared_split(prep_dir, config, fold)
  ids = split['train'] + split['val']
  return load_or_fit_references(normal_reference_path(prep_dir, fold), prep_dir / store.CASES_DIR,
                                ids, (modality,), config)[modality]
