"""models.batch_norm.BatchNorm against flax's nn.BatchNorm (+ ReLU): values, statistics, gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax.models.batch_norm import BatchNorm


def _data(shape=(2, 6, 5, 8), seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], shape) * 3.0 + 1.5
  mask = jax.random.uniform(k[1], shape[:-1] + (1,)) > 0.3
  weights = jax.random.normal(k[2], shape)     # a loss that weighs every output differently
  return x, mask, weights


def _perturbed(variables):
  """Non-trivial scale, bias and running statistics (init's ones and zeros hide mistakes)."""
  def bump(path, a):
    step = jnp.arange(a.size, dtype=a.dtype).reshape(a.shape) / a.size
    return a + (0.5 if 'var' in jax.tree_util.keystr(path) else 0.3) * step
  return jax.tree_util.tree_map_with_path(bump, variables)


def _loss_and_grads(apply, variables, x, weights, train):
  def loss(variables, x):
    if train:
      out, updates = apply(variables, x, mutable=['batch_stats'])
    else:
      out, updates = apply(variables, x), {}
    return jnp.sum(out * weights), updates
  (value, updates), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
  return value, updates, grads


@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('train', [True, False])
def test_matches_flax_batch_norm(relu, masked, train):
  x, mask, weights = _data()
  mask = mask if masked else None
  ours = BatchNorm(use_running_average=not train, momentum=0.8, epsilon=1e-3, relu=relu)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.8, epsilon=1e-3)
  variables = _perturbed(ours.init(jax.random.key(1), x, mask))
  ref_variables = ref.init(jax.random.key(1), x, mask=mask)
  assert jax.tree.structure(variables) == jax.tree.structure(ref_variables)   # same checkpoints

  def ref_apply(v, x, **kw):
    out = ref.apply(v, x, mask=mask, **kw)
    if isinstance(out, tuple):
      return (nn.relu(out[0]) if relu else out[0]), out[1]
    return nn.relu(out) if relu else out

  got = _loss_and_grads(lambda v, x, **kw: ours.apply(v, x, mask, **kw), variables, x, weights,
                        train)
  want = _loss_and_grads(ref_apply, variables, x, weights, train)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  if train and masked:   # rows outside the mask are normalised but do not move the statistics
    out, updates = ours.apply(variables, x.at[~mask[..., 0]].set(1e3), mask[..., 0],
                              mutable=['batch_stats'])
    np.testing.assert_allclose(updates['batch_stats']['mean'], got[1]['batch_stats']['mean'],
                               rtol=1e-5)


def test_gradient_of_masked_rows_and_bf16():
  """Masked-out rows still get their normalisation's gradient; bf16 in, bf16 out."""
  x, mask, weights = _data(seed=3)
  bn = BatchNorm(relu=True, dtype=jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, mask)
  out, _ = bn.apply(variables, x.astype(jnp.bfloat16), mask, mutable=['batch_stats'])
  assert out.dtype == jnp.bfloat16
  grad = jax.grad(lambda x: jnp.sum(bn.apply(variables, x, mask, mutable=['batch_stats'])[0]
                                    .astype(jnp.float32) * weights))(x)
  outside = ~np.asarray(mask[..., 0])
  assert np.all(np.isfinite(grad)) and np.abs(np.asarray(grad)[outside]).max() > 0


def test_fully_masked_batch_stays_finite():
  x, _, _ = _data()
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), x)
  nothing = jnp.zeros(x.shape[:-1] + (1,), bool)
  out, updates = bn.apply(variables, x, nothing, mutable=['batch_stats'])
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(updates['batch_stats']['var']))
