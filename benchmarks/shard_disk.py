"""Shard disk of a WORKDIR's cohort: one fold vs every fold (issue 14's criterion).

`python -m benchmarks.shard_disk --workdir=WORKDIR [--out=FILE]` builds this code's shards for
the workdir's prepared cohort (prep/) and pseudo-normal volumes (pseudo_normal/) into a
temporary folder and reports their bytes: the tumor slices (one set for every fold), one
pseudo-normal companion per IntroVAE (one with a normal cohort, one per fold without), the
disk that `fold=k` and `fold=-1` need, and their ratio. Per-fold tumor datasets of the earlier
layout (tfds/tumor_slices/fold*) that the workdir still holds are listed beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import tempfile
import time

from clfc_jax.workdir import Workdir, read_config
from data_prep import optional, shards, store


def _bytes(directory) -> int:
  return sum(p.stat().st_size for p in Path(directory).rglob('*.tfrecord-*-of-*'))


def measure(workdir) -> dict:
  wd = Workdir(workdir)
  config = read_config(wd.config)
  tfds_builders = optional.tfds_builders()
  cases = len(store.prepared_ids(wd.prep_cases))
  num_folds = int(config.data.num_folds)
  keys = [None] if wd.has_normal_cohort() else list(range(num_folds))
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = Path(tmp) / 'tfds'
    start = time.perf_counter()
    tumor = tfds_builders.build(tfds_builders.tumor_slices_builder(config, data_dir,
                                                                   prep_dir=wd.prep))
    tumor_s = time.perf_counter() - start
    companions = {}
    for key in keys[:1]:   # every companion has the same size: build one, count it per key.
      pn_dir = wd.pseudo_normal_dir(key)
      if not any(pn_dir.glob('*.npz')):
        raise FileNotFoundError(f'{pn_dir}: no pseudo-normal volumes (run the stage first)')
      start = time.perf_counter()
      built = tfds_builders.build(tfds_builders.pseudo_normal_builder(
          config, data_dir, key, prep_dir=wd.prep, pseudo_normal_dir=pn_dir))
      companions[shards.key_name(key)] = (_bytes(built.data_dir), time.perf_counter() - start)
    tumor_bytes = _bytes(tumor.data_dir)
    companion_bytes = next(iter(companions.values()))[0]
  one_fold = tumor_bytes + companion_bytes
  every_fold = tumor_bytes + len(keys) * companion_bytes
  earlier = {d.name: _bytes(d) for d in sorted((wd.tfds / shards.TUMOR_DATASET).glob('fold*'))}
  return {
      'workdir': str(workdir), 'cases': cases, 'crop_hw': list(config.prep.crop_hw),
      'k': int(config.data.k), 'modalities': list(config.dataset.modalities),
      'introvaes': [shards.key_name(k) for k in keys],
      'tumor_mb': round(tumor_bytes / 2**20, 2), 'tumor_build_s': round(tumor_s, 1),
      'pseudo_normal_mb_each': round(companion_bytes / 2**20, 2),
      'one_fold_mb': round(one_fold / 2**20, 2), 'every_fold_mb': round(every_fold / 2**20, 2),
      'every_fold_over_one_fold': round(every_fold / one_fold, 3),
      # Without a normal cohort each fold has its own IntroVAE and companion (same size).
      'fallback_every_fold_over_one_fold': round(
          (tumor_bytes + num_folds * companion_bytes) / one_fold, 3),
      'mb_per_case': round(one_fold / max(cases, 1) / 2**20, 3),
      'earlier_layout_mb': {k: round(v / 2**20, 2) for k, v in earlier.items()},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  result = measure(args.workdir)
  print(json.dumps(result, indent=1))
  if args.out:
    store.write_text(Path(args.out), json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
