"""New patients: `python -m clfc_jax.segment --workdir=DIR INPUT --out=OUT`.

INPUT is one of
  --t1=F --t1ce=F --t2=F --flair=F   one file per modality (the flags follow the config's
                                      dataset.modalities, so in-house sets get theirs);
  --case-dir=PATIENT_DIR              a patient folder (files `*_<modality>.nii[.gz]`, the
                                      dataset's file_pattern, or one MSD 4-D file);
  --image=FILE                        one MSD-style 4-D file (channels: dataset.msd_channels);
  --input-dir=COHORT_DIR              every patient of a folder (case folders, group folders of
                                      case folders, 4-D files, imagesTs/ or imagesTr/).
Each patient goes through the training preprocessing (RAS+ reorientation, affine MNI152
alignment, histogram matching with the references saved at training time), the IntroVAE
pseudo-normal T1 and the segmentation model, and gets OUT/<id>_seg.nii.gz: whole tumor =
config.eval.wt_label (BraTS: 1), or with a region model (task.regions 'wt_tc_et') the nested
regions ET ⊆ TC ⊆ WT in the input's label convention (task.label_convention: edema, core,
enhancing labels), inside the brain mask and without the small stray components
that the evaluate stage chose to remove on validation patients, on exactly the input file's grid (its shape, voxel order,
qform and sform; the first modality's file is the reference, for 4-D files its 3 spatial axes).

Models come from WORKDIR: each fold's best checkpoint runs/<method>/fold<k>, rebuilt from the
config saved next to it, with that fold's histogram references prep/hist_refs_fold<k>.json.
Without --ensemble one fold is used: --fold, else config.fold when >= 0, else the lowest
trained fold (the log says which). --ensemble averages the foreground probability of every
trained fold's model, each fed with its own fold's matching. --tta adds the four in-plane
mirrorings. --case-bn-weight=w normalises each patient's features half (w = 0.5) or wholly
(w = 1) with that patient's own BatchNorm statistics (config.eval.case_bn_weight), for scans
unlike the training ones.

Optional outputs, all on the input's grid like the mask (float32):
  --save-prob            <id>_prob.nii.gz           tumor probability (what the mask thresholds;
                         4-D, one per region WT, TC, ET, with a region model)
  --save-pseudo-normal   <id>_pseudo_normal.nii.gz  the IntroVAE's pseudo-normal T1, [0, 1]
                         (the mean of the folds' own IntroVAEs in an ensemble without IXI)
  --save-attention       <id>_attention.nii.gz      4-D (x, y, z, 4): CLFC attention A_1..A_4,
                         decoder levels 1/8 .. full resolution, each bilinearly upsampled to
                         the slice and resampled like the probability (un-mirrored pass; the
                         ensemble's mean).
A patient whose files are bad is reported and skipped; nothing is written for it. Existing
outputs are kept unless --overwrite (checked before any work, so a rerun resumes a cohort).
Files are written atomically, only into --out. The exit status is 1 when any patient failed.
CPU or GPU: whatever JAX finds; slices are split over every local device.

Python: `models = load_models(None, workdir)` once, then `segment_case(models, case, out)`
per patient (cases from case_from_files / case_from_folder / case_from_4d_file / find_cases).
"""
from __future__ import annotations

# The command line restarts itself with huge-page malloc before anything heavy loads
# (clfc_jax.host_memory: glibc reads its tunables only at process start).
from clfc_jax import host_memory
if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import json
import logging as logging_std
import os
from pathlib import Path
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import nibabel as nib
import numpy as np
from tqdm import tqdm

from clfc_jax import evaluate
from clfc_jax import predict
from clfc_jax import sharding
from clfc_jax import workdir as workdir_lib
from clfc_jax.workdir import Workdir
from configs import default
from data_prep import inputs, labels, normalize, prepare, readers, register, store, validate
from data_prep.case import Case, CaseError

