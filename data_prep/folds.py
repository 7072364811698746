"""Seeded patient-wise k-fold cross validation, stratified by group, stored with the data.

Folds are lists of patient ids, so no slice of a patient can leak across folds. The validation
patients (model selection) are carved from the training folds, never from the test fold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_prep import store
from data_prep.case import CaseError


def make_folds(case_ids: Sequence[str], groups: Optional[Sequence[str]] = None,
               num_folds: int = 5, seed: int = 0) -> list:
  """`num_folds` disjoint sorted id lists covering every case; groups spread evenly."""
  ids = list(case_ids)
  if len(set(ids)) != len(ids):
    raise ValueError('make_folds: duplicate case ids')
  if num_folds < 2 or num_folds > len(ids):
    raise ValueError(f'make_folds: {num_folds} folds for {len(ids)} cases')
  groups = list(groups) if groups is not None else [''] * len(ids)
  if len(groups) != len(ids):
    raise ValueError('make_folds: one group per case id expected')
  rng = np.random.default_rng(seed)
  folds = [[] for _ in range(num_folds)]
  start = 0   # continue dealing where the previous group stopped: sizes differ by <= 1.
  for group in sorted(set(groups)):
    members = sorted(i for i, g in zip(ids, groups) if g == group)
    for j, idx in enumerate(rng.permutation(len(members))):
      folds[(start + j) % num_folds].append(members[idx])
    start = (start + len(members)) % num_folds
  return [sorted(f) for f in folds]


def split_for_fold(folds, k: int, val_fraction: float, seed: int) -> dict:
  """{'train', 'val', 'test'} id lists for test fold k; val drawn from the other folds."""
  if not 0 <= k < len(folds):
    raise ValueError(f'fold {k} not in [0, {len(folds)})')
  pool = sorted(i for j, f in enumerate(folds) if j != k for i in f)
  n_val = int(round(val_fraction * len(pool)))
  if val_fraction > 0 and len(pool) > 1:
    n_val = min(max(n_val, 1), len(pool) - 1)
  rng = np.random.default_rng([seed, k])
  val = set(pool[i] for i in rng.permutation(len(pool))[:n_val])
  return {'train': [i for i in pool if i not in val], 'val': sorted(val),
          'test': sorted(folds[k])}


def save_folds(path, folds, seed: int) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return store.write_text(path, json.dumps({'seed': int(seed), 'num_folds': len(folds),
                                            'folds': [list(f) for f in folds]}, indent=1))


def load_folds(path) -> dict:
  """{'seed', 'num_folds', 'folds'} as written by save_folds."""
  path = Path(path)
  try:
    record = json.loads(path.read_text())
    record['folds'] = [list(map(str, f)) for f in record['folds']]
    record['seed'] = int(record['seed'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CaseError(path, f'not a folds file ({e})') from None
  return record


def load_or_make_folds(path, case_ids, groups, config) -> list:
  """The stored folds if they match these cases, seed and fold count; else new ones, saved."""
  d = config.data
  path = Path(path)
  if path.exists():
    record = load_folds(path)
    stored = sorted(i for f in record['folds'] for i in f)
    if (record['seed'] == d.split_seed and len(record['folds']) == d.num_folds and
        stored == sorted(case_ids)):
      return record['folds']
  folds = make_folds(case_ids, groups, d.num_folds, d.split_seed)
  save_folds(path, folds, d.split_seed)
  return folds


def prepared_split(prep_dir, config, fold: int) -> dict:
  """Fold `fold`'s {'train','val','test'} ids over prep/cases, via prep/folds.json."""
  prep_dir = Path(prep_dir)
  cases_dir = prep_dir / store.CASES_DIR
  ids = store.prepared_ids(cases_dir)
  if not ids:
    raise CaseError(cases_dir, 'no prepared cases (run the prep stage first)')
  groups = []
  for i in ids:
    try:
      groups.append(json.loads((cases_dir / f'{i}.json').read_text()).get('group', ''))
    except ValueError as e:
      raise CaseError(cases_dir / f'{i}.json', f'unreadable case metadata ({e})') from None
  fold_lists = load_or_make_folds(prep_dir / store.FOLDS_FILE, ids, groups, config)
  return split_for_fold(fold_lists, fold, config.data.val_fraction, config.data.split_seed)


def stored_split(prep_dir, config, fold: int) -> dict:
  """Fold `fold`'s {'train','val','test'} ids from prep/folds.json alone (no prepared volumes
  needed: a machine that got only the shards and WORKDIR/prep's JSON files can train)."""
  path = Path(prep_dir) / store.FOLDS_FILE
  if not path.exists():
    raise CaseError(path, 'no folds file (run the prep stage first)')
  record = load_folds(path)
  d = config.data
  if record['seed'] != d.split_seed or len(record['folds']) != d.num_folds:
    raise CaseError(path, f'folds made with seed {record["seed"]} and {len(record["folds"])} '
                    f'folds; the config asks for seed {d.split_seed} and {d.num_folds} (rerun '
                    'the prep stage)')
  return split_for_fold(record['folds'], fold, d.val_fraction, d.split_seed)


# --- nnU-Net interop ---------------------------------------------------------------------------
def nnunet_splits(folds) -> list:
  """Our folds as nnU-Net's splits_final.json: one {'train', 'val'} per fold.

  nnU-Net's 'val' of fold k is our test fold k (what its cross-validation predicts and scores);
  its 'train' is every other patient (our train + val: nnU-Net selects no model on a
  validation split, it trains a fixed number of epochs). Training nnU-Net with these splits
  puts its per-fold numbers on exactly our test patients.
  """
  folds = [sorted(map(str, f)) for f in folds]
  flat = [i for f in folds for i in f]
  if len(set(flat)) != len(flat):
    raise ValueError('nnunet_splits: a patient is in more than one fold')
  return [{'train': sorted(i for j, f in enumerate(folds) if j != k for i in f), 'val': f}
          for k, f in enumerate(folds)]


def save_nnunet_splits(path, folds) -> Path:
  """Writes nnunet_splits(folds) to `path` (nnU-Net reads it from
  nnUNet_preprocessed/<Dataset>/splits_final.json)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return store.write_text(path, json.dumps(nnunet_splits(folds), indent=1))


def load_nnunet_splits(path) -> list:
  """Folds (sorted id lists) from an nnU-Net splits_final.json: fold k = its 'val' list.

  Refused unless the 'val' lists are disjoint and each fold's 'train' is exactly the other
  folds' patients, the only kind of split that maps onto our test folds.
  """
  path = Path(path)
  try:
    splits = json.loads(path.read_text())
    folds = [sorted(map(str, s['val'])) for s in splits]
    trains = [sorted(map(str, s['train'])) for s in splits]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CaseError(path, f"not an nnU-Net splits file (a list of {{'train', 'val'}}: {e})"
                    ) from None
  if len(folds) < 2:
    raise CaseError(path, f'{len(folds)} fold(s); at least 2 expected')
  flat = [i for f in folds for i in f]
  if len(set(flat)) != len(flat):
    raise CaseError(path, "a patient is in the 'val' list of more than one fold")
  for k, (train, expected) in enumerate(zip(trains, nnunet_splits(folds))):
    if train != expected['train']:
      raise CaseError(path, f"fold {k}: 'train' is not the other folds' 'val' patients "
                      '(not a k-fold split)')
  return folds
