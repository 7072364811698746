"""Reads a case with nibabel and checks it; every fault raises a CaseError naming file and fault.

Checks: file missing; unreadable / corrupt gzip / not NIfTI; not 3-D (MSD: not 4-D with the
channel present); non-finite values; empty (all-zero) image; modalities' shapes or affines
differ (affines to config.prep.affine_atol); label values outside config.dataset.allowed_labels;
label / healthy-T1 shape or affine mismatch.

Everything is reoriented to the closest canonical (RAS+) orientation; the comparison of shapes
and affines happens there, so two modalities stored in different orientations of the same grid
agree. `NativeGeometry` keeps the first modality's own shape and affine for writing back.
Each file is read once (an MSD 4-D file once for all its channels).
"""
from __future__ import annotations

import concurrent.futures
import gzip
import zlib
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from data_prep.case import Case, CaseError, ImageRef, LoadedCase, NativeGeometry

_NIFTI_CLASSES = (nib.Nifti1Image, nib.Nifti2Image)


def load_case(case: Case, config, *, require_label: Optional[bool] = None) -> LoadedCase:
  """Reads and checks every file of `case`; float32 images, uint8 raw label, all RAS+.

  require_label: None reads the label when the case has one; True also demands one;
  False skips it (label=None).
  """
  atol = float(config.prep.affine_atol)
  headers = _check_headers(case, require_label)
  arrays_by_path = {}
  images = {}
  reference = None   # (name, path, canonical shape, canonical affine)
  native = None
  for modality, ref in case.images.items():
    img = headers[ref.path]
    if ref.path not in arrays_by_path:
      arrays_by_path[ref.path] = _read_canonical(img, ref.path, f'{modality} image')
    data, affine = arrays_by_path[ref.path]
    volume = data if ref.channel is None else data[..., ref.channel]
    _check_values(volume, ref.path, f'{modality} image')
    if reference is None:
      reference = (modality, ref.path, volume.shape, affine)
      native = NativeGeometry(shape=tuple(int(s) for s in img.shape[:3]),
                              affine=np.array(img.affine, dtype=np.float64))
    else:
      _check_same_grid(volume.shape, affine, ref.path, f'{modality} image', reference, atol)
    images[modality] = np.ascontiguousarray(volume, dtype=np.float32)

  label = None
  if case.label is not None and require_label is not False:
    data, affine = _read_canonical(headers[case.label.path], case.label.path, 'label')
    _check_same_grid(data.shape, affine, case.label.path, 'label', reference, atol)
    label = _label_values(data, case.label.path, config.dataset.allowed_labels)

  healthy = None
  if case.healthy_t1 is not None:
    data, affine = _read_canonical(headers[case.healthy_t1.path], case.healthy_t1.path,
                                   'healthy T1')
    _check_values(data, case.healthy_t1.path, 'healthy T1')
    _check_same_grid(data.shape, affine, case.healthy_t1.path, 'healthy T1', reference, atol)
    healthy = np.ascontiguousarray(data, dtype=np.float32)

  return LoadedCase(case=case, images=images, label=label, affine=reference[3], native=native,
                    healthy_t1=healthy)


def check_headers(case: Case, config, *, require_label: Optional[bool] = None) -> None:
  """Cheap checks from the headers alone (no voxel data): files, format, dims, shapes, affines."""
  headers = _check_headers(case, require_label)
  atol = float(config.prep.affine_atol)
  reference = None
  roles = [(f'{m} image', ref) for m, ref in case.images.items()]
  if case.label is not None and require_label is not False:
    roles.append(('label', case.label))
  if case.healthy_t1 is not None:
    roles.append(('healthy T1', case.healthy_t1))
  for role, ref in roles:
    img = headers[ref.path]
    shape, affine = _canonical_geometry(img, ref.path)
    if reference is None:
      reference = (role.split()[0], ref.path, shape, affine)
    else:
      _check_same_grid(shape, affine, ref.path, role, reference, atol)


