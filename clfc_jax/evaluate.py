"""Evaluation in native space (SPEC §8): predict every axial slice, map back, score per patient.

A test patient's prepared (MNI-space) volumes are histogram-matched with its fold's references
and cut into 2.5D stacks exactly as the shards were (data_prep.inputs); the jitted eval step
predicts every axial slice (clfc_jax.predict); the foreground probability goes back through the inverse MNI alignment onto the native
file's grid, is thresholded there, and is scored against the native label file with the native
voxel spacing. No TensorFlow anywhere: evaluation runs on accelerator machines without it.

Why the probability and not the mask is resampled: linear interpolation of the probability
followed by a threshold at the native resolution gives a smooth boundary on the finer native
grid, while nearest-neighbour on a 0/1 mask copies the MNI grid's staircase (2 mm blocks at the
demo spacing) into the native image (nnU-Net likewise resamples softmax maps, not labels).
"""
from __future__ import annotations

import json
from pathlib import Path
import time
from typing import Mapping, Optional

from absl import logging
import jax
import nibabel as nib
import numpy as np
from tqdm import tqdm

from clfc_jax import external
from clfc_jax import metrics as metrics_lib
from clfc_jax import postprocess
from clfc_jax import predict
from clfc_jax import sharding as sharding_lib
from clfc_jax import stats
from clfc_jax.workdir import Workdir
from configs import default
from data_prep import folds as folds_lib
from data_prep import inputs, labels, normalize, register, store
from data_prep.case import CaseError

PREDICTION_SUFFIX = '_seg.nii.gz'
POSTPROCESS_NAME = 'postprocess.json'   # the fold's component-removal choice (validation)


# --- native space ------------------------------------------------------------------------------
def load_native_label(meta: Mapping):
  """(WT truth bool array in the file's voxel order, nibabel image) of the case's label file."""
  path = meta.get('label_file')
  if not path:
    raise CaseError(meta.get('case_id', '?'), 'prepared case records no label file')
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except (OSError, ValueError, nib.filebasedimages.ImageFileError) as e:
    raise CaseError(path, f'cannot read the native label ({e})') from None
  native_shape = tuple(int(n) for n in meta['native_shape'])
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.shape != native_shape:
    raise CaseError(path, f'label has shape {data.shape}, the prepared case recorded '
                    f'{native_shape}')
  return data > 0, img


native_spacing = external.native_spacing   # voxel size in mm from a NIfTI header (one copy)


