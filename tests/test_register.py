"""MNI152 alignment: RAS<->LPS conversion, the template grid, known-affine recovery, crop boxes."""
import numpy as np
import pytest
import SimpleITK as sitk

from configs import demo
from data_prep import register

SPACING = 2.0


@pytest.fixture(scope='module')
def template():
  return register.mni_template(SPACING)


def _lps(point_ras):
  return np.array([-point_ras[0], -point_ras[1], point_ras[2]])


def test_ras_lps_round_trip():
  rng = np.random.default_rng(0)
  array = rng.normal(size=(5, 6, 7)).astype(np.float32)
  # A file stored with permuted, flipped, anisotropic axes (like a sagittal IXI scan).
  affine = np.array([[0.0, 0.0, -1.2, 50.0],
                     [-0.9, 0.0, 0.0, 20.0],
                     [0.0, 1.1, 0.0, -30.0],
                     [0.0, 0.0, 0.0, 1.0]])
  image = register.to_sitk(array, affine)
  assert image.GetSize() == (5, 6, 7)
  for index in [(0, 0, 0), (4, 1, 3), (2, 5, 6)]:
    world_ras = affine @ np.array([*index, 1.0])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), _lps(world_ras[:3]),
                               atol=1e-9)
    assert image.GetPixel(index) == array[index]
  back, back_affine = register.from_sitk(image)
  np.testing.assert_array_equal(back, array)
  np.testing.assert_allclose(back_affine, affine, atol=1e-12)


def test_template_grid_is_the_prepared_layout(template):
  t1, mask = template
  affine = register.image_affine(t1)
  # Index axes run left->right, posterior->anterior, inferior->superior in RAS+ ...
  np.testing.assert_allclose(affine[:3, :3], np.eye(3) * SPACING)
  np.testing.assert_allclose(affine[:3, 3], [-98.0, -134.0, -72.0])
  # ... so the numpy view [Z, H, W] is the prepared layout of data_prep/case.py.
  view = sitk.GetArrayFromImage(mask)
  assert view.shape == tuple(reversed(t1.GetSize()))
  z, h, w = view.shape
  # The MNI origin (0, 0, 0) lies inside the brain, ventricles included (holes filled).
  origin_index = t1.TransformPhysicalPointToIndex((0.0, 0.0, 0.0))
  assert mask.GetPixel(origin_index) == 1
  assert 0.05 < view.mean() < 0.5
  assert not view[:, :, 0].any() and not view[:, :, w - 1].any() and not view[-1].any()
  # Z runs upwards: the brainstem level (z = -50 mm) is far smaller than z = +20 mm.
  z_of = lambda mm: t1.TransformPhysicalPointToIndex((0.0, 0.0, mm))[2]
  assert view[z_of(-50.0)].sum() < 0.3 * view[z_of(20.0)].sum()
  # W is left-right symmetric about x = 0; H puts the brain's centre behind y = 0.
  zz, hh, ww = np.nonzero(view)
  centre = affine @ np.array([ww.mean(), hh.mean(), zz.mean(), 1.0])
  assert abs(centre[0]) < 3.0 and -30.0 < centre[1] < -5.0


def _random_affine(rng, center):
  rotation = sitk.Euler3DTransform()
  rotation.SetRotation(*np.deg2rad(rng.uniform(-10, 10, 3)))
  matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(0.95, 1.05, 3))
  transform = sitk.AffineTransform(3)
  transform.SetMatrix(matrix.ravel())
  transform.SetTranslation(rng.uniform(-10, 10, 3))
  transform.SetCenter(center)
  return transform


@pytest.mark.parametrize('seed', [1, 2])
def test_register_recovers_a_known_affine(template, seed):
  t1, mask = template
  center = t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()])
  generating = _random_affine(np.random.default_rng(seed), center)  # moving grid -> template
  # The moving image lives on its own LPS-stored grid, as a BraTS file would.
  grid = register.empty_grid((110, 120, 100), np.array(
      [[-2.0, 0, 0, 110], [0, -2.0, 0, 130], [0, 0, 2.0, -90], [0, 0, 0, 1]]), sitk.sitkFloat32)
  moving = sitk.Resample(t1, grid, generating, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
  reg_cfg = demo.get_config().prep.reg
  fixed_mask = register.dilate_mask(mask, 4.0)
  found = register.register_affine(moving, t1, reg_cfg, fixed_mask=fixed_mask)
  truth = generating.GetInverse()   # template point -> moving point
  brain = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[::20, ::-1]
  points = [t1.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in brain]
  error = np.mean([np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
                   for p in points])
  assert error <= 2.0, f'mean brain displacement error {error:.2f} mm'
  again = register.register_affine(moving, t1, reg_cfg, fixed_mask=fixed_mask)
  # Seeded sampling: the same transform again (threads may reorder sums in the last digits).
  np.testing.assert_allclose(again.GetParameters(), found.GetParameters(), rtol=0, atol=1e-8)
  # The JSON form gives back the same mapping, and its RAS matrix agrees with it.
  entry = register.transform_to_meta(found)
  restored = register.transform_from_meta(entry)
  point_ras = np.array([10.0, -20.0, 30.0, 1.0])
  expected = restored.TransformPoint(tuple(_lps(point_ras[:3])))
  np.testing.assert_allclose(found.TransformPoint(tuple(_lps(point_ras[:3]))), expected)
  np.testing.assert_allclose(_lps((np.asarray(entry['mni_to_native_ras']) @ point_ras)[:3]),
                             expected, atol=1e-6)


def test_crop_and_paste_round_trip_with_padding():
  grid = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1
  box = ((1, 3), (-2, 4), (2, 9))   # reaches past the grid in H (before) and W (after).
  cropped = register.crop_to_box(grid, box)
  assert cropped.shape == (2, 6, 7)
  np.testing.assert_array_equal(cropped[:, :2], 0)      # padding before H
  np.testing.assert_array_equal(cropped[:, :, 4:], 0)   # padding after W
  np.testing.assert_array_equal(cropped[:, 2:, :4], grid[1:3, 0:4, 2:6])
  pasted = register.paste_box(cropped, box, grid.shape)
  np.testing.assert_array_equal(pasted[1:3, 0:4, 2:6], grid[1:3, 0:4, 2:6])
  assert pasted.sum() == grid[1:3, 0:4, 2:6].sum()
  stacked = register.crop_to_box(np.stack([grid, grid]), box)   # leading axes are kept.
  assert stacked.shape == (2, 2, 6, 7)