def validate_cohort(cases, config, *, require_label: Optional[bool] = None,
                    full_load: bool = True, num_workers: int = 1):
  """Splits `cases` into (good: list[Case], bad: {case_id: message}); never raises per case.

  Header checks first (cheap); then, with full_load, every voxel through load_case.
  num_workers > 1 uses threads (gzip inflation and numpy release the GIL); order is kept.
  """

  def problem(case) -> Optional[str]:
    try:
      check_headers(case, config, require_label=require_label)
      if full_load:
        load_case(case, config, require_label=require_label)
    except CaseError as e:
      return str(e)
    return None

  if num_workers > 1:
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
      problems = list(pool.map(problem, cases))
  else:
    problems = [problem(case) for case in cases]
  good = [case for case, p in zip(cases, problems) if p is None]
  bad = {case.case_id: p for case, p in zip(cases, problems) if p is not None}
  return good, bad


def _check_headers(case: Case, require_label: Optional[bool]) -> dict:
  """Opens every file of the case (header only) and checks its dimensionality; path -> image."""
  if require_label and case.label is None:
    raise CaseError(_case_folder(case), f'case {case.case_id!r} has no label file')
  refs = [(f'{m} image', ref) for m, ref in case.images.items()]
  if case.label is not None and require_label is not False:
    refs.append(('label', case.label))
  if case.healthy_t1 is not None:
    refs.append(('healthy T1', case.healthy_t1))
  headers = {}
  for role, ref in refs:
    if ref.path not in headers:
      headers[ref.path] = _open(ref.path, role)
    _check_dims(headers[ref.path], ref, role)
  return headers


def _open(path: Path, role: str):
  path = Path(path)
  if not path.is_file():
    raise CaseError(path, f'file missing ({role})')
  try:
    img = nib.load(path, mmap=False)
  except ImageFileError as e:
    if path.name.endswith('.gz') and not _starts_with(path, b'\x1f\x8b'):
      raise CaseError(path, f'corrupt gzip ({role}): not a gzip stream') from None
    raise CaseError(path, f'not a NIfTI file ({role}): {e}') from None
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise CaseError(path, f'corrupt or truncated gzip ({role}): {e}') from None
  except Exception as e:  # nibabel raises many types for broken headers.
    raise CaseError(path, f'unreadable ({role}): {type(e).__name__}: {e}') from None
  if not isinstance(img, _NIFTI_CLASSES):
    raise CaseError(path, f'not a NIfTI file ({role}; nibabel reads it as '
                    f'{type(img).__name__})')
  return img


def _starts_with(path: Path, magic: bytes) -> bool:
  with open(path, 'rb') as f:
    return f.read(len(magic)) == magic


def _check_dims(img, ref: ImageRef, role: str) -> None:
  shape = img.shape
  if ref.channel is None:
    if len(_squeeze_trailing(shape)) != 3:
      raise CaseError(ref.path, f'{role} is not 3-D: shape {shape}')
  elif len(shape) != 4 or shape[3] <= ref.channel:
    raise CaseError(ref.path, f'{role}: expected a 4-D image with channel {ref.channel} '
                    f'(at least {ref.channel + 1} channels), got shape {shape}')
  if min(shape) < 1:
    raise CaseError(ref.path, f'{role} has an empty dimension: shape {shape}')


