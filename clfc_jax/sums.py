"""Long sums of elementwise expressions that XLA:CPU does not write to memory first.

XLA:CPU rewrites a reduction over more than 32 elements into a reduce-window tree, and a
reduce-window cannot fuse its producer: jnp.sum(m * y, 0) first writes m * y out and reads it
back (three memory passes instead of one). On the full-resolution SimSiam tensors
([122880, 256] floats, 126 MB) two masked column sums took 23 ms that way and 6.5 ms as below.
Summing groups of at most 16 elements first is an ordinary reduction that fuses its producer;
an optimization barrier keeps XLA's simplifier from merging the two stages back into one long
reduction. Same sums up to float rounding (a different order of addition). GPUs and TPUs fuse
a reduction's producer themselves, so off the CPU this is plain jnp.sum (a barrier would only
keep XLA from fusing further there).
"""
import jax
import jax.numpy as jnp

GROUP = 16


def fused_sums(*values, axis: int):
  """[jnp.sum(v, axis) for v in values]; every value has the same size along `axis`.

  The first stage never sums along the contiguous last axis, so it runs on whole SIMD vectors:
  over the last axis it adds strided slices (the three channel sums of the SimSiam cosine over
  [122880, 256]: 29 ms with contiguous groups, 10 ms strided).
  """
  if jax.default_backend() != 'cpu':
    return [jnp.sum(v, axis=axis) for v in values]
  axis = axis % values[0].ndim
  n = values[0].shape[axis]
  group = next(g for g in (GROUP, 8, 4, 2, 1) if n % g == 0)
  last = axis == values[0].ndim - 1
  split = (group, n // group) if last else (n // group, group)
  stage = axis if last else axis + 1
  partial = [jnp.sum(v.reshape(v.shape[:axis] + split + v.shape[axis + 1:]), axis=stage)
             for v in values]
  return [jnp.sum(p, axis=axis) for p in jax.lax.optimization_barrier(partial)]
