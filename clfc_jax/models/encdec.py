"""The encoder/decoder shared by the segmentation backbone and the normal-appearance net (SPEC §3).

The decoder returns every level's features because CLFC compares the two networks level by
level; a `gate(level, x) -> x'` callback lets the caller replace each level's output (the CLFC
gate) before it is upsampled further, so one decoder serves every variant.
"""
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clfc_jax.models.batch_norm import BatchNorm
from clfc_jax.models.layers import Conv
from clfc_jax.models.upsample import make_upsample


def scaled_width(n, width):
  """`n` channels times the width multiplier, rounded to an even number >= 2 (CLFC halves it)."""
  return max(2, 2 * int(round(n * width / 2)))


def encoder_channels(config):
  """Encoder channels per level (64, 128, 256, 512 at width 1)."""
  return tuple(scaled_width(c, config.model.width) for c in config.model.channels)


def _windows(x):
  """[B, H, W, C] -> [B, H/2, 2, W/2, 2, C]: each 2x2 pooling window on axes 2 and 4."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def _pool_with_index(x):
  """(max of each 2x2 window, int8 index 0..3 of its first maximum in row-major order)."""
  w = _windows(x)
  top_left, top_right = w[:, :, 0, :, 0], w[:, :, 0, :, 1]
  bottom_left, bottom_right = w[:, :, 1, :, 0], w[:, :, 1, :, 1]
  top = jnp.maximum(top_left, top_right)
  bottom = jnp.maximum(bottom_left, bottom_right)
  top_index = jnp.where(top_right > top_left, 1, 0).astype(jnp.int8)
  bottom_index = jnp.where(bottom_right > bottom_left, 3, 2).astype(jnp.int8)
  lower = bottom > top
  return jnp.where(lower, bottom, top), jnp.where(lower, bottom_index, top_index)


@jax.custom_vjp
def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)), NHWC with even H and W, as reshape + max.

  XLA:CPU runs reduce-window and its select-and-scatter gradient ~20x slower than this
  (fwd+bwd at 4x192x160x64: 124 ms vs 6 ms). jnp.max's own gradient splits ties and went NaN
  at -O0, so the gradient is written out: all of it to the first maximum of each window in
  row-major order, as XLA's select-and-scatter and PyTorch do. The forward pass saves that
  position: finding it again in the backward pass by comparing x with the max dropped the
  gradient of windows where XLA had recomputed x slightly differently (sharded programs).
  """
  return _pool_with_index(x)[0]


def _max_pool_fwd(x):
  y, index = _pool_with_index(x)
  return y, index


def _max_pool_bwd(index, g):
  zero = jnp.zeros_like(g)
  rows = [jnp.stack([jnp.where(index == 2 * a + c, g, zero) for c in range(2)], axis=3)
          for a in range(2)]
  b, h, w, ch = g.shape
  return (jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, ch),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class Encoder(nn.Module):
  """Level i: Conv3x3 (bias) -> BatchNorm -> ReLU -> MaxPool 2; returns [e1, e2, e3, e4]."""
  channels: Sequence[int]
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    feats = []
    for i, features in enumerate(self.channels):
      x = Conv(features, (3, 3), padding='SAME', dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon, dtype=self.dtype, name=f'bn{i + 1}')(x)
      # ReLU commutes with max-pooling; pooling first touches 4x fewer values.
      x = nn.relu(max_pool_2x2(x))
      feats.append(x)
    return feats


class Decoder(nn.Module):
  """d0 = UP(e4); d1 = UP([d0', e3]); d2 = UP([d1', e2]); d3 = UP(d2'), x' = gate(level, x).

  UP is the 2x (k4, s2) upsampling with no norm or activation, channels reversed from the
  encoder's (512, 256, 128, 64). full_skips (the `unet` variant) also feeds e1 into the last
  UP: d3 = UP([d2', e1]), so every encoder level has a skip; the paper's net has none from e1.
  Returns [d0', d1', d2', d3'] at 1/8, 1/4, 1/2 and full resolution.
  """
  channels: Sequence[int]
  full_skips: bool = False
  upsample: str = 'phase'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, gate: Optional[Callable] = None):
    e1, e2, e3, e4 = feats
    skips = (e3, e2, e1 if self.full_skips else None, None)
    x, outs = e4, []
    for level, (features, skip) in enumerate(zip(reversed(self.channels), skips)):
      x = make_upsample(self.upsample, features, self.dtype, name=f'up{level}')(x)
      if gate is not None:
        x = gate(level, x)
      outs.append(x)
      if skip is not None:
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    return outs
