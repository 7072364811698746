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
config.eval.wt_label (BraTS: 1), on exactly the input file's grid (its shape, voxel order,
qform and sform; the first modality's file is the reference, for 4-D files its 3 spatial axes).

Models come from WORKDIR: each fold's best checkpoint runs/<method>/fold<k>, rebuilt from the
config saved next to it, with that fold's histogram references prep/hist_refs_fold<k>.json.
Without --ensemble one fold is used: --fold, else config.fold when >= 0, else the lowest
trained fold (the log says which). --ensemble averages the foreground probability of every
trained fold's model, each fed with its own fold's matching. --tta adds the four in-plane
mirrorings.

Optional outputs, all on the input's grid like the mask (float32):
  --save-prob            <id>_prob.nii.gz           tumor probability (what the mask thresholds)
  --save-pseudo-normal   <id>_pseudo_normal.nii.gz  the IntroVAE's pseudo-normal T1, [0, 1]
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

import dataclasses
import functools
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
import ml_collections
from ml_collections import config_flags
import numpy as np

from data_prep.case import Case, CaseError, ImageRef
from data_prep.readers import NIFTI_SUFFIXES, strip_nifti

PHASES = ('load', 'preprocess', 'introvae', 'segment', 'write')
OUTPUT_SUFFIXES = {
    'seg': '_seg.nii.gz',
    'prob': '_prob.nii.gz',
    'pseudo_normal': '_pseudo_normal.nii.gz',
    'attention': '_attention.nii.gz',
}
_MSD_FOLDERS = ('imagesTs', 'imagesTr')


# --- configs ---------------------------------------------------------------------------------
def _tuples(x):
  """JSON lists back to the tuples the configs use (to_json_best_effort writes tuples as lists)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def read_config(path) -> ml_collections.ConfigDict:
  """A config saved as JSON by the main job (WORKDIR/config.json, runs/.../config.json)."""
  path = Path(path)
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f'{path}: no readable config ({e}); is this a workdir of '
                            'clfc_jax.main? (or pass --config)') from None


def _with_method(config, method: Optional[str]):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if method and method != config.method:
    default.apply_method(config, method)
  return config


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
  eval_fn: Callable               # train.make_jitted_steps(...).eval
  attention_fn: Optional[Callable]  # (variables, batch) -> {'probs': A_1..A_4 [B,H,W,4]}


@dataclasses.dataclass(frozen=True)
class PseudoNormalNet:
  """The frozen IntroVAE and the T1 landmarks its training slices were matched to."""
  enc: Any
  dec: Any
  recon_fn: Callable
  landmarks: np.ndarray
  batch_size: int


@dataclasses.dataclass(frozen=True)
class Models:
  """Everything `segment_case` needs; build it once with `load_models`."""
  config: Any                     # preprocessing, threshold, WT label (the first fold's config)
  method: str
  members: tuple                  # FoldModel per fold used (one, or every fold with --ensemble)
  introvae: Optional[PseudoNormalNet]
  mesh: Any
  eval_batch: int
  workdir: Path


_FN_CACHE = {}


def _compiled(config, mesh):
  """(model, eval_fn, attention_fn) of one config, shared by folds and repeated loads (jit
  caches per function object: fresh ones would compile again)."""
  import jax  # pylint: disable=g-import-not-at-top
  from clfc_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from clfc_jax.models import segmenter  # pylint: disable=g-import-not-at-top
  key_config = config.copy_and_resolve_references()
  key_config.fold = 0
  key = (key_config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat))
  if key not in _FN_CACHE:
    model = segmenter.build_segmenter(config)
    eval_fn = train.make_jitted_steps(config, mesh, model).eval
    attention_fn = None
    if config.clfc.enabled:
      attention_fn = jax.jit(functools.partial(_attention_maps, model=model),
                             in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
                             out_shardings=sharding.data_sharding(mesh))
    _FN_CACHE[key] = (model, eval_fn, attention_fn)
  return _FN_CACHE[key]


def _attention_maps(variables, batch, *, model):
  """CLFC attention A_1..A_4 (levels 1/8 .. full) bilinearly upsampled to the slice: [B,H,W,4].

  Returned under 'probs' so that evaluate.predict_volume batches it like a probability.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  image = batch['image']
  out = model.apply(variables, image, batch.get('normal'), train=False)
  b, h, w = image.shape[:3]
  maps = [jax.image.resize(level['attention'].astype(jnp.float32), (b, h, w, 1), 'bilinear')
          for level in out['levels']]
  return {'probs': jnp.concatenate(maps, axis=-1)}


