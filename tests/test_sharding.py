"""Mesh, shardings and host-batch -> global-array conversion on 4 forced CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax import sharding
from configs import default


def _host_batch(b=4, h=8, w=6):
  rng = np.random.default_rng(0)
  return {
      'image': rng.standard_normal((b, h, w, 3)).astype(np.float32),
      'label': rng.integers(0, 2, (b, h, w)).astype(np.int32),
      'brain': rng.random((b, h, w)) > 0.5,
      'patient': np.array([b'p%d' % i for i in range(b)]),
      'slice': np.arange(b, dtype=np.int32),
  }


def test_mesh_spans_every_device_on_one_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.devices.size == jax.device_count() == 4


def test_global_batch_splits_rows_and_keeps_values():
  mesh = sharding.make_mesh()
  host = _host_batch()
  batch = sharding.global_batch(host, mesh)
  assert set(batch) == {'image', 'label', 'brain', 'slice'}   # bytes ids stay on the host
  for name, arr in batch.items():
    assert arr.shape == host[name].shape and arr.dtype == host[name].dtype
    assert arr.sharding.is_equivalent_to(sharding.data_sharding(mesh), arr.ndim)
    np.testing.assert_array_equal(np.asarray(arr), host[name])
  # Every device holds one distinct row.
  rows = sorted(int(s.data[0]) for s in batch['slice'].addressable_shards)
  assert rows == [0, 1, 2, 3]


def test_global_reduction_under_jit_sees_the_whole_batch():
  mesh = sharding.make_mesh()
  host = _host_batch()
  batch = sharding.global_batch(host, mesh)
  total = jax.jit(lambda x: jnp.mean(x), out_shardings=sharding.replicated(mesh))(batch['image'])
  np.testing.assert_allclose(float(total), host['image'].mean(), rtol=1e-5)


def test_split_batch_returns_the_host_only_fields():
  numeric, other = sharding.split_batch(_host_batch())
  assert set(other) == {'patient'} and 'slice' in numeric


def test_uneven_batch_names_the_field():
  mesh = sharding.make_mesh()
  host = _host_batch(b=3)
  with pytest.raises(ValueError, match="'image'.*4 local devices"):
    sharding.global_batch(host, mesh)


def test_distributed_is_left_alone_unless_asked():
  config = default.get_config()
  assert not config.train.distributed
  assert sharding.maybe_initialize_distributed(config) is False
  assert jax.process_count() == 1
