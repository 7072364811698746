"""TFDS builders: 2.5D tumor slices per fold, and normal T1 slices for the IntroVAE.

Both read prepared (MNI-space) cases from a prep folder (WORKDIR/prep) and write TFRecord
shards under data_dir (WORKDIR/tfds), in process (no Beam). Examples are written in generation
order (patient by patient, slice by slice; `disable_shuffling`), so shards are deterministic and
evaluation reads slices in order; training draws them at random (clfc_jax/input_pipeline.py,
which reads the shards without TensorFlow). Large tensors are zlib-encoded
(the masked background compresses to almost nothing) and images are stored as float16.

The dataset a builder writes is named by everything that changes its content (see
data_prep/shards.py, which computes the names without TensorFlow for the readers), so a build
with pseudo-normal stacks is a different dataset from one without and adding them later only
rebuilds shards, not the registration.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from absl import logging
import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from data_prep import folds as folds_lib
from data_prep import inputs, labels, normalize, prepare, readers, shards, slices, store
from data_prep.case import CaseError

_ZLIB = tfds.features.Encoding.ZLIB

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
These builders read prepared (MNI-space) cases from WORKDIR/prep, written by the `prep` stage
(`python -m clfc_jax.main --stages=prep`). To let the builder prepare them itself, pass the
cohort folder as the manual dir (`download_config=tfds.download.DownloadConfig(manual_dir=...)`):
  TumorSlices:    the tumor cohort in config.dataset.layout, e.g. BraTS 2019
                  ([HGG|LGG]/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz; registration required
                  at https://www.med.upenn.edu/cbica/brats2019/), or MSD Task01_BrainTumour
                  (imagesTr/, labelsTr/; http://medicaldecathlon.com).
  NormalT1Slices: IXI T1 images (IXI<nnn>-<site>-<nnnn>-T1.nii.gz,
                  https://brain-development.org/ixi-dataset/).
"""


def _manual_cohort(dl_manager) -> Optional[Path]:
  """The manual dir if the user gave a non-empty one, else None."""
  try:
    return Path(dl_manager.manual_dir)
  except (AssertionError, ValueError):
    return None