def affine_spacing(affine) -> tuple:
  """Voxel size in mm along the array axes of a 4x4 voxel-to-world affine (column norms)."""
  return tuple(float(x) for x in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


def native_mask(prob_mni: np.ndarray, prepared_meta: Mapping, config, *, brain=None,
                min_volume_ml: float = 0.0):
  """(bool tumor mask, probability) on the native file's grid, from the MNI-space probability.

  Prediction hygiene (clfc_jax.postprocess, config.postprocess): the probability is zeroed
  outside the prepared brain mask `brain` (MNI space, when given and postprocess.brain_mask),
  resampled linearly onto the native grid, thresholded at config.eval.threshold, and its
  connected components below `min_volume_ml` (chosen on validation patients) are removed.

  Region probabilities [Z, H, W, R] (task.regions 'wt_tc_et') give nested masks [..., R]:
  each region is resampled and thresholded on its own, the masks are nested (labels.nest:
  ET ⊆ TC ⊆ WT), and the small components are removed from WT only, taking the TC and ET
  voxels inside them along. Why on WT: stray false positives are what the cleaning is for, and
  they show up in every region at once; TC and ET are parts of a tumour, and a small ET rim
  component of a real tumour must not be dropped for its own size. One min volume, chosen on
  the validation patients' WT Dice, then serves both modes.
  """
  prob = np.asarray(prob_mni, np.float32)
  if prob.ndim == 4:
    parts = [native_mask(prob[..., r], prepared_meta, config, brain=brain)
             for r in range(prob.shape[-1])]
    masks = labels.nest(np.stack([m for m, _ in parts], axis=-1))
    pp = config.postprocess
    wt = postprocess.remove_small_components(
        masks[..., 0], affine_spacing(prepared_meta['native_affine']), min_volume_ml,
        pp.connectivity, pp.keep_largest)
    return masks & wt[..., None], np.stack([p for _, p in parts], axis=-1)
  if brain is not None and config.postprocess.brain_mask:
    prob = postprocess.restrict_to_brain(prob, brain)
  native_prob = register.to_native(prob, prepared_meta, 'linear')
  mask = native_prob > float(config.eval.threshold)
  pp = config.postprocess
  mask = postprocess.remove_small_components(
      mask, affine_spacing(prepared_meta['native_affine']), min_volume_ml, pp.connectivity,
      pp.keep_largest)
  return mask, native_prob


def score_case(prob_mni: np.ndarray, prepared_meta: Mapping, config, *, brain=None,
               min_volume_ml: float = 0.0):
  """(metrics dict, native prediction uint8) of one patient, scored against its label file.

  The probability [Z, H, W] (crop or whole MNI grid) becomes a native-space mask (native_mask);
  WT voxels carry config.eval.wt_label.
  """
  foreground, _ = native_mask(prob_mni, prepared_meta, config, brain=brain,
                              min_volume_ml=min_volume_ml)
  truth, img = load_native_label(prepared_meta)
  scores = metrics_lib.case_metrics(foreground, truth, native_spacing(img))
  native_pred = np.where(foreground, int(config.eval.wt_label), 0).astype(np.uint8)
  return scores, native_pred


def native_truth(prepared_meta: Mapping, config):
  """(bool [..., R] region masks of task.regions, nibabel image) of the case's native label
  file, read in config.task.label_convention (a value outside it is an error naming the file)."""
  path = prepared_meta.get('label_file')
  if not path:
    raise CaseError(prepared_meta.get('case_id', '?'), 'prepared case records no label file')
  label, img = external.load_label_map(path, prepared_meta['native_shape'], 'native label')
  try:
    return labels.region_masks(label, config.task.label_convention,
                               labels.region_names(config)), img
  except ValueError as e:
    raise CaseError(path, str(e)) from None


def score_regions(prob_mni: np.ndarray, prepared_meta: Mapping, config, *, brain=None,
                  min_volume_ml: float = 0.0):
  """({region: metrics}, native prediction uint8) of one patient, per task.regions.

  'wt': score_case's metrics under 'wt' (the paper's table, unchanged). 'wt_tc_et': the region
  probabilities [Z, H, W, R] become nested native masks (native_mask), each region is scored
  against the label file's region (Dice, sensitivity, HD95 and the BraTS 2023 lesion-wise
  Dice / HD95 of config.task.lesion), and the prediction is written in the input's label
  convention (labels.to_label_map).
  """
  regions = labels.region_names(config)
  if len(regions) == 1:
    scores, native_pred = score_case(prob_mni, prepared_meta, config, brain=brain,
                                     min_volume_ml=min_volume_ml)
    return {'wt': scores}, native_pred
  masks, _ = native_mask(prob_mni, prepared_meta, config, brain=brain,
                         min_volume_ml=min_volume_ml)
  truth, img = native_truth(prepared_meta, config)
  spacing = native_spacing(img)
  scores = {}
  for r, region in enumerate(regions):
    scores[region] = metrics_lib.case_metrics(masks[..., r], truth[..., r], spacing)
    lesion = metrics_lib.lesion_wise(masks[..., r], truth[..., r], spacing,
                                     **config.task.lesion)
    scores[region].update({m: lesion[m] for m in stats.LESION_METRICS})
  return scores, labels.to_label_map(masks, config.task.label_convention)


def save_prediction(path, native_pred: np.ndarray, prepared_meta: Mapping,
                    reference_img=None) -> Path:
  """Writes a uint8 NIfTI on the native file's grid (its affine; its header when given)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  affine = np.asarray(prepared_meta['native_affine'], np.float64)
  header = reference_img.header.copy() if reference_img is not None else None
  img = nib.Nifti1Image(np.asarray(native_pred, np.uint8), affine, header=header)
  img.set_data_dtype(np.uint8)
  img.header.set_slope_inter(1.0, 0.0)
  with store.atomic_write(path) as tmp:
    nib.save(img, tmp)
  return path


# --- one fold of one method --------------------------------------------------------------------
def fold_references(wd, fold, modalities, split=None) -> dict:
  """The fold's histogram references, as fitted by the prep stage on train+val (read only).

  With the fold's `split`, a file fitted on other patients is refused as stale.
  """
  path = wd.hist_refs(fold)
  if not path.exists():
    raise CaseError(path, f'no histogram references for fold {fold} (run the prep stage)')
  fitted_on = normalize.references_fitted_on(path) if split is not None else None
  if fitted_on is not None and sorted(fitted_on) != sorted(split['train'] + split['val']):
    raise CaseError(path, f'fitted on other patients than fold {fold}\'s training split '
                    '(stale file: rerun the prep stage)')
  refs = normalize.load_references(path)
  missing = [m for m in modalities if m not in refs]
  if missing:
    raise CaseError(path, f'no references for modalities {missing}')
  return refs


def _read_done(csv_path, method, test_ids) -> list:
  """Rows of a partial per-patient CSV (resume), restricted to this fold's test patients."""
  if not csv_path.exists():
    return []
  done = stats.read_per_patient([csv_path]).get(method)
  if not done:
    return []
  rows = []
  columns = [m for m in stats.METRICS + stats.LESION_METRICS if m in done]
  for i, patient in enumerate(done['patient']):
    if patient not in test_ids:
      logging.warning('%s: %s is not a test patient of this fold; dropped', csv_path, patient)
      continue
    rows.append({'patient': patient, 'fold': done['fold'][i], 'method': method,
                 **{m: done[m][i] for m in columns}})
  return rows


def _read_done_regions(out_dir, method, test_ids, regions) -> dict:
  """{region: rows} of the patients done in EVERY region's CSV (a patient is written to each
  region's file in turn, so an interruption in between leaves it to be scored again)."""
  rows = {r: _read_done(out_dir / external.csv_name(r), method, test_ids) for r in regions}
  done = set.intersection(*({row['patient'] for row in rows[r]} for r in regions))
  return {r: [row for row in rows[r] if row['patient'] in done] for r in regions}


def _read_json(path):
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


def choose_postprocessing(config, val_ids, case_prob) -> dict:
  """The threshold and smallest-component volume to remove
  (postprocess.choose_threshold_and_min_volume), chosen on the fold's VALIDATION patients
  (never its test patients), nnU-Net style; config's own eval.threshold and min_volume_ml
  when there is no validation patient. case_prob(id) -> (prepared case, MNI prob).

  With task.regions 'wt_tc_et' the min volume is chosen on WT at eval.threshold (every region
  is thresholded there; see native_mask).
  """
  pp = config.postprocess
  threshold = float(config.eval.threshold)
  if not val_ids:
    return {'min_volume_ml': float(pp.min_volume_ml), 'threshold': threshold, 'chosen_on': []}
  preds, truths, spacings = [], [], []
  for case_id in val_ids:
    pc, prob = case_prob(case_id)
    mask, native_prob = native_mask(prob, pc.meta, config, brain=pc.brain)
    if mask.ndim == 4:
      preds.append(mask[..., 0])
      truth, img = native_truth(pc.meta, config)
      truth = truth[..., 0]
    else:   # the native-space probability: each candidate threshold is tried on it.
      preds.append(native_prob)
      truth, img = load_native_label(pc.meta)
    truths.append(truth)
    spacings.append(native_spacing(img))
  if preds[0].dtype == bool:
    choice = dict(postprocess.choose_min_volume(preds, truths, spacings, pp),
                  threshold=threshold)
  else:
    choice = postprocess.choose_threshold_and_min_volume(preds, truths, spacings, pp, threshold)
  choice['chosen_on'] = list(val_ids)
  logging.info('%s: postprocessing chosen on %d validation patients: threshold %.2f, remove '
               'components below %.3g ml (mean Dice %.4f, without removal %.4f)', config.method,
               len(val_ids), choice['threshold'], choice['min_volume_ml'],
               choice['mean_dice'][choice['min_volume_ml']], choice['baseline_dice'])
  return choice


def with_threshold(config, choice: Optional[Mapping]):
  """config with the postprocessing choice's threshold (files written before thresholds were
  chosen have none: config's own)."""
  if not choice or 'threshold' not in choice:
    return config
  config = config.copy_and_resolve_references()
  config.eval.threshold = float(choice['threshold'])
  return config


def _write_rows(csv_path, rows) -> None:
  with store.atomic_write(csv_path) as tmp:
    stats.write_per_patient(tmp, rows)


def evaluate_external(config, workdir, name: str, folder, fold: int) -> dict:
  """Scores an external method's native-space predictions (e.g. nnUNetv2_predict outputs in
  `folder`, one <case>.nii.gz per patient) of fold `fold`'s test patients, with the same
  metrics, into WORKDIR/eval/<name>/fold<k>/ so that Table 1 compares it like our methods."""
  wd = Workdir(workdir)
  split = folds_lib.prepared_split(wd.prep, config, fold)
  rows = external.score_folder(folder, wd.prep_cases, split['test'], config, method=name,
                               fold=fold, pred_convention=config.report.get(
                                   'external_convention', '') or None,
                               lesion=len(labels.region_names(config)) > 1)
  external.write_folder_scores(wd.eval_dir(name, fold), rows)
  summary = {'method': name, 'fold': int(fold), 'folder': str(folder),
             'n': len(next(iter(rows.values()), []))}
  wt = rows.get('wt', next(iter(rows.values()), []))
  summary.update({m: float(np.mean([r[m] for r in wt])) for m in stats.METRICS if wt})
  return summary


def evaluate_fold(config, workdir, fold: int, method: Optional[str] = None, *,
                  save_predictions: bool = True) -> dict:
  """Scores every test patient of `fold` with the best checkpoint of `method`, in native space.

  Writes WORKDIR/eval/<method>/fold<k>/per_patient.csv (after every patient: resumable, done
  patients are skipped), predictions/<id>_seg.nii.gz and summary.json; writes nothing outside
  WORKDIR/eval. With task.regions 'wt_tc_et' per_patient.csv holds WT and
  per_patient_{tc,et}.csv the other regions (external.csv_name), each with the lesion-wise
  columns, and the predictions are label maps in task.label_convention. Returns the mean
  (WT) metrics, per-region means under 'regions', the patient count, the checkpoint step and
  seconds per patient (the first patient's 'predict' includes the compilation).
  """
  if jax.process_count() > 1:
    raise RuntimeError('evaluation runs in one process (it writes one CSV per fold); run the '
                       'evaluate stage without config.train.distributed')
  config = default.method_config(config, method)
  method = config.method
  wd = Workdir(workdir)
  out_dir = wd.eval_dir(method, fold)
  csv_path = out_dir / 'per_patient.csv'
  split = folds_lib.prepared_split(wd.prep, config, fold)
  test_ids = split['test']
  regions = labels.region_names(config)
  rows = _read_done_regions(out_dir, method, set(test_ids), regions)
  todo = [i for i in test_ids if i not in {r['patient'] for r in rows[regions[0]]}]

  seconds = {'predict': 0.0, 'score': 0.0, 'save': 0.0}
  step, choice = None, _read_json(out_dir / POSTPROCESS_NAME)
  if todo:
    refs = fold_references(wd, fold, config.dataset.modalities, split)
    mesh = sharding_lib.make_mesh(jax.local_devices())
    fns = predict.segmenter_fns(config, mesh)
    variables, step = predict.load_segmenter(config, wd.run_dir(method, fold), mesh)
    batch_size = predict.round_batch(config.eval.batch_size, mesh)
    out_dir.mkdir(parents=True, exist_ok=True)

    def case_prob(case_id):
      pc = store.load_prepared(wd.prep_cases, case_id)
      pseudo = (inputs.load_pseudo_normal(wd.pseudo_normal_file(case_id, wd.introvae_key(fold)),
                                          pc.brain.shape)
                if config.model.use_normal_net else None)
      case = inputs.case_inputs(pc, refs, config, pseudo)
      adapted = predict.case_batch_norm(fns, variables, case, pc.brain, config, mesh)
      return pc, predict.predict_volume(fns, adapted, case, batch_size, mesh)

    if choice is None:
      choice = choose_postprocessing(config, split['val'], case_prob)
      store.write_text(out_dir / POSTPROCESS_NAME, json.dumps(choice, indent=1))
    for case_id in tqdm(todo, desc=f'evaluate {method} fold {fold}', unit='patient'):
      tick = time.perf_counter()
      pc, prob = case_prob(case_id)
      seconds['predict'] += time.perf_counter() - tick
      tick = time.perf_counter()
      scores, native_pred = score_regions(prob, pc.meta, with_threshold(config, choice),
                                          brain=pc.brain, min_volume_ml=choice['min_volume_ml'])
      seconds['score'] += time.perf_counter() - tick
      tick = time.perf_counter()
      if save_predictions:
        _, label_img = load_native_label(pc.meta)
        save_prediction(out_dir / 'predictions' / f'{case_id}{PREDICTION_SUFFIX}', native_pred,
                        pc.meta, label_img)
      for region in regions:
        rows[region].append({'patient': case_id, 'fold': int(fold), 'method': method,
                             **scores[region]})
        _write_rows(out_dir / external.csv_name(region),
                    sorted(rows[region], key=lambda r: r['patient']))
      seconds['save'] += time.perf_counter() - tick
  elif not rows[regions[0]]:
    raise CaseError(wd.prep, f'fold {fold} has no test patients')

  wt = rows[regions[0]]
  summary = {'method': method, 'fold': int(fold), 'n': len(wt), 'checkpoint_step': step,
             'evaluated_now': len(todo), 'per_patient_csv': str(csv_path),
             'postprocess': choice}
  summary.update({m: float(np.mean([r[m] for r in wt])) for m in stats.METRICS})
  if len(regions) > 1:
    summary['regions'] = {
        region: {m: float(np.mean([r[m] for r in rows[region]]))
                 for m in stats.METRICS + stats.LESION_METRICS} for region in regions}
  if todo:
    summary['seconds_per_patient'] = {k: round(v / len(todo), 3) for k, v in seconds.items()}
  store.write_text(out_dir / 'summary.json', json.dumps(summary, indent=1))
  return summary
