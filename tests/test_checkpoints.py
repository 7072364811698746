"""Checkpointer: bitwise round trips of a train-state-like pytree, best/latest retention, resume."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clfc_jax import checkpoints
from clfc_jax import sharding as sharding_lib
from compiles import xla_compiles


TX = optax.chain(optax.clip_by_global_norm(12.0), optax.add_decayed_weights(3e-5),
                 optax.sgd(1e-2, momentum=0.95, nesterov=True))


@jax.jit
def opt_state_after_one_update(params):
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  return TX.update(grads, TX.init(params), params)[1]


def make_state(seed, on=None):
  """params, batch_stats, SGD-Nesterov opt_state after one update, step, typed and raw keys."""
  rng = np.random.default_rng(seed)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                     'bias': rng.normal(size=4).astype(np.float32)},
            'head': {'kernel': jnp.asarray(rng.normal(size=(4, 2)), jnp.bfloat16)}}
  batch_stats = {'bn': {'mean': rng.normal(size=4).astype(np.float32),
                        'var': rng.uniform(size=4).astype(np.float32)}}
  state = {'params': params, 'batch_stats': batch_stats,
           'opt_state': opt_state_after_one_update(params),
           'step': np.int32(100 + seed),
           'rng': jax.random.key(seed), 'raw_rng': jax.random.PRNGKey(seed + 1)}
  return jax.device_put(state, on)


def assert_bitwise_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(np.asarray(got).reshape(-1).view(np.uint8),
                                  np.asarray(want).reshape(-1).view(np.uint8))


@pytest.fixture(scope='module')
def replicated():
  mesh = sharding_lib.make_mesh()
  assert mesh.size == 4
  return sharding_lib.replicated(mesh)


def test_round_trip_is_bitwise_with_extra(tmp_path, replicated):
  state = make_state(0, replicated)
  extra = {'epoch': 3, 'input_position': [12, 5], 'note': 'after eval'}
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.restore_latest(state) is None and ckpt.best_step() is None
    assert ckpt.save(100, state, metrics={'val_dice': 0.5}, extra=extra)
    restored, restored_extra = ckpt.restore_latest(state)
  assert_bitwise_equal(restored, state)
  assert restored_extra == extra
  assert int(restored['step']) == 100
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
  # The restored key still draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.uniform(restored['rng'], (3,)),
                                jax.random.uniform(state['rng'], (3,)))


def test_restore_onto_four_replicated_devices(tmp_path, replicated):
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = make_state(1, single)
  with checkpoints.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(1, state)
    # An abstract target from eval_shape carries no sharding: it is replicated over all devices.
    abstract = jax.eval_shape(lambda: make_state(1))
    restored, extra = ckpt.restore_latest(abstract)
  assert extra == {}
  assert_bitwise_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
    assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)



def test_saving_a_replicated_state_compiles_nothing_and_survives_donation(tmp_path, replicated):
  """One replica is written: no per-(shape, device) slice programs (orbax's replica-parallel
  default compiled 4 per shape here), and the step that donates the state right after a save
  neither breaks the save nor changes what it wrote."""
  state = make_state(2, replicated)
  expected = jax.device_get(state)
  with xla_compiles() as compiles:
    with checkpoints.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
      ckpt.save(7, state)
  assert compiles == []
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x if x.dtype != jnp.float32 else x + 1, s),
                 donate_argnums=0)
  with checkpoints.Checkpointer(tmp_path / 'donated', max_to_keep=1) as ckpt:
    ckpt.save(8, state)
    state = bump(state)                # the saved buffers are donated while the save finishes
    restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: make_state(2)))
  assert_bitwise_equal(restored, expected)
  with checkpoints.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    assert_bitwise_equal(ckpt.restore(7, restored)[0], expected)

def test_keeps_latest_and_best(tmp_path, replicated):
  dice = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.4, 6: math.nan}
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step, value in dice.items():
      ckpt.save(step, make_state(step, replicated), metrics={'val_dice': value, 'loss': 1.0},
                extra={'epoch': step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.latest_step() == 6 and ckpt.best_step() == 2
  # A resumed run sees the same steps and the same best.
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 6 and ckpt.best_step() == 2
    state, extra = ckpt.restore_best(make_state(0, replicated))
    assert_bitwise_equal(state, make_state(2, replicated))
    assert extra == {'epoch': 2}
    ckpt.save(7, make_state(7, replicated), metrics={'val_dice': 0.95})
    ckpt.save(8, make_state(8, replicated))   # no metrics: kept only while among the latest.
    ckpt.save(9, make_state(9, replicated))
    ckpt.wait()
    assert ckpt.all_steps() == [7, 8, 9] and ckpt.best_step() == 7


def test_min_mode_and_missing_metric(tmp_path, replicated):
  with checkpoints.Checkpointer(tmp_path, max_to_keep=1, best_metric='val_loss',
                                best_mode='min') as ckpt:
    for step, loss in enumerate([3.0, 1.0, 2.0], start=1):
      ckpt.save(step, make_state(step, replicated), metrics={'val_loss': loss})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2
    with pytest.raises(ValueError, match="lack the tracked 'val_loss'"):
      ckpt.save(4, make_state(4, replicated), metrics={'val_dice': 0.5})
  with pytest.raises(ValueError, match='best_mode'):
    checkpoints.Checkpointer(tmp_path, max_to_keep=1, best_mode='largest')


def test_interrupted_save_does_not_break_resume(tmp_path, replicated):
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    ckpt.save(1, make_state(1, replicated), metrics={'val_dice': 0.1})
    ckpt.save(2, make_state(2, replicated), metrics={'val_dice': 0.2})
  # What a save killed half-way leaves behind: orbax's temporary folder with partial files.
  partial = tmp_path / '3.orbax-checkpoint-tmp-1700000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'half_written').write_bytes(b'\x00' * 10)
  with checkpoints.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 2
    state, _ = ckpt.restore_latest(make_state(0, replicated))
    assert_bitwise_equal(state, make_state(2, replicated))
    ckpt.save(3, make_state(3, replicated))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    assert_bitwise_equal(ckpt.restore_latest(make_state(0, replicated))[0],
                         make_state(3, replicated))
  assert not partial.exists()


def test_non_array_leaf_is_named(tmp_path):
  with checkpoints.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(1, {'w': jnp.ones(2), 'step': jnp.asarray(1)})
    with pytest.raises(TypeError, match=r"\['step'\] is a int"):
      ckpt.restore_latest({'w': jnp.ones(2), 'step': 1})
