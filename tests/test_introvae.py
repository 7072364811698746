"""IntroVAE: shapes, losses by hand, update isolation, deterministic μ-reconstruction, learning."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax.train import introvae_steps as introvae_train
from clfc_jax.models import introvae as introvae_model
from configs import default


def tiny_config(latent='vector'):
  c = default.get_config()
  c.introvae.latent = latent
  c.introvae.channels = (8, 16, 32)
  c.introvae.latent_dim = 16
  c.introvae.spatial_latent_channels = 4
  c.introvae.batch_size = 8
  return c


def brain_like_slices(n, hw=32, seed=0):
  """Smooth head/brain/ventricle ellipses of varied size and position, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:hw, :hw] / (hw - 1) * 2 - 1
  out = []
  for _ in range(n):
    cy, cx = 0.1 * rng.standard_normal(2)
    a, b = 0.6 + 0.3 * rng.random(), 0.5 + 0.3 * rng.random()
    head = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 < 1
    brain = ((yy - cy) / (a - 0.1)) ** 2 + ((xx - cx) / (b - 0.1)) ** 2 < 1
    vent = ((yy - cy) / (0.25 * a)) ** 2 + ((xx - cx) / (0.1 + 0.2 * rng.random())) ** 2 < 1
    image = np.full((hw, hw), -1.0)
    image[head] = 0.8
    image[brain] = (0.2 + 0.2 * np.sin(4 * yy + 3 * rng.random()))[brain]
    image[vent] = -0.6
    out.append(image)
  return np.asarray(out, np.float32)[..., None]


# Cheap XLA:CPU compiles for steps that run once (compile time dominates these tests).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- Losses by hand ---------------------------------------------------------------------------

def test_kl_matches_hand_computation():
  mu = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  logvar = jnp.array([[0.0, math.log(2.0)], [math.log(0.5), 0.0]])
  expected = [0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - math.log(2.0))),
              0.5 * ((0 + 0.5 - 1 - math.log(0.5)) + (4 + 1 - 1 - 0))]
  np.testing.assert_allclose(introvae_train.kl_divergence(mu, logvar), expected, rtol=1e-6)
  # A spatial latent sums over every latent axis the same way.
  np.testing.assert_allclose(
      introvae_train.kl_divergence(mu.reshape(2, 1, 2, 1), logvar.reshape(2, 1, 2, 1)),
      expected, rtol=1e-6)
  assert float(introvae_train.kl_divergence(jnp.zeros((3, 5)), jnp.zeros((3, 5)))[0]) == 0.0


def test_reconstruction_error_and_hinge_by_hand():
  x = jnp.zeros((2, 2, 2, 1))
  x_r = x.at[0].set(1.0).at[1, 0, 0, 0].set(-2.0)
  np.testing.assert_allclose(introvae_train.reconstruction_error(x, x_r), [0.5 * 4, 0.5 * 4])
  kl = jnp.array([1.0, 5.0])
  # per slice: mean([3-1]+, [3-5]+) = 1; of the batch mean: [3-3]+ = 0.
  assert float(introvae_train.hinge(kl, 3.0, per_sample=True)) == pytest.approx(1.0)
  assert float(introvae_train.hinge(kl, 3.0, per_sample=False)) == pytest.approx(0.0)


def test_encoder_and_decoder_losses_by_hand():
  w = introvae_train.LossWeights(alpha=0.5, beta=0.04, margin=3.0)
  kl_real, kl_rec, kl_fake = jnp.array([2.0, 4.0]), jnp.array([1.0, 5.0]), jnp.array([0.0, 2.0])
  rec = jnp.array([100.0, 300.0])
  # L_E = 3 + 0.5 * (mean(2, 0) + mean(3, 1)) + 0.04 * 200 = 3 + 1.5 + 8
  assert float(introvae_train.encoder_loss(kl_real, kl_rec, kl_fake, rec, w)) == pytest.approx(12.5)
  # L_D = 0.5 * (3 + 1) + 0.04 * 200 = 10
  assert float(introvae_train.decoder_loss(kl_rec, kl_fake, rec, w)) == pytest.approx(10.0)


# --- Model shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize('latent,latent_shape,dtype', [('vector', (16,), 'float32'),
                                                        ('spatial', (8, 8, 4), 'float32'),
                                                        ('vector', (16,), 'bfloat16')])
