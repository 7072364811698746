"""tf.data over the TFDS shards -> host-local numpy batches (TensorFlow ends here).

The only clfc_jax module that imports TensorFlow; TF sees no GPU (JAX owns the accelerator).
Batches follow ARCHITECTURE.md's contract: image float32 [B,H,W,M(2K+1)], normal float32
[B,H,W,2K+1] (only when config.model.use_normal_net), label int32 [B,H,W], brain bool [B,H,W],
patient bytes [B], slice int32 [B]; B is the process-local batch (global / process_count),
ready for jax.make_array_from_process_local_data.

Training draws tumor_slots(B) = B - round(B (1 - tumor_fraction)) samples of every batch
(nnU-Net's rounding: 1 of 4, 2 of 6) from a tumor-only stream and the rest from all slices,
and augments every sample with ONE set of random parameters for all its channels,
pseudo-normal, label and brain.
Randomness is stateless and seeded per sample (seed, process, stream, sample counter), so a
run's batches are reproducible.
"""
from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:   # TF already initialised its devices elsewhere; it had no GPU to take.
  pass

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from data_prep import tfds_builders  # pylint: disable=g-import-not-at-top

_ENCODED = ('image', 'normal', 'label', 'brain')   # decoded after shuffling (small buffers).


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def _process_split(split, process_index, process_count):
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]


def tumor_builder(config, data_dir, fold, with_pseudo_normal=None):
  """The prepared TumorSlices builder to read, and whether batches carry `normal`.

  Networks with a normal-appearance branch need the pseudo-normal dataset; baseline1 reads
  whichever is prepared (pseudo-normal first).
  """
  use_normal = (bool(config.model.use_normal_net) if with_pseudo_normal is None
                else bool(with_pseudo_normal))
  tried = []
  for pn in ((True,) if use_normal else (True, False)):
    builder = tfds_builders.tumor_slices_builder(config, data_dir, fold, with_pseudo_normal=pn)
    if builder.is_prepared():
      return builder, use_normal
    tried.append(builder.data_dir)
  raise FileNotFoundError(f'{data_dir}: no TFDS shards for fold {fold} (looked for {tried}); '
                          'build them first (prep / pseudo_normal stage)')


def num_examples(config, data_dir, fold, split, with_pseudo_normal=None) -> int:
  builder, _ = tumor_builder(config, data_dir, fold, with_pseudo_normal)
  return builder.info.splits[split].num_examples


def _decode_fn(features, use_normal):
  """Decodes the zlib tensors skipped at read time; casts to the batch contract's dtypes."""
  def decode(ex):
    out = {'image': tf.cast(features['image'].decode_example(ex['image']), tf.float32),
           'label': tf.cast(features['label'].decode_example(ex['label']), tf.int32),
           'brain': features['brain'].decode_example(ex['brain']),
           'patient': ex['patient'], 'slice': ex['slice']}
    if use_normal:
      out['normal'] = tf.cast(features['normal'].decode_example(ex['normal']), tf.float32)
    return out
  return decode


def _read(builder, split, *, shuffle_files, seed=None, cycle_length=1, encoded=_ENCODED):
  """Reads a split; the `encoded` features stay serialized until _decode_fn (after shuffling)."""
  # Shards are written in order (for evaluation); training reads them shuffled on purpose.
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=cycle_length,
                                enable_ordering_guard=not shuffle_files)
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_files, read_config=read_config,
      decoders={k: tfds.decode.SkipDecoding() for k in encoded})


# --- augmentation ------------------------------------------------------------------------------

def _affine_transform(angle, scale, h, w):
  """ImageProjectiveTransform row mapping OUTPUT pixels to INPUT pixels: rotate+zoom about the
  centre (angle in radians, scale > 1 enlarges)."""
  cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
  cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
  a0, a1, b0, b1 = cos, sin, -sin, cos
  a2 = cx - a0 * cx - a1 * cy
  b2 = cy - b0 * cx - b1 * cy
  zero = tf.zeros_like(cos)
  return tf.cast(tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])[None], tf.float32)


def _warp(x, transform, interpolation, fill_value):
  h, w = x.shape[0], x.shape[1]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform, output_shape=tf.constant([h, w], tf.int32),
      fill_value=tf.cast(fill_value, tf.float32), interpolation=interpolation,
      fill_mode='CONSTANT')[0]


