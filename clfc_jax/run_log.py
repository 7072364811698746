"""What every training loop shares: its log (metrics.jsonl + TensorBoard on process 0), the
per-epoch data seed that makes resumes exact, and the finite checks that stop a diverged run."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

METRICS_NAME = 'metrics.jsonl'


def epoch_seed(seed: int, epoch: int, stream: str = '') -> int:
  """The data-stream seed of one epoch: a 31-bit hash of (stream, seed, epoch)."""
  key = f'{stream}:{int(seed)}:{int(epoch)}' if stream else f'{int(seed)}:{int(epoch)}'
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], 'little') >> 1


@jax.jit
def all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def nonfinite_terms(host_metrics, order: Sequence[str] = ()) -> list:
  """Names of the non-finite metrics; those listed in `order` first (e.g. loss terms before
  their sum), so an error names the term that went bad."""
  bad = [k for k, v in host_metrics.items() if not np.all(np.isfinite(v))]
  rank = {k: i for i, k in enumerate(order)}
  return sorted(bad, key=lambda k: (rank.get(k.split('_l')[0] if k.startswith('sim_l') else k,
                                             len(rank)), k))


class RunLog:
  """metrics.jsonl + TensorBoard scalars, written on process 0 only (a no-op elsewhere)."""

  def __init__(self, directory: Path, enabled: bool, tb_prefix: Optional[str] = None):
    self.enabled = enabled
    self._tb_prefix = tb_prefix
    if enabled:
      self._writer = SummaryWriter(str(directory))
      self._jsonl = open(Path(directory) / METRICS_NAME, 'a', encoding='utf-8')

  def event(self, kind: str, step: int, scalars=None, tb_prefix=None, **fields):
    """One JSON line; the scalars also go to TensorBoard under `tb_prefix/` when one is set."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in (scalars or {}).items()}
    record = {'event': kind, 'step': int(step), 'time': round(time.time(), 3), **fields,
              **scalars}
    self._jsonl.write(json.dumps(record, default=str) + '\n')
    self._jsonl.flush()
    prefix = tb_prefix or self._tb_prefix
    if prefix and scalars:
      for name, value in scalars.items():
        self._writer.add_scalar(f'{prefix}/{name}', value, int(step))
      self._writer.flush()

  def close(self):
    if self.enabled:
      self._writer.close()
      self._jsonl.close()


def read_events(path) -> list:
  """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
  records = []
  for line in Path(path).read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records