class TumorSlices(tfds.core.GeneratorBasedBuilder):
  """Every brain-containing axial slice of every patient, as 2.5D stacks, split by fold."""

  VERSION = tfds.core.Version(shards.VERSION)
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, app_config, fold: int, with_pseudo_normal: bool,
               prep_dir=None, pseudo_normal_dir=None, **kwargs):
    """`app_config`: the project config; prep_dir / pseudo_normal_dir needed only to build."""
    c = app_config
    self._app_config = c
    self._fold = int(fold)
    self._k = int(c.data.k)
    self._crop_hw = tuple(int(x) for x in c.prep.crop_hw)
    self._modalities = tuple(c.dataset.modalities)
    self._with_pseudo_normal = bool(with_pseudo_normal)
    self._prep_dir = Path(prep_dir) if prep_dir else None
    self._pseudo_normal_dir = Path(pseudo_normal_dir) if pseudo_normal_dir else None
    h, w = self._crop_hw
    settings = shards.tumor_settings(c)
    builder_config = tfds.core.BuilderConfig(
        name=shards.tumor_config_name(c, self._fold, self._with_pseudo_normal),
        version=self.VERSION,
        description=f'test fold {self._fold}, K={self._k}, {h}x{w}, modalities '
                    f'{",".join(self._modalities)}, pseudo-normal={self._with_pseudo_normal}; '
                    f'settings {json.dumps(settings, sort_keys=True)}')
    super().__init__(config=builder_config, **kwargs)

  def _info(self):
    h, w = self._crop_hw
    n = 2 * self._k + 1
    return tfds.core.DatasetInfo(
        builder=self,
        description='2.5D axial slices of MNI-aligned, histogram-matched tumor cases (CLFC).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(h, w, len(self._modalities) * n),
                                          dtype=np.float16, encoding=_ZLIB),
            'normal': tfds.features.Tensor(shape=(h, w, n), dtype=np.float16, encoding=_ZLIB),
            'has_pseudo_normal': tfds.features.Scalar(dtype=np.bool_),
            'label': tfds.features.Tensor(shape=(h, w), dtype=np.uint8, encoding=_ZLIB),
            'brain': tfds.features.Tensor(shape=(h, w), dtype=np.bool_, encoding=_ZLIB),
            'patient': tfds.features.Text(),
            'slice': tfds.features.Scalar(dtype=np.int32),
            'has_tumor': tfds.features.Scalar(dtype=np.bool_),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    c = self._app_config
    if self._prep_dir is None:
      raise ValueError('TumorSlices: pass prep_dir to build the dataset')
    cases_dir = self._prep_dir / store.CASES_DIR
    manual = _manual_cohort(dl_manager)
    if manual is not None:   # resumable: prepares what prep/cases lacks.
      c = c.copy_and_resolve_references()
      with c.unlocked():
        c.dataset.root = str(manual)
      prepare.prepare_cohort(readers.find_cases(c), c, cases_dir)
    if not store.prepared_ids(cases_dir):
      raise CaseError(cases_dir, 'no prepared cases and no manual_dir:\n' +
                      MANUAL_DOWNLOAD_INSTRUCTIONS)
    split = folds_lib.prepared_split(self._prep_dir, c, self._fold)
    refs = normalize.load_or_fit_references(
        normalize.reference_path(self._prep_dir, self._fold), cases_dir,
        split['train'] + split['val'], self._modalities, c)
    return {name: self._generate_examples(ids, refs) for name, ids in split.items() if ids}

  def _generate_examples(self, case_ids, refs):
    for case_id in case_ids:
      yield from self._case_examples(case_id, refs)

  def _pseudo_normal(self, case_id, shape):
    if not self._with_pseudo_normal or self._pseudo_normal_dir is None:
      return None
    path = self._pseudo_normal_dir / f'{case_id}.npz'
    t1 = inputs.load_pseudo_normal(path, shape, missing_ok=True)
    if t1 is None:
      logging.warning('no pseudo-normal T1 for %s (%s): zeros, has_pseudo_normal=False',
                      case_id, path)
    return t1

  def _case_examples(self, case_id, refs):
    c = self._app_config
    cases_dir = self._prep_dir / store.CASES_DIR
    where = cases_dir / f'{case_id}.npz'
    pc = store.load_prepared(cases_dir, case_id)
    inputs.check_case(pc, self._modalities, self._crop_hw, where)
    if pc.label is None:
      raise CaseError(where, 'tumor case without a label')
    matched = inputs.matched_modalities(pc, refs, self._modalities, c, where)
    try:   # raw labels go to the shards; the loader makes the training target (regions).
      tumor = labels.region_masks(pc.label, c.task.label_convention, 'wt')[..., 0]
    except ValueError as e:
      raise CaseError(where, str(e)) from None
    pseudo = self._pseudo_normal(case_id, pc.brain.shape)
    zeros = np.zeros(self._crop_hw + (2 * self._k + 1,), np.float16)
    for s in inputs.brain_slices(pc.brain, c.data.min_brain_fraction):
      yield f'{case_id}_{s:04d}', {
          'image': slices.slice_stack(matched, s, self._k).astype(np.float16),
          'normal': (zeros if pseudo is None else
                     slices.stack_25d(pseudo, s, self._k).astype(np.float16)),
          'has_pseudo_normal': pseudo is not None,
          'label': pc.label[s].astype(np.uint8),
          'brain': pc.brain[s],
          'patient': case_id,
          'slice': int(s),
          'has_tumor': bool(tumor[s].any()),
      }


