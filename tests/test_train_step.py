"""The optimizer (SPEC §7), and the jitted train/eval steps on 4 forced CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clfc_jax import sharding
from clfc_jax import train
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
