"""BatchNorm (+ optional ReLU) over [..., C] with a hand-written gradient: fewer memory passes.

Same parameters, statistics and outputs as `nn.BatchNorm` (use_fast_variance, optional mask
over the rows that count), so checkpoints are interchangeable. Why not flax's: its autodiff
gradient reads the full-resolution tensors four to six times (two reductions for mean and
E[x²], two more through them, the ReLU mask on its own), and the SimSiam heads run BatchNorm on
[122880, 256] per branch and level (126 MB each). Written out, the backward pass is two
reductions in one read and one elementwise pass:

  x̂ = (y − μ)·r,  r = 1/√(var + ε),  g = ∂L/∂out (· [out > 0] with ReLU)
  ∂L/∂β = Σ g,  ∂L/∂γ = Σ g·x̂,  ∂L/∂y = r·γ·(g − m/n·(∂L/∂β + x̂·∂L/∂γ))

with m the row mask (1 = counted in the statistics) and n = Σ m. The full-resolution SimSiam
level's forward + backward went from 1.16 to 1.11 s on 2 CPU cores, and to 0.99 s with its sums
taken by sums.fused_sums (benchmarks/README.md).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clfc_jax.sums import fused_sums


def _statistics(y, mask, epsilon):
  """Masked mean and biased variance (E[y²] − μ², clipped at 0 like flax) and 1/√(var + ε)."""
  m = mask.astype(y.dtype)
  count = jnp.maximum(jnp.sum(m), 1.0)   # a fully masked batch gives zeros, not NaNs
  total, total_sq = fused_sums(m * y, m * y * y, axis=0)
  mean = total / count
  var = jnp.maximum(total_sq / count - mean * mean, 0.0)
  return mean, var, jax.lax.rsqrt(var + epsilon), count


def _affine(y, mean, rstd, scale, bias):
  return (y - mean) * (rstd * scale) + bias


def _forward(y, mask, scale, bias, epsilon, relu):
  mean, var, rstd, count = _statistics(y, mask, epsilon)
  out = _affine(y, mean, rstd, scale, bias)
  if relu:
    out = jnp.maximum(out, 0.0)
  return (out, mean, var), (y, mask, scale, bias, mean, rstd, count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_train(y, mask, scale, bias, epsilon: float, relu: bool):
  """(out, batch mean, batch variance) of y [N, C] float32 with statistics over mask [N, 1]."""
  return _forward(y, mask, scale, bias, epsilon, relu)[0]


def _backward(epsilon, relu, residuals, cotangents):
  del epsilon
  y, mask, scale, bias, mean, rstd, count = residuals
  # The statistics are outputs only for the running averages: their cotangents are zero.
  g = cotangents[0]
  if relu:   # the same expression as the forward pass, so the same sign
    g = jnp.where(_affine(y, mean, rstd, scale, bias) > 0, g, 0.0)
  x_hat = (y - mean) * rstd
  d_bias, d_scale = fused_sums(g, g * x_hat, axis=0)
  m = mask.astype(y.dtype) / count
  d_y = (rstd * scale) * (g - m * (d_bias + x_hat * d_scale))
  return d_y, None, d_scale, d_bias


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """nn.BatchNorm over the last axis (params 'scale', 'bias'; batch_stats 'mean', 'var').

  `relu=True` applies ReLU inside (its gradient mask comes for free). `mask` [..., 1] or [...]
  bool picks the rows (pixels) that enter the statistics; every row is normalised.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  relu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    y = x.reshape(-1, features).astype(jnp.float32)
    if self.use_running_average:
      out = _affine(y, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
      if self.relu:
        out = jnp.maximum(out, 0.0)
    else:
      if mask is not None and mask.ndim == x.ndim - 1:
        mask = mask[..., None]
      rows = (jnp.ones((y.shape[0], 1), bool) if mask is None
              else jnp.broadcast_to(mask, x.shape[:-1] + (1,)).reshape(-1, 1))
      out, mean, var = batch_norm_train(y, rows, scale, bias, self.epsilon, self.relu)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return out.reshape(x.shape).astype(self.dtype)