PHASES = ('load', 'preprocess', 'introvae', 'segment', 'write')
OUTPUT_SUFFIXES = {
    'seg': '_seg.nii.gz',
    'prob': '_prob.nii.gz',
    'pseudo_normal': '_pseudo_normal.nii.gz',
    'attention': '_attention.nii.gz',
}
# Patients as a user hands them over (data_prep.readers): kept here under their old names.
case_from_files = readers.case_from_files
case_from_4d_file = readers.case_from_4d_file
case_from_folder = readers.case_from_folder
find_cases = readers.find_patients


def _preprocessing(config) -> str:
  """What the input of a model depends on: the prep settings and the modalities."""
  d = config.dataset
  return json.dumps({'prep': config.prep.to_dict(), 'modalities': list(d.modalities),
                     'normal': d.normal_modality, 'registration': d.registration_modality},
                    sort_keys=True, default=str)


# --- models (loaded once, reused for every patient) ------------------------------------------
@dataclasses.dataclass(frozen=True)
class FoldModel:
  """One fold's trained segmenter with the histogram references it was trained with."""
  fold: int
  config: Any
  step: int                       # checkpoint step (the best by validation Dice)
  variables: Any                  # {'params', 'batch_stats'}, replicated
  refs: Mapping[str, np.ndarray]  # modality -> landmarks (prep/hist_refs_fold<k>.json)
  fns: predict.SegmenterFns       # compiled eval / attention functions
  introvae_key: Optional[int]     # its IntroVAE: the normal cohort's (None) or the fold's own


@dataclasses.dataclass(frozen=True)
class PseudoNormalNet:
  """The frozen IntroVAE and the T1 landmarks its training slices were matched to."""
  config: Any                     # the IntroVAE's config (introvae/config.json)
  params: Any                     # {'enc', 'dec'}, replicated
  landmarks: np.ndarray


@dataclasses.dataclass(frozen=True)
class Models:
  """Everything `segment_case` needs; build it once with `load_models`."""
  config: Any                     # preprocessing, threshold, WT label (the first fold's config)
  method: str
  members: tuple                  # FoldModel per fold used (one, or every fold with --ensemble)
  introvaes: Mapping              # introvae key -> PseudoNormalNet (methods with a normal net)
  mesh: Any
  eval_batch: int
  workdir: Path
  min_volume_ml: float = 0.0      # components below this are removed (postprocess, validation)


def _pick_folds(config, wd: Workdir, method, fold, ensemble) -> tuple:
  """The folds whose models segment, and why (for the log)."""
  available = wd.trained_folds(method)
  if not available:
    raise FileNotFoundError(f'{wd.runs / method}: no trained fold of {method!r} '
                            '(run the train stage of clfc_jax.main, or pick --method)')
  if ensemble:
    if fold is not None:
      raise ValueError('--fold and --ensemble exclude each other')
    return available, 'ensemble of every trained fold'
  why = 'chosen with --fold'
  if fold is None:
    if int(config.fold) >= 0:
      fold, why = int(config.fold), "the config's fold"
    else:
      fold, why = available[0], 'the lowest trained fold'
    why += '; --fold or --ensemble choose others'
  if int(fold) not in available:
    raise FileNotFoundError(f'{wd.run_dir(method, fold)}: fold {fold} of {method!r} is not '
                            f'trained (trained: {available})')
  return [int(fold)], why


def _normal_landmarks(wd: Workdir, config, key: Optional[int]) -> np.ndarray:
  """IntroVAE `key`'s T1 reference, read (never fitted): the normal cohort's or its fold's."""
  modality = config.dataset.normal_modality
  path = normalize.normal_reference_path(wd.prep, key)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no IntroVAE T1 reference (prep stage)')
  refs = normalize.load_references(path)
  if modality not in refs:
    raise ValueError(f'{path}: no reference for the normal modality {modality!r}')
  return refs[modality]


