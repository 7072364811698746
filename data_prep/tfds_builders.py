"""TFDS builders: 2.5D tumor slices (one set for every fold), each IntroVAE's pseudo-normal
stacks beside them, and normal T1 slices for the IntroVAE.

They read prepared (MNI-space) cases from a prep folder (WORKDIR/prep) and write TFRecord
shards under data_dir (WORKDIR/tfds); the per-case work runs in config.prep.shard_workers
spawned processes (data_prep/examples.py) and one TFDS writer encodes in order (no Beam).
Examples are written in generation order (patient by patient, slice by slice;
`disable_shuffling`), so shards are deterministic and evaluation reads slices in order;
training draws them at random (clfc_jax/input_pipeline.py, which reads the shards without
TensorFlow). Large tensors are zlib-encoded (the masked background compresses to almost
nothing) and images are stored as float16.

The tumor slices hold the fold-independent half of the histogram matching (data_prep/
examples.py): the loader applies a fold's references, so five folds share one shard set and
the fold's split picks its patients at read time. Dataset names (data_prep/shards.py, computed
without TensorFlow for the readers) carry everything that changes the content.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

from absl import logging
import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from data_prep import folds as folds_lib
from data_prep import examples, inputs, normalize, prepare, readers, shards, store, tfrecord
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
  """Every brain-containing axial slice of every tumour patient, as 2.5D stacks of the
  fold-independent intensities, in one split 'all' (folds select patients when reading)."""

  VERSION = tfds.core.Version(shards.VERSION)
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, app_config, prep_dir=None, **kwargs):
    """`app_config`: the project config; prep_dir needed only to build."""
    c = app_config
    self._app_config = c
    self._k = int(c.data.k)
    self._crop_hw = shards.crop_hw(c)
    self._modalities = tuple(c.dataset.modalities)
    self._prep_dir = Path(prep_dir) if prep_dir else None
    h, w = self._crop_hw
    builder_config = tfds.core.BuilderConfig(
        name=shards.tumor_config_name(c), version=self.VERSION,
        description=f'every fold, K={self._k}, {h}x{w}, modalities '
                    f'{",".join(self._modalities)}; settings '
                    f'{json.dumps(shards.tumor_settings(c), sort_keys=True)}')
    super().__init__(config=builder_config, **kwargs)

  def _info(self):
    h, w = self._crop_hw
    n = 2 * self._k + 1
    m = len(self._modalities)
    percentiles = len(self._app_config.prep.hist.percentiles)
    return tfds.core.DatasetInfo(
        builder=self,
        description='2.5D axial slices of MNI-aligned tumor cases; each modality linearly '
                    'standardised by its own end landmarks (a fold\'s references finish the '
                    'histogram matching when read).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(h, w, m * n), dtype=np.float16,
                                          encoding=_ZLIB),
            'landmarks': tfds.features.Tensor(shape=(m, percentiles), dtype=np.float32),
            'brain': tfds.features.Tensor(shape=(h, w, n), dtype=np.bool_, encoding=_ZLIB),
            'label': tfds.features.Tensor(shape=(h, w), dtype=np.uint8, encoding=_ZLIB),
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
    ids = store.prepared_ids(cases_dir)
    if not ids:
      raise CaseError(cases_dir, 'no prepared cases and no manual_dir:\n' +
                      MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {shards.ALL_SPLIT: self._generate_examples(cases_dir, ids)}

  def _generate_examples(self, cases_dir, case_ids):
    make = functools.partial(examples.tumor_records, cases_dir, config=self._app_config)
    workers = examples.default_workers(self._app_config.prep.get('shard_workers', 0))
    for records in examples.ordered_map(make, case_ids, workers):
      yield from records


class PseudoNormalSlices(tfds.core.GeneratorBasedBuilder):
  """One IntroVAE's pseudo-normal T1 slices [H, W] beside TumorSlices: per patient, every slice
  within K of its tumour-shard slices, keyed by (patient, slice); the loader stacks them.
  Adding them rewrites no image."""

  VERSION = tfds.core.Version(shards.VERSION)
  RELEASE_NOTES = {'1.0.0': 'First version.'}

  def __init__(self, *, app_config, key: Optional[int], prep_dir=None, pseudo_normal_dir=None,
               **kwargs):
    """key: the IntroVAE (None: the normal cohort's; k: fold k's); the dirs only to build."""
    c = app_config
    self._app_config = c
    self._key = key
    self._k = int(c.data.k)
    self._crop_hw = shards.crop_hw(c)
    self._prep_dir = Path(prep_dir) if prep_dir else None
    self._pseudo_normal_dir = Path(pseudo_normal_dir) if pseudo_normal_dir else None
    self._data_root = Path(kwargs['data_dir'])
    builder_config = tfds.core.BuilderConfig(
        name=shards.pseudo_normal_config_name(c, key), version=self.VERSION,
        description=f'pseudo-normal stacks of IntroVAE {shards.key_name(key)} beside tumor '
                    f'slices {shards.tumor_config_name(c)}')
    super().__init__(config=builder_config, **kwargs)

  def _info(self):
    h, w = self._crop_hw
    return tfds.core.DatasetInfo(
        builder=self,
        description='Pseudo-normal T1 axial slices in [-1, 1], keyed by patient and slice.',
        features=tfds.features.FeaturesDict({
            'normal': tfds.features.Tensor(shape=(h, w), dtype=np.float16, encoding=_ZLIB),
            'has_pseudo_normal': tfds.features.Scalar(dtype=np.bool_),
            'patient': tfds.features.Text(),
            'slice': tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._prep_dir is None or self._pseudo_normal_dir is None:
      raise ValueError('PseudoNormalSlices: pass prep_dir and pseudo_normal_dir to build')
    tumor = shards.tumor_dir(self._app_config, self._data_root)
    if not shards.is_built(tumor):
      raise CaseError(tumor, 'build the tumor slices before their pseudo-normal companion')
    source = tfrecord.ShardSource(tumor, shards.ALL_SPLIT)
    per_case = {}   # patient -> its slices, in record order (patients are contiguous).
    for patient, s in zip(source.column('patient'), source.column('slice')):
      per_case.setdefault(bytes(patient).decode(), []).append(int(s))
    return {shards.ALL_SPLIT: self._generate_examples(per_case)}

  def _generate_examples(self, per_case):
    cases_dir = self._prep_dir / store.CASES_DIR
    for case_id, slice_ids in per_case.items():
      path = self._pseudo_normal_dir / f'{case_id}.npz'
      records = examples.pseudo_normal_records(cases_dir, path, case_id, slice_ids, self._k)
      if not records[0][1]['has_pseudo_normal']:
        logging.warning('no pseudo-normal T1 for %s (%s): zeros, has_pseudo_normal=False',
                        case_id, path)
      yield from records


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


def tumor_slices_builder(config, data_dir, *, prep_dir=None) -> TumorSlices:
  """Every fold's tumor slices; prep_dir defaults to data_dir's WORKDIR sibling."""
  return TumorSlices(app_config=config, prep_dir=prep_dir or shards.default_dir(data_dir, 'prep'),
                     data_dir=str(data_dir))


def pseudo_normal_builder(config, data_dir, key: Optional[int], *, prep_dir=None,
                          pseudo_normal_dir=None) -> PseudoNormalSlices:
  """IntroVAE `key`'s pseudo-normal stacks; the dirs default to data_dir's WORKDIR siblings
  (WORKDIR/pseudo_normal[/fold<k>])."""
  if pseudo_normal_dir is None:
    pseudo_normal_dir = shards.default_dir(data_dir, 'pseudo_normal')
    if key is not None:
      pseudo_normal_dir = pseudo_normal_dir / f'fold{int(key)}'
  return PseudoNormalSlices(app_config=config, key=key,
                            prep_dir=prep_dir or shards.default_dir(data_dir, 'prep'),
                            pseudo_normal_dir=pseudo_normal_dir, data_dir=str(data_dir))


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
