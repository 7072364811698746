"""Input-pipeline throughput: slices/s of train_iterator (augmentation on) vs the step's demand.

`python -m benchmarks.pipeline [--sizes=demo,full,brats] [--seconds=20] [--threads=N]` builds a
toy prepared cohort (smooth random volumes with a bright blob as tumor, written in the prep
format), its TFDS shards (TensorFlow writes them: the tumor slices once for every fold, then the
pseudo-normal companion), and times `input_pipeline.train_iterator` (grain, no TensorFlow) at
the demo size (96x80) and at 192x160, K=2, B=4: slices/s with `--threads` reader threads
(default: every core), and slices per CPU-second of the whole process (every reader thread
counted), the rate one core sustains. A train step consumes config.train.batch_size slices;
the report says how many steps per second the pipeline could feed, next to the clfc step's
demand (CLFC_STEP_DEMAND). Every row also gives shard bytes and build seconds per case;
'brats' is the full size with 155 slices per case (BraTS's 1 mm 240x240x155 after cropping
to 192x160), for those two numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from clfc_jax import input_pipeline
from configs import default, demo
from data_prep import examples, optional, store

# Slices/s the clfc train step consumes at B=4, 192x160, K=2: on a GPU (the figure) and
# on this project's 2-core CPU (4 slices per 2.5 s step, README's Performance table).
CLFC_STEP_DEMAND = {'gpu': 2000.0, 'cpu_2_cores': 4 / 2.5}


def toy_prepared_cohort(prep_dir, *, num_cases=8, num_normal=0, z=12, hw=(32, 32),
                        modalities=('t1', 't1ce', 't2', 'flair'), seed=0,
                        groups=('HGG', 'LGG')) -> list:
  """Writes `num_cases` tumor cases to prep_dir/cases (and normal subjects to prep_dir/normal).

  Volumes: an ellipsoidal brain of smooth random texture; the tumor (label 2 core, 1 rim) is a
  ball, brighter than the brain in every modality, in the upper half of the volume, so the
  lowest slices are tumor-free. Returns the tumor case ids.
  """
  rng = np.random.default_rng(seed)
  h, w = hw
  zz, yy, xx = np.mgrid[:z, :h, :w].astype(np.float32)
  brain = (((zz - (z - 1) / 2) / (0.5 * z)) ** 2 + ((yy - (h - 1) / 2) / (0.42 * h)) ** 2 +
           ((xx - (w - 1) / 2) / (0.42 * w)) ** 2) < 1
  ids = []
  for i in range(num_cases + num_normal):
    normal = i >= num_cases
    mods = ('t1',) if normal else tuple(modalities)
    tex = ndimage.gaussian_filter(rng.normal(size=(len(mods), z, h, w)), (0, 1, 2, 2))
    images = (1.0 + 0.3 * tex / tex.std()) * rng.uniform(0.5, 2.0, (len(mods), 1, 1, 1))
    label = None
    if not normal:
      centre = (rng.uniform(0.6, 0.75) * z, rng.uniform(0.35, 0.65) * h,
                rng.uniform(0.35, 0.65) * w)
      r = np.sqrt(((zz - centre[0]) / 2.0) ** 2 + ((yy - centre[1]) / (0.12 * h)) ** 2 +
                  ((xx - centre[2]) / (0.12 * w)) ** 2)
      label = (np.where(r < 0.6, 2, 0) + np.where((r >= 0.6) & (r < 1), 1, 0)).astype(np.uint8)
      label *= brain
      images = images + 1.5 * (label > 0) * images.mean()
    images = np.clip(images, 0.05, None) * brain
    case_id = f'N{i:03d}' if normal else f'P{i:03d}'
    meta = {'modalities': list(mods), 'group': 'normal' if normal else groups[i % len(groups)]}
    store.save_prepared(store.PreparedCase(case_id, images.astype(np.float32), brain, label, meta),
                        Path(prep_dir) / ('normal' if normal else 'cases'))
    if not normal:
      ids.append(case_id)
  return ids


def write_toy_pseudo_normals(prep_dir, out_dir, ids):
  """Stand-in pseudo-normal T1s (the case's T1 rescaled to [-1, 1]) in the stage's format."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for cid in ids:
    pc = store.load_prepared(Path(prep_dir) / store.CASES_DIR, cid)
    t1 = pc.images[0]
    np.savez(out_dir / f'{cid}.npz', t1=(2 * t1 / max(t1.max(), 1e-6) - 1).astype(np.float32))


def measure(config, data_dir, seconds: float, fold: int = 0) -> dict:
  """Slices/s of train_iterator (after a warm-up batch), single process, and slices per
  CPU-second of this process (all its threads)."""
  batch = int(config.train.batch_size)
  it = input_pipeline.train_iterator(config, data_dir, fold, global_batch_size=batch,
                                     process_index=0, process_count=1, seed=0)
  try:
    next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
      n += len(next(it)['slice'])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  finally:
    it.close()
  rate = n / wall
  return {'slices_per_s': round(rate, 1), 'steps_per_s_fed': round(rate / batch, 2),
          'slices_per_cpu_s': round(n / cpu, 1), 'batch': batch,
          'read_threads': int(config.data.read_threads),
          'vs_gpu_demand': round(rate / CLFC_STEP_DEMAND['gpu'], 3),
          'vs_cpu_demand': round(rate / CLFC_STEP_DEMAND['cpu_2_cores'], 1),
          'load_avg': round(os.getloadavg()[0], 2)}


def _bytes(directory) -> int:
  return sum(p.stat().st_size for p in Path(directory).glob('*.tfrecord-*-of-*'))


def build_shards(config, work: Path) -> dict:
  """Builds the tumor slices and their pseudo-normal companion; bytes and seconds of each."""
  tfds_builders = optional.tfds_builders()
  start = time.perf_counter()
  tumor = tfds_builders.build(tfds_builders.tumor_slices_builder(config, work / 'tfds'))
  mid = time.perf_counter()
  companion = tfds_builders.build(tfds_builders.pseudo_normal_builder(config, work / 'tfds', None))
  end = time.perf_counter()
  return {'tumor_bytes': _bytes(tumor.data_dir), 'pseudo_normal_bytes': _bytes(companion.data_dir),
          'tumor_build_s': mid - start, 'pseudo_normal_build_s': end - mid}


def run(sizes=('demo', 'full'), seconds: float = 20.0, num_cases: int = 6, z: int = 40,
        threads: int = 0) -> list:
  results = []
  for size in sizes:
    config = demo.get_config() if size == 'demo' else default.get_config()
    size_z = 155 if size == 'brats' else z
    size_cases = 3 if size == 'brats' else num_cases
    config.data.num_folds = 3
    config.data.read_threads = threads or os.cpu_count()
    config.train.batch_size = 4   # the paper's batch: the train step's demand per step.
    with tempfile.TemporaryDirectory() as tmp:
      print(f'pipeline: {size} size {tuple(config.prep.crop_hw)}: toy cohort and shards',
            file=sys.stderr, flush=True)
      work = Path(tmp)
      ids = toy_prepared_cohort(work / 'prep', num_cases=size_cases, num_normal=1, z=size_z,
                                hw=tuple(config.prep.crop_hw),
                                modalities=tuple(config.dataset.modalities))
      write_toy_pseudo_normals(work / 'prep', work / 'pseudo_normal', ids)
      built = build_shards(config, work)
      row = {'size': size, 'crop_hw': list(config.prep.crop_hw), 'k': int(config.data.k),
             'channels': len(config.dataset.modalities) * (2 * config.data.k + 1),
             'cases': size_cases, 'slices_per_case': size_z,
             'shard_workers': examples.default_workers(config.prep.shard_workers),
             'build_s': round(built['tumor_build_s'] + built['pseudo_normal_build_s'], 1),
             'build_s_per_case': round(built['tumor_build_s'] / size_cases, 2),
             'mb_per_case': round(built['tumor_bytes'] / size_cases / 2**20, 2),
             'pseudo_normal_mb_per_case': round(built['pseudo_normal_bytes'] / size_cases / 2**20,
                                                2)}
      if size != 'brats':
        row.update(measure(config, work / 'tfds', seconds))
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--sizes', default='demo,full')
  parser.add_argument('--seconds', type=float, default=20.0)
  parser.add_argument('--threads', type=int, default=0, help='reader threads; 0: every core')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  results = run(tuple(args.sizes.split(',')), args.seconds, threads=args.threads)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
