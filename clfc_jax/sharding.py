"""One data-parallel mesh over every device, and host-local numpy batches turned into global arrays.

The state is replicated and the batch is split along the 'data' axis; under jit, XLA inserts
the cross-device reductions itself (BatchNorm statistics and gradients are global), so no
pmap or explicit pmean is needed anywhere.
"""
from typing import Mapping

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def maybe_initialize_distributed(config) -> bool:
  """Joins a multi-host job when config.train.distributed; returns whether it did.

  Empty/negative coordinator, process count and id leave them to JAX's cluster auto-detection
  (SLURM, TPU pods, ...). Must run before any other JAX call touches the devices.
  """
  t = config.train
  if not t.distributed:
    return False
  kwargs = {}
  if t.get('coordinator_address', ''):
    kwargs['coordinator_address'] = t.coordinator_address
  if t.get('num_processes', -1) >= 0:
    kwargs['num_processes'] = t.num_processes
  if t.get('process_id', -1) >= 0:
    kwargs['process_id'] = t.process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over all devices of every process (or the ones given)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (train state, scalars)."""
  return NamedSharding(mesh, P())


def is_numeric(value) -> bool:
  """Whether a batch field can become a jax.Array (patient ids are bytes and cannot)."""
  dtype = np.asarray(value).dtype
  return dtype.kind in 'biuf'


def split_batch(local_batch: Mapping[str, np.ndarray]):
  """(numeric fields, everything else): the second stays on the host, e.g. patient ids."""
  numeric = {k: v for k, v in local_batch.items() if is_numeric(v)}
  other = {k: v for k, v in local_batch.items() if k not in numeric}
  return numeric, other


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's slice of the batch -> global jax.Arrays sharded over 'data'.

  Every process passes its own rows (B_global / process_count of them); non-numeric fields
  (patient ids) are dropped here, take them from `split_batch` when they are needed. The local
  batch must divide evenly over the local devices.
  """
  numeric, _ = split_batch(local_batch)
  sharding = data_sharding(mesh)
  n_local = len(mesh.local_devices)
  out = {}
  for name, value in numeric.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % n_local:
      raise ValueError(f'batch field {name!r} has shape {value.shape}: its leading axis must '
                       f'divide evenly over the {n_local} local devices')
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
