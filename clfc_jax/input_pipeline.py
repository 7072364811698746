"""The TFDS shards -> host-local numpy batches, without TensorFlow (grain over random access).

The shards are read record by record through data_prep.tfrecord.ShardSource, so training runs
on an accelerator machine that has JAX but not TensorFlow. Batches follow ARCHITECTURE.md's
contract: image float32 [B,H,W,M(2K+1)], normal float32 [B,H,W,2K+1] (only when
config.model.use_normal_net), label int32 [B,H,W] (the nested region level of the raw label:
the binary WT map for task.regions 'wt', 0..3 for 'wt_tc_et'; see label_lut), brain bool
[B,H,W], patient bytes [B], slice int32 [B]; B is the process-local batch (global /
process_count), ready for jax.make_array_from_process_local_data.

Training sampling (the method's, nnU-Net's): sample j of the GLOBAL batch at step t is a pure
function of (seed, t, j). Its Generator draws a patient uniformly, then one of that patient's
slices uniformly, so every training patient is seen at the same rate whatever its number of
slices; tumor_slots(global batch) slots, spread over the batch, draw among the patients with
tumor slices and then among their tumor slices, so the tumor share holds for the global batch
on any number of hosts. The same Generator then drives data_prep.augment. Process p computes
only its contiguous part of the global batch, and no result depends on how many threads or
worker processes compute it.

Resume: the trainers build one iterator per epoch, seeded with run_log.epoch_seed(seed,
epoch), and checkpoint at epoch ends, so the iterator state IS the epoch number that the
checkpoint's `extra` holds; a resumed run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Iterator, Optional

from absl import flags
import grain
import jax
import numpy as np

from data_prep import augment
from data_prep import labels
from data_prep import shards
from data_prep import tfrecord

_ENDLESS = sys.maxsize // 2   # samples of an endless stream (grain's datasets have a length).


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} not divisible by {process_count} processes')
  return global_batch // process_count


def tumor_dataset_dir(config, data_dir, fold, with_pseudo_normal=None):
  """(the prepared TumorSlices version directory to read, whether batches carry `normal`).

  Networks with a normal-appearance branch need the pseudo-normal dataset; baseline1 reads
  whichever is prepared (pseudo-normal first).
  """
  use_normal = (bool(config.model.use_normal_net) if with_pseudo_normal is None
                else bool(with_pseudo_normal))
  tried = []
  for pn in ((True,) if use_normal else (True, False)):
    directory = shards.tumor_dir(config, data_dir, fold, with_pseudo_normal=pn)
    if shards.is_built(directory):
      return directory, use_normal
    tried.append(str(directory))
  raise FileNotFoundError(f'{data_dir}: no TFDS shards for fold {fold} (looked for {tried}); '
                          'build them first (prep / pseudo_normal stage)')


def num_examples(config, data_dir, fold, split, with_pseudo_normal=None) -> int:
  """Examples of a split, from dataset_info.json (tfrecord.DatasetError if it has none)."""
  directory, _ = tumor_dataset_dir(config, data_dir, fold, with_pseudo_normal)
  return int(sum(tfrecord.split_files(directory, split)[1]))


def _normal_dir(config, data_dir, fold) -> Path:
  directory = shards.normal_slices_dir(config, data_dir, fold=fold)
  if not shards.is_built(directory):
    raise FileNotFoundError(f'{directory}: normal T1 slices not built yet (prep stage)')
  return directory


def num_normal_slices(config, data_dir, fold=0) -> int:
  return int(sum(tfrecord.split_files(_normal_dir(config, data_dir, fold), 'train')[1]))


# --- sampling ----------------------------------------------------------------------------------

def tumor_slots(global_batch: int, tumor_fraction: float) -> int:
  """How many samples of a GLOBAL batch are drawn from tumor slices (nnU-Net's rounding:
  1 of 4, 2 of 6, 3 of 8)."""
  return global_batch - int(round(global_batch * (1.0 - tumor_fraction)))


def tumor_positions(global_batch: int, tumor_fraction: float) -> np.ndarray:
  """bool [global batch]: the tumor slots, spread evenly (slot floor(i B / n) for i < n), so
  processes holding contiguous parts of the batch share them as evenly as they can."""
  n = tumor_slots(global_batch, tumor_fraction)
  mask = np.zeros(global_batch, bool)
  mask[[i * global_batch // n for i in range(n)]] = True
  return mask


def sample_rng(seed: int, step: int, slot: int) -> np.random.Generator:
  """The Generator of slot `slot` of the global batch at `step`: draws the sample, then its
  augmentation."""
  return np.random.default_rng([int(seed), int(step), int(slot)])


class PatientSampler:
  """Record indices grouped by patient: draws a patient uniformly, then one of its records."""

  def __init__(self, patients: np.ndarray, keep: Optional[np.ndarray] = None):
    """patients: the patient of every record (a ShardSource column); keep: bool mask of the
    records that may be drawn (e.g. tumor slices)."""
    index = np.arange(len(patients)) if keep is None else np.flatnonzero(keep)
    names, group, counts = np.unique(patients[index], return_inverse=True, return_counts=True)
    self.patients = names                                    # sorted: order-independent.
    self.records = index[np.argsort(group, kind='stable')]   # patient by patient, in file order.
    self.counts = counts.astype(np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

  def __len__(self) -> int:
    return len(self.patients)

  def draw(self, rng: np.random.Generator) -> int:
    p = rng.integers(len(self.counts))
    return int(self.records[self.starts[p] + rng.integers(self.counts[p])])


def label_lut(config) -> np.ndarray:
  """Raw shard label -> training target (labels.level_lut of config.task): for 'wt' the binary
  WT map, for 'wt_tc_et' the nested level 0..3 (region r is level > r)."""
  return labels.level_lut(config.task.label_convention, labels.region_names(config))


def _cast(ex: dict, use_normal: bool, lut: np.ndarray) -> dict:
  """A decoded example in the batch contract's dtypes (float16 / uint8 on disk); the raw
  label becomes its training target through `lut` (label_lut)."""
  label = lut[ex['label']]
  if (label == 255).any():
    bad = sorted(set(np.unique(ex['label'][label == 255]).tolist()))
    raise ValueError(f'shard example {bytes(ex["patient"]).decode()} slice {int(ex["slice"])}: '
                     f'label values {bad} are not in the label convention')
  out = {'image': ex['image'].astype(np.float32), 'label': label.astype(np.int32),
         'brain': ex['brain'].astype(bool), 'patient': bytes(ex['patient']),
         'slice': np.int32(ex['slice'])}
  if use_normal:
    out['normal'] = ex['normal'].astype(np.float32)
  return out


def stack_examples(examples) -> dict:
  """grain batch_fn: arrays stacked, bytes as an object array (as tfds.as_numpy gives them)."""
  out = {}
  for key, first in examples[0].items():
    if isinstance(first, bytes):
      column = np.empty(len(examples), object)
      column[:] = [ex[key] for ex in examples]
      out[key] = column
    else:
      out[key] = np.stack([ex[key] for ex in examples])
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainSample:
  """Local sample i -> the augmented example of its (step, global slot). Picklable, so grain
  worker processes can run it."""
  source: tfrecord.ShardSource
  everything: PatientSampler
  tumor: PatientSampler
  is_tumor_slot: np.ndarray   # bool [global batch]
  first_slot: int             # this process's first slot of the global batch
  local_batch: int
  seed: int
  use_normal: bool
  aug: types.SimpleNamespace
  k: int
  normal_index: int
  lut: np.ndarray

  def __call__(self, i: int) -> dict:
    step, r = divmod(int(i), self.local_batch)
    slot = self.first_slot + r
    rng = sample_rng(self.seed, step, slot)
    index = (self.tumor if self.is_tumor_slot[slot] else self.everything).draw(rng)
    ex = _cast(self.source[index], self.use_normal, self.lut)
    return augment.augment_example(ex, rng, self.aug, self.k, normal_index=self.normal_index)


@dataclasses.dataclass(frozen=True, eq=False)
class _NormalSample:
  """Local sample i -> one normal T1 slice {'image': float32 [H, W, 1]}."""
  source: tfrecord.ShardSource
  sampler: PatientSampler
  first_slot: int
  local_batch: int
  seed: int

  def __call__(self, i: int) -> dict:
    step, r = divmod(int(i), self.local_batch)
    index = self.sampler.draw(sample_rng(self.seed, step, self.first_slot + r))
    return {'image': self.source[index]['image'].astype(np.float32)}


@dataclasses.dataclass(frozen=True, eq=False)
class _Read:
  """Record i, cast (evaluation: no sampling, no augmentation)."""
  source: tfrecord.ShardSource
  use_normal: bool
  lut: np.ndarray

  def __call__(self, i: int) -> dict:
    return _cast(self.source[int(i)], self.use_normal, self.lut)


def _batches(dataset: grain.MapDataset, batch: int, config, *,
             drop_remainder: bool) -> Iterator[dict]:
  """`dataset` batched, as a generator whose close() stops grain's threads and processes:
  read_threads threads (in each of read_workers spawned processes, if any) prepare
  read_prefetch batches ahead."""
  d = config.data
  workers = int(d.read_workers)
  ds = dataset.batch(batch, drop_remainder=drop_remainder, batch_fn=stack_examples)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(d.read_threads),
                                            prefetch_buffer_size=int(d.read_prefetch)))
  if workers > 0:   # grain spawns them: no fork of a process running JAX.
    if not flags.FLAGS.is_parsed():   # grain's workers read its absl flags (defaults here).
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(d.read_prefetch)))
  it = iter(ds)
  try:
    for b in it:
      # Workers hand batches over in shared memory: copied out, so it is freed at once.
      yield {k: np.array(v) for k, v in b.items()} if workers > 0 else b
  finally:
    it.close()


def _aug_namespace(aug) -> types.SimpleNamespace:
  return types.SimpleNamespace(**aug.to_dict())


def _normal_index(config) -> int:
  mods = list(config.dataset.modalities)
  nm = config.dataset.normal_modality
  return mods.index(nm) if nm in mods else 0


# --- iterators ---------------------------------------------------------------------------------

def train_iterator(config, data_dir, fold, *, global_batch_size, seed, process_index=None,
                   process_count=None, with_pseudo_normal=None) -> Iterator[dict]:
  """Endless augmented local batches of the fold's 'train' split (see the module docstring).

  Batch t of process p is rows [p B/P, (p+1) B/P) of global batch t, a pure function of
  (seed, t); one iterator per epoch, seeded with run_log.epoch_seed, makes resumes exact.
  """
  process_index, process_count = _processes(process_index, process_count)
  global_batch_size = int(global_batch_size)
  local = _local_batch(global_batch_size, process_count)
  directory, use_normal = tumor_dataset_dir(config, data_dir, fold, with_pseudo_normal)
  source = tfrecord.ShardSource(directory, 'train')
  patients = source.column('patient')
  everything = PatientSampler(patients)
  tumor = PatientSampler(patients, source.column('has_tumor'))
  is_tumor = tumor_positions(global_batch_size, config.data.tumor_fraction)
  if not len(everything) or (is_tumor.any() and not len(tumor)):
    what = 'tumor slice' if len(everything) else 'slice'
    raise ValueError(f'{directory} split train: no {what} to draw from')
  sample = _TrainSample(
      source=source, everything=everything, tumor=tumor, is_tumor_slot=is_tumor,
      first_slot=process_index * local, local_batch=local, seed=int(seed),
      use_normal=use_normal, aug=_aug_namespace(config.data.augment), k=int(config.data.k),
      normal_index=_normal_index(config), lut=label_lut(config))
  ds = grain.MapDataset.range(_ENDLESS).map(sample)
  return _batches(ds, local, config, drop_remainder=True)


def _even_part(n: int, process_index: int, process_count: int) -> tuple:
  """[start, end) of process p's contiguous part of n examples (the first n % P get one more;
  tfds.even_splits' rule)."""
  per, extra = divmod(n, process_count)
  start = per * process_index + min(process_index, extra)
  return start, start + per + (process_index < extra)


