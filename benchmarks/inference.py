"""Seconds per whole patient: 240x240x155 at 1 mm, 4 modalities, from NIfTI files to a NIfTI.

`python -m benchmarks.inference [--cases 2] [--method clfc] [--dtype float32] [--quick]
[--case-bn-weight 0.5]`
writes fresh synthetic 1 mm patients (data_prep.synthetic, no label read) and times each
phase of `clfc_jax.segment.segment_case` on one: load (read + check the files), preprocess
(MNI registration, resampling, histogram matching, 2.5D stacks), introvae (pseudo-normal T1 of every brain
slice), segment (every axial slice through the segmenter), write (probability back onto the
native grid, threshold, NIfTI). The first patient includes compilation, later ones are the
steady state. The models come from a throwaway WORKDIR built here with freshly initialised
weights (speed does not depend on their values), loaded once with `segment.load_models`.
Results: benchmarks/results/inference.json.
--quick uses the demo configuration (2 mm MNI grid, 96x80, small networks): a smoke test.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import statistics
import sys
import tempfile
import time

import jax

from benchmarks import machine
from benchmarks import tables
from clfc_jax import checkpoints, host_memory, segment, sharding
from clfc_jax import workdir as workdir_lib
from clfc_jax.train import introvae_steps, introvae_trainer
from clfc_jax.train import steps as train
from configs import default, demo
from data_prep import normalize, prepare, synthetic, validate
from data_prep.case import Case, ImageRef

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'inference.json'
PHASES = ('load', 'preprocess', 'introvae', 'segment', 'write')


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--cases', type=int, default=2, help='patients timed, one after another')
  ap.add_argument('--method', default='clfc')
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--quick', action='store_true', help='demo configuration (smoke test)')
  ap.add_argument('--patient-spacing', type=float, default=1.0,
                  help='mm; the synthetic patients\' voxel size (1 = 240x240x155)')
  ap.add_argument('--case-bn-weight', type=float, default=None,
                  help="config.eval.case_bn_weight (default: the config's)")
  ap.add_argument('--out', default=str(RESULTS), help="JSON to write; '' = none")
  return ap.parse_args(argv)


def make_config(method: str, dtype: str, quick: bool):
  config = demo.get_config(method) if quick else default.method_config(default.get_config(),
                                                                       method)
  config.model.dtype = dtype
  config.introvae.dtype = dtype
  return config


def write_patient(folder: Path, index: int, spacing: float = 1.0):
  """A synthetic BraTS-like patient on disk (no label: a new patient); its Case and shape."""
  subject = synthetic.make_tumor_subject(synthetic.subject_rng(1000 + index, 'tumor', index,
                                                               'plain'),
                                         spacing=spacing, profile='plain')
  case_id = synthetic.tumor_case_id(index)
  path = synthetic.write_tumor_subject(subject, case_id, folder)
  images = {m: ImageRef(path / f'{case_id}_{m}.nii.gz') for m in synthetic.MODALITIES}
  return Case(case_id, images), tuple(subject.images['t1'].shape)


def build_workdir(config, root: Path, reference_cases) -> Path:
  """A WORKDIR as the main job leaves it, with freshly initialised models, for segment.py.

  config.json; fold 0's histogram references and the IntroVAE's T1 reference, fitted on
  `reference_cases` (prepared); the IntroVAE and the segmenter initialised and saved the way
  their training loops save them. Which values they hold does not change the speed.
  """
  wd = workdir_lib.Workdir(root)
  wd.prep.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_config(config, wd.config)
  refs = normalize.fit_references(reference_cases, tuple(config.dataset.modalities), config)
  normalize.save_references(refs, wd.hist_refs(0))
  modality = config.dataset.normal_modality
  normalize.save_references({modality: refs[modality]}, normalize.normal_reference_path(wd.prep))
  if config.model.use_normal_net:
    iv_state = introvae_steps.create_state(config, jax.random.PRNGKey(int(config.seed)),
                                           tuple(config.prep.crop_hw))
    with checkpoints.Checkpointer(wd.introvae / 'checkpoints', max_to_keep=1) as ckpt:
      ckpt.save(1, iv_state, extra={'epoch': 1})
      ckpt.wait()
    (wd.introvae / introvae_trainer.SUMMARY_NAME).write_text(json.dumps({'final_step': 1}))
  mesh = sharding.make_mesh(jax.local_devices())
  state = train.make_jitted_steps(config, mesh).init(
      jax.random.key(int(config.seed), impl=config.train.get('rng_impl', None)))
  with checkpoints.Checkpointer(wd.run_dir(config.method, 0) / 'checkpoints',
                                max_to_keep=1) as ckpt:
    ckpt.save(1, state, metrics={'val_dice': 0.0})
    ckpt.wait()
  return wd.root


def _rounded(seconds: dict) -> dict:
  out = {k: round(seconds[k], 3) for k in PHASES}
  out['total'] = round(sum(seconds[k] for k in PHASES), 3)
  return out


def run(args, config=None) -> dict:
  """The suite's record; `config` replaces the one args describe (tests: a tiny model)."""
  config = (config or make_config(args.method, args.dtype, args.quick)).copy_and_resolve_references()
  config.fold = 0
  if getattr(args, 'case_bn_weight', None) is not None:
    config.eval.case_bn_weight = float(args.case_bn_weight)
  per_case = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    log('writing synthetic patients')
    cases = [write_patient(tmp / 'BraTS', i, args.patient_spacing)
             for i in range(args.cases + 1)]
    shape = cases[0][1]
    log('MNI template; a workdir with fresh models (references from one more patient)')
    tick = time.perf_counter()
    prepare.mni_space(config)
    template_s = time.perf_counter() - tick
    tick = time.perf_counter()
    reference = prepare.prepare_loaded(validate.load_case(cases[-1][0], config,
                                                          require_label=False), config)
    workdir = build_workdir(config, tmp / 'workdir', [reference])
    build_s = time.perf_counter() - tick
    tick = time.perf_counter()
    models = segment.load_models(config, workdir, method=config.method, fold=0)
    load_models_s = time.perf_counter() - tick
    for i, (case, _) in enumerate(cases[:args.cases]):
      log(f'patient {i + 1}/{args.cases}')
      done = segment.segment_case(models, case, tmp / 'out', overwrite=True)
      assert (tmp / 'out' / f'{case.case_id}_seg.nii.gz').exists(), done
      per_case.append(_rounded(done['seconds']))
  steady = per_case[1:]
  return {
      'suite': 'inference', 'method': config.method, 'dtype': config.model.dtype,
      'case': f"{'x'.join(map(str, shape))} at {args.patient_spacing:g} mm, "
              f"{len(config.dataset.modalities)} modalities (synthetic, new patient: no label)",
      'config': {'quick': args.quick, 'mni_spacing_mm': config.prep.spacing,
                 'crop_hw': list(config.prep.crop_hw), 'k': config.data.k,
                 'width': config.model.width, 'introvae_channels': list(config.introvae.channels),
                 'eval_batch': models.eval_batch, 'tta': config.eval.tta,
                 'case_bn_weight': config.eval.case_bn_weight,
                 'recon_batch': config.introvae.recon_batch_size if models.introvaes else None},
      'weights': 'Freshly initialised weights (speed does not depend on their values).',
      'path': 'clfc_jax.segment.load_models once, then segment_case per patient (NIfTI in, '
              'NIfTI out)',
      'first_case_s': per_case[0],
      'steady_case_s': ({k: round(statistics.median(c[k] for c in steady), 3)
                         for k in steady[0]} if steady else None),
      'per_case_s': per_case, 'template_once_s': round(template_s, 2),
      'workdir_build_s': round(build_s, 2), 'load_models_s': round(load_models_s, 2),
      'machine': machine.describe(),
  }


def log(message: str) -> None:
  print(f'inference: {message}', file=sys.stderr, flush=True)


def main(argv=None):
  args = parse_args(argv)
  return tables.emit(run(args), args.out)


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  main()
