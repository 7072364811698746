"""IntroVAE losses and alternating encoder/decoder updates (SPEC §6; Huang et al., NeurIPS 2018).

    L_E = KL(z) + α Σ_{s=r,p} [m − KL(z_s)]⁺ + β L_AE      (encoder; x_r, x_p stop-gradient)
    L_D = α (KL(z_r) + KL(z_p)) + β L_AE                   (decoder)

z ~ q(z|x) by reparameterisation, x_r = Dec(z), x_p = Dec(z_p) with z_p ~ N(0, I), z_s = Enc(x_s).
Reductions follow the IntroVAE paper: KL = ½ Σ_latent (μ² + σ² − 1 − log σ²) and
L_AE = ½ Σ_pixels (x − x_r)², each per slice, then averaged over the batch. (Dropping the ½
of L_AE, as some implementations do, doubles β; m = 120 is on the per-slice KL scale.)

What the weights mean (issue 12), so that they need no per-size tuning:
- β L_AE with β = 1/σ² is −log N(x; x_r, σ²I) per slice up to a constant: a Gaussian decoder
  whose per-pixel error is σ in [-1, 1] units. The KLs are nats per slice too, so with sums on
  both sides β keeps its meaning at any slice size (a larger slice holds more pixels of
  evidence, and the latent may then carry more nats). A per-pixel MEAN for L_AE (the authors'
  code) or a KL summed over a spatial map would tie β and m to the slice or latent size.
  β = 0.04 means σ = 5 (2.5x the whole intensity range) and the demo's 0.5 σ = 1.4: the
  reconstruction is cheap to ignore, so the KL wins and the decoder drifts to a mean brain.
- α and m are nats as well (m per slice: scale it with the latent size when that changes).
- Optimiser: Adam, whose step size does not depend on the loss scale, so the per-slice sums
  (which grow with the slice) need no learning-rate change with size. The paper's 1e-4 / 5e-3
  were chosen for plain SGD; under Adam a decoder at 5e-3 is unstable (blocky
  reconstructions). Huang et al. use Adam 2e-4 for both networks; measured on the demo (one
  run each, same seed) the pseudo-normal's healthy-tissue MAE fell from 0.45 to 0.26. A faster
  encoder (>= 5e-4) diverges within ~120 steps at the demo's width (μ grows without bound).

The encoder and decoder keep separate param trees and separate optax states, and each step
differentiates only its own tree, so an update cannot touch the other network. Steps are pure
`(state, batch) -> (state, metrics)`; the caller jits them (and places shardings).
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clfc_jax.models import introvae as introvae_model


# --- Losses (pure, per slice or batch-mean) --------------------------------------------------

def kl_divergence(mu, logvar):
  """KL(N(μ, σ²) ‖ N(0, I)) per slice, summed over every latent axis: [B]."""
  axes = tuple(range(1, mu.ndim))
  return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=axes)


def reconstruction_error(images, reconstructions):
  """L_AE per slice: ½ Σ_pixels (x − x_r)², [B] (Gaussian −log p(x|z) up to a constant)."""
  axes = tuple(range(1, images.ndim))
  return 0.5 * jnp.sum(jnp.square(images - reconstructions), axis=axes)


def hinge(kl, margin, per_sample=True):
  """[m − KL]⁺ averaged over the batch (per_sample) or taken of the batch-mean KL."""
  if per_sample:
    return jnp.mean(jax.nn.relu(margin - kl))
  return jax.nn.relu(margin - jnp.mean(kl))


def encoder_loss(kl_real, kl_rec, kl_fake, rec, weights):
  """L_E from per-slice KLs of Enc(x), Enc(sg(x_r)), Enc(sg(x_p)) and per-slice L_AE."""
  adversarial = (hinge(kl_rec, weights.margin, weights.hinge_per_sample) +
                 hinge(kl_fake, weights.margin, weights.hinge_per_sample))
  return jnp.mean(kl_real) + weights.alpha * adversarial + weights.beta * jnp.mean(rec)


def decoder_loss(kl_rec, kl_fake, rec, weights):
  """L_D from per-slice KLs of Enc(x_r), Enc(x_p) and per-slice L_AE."""
  return weights.alpha * (jnp.mean(kl_rec) + jnp.mean(kl_fake)) + weights.beta * jnp.mean(rec)


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """α, β, m and the hinge reduction (config.introvae); hashable, so it rides as static data."""
  alpha: float
  beta: float
  margin: float
  hinge_per_sample: bool = True

  @classmethod
  def from_config(cls, config):
    iv = config.introvae
    return cls(float(iv.alpha), float(iv.beta), float(iv.margin), bool(iv.hinge_per_sample))


# --- State -----------------------------------------------------------------------------------

@flax.struct.dataclass
class IntroVAEState:
  """Separate encoder/decoder params and Adam states; modules and optimizers are static."""
  enc_params: flax.core.FrozenDict
  dec_params: flax.core.FrozenDict
  enc_opt: optax.OptState
  dec_opt: optax.OptState
  step: jax.Array
  rng: jax.Array
  encoder: introvae_model.Encoder = flax.struct.field(pytree_node=False)
  decoder: introvae_model.Decoder = flax.struct.field(pytree_node=False)
  enc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  dec_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  weights: LossWeights = flax.struct.field(pytree_node=False)


_CHEAP_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _image_hw(image_shape):
  """(H, W) from (H, W), (H, W, 1) or (B, H, W, 1)."""
  shape = tuple(int(s) for s in image_shape)
  if len(shape) == 2:
    return shape
  if len(shape) in (3, 4) and shape[-1] == 1:
    return shape[-3:-1]
  raise ValueError(f'IntroVAE image_shape must be (H,W), (H,W,1) or (B,H,W,1); got {shape}')


def create_state(config, rng, image_shape):
  """Fresh IntroVAEState for single-channel slices of image_shape ((H,W), (H,W,1) or (B,H,W,1))."""
  image_hw = _image_hw(image_shape)
  encoder, decoder = introvae_model.build(config, image_hw)
  latent = introvae_model.latent_shape(config, image_hw)
  iv = config.introvae
  enc_tx = optax.adam(iv.lr_encoder, b1=iv.adam_b1, b2=iv.adam_b2)
  dec_tx = optax.adam(iv.lr_decoder, b1=iv.adam_b1, b2=iv.adam_b2)

  def init(rng):
    rng, enc_rng, dec_rng = jax.random.split(rng, 3)
    enc_params = encoder.init(enc_rng, jnp.zeros((1,) + image_hw + (1,), jnp.float32))['params']
    dec_params = decoder.init(dec_rng, jnp.zeros((1,) + latent, jnp.float32))['params']
    return IntroVAEState(
        enc_params=enc_params, dec_params=dec_params,
        enc_opt=enc_tx.init(enc_params), dec_opt=dec_tx.init(dec_params),
        step=jnp.zeros((), jnp.int32), rng=rng,
        encoder=encoder, decoder=decoder, enc_tx=enc_tx, dec_tx=dec_tx,
        weights=LossWeights.from_config(config))

  if isinstance(rng, jax.core.Tracer):  # inside the caller's jit / eval_shape (e.g. shardings).
    return init(rng)
  # One compiled init (eagerly, flax compiles every op on its own). It runs once, so LLVM's
  # optimisations are switched off: they take most of its compile time (random init).
  return jax.jit(init, compiler_options=_CHEAP_COMPILE)(rng)


# --- Steps -----------------------------------------------------------------------------------

def _images(batch):
  """The [B,H,W,1] float32 slices of a batch: a dict with 'image', or the array itself."""
  images = batch['image'] if isinstance(batch, dict) else batch
  return jnp.asarray(images, jnp.float32)


def _forward(state, enc_params, dec_params, images, rng, stop_gradient_samples):
  """One IntroVAE pass: per-slice KLs of x, x_r, x_p and L_AE, plus the per-pixel MSE."""
  noise_rng, prior_rng = jax.random.split(rng)
  mu, logvar = state.encoder.apply({'params': enc_params}, images)
  z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(noise_rng, mu.shape)
  z_p = jax.random.normal(prior_rng, mu.shape)
  # GroupNorm is per slice, so decoding/encoding real and prior halves together is exact.
  decoded = state.decoder.apply({'params': dec_params}, jnp.concatenate([z, z_p]))
  x_r, x_p = jnp.split(decoded, 2)
  rec = reconstruction_error(images, x_r)
  samples = jax.lax.stop_gradient(decoded) if stop_gradient_samples else decoded
  mu_s, logvar_s = state.encoder.apply({'params': enc_params}, samples)
  kl_rec, kl_fake = jnp.split(kl_divergence(mu_s, logvar_s), 2)
  terms = dict(kl_real=kl_divergence(mu, logvar), kl_rec=kl_rec, kl_fake=kl_fake, rec=rec)
  return terms, jnp.mean(jnp.square(images - x_r))


def _metrics(prefix, loss, terms, mse):
  out = {f'{prefix}/loss': loss, f'{prefix}/mse': mse}
  out.update({f'{prefix}/{k}': jnp.mean(v) for k, v in terms.items()})
  return out


def encoder_step(state, batch):
  """One Adam update of the encoder on L_E; decoder params and opt state are left untouched."""
  images = _images(batch)
  rng, step_rng = jax.random.split(state.rng)

  def loss_fn(enc_params):
    terms, mse = _forward(state, enc_params, state.dec_params, images, step_rng, True)
    loss = encoder_loss(terms['kl_real'], terms['kl_rec'], terms['kl_fake'], terms['rec'],
                        state.weights)
    return loss, (terms, mse)

  (loss, (terms, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.enc_params)
  updates, enc_opt = state.enc_tx.update(grads, state.enc_opt, state.enc_params)
  state = state.replace(enc_params=optax.apply_updates(state.enc_params, updates),
                        enc_opt=enc_opt, rng=rng)
  return state, _metrics('enc', loss, terms, mse)


def decoder_step(state, batch):
  """One Adam update of the decoder on L_D; encoder params and opt state are left untouched."""
  images = _images(batch)
  rng, step_rng = jax.random.split(state.rng)

  def loss_fn(dec_params):
    terms, mse = _forward(state, state.enc_params, dec_params, images, step_rng, False)
    loss = decoder_loss(terms['kl_rec'], terms['kl_fake'], terms['rec'], state.weights)
    return loss, (terms, mse)

  (loss, (terms, mse)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.dec_params)
  updates, dec_opt = state.dec_tx.update(grads, state.dec_opt, state.dec_params)
  state = state.replace(dec_params=optax.apply_updates(state.dec_params, updates),
                        dec_opt=dec_opt, rng=rng)
  return state, _metrics('dec', loss, terms, mse)


def train_step(state, batch):
  """Encoder update, then decoder update (seeing the new encoder); step counts these pairs."""
  state, enc_metrics = encoder_step(state, batch)
  state, dec_metrics = decoder_step(state, batch)
  return state.replace(step=state.step + 1), {**enc_metrics, **dec_metrics}


# --- Inference -------------------------------------------------------------------------------

def reconstruct(enc_params, dec_params, images, config):
  """Dec(μ(x)) for [B,H,W,1] slices in [-1,1], clipped to [-1,1]; deterministic.

  Clipping only here: a linear decoder output is trained unclipped (a clip, like a saturated
  tanh, would stop its gradient). Jit with config bound (clfc_jax.predict does).
  """
  encoder, decoder = introvae_model.build(config, images.shape[1:3])
  mu, _ = encoder.apply({'params': enc_params}, jnp.asarray(images, jnp.float32))
  return jnp.clip(decoder.apply({'params': dec_params}, mu), -1.0, 1.0)


def soft_threshold(values, threshold):
  """The proximal map of threshold·|·|: shrinks each value towards 0 by `threshold`."""
  return jnp.sign(values) * jax.nn.relu(jnp.abs(values) - threshold)


def restoration_prior(enc_params, dec_params, restored, config, through_model=True):
  """The smooth part of the restoration energy, per slice [B]: [KL(μ, σ) + β L_AE] / β of
  `restored` under the frozen IntroVAE, with x_r = Dec(μ) (deterministic).

  through_model=False holds Dec(μ(x̂)) and the KL constant for differentiation: the gradient is
  then x̂ − Dec(μ(x̂)), the data step of a block descent that alternates z = μ(x̂) (amortised
  inference) and the x̂ minimising ½‖x̂ − Dec(z)‖² + λ‖x̂ − x‖₁.
  """
  encoder, decoder = introvae_model.build(config, restored.shape[1:3])
  mu, logvar = encoder.apply({'params': enc_params}, restored)
  rec = decoder.apply({'params': dec_params}, mu)
  kl = kl_divergence(mu, logvar) / config.introvae.beta
  if not through_model:
    rec, kl = jax.lax.stop_gradient(rec), jax.lax.stop_gradient(kl)
  return kl + reconstruction_error(restored, rec)


def restore(enc_params, dec_params, images, config):
  """A pseudo-normal by restoration under the IntroVAE prior (You et al., MIDL 2019): the slice
  x̂ near the input x that the frozen IntroVAE finds likely, for [B,H,W,1] slices in [-1,1].

      x̂ = argmin  E(x̂),   E(x̂) = [KL(μ(x̂), σ(x̂)) + β L_AE(x̂, Dec(μ(x̂)))] / β + λ Σ_pixels |x̂ − x|

  The bracket is the IntroVAE's own −ELBO (its KL and β, L_AE = ½ Σ_pixels (x̂ − x_r)², the
  training losses' reductions), λ = introvae.restore_weight. Proximal gradient descent from
  x̂ = x, introvae.restore_steps times: an optax SGD step of size η = restore_lr on the bracket,
  then the L1 term's exact proximal map, a soft threshold of x̂ − x by η·λ. So a pixel leaves the
  input only where the prior pulls harder than λ: healthy tissue the model explains stays bit
  for bit (the residual is sparse), a lesion it cannot explain moves towards normal appearance.
  introvae.restore_through_model: differentiate through Dec∘μ and the KL (the full gradient),
  or hold them constant per step (restoration_prior; with η = 1 each step is then the exact
  x̂-minimiser for z = μ(x̂), x̂ = x + S_λ(Dec(z) − x), and costs one forward pass, not three).

  Scale: dividing the −ELBO by β leaves L_AE and the L1 term both plain sums over pixels, so
  each pixel's gradient is O(1) whatever H×W is, and η (a step in [-1,1] units) and λ (a
  threshold in [-1,1] units) hold at 96x80 and 192x160 alike. The KL is one number per slice;
  its pull on each pixel weakens with H×W exactly as in the model's own training loss, so it
  keeps the KL : β L_AE balance the model was trained with at its size.

  Goes beyond the paper (SPEC §6: inference uses μ, i.e. `reconstruct`), because a vector-latent
  VAE alone returns a blurred mean brain. Returns x̂ clipped to [-1,1]; the caller masks the
  brain. Deterministic. Jit with config bound (introvae_trainer.restore_fn).
  """
  iv = config.introvae
  x = jnp.asarray(images, jnp.float32)
  threshold = float(iv.restore_lr) * float(iv.restore_weight)
  tx = optax.sgd(float(iv.restore_lr))
  through = bool(iv.restore_through_model)
  grad_fn = jax.grad(lambda r: jnp.sum(
      restoration_prior(enc_params, dec_params, r, config, through)))

  def step(_, carry):
    restored, opt_state = carry
    updates, opt_state = tx.update(grad_fn(restored), opt_state, restored)
    moved = optax.apply_updates(restored, updates)
    return x + soft_threshold(moved - x, threshold), opt_state

  restored, _ = jax.lax.fori_loop(0, int(iv.restore_steps), step, (x, tx.init(x)))
  return jnp.clip(restored, -1.0, 1.0)


def sample(dec_params, config, image_hw, rng, num):
  """`num` decoded prior samples [num,H,W,1] (for the training stage's sample grids)."""
  _, decoder = introvae_model.build(config, image_hw)
  latent = introvae_model.latent_shape(config, image_hw)
  images = decoder.apply({'params': dec_params}, jax.random.normal(rng, (num,) + latent))
  return jnp.clip(images, -1.0, 1.0)


def fit_on_arrays(config, images, steps, seed=0, compiler_options=None):
  """Trains on an in-memory [N,H,W,1] array for `steps` alternating steps (tests, demo).

  Each step draws min(N, introvae.batch_size) slices without replacement. compiler_options
  go to jax.jit (e.g. cheaper XLA:CPU compiles for short runs). Returns (state, history)
  with history a dict of per-step numpy metric arrays.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f'fit_on_arrays expects [N,H,W,1] slices, got {images.shape}')
  state = create_state(config, jax.random.PRNGKey(seed), images.shape)
  step_fn = jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)
  picker = np.random.default_rng(seed)
  batch_size = min(len(images), int(config.introvae.batch_size))
  history = []
  for _ in range(steps):
    batch = images[picker.choice(len(images), batch_size, replace=False)]
    state, metrics = step_fn(state, {'image': batch})
    history.append(metrics)
  history = jax.device_get(history)
  stacked = {k: np.asarray([m[k] for m in history]) for k in (history[0] if history else {})}
  return state, stacked
