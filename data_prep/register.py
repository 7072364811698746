"""Affine alignment to the MNI152 template (SimpleITK), and the way back to the native file.

Coordinates: nibabel affines are RAS+, SimpleITK images are LPS, so converting flips the sign
of the first two world axes (`_RAS_TO_LPS`). A canonical RAS+ array [x, y, z] becomes a sitk
image whose numpy view is [z, y, x]; on the MNI grid (direction diag(-1, -1, 1) in LPS) that view
is exactly the prepared layout [Z, H, W] of data_prep/case.py.

Transforms follow ITK: the registration transform maps a point of the fixed (MNI) image to the
moving (native) image, which is what `sitk.Resample` needs to pull native voxels onto MNI.
"""
from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from data_prep import optional
from data_prep.case import CaseError

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INTERPOLATORS = {'linear': sitk.sitkLinear, 'nearest': sitk.sitkNearestNeighbor}


# --- numpy (RAS+) <-> SimpleITK (LPS) --------------------------------------------------------
def _set_geometry(image: sitk.Image, affine_ras) -> sitk.Image:
  lps = _RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  image.SetSpacing([float(s) for s in spacing])
  image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
  image.SetOrigin([float(v) for v in lps[:3, 3]])
  return image


def to_sitk(array_xyz: np.ndarray, affine_ras) -> sitk.Image:
  """A RAS+ voxel array [x, y, z] with its nibabel affine, as a SimpleITK image."""
  array_xyz = np.asarray(array_xyz)
  if array_xyz.dtype == bool:
    array_xyz = array_xyz.astype(np.uint8)
  image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
  return _set_geometry(image, affine_ras)


def from_sitk(image: sitk.Image):
  """(array [x, y, z], RAS+ affine) of a SimpleITK image: the inverse of `to_sitk`."""
  array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
  return array, image_affine(image)


def image_affine(image: sitk.Image) -> np.ndarray:
  """The RAS+ 4x4 voxel-to-world affine of a SimpleITK image."""
  lps = np.eye(4)
  direction = np.asarray(image.GetDirection()).reshape(3, 3)
  lps[:3, :3] = direction * np.asarray(image.GetSpacing())[None, :]
  lps[:3, 3] = image.GetOrigin()
  return _RAS_TO_LPS @ lps


def empty_grid(shape_xyz, affine_ras, pixel=sitk.sitkUInt8) -> sitk.Image:
  """A reference image (voxels unused) with the given grid; the target of a resampling."""
  image = sitk.Image([int(n) for n in shape_xyz], pixel)
  return _set_geometry(image, affine_ras)


# --- the MNI152 template ---------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def mni_template(spacing: float, mask_threshold: float = 0.2):
  """(T1 template, uint8 brain mask) of nilearn's MNI152 2009, resampled to `spacing` mm.

  The mask is GM + WM probability above `mask_threshold`, holes (ventricles) filled.
  Cached: every case of a run shares one template; treat the images as read-only.
  """
  datasets = optional.nilearn_datasets()
  t1 = datasets.load_mni152_template(resolution=1)
  gm = datasets.load_mni152_gm_template(resolution=1)
  wm = datasets.load_mni152_wm_template(resolution=1)
  t1_img = to_sitk(np.asarray(t1.get_fdata(), np.float32), t1.affine)
  tissue = to_sitk(np.asarray(gm.get_fdata() + wm.get_fdata(), np.float32), gm.affine)
  spacing = float(spacing)
  size = [int(np.floor((n - 1) * s / spacing)) + 1
          for n, s in zip(t1_img.GetSize(), t1_img.GetSpacing())]
  grid = sitk.Image(size, sitk.sitkFloat32)
  grid.SetSpacing([spacing] * 3)
  grid.SetOrigin(t1_img.GetOrigin())
  grid.SetDirection(t1_img.GetDirection())
  if spacing > 1.0:  # anti-aliasing before decimation
    t1_img = sitk.SmoothingRecursiveGaussian(t1_img, 0.4 * spacing)
    tissue = sitk.SmoothingRecursiveGaussian(tissue, 0.4 * spacing)
  template = sitk.Resample(t1_img, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
  tissue = sitk.Resample(tissue, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
  mask = sitk.BinaryFillhole(sitk.Cast(tissue > mask_threshold, sitk.sitkUInt8))
  return template, mask


def dilate_mask(mask: sitk.Image, radius_mm: float) -> sitk.Image:
  radius = int(round(radius_mm / min(mask.GetSpacing())))
  if radius <= 0:
    return mask
  return sitk.BinaryDilate(mask, [radius] * 3, sitk.sitkBall)


def grid_meta(image: sitk.Image) -> dict:
  """The MNI grid as JSON-able lists (sitk order: size/spacing/origin per x, y, z; LPS)."""
  return {'size': list(image.GetSize()), 'spacing': list(image.GetSpacing()),
          'origin': list(image.GetOrigin()), 'direction': list(image.GetDirection())}


def grid_from_meta(grid: dict, pixel=sitk.sitkFloat32) -> sitk.Image:
  image = sitk.Image([int(n) for n in grid['size']], pixel)
  image.SetSpacing(grid['spacing'])
  image.SetOrigin(grid['origin'])
  image.SetDirection(grid['direction'])
  return image


# --- registration ----------------------------------------------------------------------------
def _at_spacing(image: sitk.Image, spacing: float) -> sitk.Image:
  """`image` smoothed and resampled onto an isotropic `spacing` grid over the same extent."""
  old = np.asarray(image.GetSpacing())
  if spacing <= 0 or np.all(old >= spacing - 1e-6):
    return image
  size = [max(1, int(np.ceil(n * s / spacing))) for n, s in zip(image.GetSize(), old)]
  variance = [float((0.4 * spacing) ** 2 - (0.4 * s) ** 2) if s < spacing else 0.0 for s in old]
  smooth = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), variance, 32, 0.01, True)
  grid = sitk.Image(size, sitk.sitkFloat32)
  grid.SetSpacing([float(spacing)] * 3)
  grid.SetDirection(image.GetDirection())
  grid.SetOrigin(image.GetOrigin())
  return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _registration_method(reg_cfg, fixed_mask=None) -> sitk.ImageRegistrationMethod:
  method = sitk.ImageRegistrationMethod()
  method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(reg_cfg.histogram_bins))
  method.SetMetricSamplingStrategy(method.RANDOM)
  # SimpleITK reads seed 0 as "seed from the wall clock"; shift so every config seed is fixed.
  method.SetMetricSamplingPercentage(float(reg_cfg.sampling_fraction), int(reg_cfg.seed) + 1)
  if fixed_mask is not None:
    method.SetMetricFixedMask(fixed_mask)
  method.SetInterpolator(sitk.sitkLinear)
  return method