def _postprocessing(wd: Workdir, method, folds, config) -> tuple:
  """(min volume, threshold) the evaluate stage chose on each fold's validation patients: the
  smallest volume and the mean threshold over an ensemble's folds; config's
  postprocess.min_volume_ml and eval.threshold where none did."""
  volumes, thresholds = [], []
  for k in folds:
    path = wd.eval_dir(method, k) / evaluate.POSTPROCESS_NAME
    if path.exists():
      choice = json.loads(path.read_text())
      volumes.append(float(choice['min_volume_ml']))
      thresholds.append(float(choice.get('threshold', config.eval.threshold)))
  return (min(volumes) if volumes else float(config.postprocess.min_volume_ml),
          float(np.mean(thresholds)) if thresholds else float(config.eval.threshold))


def load_models(config=None, workdir=None, *, method: Optional[str] = None,
                fold: Optional[int] = None, ensemble: bool = False,
                tta: Optional[bool] = None, case_bn_weight: Optional[float] = None,
                mesh=None) -> Models:
  """Restores the segmenter(s) and the IntroVAE of `workdir` once, for any number of patients.

  config: None = each model's own saved config (WORKDIR/config.json, runs/<method>/fold<k>/
  config.json, introvae/config.json); a ConfigDict overrides them all. method: default
  config.method. fold / ensemble: see the module docstring. tta: None = config.eval.tta;
  case_bn_weight: None = config.eval.case_bn_weight (predict.case_batch_norm).
  """
  if workdir is None:
    raise ValueError('load_models needs the workdir of a trained main job')
  wd = Workdir(Path(workdir).expanduser())
  override = config is not None
  base = config if override else workdir_lib.read_config(wd.config)
  base = default.method_config(base, method)
  method = base.method
  mesh = mesh or sharding.make_mesh(jax.local_devices())
  members = []
  folds, why = _pick_folds(base, wd, method, fold, ensemble)
  logging.info('segment: %s fold(s) %s (%s)', method, folds, why)
  for k in folds:
    run_dir = wd.run_dir(method, k)
    saved = run_dir / workdir_lib.CONFIG_NAME
    cfg = base if override or not saved.exists() else workdir_lib.read_config(saved)
    cfg = cfg.copy_and_resolve_references()
    if tta is not None:
      cfg.eval.tta = bool(tta)
    if case_bn_weight is not None:
      cfg.eval.case_bn_weight = float(case_bn_weight)
    predict.case_bn_weight(cfg)   # a bad weight is refused before any patient is read
    if _preprocessing(cfg) != _preprocessing(base):
      raise ValueError(f'{saved}: fold {k} was trained with other prep settings or '
                       'modalities than the workdir config; pass --config to choose')
    variables, step = predict.load_segmenter(cfg, run_dir, mesh)
    refs = evaluate.fold_references(wd, k, cfg.dataset.modalities)
    members.append(FoldModel(fold=k, config=cfg, step=step, variables=variables, refs=refs,
                             fns=predict.segmenter_fns(cfg, mesh),
                             introvae_key=wd.introvae_key(k)))
    logging.info('segment: %s fold %d: checkpoint step %d of %s', method, k, step, run_dir)
  introvaes = {}
  for key in sorted({m.introvae_key for m in members if m.config.model.use_normal_net},
                    key=lambda k: -1 if k is None else k):
    iv_path = wd.introvae_dir(key) / workdir_lib.CONFIG_NAME
    iv_config = base if override or not iv_path.exists() else workdir_lib.read_config(iv_path)
    introvaes[key] = PseudoNormalNet(
        config=iv_config, params=predict.load_introvae(iv_config, wd.introvae_dir(key), mesh),
        landmarks=_normal_landmarks(wd, base, key))
  config = members[0].config
  min_volume, threshold = _postprocessing(wd, method, folds, config)
  config = evaluate.with_threshold(config, {'threshold': threshold})
  logging.info('segment: threshold %.3g, components below %.3g ml removed (chosen on '
               'validation patients by the evaluate stage, else the config)', threshold,
               min_volume)
  return Models(config=config, method=method, members=tuple(members), introvaes=introvaes,
                mesh=mesh, eval_batch=predict.round_batch(config.eval.batch_size, mesh),
                workdir=wd.root, min_volume_ml=min_volume)


