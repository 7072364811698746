"""Dense and Conv whose bias gradient is summed in float32 when they compute in bfloat16.

flax's nn.Dense / nn.Conv add the bias in the compute dtype, so autodiff sums the bias gradient
over every pixel with a reduction in that dtype: in bfloat16 an 8-bit-mantissa accumulator.
Over the 8x96x80 pixels of a small batch, the head's bias gradient came out 8% off the exact
sum on XLA:CPU, and one train step on 1 vs 2 devices moved some biases by amounts that differed
by up to 100% of their update (float32: 1e-3 of it). These modules have flax's parameters
(names, shapes, initial values), its forward values and, in float32, its exact program; only a
bias gradient under a lower compute precision changes: the float32 sum of the cotangent.

Only what the models use: always a bias; stride 1, 'SAME' (or explicit) padding, no
groups or dilation.
"""
from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

Dtype = Any


def add_bias(y, bias):
  """y + bias over the last axis; in a lower precision than the bias, a float32 bias gradient."""
  bias = jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  if y.dtype == bias.dtype:
    return y + bias   # flax's program, unchanged
  return _add_bias_low_precision(y, bias)


@jax.custom_vjp
def _add_bias_low_precision(y, bias):
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return y + bias.astype(y.dtype), bias


def _add_bias_bwd(bias, g):
  # jnp.sum with dtype= converts each element before it accumulates (the reduction runs in
  # float32; the convert fuses into it).
  axes = tuple(range(g.ndim - 1))
  db = jnp.sum(g, axis=axes, dtype=jnp.float32, keepdims=True)
  return g, db.astype(bias.dtype)


_add_bias_low_precision.defvjp(_add_bias_fwd, _add_bias_bwd)


def _kernel_and_bias(module, kernel_shape):
  """flax's parameters in flax's order (so the same initial values from the same key)."""
  kernel = module.param('kernel', module.kernel_init, kernel_shape, module.param_dtype)
  bias = module.param('bias', module.bias_init, kernel_shape[-1:], module.param_dtype)
  return kernel, bias


class Dense(nn.Module):
  """nn.Dense on the last axis (same parameters) with a float32 bias gradient."""
  features: int
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel, bias = _kernel_and_bias(self, (jnp.shape(x)[-1], self.features))
    x, kernel = flax_dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return add_bias(jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), bias)


class Conv(nn.Module):
  """nn.Conv over NHWC, stride 1 (same parameters) with a float32 bias gradient."""
  features: int
  kernel_size: Sequence[int]
  padding: Union[str, Sequence[tuple]] = 'SAME'
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kernel, bias = _kernel_and_bias(
        self, (*self.kernel_size, jnp.shape(x)[-1], self.features))
    x, kernel = flax_dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (1,) * len(self.kernel_size), self.padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return add_bias(y, bias)
