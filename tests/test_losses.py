"""Dice, cross-entropy and L_sim: hand-computed values, masking of tumor pixels, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax import losses
from clfc_jax.models.clfc import SimSiamHeads
from configs.default import get_config

LOG3 = float(np.log(3.0))


def four_pixels():
  """Foreground probabilities 0.75, 0.25, 0.5, 0.75 and labels 1, 0, 1, 0."""
  logits = jnp.array([[0.0, LOG3], [0.0, -LOG3], [0.0, 0.0], [0.0, LOG3]]).reshape(1, 2, 2, 2)
  label = jnp.array([1, 0, 1, 0], jnp.int32).reshape(1, 2, 2)
  return logits, label


def test_dice_loss_hand_computed():
  logits, label = four_pixels()
  s = 1e-5
  # Σpy = 0.75 + 0.5, Σp = 2.25, Σy = 2.
  expected = 1.0 - (2.0 * 1.25 + s) / (2.25 + 2.0 + s)
  assert float(losses.dice_loss(logits, label, s)) == pytest.approx(expected, rel=1e-6)
  # Pooled over the batch: two copies give the same value, not a mean of per-image values.
  both = losses.dice_loss(jnp.concatenate([logits] * 2), jnp.concatenate([label] * 2), 0.0)
  assert float(both) == pytest.approx(1.0 - 2.5 / 4.25, rel=1e-6)


def test_per_sample_dice_weighs_a_small_tumour_slice_like_a_large_one():
  """Slice A: the four pixels (Dice 2.5 / 4.25). Slice B: a one-pixel tumour predicted at 0.25
  among three 0.25 false pixels (Dice 0.5 / 2). Slice C: no tumour (left out). Pooled, B's
  miss hardly counts; per sample it is half the loss."""
  a_logits, a_label = four_pixels()
  b_logits = jnp.array([[0.0, -LOG3]] * 4).reshape(1, 2, 2, 2)   # p = 0.25 everywhere
  b_label = jnp.array([1, 0, 0, 0], jnp.int32).reshape(1, 2, 2)
  c_logits, c_label = b_logits, jnp.zeros((1, 2, 2), jnp.int32)
  logits = jnp.concatenate([a_logits, b_logits, c_logits])
  label = jnp.concatenate([a_label, b_label, c_label])
  per = 1.0 - 0.5 * (2.5 / 4.25 + 0.5 / 2.0)
  assert float(losses.per_sample_dice_loss(logits, label, 0.0)) == pytest.approx(per, rel=1e-6)
  pooled = 1.0 - (2.5 + 0.5) / (2.25 + 1.0 + 1.0 + 2.0 + 1.0)
  assert float(losses.dice_loss(logits, label, 0.0)) == pytest.approx(pooled, rel=1e-6)
  # The gradient on B's one tumour pixel (its foreground logit): per sample it is pushed up
  # harder than when pooled with A's pixels.
  push = lambda f: -float(jax.grad(lambda z: f(z, label, 0.0))(logits)[1, 0, 0, 1])
  assert push(losses.per_sample_dice_loss) > 1.5 * push(losses.dice_loss) > 0
  # A batch without tumour falls back to the pooled Dice (false positives still cost).
  assert float(losses.per_sample_dice_loss(c_logits, c_label, 1e-5)) == pytest.approx(
      float(losses.dice_loss(c_logits, c_label, 1e-5)), rel=1e-6)
  config = get_config()
  config.loss.dice_pooling = 'sample'
  out = {'logits': logits}
  total, metrics = losses.segmentation_loss(out, label, config)
  assert float(metrics['dice_loss']) == pytest.approx(
      float(losses.per_sample_dice_loss(logits, label, config.loss.dice_smooth)), rel=1e-6)
  config.loss.dice_fn_weight = 0.7   # the per-sample Dice has no Tversky form: not ignored
  with pytest.raises(ValueError, match='no Tversky form'):
    losses.segmentation_loss(out, label, config)
  config.loss.dice_pooling = 'volume'
  with pytest.raises(ValueError, match='dice_pooling'):
    losses.segmentation_loss(out, label, config)


def test_both_pooling_also_charges_false_positives_on_slices_without_tumour():
  """'sample' ignores a tumour-free slice beside a tumour slice, so false positives there are
  free; 'both' (the mean of the pooled and the per-slice Dice) charges them."""
  a_logits, a_label = four_pixels()
  hot = jnp.array([[0.0, LOG3]] * 4).reshape(1, 2, 2, 2)   # p = 0.75 on a slice without tumour
  logits = jnp.concatenate([a_logits, hot])
  label = jnp.concatenate([a_label, jnp.zeros((1, 2, 2), jnp.int32)])
  s = 1e-5
  expected = 0.5 * (float(losses.dice_loss(logits, label, s))
                    + float(losses.per_sample_dice_loss(logits, label, s)))
  both = lambda z: losses.sample_and_batch_dice_loss(z, label, s)
  assert float(both(logits)) == pytest.approx(expected, rel=1e-6)
  grad = lambda f: jax.grad(f)(logits)[1, ..., 1]     # the empty slice's foreground logits
  sample_grad = grad(lambda z: losses.per_sample_dice_loss(z, label, s))
  assert float(jnp.abs(sample_grad).max()) == 0.0
  assert float(grad(both).min()) > 0.0               # every false pixel is pushed down.
  config = get_config()
  config.loss.dice_pooling = 'both'
  _, metrics = losses.segmentation_loss({'logits': logits}, label, config)
  assert float(metrics['dice_loss']) == pytest.approx(
      float(losses.sample_and_batch_dice_loss(logits, label, config.loss.dice_smooth)),
      rel=1e-6)


def test_tversky_weights_misses_hand_computed():
  """β = 0.7: TP 1.25, FP Σp - TP = 1.0, FN Σy - TP = 0.75; β = 0.5 is the Dice exactly."""
  logits, label = four_pixels()
  s = 1e-5
  expected = 1.0 - (2.5 + s) / (2.5 + 2 * 0.3 * 1.0 + 2 * 0.7 * 0.75 + s)
  assert float(losses.dice_loss(logits, label, s, 0.7)) == pytest.approx(expected, rel=1e-6)
  assert float(losses.dice_loss(logits, label, s, 0.5)) == float(losses.dice_loss(logits, label, s))
  # A missed pixel now costs more than a false one: the gradient pushes the labelled 0.5
  # pixel up harder than the Dice does.
  grad = lambda b: jax.grad(lambda l: losses.dice_loss(l, label, s, b))(logits)[0, 1, 0, 1]
  assert float(grad(0.7)) < float(grad(0.5)) < 0


def test_cross_entropy_hand_computed():
  logits, label = four_pixels()
  expected = -(np.log(0.75) + np.log(0.75) + np.log(0.5) + np.log(0.25)) / 4
  assert float(losses.cross_entropy(logits, label)) == pytest.approx(expected, rel=1e-6)


def test_negative_cosine_values_and_stop_gradient():
  p = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
  z = jnp.array([[0.0, 3.0], [2.0, 2.0], [1.0, 0.0]])
  np.testing.assert_allclose(losses.negative_cosine(p, z), [0.0, -1.0, 0.0], atol=1e-6)
  grad_z = jax.grad(lambda z: jnp.sum(losses.negative_cosine(p, z)))(z)
  assert not np.any(grad_z)
  grad_p = jax.grad(lambda p: jnp.sum(losses.negative_cosine(p, z)))(p)
  assert np.all(np.isfinite(grad_p)) and np.any(grad_p)


@pytest.fixture(scope='module')
def level_features():
  zeta = jax.random.normal(jax.random.key(0), (2, 6, 5, 8))
  g = jax.random.normal(jax.random.key(1), (2, 6, 5, 8))
  normal = np.ones((2, 6, 5), bool)
  normal[0, 1:4, 1:3] = False
  normal[1, 2:5, 0:4] = False
  return zeta, g, jnp.asarray(normal)


def run_heads(mode, zeta, g, normal):
  heads = SimSiamHeads(dim=16, hidden=8, mask_mode=mode)
  variables = heads.init(jax.random.key(3), zeta, g, normal)
  out, new_vars = heads.apply(variables, zeta, g, normal, mutable=['batch_stats'])
  return out, new_vars, losses.simsiam_level_loss(out, mode)


@pytest.mark.parametrize('mode', ['normal_only', 'zero_tumor'])
def test_sim_loss_ignores_tumor_pixels(level_features, mode):
  zeta, g, normal = level_features
  tumor = ~normal[..., None]
  zeta2 = jnp.where(tumor, 100.0 * jax.random.normal(jax.random.key(4), zeta.shape), zeta)
  g2 = jnp.where(tumor, -50.0, g)
  out, stats, loss = run_heads(mode, zeta, g, normal)
  out2, stats2, loss2 = run_heads(mode, zeta2, g2, normal)
  assert float(loss) == pytest.approx(float(loss2), rel=1e-6, abs=1e-7)
  rows = np.asarray(normal).reshape(-1)
  for key in ('p_t', 'p_r', 'z_t', 'z_r'):
    np.testing.assert_allclose(out[key][rows], out2[key][rows], atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats2)):
    np.testing.assert_allclose(a, b, atol=1e-5)   # BatchNorm statistics ignore tumor too.


def test_normal_only_averages_over_normal_region(level_features):
  zeta, g, normal = level_features
  out, _, loss = run_heads('normal_only', zeta, g, normal)
  d = 0.5 * (losses.negative_cosine(out['p_t'], out['z_r']) +
             losses.negative_cosine(out['p_r'], out['z_t']))
  rows = np.asarray(normal).reshape(-1)
  assert float(loss) == pytest.approx(float(jnp.mean(d[rows])), rel=1e-5)
  assert float(loss) != pytest.approx(float(jnp.mean(d)), rel=1e-3)


def test_segmentation_loss_sums_its_terms(level_features):
  zeta, g, normal = level_features
  heads, _, level_loss = run_heads('normal_only', zeta, g, normal)
  logits, label = four_pixels()
  config = get_config()
  config.loss.ce_weight = 0.5
  config.loss.sim_weight = 2.0
  outputs = {'logits': logits, 'levels': [], 'simsiam': [heads, heads]}
  loss, metrics = losses.segmentation_loss(outputs, label, config)
  assert set(metrics) == {'loss', 'dice_loss', 'ce', 'sim', 'sim_l0', 'sim_l1'}
  expected = metrics['dice_loss'] + 0.5 * metrics['ce'] + 2.0 * 2 * level_loss
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  assert float(metrics['loss']) == float(loss)
  # Without SimSiam outputs (baseline1/2, unet) L_sim is zero.
  loss_plain, metrics_plain = losses.segmentation_loss({'logits': logits}, label, config)
  assert float(metrics_plain['sim']) == 0.0
  assert float(loss_plain) == pytest.approx(float(metrics['dice_loss'] + 0.5 * metrics['ce']))


def test_region_dice_hand_computed_one_dice_per_region():
  # Region 0: probabilities 0.75, 0.25, 0.5, 0.75 against 1, 0, 1, 0 (as four_pixels).
  # Region 1: all 0.25 against a single positive pixel.
  z0 = jnp.array([LOG3, -LOG3, 0.0, LOG3])
  z1 = jnp.full((4,), -LOG3)
  logits = jnp.stack([z0, z1], -1).reshape(1, 2, 2, 2)
  targets = jnp.array([[1, 0], [0, 0], [1, 0], [0, 1]], jnp.float32).reshape(1, 2, 2, 2)
  s = 1e-5
  d0 = (2 * 1.25 + s) / (2.25 + 2 + s)
  d1 = (2 * 0.25 + s) / (1.0 + 1 + s)
  loss = losses.region_dice_loss(logits, targets, s)
  assert float(loss) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
  # Not the Dice of the pooled channels: regions weigh equally whatever their size.
  pooled = 1 - (2 * (1.25 + 0.25) + s) / (3.25 + 3 + s)
  assert float(loss) != pytest.approx(pooled, rel=1e-3)
  grad = jax.grad(lambda z: losses.region_dice_loss(z, targets, s))(logits)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[..., 1]).ravel()[3] < 0)
  with pytest.raises(ValueError, match='differ'):
    losses.region_dice_loss(logits, targets[..., :1], s)


def test_region_dice_with_one_region_is_the_softmax_dice():
  # A two-class softmax with logits (0, z) has foreground probability sigmoid(z).
  z = jax.random.normal(jax.random.key(5), (3, 4, 5, 1))
  label = (jax.random.uniform(jax.random.key(6), (3, 4, 5)) < 0.3).astype(jnp.int32)
  softmax_logits = jnp.concatenate([jnp.zeros_like(z), z], -1)
  region = losses.region_dice_loss(z, label[..., None].astype(jnp.float32), 1e-5)
  assert float(region) == pytest.approx(float(losses.dice_loss(softmax_logits, label, 1e-5)),
                                        rel=1e-5)


def test_region_targets_follow_the_label_convention():
  from data_prep import labels  # pylint: disable=g-import-not-at-top
  label = np.array([[0, 1, 2], [4, 2, 1]], np.int32)
  values = [labels.region_values('brats2021', r) for r in labels.region_names('wt_tc_et')]
  targets = losses.region_targets(jnp.asarray(label), values)
  assert targets.shape == (2, 3, 3) and targets.dtype == jnp.float32
  np.testing.assert_array_equal(targets,
                                labels.region_masks(label, 'brats2021').astype(np.float32))
  jitted = jax.jit(losses.region_targets, static_argnums=1)
  np.testing.assert_array_equal(jitted(jnp.asarray(label), tuple(values)), targets)