# --- one patient -----------------------------------------------------------------------------
def output_paths(case_id: str, out_dir, *, save_prob=False, save_pseudo_normal=False,
                 save_attention=False) -> dict:
  """kind -> OUT/<id><suffix> of every file a patient gets."""
  wanted = {'seg': True, 'prob': save_prob, 'pseudo_normal': save_pseudo_normal,
            'attention': save_attention}
  return {k: Path(out_dir) / f'{case_id}{OUTPUT_SUFFIXES[k]}' for k, on in wanted.items() if on}


def _like_input(data: np.ndarray, reference, dtype):
  """`data` on the reference file's grid: its header (qform, sform, codes, units) kept."""
  header = reference.header.copy()
  cls = type(reference) if isinstance(reference, nib.Nifti2Image) else nib.Nifti1Image
  img = cls(np.asarray(data, dtype), None, header=header)
  img.set_data_dtype(dtype)
  img.header.set_slope_inter(1.0, 0.0)
  img.header['cal_min'] = img.header['cal_max'] = 0
  img.header.set_intent('none')
  return img


def _write_all(images: Mapping[Path, Any]) -> None:
  """Every file or none: all are written to temporaries first, then renamed."""
  with contextlib.ExitStack() as stack:
    for path, img in images.items():
      path.parent.mkdir(parents=True, exist_ok=True)
      nib.save(img, stack.enter_context(store.atomic_write(path)))


def check_options(models: Models, *, save_attention=False, save_pseudo_normal=False,
                  **unused) -> None:
  """A ValueError for outputs the method cannot give (no CLFC gates / no normal net)."""
  del unused
  if save_attention and any(m.fns.attention is None for m in models.members):
    raise ValueError(f'method {models.method!r} has no CLFC attention maps to save')
  if save_pseudo_normal and not models.introvaes:
    raise ValueError(f'method {models.method!r} uses no pseudo-normal T1')


