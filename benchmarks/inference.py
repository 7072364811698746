"""Seconds per whole patient: 240x240x155 at 1 mm, 4 modalities, from NIfTI files to a NIfTI.

`python -m benchmarks.inference [--cases 2] [--method clfc] [--dtype float32] [--quick]`
writes fresh synthetic 1 mm patients (data_prep.synthetic, no label read) and times each
phase of segmenting one: load (read + check the files), preprocess (MNI registration,
resampling, histogram matching, 2.5D stacks), introvae (pseudo-normal T1 of every brain
slice), segment (every axial slice through the segmenter), write (probability back onto the
native grid, threshold, NIfTI). The first patient includes compilation, later ones are the
steady state. Weights are freshly initialised, not trained: speed does not depend on their
values, so no trained workdir is needed. Results: benchmarks/results/inference.json.
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
  ap.add_argument('--out', default=str(RESULTS), help="JSON to write; '' = none")
  return ap.parse_args(argv)


def make_config(method: str, dtype: str, quick: bool):
  from configs import default, demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(method) if quick else default.apply_method(default.get_config(),
                                                                       method)
  config.model.dtype = dtype
  config.introvae.dtype = dtype
  return config


def write_patient(folder: Path, index: int, spacing: float = 1.0):
  """A synthetic BraTS-like patient on disk (no label: a new patient); its Case and shape."""
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  from data_prep.case import Case, ImageRef  # pylint: disable=g-import-not-at-top
  subject = synthetic.make_tumor_subject(synthetic.subject_rng(1000 + index, 'tumor', index),
                                         spacing=spacing)
  case_id = synthetic.tumor_case_id(index)
  path = synthetic.write_tumor_subject(subject, case_id, folder)
  images = {m: ImageRef(path / f'{case_id}_{m}.nii.gz') for m in synthetic.MODALITIES}
  return Case(case_id, images), tuple(subject.images['t1'].shape)


class Models:
  """Freshly initialised segmenter and IntroVAE with their jitted inference functions."""

  def __init__(self, config):
    import jax  # pylint: disable=g-import-not-at-top
    from clfc_jax import evaluate, introvae_train, sharding, train  # pylint: disable=g-import-not-at-top
    from clfc_jax.models import segmenter  # pylint: disable=g-import-not-at-top
    self.mesh = sharding.make_mesh(jax.local_devices())
    model = segmenter.build_segmenter(config)
    self.eval_fn = train.make_jitted_steps(config, self.mesh, model).eval
    self.variables = jax.device_put(
        segmenter.init_variables(model, jax.random.key(config.seed), config),
        sharding.replicated(self.mesh))
    self.eval_batch = evaluate.eval_batch_size(config, self.mesh)
    state = introvae_train.create_state(config, jax.random.PRNGKey(config.seed),
                                        tuple(config.prep.crop_hw))
    self.enc, self.dec = jax.device_put((state.enc_params, state.dec_params),
                                        sharding.replicated(self.mesh))
    self.recon_fn = introvae_train.reconstruct_fn(config)
    n = self.mesh.devices.size
    self.recon_batch = n * -(-int(config.introvae.recon_batch_size) // n)


def segment_patient(case, config, models: Models, refs, normal_landmarks, out_path) -> dict:
  """Segments one patient from its files into out_path; seconds per phase (PHASES)."""
  from clfc_jax import evaluate, normal_appearance  # pylint: disable=g-import-not-at-top
  from data_prep import prepare, register, validate  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  seconds = {}
  tick = time.perf_counter()
  loaded = validate.load_case(case, config, require_label=False)
  seconds['load'] = time.perf_counter() - tick

  tick = time.perf_counter()
  pc = prepare.prepare_loaded(loaded, config)
  unit = normal_appearance.unit_t1(pc.modality(config.dataset.normal_modality), pc.brain,
                                   normal_landmarks, config)
  seconds['preprocess'] = time.perf_counter() - tick

  tick = time.perf_counter()
  pseudo = None
  if config.model.use_normal_net:
    pseudo = normal_appearance.reconstruct_volume(models.recon_fn, models.enc, models.dec, unit,
                                                  pc.brain, models.recon_batch, models.mesh)
  seconds['introvae'] = time.perf_counter() - tick

  tick = time.perf_counter()
  inputs = evaluate.case_inputs(pc, refs, config, pseudo)   # histogram matching, 2.5D stacks
  seconds['preprocess'] += time.perf_counter() - tick
  tick = time.perf_counter()
  prob = evaluate.predict_volume(models.eval_fn, models.variables, inputs, models.eval_batch,
                                 models.mesh)
  seconds['segment'] = time.perf_counter() - tick

  tick = time.perf_counter()
  native = register.to_native(prob, pc.meta, 'linear') > float(config.eval.threshold)
  pred = np.where(native, int(config.eval.wt_label), 0).astype(np.uint8)
  evaluate.save_prediction(out_path, pred, pc.meta)
  seconds['write'] = time.perf_counter() - tick
  return seconds


def _rounded(seconds: dict) -> dict:
  out = {k: round(seconds[k], 3) for k in PHASES}
  out['total'] = round(sum(seconds[k] for k in PHASES), 3)
  return out


def run(args) -> dict:
  from benchmarks import machine  # pylint: disable=g-import-not-at-top
  from data_prep import normalize, prepare, validate  # pylint: disable=g-import-not-at-top
  config = make_config(args.method, args.dtype, args.quick)
  per_case = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    print('inference: writing synthetic patients', file=sys.stderr, flush=True)
    cases = [write_patient(tmp / 'BraTS', i, args.patient_spacing)
             for i in range(args.cases + 1)]
    shape = cases[0][1]
    # Histogram references from an extra patient (which ones does not change the speed).
    print('inference: MNI template, references, fresh models', file=sys.stderr, flush=True)
    tick = time.perf_counter()
    prepare.mni_space(config)
    template_s = time.perf_counter() - tick
    ref_case = prepare.prepare_loaded(validate.load_case(cases[-1][0], config,
                                                         require_label=False), config)
    modalities = tuple(config.dataset.modalities)
    refs = normalize.fit_references([ref_case], modalities, config)
    tick = time.perf_counter()
    models = Models(config)
    init_s = time.perf_counter() - tick
    for i, (case, _) in enumerate(cases[:args.cases]):
      print(f'inference: patient {i + 1}/{args.cases}', file=sys.stderr, flush=True)
      seconds = segment_patient(case, config, models, refs, refs[config.dataset.normal_modality],
                                tmp / 'out' / f'{case.case_id}_seg.nii.gz')
      per_case.append(_rounded(seconds))
  steady = per_case[1:]
  return {
      'suite': 'inference', 'method': args.method, 'dtype': args.dtype,
      'case': f"{'x'.join(map(str, shape))} at {args.patient_spacing:g} mm, "
              f"{len(config.dataset.modalities)} "
              'modalities (synthetic, new patient: no label)',
      'config': {'quick': args.quick, 'mni_spacing_mm': config.prep.spacing,
                 'crop_hw': list(config.prep.crop_hw), 'k': config.data.k,
                 'width': config.model.width, 'introvae_channels': list(config.introvae.channels),
                 'eval_batch': models.eval_batch, 'recon_batch': models.recon_batch,
                 'tta': config.eval.tta},
      'weights': 'Freshly initialised weights (speed does not depend on their values).',
      'path': 'benchmarks.inference phases through validate.load_case, '
              'prepare.prepare_loaded, normal_appearance.reconstruct_volume, '
              'evaluate.predict_volume, register.to_native + nibabel',
      'first_case_s': per_case[0],
      'steady_case_s': ({k: round(statistics.median(c[k] for c in steady), 3)
                         for k in steady[0]} if steady else None),
      'per_case_s': per_case, 'template_once_s': round(template_s, 2),
      'model_init_s': round(init_s, 2), 'machine': machine.describe(),
  }


def main(argv=None):
  return main_with(parse_args(argv))


def main_with(args):
  result = run(args)
  print(json.dumps(result), flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == '__main__':
  main()
