"""A finished WORKDIR -> the arrays the report's tables and figures need (nothing is drawn
here: clfc_jax.plots draws). Network outputs come through clfc_jax.predict, like every other
inference in the project.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import nibabel as nib
import numpy as np

from clfc_jax import external
from clfc_jax import plots
from clfc_jax import predict
from clfc_jax import sharding as sharding_lib
from clfc_jax import stats
from clfc_jax.workdir import Workdir
from configs import default
from data_prep import inputs as inputs_lib
from data_prep import labels, normalize, store

PER_PATIENT_NAME = 'per_patient.csv'   # written by clfc_jax.evaluate


# --- per-patient results -----------------------------------------------------------------------
def per_patient_paths(workdir, methods, folds, region: str = 'wt') -> dict:
  """{(method, fold): WORKDIR/eval/<method>/fold<k>/per_patient.csv} (per_patient_<region>.csv
  for TC and ET, external.csv_name)."""
  wd = Workdir(workdir)
  name = external.csv_name(region)
  return {(m, int(k)): wd.eval_dir(m, k) / name for m in methods for k in folds}


def load_results(workdir, methods, folds, *, allow_missing: bool = False, region: str = 'wt'):
  """(per_patient for the methods found, missing CSV paths) of `region`; raises if any is
  missing.

  Each CSV must hold its own method and fold only (a copied file is caught here).
  """
  paths = per_patient_paths(workdir, methods, folds, region)
  missing = [str(p) for p in paths.values() if not p.exists()]
  if missing and not allow_missing:
    lacking = sorted({f'{m} fold {k}' for (m, k), p in paths.items() if not p.exists()})
    raise FileNotFoundError(
        f'no per-patient results for {", ".join(lacking)}; run the evaluate stage for them '
        f'(missing: {", ".join(missing)})')
  per_patient = {}
  for (method, fold), path in paths.items():
    if not path.exists():
      continue
    found = stats.read_per_patient([path])
    if set(found) - {method}:
      raise ValueError(f'{path}: holds results of {sorted(found)}, expected only {method!r}')
    results = found.get(method)
    if results is None:
      continue
    wrong = sorted({f for f in results['fold'] if f != fold})
    if wrong:
      raise ValueError(f'{path}: rows of folds {wrong}, expected only fold {fold}')
    merged = per_patient.setdefault(method, {key: [] for key in results})
    if set(merged) != set(results):
      raise ValueError(f'{path}: columns {sorted(results)} differ from the other folds\' '
                       f'{sorted(merged)}')
    for key, values in results.items():
      merged[key].extend(values)
  if not per_patient:
    raise FileNotFoundError(f'no per-patient results at all under {Workdir(workdir).eval}')
  return per_patient, missing



# --- which patients, which slices ----------------------------------------------------------------
def pick_patients(results: Mapping, n: int) -> list:
  """Up to n (patient, fold) of one method's results, from its best Dice to its worst, evenly
  spaced in rank (n=3: best, median, worst); deterministic (ties broken by patient id)."""
  order = sorted(range(len(results['patient'])),
                 key=lambda i: (-float(results['dice'][i]), str(results['patient'][i])))
  if not order or n < 1:
    return []
  ranks = sorted({round(j * (len(order) - 1) / max(n - 1, 1)) for j in range(n)})
  return [(str(results['patient'][order[r]]), int(results['fold'][order[r]])) for r in ranks]


def display_modality(modalities: Sequence[str]) -> str:
  """FLAIR when there is one (whole tumor is clearest there), else the first modality."""
  lower = [m.lower() for m in modalities]
  return modalities[lower.index('flair')] if 'flair' in lower else modalities[0]



# --- native space (Fig. 2) -----------------------------------------------------------------------
def _canonical(path):
  img = nib.as_closest_canonical(nib.load(str(path)))
  data = np.asanyarray(img.dataobj)
  if data.ndim == 4:
    data = data[..., 0]
  return np.asarray(data, np.float32), img.header.get_zooms()[:3]


def truth_volumes_ml(workdir, patients: Sequence[str], convention: str) -> tuple:
  """({patient: whole-tumour volume in ml of its native label file}, [patients left out]).

  The volume is what the patient brings, not what a method predicts, so the report can split
  every method's results by it. A patient whose prepared case or label file is gone (moved
  data, an external method's extra cases) is left out and named rather than failing the report.
  """
  wd = Workdir(workdir)
  volumes, left_out = {}, []
  for patient in patients:
    try:
      meta = store.load_prepared_meta(wd.prep_cases, patient)
      data, zooms = _canonical(meta['label_file'])
      wt = labels.region_masks(data, convention, 'wt')[..., 0]
    except (OSError, KeyError, ValueError, nib.filebasedimages.ImageFileError):
      left_out.append(patient)
      continue
    volumes[patient] = float(wt.sum()) * float(np.prod(zooms, dtype=np.float64)) / 1000.0
  return volumes, left_out


def native_axial_row(meta: Mapping, predictions: Mapping[str, Optional[Path]],
                     dice: Mapping[str, float], title: str, convention: str) -> dict:
  """One row of Fig. 2 in the patient's native space: the axial slice (of the canonical RAS+
  volume) with the most ground-truth voxels, zoomed on the tumor (zoom_box), display order."""
  modalities = list(meta['files'])
  image, zooms = _canonical(meta['files'][display_modality(modalities)])
  truth = labels.region_masks(_canonical(meta['label_file'])[0], convention, 'wt')[..., 0]
  if truth.shape != image.shape:
    raise ValueError(f'{meta["label_file"]}: label shape {truth.shape} differs from the image '
                     f'{image.shape}')
  z = int(np.argmax(truth.sum(axis=(0, 1))))
  # [x, y] of RAS+ -> [y (P->A), x (L->R)], then radiological.
  show = lambda vol: plots.radiological(vol[:, :, z].T)
  img2d = show(image)
  head = plots.crop_box(img2d != 0)
  crop = lambda a: (lambda h: h[plots.zoom_box(show(truth)[head], h.shape)])(a[head])
  row = {'title': f'{title}\naxial slice {z}', 'image': crop(img2d), 'truth': crop(show(truth)),
         'predictions': {}, 'dice': dict(dice), 'aspect': float(zooms[1] / zooms[0])}
  for method, path in predictions.items():
    if path is None or not Path(path).exists():
      row['predictions'][method] = None
      continue
    pred = _canonical(path)[0] > 0
    row['predictions'][method] = crop(show(pred)) if pred.shape == image.shape else None
  return row



# --- network outputs (Figs. 3 and 4) -------------------------------------------------------------
def _logits_and_levels(out):
  return {'logits': out['logits'], 'levels': out['levels']}


def network_outputs(config, workdir, method: str, cases: Sequence[tuple],
                    slices_per_case: int = 4) -> dict:
  """Inference outputs of `method` on a few MNI-space slices of test patients.

  cases: [(case_id, fold)]; each case is run through its own fold's best checkpoint, on
  `tumor_slices(label, slices_per_case)`. Returns {'case', 'slice', 'image'
  [N, H, W] (display modality), 'label', 'brain' [N, H, W], 'prob' [N, H, W], 'levels':
  [{'zeta', 'g', 'attention'}: numpy [N, h, w, C]] (empty without CLFC)}.
  """
  mc = default.method_config(config, method)
  wd = Workdir(workdir)
  mesh = sharding_lib.make_mesh(jax.local_devices())
  fns = predict.segmenter_fns(mc, mesh)
  apply = fns.apply
  count = int(slices_per_case)
  shown = display_modality(list(mc.dataset.modalities))
  batches = {'case': [], 'slice': [], 'image': [], 'label': [], 'brain': [], 'in': [],
             'normal': []}
  variables = {}
  for case_id, fold in cases:
    if fold not in variables:
      variables[fold] = predict.load_segmenter(mc, wd.run_dir(method, fold), mesh)[0]
    pc = store.load_prepared(wd.prep_cases, case_id)
    pseudo = (inputs_lib.load_pseudo_normal(wd.pseudo_normal_file(case_id, wd.introvae_key(fold)),
                                            pc.brain.shape)
              if mc.model.use_normal_net else None)
    inputs = inputs_lib.case_inputs(pc, normalize.load_references(wd.hist_refs(fold)), mc,
                                    pseudo)
    picked = plots.tumor_slices(pc.label, count)
    batches['case'] += [case_id] * len(picked)
    batches['slice'] += picked
    batches['image'].append(pc.modality(shown)[picked])
    batches['label'].append(np.asarray(pc.label)[picked])
    batches['brain'].append(np.asarray(pc.brain)[picked])
    # The case's own BatchNorm statistics where evaluation used them (eval.case_bn_weight).
    adapted = predict.case_batch_norm(fns, variables[fold], inputs, pc.brain, mc, mesh)
    batches['in'].append((adapted, inputs['image'][picked],
                          inputs['normal'][picked] if 'normal' in inputs else None))
  probs, levels = [], []
  for case_variables, image, normal in batches['in']:
    n = len(image)
    batch = {'image': image} if normal is None else {'image': image, 'normal': normal}
    # Every call gets `count` slices: one compiled program per method.
    out = predict.predict_slices(lambda v, b: _logits_and_levels(apply(v, b)), case_variables,
                                 batch, predict.round_batch(count, mesh), mesh)
    logits = np.asarray(out['logits'], np.float32)[:n]
    if len(labels.region_names(mc)) == 1:   # the softmax's foreground probability
      probs.append(np.exp(logits[..., 1] - np.logaddexp(logits[..., 0], logits[..., 1])))
    else:                         # a region head: the WT sigmoid
      probs.append(1.0 / (1.0 + np.exp(-logits[..., 0])))
    levels.append([{k: np.asarray(v, np.float32)[:n] for k, v in lv.items()}
                   for lv in out['levels']])
  merged_levels = [{k: np.concatenate([lv[i][k] for lv in levels]) for k in levels[0][i]}
                   for i in range(len(levels[0]))] if levels and levels[0] else []
  return {'case': batches['case'], 'slice': batches['slice'],
          'image': np.concatenate(batches['image']), 'label': np.concatenate(batches['label']),
          'brain': np.concatenate(batches['brain']), 'prob': np.concatenate(probs),
          'levels': merged_levels}


def attention_row(method: str, outputs: Mapping, index: int = 0) -> dict:
  """Fig. 4's row of one method: slice `index` of network_outputs, in display order, with
  each level's region_means."""
  maps = [lv['attention'][index, ..., 0] for lv in outputs['levels']]
  return {'method': method, 'image': plots.radiological(outputs['image'][index]),
          'truth': plots.radiological(outputs['label'][index] > 0),
          'prob': plots.radiological(outputs['prob'][index]),
          'attention': [plots.radiological(a) for a in maps],
          'means': [plots.region_means(a, outputs['label'][index], outputs['brain'][index])
                    for a in maps]}



