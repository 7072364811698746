"""data_prep.augment: shapes, determinism, identity when off, aligned spatial transforms, and
each intensity transform changing what it should (its modality's foreground) and nothing else."""
import dataclasses

import numpy as np
import pytest
from scipy import ndimage as ndi

from configs import default
from data_prep import augment

H, W, K, M = 48, 40, 2, 4
S = 2 * K + 1
_PROBS = ('flip_prob', 'rotate_prob', 'scale_prob', 'intensity_prob', 'gamma_prob',
          'noise_prob', 'bias_prob', 'blur_prob', 'lowres_prob', 'slab_prob')


def _aug(**changes):
  """The default augmentation config with every transform off, then `changes`."""
  a = default.get_config().data.augment
  for key in _PROBS:
    a[key] = 0.0
  for key, value in changes.items():
    a[key] = value
  return a


def _example(seed=0, normal=True):
  """Smooth, distinct modalities inside an elliptical brain (background 0; pseudo-normal -1)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:H, :W]
  brain = ((yy - H / 2) / (0.4 * H)) ** 2 + ((xx - W / 2) / (0.42 * W)) ** 2 < 1
  channels = []
  for m in range(M):
    base = ndi.gaussian_filter(rng.uniform(size=(H, W, S)), (2, 2, 1)) * 4 - 1 + 0.3 * m
    channels.append(base)
  image = np.where(brain[..., None], np.concatenate(channels, -1), 0.0).astype(np.float32)
  label = np.zeros((H, W), np.int32)
  label[(yy - 20) ** 2 + (xx - 18) ** 2 < 36] = 1
  ex = {'image': image, 'label': label, 'brain': brain, 'patient': b'p1', 'slice': np.int32(7)}
  if normal:
    ex['normal'] = np.where(brain[..., None], np.tanh(image[..., :S]), -1.0).astype(np.float32)
  return ex


def _run(aug, seed=3, index=0, example=None):
  example = _example() if example is None else example
  return augment.augment_example(example, augment.example_rng(seed, index), aug, K,
                                 return_draw=True)


def _modality(x, m):
  return x[..., m * S:(m + 1) * S]


def test_shapes_dtypes_and_passthrough():
  ex = _example()
  out, _ = _run(_aug(**{k: 0.5 for k in _PROBS}), example=ex)
  for key in ('image', 'normal', 'label', 'brain'):
    assert out[key].shape == ex[key].shape and out[key].dtype == ex[key].dtype, key
  assert out['patient'] == b'p1' and out['slice'] == 7
  no_normal, _ = _run(_aug(flip_prob=1.0), example=_example(normal=False))
  assert 'normal' not in no_normal
  with pytest.raises(ValueError, match='2K\\+1'):
    augment.augment_example({**ex, 'image': ex['image'][..., :7]}, augment.example_rng(0, 0),
                            _aug(), K)


def test_same_seed_and_index_same_result():
  aug = _aug(**{k: 0.5 for k in _PROBS})
  results = [_run(aug, seed=1, index=i)[0] for i in (0, 0, 1)]
  for key in ('image', 'normal', 'label', 'brain'):
    assert results[0][key].tobytes() == results[1][key].tobytes(), key
  assert not np.array_equal(results[0]['image'], results[2]['image'])
  assert not np.array_equal(_run(aug, seed=2, index=0)[0]['image'], results[0]['image'])


def test_identity_when_disabled_or_nothing_fires():
  ex = _example()
  off = _aug(**{k: 1.0 for k in _PROBS}, enabled=False)
  out = augment.augment_example(ex, augment.example_rng(0, 0), off, K)
  for key in ex:
    assert out[key] is ex[key], key
  out, d = _run(_aug(), example=ex)
  assert not any(d.flips) and not d.warps
  for key in ('image', 'normal', 'label', 'brain'):
    np.testing.assert_array_equal(out[key], ex[key])


def test_a_transform_turned_on_leaves_the_other_draws_alone():
  a = _run(_aug(flip_prob=0.5, rotate_prob=0.5))[1]
  b = _run(_aug(flip_prob=0.5, rotate_prob=0.5, gamma_prob=1.0, bias_prob=1.0))[1]
  assert a.flips == b.flips and a.angle_deg == b.angle_deg and a.noise_seed == b.noise_seed
  assert [m.scale for m in a.modalities] == [m.scale for m in b.modalities]


def test_mirroring_flips_every_array_together():
  ex = _example()
  out, d = _run(_aug(flip_prob=1.0), example=ex)
  assert d.flips == (True, True)
  for key in ('image', 'normal', 'label', 'brain'):
    np.testing.assert_array_equal(out[key], ex[key][::-1, ::-1], err_msg=key)


def test_rotation_and_scaling_warp_label_and_brain_with_the_image():
  ex = _example()
  # A channel carrying the label itself: after the (bilinear) warp it must agree with the
  # (nearest) warped label everywhere but on the boundary.
  ex['image'][..., 0] = ex['label']
  out, d = _run(_aug(rotate_prob=1.0, scale_prob=1.0, rotate_deg=30.0, scale_range=(1.2, 1.3)),
                example=ex)
  assert abs(d.angle_deg) > 0 and 1.2 <= d.zoom <= 1.3
  assert set(np.unique(out['label'])) <= set(np.unique(ex['label']))
  assert out['label'].sum() > ex['label'].sum()            # enlarged
  agree = (out['image'][..., 0] > 0.5) == (out['label'] > 0)
  boundary = ndi.binary_dilation(out['label'] > 0) & ~ndi.binary_erosion(out['label'] > 0)
  assert agree[~boundary].all() and agree.mean() > 0.97
  # The brain follows too, and still holds the tumor.
  assert not np.any((out['label'] > 0) & ~out['brain'])
  # Bilinear edges reach sqrt(2) input pixels (x zoom) beyond the nearest-neighbour brain.
  outside = ~ndi.binary_dilation(out['brain'], np.ones((3, 3)), iterations=2)
  assert np.all(out['image'][outside] == 0) and np.all(out['normal'][outside] == -1)
  assert np.all(out['image'][..., S:][ndi.binary_erosion(out['brain'])] != 0)
  # Pixels from outside the image take each array's background: 0, and -1 for the pseudo-normal.
  corner = (slice(0, 2), slice(0, 2))
  assert np.all(out['image'][corner] == 0) and np.all(out['normal'][corner] == -1)
  assert not out['brain'][corner].any() and not out['label'][corner].any()
  # The warp itself: a rotation by +angle moves the label's centroid about the image centre.
  centre = np.array([(H - 1) / 2, (W - 1) / 2])
  before = np.argwhere(ex['label']).mean(0) - centre
  after = np.argwhere(out['label']).mean(0) - centre
  a = np.deg2rad(d.angle_deg)
  expected = d.zoom * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ before
  np.testing.assert_allclose(after, expected, atol=1.0)


def _only_intensity(key, **extra):
  out, d = _run(_aug(**{key: 1.0}, **extra))
  ex = _example()
  fg = ex['image'] != 0
  # Labels, brain, the pseudo-normal and the background never change.
  np.testing.assert_array_equal(out['label'], ex['label'])
  np.testing.assert_array_equal(out['brain'], ex['brain'])
  np.testing.assert_array_equal(out['normal'], ex['normal'])
  np.testing.assert_array_equal(out['image'][~fg], 0)
  return ex, out, d


def test_contrast_scales_and_shifts_each_modality_on_its_own():
  ex, out, d = _only_intensity('intensity_prob')
  scales = [m.scale for m in d.modalities]
  assert len(set(scales)) == M
  for m, draw in enumerate(d.modalities):
    x, y = _modality(ex['image'], m), _modality(out['image'], m)
    fg = x != 0
    np.testing.assert_allclose(y[fg], x[fg] * draw.scale + draw.shift, rtol=1e-5, atol=1e-6)


def test_one_draw_for_all_modalities_when_not_per_modality():
  _, _, d = _only_intensity('intensity_prob', per_modality=False)
  assert len({(m.scale, m.shift) for m in d.modalities}) == 1


def test_gamma_uses_the_modality_range_for_all_its_slices():
  ex, out, d = _only_intensity('gamma_prob')
  for m, draw in enumerate(d.modalities):
    x, y = _modality(ex['image'], m), _modality(out['image'], m)
    fg = x != 0
    lo, hi = x[fg].min(), x[fg].max()
    np.testing.assert_allclose(y[fg], lo + (hi - lo) * ((x[fg] - lo) / (hi - lo)) **
                               draw.gamma_value, rtol=1e-4, atol=1e-5)
    assert y[fg].min() == pytest.approx(lo) and y[fg].max() == pytest.approx(hi)


def test_bias_field_is_smooth_and_shared_by_a_modality_slices():
  ex, out, d = _only_intensity('bias_prob', bias_strength=0.5)
  ratios = []
  for m, draw in enumerate(d.modalities):
    x, y = _modality(ex['image'], m), _modality(out['image'], m)
    fg = np.abs(x) > 0.05
    ratio = np.where(fg, y / np.where(fg, x, 1), np.nan)
    with np.errstate(all='ignore'):
      field = np.nanmedian(np.where(fg.any(2, keepdims=True), ratio, 1.0), axis=2)
    for s in range(S):   # the same field in every slice of the modality
      np.testing.assert_allclose(ratio[..., s][fg[..., s]], field[fg[..., s]], rtol=1e-4)
    assert np.nanmax(np.abs(np.log(field))) <= draw.bias_amplitude + 1e-5
    assert np.nanmax(field) / np.nanmin(field) > np.exp(draw.bias_amplitude * 0.5)
    ratios.append(field)
  assert not np.allclose(ratios[0], ratios[1], equal_nan=True)


def test_grid_bias_field_is_finer_than_the_polynomial_and_leaves_other_draws_alone():
  poly_ex, poly, d_poly = _only_intensity('bias_prob', bias_strength=0.5)
  _, grid, d_grid = _only_intensity('bias_prob', bias_strength=0.5, bias_kind='grid',
                                    bias_cell=(0.1, 0.1))
  for a, b in zip(d_poly.modalities, d_grid.modalities):   # the same stream otherwise
    assert dataclasses.replace(b, bias_kind='polynomial', bias_cell=0.0) == a
    assert b.bias_kind == 'grid' and b.bias_cell == pytest.approx(0.1)
  h, w = 96, 80
  poly_f = augment._bias_field((h, w), d_poly.modalities[0].bias_coefficients, 0.5)
  grid_f = augment._bias_field((h, w), d_grid.modalities[0].bias_coefficients, 0.5, 'grid', 0.1)
  for f in (poly_f, grid_f):
    assert f.shape == (h, w) and np.abs(np.log(f)).max() == pytest.approx(0.5, rel=1e-5)
  # Finer: the grid's log field turns (changes its slope's sign) far more often along a row.
  turns = lambda f: int((np.diff(np.sign(np.diff(np.log(f), axis=1)), axis=1) != 0).sum())
  assert turns(grid_f) > 4 * max(turns(poly_f), 1)
  # Reproducible from the draw, and applied to the image as drawn.
  np.testing.assert_array_equal(grid_f, augment._bias_field(
      (h, w), d_grid.modalities[0].bias_coefficients, 0.5, 'grid', 0.1))
  assert not np.array_equal(grid['image'], poly['image'])
  with pytest.raises(ValueError, match='bias_kind'):
    _run(_aug(bias_prob=1.0, bias_kind='cosine'))


def test_shared_bias_is_one_field_for_every_modality_and_changes_nothing_else():
  _, apart, d_apart = _only_intensity('bias_prob', bias_strength=0.5, bias_kind='grid',
                                      noise_prob=1.0, intensity_prob=1.0)
  ex, shared, d_shared = _only_intensity('bias_prob', bias_strength=0.5, bias_kind='grid',
                                         noise_prob=1.0, intensity_prob=1.0, bias_shared=True)
  first = d_shared.modalities[0]
  assert first == d_apart.modalities[0]
  fields = {augment._bias_field((96, 80), m.bias_coefficients, m.bias_amplitude, m.bias_kind,
                                m.bias_cell).tobytes() for m in d_shared.modalities}
  assert len(fields) == 1   # one field ...
  for a, b in zip(d_apart.modalities[1:], d_shared.modalities[1:]):
    assert a.bias_coefficients != b.bias_coefficients   # ... where there were M before ...
    keep = {f: getattr(a, f) for f in augment._BIAS_FIELDS}
    assert dataclasses.replace(b, **keep) == a   # ... and every other draw as it was.
  # Modality 0 is transformed identically; the others differ only by their bias.
  np.testing.assert_array_equal(_modality(shared['image'], 0), _modality(apart['image'], 0))
  assert not np.array_equal(_modality(shared['image'], 1), _modality(apart['image'], 1))


def test_noise_has_the_configured_std_and_stays_in_the_foreground():
  ex, out, d = _only_intensity('noise_prob', noise_std=0.1)
  diffs = []
  for m in range(M):
    x, y = _modality(ex['image'], m), _modality(out['image'], m)
    fg = x != 0
    diffs.append((y - x)[fg])
    assert np.std(diffs[-1]) == pytest.approx(0.1, rel=0.1)
  assert abs(np.corrcoef(diffs[0], diffs[1])[0, 1]) < 0.1     # independent per modality


def test_blur_and_low_resolution_soften_in_plane_only():
  for key, extra in (('blur_prob', {'blur_sigma': (1.5, 1.5)}),
                     ('lowres_prob', {'lowres_factor': (2.0, 2.0)})):
    ex, out, _ = _only_intensity(key, **extra)
    inner = ndi.binary_erosion(ex['brain'], iterations=4)
    for m in range(M):
      x, y = _modality(ex['image'], m), _modality(out['image'], m)
      grad = lambda v: np.abs(np.diff(v, axis=1))[inner[:, 1:]].mean()
      assert grad(y) < 0.8 * grad(x), (key, m)
      # Slices stay slices: each output slice depends on its own input slice only.
      ex2 = _example()
      _modality(ex2['image'], m)[..., 0][ex2['brain']] += 1.0
      out2, _ = _run(_aug(**{key: 1.0}, **extra), example=ex2)
      np.testing.assert_allclose(_modality(out2['image'], m)[..., 1:],
                                 _modality(out['image'], m)[..., 1:], atol=1e-5)


def test_thick_slices_mix_a_modality_slices_only():
  ex, out, d = _only_intensity('slab_prob', slab_sigma=(1.0, 1.0))
  for m in range(M):
    x, y = _modality(ex['image'], m), _modality(out['image'], m)
    fg = x != 0
    expected = ndi.gaussian_filter1d(x, 1.0, axis=2, mode='nearest')
    np.testing.assert_allclose(y[fg], expected[fg], rtol=1e-5, atol=1e-6)


def test_pseudo_normal_intensity_only_when_asked():
  ex = _example()
  out, d = _run(_aug(intensity_prob=1.0, normal_intensity=True))
  np.testing.assert_array_equal(out['label'], ex['label'])
  t1 = d.modalities[0]
  fg = ex['normal'] != -1
  np.testing.assert_allclose(out['normal'][fg], ex['normal'][fg] * t1.scale + t1.shift,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out['normal'][~fg], -1)


def test_dense_warp_is_scipys_bilinear_warp_for_every_channel():
  """One gather for all channels equals scipy's map_coordinates(order=1, mode='constant')
  channel by channel, corner fill included (rotation and zoom bring pixels from outside)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(23, 17, 5)).astype(np.float32)
  x[0, 0] = rng.normal(size=5)
  for angle, zoom in ((13.0, 0.8), (-7.0, 1.3), (90.0, 1.0)):
    coords = augment._source_coords(x.shape[:2], angle, zoom)   # pylint: disable=protected-access
    want = np.stack([ndi.map_coordinates(x[..., ch], coords, order=1, mode='constant',
                                             cval=float(x[0, 0, ch]), prefilter=False)
                     for ch in range(x.shape[2])], -1)
    got = augment._warp_dense(x, coords)   # pylint: disable=protected-access
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
