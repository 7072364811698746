"""models.layers against flax's nn.Dense / nn.Conv: same parameters, values and (in float32)
gradients; in bfloat16 the bias gradient is the float32 sum that flax's is not."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax.models import layers

PAIRS = {
    'dense': (lambda **kw: layers.Dense(6, **kw), lambda **kw: nn.Dense(6, **kw), (2, 5, 7, 3)),
    'conv3': (lambda **kw: layers.Conv(6, (3, 3), **kw),
              lambda **kw: nn.Conv(6, (3, 3), padding='SAME', **kw), (2, 9, 7, 3)),
    'conv5': (lambda **kw: layers.Conv(4, (5, 5), **kw), lambda **kw: nn.Conv(4, (5, 5), **kw),
              (1, 8, 8, 2)),
}


def _inputs(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('name', sorted(PAIRS))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_same_parameters_and_values_as_flax(name, dtype):
  ours, flax_layer, shape = PAIRS[name]
  x = _inputs(shape).astype(dtype)
  params = ours(dtype=dtype).init(jax.random.key(3), x)
  reference = flax_layer(dtype=dtype).init(jax.random.key(3), x)
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)   # same names, shapes and initial values
  params = jax.tree.map(lambda p: p + 0.1, params)   # a non-zero bias
  y = ours(dtype=dtype).apply(params, x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(flax_layer(dtype=dtype).apply(params, x), np.float32))


@pytest.mark.parametrize('name', sorted(PAIRS))
def test_float32_gradients_equal_flax(name):
  ours, flax_layer, shape = PAIRS[name]
  x = _inputs(shape)
  params = flax_layer().init(jax.random.key(0), x)
  weights = _inputs((*shape[:-1], 6 if name != 'conv5' else 4), seed=1)
  loss = lambda layer: lambda p, x: jnp.sum(layer.apply(p, x) * weights)
  ours_g = jax.grad(loss(ours()), argnums=(0, 1))(params, x)
  ref_g = jax.grad(loss(flax_layer()), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(ours_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bfloat16_bias_gradient_is_the_float32_sum():
  """A head-like layer over 8x96x80 pixels with a small, partly cancelling cotangent: flax's
  bfloat16 reduction came out 8% off here; ours is the exact sum to bfloat16's last bit."""
  layer = layers.Conv(2, (3, 3), dtype=jnp.bfloat16)
  x = _inputs((8, 96, 80, 3)).astype(jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  rng = np.random.default_rng(0)
  cotangent = jnp.asarray(rng.normal(size=(8, 96, 80, 2)) * 1e-4 + 2e-6, jnp.bfloat16)
  _, vjp = jax.vjp(lambda p: layer.apply(p, x), params)
  grads = jax.jit(vjp)(cotangent)[0]['params']
  exact = np.asarray(cotangent, np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(grads['bias'], np.float64), exact, rtol=2e-3)
  assert grads['bias'].dtype == jnp.float32 and grads['kernel'].dtype == jnp.float32
  # The kernel's gradient is flax's (a convolution either way).
  _, flax_vjp = jax.vjp(lambda p: nn.Conv(2, (3, 3), dtype=jnp.bfloat16).apply(p, x), params)
  np.testing.assert_array_equal(grads['kernel'], jax.jit(flax_vjp)(cotangent)[0]['params']['kernel'])
