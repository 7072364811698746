"""A prepared (MNI-space) case -> the network inputs: one place for the shards, evaluation and
new patients, so that all three feed the models exactly the same numbers.

  stored_modalities    every modality's fold-independent half of the histogram matching, as the
                       shards store it (float16), with its landmarks
  matched_modalities   the fold's histogram matching of every modality [M, Z, H, W], through
                       the stored half (so shards, evaluation and new patients agree bitwise)
  unit_t1              a T1 as the IntroVAE sees it: matched to the normal reference, [-1, 1]
  load_pseudo_normal   the pseudo_normal stage's volume of one case
  case_inputs          every slice's 2.5D stacks at once ('image', 'normal'), rounded like the
                       shards store them
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from data_prep import normalize, slices, store
from data_prep.case import CaseError

PSEUDO_NORMAL_KEY = 't1'   # the array name in WORKDIR/pseudo_normal/<id>.npz


def check_case(pc: store.PreparedCase, modalities: Sequence[str], crop_hw=None, where=None):
  """A CaseError unless `pc` has `modalities` (and the in-plane size `crop_hw`, when given)."""
  where = where or pc.case_id
  if crop_hw is not None and (pc.images.ndim != 4 or
                              tuple(pc.images.shape[2:]) != tuple(crop_hw)):
    raise CaseError(where, f'images have shape {pc.images.shape}, expected [M, Z, '
                    f'{crop_hw[0]}, {crop_hw[1]}] (was it prepared with another crop?)')
  missing = [m for m in modalities if m not in pc.modalities]
  if missing:
    raise CaseError(where, f'lacks modalities {missing} (has {pc.modalities})')
  if pc.brain.shape != pc.images.shape[1:]:
    raise CaseError(where, f'brain mask {pc.brain.shape} does not match images '
                    f'{pc.images.shape[1:]}')


def stored_modalities(pc: store.PreparedCase, modalities, config, where=None) -> tuple:
  """(float16 [M, Z, H, W], float32 [M, P]): every modality mapped linearly onto the standard
  scale by its own end landmarks (normalize.stored_scale), and its landmarks on that scale.
  Fold-independent: what the shards hold; a fold's references finish the matching."""
  where = where or pc.case_id
  check_case(pc, modalities, where=where)
  values, landmarks = [], []
  for m in modalities:
    try:
      v, lm = normalize.stored_scale(pc.modality(m), pc.brain, config)
    except ValueError as e:
      raise CaseError(where, f'{m}: {e}') from None
    values.append(v.astype(np.float16))
    landmarks.append(lm)
  return np.stack(values), np.stack(landmarks)


def finish_matching(stored, brain, landmarks, refs: Sequence[np.ndarray], where=None):
  """float32 [M, ...]: stored values [M, ...] matched to the fold's references refs[m].

  `brain` has stored[m]'s shape: a volume's mask, or a 2.5D stack's brain stack.
  """
  try:
    return np.stack([normalize.apply_stored(stored[m], brain, landmarks[m], refs[m])
                     for m in range(len(refs))])
  except ValueError as e:
    raise CaseError(where or '?', str(e)) from None


def matched_modalities(pc: store.PreparedCase, refs: Mapping[str, np.ndarray], modalities,
                       config, where=None) -> np.ndarray:
  """[M, Z, H, W]: every modality matched with the fold's references, in `modalities` order.

  Computed through the stored (float16) half, exactly as the loader matches a shard's slice."""
  where = where or pc.case_id
  check_case(pc, modalities, where=where)
  for m in modalities:
    if m not in refs:
      raise CaseError(where, f'no histogram reference for modality {m!r}')
  stored, landmarks = stored_modalities(pc, modalities, config, where)
  return finish_matching(stored, pc.brain, landmarks, [refs[m] for m in modalities], where)


def unit_t1(volume, brain, landmarks, config) -> np.ndarray:
  """[Z, H, W] in [-1, 1], -1 outside the brain: a T1 volume as the IntroVAE's training slices
  were made (matched to the normal reference `landmarks`, then scaled). Raises ValueError on
  a volume that cannot be matched (the caller names the file)."""
  return normalize.to_unit_range(normalize.apply_reference(volume, brain, landmarks, config),
                                 brain, config)


def load_pseudo_normal(path, shape, *, missing_ok: bool = False) -> Optional[np.ndarray]:
  """The pseudo-normal T1 [Z, H, W] in [-1, 1] written by the pseudo_normal stage.

  A missing file is a CaseError, or None with missing_ok.
  """
  path = Path(path)
  if not path.exists():
    if missing_ok:
      return None
    raise CaseError(path, 'no pseudo-normal T1 (run the pseudo_normal stage first)')
  try:
    with np.load(path) as z:
      t1 = z[PSEUDO_NORMAL_KEY].astype(np.float32)
  except (OSError, KeyError, ValueError) as e:
    raise CaseError(path, f'unreadable pseudo-normal volume (needs key '
                    f'{PSEUDO_NORMAL_KEY!r}): {e}') from None
  if t1.shape != tuple(shape):
    raise CaseError(path, f'pseudo-normal T1 has shape {t1.shape}, the case {tuple(shape)}')
  return t1


def as_in_shards(x) -> np.ndarray:
  """float32 rounded through float16: the shards store inputs as float16, so evaluation and new
  patients see bit-identical inputs to what training and validation saw."""
  return np.asarray(x).astype(np.float16).astype(np.float32)


def brain_slices(brain, min_fraction: float) -> np.ndarray:
  """Indices of the axial slices with at least `min_fraction` brain (those the shards hold)."""
  return np.flatnonzero(np.asarray(brain).mean(axis=(1, 2)) >= min_fraction)


def case_inputs(pc: store.PreparedCase, refs: Mapping[str, np.ndarray], config,
                pseudo_normal: Optional[np.ndarray] = None) -> dict:
  """{'image': [Z,H,W,M(2K+1)] float32, 'normal': [Z,H,W,2K+1] if the method has a normal net}.

  `image` is histogram-matched with the fold's `refs` and modality-major (config order);
  `pseudo_normal` is the case's [Z, H, W] pseudo-normal T1, required by the normal net.
  """
  k = int(config.data.k)
  images = matched_modalities(pc, refs, tuple(config.dataset.modalities), config)
  inputs = {'image': as_in_shards(slices.case_stacks(images, k))}
  if config.model.use_normal_net:
    if pseudo_normal is None:
      raise CaseError(pc.case_id, f'method {config.method!r} needs the pseudo-normal T1')
    pseudo_normal = np.asarray(pseudo_normal, np.float32)
    if pseudo_normal.shape != pc.brain.shape:
      raise CaseError(pc.case_id, f'pseudo-normal T1 has shape {pseudo_normal.shape}, the '
                      f'case {pc.brain.shape}')
    inputs['normal'] = as_in_shards(slices.case_stacks(pseudo_normal[None], k))
  return inputs