def _gamma(x, gamma):
  """x^gamma on each channel's own [min, max] range (works for [-1, 1] pseudo-normals too)."""
  lo = tf.reduce_min(x, axis=(0, 1), keepdims=True)
  hi = tf.reduce_max(x, axis=(0, 1), keepdims=True)
  span = tf.maximum(hi - lo, 1e-6)
  return lo + span * tf.pow((x - lo) / span, gamma)


def augment_example(ex, seed, aug):
  """One random draw per sample, applied identically to image, normal, label and brain."""
  seeds = tf.random.experimental.stateless_split(seed, 14)

  def uniform(i, lo=0.0, hi=1.0):
    return tf.random.stateless_uniform([], seeds[i], lo, hi)

  dense = [ex['image']] + ([ex['normal']] if 'normal' in ex else [])
  masks = tf.stack([tf.cast(ex['label'], tf.float32), tf.cast(ex['brain'], tf.float32)], -1)

  def when(condition, fn, args):
    """fn(args) if condition else args; tf.cond keeps skipped ops off the CPU."""
    return tf.cond(condition, lambda: fn(args), lambda: args)

  for i, axis in enumerate((0, 1)):
    dense, masks = when(uniform(i) < aug.flip_prob,
                        lambda a, ax=axis: ([tf.reverse(x, [ax]) for x in a[0]],
                                            tf.reverse(a[1], [ax])), (dense, masks))

  max_rad = aug.rotate_deg * math.pi / 180.0
  angle = tf.where(uniform(2) < aug.rotate_prob, uniform(3, -max_rad, max_rad), 0.0)
  scale = tf.where(uniform(4) < aug.scale_prob,
                   uniform(5, aug.scale_range[0], aug.scale_range[1]), 1.0)
  h, w = masks.shape[0], masks.shape[1]

  def warp_all(args):
    # Pixels rotated in from outside take the corner (background) value of each channel:
    # 0 for matched images, the background of the pseudo-normal's own range.
    t = _affine_transform(angle, scale, h, w)
    warped = [_warp(x - x[:1, :1], t, 'BILINEAR', 0.0) + x[:1, :1] for x in args[0]]
    return warped, _warp(args[1], t, 'NEAREST', 0.0)

  dense, masks = when(tf.logical_or(angle != 0.0, scale != 1.0), warp_all, (dense, masks))

  gain = uniform(7, 1.0 - aug.intensity_scale, 1.0 + aug.intensity_scale)
  shift = uniform(8, -aug.intensity_shift, aug.intensity_shift)
  dense = when(uniform(6) < aug.intensity_prob, lambda a: [x * gain + shift for x in a], dense)
  gamma = uniform(10, aug.gamma_range[0], aug.gamma_range[1])
  dense = when(uniform(9) < aug.gamma_prob, lambda a: [_gamma(x, gamma) for x in a], dense)

  def add_noise(a):
    return [x + aug.noise_std * tf.random.stateless_normal(tf.shape(x), seeds[12 + j])
            for j, x in enumerate(a)]

  dense = when(uniform(11) < aug.noise_prob, add_noise, dense)

  out = dict(ex)
  out['image'] = dense[0]
  if 'normal' in ex:
    out['normal'] = dense[1]
  out['label'] = tf.cast(tf.round(masks[..., 0]), tf.int32)
  out['brain'] = masks[..., 1] > 0.5
  return out


# --- iterators ---------------------------------------------------------------------------------

def _stream(builder, split, use_normal, config, *, seed, stream_id, tumor_only, batch):
  d = config.data
  ds = _read(builder, split, shuffle_files=True, seed=seed + 7919 * stream_id,
             cycle_length=d.interleave_cycle_length)
  if tumor_only:
    ds = ds.filter(lambda ex: ex['has_tumor'])
  ds = ds.repeat().shuffle(d.shuffle_buffer, seed=seed + 7919 * stream_id)
  ds = ds.map(_decode_fn(builder.info.features, use_normal), num_parallel_calls=tf.data.AUTOTUNE)
  if d.augment.enabled:
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
    ds = ds.map(lambda ex, i: augment_example(
        ex, tf.stack([tf.cast(seed * 4 + stream_id, tf.int64), i]), d.augment),
                num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True)