# --- pseudo-normals --------------------------------------------------------------------------------
def pseudo_normal_row(config, workdir, case_id: str, fold: int) -> dict:
  """One row of the pseudo-normal figure (MNI space, the slice with the most tumor): the tumor
  T1, the pseudo-normal that test fold `fold`'s IntroVAE made of it and the healthy T1
  (synthetic cohorts), scaled exactly as the IntroVAE saw its input."""
  wd = Workdir(workdir)
  key = wd.introvae_key(fold)
  pc = store.load_prepared(wd.prep_cases, case_id)
  pseudo = inputs_lib.load_pseudo_normal(wd.pseudo_normal_file(case_id, key), pc.brain.shape)
  landmarks = normalize.normal_t1_reference(wd.prep, config, key)
  modality = config.dataset.normal_modality
  z = plots.tumor_slices(pc.label, 1)[0] if pc.label is not None else pc.brain.shape[0] // 2
  unit = lambda vol: inputs_lib.unit_t1(vol, pc.brain, landmarks, config)[z]
  healthy = None if pc.healthy_t1 is None else plots.radiological(unit(pc.healthy_t1))
  truth = (labels.region_masks(pc.label[z], config.task.label_convention, 'wt')[..., 0]
           if pc.label is not None else np.zeros(pc.brain.shape[1:], bool))
  return {'title': f'{case_id}\nslice {z}', 'tumor_t1': plots.radiological(unit(pc.modality(modality))),
          'pseudo': plots.radiological(pseudo[z]), 'healthy': healthy, 'truth': plots.radiological(truth)}