def test_latent_and_output_shapes(latent, latent_shape, dtype):
  config = tiny_config(latent)
  config.introvae.dtype = dtype
  encoder, decoder = introvae_model.build(config, (32, 32))
  x = jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.float32)
  enc_vars = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x)
  mu, logvar = jax.eval_shape(encoder.apply, enc_vars, x)
  assert mu.shape == logvar.shape == (3,) + latent_shape
  assert mu.dtype == logvar.dtype == jnp.float32   # activations in dtype, outputs float32.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(enc_vars))
  assert introvae_model.latent_shape(config, (32, 32)) == latent_shape
  z = jax.ShapeDtypeStruct((3,) + latent_shape, jnp.float32)
  dec_vars = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), z)
  out = jax.eval_shape(decoder.apply, dec_vars, z)
  assert out.shape == (3, 32, 32, 1) and out.dtype == jnp.float32


def test_create_state_traces_inside_callers_jit():
  """The caller may jit/eval_shape create_state (shardings, checkpoint restore targets)."""
  config = tiny_config()
  shapes = jax.eval_shape(lambda r: introvae_train.create_state(config, r, (32, 32, 1)),
                          jax.random.PRNGKey(0))
  assert shapes.enc_params['stem']['kernel'].shape == (5, 5, 1, 8)
  assert shapes.dec_params['to_image']['kernel'].shape == (5, 5, 8, 1)
  assert shapes.step.shape == ()


def test_demo_size_and_bad_size():
  from configs import demo
  config = demo.get_config()
  encoder, decoder = introvae_model.build(config, config.prep.crop_hw)
  x = jax.ShapeDtypeStruct((2,) + tuple(config.prep.crop_hw) + (1,), jnp.float32)
  mu, _ = jax.eval_shape(encoder.apply, jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x), x)
  dec_vars = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), mu)
  assert jax.eval_shape(decoder.apply, dec_vars, mu).shape == x.shape
  with pytest.raises(ValueError, match='multiple of 4'):
    introvae_model.build(tiny_config(), (30, 32))


# --- Updates ----------------------------------------------------------------------------------

def test_nearest_upsample_matches_resize():
  x = np.random.default_rng(0).random((2, 3, 5, 4), np.float32)
  np.testing.assert_array_equal(introvae_model.upsample_nearest(x),
                                jax.image.resize(x, (2, 6, 10, 4), 'nearest'))


def test_each_update_changes_only_its_own_network():
  config = tiny_config('spatial')
  config.introvae.channels = (4, 8)   # two levels: compile time dominates this test.
  images = brain_like_slices(4, hw=16)
  state = introvae_train.create_state(config, jax.random.PRNGKey(0), images.shape)
  batch = {'image': images}

  after_enc, metrics = jax.jit(introvae_train.encoder_step, compiler_options=FAST_COMPILE)(
      state, batch)
  assert np.isfinite(float(metrics['enc/loss']))
  assert _leaves_equal(after_enc.dec_params, state.dec_params)
  assert _leaves_equal(after_enc.dec_opt, state.dec_opt)
  assert not _leaves_equal(after_enc.enc_params, state.enc_params)

  after_dec, metrics = jax.jit(introvae_train.decoder_step, compiler_options=FAST_COMPILE)(
      state, batch)
  assert np.isfinite(float(metrics['dec/loss']))
  assert _leaves_equal(after_dec.enc_params, state.enc_params)
  assert _leaves_equal(after_dec.enc_opt, state.enc_opt)
  assert not _leaves_equal(after_dec.dec_params, state.dec_params)
  assert not np.array_equal(after_dec.rng, state.rng)

  sample = jax.jit(functools.partial(introvae_train.sample, config=config, image_hw=(16, 16),
                                     num=3), compiler_options=FAST_COMPILE)
  samples = np.asarray(sample(after_dec.dec_params, rng=jax.random.PRNGKey(1)))
  assert samples.shape == (3, 16, 16, 1) and samples.min() >= -1 and samples.max() <= 1
  assert not np.array_equal(samples[0], samples[1])


