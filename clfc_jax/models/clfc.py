"""The CLFC gate and its SimSiam heads (SPEC §4).

The gate compares backbone features F_T with the normal-appearance features F_R of the same
decoder level and damps (A -> 0) where they disagree. The SimSiam heads pull ζ(F_T) and g(F_R)
together on normal-region pixels only, so that disagreement is left to mean "tumor".
1x1 convolutions are Dense on the channel axis (nn.Dense's parameters, no NHWC reshuffling; layers.py).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clfc_jax.models.batch_norm import BatchNorm
from clfc_jax.models.layers import Dense


class ClfcGate(nn.Module):
  """Returns (F'_T = A·F_T, ζ(F_T), g(F_R), A) with A = σ(ψ(ReLU(−ζ(F_T)·g(F_R))))."""
  stop_grad_before_zeta: bool = True   # paper Fig. 1b: L_sim never pushes the backbone.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f_t, f_r):
    half = f_t.shape[-1] // 2
    zeta_in = jax.lax.stop_gradient(f_t) if self.stop_grad_before_zeta else f_t
    zeta = Dense(half, dtype=self.dtype, name='zeta')(zeta_in)
    g = Dense(half, dtype=self.dtype, name='g')(f_r.astype(self.dtype))
    attention = nn.sigmoid(Dense(1, dtype=self.dtype, name='psi')(nn.relu(-zeta * g)))
    return attention * f_t, zeta, g, attention


class ProjectionMLP(nn.Module):
  """𝒦: Dense+BN+ReLU, Dense+BN+ReLU, Dense+BN, per pixel on [N, C]."""
  dim: int = 256
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    for i in range(3):
      x = Dense(self.dim, dtype=self.dtype, name=f'dense{i}')(x)
      x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_epsilon, relu=i < 2, dtype=self.dtype, name=f'bn{i}')(x, mask)
    return x


class PredictionMLP(nn.Module):
  """ℋ: Dense+BN+ReLU, Dense, per pixel on [N, C]."""
  dim: int = 256
  hidden: int = 128
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    x = Dense(self.hidden, dtype=self.dtype, name='dense0')(x)
    x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                  epsilon=self.bn_epsilon, relu=True, dtype=self.dtype, name='bn0')(x, mask)
    return Dense(self.dim, dtype=self.dtype, name='dense1')(x)


class SimSiamHeads(nn.Module):
  """One 𝒦/ℋ pair for a level, shared by both branches; each branch gets its own BN batch.

  `normal` [B, h, w] bool is Ω_NR at this level. mask_mode 'normal_only' (SPEC): BatchNorm
  statistics over Ω_NR only (the loss averages over Ω_NR); 'zero_tumor' (the authors' code):
  tumor vectors are zeroed and every pixel counts. Returns p_t, p_r, z_t, z_r [N, dim] and
  mask [N] bool.
  """
  dim: int = 256
  hidden: int = 128
  mask_mode: str = 'normal_only'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, zeta, g, normal, train: bool = True):
    if self.mask_mode not in ('normal_only', 'zero_tumor'):
      raise ValueError(f"config.loss.sim_mask_mode={self.mask_mode!r}; expected 'normal_only' "
                       "or 'zero_tumor'")
    mask = normal.reshape(-1)
    vecs = [zeta.reshape(-1, zeta.shape[-1]), g.reshape(-1, g.shape[-1])]
    if self.mask_mode == 'zero_tumor':
      vecs = [v * mask[:, None].astype(v.dtype) for v in vecs]
      bn_mask = None
    else:
      # A level with no normal pixel (loss weight 0 there) keeps finite BN statistics.
      bn_mask = jnp.logical_or(mask, ~jnp.any(mask))[:, None]
    kw = dict(dtype=self.dtype, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
    project = ProjectionMLP(self.dim, name='projection', **kw)
    predict = PredictionMLP(self.dim, self.hidden, name='prediction', **kw)
    z_t, z_r = (project(v, train, mask=bn_mask) for v in vecs)
    p_t, p_r = (predict(z, train, mask=bn_mask) for z in (z_t, z_r))
    return dict(p_t=p_t, p_r=p_r, z_t=z_t, z_r=z_r, mask=mask)