def segment_case(models: Models, case: Case, out_dir, *, save_prob: bool = False,
                 save_pseudo_normal: bool = False, save_attention: bool = False,
                 overwrite: bool = False) -> dict:
  """Segments one patient into out_dir; raises CaseError (nothing written) for bad files.

  Returns {'case_id', 'status': 'done' | 'exists', 'outputs': {kind: path}, 'seconds':
  {load, preprocess, introvae, segment, write}}. 'exists': some output is already there and
  overwrite is off; nothing was read or written.
  """
  config = models.config
  paths = output_paths(case.case_id, out_dir, save_prob=save_prob,
                       save_pseudo_normal=save_pseudo_normal, save_attention=save_attention)
  seconds = dict.fromkeys(PHASES, 0.0)
  result = {'case_id': case.case_id, 'outputs': {k: str(p) for k, p in paths.items()},
            'seconds': seconds}
  check_options(models, save_attention=save_attention, save_pseudo_normal=save_pseudo_normal)
  existing = [str(p) for p in paths.values() if p.exists()]
  if existing and not overwrite:
    return dict(result, status='exists', existing=existing)
  missing = [m for m in config.dataset.modalities if m not in case.images]
  if missing:
    first = next(iter(case.images.values()), None)
    raise CaseError(first.path if first else case.case_id, f'no {", ".join(missing)} image '
                    f'given (the model reads {", ".join(config.dataset.modalities)})')

  tick = time.perf_counter()
  loaded = validate.load_case(case, config, require_label=False)
  reference = nib.load(next(iter(case.images.values())).path)   # header only: already checked
  seconds['load'] = time.perf_counter() - tick

  tick = time.perf_counter()
  pc = prepare.prepare_loaded(loaded, config)
  seconds['preprocess'] = time.perf_counter() - tick

  pseudos = {}   # introvae key -> this patient's pseudo-normal T1 (one per IntroVAE used)
  modality = config.dataset.normal_modality
  for key, pn in models.introvaes.items():
    tick = time.perf_counter()
    try:
      unit = inputs.unit_t1(pc.modality(modality), pc.brain, pn.landmarks, config)
    except ValueError as e:
      raise CaseError(case.images[modality].path, f'{modality}: {e}') from None
    seconds['preprocess'] += time.perf_counter() - tick
    tick = time.perf_counter()
    pseudos[key] = predict.reconstruct_volume(pn.config, pn.params, unit, pc.brain, models.mesh)
    if not np.all(np.isfinite(pseudos[key])):
      raise CaseError(case.images[modality].path,
                      'the IntroVAE reconstruction is not finite (diverged model?)')
    seconds['introvae'] += time.perf_counter() - tick

  prob, attention = 0.0, 0.0
  for member in models.members:
    tick = time.perf_counter()
    try:
      case_inputs = inputs.case_inputs(pc, member.refs, member.config,
                                       pseudos.get(member.introvae_key))
    except CaseError as e:   # named by case id there: name a file here.
      raise CaseError(next(iter(case.images.values())).path, e.problem) from None
    seconds['preprocess'] += time.perf_counter() - tick
    tick = time.perf_counter()
    variables = predict.case_batch_norm(member.fns, member.variables, case_inputs, pc.brain,
                                        member.config, models.mesh)
    prob = prob + predict.predict_volume(member.fns, variables, case_inputs, models.eval_batch,
                                         models.mesh)
    if save_attention:
      attention = attention + predict.predict_slices(
          member.fns.attention, variables, case_inputs, models.eval_batch, models.mesh)
    seconds['segment'] += time.perf_counter() - tick
  prob = prob / len(models.members)

  tick = time.perf_counter()
  mask, native_prob = evaluate.native_mask(prob, pc.meta, config, brain=pc.brain,
                                           min_volume_ml=models.min_volume_ml)
  if mask.ndim == 4:   # task.regions 'wt_tc_et': nested masks -> the input's label convention.
    mask = labels.to_label_map(mask, config.task.label_convention)
  else:
    mask = np.where(mask, int(config.eval.wt_label), 0)
  images = {paths['seg']: _like_input(mask, reference, np.uint8)}
  if save_prob:
    images[paths['prob']] = _like_input(np.clip(native_prob, 0.0, 1.0), reference, np.float32)
  if save_pseudo_normal:   # an ensemble of per-fold IntroVAEs: their mean
    pseudo = np.mean(list(pseudos.values()), axis=0)
    unit_range = np.where(pc.brain, (pseudo + 1.0) / 2.0, 0.0)   # [-1, 1] -> [0, 1], 0 outside
    images[paths['pseudo_normal']] = _like_input(
        register.to_native(unit_range, pc.meta, 'linear'), reference, np.float32)
  if save_attention:
    attention = attention / len(models.members)
    maps = [register.to_native(attention[..., l], pc.meta, 'linear')
            for l in range(attention.shape[-1])]
    images[paths['attention']] = _like_input(np.stack(maps, axis=-1), reference, np.float32)
  _write_all(images)
  seconds['write'] = time.perf_counter() - tick
  return dict(result, status='done')


# --- a cohort --------------------------------------------------------------------------------
def segment_cases(models: Models, cases: Sequence[Case], out_dir, *,
                  problems: Optional[Mapping[str, str]] = None, progress: bool = True,
                  **options) -> dict:
  """segment_case over `cases` with a progress bar; a failing patient is logged and skipped.

  Returns {'done': [ids], 'exists': [ids], 'failed': {id: reason}, 'seconds': {phase: total},
  'per_case': {id: seconds}}; `problems` (from find_cases) enter 'failed' as they are.
  """
  check_options(models, **options)
  summary = {'done': [], 'exists': [], 'failed': dict(problems or {}),
             'seconds': dict.fromkeys(PHASES, 0.0), 'per_case': {}}
  for case in tqdm(cases, desc='segment', unit='patient', disable=not progress):
    try:
      result = segment_case(models, case, out_dir, **options)
    except CaseError as e:
      logging.error('segment: skipped %s: %s', case.case_id, e)
      summary['failed'][case.case_id] = str(e)
      continue
    except Exception as e:  # pylint: disable=broad-except  (one patient must not stop the rest)
      logging.exception('segment: %s failed', case.case_id)
      summary['failed'][case.case_id] = f'{type(e).__name__}: {e}'
      continue
    summary[result['status']].append(case.case_id)
    if result['status'] == 'done':
      summary['per_case'][case.case_id] = {k: round(v, 3) for k, v in result['seconds'].items()}
      for k, v in result['seconds'].items():
        summary['seconds'][k] += v
  summary['seconds'] = {k: round(v, 3) for k, v in summary['seconds'].items()}
  return summary