def tumor_slots(local_batch: int, tumor_fraction: float) -> int:
  """How many samples of a local batch come from the tumor stream (nnU-Net's rounding)."""
  return local_batch - int(round(local_batch * (1.0 - tumor_fraction)))


def train_iterator(config, data_dir, fold, *, global_batch_size, process_index=None,
                   process_count=None, seed, with_pseudo_normal=None) -> Iterator[dict]:
  """Endless shuffled, augmented local batches of the fold's 'train' split for this process.

  The first tumor_slots(B) samples of each batch come from tumor slices, the rest from all.
  """
  process_index, process_count = _processes(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f'global batch {global_batch_size} not divisible by {process_count} '
                     'processes')
  local = global_batch_size // process_count
  builder, use_normal = tumor_builder(config, data_dir, fold, with_pseudo_normal)
  split = _process_split('train', process_index, process_count)
  n_tumor = tumor_slots(local, config.data.tumor_fraction)
  seed = int(seed) * 1009 + process_index
  kwargs = dict(use_normal=use_normal, config=config, seed=seed)
  parts = []
  if n_tumor:
    parts.append(_stream(builder, split, stream_id=1, tumor_only=True, batch=n_tumor, **kwargs))
  if local - n_tumor:
    parts.append(_stream(builder, split, stream_id=2, tumor_only=False, batch=local - n_tumor,
                         **kwargs))
  if len(parts) == 2:
    ds = tf.data.Dataset.zip(tuple(parts)).map(
        lambda a, b: {k: tf.concat([a[k], b[k]], 0) for k in a})
  else:
    ds = parts[0]
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds, f'{builder.data_dir} split train (process {process_index})')


def _numpy_batches(ds, where) -> Iterator[dict]:
  first = True
  for batch in ds.as_numpy_iterator():
    first = False
    yield batch
  if first:
    raise ValueError(f'{where}: no batch could be drawn (no tumor slice, or fewer slices than '
                     'one batch)')


def eval_iterator(config, data_dir, fold, split, batch_size, *, process_index=0,
                  process_count=1, with_pseudo_normal=None) -> Iterator[dict]:
  """One ordered pass (patient by patient, slice by slice), no augmentation.

  The last batch is padded to `batch_size` (zeros, patient b'') and every batch carries
  `valid` bool [B]. Default: the whole split in this process.
  """
  builder, use_normal = tumor_builder(config, data_dir, fold, with_pseudo_normal)
  sub = _process_split(split, *_processes(process_index, process_count))
  ds = _read(builder, sub, shuffle_files=False)
  ds = ds.map(_decode_fn(builder.info.features, use_normal), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
  for batch in ds.as_numpy_iterator():
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


def num_normal_slices(config, data_dir, fold=0) -> int:
  return tfds_builders.normal_t1_builder(config, data_dir, fold=fold).info.splits[
      'train'].num_examples


def normal_t1_iterator(config, data_dir, batch_size, seed, *, fold=0, process_index=None,
                       process_count=None) -> Iterator[dict]:
  """Endless shuffled batches {'image': float32 [b, H, W, 1] in [-1, 1]} for the IntroVAE.

  `batch_size` is global; each process gets batch_size / process_count of its own slices.
  `fold` only matters in the no-normal-cohort fallback (the fold's training cases).
  """
  process_index, process_count = _processes(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(f'batch {batch_size} not divisible by {process_count} processes')
  builder = tfds_builders.normal_t1_builder(config, data_dir, fold=fold)
  if not builder.is_prepared():
    raise FileNotFoundError(f'{builder.data_dir}: normal T1 slices not built yet')
  features = builder.info.features
  seed = int(seed) * 1009 + process_index
  ds = _read(builder, _process_split('train', process_index, process_count), shuffle_files=True,
             seed=seed, cycle_length=config.data.interleave_cycle_length, encoded=('image',))
  ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed)
  ds = ds.map(lambda ex: {'image': tf.cast(features['image'].decode_example(ex['image']),
                                           tf.float32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size // process_count, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds, f'{builder.data_dir} (normal T1 slices)')
