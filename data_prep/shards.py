"""Where the TFDS shards of a config live, computed without TensorFlow.

TFDS lays a dataset out as data_dir/<builder name>/<config name>/<version>. The readers
(clfc_jax.input_pipeline) run where TensorFlow is absent, so they cannot instantiate a builder
to ask; the builders (tfds_builders.py) take their names from here instead, so writer and
reader can never disagree (tests/test_shards.py checks both against TFDS itself).

A dataset is named by everything that changes its content. The tumour slices are one dataset
for every fold (K, crop, modalities and a hash of the histogram / slice settings; the fold's
histogram references are applied when a slice is read), and each IntroVAE's pseudo-normal
stacks are a companion dataset named after it and its IntroVAE (the normal cohort's, or a
fold's in the fallback).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from data_prep import normalize, store

TUMOR_DATASET = 'tumor_slices'        # TFDS's snake_case of the builder class TumorSlices.
PSEUDO_NORMAL_DATASET = 'pseudo_normal_slices'   # ... of PseudoNormalSlices.
ALL_SPLIT = 'cohort'                  # the tumour datasets' one split: folds select patients.
NORMAL_DATASET = 'normal_t1_slices'   # ... and of NormalT1Slices.
VERSION = '1.0.0'
NORMAL_SOURCES = ('normal', 'fallback')


def fingerprint(values: dict) -> str:
  return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def hist_settings(config) -> dict:
  h = config.prep.hist
  return {'percentiles': list(h.percentiles), 'scale': list(h.scale),
          'min_brain': float(config.data.min_brain_fraction), 'dataset': config.dataset.name,
          'spacing': float(config.prep.spacing)}


def fold_settings(config) -> dict:
  d = config.data
  return {'num_folds': int(d.num_folds), 'val_fraction': float(d.val_fraction),
          'split_seed': int(d.split_seed)}


def crop_hw(config) -> tuple:
  return tuple(int(x) for x in config.prep.crop_hw)


def tumor_settings(config) -> dict:
  """What the TumorSlices dataset's content depends on beyond K, crop and modalities."""
  return dict(hist_settings(config), modalities=list(config.dataset.modalities),
              label_convention=config.task.label_convention)   # labels are stored raw.


def tumor_config_name(config) -> str:
  h, w = crop_hw(config)
  return f'k{int(config.data.k)}_{h}x{w}_{fingerprint(tumor_settings(config))}'


def key_name(key: Optional[int]) -> str:
  """An IntroVAE's name: 'normal_cohort' (one for all folds) or 'fold<k>' (the fallback)."""
  return 'normal_cohort' if key is None else f'fold{int(key)}'


def pseudo_normal_config_name(config, key: Optional[int]) -> str:
  settings = dict(tumor_settings(config), normal_modality=config.dataset.normal_modality)
  h, w = crop_hw(config)
  return f'{key_name(key)}_k{int(config.data.k)}_{h}x{w}_{fingerprint(settings)}'


def normal_settings(config, source: str) -> dict:
  """What a NormalT1Slices dataset's content depends on beyond its source, modality and crop."""
  if source not in NORMAL_SOURCES:
    raise ValueError(f'source must be one of {NORMAL_SOURCES}, not {source!r}')
  settings = hist_settings(config)
  if source == 'fallback':
    settings.update(fold_settings(config), margin=int(config.data.tumor_free_margin))
  return settings


def normal_config_name(config, source: str, fold: int = 0) -> str:
  """The fold matters only for the fallback (the fold's training cases)."""
  settings = normal_settings(config, source)
  h, w = crop_hw(config)
  where = 'normal' if source == 'normal' else f'fallback_fold{int(fold)}'
  return f'{where}_{config.dataset.normal_modality}_{h}x{w}_{fingerprint(settings)}'


def tumor_dir(config, data_dir) -> Path:
  """The TumorSlices version directory (holding dataset_info.json): every fold's slices."""
  return Path(data_dir) / TUMOR_DATASET / tumor_config_name(config) / VERSION


def pseudo_normal_dir(config, data_dir, key: Optional[int]) -> Path:
  """The PseudoNormalSlices version directory of IntroVAE `key` (see key_name)."""
  return (Path(data_dir) / PSEUDO_NORMAL_DATASET / pseudo_normal_config_name(config, key)
          / VERSION)


def has_normal_cohort(prep_dir) -> bool:
  """Whether a normal cohort was prepared (its reference or its subjects are in prep_dir)."""
  prep_dir = Path(prep_dir)
  return (normalize.normal_reference_path(prep_dir).exists() or
          bool(store.prepared_ids(prep_dir / store.NORMAL_DIR)))


def introvae_key(prep_dir, fold: int) -> Optional[int]:
  """Which IntroVAE serves fold `fold`: None (the normal cohort's) or the fold's own."""
  return None if has_normal_cohort(prep_dir) else int(fold)


def normal_dir(config, data_dir, *, source: str, fold: int = 0) -> Path:
  """The NormalT1Slices version directory of a source ('normal' or 'fallback')."""
  return Path(data_dir) / NORMAL_DATASET / normal_config_name(config, source, fold) / VERSION


def is_built(dataset_dir) -> bool:
  """Whether a version directory holds a finished build (TFDS writes both JSON files last,
  after the shards, and renames the directory into place)."""
  d = Path(dataset_dir)
  return (d / 'dataset_info.json').is_file() and (d / 'features.json').is_file()


def default_dir(data_dir, name: str) -> Path:
  """A sibling of data_dir in WORKDIR (prep, pseudo_normal)."""
  return Path(data_dir).parent / name


def normal_source(config, data_dir, prep_dir=None) -> str:
  """'normal' when a normal cohort is prepared (or its slices are built), else 'fallback'."""
  prep_dir = Path(prep_dir) if prep_dir else default_dir(data_dir, 'prep')
  if store.prepared_ids(prep_dir / store.NORMAL_DIR):
    return 'normal'
  return 'normal' if is_built(normal_dir(config, data_dir, source='normal')) else 'fallback'


def normal_slices_dir(config, data_dir, *, fold: int = 0, prep_dir=None,
                      source: Optional[str] = None) -> Path:
  """The IntroVAE's slices: the normal cohort's if there is one, else fold `fold`'s fallback."""
  source = source or normal_source(config, data_dir, prep_dir)
  return normal_dir(config, data_dir, source=source, fold=fold)
