"""The synthetic cohort's noise floor in the IntroVAE's [-1, 1] units (issue 12's fidelity target).

The floor is how far a perfect, noise-free pseudo-normal would lie from the subject's (noisy)
healthy T1 that clfc_jax.fidelity compares against: MAE in healthy tissue between the prepared
healthy T1 and the same subject regenerated with the Rician noise off, both pulled through the
case's own stored MNI transform and the same intensity chain (brain-percentile scale, histogram
matching to the normal reference, [-1, 1]). The generator that made the cohort is the git
revision --generator-rev of data_prep/synthetic.py (checked: it reproduces every stored healthy
T1 bit for bit, else the case is refused); with its NOISE_STD set to (0, 0) it draws the same
random numbers, so only the noise goes.

  python experiments/noise_floor.py --workdir=W [--generator-rev=15c1dad] [--limit=N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from clfc_jax import fidelity
from clfc_jax import workdir as workdir_lib
from data_prep import normalize, prepare, register, store


def generator(rev: str):
  """data_prep/synthetic.py as of git revision `rev`, imported as a module."""
  source = subprocess.run(['git', 'show', f'{rev}:data_prep/synthetic.py'], check=True,
                          capture_output=True, text=True).stdout
  path = Path(tempfile.mkdtemp()) / f'synthetic_{rev}.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module      # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def pull(array, affine, meta, config):
  """A native volume onto the case's MNI crop [Z, H, W] through its stored transform."""
  canonical = nib.as_closest_canonical(nib.Nifti1Image(array.astype(np.float32), affine))
  image = register.to_sitk(np.asarray(canonical.dataobj, np.float32), canonical.affine)
  transform = register.transform_from_meta(meta['transform'])
  grid = prepare.mni_space(config).crop_grid
  return sitk.GetArrayFromImage(register.resample(image, grid, transform, 'linear'))


def piecewise(values, source, target):
  """normalize.apply_reference's map for given source landmarks (linear end segments)."""
  out = np.interp(values, source, target)
  lo, hi = values < source[0], values > source[-1]
  out[lo] = target[0] + (values[lo] - source[0]) * (target[1] - target[0]) / (source[1] - source[0])
  out[hi] = target[-1] + (values[hi] - source[-1]) * (target[-1] - target[-2]) / (
      source[-1] - source[-2])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--generator-rev', default='15c1dad')
  parser.add_argument('--limit', type=int, default=None)
  args = parser.parse_args()
  wd = workdir_lib.Workdir(args.workdir)
  config = workdir_lib.read_config(wd.introvae / workdir_lib.CONFIG_NAME)
  syn = generator(args.generator_rev)
  landmarks = normalize.normal_t1_reference(wd.prep, config, None)
  percentiles = config.prep.hist.percentiles
  rows = []
  for index, case_id in enumerate(store.prepared_ids(wd.prep_cases)[:args.limit]):
    pc = store.load_prepared(wd.prep_cases, case_id)
    meta = pc.meta
    stored = Path(meta['files']['t1']).with_name(f'{case_id}_t1_healthy.nii.gz')
    number = int(case_id.split('_')[2]) - 1
    seed = int(config.synthetic.seed)
    spacing = float(config.synthetic.spacing)
    subject = syn.make_tumor_subject(syn.subject_rng(seed, 'tumor', number), spacing)
    on_disk = np.asarray(nib.load(stored).dataobj)
    if not np.array_equal(on_disk, subject.healthy_t1):
      raise SystemExit(f'{stored}: generator {args.generator_rev} does not reproduce it')
    saved = syn.NOISE_STD
    syn.NOISE_STD = (0.0, 0.0)
    try:
      clean_subject = syn.make_tumor_subject(syn.subject_rng(seed, 'tumor', number), spacing)
    finally:
      syn.NOISE_STD = saved
    brain = pc.brain
    noisy = pull(subject.healthy_t1, subject.affine, meta, config) * brain
    clean = pull(clean_subject.healthy_t1, subject.affine, meta, config) * brain
    scale = float(np.percentile(noisy[brain], config.prep.scale_percentile))
    noisy, clean = noisy / scale, clean / scale
    if not np.allclose(noisy, pc.healthy_t1, atol=1e-3):   # prep stores float16
      raise SystemExit(f'{case_id}: the pulled healthy T1 differs from the prepared one')
    source = normalize._strictly_increasing(normalize.case_landmarks(noisy, brain, percentiles))
    unit = lambda v: normalize.to_unit_range(
        np.where(brain, piecewise(v.astype(np.float64), source, np.asarray(landmarks)), 0),
        brain, config)
    noisy_unit, clean_unit = unit(noisy), unit(clean)
    own = normalize.to_unit_range(normalize.apply_reference(
        clean * scale / max(float(np.percentile(clean[brain], config.prep.scale_percentile)),
                            1e-12), brain, landmarks, config), brain, config)
    healthy = fidelity.regions(brain, pc.label)['healthy']
    rows.append({'case': case_id,
                 'noise_std_relative': round(subject_noise(syn, seed, number, spacing), 4),
                 'mae_same_mapping': float(np.abs(noisy_unit - clean_unit)[healthy].mean()),
                 'mae_own_mapping': float(np.abs(noisy_unit - own)[healthy].mean()),
                 'std_same_mapping': float((noisy_unit - clean_unit)[healthy].std())})
    print(json.dumps(rows[-1]), flush=True)
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'case'}
  print(json.dumps({'cases': len(rows), 'mean': mean}))


def subject_noise(syn, seed, number, spacing):
  """The subject's drawn Rician sigma (relative to white matter), drawn as the generator does."""
  return float(syn._draw_subject(syn.subject_rng(seed, 'tumor', number),
                                 syn.brats_grid(spacing), syn.MODALITIES, spacing).noise_std)


if __name__ == '__main__':
  main()