def format_summary(summary: dict, out_dir) -> str:
  lines = [f'segment -> {out_dir}: {len(summary["done"])} segmented, '
           f'{len(summary["exists"])} kept (outputs exist; --overwrite replaces them), '
           f'{len(summary["failed"])} failed']
  lines += [f'  kept    {i}' for i in summary['exists']]
  lines += [f'  failed  {i}: {reason}' for i, reason in sorted(summary['failed'].items())]
  return '\n'.join(lines)


# --- command line ----------------------------------------------------------------------------
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a trained clfc_jax.main run.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Optional configs/*.py[:method]; default: the configs saved in WORKDIR.')
_METHOD = flags.DEFINE_string('method', None, 'Method whose models segment (default: the '
                              "config's method).")
_FOLD = flags.DEFINE_integer('fold', None, "Fold whose model segments (default: the config's "
                             'fold when >= 0, else the lowest trained fold).')
_ENSEMBLE = flags.DEFINE_bool('ensemble', False, "Average every trained fold's model.")
_TTA = flags.DEFINE_bool('tta', None, 'Mirroring test-time augmentation (default: '
                         'config.eval.tta).')
_CASE_BN = flags.DEFINE_float('case-bn-weight', None, "Weight in [0, 1] of each patient's own "
                              'BatchNorm statistics (default: config.eval.case_bn_weight).')
_CASE_DIR = flags.DEFINE_string('case-dir', None, 'One patient folder.')
_INPUT_DIR = flags.DEFINE_string('input-dir', None, 'A folder of patients (batch mode).')
_IMAGE = flags.DEFINE_string('image', None, 'One 4-D file holding every modality (MSD).')
_CASE_ID = flags.DEFINE_string('case-id', None, 'Patient id of --image / modality files '
                               '(default: from the file name).')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SAVE_PROB = flags.DEFINE_bool('save-prob', False, 'Also write <id>_prob.nii.gz.')
_SAVE_PSEUDO = flags.DEFINE_bool('save-pseudo-normal', False,
                                 'Also write <id>_pseudo_normal.nii.gz.')
_SAVE_ATTENTION = flags.DEFINE_bool('save-attention', False,
                                    'Also write <id>_attention.nii.gz (A_1..A_4).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.')
for _name in ('case-dir', 'input-dir', 'case-id', 'save-prob', 'save-pseudo-normal',
              'save-attention', 'case-bn-weight'):
  flags.DEFINE_alias(_name.replace('-', '_'), _name)
flags.mark_flags_as_required(['workdir', 'out'])
FLAGS = flags.FLAGS


def _base_config():
  if _CONFIG.value is not None:
    return _CONFIG.value
  return workdir_lib.read_config(Workdir(Path(_WORKDIR.value).expanduser()).config)


def _flags_error(message: str):
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def parse_flags(argv):
  """absl's parse, after defining one --<modality> flag per modality of the config in use.

  The known flags (--workdir, --config) are parsed first to find that config; the rest,
  modality flags included, then.
  """
  try:
    rest = FLAGS(argv, known_only=True)
    config = _base_config() if _WORKDIR.value else None
  except (flags.Error, FileNotFoundError) as e:
    _flags_error(str(e))
  for m in (config.dataset.modalities if config is not None else ()):
    if m not in FLAGS:
      flags.DEFINE_string(m, None, f'The {m} image of one patient (NIfTI).')
    elif not getattr(FLAGS[m], '_clfc_modality', False):
      _flags_error(f'modality {m!r} clashes with the flag --{m}; give the patient as '
                   '--case-dir')
    FLAGS[m]._clfc_modality = True   # pylint: disable=protected-access
  return app.parse_flags_with_usage(rest)


def _cli_cases(config):
  """(cases, problems) from whichever input flag was given (exactly one kind)."""
  files = {m: FLAGS[m].value for m in config.dataset.modalities
           if m in FLAGS and FLAGS[m].value}
  inputs = (('--case-dir', _CASE_DIR.value), ('--input-dir', _INPUT_DIR.value),
            ('--image', _IMAGE.value), ('modality files', files))
  given = [name for name, value in inputs if value]
  if len(given) != 1:
    flag_list = ' '.join('--' + m for m in config.dataset.modalities)
    raise app.UsageError('give exactly one input: --case-dir, --input-dir, --image or one flag '
                         f'per modality ({flag_list})' + (f'; got {", ".join(given)}' if given
                                                          else ''))
  if files:
    missing = [m for m in config.dataset.modalities if m not in files]
    if missing:
      raise app.UsageError(f'no file given for {", ".join("--" + m for m in missing)} (the '
                           f'model reads {", ".join(config.dataset.modalities)})')
    return [case_from_files(files, _CASE_ID.value)], {}
  if _IMAGE.value:
    return [case_from_4d_file(_IMAGE.value, config, _CASE_ID.value)], {}
  if _CASE_DIR.value:
    return [case_from_folder(_CASE_DIR.value, config)], {}
  return find_cases(_INPUT_DIR.value, config)


def _quiet_libraries(record) -> bool:
  """Orbax's per-restore chatter stays out of the log (as in clfc_jax.main); errors show."""
  return record.levelno >= logging_std.ERROR or not any(
      n in record.pathname for n in ('orbax', 'etils'))


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for handler in [logging.get_absl_handler()] + logging_std.getLogger().handlers:
    handler.addFilter(_quiet_libraries)
  workdir = Path(_WORKDIR.value).expanduser().resolve()
  out_dir = Path(_OUT.value).expanduser().resolve()
  if _ENSEMBLE.value and _FOLD.value is not None:
    raise app.UsageError('--fold and --ensemble exclude each other')
  config = default.method_config(_base_config(), _METHOD.value)
  try:
    cases, problems = _cli_cases(config)
  except CaseError as e:
    print(f'segment: {e}', file=sys.stderr)
    return 1
  options = dict(save_prob=_SAVE_PROB.value, save_pseudo_normal=_SAVE_PSEUDO.value,
                 save_attention=_SAVE_ATTENTION.value, overwrite=_OVERWRITE.value)
  paths = lambda c: output_paths(c.case_id, out_dir, **{k: v for k, v in options.items()
                                                         if k != 'overwrite'})
  todo = [c for c in cases if _OVERWRITE.value or not any(p.exists() for p in paths(c).values())]
  if cases and not todo:
    print(format_summary({'done': [], 'exists': [c.case_id for c in cases],
                          'failed': dict(problems)}, out_dir))
    return 1 if problems else 0
  cache = Workdir(workdir).jax_cache
  if cache.is_dir() and os.access(cache, os.W_OK):   # the main job's compilation cache
    jax.config.update('jax_compilation_cache_dir', str(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  try:
    models = load_models(_CONFIG.value, workdir, method=_METHOD.value, fold=_FOLD.value,
                         ensemble=_ENSEMBLE.value, tta=_TTA.value,
                         case_bn_weight=_CASE_BN.value)
    check_options(models, **options)
  except (FileNotFoundError, ValueError) as e:   # no trained model / options it cannot serve
    print(f'segment: {e}', file=sys.stderr)
    return 1
  summary = segment_cases(models, cases, out_dir, problems=problems, **options)
  print(format_summary(summary, out_dir))
  return 1 if summary['failed'] else 0


def cli():
  """The `clfc-segment` console command (pyproject.toml): `python -m clfc_jax.segment`."""
  host_memory.reexec_with_huge_page_malloc()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