def test_reconstruction_improves_and_uses_mu():
  """On 8 brain-like slices the μ-reconstruction beats the mean image by far within 150 steps.

  A 32x32 slice has ~30x fewer pixels than a 192x160 one, so β is raised to keep L_AE's weight
  against the KL terms, and m is scaled down to the 16-dim latent; Adam at 1e-3 (not the
  default 2e-4, tuned for thousands of steps) so that 150 steps suffice.
  """
  config = tiny_config('vector')
  config.introvae.beta = 1.0
  config.introvae.margin = 10.0
  config.introvae.lr_encoder = config.introvae.lr_decoder = 1e-3
  images = brain_like_slices(8)
  state, history = introvae_train.fit_on_arrays(config, images, steps=150, seed=0,
                                                compiler_options=FAST_COMPILE)
  assert int(state.step) == 150
  mse = history['enc/mse']
  assert np.all(np.isfinite(mse))
  assert mse[-10:].mean() < 0.5 * mse[0]

  recon = jax.jit(functools.partial(introvae_train.reconstruct, config=config),
                  compiler_options=FAST_COMPILE)
  first = np.asarray(recon(state.enc_params, state.dec_params, images))
  second = np.asarray(recon(state.enc_params, state.dec_params, images))
  np.testing.assert_array_equal(first, second)
  decode_mu = jax.jit(lambda e, d, x: state.decoder.apply(
      {'params': d}, state.encoder.apply({'params': e}, x)[0]), compiler_options=FAST_COMPILE)
  np.testing.assert_allclose(
      first, np.clip(decode_mu(state.enc_params, state.dec_params, images), -1, 1), atol=1e-5)
  assert first.min() >= -1 and first.max() <= 1
  mean_image_mse = np.mean((images - images.mean(0)) ** 2)
  assert np.mean((first - images) ** 2) < 0.5 * mean_image_mse


# --- Restoration under the IntroVAE prior ----------------------------------------------------

def _known_prior(hw, seed=0):
  """A real IntroVAE whose likelihood is known in closed form: μ = log σ² = 0 for every slice
  (so KL = 0) and a decoder that ignores z, so Dec(μ(x̂)) is one fixed image F. The
  restoration energy is then ½‖x̂ − F‖² + λ‖x̂ − x‖₁, minimised by x̂ = x + S_λ(F − x)."""
  config = tiny_config('vector')
  config.introvae.channels = (4, 8)
  config.introvae.beta = 1.0
  config.introvae.inference = 'restore'
  config.introvae.restore_steps = 20   # the error halves per step (η = 0.5, ∇ = x̂ − F).
  config.introvae.restore_lr = 0.5
  config.introvae.restore_weight = 0.2
  encoder, decoder = introvae_model.build(config, (hw, hw))
  x = jnp.zeros((1, hw, hw, 1))
  fast = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  enc = fast(encoder.init)(jax.random.PRNGKey(seed), x)['params']
  latent = jnp.zeros((1,) + introvae_model.latent_shape(config, (hw, hw)))
  dec = fast(decoder.init)(jax.random.PRNGKey(seed + 1), latent)['params']
  zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  enc = {**enc, 'to_latent': zero(enc['to_latent'])}
  bias = dec['from_latent']['bias']
  dec = {**dec, 'from_latent': {'kernel': zero(dec['from_latent']['kernel']),
                                'bias': jax.random.normal(jax.random.PRNGKey(seed + 2),
                                                          bias.shape)},
         'to_image': {**dec['to_image'], 'kernel': 0.03 * dec['to_image']['kernel']}}
  fixed = np.asarray(fast(decoder.apply)({'params': dec}, latent))[0]
  return config, enc, dec, fixed


def _restore(config, enc, dec, images):
  fn = jax.jit(functools.partial(introvae_train.restore, config=config),
               compiler_options=FAST_COMPILE)
  return np.asarray(fn(enc, dec, jnp.asarray(images, jnp.float32)))


@pytest.mark.parametrize('through_model', [True, False])
def test_restore_keeps_what_the_model_explains_and_shrinks_a_blob(through_model):
  """A slice the model reconstructs perfectly comes back bit for bit; a bright blob added to it
  shrinks to λ above the model's image while every other pixel stays exactly the input."""
  config, enc, dec, fixed = _known_prior(8)
  config.introvae.restore_through_model = through_model
  assert np.ptp(fixed) > 1e-3 and np.abs(fixed).max() < 0.2   # a non-trivial slice in range.
  yy, xx = np.mgrid[:8, :8]
  blob = ((yy - 3) ** 2 + (xx - 4) ** 2 <= 3)[..., None]
  images = np.stack([fixed, fixed + 0.8 * blob])
  out = _restore(config, enc, dec, images)
  np.testing.assert_array_equal(out[0], fixed)
  np.testing.assert_array_equal(out[1][~blob], fixed[~blob])
  # In the blob: 0.8 above F becomes λ = 0.2 above it (the closed-form minimiser).
  np.testing.assert_allclose(out[1][blob], fixed[blob] + 0.2, atol=1e-4)


