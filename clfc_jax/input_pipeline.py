"""The TFDS shards -> host-local numpy batches, without TensorFlow (grain over random access).

The shards are read record by record through data_prep.tfrecord.ShardSource, so training runs
on an accelerator machine that has JAX but not TensorFlow. One tumor shard set serves every
fold: a fold's split (prep/folds.json) picks its patients' records, and its histogram
references finish each slice's matching when it is read (FoldReader), bitwise what
data_prep.inputs.case_inputs gives evaluation and new patients; the pseudo-normal stacks come
from the fold's IntroVAE's companion slices. Batches follow ARCHITECTURE.md's
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
from data_prep import folds as folds_lib
from data_prep import examples, labels, normalize, shards, store, tfrecord

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


def label_lut(config) -> np.ndarray:
  """Raw shard label -> training target (labels.level_lut of config.task): for 'wt' the binary
  WT map, for 'wt_tc_et' the nested level 0..3 (region r is level > r); 255 = not a label of
  the convention."""
  return labels.level_lut(config.task.label_convention, labels.region_names(config))


@dataclasses.dataclass(frozen=True, eq=False)
class FoldReader:
  """Record i of the tumour shards as fold `fold` sees it (picklable, for grain's workers).

  The shards hold every fold's patients with the fold-independent half of the histogram
  matching; `refs` (the fold's references, fitted on its training patients) finish it here,
  exactly as data_prep.inputs.case_inputs does for evaluation and new patients. `normal` is
  the fold's IntroVAE's companion set of pseudo-normal slices, if read; `neighbours[i]` are its
  records that make record i's 2.5D stack.
  """
  source: tfrecord.ShardSource
  normal: Optional[tfrecord.ShardSource]
  neighbours: Optional[np.ndarray]   # int64 [N, 2K+1]
  refs: tuple            # float64 [P] landmarks per modality, config order.
  k: int
  lut: np.ndarray        # raw label -> training target (label_lut).
  lut_cache: int = 0     # config.data.read_lut_cache: histogram maps kept per reader.
  cache_bytes: int = 0   # config.data.read_cache_mb: matched records kept per reader.
  _maps: dict = dataclasses.field(default_factory=dict, repr=False)
  _records: dict = dataclasses.field(default_factory=dict, repr=False)
  _held: list = dataclasses.field(default_factory=lambda: [0], repr=False)

  def _map(self, stored_landmarks, m: int) -> np.ndarray:
    """The float16 -> matched LUT of one case's modality m (normalize.stored_lut), cached."""
    key = (m, stored_landmarks.tobytes())
    table = self._maps.get(key)
    if table is None:
      table = normalize.stored_lut(stored_landmarks, self.refs[m])
      if len(self._maps) >= self.lut_cache:   # first in, first out (dicts keep order).
        self._maps.pop(next(iter(self._maps)), None)
      self._maps[key] = table
    return table

  def __len__(self) -> int:
    return len(self.source)

  def __call__(self, i: int) -> dict:
    """Record i matched, labelled and stacked: ARCHITECTURE.md's example, fresh arrays.

    Why a cache: a demo epoch draws each record about twice and a run ten epochs, and
    decompressing, matching and stacking a record costs about as much as augmenting it. The
    compact form is kept (float16 images are exact: the shards' inputs are float16), first
    come (random access gains nothing from evicting), until cache_bytes is held; the trainer
    keeps one reader for a whole run.
    """
    i = int(i)
    compact = self._records.get(i)
    if compact is None:
      compact = self._read(i)
      size = sum(v.nbytes for v in compact.values() if isinstance(v, np.ndarray))
      if self._held[0] + size <= self.cache_bytes:
        self._records[i] = compact
        self._held[0] += size
    out = {'image': compact['image'].astype(np.float32),
           'label': compact['label'].astype(np.int32), 'brain': compact['brain'].copy(),
           'patient': compact['patient'], 'slice': compact['slice']}
    if 'normal' in compact:
      out['normal'] = compact['normal'].astype(np.float32)
    return out

  def _read(self, i: int) -> dict:
    """Record i as __call__ gives it, with float16 images and a uint8 label."""
    ex = self.source[i]
    n = 2 * self.k + 1
    stored = ex['image'].view(np.uint16)
    image = np.empty(stored.shape, np.float16)
    try:
      for m in range(len(self.refs)):   # modality-major channels.
        image[..., m * n:(m + 1) * n] = self._map(ex['landmarks'][m], m)[
            stored[..., m * n:(m + 1) * n]]
    except ValueError as e:
      raise tfrecord.DatasetError(f'{self.source!r} record {i}: {e}') from None
    # as inputs.as_in_shards: the float16 LUT's values are what evaluation sees.
    image[~np.tile(ex['brain'], (1, 1, len(self.refs)))] = 0
    label = self.lut[ex['label']]
    if (label == 255).any():
      bad = sorted(set(np.unique(ex['label'][label == 255]).tolist()))
      raise ValueError(f'{self.source!r} record {i} ({bytes(ex["patient"]).decode()} '
                       f'slice {int(ex["slice"])}): label values {bad} are not in the label '
                       'convention')
    out = {'image': image, 'label': label.astype(np.uint8),
           'brain': ex['brain'][..., self.k].copy(),
           'patient': bytes(ex['patient']), 'slice': np.int32(ex['slice'])}
    if self.normal is not None:
      out['normal'] = np.stack([self.normal[int(j)]['normal'] for j in self.neighbours[i]],
                               -1).astype(np.float16)
    return out


def _text(values) -> np.ndarray:
  return np.asarray([bytes(v).decode() for v in values], object)


def fold_records(config, data_dir, fold, split, with_pseudo_normal=None) -> tuple:
  """(FoldReader, int64 record indices of fold `fold`'s `split` in file order).

  Networks with a normal-appearance branch read their fold's IntroVAE's pseudo-normal stacks
  (with_pseudo_normal overrides config.model.use_normal_net).
  """
  use_normal = (bool(config.model.use_normal_net) if with_pseudo_normal is None
                else bool(with_pseudo_normal))
  directory = shards.tumor_dir(config, data_dir)
  if not shards.is_built(directory):
    raise FileNotFoundError(f'{directory}: tumor shards not built yet (prep stage)')
  source = tfrecord.ShardSource(directory, shards.ALL_SPLIT)
  prep_dir = shards.default_dir(data_dir, 'prep')
  if store.prepared_ids(Path(prep_dir) / store.CASES_DIR):
    ids = folds_lib.prepared_split(prep_dir, config, fold)
  else:   # a machine with the shards and prep's JSON files only.
    ids = folds_lib.stored_split(prep_dir, config, fold)
  patients = _text(source.column('patient'))
  missing = sorted(set(i for part in ids.values() for i in part) - set(patients))
  if missing:
    raise tfrecord.DatasetError(f'{directory}: no slices of patients {missing[:5]} of fold '
                                f'{fold}; rebuild the shards (delete the folder, rerun prep)')
  refs = _fold_references(config, prep_dir, fold, ids['train'] + ids['val'])
  normal = neighbours = None
  if use_normal:
    key = shards.introvae_key(prep_dir, fold)
    normal_dir = shards.pseudo_normal_dir(config, data_dir, key)
    if not shards.is_built(normal_dir):
      raise FileNotFoundError(f'{normal_dir}: no pseudo-normal stacks of IntroVAE '
                              f'{shards.key_name(key)} yet (pseudo_normal stage)')
    normal = tfrecord.ShardSource(normal_dir, shards.ALL_SPLIT)
    try:
      neighbours = examples.neighbour_records(
          patients, source.column('slice'), _text(normal.column('patient')),
          normal.column('slice'), int(config.data.k))
    except ValueError as e:
      raise tfrecord.DatasetError(f'{normal_dir} does not match {directory} ({e}); delete it '
                                  'and rerun the pseudo_normal stage') from None
  reader = FoldReader(source=source, normal=normal, neighbours=neighbours, refs=refs,
                      k=int(config.data.k), lut=label_lut(config),
                      lut_cache=int(config.data.get('read_lut_cache', 512)),
                      cache_bytes=int(float(config.data.get('read_cache_mb', 0)) * 2**20))
  return reader, np.flatnonzero(np.isin(patients, ids[split])).astype(np.int64)


def _fold_references(config, prep_dir, fold, ids) -> tuple:
  """The fold's histogram references (prep/hist_refs_fold<k>.json, fitted on `ids`)."""
  path = normalize.reference_path(prep_dir, fold)
  modalities = tuple(config.dataset.modalities)
  if store.prepared_ids(Path(prep_dir) / store.CASES_DIR):
    refs = normalize.load_or_fit_references(path, Path(prep_dir) / store.CASES_DIR, ids,
                                            modalities, config)
  else:   # a machine with the shards but not the prepared volumes: the file must fit.
    if not path.exists():
      raise FileNotFoundError(f'{path}: no histogram references for fold {fold}')
    fitted_on = normalize.references_fitted_on(path)
    if fitted_on is not None and sorted(fitted_on) != sorted(ids):
      raise tfrecord.DatasetError(f'{path}: fitted on other patients than fold {fold}\'s '
                                  'training patients; rerun the prep stage')
    refs = normalize.load_references(path)
  return tuple(np.asarray(refs[m], np.float64) for m in modalities)


def num_examples(config, data_dir, fold, split) -> int:
  """Slices of fold `fold`'s `split` (train, val or test)."""
  return len(fold_records(config, data_dir, fold, split, with_pseudo_normal=False)[1])


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
  read: FoldReader
  everything: PatientSampler
  tumor: PatientSampler
  is_tumor_slot: np.ndarray   # bool [global batch]
  first_slot: int             # this process's first slot of the global batch
  local_batch: int
  seed: int
  aug: types.SimpleNamespace
  k: int
  normal_index: int

  def __call__(self, i: int) -> dict:
    step, r = divmod(int(i), self.local_batch)
    slot = self.first_slot + r
    rng = sample_rng(self.seed, step, slot)
    index = (self.tumor if self.is_tumor_slot[slot] else self.everything).draw(rng)
    ex = self.read(index)
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
                   process_count=None, with_pseudo_normal=None, records=None) -> Iterator[dict]:
  """Endless augmented local batches of the fold's 'train' split (see the module docstring).

  Batch t of process p is rows [p B/P, (p+1) B/P) of global batch t, a pure function of
  (seed, t); one iterator per epoch, seeded with run_log.epoch_seed, makes resumes exact.
  records: fold_records(...) of this split, to reuse one reader (and its cache) across epochs.
  """
  process_index, process_count = _processes(process_index, process_count)
  global_batch_size = int(global_batch_size)
  local = _local_batch(global_batch_size, process_count)
  read, records = records or fold_records(config, data_dir, fold, 'train', with_pseudo_normal)
  patients = _text(read.source.column('patient'))
  keep = np.zeros(len(patients), bool)
  keep[records] = True
  everything = PatientSampler(patients, keep)
  tumor = PatientSampler(patients, keep & read.source.column('has_tumor'))
  is_tumor = tumor_positions(global_batch_size, config.data.tumor_fraction)
  if not len(everything) or (is_tumor.any() and not len(tumor)):
    what = 'tumor slice' if len(everything) else 'slice'
    raise ValueError(f'{read.source!r} fold {fold} split train: no {what} to draw from')
  sample = _TrainSample(
      read=read, everything=everything, tumor=tumor, is_tumor_slot=is_tumor,
      first_slot=process_index * local, local_batch=local, seed=int(seed),
      aug=_aug_namespace(config.data.augment), k=int(config.data.k),
      normal_index=_normal_index(config))
  ds = grain.MapDataset.range(_ENDLESS).map(sample)
  return _batches(ds, local, config, drop_remainder=True)


def _even_part(n: int, process_index: int, process_count: int) -> tuple:
  """[start, end) of process p's contiguous part of n examples (the first n % P get one more;
  tfds.even_splits' rule)."""
  per, extra = divmod(n, process_count)
  start = per * process_index + min(process_index, extra)
  return start, start + per + (process_index < extra)


def eval_iterator(config, data_dir, fold, split, batch_size, *, process_index=0,
                  process_count=1, with_pseudo_normal=None, records=None) -> Iterator[dict]:
  """One ordered pass (patient by patient, slice by slice), no augmentation.

  The last batch is padded to `batch_size` (zeros, patient b'') and every batch carries
  `valid` bool [B]. Default: the whole split in this process. records: as train_iterator's.
  """
  read, records = records or fold_records(config, data_dir, fold, split, with_pseudo_normal)
  start, end = _even_part(len(records), *_processes(process_index, process_count))
  if start == end:
    return
  ds = grain.MapDataset.source(records[start:end]).map(read)
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
