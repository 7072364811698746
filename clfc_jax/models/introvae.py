"""IntroVAE encoder and decoder (SPEC §6; Huang et al., NeurIPS 2018), NHWC, flax.linen.

The encoder halves the resolution once per entry of `config.introvae.channels` after the first
(Conv5x5 stem at full size, then AvgPool 2 + residual block per level) and ends in μ, log σ².
The decoder mirrors it with nearest ×2 upsampling. Residual blocks use GroupNorm: it has no
batch statistics, so the alternating encoder/decoder updates stay plain functions of the params
(BatchNorm state would be updated by forward passes of the network that is NOT being trained),
and a slice's reconstruction does not depend on the other slices in its batch.
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from clfc_jax.models.layers import Conv, Dense

LATENTS = ('vector', 'spatial')
OUTPUT_ACTIVATIONS = ('tanh', 'linear')


def _num_groups(channels, max_groups):
  """Largest group count ≤ max_groups that divides `channels` (tiny test widths included)."""
  groups = max(1, min(max_groups, channels))
  while channels % groups:
    groups -= 1
  return groups


def bottom_hw(image_hw, num_levels):
  """Spatial size at the lowest resolution; a clear error when the image does not divide."""
  factor = 2 ** (num_levels - 1)
  h, w = image_hw
  if h % factor or w % factor:
    raise ValueError(
        f'IntroVAE input {h}x{w} must be a multiple of {factor} (2 ** (len(introvae.channels) '
        f'- 1) for {num_levels} channel entries); change prep.crop_hw or introvae.channels')
  return h // factor, w // factor


def upsample_nearest(x):
  """Nearest ×2 as a broadcast + reshape (jax.image.resize lowers to a gather; slower)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
  """conv3x3-norm-LReLU-conv3x3-norm, plus a (1x1-projected) skip, then LeakyReLU(0.2)."""
  features: int
  max_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda k, name: Conv(self.features, (k, k), dtype=self.dtype, name=name)
    norm = lambda name: nn.GroupNorm(_num_groups(self.features, self.max_groups),
                                     dtype=self.dtype, name=name)
    skip = x if x.shape[-1] == self.features else conv(1, 'skip')(x)
    y = nn.leaky_relu(norm('norm1')(conv(3, 'conv1')(x)), 0.2)
    y = norm('norm2')(conv(3, 'conv2')(y))
    return nn.leaky_relu(y + skip, 0.2)


class Encoder(nn.Module):
  """[B,H,W,1] in [-1,1] → (μ, log σ²), each [B,latent_dim] or [B,h,w,C] (float32)."""
  channels: Sequence[int]
  latent: str = 'vector'
  latent_dim: int = 512
  spatial_latent_channels: int = 512
  max_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'IntroVAE encoder expects [B,H,W,1] images, got {x.shape}')
    bottom_hw(x.shape[1:3], len(self.channels))
    y = Conv(self.channels[0], (5, 5), dtype=self.dtype, name='stem')(x.astype(self.dtype))
    y = nn.leaky_relu(nn.GroupNorm(_num_groups(self.channels[0], self.max_groups),
                                   dtype=self.dtype, name='stem_norm')(y), 0.2)
    for level, features in enumerate(self.channels[1:], start=1):
      y = nn.avg_pool(y, (2, 2), strides=(2, 2))
      y = ResBlock(features, self.max_groups, self.dtype, name=f'res{level}')(y)
    if self.latent == 'vector':
      stats = Dense(2 * self.latent_dim, dtype=self.dtype, name='to_latent')(
          y.reshape(y.shape[0], -1))
    elif self.latent == 'spatial':
      stats = Conv(2 * self.spatial_latent_channels, (3, 3), dtype=self.dtype,
                      name='to_latent')(y)
    else:
      raise ValueError(f'introvae.latent={self.latent!r}; expected one of {LATENTS}')
    mu, logvar = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
    return mu, logvar


class Decoder(nn.Module):
  """Latent (vector [B,D] or map [B,h,w,C]) → [B,H,W,1] image (float32).

  'linear' output (IntroVAE paper) is trained towards [-1,1] and clipped at inference; 'tanh'
  bounds it but saturates and stops learning at the paper's decoder lr (5e-3) with Adam.
  """
  channels: Sequence[int]
  image_hw: Sequence[int]
  latent: str = 'vector'
  max_groups: int = 8
  output_activation: str = 'linear'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    h, w = bottom_hw(self.image_hw, len(self.channels))
    z = z.astype(self.dtype)
    if self.latent == 'vector':
      y = Dense(h * w * self.channels[-1], dtype=self.dtype, name='from_latent')(z)
      y = nn.leaky_relu(y.reshape(z.shape[0], h, w, self.channels[-1]), 0.2)
    elif self.latent == 'spatial':
      y = nn.leaky_relu(Conv(self.channels[-1], (3, 3), dtype=self.dtype,
                                name='from_latent')(z), 0.2)
    else:
      raise ValueError(f'introvae.latent={self.latent!r}; expected one of {LATENTS}')
    for level in range(len(self.channels) - 1, 0, -1):
      y = ResBlock(self.channels[level], self.max_groups, self.dtype, name=f'res{level}')(y)
      y = upsample_nearest(y)
    y = ResBlock(self.channels[0], self.max_groups, self.dtype, name='res0')(y)
    y = Conv(1, (5, 5), dtype=self.dtype, name='to_image')(y).astype(jnp.float32)
    if self.output_activation == 'tanh':
      return jnp.tanh(y)
    if self.output_activation == 'linear':
      return y
    raise ValueError(f'introvae.output_activation={self.output_activation!r}; '
                     f'expected one of {OUTPUT_ACTIVATIONS}')


def build(config, image_hw):
  """(Encoder, Decoder) for `config.introvae` and slices of size image_hw = (H, W)."""
  iv = config.introvae
  if iv.latent not in LATENTS:
    raise ValueError(f'introvae.latent={iv.latent!r}; expected one of {LATENTS}')
  image_hw = tuple(int(s) for s in image_hw)
  bottom_hw(image_hw, len(iv.channels))
  dtype = jnp.dtype(iv.dtype)
  common = dict(channels=tuple(iv.channels), latent=iv.latent, max_groups=iv.norm_groups,
                dtype=dtype)
  encoder = Encoder(latent_dim=iv.latent_dim, spatial_latent_channels=iv.spatial_latent_channels,
                    **common)
  decoder = Decoder(image_hw=image_hw, output_activation=iv.output_activation, **common)
  return encoder, decoder


def latent_shape(config, image_hw):
  """Shape of one sample's latent: (latent_dim,) or (h, w, spatial_latent_channels)."""
  iv = config.introvae
  if iv.latent == 'vector':
    return (iv.latent_dim,)
  return bottom_hw(image_hw, len(iv.channels)) + (iv.spatial_latent_channels,)
