"""sums.fused_sums: the same sums as jnp.sum (values and gradients), any axis and size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax import losses
from clfc_jax.sums import fused_sums


@pytest.mark.parametrize('shape,axis', [((96, 7), 0), ((5, 48), -1), ((3, 13, 4), 1),
                                        ((2, 40, 6), -2), ((11,), 0)])
def test_matches_jnp_sum(shape, axis):
  x = jax.random.normal(jax.random.key(0), shape)
  m = (jax.random.uniform(jax.random.key(1), shape) > 0.4).astype(jnp.float32)
  got = jax.jit(lambda x: fused_sums(m * x, x * x, axis=axis))(x)
  want = [jnp.sum(m * x, axis=axis), jnp.sum(x * x, axis=axis)]
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(x)))
  np.testing.assert_allclose(
      jax.grad(loss(lambda x: fused_sums(m * x * x, axis=axis)[0]))(x),
      jax.grad(loss(lambda x: jnp.sum(m * x * x, axis=axis)))(x), rtol=1e-4, atol=1e-5)


def test_negative_cosine_matches_the_textbook_formula():
  p = jax.random.normal(jax.random.key(2), (64, 256))
  z = jax.random.normal(jax.random.key(3), (64, 256))
  want = -jnp.sum(p * z, -1) / (jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(z, axis=-1))
  np.testing.assert_allclose(losses.negative_cosine(p, z), want, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda p: jnp.sum(losses.negative_cosine(p, z)))(p)
  grad_want = jax.grad(lambda p: jnp.sum(-jnp.sum(p * z, -1) / (
      jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(z, axis=-1))))(p)
  np.testing.assert_allclose(grad, grad_want, rtol=1e-4, atol=1e-7)
