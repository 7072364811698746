"""One process of tests/test_distributed.py's two-process jax.distributed training run.

`python tests/distributed_worker.py PROCESS_ID PORT DATA_DIR WORKDIR OUT_JSON`: joins a
2-process job on 127.0.0.1:PORT (1 CPU device each, gloo collectives), trains the tiny config
with trainer.train_and_evaluate, and writes the (patient, slice) ids it read and a hash of the
final parameters to OUT_JSON.
"""
import hashlib
import json
import sys

import jax
import numpy as np


def tiny_config(process_id: int, port: int):
  from tiny_configs import tiny_train_config  # pylint: disable=g-import-not-at-top
  c = tiny_train_config()
  c.train.steps_per_epoch = 2
  c.train.log_every_steps = 1
  c.train.distributed = True
  c.train.coordinator_address = f'127.0.0.1:{port}'
  c.train.num_processes = 2
  c.train.process_id = process_id
  return c


def params_hash(params) -> str:
  """sha256 over this process's copy of every (replicated) parameter's bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf.addressable_data(0)).tobytes())
  return h.hexdigest()


def main(process_id, port, data_dir, workdir, out_json):
  # CPU collectives across processes go through gloo (the default has none).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  from clfc_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from clfc_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  c = tiny_config(int(process_id), int(port))
  read = []

  def record_ids(batch, step):
    read.extend((p.decode(), int(s), step) for p, s in zip(batch['patient'], batch['slice']))
    return batch

  summary = trainer.train_and_evaluate(c, workdir, 0, batch_hook=record_ids, data_dir=data_dir)
  state, _, _ = trainer.restore_state(c, Workdir(workdir).run_dir(c.method, 0), best=False)
  result = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
            'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
            'read': read, 'params_hash': params_hash(state.params),
            'step': int(state.step), 'summary': summary}
  with open(out_json, 'w', encoding='utf-8') as f:
    json.dump(result, f)
  print(f'process {jax.process_index()}: params sha256 {result["params_hash"]}', flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:6])