def test_restore_threshold_does_not_depend_on_the_slice_size():
  """λ and η are per-pixel quantities: the same setting gives the same answer at 2x the size."""
  for hw in (8, 16):
    config, enc, dec, fixed = _known_prior(hw)
    config.introvae.restore_through_model = False   # the same minimiser; a cheaper compile.
    yy, xx = np.mgrid[:hw, :hw]
    blob = ((yy - hw // 2) ** 2 + (xx - hw // 2) ** 2 <= (hw // 4) ** 2)[..., None]
    out = _restore(config, enc, dec, (fixed - 0.5 * blob)[None])[0]
    np.testing.assert_allclose(out[blob], fixed[blob] - 0.2, atol=1e-4)
    np.testing.assert_array_equal(out[~blob], fixed[~blob])


def test_restore_lowers_the_energy_of_an_untrained_model():
  """With the full gradient through a random (untrained) IntroVAE, a few small proximal steps
  lower −ELBO/β + λ‖x̂ − x‖₁ from its value at x̂ = x, and the output stays in [-1, 1]."""
  config = tiny_config('vector')
  config.introvae.channels = (4, 8)
  config.introvae.restore_steps = 5
  config.introvae.restore_lr = 0.01
  config.introvae.restore_weight = 0.1
  config.introvae.restore_through_model = True
  images = brain_like_slices(2, hw=16)
  state = introvae_train.create_state(config, jax.random.PRNGKey(0), images.shape)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def energy(restored):
    prior = introvae_train.restoration_prior(state.enc_params, state.dec_params, restored,
                                             config)
    return prior + 0.1 * jnp.sum(jnp.abs(restored - images), axis=(1, 2, 3))

  out = _restore(config, state.enc_params, state.dec_params, images)
  assert out.min() >= -1 and out.max() <= 1
  assert not np.array_equal(out, images)
  assert np.all(np.asarray(energy(jnp.asarray(out))) < np.asarray(energy(jnp.asarray(images))))


def test_pseudo_normal_fn_follows_the_inference_setting():
  from clfc_jax import predict
  from clfc_jax.train import introvae_trainer
  config = tiny_config()
  assert config.introvae.inference == 'reconstruct'
  assert predict.pseudo_normal_fn(config) is introvae_trainer.reconstruct_fn(config)
  config.introvae.inference = 'restore'
  assert predict.pseudo_normal_fn(config) is introvae_trainer.restore_fn(config)
  config.introvae.inference = 'inpaint'   # Dec(μ) is its expectation; inpaint.py does the rest
  assert predict.pseudo_normal_fn(config) is introvae_trainer.reconstruct_fn(config)
  config.introvae.inference = 'denoise'
  with pytest.raises(ValueError, match="introvae.inference='denoise'"):
    predict.pseudo_normal_fn(config)


# --- The loss balance and the optimiser (issue 12) ---------------------------------------------

def test_beta_is_a_per_pixel_gaussian_precision_at_any_size():
  """β L_AE = −log N(x; x_r, σ²) per slice (σ = 1/√β) up to its constant, and a slice twice
  the size with the same per-pixel errors costs exactly 4x: β needs no per-size factor."""
  from scipy import stats
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 8, 6, 1)).astype(np.float32)
  x_r = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
  beta = 100.0
  rec = np.asarray(introvae_train.reconstruction_error(jnp.asarray(x), jnp.asarray(x_r)))
  sigma = beta ** -0.5
  nll = -stats.norm.logpdf(x, loc=x_r, scale=sigma).sum(axis=(1, 2, 3))
  constant = x[0].size * np.log(sigma * np.sqrt(2 * np.pi))
  np.testing.assert_allclose(beta * rec, nll - constant, rtol=1e-4)
  big = lambda a: jnp.asarray(np.repeat(np.repeat(a, 2, axis=1), 2, axis=2))
  np.testing.assert_allclose(introvae_train.reconstruction_error(big(x), big(x_r)), 4 * rec,
                             rtol=1e-5)


def test_both_networks_use_adam_at_one_rate_from_the_config():
  """Huang et al.'s Adam 2e-4 for encoder and decoder (not the paper's SGD rates 1e-4 / 5e-3):
  the first Adam step moves every parameter by about the learning rate, whatever the loss
  scale, so the same rate serves 96x80 and 192x160 slices."""
  c = default.get_config()
  assert c.introvae.lr_encoder == c.introvae.lr_decoder == 2e-4
  config = tiny_config()
  config.introvae.lr_encoder = config.introvae.lr_decoder = 1e-3
  images = brain_like_slices(4, hw=16)
  state = introvae_train.create_state(config, jax.random.PRNGKey(0), images.shape)
  for tx, params in ((state.enc_tx, state.enc_params), (state.dec_tx, state.dec_params)):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    step = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(updates)])
    np.testing.assert_allclose(step, 1e-3, rtol=1e-3)