def register_affine(moving: sitk.Image, fixed: sitk.Image, reg_cfg, *,
                    fixed_mask: sitk.Image | None = None) -> sitk.AffineTransform:
  """Mattes-MI affine registration, multi-resolution, seeded: fixed point -> moving point.

  Both images are first brought to `reg_cfg.spacing` mm (registration at a coarser grid is
  enough for an affine and keeps a 1 mm case within seconds); pass a fixed image already at
  that spacing to skip its resampling.
  """
  return register_affine_with_metric(moving, fixed, reg_cfg, fixed_mask=fixed_mask)[0]


def register_affine_with_metric(moving: sitk.Image, fixed: sitk.Image, reg_cfg, *,
                                fixed_mask: sitk.Image | None = None):
  """`register_affine` plus the final Mattes MI (negative: lower is a better match)."""
  fixed_r = _at_spacing(sitk.Cast(fixed, sitk.sitkFloat32), float(reg_cfg.spacing))
  moving_r = _at_spacing(sitk.Cast(moving, sitk.sitkFloat32), float(reg_cfg.spacing))
  if fixed_mask is not None and fixed_mask.GetSize() != fixed_r.GetSize():
    fixed_mask = sitk.Resample(fixed_mask, fixed_r, sitk.Transform(), sitk.sitkNearestNeighbor,
                               0, sitk.sitkUInt8)
  init_kind = {'moments': sitk.CenteredTransformInitializerFilter.MOMENTS,
               'geometry': sitk.CenteredTransformInitializerFilter.GEOMETRY}[reg_cfg.init]
  initial = sitk.CenteredTransformInitializer(fixed_r, moving_r, sitk.AffineTransform(3),
                                              init_kind)
  method = _registration_method(reg_cfg, fixed_mask)
  # Regular-step descent: plain gradient descent with an estimated rate stalled ~2 mm short on
  # known affines; the halving step converges to ~0.2 mm in a similar time.
  method.SetOptimizerAsRegularStepGradientDescent(
      learningRate=float(reg_cfg.learning_rate), minStep=float(reg_cfg.min_step),
      numberOfIterations=int(reg_cfg.iterations),
      relaxationFactor=float(reg_cfg.relaxation))
  method.SetOptimizerScalesFromPhysicalShift()
  method.SetShrinkFactorsPerLevel([int(f) for f in reg_cfg.shrink_factors])
  method.SetSmoothingSigmasPerLevel([float(s) for s in reg_cfg.smoothing_sigmas])
  method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
  method.SetInitialTransform(initial, inPlace=False)
  result = method.Execute(fixed_r, moving_r)
  if isinstance(result, sitk.CompositeTransform):
    result = result.GetNthTransform(result.GetNumberOfTransforms() - 1)
  return sitk.AffineTransform(result), float(method.GetMetricValue())


def resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
             interp: str = 'linear') -> sitk.Image:
  """`image` pulled onto `reference`'s grid through `transform` (reference point -> image point).

  Linear for intensities (float32 out), nearest for labels (pixel type kept); 0 outside.
  """
  pixel = sitk.sitkFloat32 if interp == 'linear' else image.GetPixelID()
  return sitk.Resample(image, reference, transform, _INTERPOLATORS[interp], 0.0, pixel)


# --- transforms in the case's JSON -----------------------------------------------------------
def transform_to_meta(transform: sitk.AffineTransform) -> dict:
  """Parameters plus the equivalent RAS+ 4x4 matrix (MNI world mm -> native world mm)."""
  matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
  center = np.asarray(transform.GetCenter())
  lps = np.eye(4)
  lps[:3, :3] = matrix
  lps[:3, 3] = np.asarray(transform.GetTranslation()) + center - matrix @ center
  return {'type': 'AffineTransform', 'maps': 'MNI point -> native point',
          'parameters': list(transform.GetParameters()),
          'fixed_parameters': list(transform.GetFixedParameters()),
          'mni_to_native_ras': (_RAS_TO_LPS @ lps @ _RAS_TO_LPS).tolist()}


def transform_from_meta(entry: dict) -> sitk.AffineTransform:
  transform = sitk.AffineTransform(3)
  transform.SetFixedParameters([float(v) for v in entry['fixed_parameters']])
  transform.SetParameters([float(v) for v in entry['parameters']])
  return transform


# --- the crop box on the MNI grid ------------------------------------------------------------
def crop_to_box(array: np.ndarray, box) -> np.ndarray:
  """array[..., Z, H, W] cut to `box` ((z0, z1), (h0, h1), (w0, w1)); outside the grid = 0."""
  shape = array.shape[-3:]
  inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(box, shape))
  pad = [(max(0, -a), max(0, b - n)) for (a, b), n in zip(box, shape)]
  return np.pad(array[(Ellipsis,) + inside], [(0, 0)] * (array.ndim - 3) + pad)


def paste_box(cropped: np.ndarray, box, grid_shape) -> np.ndarray:
  """The inverse of `crop_to_box`: `cropped` [Z, H, W] back into a zero grid of `grid_shape`."""
  full = np.zeros(tuple(grid_shape), cropped.dtype)
  dst = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(box, grid_shape))
  src = tuple(slice(max(0, -a), max(0, -a) + (d.stop - d.start)) for (a, _), d in zip(box, dst))
  full[dst] = cropped[src]
  return full


def box_grid(grid: sitk.Image, box, pixel=sitk.sitkFloat32) -> sitk.Image:
  """The sub-grid of `grid` that `box` ((z0, z1), (h0, h1), (w0, w1)) covers, past edges too.

  Resampling straight onto it equals resampling onto `grid` then `crop_to_box`, at a fraction
  of the cost.
  """
  (z0, z1), (h0, h1), (w0, w1) = box
  image = sitk.Image([int(w1 - w0), int(h1 - h0), int(z1 - z0)], pixel)
  image.SetSpacing(grid.GetSpacing())
  image.SetDirection(grid.GetDirection())
  image.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([float(w0), float(h0), float(z0)]))
  return image


# --- back to the native file -----------------------------------------------------------------
def to_native(mni_array: np.ndarray, meta: dict, interp: str = 'nearest') -> np.ndarray:
  """A prepared-space volume [Z, H, W] (cropped, or the whole MNI grid) on the native file's grid.

  Returns an array of the file's own shape and voxel order, so that
  `nib.Nifti1Image(out, meta['native_affine'])` lies on the original image.
  """
  grid = meta['mni_grid']
  grid_shape = tuple(int(n) for n in reversed(grid['size']))  # [Z, H, W]
  box = [tuple(b) for b in meta['crop_box']]
  crop_shape = tuple(b - a for a, b in box)
  mni_array = np.asarray(mni_array)
  if mni_array.shape == crop_shape:
    mni_array = paste_box(mni_array, box, grid_shape)
  elif mni_array.shape != grid_shape:
    raise ValueError(f'{meta.get("case_id", "?")}: volume of shape {mni_array.shape} is neither '
                     f'the crop {crop_shape} nor the MNI grid {grid_shape}')
  if mni_array.dtype == bool:
    mni_array = mni_array.astype(np.uint8)
  elif interp == 'linear':
    mni_array = mni_array.astype(np.float32)
  mni_image = sitk.GetImageFromArray(np.ascontiguousarray(mni_array))
  reference = grid_from_meta(grid)
  mni_image.CopyInformation(reference)
  native = empty_grid(meta['native_shape'], meta['native_affine'])
  inverse = transform_from_meta(meta['transform']).GetInverse()
  out = resample(mni_image, native, inverse, interp)
  return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def check_geometry(path, affine) -> None:
  """A CaseError for affines SimpleITK cannot represent (singular voxel axes)."""
  affine = np.asarray(affine, dtype=np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
    raise CaseError(path, f'affine is singular or not finite: {affine.tolist()}')