def trained_folds(workdir, method: str) -> list:
  """Folds of `method` with a checkpoint folder in WORKDIR/runs, ascending."""
  runs = Path(workdir) / 'runs' / method
  if not runs.is_dir():
    return []
  folds = []
  for d in runs.glob('fold*'):
    if d.name[4:].isdigit() and (d / 'checkpoints').is_dir():
      folds.append(int(d.name[4:]))
  return sorted(folds)


def _pick_folds(config, workdir, method, fold, ensemble) -> tuple:
  """The folds whose models segment, and why (for the log)."""
  available = trained_folds(workdir, method)
  if not available:
    raise FileNotFoundError(f'{Path(workdir) / "runs" / method}: no trained fold of {method!r} '
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
    raise FileNotFoundError(f'{Path(workdir) / "runs" / method / f"fold{fold}"}: fold {fold} of '
                            f'{method!r} is not trained (trained: {available})')
  return [int(fold)], why


def _normal_landmarks(wd, config) -> np.ndarray:
  """The IntroVAE's T1 reference, read (never fitted): the normal cohort's or its fold's."""
  from clfc_jax import normal_appearance  # pylint: disable=g-import-not-at-top
  from data_prep import normalize  # pylint: disable=g-import-not-at-top
  modality = config.dataset.normal_modality
  paths = (normalize.normal_reference_path(wd.prep),
           normalize.normal_reference_path(wd.prep, normal_appearance.normal_fold(config)))
  for path in paths:
    if path.exists():
      refs = normalize.load_references(path)
      if modality not in refs:
        raise ValueError(f'{path}: no reference for the normal modality {modality!r}')
      return refs[modality]
  raise FileNotFoundError(f'{paths[0]} (or {paths[1].name}): no IntroVAE T1 reference '
                          '(prep stage)')


def load_models(config=None, workdir=None, *, method: Optional[str] = None,
                fold: Optional[int] = None, ensemble: bool = False,
                tta: Optional[bool] = None, mesh=None) -> Models:
  """Restores the segmenter(s) and the IntroVAE of `workdir` once, for any number of patients.

  config: None = each model's own saved config (WORKDIR/config.json, runs/<method>/fold<k>/
  config.json, introvae/config.json); a ConfigDict overrides them all. method: default
  config.method. fold / ensemble: see the module docstring. tta: None = config.eval.tta.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from clfc_jax import evaluate, normal_appearance, sharding, stages
  if workdir is None:
    raise ValueError('load_models needs the workdir of a trained main job')
  wd = stages.Workdir(Path(workdir).expanduser())
  override = config is not None
  base = config if override else read_config(wd.root / 'config.json')
  base = _with_method(base, method)
  method = base.method
  mesh = mesh or sharding.make_mesh(jax.local_devices())
  members = []
  folds, why = _pick_folds(base, wd.root, method, fold, ensemble)
  logging.info('segment: %s fold(s) %s (%s)', method, folds, why)
  for k in folds:
    run_dir = wd.runs / method / f'fold{k}'
    cfg = base if override or not (run_dir / 'config.json').exists() else read_config(
        run_dir / 'config.json')
    cfg = cfg.copy_and_resolve_references()
    if tta is not None:
      cfg.eval.tta = bool(tta)
    if _preprocessing(cfg) != _preprocessing(base):
      raise ValueError(f'{run_dir}/config.json: fold {k} was trained with other prep settings '
                       'or modalities than the workdir config; pass --config to choose')
    model, eval_fn, attention_fn = _compiled(cfg, mesh)
    variables, step = evaluate.restore_variables(cfg, run_dir, model, mesh)
    refs = evaluate.fold_references(wd, k, cfg.dataset.modalities)
    members.append(FoldModel(fold=k, config=cfg, step=step, variables=variables, refs=refs,
                             eval_fn=eval_fn, attention_fn=attention_fn))
    logging.info('segment: %s fold %d: checkpoint step %d of %s', method, k, step, run_dir)
  introvae = None
  if any(m.config.model.use_normal_net for m in members):
    iv_path = wd.introvae / 'config.json'
    iv_config = base if override or not iv_path.exists() else read_config(iv_path)
    state = normal_appearance.restore_introvae(iv_config, wd, mesh)
    enc, dec = jax.device_put(jax.device_get((state.enc_params, state.dec_params)),
                              sharding.replicated(mesh))
    n = mesh.devices.size
    introvae = PseudoNormalNet(
        enc=enc, dec=dec, recon_fn=normal_appearance.reconstruct_fn(iv_config),
        landmarks=_normal_landmarks(wd, base),
        batch_size=n * -(-int(iv_config.introvae.recon_batch_size) // n))
  config = members[0].config
  return Models(config=config, method=method, members=tuple(members), introvae=introvae,
                mesh=mesh, eval_batch=evaluate.eval_batch_size(config, mesh), workdir=wd.root)


# --- where the patients are ------------------------------------------------------------------
def _stem(path: Path) -> str:
  return strip_nifti(path.name)


def _niftis(folder: Path) -> list:
  return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.')
                and p.name.endswith(NIFTI_SUFFIXES))


def case_from_files(files: Mapping[str, Any], case_id: Optional[str] = None) -> Case:
  """A patient given as modality -> file; the id defaults to the first file's name without
  its `_<modality>` ending."""
  if not files:
    raise ValueError('no image files given')
  images = {m: ImageRef(Path(p).expanduser()) for m, p in files.items()}
  if not case_id:
    modality, ref = next(iter(images.items()))
    case_id = _stem(ref.path)
    for ending in (f'_{modality}', f'-{modality}', f'.{modality}'):
      if case_id.lower().endswith(ending.lower()) and len(case_id) > len(ending):
        case_id = case_id[:-len(ending)]
  return Case(case_id, images)


def case_from_4d_file(path, config, case_id: Optional[str] = None) -> Case:
  """An MSD-style 4-D file; its channels are named by config.dataset.msd_channels."""
  path = Path(path).expanduser()
  channels = list(config.dataset.msd_channels)
  missing = [m for m in config.dataset.modalities if m not in channels]
  if missing:
    raise CaseError(path, f'modalities {missing} are not among dataset.msd_channels '
                    f'{tuple(channels)} (the 4-D file\'s channel names)')
  return Case(case_id or _stem(path),
              {m: ImageRef(path, channel=channels.index(m)) for m in config.dataset.modalities})


def case_from_folder(folder, config) -> Case:
  """A patient folder. Per modality: the dataset's file_pattern, else the one NIfTI named
  `<modality>` or `*_<modality>`; a folder holding a single NIfTI is a 4-D (MSD) case. A
  modality without a file points at its expected path: loading then says "file missing"."""
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise CaseError(folder, 'patient folder does not exist')
  files = _niftis(folder)
  modalities = list(config.dataset.modalities)
  matches = {m: [] for m in modalities}
  for path in files:
    stem = _stem(path).lower()
    for m in modalities:
      if stem == m.lower() or stem.endswith(f'_{m.lower()}'):
        matches[m].append(path)
  if len(files) == 1 and not any(matches.values()):
    return case_from_4d_file(files[0], config, case_id=folder.name)
  images = {}
  for m in modalities:
    expected = folder / config.dataset.file_pattern.format(case=folder.name, modality=m)
    if expected.is_file():
      images[m] = ImageRef(expected)
    elif len(matches[m]) == 1:
      images[m] = ImageRef(matches[m][0])
    elif len(matches[m]) > 1:
      names = ', '.join(p.name for p in matches[m])
      raise CaseError(folder, f'several files could be the {m} image: {names}')
    else:
      images[m] = ImageRef(expected)
  return Case(folder.name, images)


def find_cases(input_dir, config):
  """(cases, problems {id: reason}) of a cohort folder, sorted by id.

  Patients: 4-D NIfTI files directly in the folder or in imagesTs/ / imagesTr/ (MSD), case
  folders, and case folders inside group folders (BraTS HGG/LGG). A patient that cannot even
  be described is a problem, never the end of the cohort.
  """
  root = Path(input_dir).expanduser()
  if not root.is_dir():
    raise CaseError(root, 'cohort folder does not exist or is not a folder')
  found, problems = [], {}

  def add(make, name):
    try:
      found.append(make())
    except CaseError as e:
      problems[name] = str(e)

  stems = [_stem(p).lower() for p in _niftis(root)]
  if all(any(s == m.lower() or s.endswith(f'_{m.lower()}') for s in stems)
         for m in config.dataset.modalities):
    raise CaseError(root, "holds one patient's modality files: give it as --case-dir")
  file_dirs = [root] + [root / d for d in _MSD_FOLDERS if (root / d).is_dir()]
  for d in file_dirs:
    for path in _niftis(d):
      add(lambda p=path: case_from_4d_file(p, config), _stem(path))
  subdirs = lambda f: sorted(p for p in f.iterdir() if p.is_dir() and not p.name.startswith(
      ('.', '__MACOSX')) and not (f == root and p.name in _MSD_FOLDERS + ('labelsTr',)))
  for sub in subdirs(root):
    folders = [sub] if _niftis(sub) else [g for g in subdirs(sub) if _niftis(g)]
    for folder in folders:
      add(lambda f=folder: case_from_folder(f, config), folder.name)
  ids = [c.case_id for c in found]
  dupes = sorted({i for i in ids if ids.count(i) > 1})
  if dupes:
    raise CaseError(root, f'patient ids occur twice: {dupes}')
  if not found and not problems:
    raise CaseError(root, 'no patients found (expected case folders with one NIfTI per '
                    'modality, or 4-D NIfTI files)')
  return sorted(found, key=lambda c: c.case_id), problems


# --- one patient -----------------------------------------------------------------------------
def output_paths(case_id: str, out_dir, *, save_prob=False, save_pseudo_normal=False,
                 save_attention=False) -> dict:
  """kind -> OUT/<id><suffix> of every file a patient gets."""
  wanted = {'seg': True, 'prob': save_prob, 'pseudo_normal': save_pseudo_normal,
            'attention': save_attention}
  return {k: Path(out_dir) / f'{case_id}{OUTPUT_SUFFIXES[k]}' for k, on in wanted.items() if on}


def _like_input(data: np.ndarray, reference, dtype):
  """`data` on the reference file's grid: its header (qform, sform, codes, units) kept."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  header = reference.header.copy()
  cls = type(reference) if isinstance(reference, nib.Nifti2Image) else nib.Nifti1Image
  img = cls(np.asarray(data, dtype), None, header=header)
  img.set_data_dtype(dtype)
  img.header.set_slope_inter(1.0, 0.0)
  img.header['cal_min'] = img.header['cal_max'] = 0
  img.header.set_intent('none')
  return img


def _write_all(images: Mapping[Path, Any]) -> None:
  """Every file or none: temporaries first, then renames."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  temps = {}
  try:
    for path, img in images.items():
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f'.{path.name}.tmp.nii.gz')
      temps[path] = tmp
      nib.save(img, tmp)
    for path, tmp in temps.items():
      os.replace(tmp, path)
  finally:
    for tmp in temps.values():
      tmp.unlink(missing_ok=True)


def check_options(models: Models, *, save_attention=False, save_pseudo_normal=False,
                  **unused) -> None:
  """A ValueError for outputs the method cannot give (no CLFC gates / no normal net)."""
  del unused
  if save_attention and any(m.attention_fn is None for m in models.members):
    raise ValueError(f'method {models.method!r} has no CLFC attention maps to save')
  if save_pseudo_normal and models.introvae is None:
    raise ValueError(f'method {models.method!r} uses no pseudo-normal T1')


def segment_case(models: Models, case: Case, out_dir, *, save_prob: bool = False,
                 save_pseudo_normal: bool = False, save_attention: bool = False,
                 overwrite: bool = False) -> dict:
  """Segments one patient into out_dir; raises CaseError (nothing written) for bad files.

  Returns {'case_id', 'status': 'done' | 'exists', 'outputs': {kind: path}, 'seconds':
  {load, preprocess, introvae, segment, write}}. 'exists': some output is already there and
  overwrite is off; nothing was read or written.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from clfc_jax import evaluate, normal_appearance  # pylint: disable=g-import-not-at-top
  from data_prep import prepare, register, validate  # pylint: disable=g-import-not-at-top
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
  pn = models.introvae
  unit = None
  if pn is not None:
    modality = config.dataset.normal_modality
    try:
      unit = normal_appearance.unit_t1(pc.modality(modality), pc.brain, pn.landmarks, config)
    except ValueError as e:
      raise CaseError(case.images[modality].path, f'{modality}: {e}') from None
  seconds['preprocess'] = time.perf_counter() - tick

  pseudo = None
  if pn is not None:
    tick = time.perf_counter()
    pseudo = normal_appearance.reconstruct_volume(pn.recon_fn, pn.enc, pn.dec, unit, pc.brain,
                                                  pn.batch_size, models.mesh)
    if not np.all(np.isfinite(pseudo)):
      raise CaseError(case.images[config.dataset.normal_modality].path,
                      'the IntroVAE reconstruction is not finite (diverged model?)')
    seconds['introvae'] = time.perf_counter() - tick

  prob, attention = 0.0, 0.0
  for member in models.members:
    tick = time.perf_counter()
    try:
      inputs = evaluate.case_inputs(pc, member.refs, member.config, pseudo)
    except CaseError as e:   # named by case id there: name a file here.
      raise CaseError(next(iter(case.images.values())).path, e.problem) from None
    seconds['preprocess'] += time.perf_counter() - tick
    tick = time.perf_counter()
    prob = prob + evaluate.predict_volume(member.eval_fn, member.variables, inputs,
                                          models.eval_batch, models.mesh)
    if save_attention:
      attention = attention + evaluate.predict_volume(
          member.attention_fn, member.variables, inputs, models.eval_batch, models.mesh)
    seconds['segment'] += time.perf_counter() - tick
  prob = prob / len(models.members)

  tick = time.perf_counter()
  native_prob = register.to_native(prob, pc.meta, 'linear')
  mask = np.where(native_prob > float(config.eval.threshold), int(config.eval.wt_label), 0)
  images = {paths['seg']: _like_input(mask, reference, np.uint8)}
  if save_prob:
    images[paths['prob']] = _like_input(np.clip(native_prob, 0.0, 1.0), reference, np.float32)
  if save_pseudo_normal:
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
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
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
              'save-attention'):
  flags.DEFINE_alias(_name.replace('-', '_'), _name)
flags.mark_flags_as_required(['workdir', 'out'])
FLAGS = flags.FLAGS


def _base_config():
  if _CONFIG.value is not None:
    return _CONFIG.value
  return read_config(Path(_WORKDIR.value).expanduser() / 'config.json')


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
  config = _with_method(_base_config(), _METHOD.value)
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
  cache = workdir / 'cache' / 'jax'
  if cache.is_dir() and os.access(cache, os.W_OK):   # the main job's compilation cache
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', str(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  try:
    models = load_models(_CONFIG.value, workdir, method=_METHOD.value, fold=_FOLD.value,
                         ensemble=_ENSEMBLE.value, tta=_TTA.value)
    check_options(models, **options)
  except (FileNotFoundError, ValueError) as e:   # no trained model / options it cannot serve
    print(f'segment: {e}', file=sys.stderr)
    return 1
  summary = segment_cases(models, cases, out_dir, problems=problems, **options)
  print(format_summary(summary, out_dir))
  return 1 if summary['failed'] else 0


if __name__ == '__main__':
  from clfc_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  app.run(main, flags_parser=parse_flags)
