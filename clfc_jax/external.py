"""Scores another tool's native-space predictions (nnUNetv2_predict, MONAI, ...) like our own.

A folder holds one label map per patient, `<case>.nii.gz` (nnU-Net) or `<case>_seg.nii.gz`
(ours, BraTS), on the patient's native grid. Each is scored against the label file recorded in
the prepared case's metadata, with the same metrics, the same native spacing and the same
per-patient CSV columns as evaluate.py, so the rows sit beside ours in Table 1 and in the
paired Wilcoxon test. Regions follow config.task: the truth is read in
config.task.label_convention, the prediction in `pred_convention` (nnU-Net's own BraTS 2021
conversion renumbers labels to 1 edema, 2 non-enhancing, 3 enhancing: the 'msd' preset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import nibabel as nib
import numpy as np

from clfc_jax import metrics as metrics_lib
from clfc_jax import stats
from data_prep import labels as labels_lib
from data_prep import store
from data_prep.case import CaseError

PREDICTION_NAMES = ('{case}.nii.gz', '{case}_seg.nii.gz', '{case}.nii', '{case}_seg.nii')
LESION_COLUMNS = ('lesion_dice', 'lesion_hd95')


def find_prediction(pred_dir, case_id: str) -> Path:
  """The prediction file of `case_id` in `pred_dir` (first of PREDICTION_NAMES present)."""
  pred_dir = Path(pred_dir)
  candidates = [pred_dir / n.format(case=case_id) for n in PREDICTION_NAMES]
  for path in candidates:
    if path.is_file():
      return path
  raise CaseError(candidates[0], f'no prediction for patient {case_id!r} (looked for '
                  f'{", ".join(p.name for p in candidates)} in {pred_dir})')


def load_label_map(path, native_shape, role: str):
  """(integer array in the file's voxel order, nibabel image); the shape must be `native_shape`."""
  path = Path(path)
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as e:
    raise CaseError(path, f'cannot read the {role} ({e})') from None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.shape != tuple(native_shape):
    raise CaseError(path, f'{role} has shape {data.shape}, the patient\'s native image '
                    f'{tuple(native_shape)}')
  if data.dtype.kind == 'f':
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
      raise CaseError(path, f'{role} holds non-integer values: not a label map')
  return data.astype(np.int64), img


def native_spacing(img) -> tuple:
  """Voxel size in mm along the file's own array axes (header zooms)."""
  return tuple(float(z) for z in img.header.get_zooms()[:3])


def _regions_of(label, path, convention, regions, role):
  try:
    return labels_lib.region_masks(label, convention, regions)
  except ValueError as e:
    raise CaseError(path, f'{role}: {e}') from None


def score_case(pred_path, meta: Mapping, config, pred_convention=None, lesion: bool = False,
               affine_atol: Optional[float] = None) -> dict:
  """{region: metrics} of one patient's external prediction against its native label file.

  Metrics are metrics.case_metrics (and metrics.lesion_wise with config.task.lesion when
  `lesion`). Prediction and label must lie on the native grid recorded by the prep stage:
  its shape, and its affine to within `affine_atol` (default config.prep.affine_atol), so a
  reoriented or resampled file is refused instead of scored against the wrong anatomy.
  """
  label_file = meta.get('label_file')
  if not label_file:
    raise CaseError(meta.get('case_id', '?'), 'prepared case records no label file')
  shape = tuple(int(n) for n in meta['native_shape'])
  truth, truth_img = load_label_map(label_file, shape, 'native label')
  pred, pred_img = load_label_map(pred_path, shape, 'prediction')
  atol = float(config.prep.affine_atol if affine_atol is None else affine_atol)
  native_affine = np.asarray(meta['native_affine'], np.float64)
  for path, img, role in ((label_file, truth_img, 'native label'),
                          (pred_path, pred_img, 'prediction')):
    diff = float(np.max(np.abs(img.affine - native_affine)))
    if diff > atol:
      raise CaseError(path, f'{role} affine differs from the patient\'s native image by up to '
                      f'{diff:.4g} (tolerance {atol:g}): not on the native grid')
  regions = labels_lib.region_names(config)
  truth_masks = _regions_of(truth, label_file, config.task.label_convention, regions,
                            'native label')
  pred_masks = _regions_of(pred, pred_path, pred_convention or config.task.label_convention,
                           regions, 'prediction')
  spacing = native_spacing(truth_img)
  scores = {}
  for r, region in enumerate(regions):
    p, t = pred_masks[..., r], truth_masks[..., r]
    scores[region] = metrics_lib.case_metrics(p, t, spacing)
    if lesion:
      lw = metrics_lib.lesion_wise(p, t, spacing, **config.task.lesion)
      scores[region].update({c: lw[c] for c in LESION_COLUMNS})
  return scores


def score_folder(pred_dir, prep_cases_dir, case_ids: Sequence[str], config, *, method: str,
                 fold: int, pred_convention=None, lesion: bool = False) -> dict:
  """{region: per-patient rows} of every patient in `case_ids`, in stats.PER_PATIENT_COLUMNS.

  Rows carry 'patient', 'fold', 'method' and the metrics (plus LESION_COLUMNS with `lesion`;
  stats.write_per_patient ignores them). A patient without a prediction is an error naming
  the file expected: a missing patient would silently drop out of the paired comparison.
  """
  rows = {region: [] for region in labels_lib.region_names(config)}
  for case_id in sorted(case_ids):
    try:
      meta = store.load_prepared_meta(prep_cases_dir, case_id)
    except (OSError, ValueError) as e:
      raise CaseError(Path(prep_cases_dir) / f'{case_id}.json',
                      f'no readable prepared case ({e})') from None
    path = find_prediction(pred_dir, case_id)
    for region, scores in score_case(path, meta, config, pred_convention, lesion).items():
      rows[region].append({'patient': case_id, 'fold': int(fold), 'method': method, **scores})
  return rows


def parse_methods(spec: str) -> dict:
  """{name: folder} from config.report.external's 'name=FOLDER[,name=FOLDER]'."""
  out = {}
  for item in filter(None, (part.strip() for part in str(spec).split(','))):
    name, sep, folder = item.partition('=')
    if not sep or not name.strip() or not folder.strip():
      raise ValueError(f'report.external: {item!r} is not name=FOLDER')
    out[name.strip()] = Path(folder.strip()).expanduser()
  return out


def csv_name(region: str) -> str:
  """per_patient.csv for the whole tumour (the paper's table), per_patient_<region>.csv else."""
  return 'per_patient.csv' if region == 'wt' else f'per_patient_{region}.csv'


def write_folder_scores(out_dir, rows_by_region: Mapping[str, list]) -> list:
  """Writes each region's rows with stats.write_per_patient; returns the paths."""
  paths = []
  for region, rows in rows_by_region.items():
    path = Path(out_dir) / csv_name(region)
    stats.write_per_patient(path, rows)
    paths.append(path)
  return paths