class NormalT1Slices(tfds.core.GeneratorBasedBuilder):
  """Axial normal-appearance T1 slices in [-1, 1] for the IntroVAE ([H, W, 1]).

  source='normal': the normal cohort (prep/normal), matched to its own reference.
  source='fallback': fold `fold`'s training tumor cases, slices with no tumor within
  config.data.tumor_free_margin slices (used when there is no normal cohort).
  """

  VERSION = tfds.core.Version(shards.VERSION)
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, app_config, source: str = 'normal', fold: int = 0, prep_dir=None,
               **kwargs):
    c = app_config
    self._app_config = c
    self._source = source
    self._fold = int(fold)
    self._crop_hw = tuple(int(x) for x in c.prep.crop_hw)
    self._modality = c.dataset.normal_modality
    self._prep_dir = Path(prep_dir) if prep_dir else None
    h, w = self._crop_hw
    settings = shards.normal_settings(c, source)   # checks `source`.
    builder_config = tfds.core.BuilderConfig(
        name=shards.normal_config_name(c, source, self._fold), version=self.VERSION,
        description=f'{source} {self._modality} slices, {h}x{w}; settings '
                    f'{json.dumps(settings, sort_keys=True)}')
    super().__init__(config=builder_config, **kwargs)

  def _info(self):
    h, w = self._crop_hw
    return tfds.core.DatasetInfo(
        builder=self,
        description='Axial normal-appearance T1 slices, histogram-matched, in [-1, 1].',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(h, w, 1), dtype=np.float16, encoding=_ZLIB),
            'patient': tfds.features.Text(),
            'slice': tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    c = self._app_config
    if self._prep_dir is None:
      raise ValueError('NormalT1Slices: pass prep_dir to build the dataset')
    if self._source == 'normal':
      normal_dir = self._prep_dir / store.NORMAL_DIR
      manual = _manual_cohort(dl_manager)
      if manual is not None:
        prepare.prepare_cohort(readers.find_normal_cases(manual, self._modality), c, normal_dir)
      ids = store.prepared_ids(normal_dir)
      if not ids:
        raise CaseError(normal_dir, 'no prepared normal subjects and no manual_dir:\n' +
                        MANUAL_DOWNLOAD_INSTRUCTIONS)
      source_dir, margin = normal_dir, None
    else:
      logging.warning('NormalT1Slices: no normal cohort; FALLBACK to tumor-free T1 slices of '
                      "fold %d's training cases (>= %d slices from any tumor voxel)",
                      self._fold, c.data.tumor_free_margin)
      split = folds_lib.prepared_split(self._prep_dir, c, self._fold)
      ids = split['train'] + split['val']
      source_dir, margin = self._prep_dir / store.CASES_DIR, int(c.data.tumor_free_margin)
    landmarks = normalize.normal_t1_reference(self._prep_dir, c, self._fold)
    return {'train': self._generate_examples(source_dir, ids, landmarks, margin)}

  def _generate_examples(self, source_dir, case_ids, landmarks, margin):
    c = self._app_config
    for case_id in case_ids:
      pc = store.load_prepared(source_dir, case_id)
      where = source_dir / f'{case_id}.npz'
      inputs.check_case(pc, (self._modality,), self._crop_hw, where)
      try:
        unit = inputs.unit_t1(pc.modality(self._modality), pc.brain, landmarks, c)
      except ValueError as e:
        raise CaseError(where, f'{self._modality}: {e}') from None
      keep = np.zeros(pc.brain.shape[0], bool)
      keep[inputs.brain_slices(pc.brain, c.data.min_brain_fraction)] = True
      if margin is not None:
        if pc.label is None:
          raise CaseError(where, 'tumor case without a label')
        tumor_slices = pc.label.reshape(len(keep), -1).any(axis=1).astype(np.uint8)
        near = ndimage.maximum_filter1d(tumor_slices, 2 * margin + 1, mode='constant')
        keep &= near == 0
      for s in np.flatnonzero(keep):
        yield f'{case_id}_{s:04d}', {'image': unit[s, :, :, None].astype(np.float16),
                                     'patient': case_id, 'slice': int(s)}


def tumor_slices_builder(config, data_dir, fold: int, *, with_pseudo_normal: bool,
                         prep_dir=None, pseudo_normal_dir=None) -> TumorSlices:
  """The fold's builder; prep_dir / pseudo_normal_dir default to data_dir's WORKDIR siblings."""
  return TumorSlices(app_config=config, fold=fold, with_pseudo_normal=with_pseudo_normal,
                     prep_dir=prep_dir or shards.default_dir(data_dir, 'prep'),
                     pseudo_normal_dir=(pseudo_normal_dir or
                                        shards.default_dir(data_dir, 'pseudo_normal')),
                     data_dir=str(data_dir))


def normal_t1_builder(config, data_dir, *, fold: int = 0, prep_dir=None,
                      source: Optional[str] = None) -> NormalT1Slices:
  """The IntroVAE's slices: the normal cohort if there is one, else fold `fold`'s fallback."""
  source = source or shards.normal_source(config, data_dir, prep_dir)
  return NormalT1Slices(app_config=config, source=source, fold=fold,
                        prep_dir=prep_dir or shards.default_dir(data_dir, 'prep'),
                        data_dir=str(data_dir))


def build(builder, manual_dir=None):
  """Writes the builder's shards (in process) unless they exist; returns the builder."""
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir and str(manual_dir), try_download_gcs=False))
  return builder
