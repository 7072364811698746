"""The preparation stage (paper §3): a validated case -> MNI152-aligned, brain-masked, cropped.

One case: read and check (validate.load_case), register one modality to the MNI152 T1 template
(affine, register.py), pull every modality, the label and the healthy T1 through that single
transform, mask the brain, cut the fixed crop box, scale each modality by a brain percentile.
A cohort: the same per case in a spawn-safe process pool, resumable (a case whose JSON exists
is done), one broken case never costs the others (it is listed with its reason).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
from pathlib import Path
import time
from typing import Optional

import numpy as np
from scipy import ndimage as ndi
import SimpleITK as sitk
from tqdm import tqdm

from data_prep import pools, register, store, validate
from data_prep.case import Case, CaseError, LoadedCase

SUMMARY_NAME = 'prep_summary.json'


# --- the fixed crop box ----------------------------------------------------------------------
def crop_box(template_mask: np.ndarray, crop_hw) -> tuple:
  """((z0, z1), (h0, h1), (w0, w1)) on the MNI grid [Z, H, W], the same for every case.

  Z spans the template's brain slices; in-plane the box of size `crop_hw` is centred on the
  brain's bounding box (it may reach past the grid: those voxels are padding).
  """
  mask = np.asarray(template_mask) > 0
  box = []
  for axis, size in zip(range(3), (None,) + tuple(crop_hw)):
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=others))
    lo, hi = int(present[0]), int(present[-1]) + 1
    if size is not None:
      lo = int(np.floor((lo + hi - int(size)) / 2))
      hi = lo + int(size)
    box.append((lo, hi))
  return tuple(box)


@dataclasses.dataclass(frozen=True)
class MniSpace:
  template: sitk.Image        # T1 template on the prep grid (prep.spacing)
  box: tuple                  # crop box on that grid, [Z, H, W] index ranges
  crop_grid: sitk.Image       # the box as a grid: resampling target of every volume
  template_brain: np.ndarray  # bool [Z, H, W] in the box: the template's brain mask
  dilated_brain: np.ndarray   # ... grown by prep.mask_dilation_mm
  reg_template: sitk.Image    # fixed image of the registration (prep.reg.spacing)
  reg_mask: sitk.Image        # its metric mask (dilated brain)


@functools.lru_cache(maxsize=8)
def _mni_space(spacing: float, mask_threshold: float, dilation_mm: float, crop_hw: tuple,
               reg_spacing: float):
  """Everything about the MNI side that one prep config fixes, built once per process."""
  template, mask = register.mni_template(spacing, mask_threshold)
  box = crop_box(sitk.GetArrayViewFromImage(mask), crop_hw)
  template_brain = register.crop_to_box(sitk.GetArrayFromImage(mask).astype(bool), box)
  brain = register.crop_to_box(
      sitk.GetArrayFromImage(register.dilate_mask(mask, dilation_mm)).astype(bool), box)
  # The registration's fixed side, at its own (coarser) spacing.
  reg_template, reg_mask = register.mni_template(reg_spacing or spacing, mask_threshold)
  return MniSpace(template=template, box=box, crop_grid=register.box_grid(template, box),
                  template_brain=template_brain, dilated_brain=brain,
                  reg_template=reg_template,
                  reg_mask=register.dilate_mask(reg_mask, dilation_mm))


def mni_space(config) -> MniSpace:
  p = config.prep
  return _mni_space(float(p.spacing), float(p.template_mask_threshold),
                    float(p.mask_dilation_mm), tuple(int(v) for v in p.crop_hw),
                    float(p.reg.spacing))


# --- brain extraction for unstripped normal T1s ----------------------------------------------
def _voxels(mm: float, spacing: float) -> int:
  """`mm` in voxels of an isotropic `spacing` grid, at least one."""
  return max(1, int(round(float(mm) / spacing)))


def _ball(radius: int) -> np.ndarray:
  """A ball structuring element of `radius` voxels."""
  zz, yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1, -radius:radius + 1]
  return zz ** 2 + yy ** 2 + xx ** 2 <= radius ** 2


def extract_brain(t1: np.ndarray, template_brain: np.ndarray, reach: np.ndarray,
                  config) -> np.ndarray:
  """Brain mask of a T1 with its skull on, on the MNI crop grid: the template brain refined on
  the image.

  IXI is not skull-stripped while BraTS is. The tumour cohort's rule (dilated template brain
  AND signal) would keep the skull, dura and scalp within the dilation, so the IntroVAE would
  learn a bright/dark rim that no BraTS input has, and the T1 landmarks would count
  non-brain voxels. Here: the eroded template brain is surely brain (its median intensity is
  the tissue reference); within `reach` (the tumour cohort's dilated template brain, so both
  cohorts' masks can reach equally far), brain is what lies between
  normal_brain_low and normal_brain_high times that reference (bone and air are darker than
  CSF; fat and marrow much brighter than WM), connected to the sure core through more than a
  thin bridge, with enclosed holes (ventricles) filled. The mask only ever shrinks `reach`.
  """
  p = config.prep
  spacing = float(p.spacing)
  t1 = np.asarray(t1, np.float32)
  template_brain = np.asarray(template_brain, bool)
  core = ndi.binary_erosion(template_brain, _ball(_voxels(p.normal_brain_core_mm, spacing)))
  if not core.any():
    raise ValueError('brain extraction: the eroded template brain is empty '
                     '(prep.normal_brain_core_mm too large for the grid)')
  reference = float(np.median(t1[core]))
  if not reference > 0:
    raise ValueError('brain extraction: no signal in the template brain core '
                     '(blank image or failed registration)')
  reach = np.asarray(reach, bool)
  tissue = reach & (t1 > p.normal_brain_low * reference) & (
      t1 < p.normal_brain_high * reference)
  # Opening cuts the thin bridges that partial volume leaves across the bone; the component
  # holding the core is the brain; growing it back through tissue by the opening radius
  # returns the cortex's edge that the opening shaved, without crossing the bone again.
  radius = _voxels(p.normal_brain_opening_mm, spacing)
  seed = ndi.binary_opening(tissue, _ball(radius)) | core
  labels, _ = ndi.label(seed)
  keep = np.unique(labels[core])
  brain = np.isin(labels, keep[keep > 0])
  brain = ndi.binary_dilation(brain, _ball(1), iterations=radius, mask=tissue | core)
  brain = ndi.binary_fill_holes(brain)
  # Plus the one-voxel rim that touches empty background: the partial-volume edge of an image
  # that is already skull-stripped, which the tumour cohort's masks keep (without it a
  # stripped normal T1 loses ~6% of its brain voxels, all dark, and its low T1 landmarks move
  # away from the tumour cases'). Around a skull there is no empty voxel, so no rim.
  cube = np.ones((3, 3, 3), bool)
  rim = ndi.binary_dilation(brain, cube) & reach & ndi.binary_dilation(t1 <= 0, cube)
  return brain | rim


# --- one case --------------------------------------------------------------------------------
def registration_modality(case: Case, config) -> str:
  d = config.dataset
  name = d.normal_modality if case.group == 'normal' else d.registration_modality
  if name not in case.images:
    first = next(iter(case.images.values()), None)
    raise CaseError(first.path if first else case.case_id,
                    f'registration modality {name!r} missing (case has {list(case.images)})')
  return name


def prepare_case(case: Case, config, out_dir=None) -> store.PreparedCase:
  """Reads, checks, aligns and crops one case; saves it into `out_dir` when given."""
  mni_space(config)   # built once per process; not a per-case cost
  start = time.perf_counter()
  loaded = validate.load_case(case, config)
  seconds = {'load': time.perf_counter() - start}
  prepared = prepare_loaded(loaded, config, seconds=seconds)
  seconds['total'] = time.perf_counter() - start
  prepared.meta['seconds'] = {k: round(v, 3) for k, v in seconds.items()}
  if out_dir is not None:
    tick = time.perf_counter()
    store.save_prepared(prepared, out_dir)   # the saved JSON has every part but the save
    prepared.meta['seconds']['save'] = round(time.perf_counter() - tick, 3)
    prepared.meta['seconds']['total'] = round(time.perf_counter() - start, 3)
  return prepared


def prepare_loaded(loaded: LoadedCase, config, *, seconds: Optional[dict] = None
                   ) -> store.PreparedCase:
  """The MNI part of `prepare_case` for a case already in memory (canonical RAS+ arrays)."""
  seconds = {} if seconds is None else seconds
  case = loaded.case
  p = config.prep
  space = mni_space(config)
  reg_name = registration_modality(case, config)
  where = case.images[reg_name].path

  tick = time.perf_counter()
  register.check_geometry(where, loaded.affine)
  moving = register.to_sitk(loaded.images[reg_name], loaded.affine)
  try:
    transform, metric = register.register_affine_with_metric(
        moving, space.reg_template, p.reg, fixed_mask=space.reg_mask)
  except RuntimeError as e:  # ITK: e.g. too few samples inside the mask after a bad start.
    raise CaseError(where, f'registration to MNI152 failed: {str(e).strip().splitlines()[-1]}')
  seconds['register'] = time.perf_counter() - tick

  tick = time.perf_counter()
  def pull(array, interp):  # straight onto the crop box: [Z, H, W]
    image = register.to_sitk(array, loaded.affine)
    return sitk.GetArrayFromImage(register.resample(image, space.crop_grid, transform, interp))

  modalities = list(loaded.images)
  images = np.stack([pull(loaded.images[m], 'linear') for m in modalities])
  label = pull(loaded.label, 'nearest').astype(np.uint8) if loaded.label is not None else None
  healthy = pull(loaded.healthy_t1, 'linear') if loaded.healthy_t1 is not None else None

  # Dilated template brain AND signal: skull-stripped inputs (BraTS) keep their own edge. An
  # unstripped normal T1 (IXI) would keep the skull within the dilation, so normal cases get
  # a real brain extraction. The label never enters the mask: inputs must look the same
  # whether or not a ground truth exists (test cases, new patients).
  brain = space.dilated_brain & (images > 0).any(axis=0)
  if case.group == 'normal' and p.normal_brain_extraction == 'refined':
    try:
      brain &= extract_brain(images[modalities.index(reg_name)], space.template_brain,
                             space.dilated_brain, config)
    except ValueError as e:
      raise CaseError(where, str(e)) from None
  elif p.normal_brain_extraction not in ('refined', 'template'):
    raise ValueError(f'prep.normal_brain_extraction={p.normal_brain_extraction!r}; expected '
                     "'refined' or 'template'")
  if not brain.any():
    raise CaseError(where, 'no brain voxel inside the MNI crop after registration')
  images *= brain
  scales = {}
  for i, m in enumerate(modalities):
    scales[m] = _brain_percentile(images[i], brain, p.scale_percentile)
    if not scales[m] > 0:
      raise CaseError(case.images[m].path, 'no positive intensity inside the brain after '
                      'MNI alignment (blank modality or failed registration)')
    images[i] /= scales[m]
  if healthy is not None:
    healthy *= brain
    healthy /= max(_brain_percentile(healthy, brain, p.scale_percentile), 1e-12)
  seconds['resample'] = time.perf_counter() - tick

  meta = {
      'case_id': case.case_id, 'group': case.group, 'modalities': modalities,
      'registration_modality': reg_name,
      'files': {m: str(ref.path) for m, ref in case.images.items()},
      'label_file': str(case.label.path) if case.label is not None else None,
      'native_shape': [int(n) for n in loaded.native.shape],
      'native_affine': np.asarray(loaded.native.affine).tolist(),
      'canonical_affine': np.asarray(loaded.affine).tolist(),
      'mni_grid': register.grid_meta(space.template),
      'crop_box': [list(b) for b in space.box],
      'transform': register.transform_to_meta(transform),
      'registration_metric': metric,
      # QC: share of the template brain that the case's signal covers (low = misaligned).
      'brain_coverage': round(float(brain[space.template_brain].mean()), 4),
      'scale': scales,
  }
  return store.PreparedCase(case_id=case.case_id, images=images.astype(np.float32),
                            brain=brain, label=label, meta=meta,
                            healthy_t1=None if healthy is None else healthy.astype(np.float32))


def _brain_percentile(image, brain, q) -> float:
  values = image[brain]
  return float(np.percentile(values, q)) if values.size else 0.0


# --- a cohort --------------------------------------------------------------------------------
def _threads(config, workers: int) -> int:
  n = int(config.prep.threads_per_worker)
  return n if n > 0 else max(1, (os.cpu_count() or 1) // max(1, workers))


def _init_worker(threads: int) -> None:
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _prepare_one(case: Case, config, out_dir: str):
  """(case_id, None, seconds) when done, (case_id, reason, seconds) when it cannot be used."""
  start = time.perf_counter()
  try:
    prepare_case(case, config, out_dir)
    return case.case_id, None, time.perf_counter() - start
  except CaseError as e:
    return case.case_id, str(e), time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except  (one case must not stop the cohort)
    files = ', '.join(str(r.path) for r in case.images.values())
    return (case.case_id, f'{type(e).__name__}: {e} (files: {files})',
            time.perf_counter() - start)


def prepare_cohort(cases, config, out_dir, *, num_workers: Optional[int] = None,
                   progress: bool = True) -> dict:
  """Prepares every case not yet in `out_dir`; returns and writes the run's summary.

  Summary: {'prepared': [ids], 'reused': [ids], 'skipped': {id: reason}, 'seconds': ...}.
  Writes only `out_dir/<id>.{npz,json}` and `out_dir/prep_summary.json`.
  """
  out_dir = Path(out_dir)
  cases = list(cases)
  _refuse_input_folder(cases, out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  done = set(store.prepared_ids(out_dir))
  reused = sorted(c.case_id for c in cases if c.case_id in done)
  todo = [c for c in cases if c.case_id not in done]
  workers = int(config.prep.num_workers if num_workers is None else num_workers)
  workers = max(1, min(workers, len(todo)))
  start = time.perf_counter()
  results = []
  bar = tqdm(total=len(todo), desc='prep', unit='case', disable=not progress or not todo)
  if workers == 1:
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    _init_worker(_threads(config, 1))
    try:
      for case in todo:
        results.append(_prepare_one(case, config, str(out_dir)))
        bar.update()
    finally:
      sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
  else:
    with pools.spawn_pool(workers, initializer=_init_worker,
                          initargs=(_threads(config, workers),)) as pool:
      futures = {pool.submit(_prepare_one, c, config, str(out_dir)): c for c in todo}
      for future in concurrent.futures.as_completed(futures):
        case = futures[future]
        try:
          results.append(future.result())
        except Exception as e:  # pylint: disable=broad-except  (a worker died: OOM, signal)
          results.append((case.case_id, f'worker failed: {type(e).__name__}: {e}', 0.0))
        bar.update()
  bar.close()
  summary = {
      'prepared': sorted(i for i, reason, _ in results if reason is None),
      'reused': reused,
      'skipped': {i: reason for i, reason, _ in sorted(results) if reason is not None},
      'seconds': round(time.perf_counter() - start, 2),
      'seconds_per_case': {i: round(s, 2) for i, reason, s in sorted(results) if reason is None},
      'workers': workers,
  }
  store.write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=1))
  if progress:
    print(format_summary(summary, out_dir))
  return summary


def format_summary(summary: dict, out_dir) -> str:
  lines = [f'prep -> {out_dir}: {len(summary["prepared"])} prepared, '
           f'{len(summary["reused"])} reused, {len(summary["skipped"])} skipped '
           f'({summary["seconds"]} s, {summary["workers"]} workers)']
  for case_id, reason in summary['skipped'].items():
    lines.append(f'  skipped {case_id:<24} {reason}')
  return '\n'.join(lines)


def _refuse_input_folder(cases, out_dir: Path) -> None:
  """Prepared files go next to nothing of the user's: out_dir may not hold input files."""
  out = out_dir.resolve()
  for case in cases:
    refs = list(case.images.values()) + [r for r in (case.label, case.healthy_t1) if r]
    for ref in refs:
      if Path(ref.path).resolve().parent == out:
        raise ValueError(f'output folder {out_dir} holds input file {ref.path}; '
                         'choose a separate prep folder')
