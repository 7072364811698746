"""The phase upsampling equals a PyTorch-style ConvTranspose2d(k=4, s=2, p=1) and nn.ConvTranspose."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax.models.upsample import (CONV_TRANSPOSE_PADDING, PhaseUpsample, make_upsample,
                                      phase_conv_transpose)


def torch_conv_transpose(x, torch_kernel, bias):
  """ConvTranspose2d(k=4, s=2, p=1) by its definition: out[2i - 1 + k] += x[i] * w[k]."""
  b, h, w, _ = x.shape
  out = np.zeros((b, 2 * h + 2, 2 * w + 2, torch_kernel.shape[-1]))   # 1-pixel margin = p.
  for i in range(h):
    for j in range(w):
      for ki in range(4):
        for kj in range(4):
          out[:, 2 * i + ki, 2 * j + kj] += x[:, i, j] @ torch_kernel[ki, kj]
  return out[:, 1:-1, 1:-1] + bias


@pytest.fixture(scope='module')
def setup():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  layer = PhaseUpsample(4, bias_init=nn.initializers.normal(1.0))
  params = layer.init(jax.random.key(1), x)
  return x, layer, params


def test_matches_pytorch_definition(setup):
  x, layer, params = setup
  k, b = params['params']['kernel'], params['params']['bias']
  # flax's (unflipped) kernel is PyTorch's with both spatial axes reversed.
  expected = torch_conv_transpose(np.asarray(x, np.float64), np.asarray(k)[::-1, ::-1], b)
  got = layer.apply(params, x)
  assert got.shape == (2, 10, 12, 4)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize('padding', [CONV_TRANSPOSE_PADDING, 'SAME'])
def test_matches_flax_conv_transpose_values_and_gradients(setup, padding):
  x, layer, params = setup
  reference = nn.ConvTranspose(4, (4, 4), strides=(2, 2), padding=padding)
  ref_params = reference.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, ref_params) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(layer.apply(params, x), reference.apply(params, x), atol=1e-5)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1))(params, x)

  for got, want in zip(jax.tree.leaves(grads(layer)), jax.tree.leaves(grads(reference))):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_function_form_and_selector(setup):
  x, _, params = setup
  k, b = params['params']['kernel'], params['params']['bias']
  via_lax = jax.lax.conv_transpose(x, k, (2, 2), CONV_TRANSPOSE_PADDING,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  np.testing.assert_allclose(phase_conv_transpose(x, k, b), via_lax, atol=1e-5)
  assert isinstance(make_upsample('phase', 4), PhaseUpsample)
  assert isinstance(make_upsample('conv_transpose', 4), nn.ConvTranspose)
  with pytest.raises(ValueError, match='config.model.upsample'):
    make_upsample('bilinear', 4)


def test_bfloat16_activations_keep_float32_params(setup):
  x, _, params = setup
  y = PhaseUpsample(4, dtype=jnp.bfloat16).apply(params, x)
  assert y.dtype == jnp.bfloat16
  assert params['params']['kernel'].dtype == jnp.float32
  np.testing.assert_allclose(y.astype(jnp.float32), PhaseUpsample(4).apply(params, x),
                             rtol=0.05, atol=0.05)


@pytest.mark.parametrize('kind', ['phase', 'conv_transpose'])
def test_a_flat_input_comes_out_as_a_2x2_phase_pattern(kind):
  """Why the study's Fig. 3 shows g(F_R) in four clusters and Fig. 4 a grid in A_3/A_4: the
  decoder's UP (k4, s2, no norm or activation; SPEC) feeds the CLFC gate directly, and each of
  an output's four phases (row, column parity) is its own 2x2 slice of the 4x4 kernel. A
  featureless region therefore comes out as four different vectors, one per phase."""
  layer = make_upsample(kind, 8)
  x = jnp.ones((1, 6, 6, 3))
  params = layer.init(jax.random.key(0), x)
  y = np.asarray(layer.apply(params, x))[0, 2:-2, 2:-2]   # away from the zero padding
  phases = [y[i::2, j::2].reshape(-1, 8) for i in (0, 1) for j in (0, 1)]
  for p in phases:   # each phase is constant ...
    np.testing.assert_allclose(p, np.broadcast_to(p[0], p.shape), atol=1e-5)
  centres = np.stack([p[0] for p in phases])   # ... and the four differ
  gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(4) for b in range(a + 1, 4)]
  assert min(gaps) > 1e-2
