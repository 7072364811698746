"""A prepared case -> the records of the tumour shards (TF-free, so spawned workers make them).

The tumour shards are written once per dataset and data setting, for every fold (issue 14):
a record holds the FOLD-INDEPENDENT half of the histogram matching (each modality mapped
linearly by its own end landmarks, data_prep.inputs.stored_modalities), the case's landmarks
on that scale, and the brain mask of every slice of the 2.5D stack; the loader finishes the
matching with the fold's references (clfc_jax.input_pipeline). Pseudo-normal T1s live in a
companion shard set per IntroVAE, one slice per record keyed by (patient, slice), from which
the loader assembles the 2.5D stacks (five folds of the fallback's per-fold IntroVAEs then cost
a fifth of five stacked copies).

`ordered_map` runs the per-case work in a spawn-safe process pool and hands results back in
order, a bounded number ahead, so the single TFDS writer never waits for one slow case and
memory stays bounded (one case of BraTS holds ~190 MB of stacks).
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from data_prep import inputs, labels, pools, slices, store
from data_prep.case import CaseError


def tumor_records(cases_dir, case_id: str, config) -> list:
  """[(key, features)] of one case: every slice with brain (config.data.min_brain_fraction)."""
  cases_dir = Path(cases_dir)
  where = cases_dir / f'{case_id}.npz'
  modalities = tuple(config.dataset.modalities)
  pc = store.load_prepared(cases_dir, case_id)
  inputs.check_case(pc, modalities, tuple(int(x) for x in config.prep.crop_hw), where)
  if pc.label is None:
    raise CaseError(where, 'tumor case without a label')
  stored, landmarks = inputs.stored_modalities(pc, modalities, config, where)
  k = int(config.data.k)
  try:   # raw labels go to the shards; the loader makes the training target (regions).
    tumor = labels.region_masks(pc.label, config.task.label_convention, 'wt')[..., 0]
  except ValueError as e:
    raise CaseError(where, str(e)) from None
  out = []
  for s in inputs.brain_slices(pc.brain, config.data.min_brain_fraction):
    out.append((f'{case_id}_{s:04d}', {
        'image': slices.slice_stack(stored, s, k),
        'landmarks': landmarks,
        'brain': slices.stack_25d(pc.brain, s, k),
        'label': pc.label[s].astype(np.uint8),
        'patient': case_id,
        'slice': int(s),
        'has_tumor': bool(tumor[s].any()),
    }))
  return out


def pseudo_normal_records(cases_dir, pseudo_normal_path, case_id: str, slice_ids,
                          k: int) -> list:
  """[(key, features)] of one case's pseudo-normal T1, ONE axial slice per record: every slice
  within k of the tumour shards' slices `slice_ids` (clipped to the volume), so the loader
  assembles any record's 2.5D stack exactly as slices.stack_25d would from the volume, from a
  fifth of the bytes of stored stacks. Zeros and has_pseudo_normal False where the case has no
  pseudo-normal volume."""
  with np.load(Path(cases_dir) / f'{case_id}.npz') as z:
    shape = z['brain'].shape   # only this member is decompressed.
  t1 = inputs.load_pseudo_normal(pseudo_normal_path, shape, missing_ok=True)
  lo, hi = max(0, min(slice_ids) - k), min(shape[0] - 1, max(slice_ids) + k)
  zeros = np.zeros(shape[1:], np.float16)
  return [(f'{case_id}_{s:04d}', {
      'normal': zeros if t1 is None else t1[s].astype(np.float16),
      'patient': case_id, 'slice': s, 'has_pseudo_normal': t1 is not None})
          for s in range(lo, hi + 1)]


def neighbour_records(patients, slice_ids, companion_patients, companion_slices, k: int):
  """int64 [N, 2k+1]: for each tumour record (patient, s), the companion records of slices
  s-k..s+k, clipped into that patient's companion range (which pseudo_normal_records made
  wide enough that this is clipping into the volume). ValueError names a missing slice."""
  where = {(p, int(s)): i for i, (p, s) in enumerate(zip(companion_patients, companion_slices))}
  lo, hi = {}, {}
  for p, s in zip(companion_patients, companion_slices):
    lo[p] = min(lo.get(p, s), s)
    hi[p] = max(hi.get(p, s), s)
  out = np.empty((len(patients), 2 * k + 1), np.int64)
  for i, (p, s) in enumerate(zip(patients, slice_ids)):
    if p not in lo:
      raise ValueError(f'no pseudo-normal slices of patient {p!r}')
    for j, o in enumerate(range(-k, k + 1)):
      key = (p, int(min(max(int(s) + o, lo[p]), hi[p])))
      if key not in where:
        raise ValueError(f'no pseudo-normal slice {key[1]} of patient {p!r}')
      out[i, j] = where[key]
  return out


def default_workers(requested: int) -> int:
  """config.prep.shard_workers: 0 = one per core but one (the writer's)."""
  return int(requested) if int(requested) > 0 else max(1, (os.cpu_count() or 2) - 1)


def ordered_map(fn: Callable, items: Iterable, workers: int,
                ahead: Optional[int] = None) -> Iterator:
  """fn(item) for each item, in order; `workers` spawned processes (<= 1: in this process),
  at most `ahead` (default 2 x workers) results computed before they are consumed."""
  items = list(items)
  if workers <= 1 or len(items) <= 1:
    yield from map(fn, items)
    return
  ahead = ahead or 2 * workers
  with pools.spawn_pool(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
