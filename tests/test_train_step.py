"""The optimizer (SPEC §7), and the jitted train/eval steps on 4 forced CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clfc_jax import sharding
from clfc_jax.train import steps as train
from configs import default


def _config(method='clfc', per_epoch=False):
  c = default.get_config()
  default.apply_method(c, method)
  c.train.poly_per_epoch = per_epoch
  c.train.epochs = 10
  c.train.steps_per_epoch = 5
  return c


# --- Optimizer ----------------------------------------------------------------------------------

def test_lr_starts_at_base_and_follows_poly_per_step():
  c = _config()
  total = train.total_train_steps(c)
  schedule = train.learning_rate_schedule(c)
  assert float(schedule(0)) == pytest.approx(c.train.lr)
  for step in (1, 7, 25, 49):
    expected = c.train.lr * (1 - step / total) ** c.train.poly_power
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
  assert float(schedule(total)) == 0.0


def test_lr_steps_once_per_epoch():
  c = _config(per_epoch=True)
  schedule = train.learning_rate_schedule(c)
  spe = c.train.steps_per_epoch
  within = [float(schedule(s)) for s in range(spe, 2 * spe)]
  assert within == pytest.approx([within[0]] * spe)
  assert within[0] == pytest.approx(c.train.lr * (1 - 1 / c.train.epochs) ** c.train.poly_power,
                                    rel=1e-5)


def _torch_sgd_reference(params, grads_seq, c, total):
  """PyTorch semantics written out: clip_grad_norm_, then SGD(nesterov, coupled weight decay)."""
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  buf = None
  for step, g in enumerate(grads_seq):
    norm = np.sqrt(sum((np.asarray(x, np.float64) ** 2).sum() for x in g.values()))
    scale = min(1.0, c.train.clip_norm / (norm + 1e-6))
    d = {k: scale * np.asarray(g[k], np.float64) + c.train.weight_decay * p[k] for k in p}
    buf = d if buf is None else {k: c.train.momentum * buf[k] + d[k] for k in p}
    lr = c.train.lr * (1 - step / total) ** c.train.poly_power
    p = {k: p[k] - lr * (d[k] + c.train.momentum * buf[k]) for k in p}
  return p


def test_optimizer_matches_pytorch_sgd_order_with_clipping_and_coupled_decay():
  c = _config()
  c.train.weight_decay = 0.1   # large, so a decoupled or misplaced decay would show.
  total = train.total_train_steps(c)
  rng = np.random.default_rng(0)
  params = {'w': rng.standard_normal((3, 4)).astype(np.float32),
            'b': rng.standard_normal((4,)).astype(np.float32)}
  # Step 0 and 2 are small gradients, step 1 is huge and must be clipped.
  grads_seq = [{k: (s * rng.standard_normal(v.shape)).astype(np.float32)
                for k, v in params.items()} for s in (0.5, 1000.0, 0.5)]
  tx = train.make_optimizer(c, total)
  state = tx.init(params)
  p = jax.tree.map(jnp.asarray, params)
  for g in grads_seq:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  expected = _torch_sgd_reference(params, grads_seq, c, total)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-6)


def test_clipping_engages_for_huge_gradients_only():
  c = _config()
  c.train.weight_decay = 0.0
  tx = train.make_optimizer(c)
  params = {'w': jnp.zeros((10,))}
  first_update_norm = lambda g: float(optax.tree.norm(tx.update(g, tx.init(params), params)[0]))
  nesterov_gain = c.train.lr * (1 + c.train.momentum)   # first Nesterov step: lr·(1+m)·g
  huge = {'w': jnp.full((10,), 1e4)}
  small = {'w': jnp.full((10,), 0.1)}
  assert first_update_norm(huge) == pytest.approx(nesterov_gain * c.train.clip_norm, rel=1e-5)
  assert first_update_norm(small) == pytest.approx(nesterov_gain * float(optax.tree.norm(small)),
                                                   rel=1e-5)


# --- Jitted steps on the real model -------------------------------------------------------------

def _tiny_config(method='clfc'):
  c = _config(method)
  c.model.width = 0.125
  c.prep.crop_hw = (32, 32)
  c.data.k = 1
  c.train.batch_size = 4
  return c


def _host_batch(c, seed):
  rng = np.random.default_rng(seed)
  b, (h, w), s = c.train.batch_size, c.prep.crop_hw, 2 * c.data.k + 1
  label = np.zeros((b, h, w), np.int32)
  label[:, 8:20, 10:22] = 1                               # a tumor block in every slice
  image = rng.standard_normal((b, h, w, 4 * s)).astype(np.float32) + 2.0 * label[..., None]
  batch = {'image': image, 'label': label, 'brain': np.ones((b, h, w), bool),
           'patient': np.array([b'case%d' % i for i in range(b)]),
           'slice': np.arange(b, dtype=np.int32)}
  if c.model.use_normal_net:
    batch['normal'] = rng.standard_normal((b, h, w, s)).astype(np.float32)
  return batch


def _key(seed=0):
  # 'rbg' keys compile parameter init several times faster than threefry on XLA:CPU.
  return jax.random.key(seed, impl='rbg')


def _steps(c, mesh):
  return train.make_jitted_steps(c, mesh, compiler_options=train.CHEAP_CPU_COMPILE)


def _train(steps, state, c, mesh, seeds):
  losses = []
  for seed in seeds:
    state, metrics = steps.train(state, sharding.global_batch(_host_batch(c, seed), mesh))
    losses.append(float(metrics['loss']))
  return state, losses, metrics


@pytest.fixture(scope='module')
def clfc_runs():
  """Two steps from one initial state, with the batch over 4 devices and on one device."""
  c = _tiny_config()
  mesh4, mesh1 = sharding.make_mesh(), sharding.make_mesh(jax.devices()[:1])
  steps4, steps1 = _steps(c, mesh4), _steps(c, mesh1)
  initial = steps4.init(_key())
  # Fresh buffers for every consumer: the train steps donate their input state.
  state1 = jax.device_put(jax.tree.map(jnp.copy, initial), sharding.replicated(mesh1))
  keep = jax.tree.map(jnp.copy, initial)
  sharded = _train(steps4, initial, c, mesh4, (0, 1))
  single = _train(steps1, state1, c, mesh1, (0, 1))
  return c, steps4, keep, sharded, single


def test_sharded_step_equals_single_device_step(clfc_runs):
  _, _, _, (state4, losses4, _), (state1, losses1, _) = clfc_runs
  np.testing.assert_allclose(losses4, losses1, rtol=1e-4)
  assert int(state4.step) == int(state1.step) == 2
  for name, a, b in (('params', state4.params, state1.params),
                     ('batch_stats', state4.batch_stats, state1.batch_stats)):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name}{jax.tree_util.keystr(path)}')


def test_step_is_replicated_and_changes_every_parameter(clfc_runs):
  c, _, initial, (state, _, metrics), _ = clfc_runs
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated
  # Two SGD steps with coupled weight decay move every parameter tensor.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, initial.params)
  assert all(jax.tree.leaves(moved)), moved
  for key in ('loss', 'dice_loss', 'sim', 'grad_norm', 'lr'):
    assert np.isfinite(float(metrics[key])), key
  # The metric is the rate the last step (step 1 of 50, per-step poly) used.
  total = train.total_train_steps(c)
  assert float(metrics['lr']) == pytest.approx(c.train.lr * (1 - 1 / total) ** c.train.poly_power)


def test_training_lowers_the_dice_loss_on_a_fixed_batch(clfc_runs):
  c, steps, initial, _, _ = clfc_runs
  mesh = sharding.make_mesh()
  state = jax.tree.map(jnp.copy, initial)
  batch = sharding.global_batch(_host_batch(c, 0), mesh)
  dice = []
  for _ in range(10):
    state, metrics = steps.train(state, batch)
    dice.append(float(metrics['dice_loss']))
  # Soft Dice starts flat at random init; every step must still go downhill.
  assert all(np.diff(dice) < 0) and dice[-1] < dice[0] - 5e-4, dice


def test_eval_step_gives_probabilities_and_matching_predictions(clfc_runs):
  c, steps, _, (state, _, _), _ = clfc_runs
  mesh = sharding.make_mesh()
  batch = sharding.global_batch(_host_batch(c, 5), mesh)
  out = steps.eval(state.variables, batch)
  b, (h, w) = c.train.batch_size, c.prep.crop_hw
  probs, pred = np.asarray(out['probs']), np.asarray(out['pred'])
  assert probs.shape == pred.shape == (b, h, w) and pred.dtype == np.int32
  assert probs.min() >= 0.0 and probs.max() <= 1.0
  np.testing.assert_array_equal(pred, (probs > 0.5).astype(np.int32))
  # TTA = the mean over the four in-plane mirrorings, each mirrored back.
  c_tta = _tiny_config()
  c_tta.eval.tta = True
  tta = np.asarray(_steps(c_tta, mesh).eval(state.variables, batch)['probs'])
  host = _host_batch(c, 5)
  expected = np.zeros_like(probs)
  for axes in ((), (1,), (2,), (1, 2)):
    flipped = {k: np.flip(v, axes) if v.ndim == 4 else v for k, v in host.items()}
    p = np.asarray(steps.eval(state.variables, sharding.global_batch(flipped, mesh))['probs'])
    expected += np.flip(p, axes) / 4
  np.testing.assert_allclose(tta, expected, atol=1e-5)
  assert not np.allclose(tta, probs, atol=1e-3)


def test_bfloat16_activations_keep_float32_params_and_a_close_loss(clfc_runs):
  c, _, initial, _, _ = clfc_runs
  c16 = _tiny_config()
  c16.model.dtype = 'bfloat16'
  mesh = sharding.make_mesh()
  batch = sharding.global_batch(_host_batch(c, 0), mesh)
  state = jax.tree.map(jnp.copy, initial)
  state16, metrics16 = _steps(c16, mesh).train(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
  # Same initial state and batch as the float32 run's first step.
  losses32 = clfc_runs[3][1]
  assert float(metrics16['loss']) == pytest.approx(losses32[0], abs=3e-2)