def eval_iterator(config, data_dir, fold, split, batch_size, *, process_index=0,
                  process_count=1, with_pseudo_normal=None) -> Iterator[dict]:
  """One ordered pass (patient by patient, slice by slice), no augmentation.

  The last batch is padded to `batch_size` (zeros, patient b'') and every batch carries
  `valid` bool [B]. Default: the whole split in this process.
  """
  directory, use_normal = tumor_dataset_dir(config, data_dir, fold, with_pseudo_normal)
  source = tfrecord.ShardSource(directory, split)
  start, end = _even_part(len(source), *_processes(process_index, process_count))
  if start == end:
    return
  ds = grain.MapDataset.range(start, end).map(_Read(source, use_normal, label_lut(config)))
  for batch in _batches(ds, int(batch_size), config, drop_remainder=False):
    yield _pad(batch, batch_size)


def _pad(batch, batch_size):
  n = len(batch['slice'])
  out = {}
  for k, v in batch.items():
    if n < batch_size:
      fill = np.zeros((batch_size - n,) + v.shape[1:], v.dtype)
      if v.dtype == object:
        fill[...] = b''
      v = np.concatenate([v, fill])
    out[k] = v
  out['valid'] = np.arange(batch_size) < n
  return out


def normal_t1_iterator(config, data_dir, batch_size, seed, *, fold=0, process_index=None,
                       process_count=None) -> Iterator[dict]:
  """Endless batches {'image': float32 [b, H, W, 1] in [-1, 1]} for the IntroVAE.

  `batch_size` is global; sample j of step t draws a subject uniformly, then one of its
  slices, from (seed, t, j); each process gets its contiguous batch_size / process_count rows.
  `fold` only matters in the no-normal-cohort fallback (the fold's training cases).
  """
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch(int(batch_size), process_count)
  directory = _normal_dir(config, data_dir, fold)
  source = tfrecord.ShardSource(directory, 'train')
  sampler = PatientSampler(source.column('patient'))
  if not len(sampler):
    raise ValueError(f'{directory}: no normal T1 slice to draw from')
  ds = grain.MapDataset.range(_ENDLESS).map(_NormalSample(
      source=source, sampler=sampler, first_slot=process_index * local, local_batch=local,
      seed=int(seed)))
  return _batches(ds, local, config, drop_remainder=True)