def _squeeze_trailing(shape) -> tuple:
  """(x, y, z, 1) counts as 3-D: some tools write a singleton 4th dimension."""
  shape = tuple(shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  return shape


def _canonical_transform(img, path: Path):
  affine = np.asarray(img.affine, dtype=np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise CaseError(path, f'affine is singular or not finite:\n{affine}')
  ornt = nib.orientations.io_orientation(affine)
  return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt('RAS')), affine


def _canonical_geometry(img, path: Path):
  """Spatial shape and affine after RAS+ reorientation, from the header alone."""
  transform, affine = _canonical_transform(img, path)
  shape = tuple(int(s) for s in img.shape[:3])
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
  new_shape = tuple(shape[int(axis)] for axis in np.argsort(transform[:, 0]))
  return new_shape, new_affine


def _read_canonical(img, path: Path, role: str):
  """The voxel data (one read) reoriented to RAS+, and the matching affine.

  Same arithmetic as nibabel.as_closest_canonical, applied to the array we already hold so
  that the file is read once and any 4th (channel) axis is kept.
  """
  transform, affine = _canonical_transform(img, path)
  try:
    data = np.asanyarray(img.dataobj)
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise CaseError(path, f'corrupt or truncated gzip ({role}): {e}') from None
  except Exception as e:  # truncated .nii, bad scaling, ...: always a broken file.
    raise CaseError(path, f'unreadable voxel data ({role}): {type(e).__name__}: {e}') from None
  if data.dtype.kind not in 'biuf':
    raise CaseError(path, f'unsupported voxel type {data.dtype} ({role}; expected scalars)')
  if data.ndim > 3 and data.shape[3:] == (1,) * (data.ndim - 3):
    data = data.reshape(data.shape[:3])
  data = nib.orientations.apply_orientation(data, transform)
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, img.shape[:3])
  return data, new_affine


def _check_values(volume: np.ndarray, path: Path, role: str) -> None:
  if volume.dtype.kind == 'f':
    # One float64 reduction: NaN or Inf anywhere makes the sum non-finite, finite values can't.
    if not np.isfinite(np.sum(volume, dtype=np.float64)):
      count = int(volume.size - np.count_nonzero(np.isfinite(volume)))
      raise CaseError(path, f'{role} contains {count} non-finite values (NaN/Inf)')
  if not volume.any():
    raise CaseError(path, f'{role} is empty (all voxels are zero)')


def _check_same_grid(shape, affine, path: Path, role: str, reference, atol: float) -> None:
  ref_name, ref_path, ref_shape, ref_affine = reference
  if tuple(shape) != tuple(ref_shape):
    raise CaseError(path, f'{role} shape {tuple(shape)} differs from the {ref_name} image '
                    f'shape {tuple(ref_shape)} ({ref_path}) after RAS+ reorientation')
  diff = float(np.max(np.abs(affine - ref_affine)))
  if diff > atol:
    raise CaseError(path, f'{role} affine differs from the {ref_name} image ({ref_path}) '
                    f'by up to {diff:.4g} (tolerance prep.affine_atol={atol:g})')


def _label_values(data: np.ndarray, path: Path, allowed) -> np.ndarray:
  """The raw label as uint8, after checking that every value is one of `allowed`."""
  allowed = np.asarray(sorted(int(v) for v in allowed))
  if allowed.min() < 0 or allowed.max() > 255:
    raise ValueError(f'dataset.allowed_labels {tuple(allowed)} must lie in 0..255')
  if data.dtype.kind == 'f' and not np.isfinite(np.sum(data, dtype=np.float64)):
    count = int(data.size - np.count_nonzero(np.isfinite(data)))
    raise CaseError(path, f'label contains {count} non-finite values (NaN/Inf)')
  lo, hi = data.min(), data.max()
  label = None
  if lo >= 0 and hi <= 255:
    label = data.astype(np.uint8)
    if data.dtype.kind in 'f' and not np.array_equal(label, data):
      label = None   # non-integer values: found below.
  if label is not None:
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = np.setdiff1d(present, allowed)
  else:
    bad = np.unique(data[~np.isin(data, allowed)])
  if bad.size:
    shown = ', '.join(f'{v:g}' if float(v).is_integer() else repr(float(v))
                      for v in bad[:20].tolist()) + (' ...' if bad.size > 20 else '')
    raise CaseError(path, f'label values {{{shown}}} are outside dataset.allowed_labels '
                    f'{tuple(allowed.tolist())}')
  return np.ascontiguousarray(label)


def _case_folder(case: Case) -> Path:
  first = next(iter(case.images.values()), None)
  return Path(first.path).parent if first is not None else Path(case.case_id)
