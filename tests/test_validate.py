"""Case validation: every bad input gives a CaseError naming the file and the fault."""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from configs import default, msd
from data_prep.case import Case, CaseError, ImageRef
from data_prep.readers import find_cases
from data_prep.validate import check_headers, load_case, validate_cohort

SHAPE = (8, 9, 7)
MODALITIES = ('t1', 't1ce', 't2', 'flair')


def _volume(seed, shape=SHAPE):
  return np.random.default_rng(seed).uniform(1.0, 100.0, shape).astype(np.float32)


def _label(shape=SHAPE):
  label = np.zeros(shape, np.uint8)
  label[2:5, 3:6, 2:4] = 2
  label[3, 4, 3] = 4
  label[2, 3, 2] = 1
  return label


def _write(path: Path, data, affine=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
  return path


def _brats_case(root: Path, cid='P1', affine=None, flip=False):
  """A BraTS-layout case; with flip, stored LPS (x and y reversed) on the same world grid."""
  folder = root / cid
  if flip:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])   # stored voxel (i, j, k) is (n0-1-i, n1-1-j, k).
    flip[:2, 3] = (SHAPE[0] - 1, SHAPE[1] - 1)
    affine = (np.eye(4) if affine is None else affine) @ flip
    store = lambda a: a[::-1, ::-1, :]
  else:
    store = lambda a: a
  for i, m in enumerate(MODALITIES):
    _write(folder / f'{cid}_{m}.nii.gz', store(_volume(i)), affine)
  _write(folder / f'{cid}_seg.nii.gz', store(_label()), affine)
  return folder


def _config(root):
  c = default.get_config()
  c.dataset.root = str(root)
  return c


@pytest.fixture
def cohort(tmp_path):
  _brats_case(tmp_path)
  return tmp_path, _config(tmp_path)


def _only_case(root, config):
  (case,) = find_cases(config)
  return case


def test_good_case_loads_float32_images_and_raw_uint8_label(cohort):
  root, config = cohort
  loaded = load_case(_only_case(root, config), config)
  assert list(loaded.images) == list(MODALITIES)
  for i, m in enumerate(MODALITIES):
    assert loaded.images[m].dtype == np.float32
    np.testing.assert_array_equal(loaded.images[m], _volume(i))
  assert loaded.label.dtype == np.uint8
  np.testing.assert_array_equal(loaded.label, _label())   # raw values 0/1/2/4, not WT.
  np.testing.assert_allclose(loaded.affine, np.eye(4))
  assert loaded.native.shape == SHAPE
  assert loaded.healthy_t1 is None


def test_lps_and_ras_copies_load_identically(tmp_path):
  ras, lps = tmp_path / 'ras', tmp_path / 'lps'
  affine = np.diag([1.5, 1.5, 2.0, 1.0])
  affine[:3, 3] = (-10.0, 20.0, 5.0)
  _brats_case(ras, affine=affine)
  _brats_case(lps, affine=affine, flip=True)
  a = load_case(_only_case(ras, _config(ras)), _config(ras))
  b = load_case(_only_case(lps, _config(lps)), _config(lps))
  for m in MODALITIES:
    np.testing.assert_array_equal(a.images[m], b.images[m])
  np.testing.assert_array_equal(a.label, b.label)
  np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
  np.testing.assert_allclose(a.affine, affine, atol=1e-6)
  assert nib.aff2axcodes(b.native.affine) == ('L', 'P', 'S')   # the file's own geometry kept.
  assert b.native.shape == SHAPE


def test_transposed_storage_reorients_shape(tmp_path):
  """A sagittal-stored (axes permuted) file loads with the canonical axis order."""
  _brats_case(tmp_path)
  perm = np.eye(4)[[1, 0, 2, 3]]   # voxel axis 0 is world y, axis 1 is world x.
  _write(tmp_path / 'P1' / 'P1_t2.nii.gz', np.transpose(_volume(2), (1, 0, 2)), perm)
  case = _only_case(tmp_path, _config(tmp_path))
  loaded = load_case(case, _config(tmp_path))
  np.testing.assert_array_equal(loaded.images['t2'], _volume(2))


def test_msd_channels_and_labels(tmp_path):
  data = np.stack([_volume(i) for i in range(4)], axis=-1)   # FLAIR, T1w, T1gd, T2w.
  _write(tmp_path / 'imagesTr' / 'BRATS_001.nii.gz', data)
  label = _label()
  label[label == 4] = 3
  _write(tmp_path / 'labelsTr' / 'BRATS_001.nii.gz', label)
  c = msd.get_config()
  c.dataset.root = str(tmp_path)
  loaded = load_case(_only_case(tmp_path, c), c)
  for m, channel in {'flair': 0, 't1': 1, 't1ce': 2, 't2': 3}.items():
    np.testing.assert_array_equal(loaded.images[m], _volume(channel))
  np.testing.assert_array_equal(loaded.label, label)


def test_healthy_t1_loaded(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_t1_healthy.nii.gz', _volume(9))
  loaded = load_case(_only_case(root, config), config)
  np.testing.assert_array_equal(loaded.healthy_t1, _volume(9))


def _expect_error(root, config, filename, match, **kwargs):
  case = _only_case(root, config)
  with pytest.raises(CaseError, match=match) as e:
    load_case(case, config, **kwargs)
  assert Path(e.value.path).name == filename, str(e.value)
  assert filename in str(e.value)
  return e.value


def test_missing_file(cohort):
  root, config = cohort
  (root / 'P1' / 'P1_t2.nii.gz').unlink()
  _expect_error(root, config, 'P1_t2.nii.gz', r'file missing \(t2 image\)')


def test_missing_label_of_labelled_cohort(cohort):
  root, config = cohort
  _brats_case(root, 'P2')
  (root / 'P1' / 'P1_seg.nii.gz').unlink()
  case = find_cases(config)[0]
  with pytest.raises(CaseError, match=r'file missing \(label\)') as e:
    load_case(case, config)
  assert e.value.path.endswith('P1_seg.nii.gz')


def test_require_label(cohort):
  root, config = cohort
  case = _only_case(root, config)
  assert load_case(case, config, require_label=False).label is None
  unlabelled = Case('P1', case.images)
  assert load_case(unlabelled, config).label is None
  with pytest.raises(CaseError, match='no label file'):
    load_case(unlabelled, config, require_label=True)


def test_corrupt_gzip(cohort):
  root, config = cohort
  path = root / 'P1' / 'P1_t1ce.nii.gz'
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])   # truncated: the header still reads, data does not.
  _expect_error(root, config, 'P1_t1ce.nii.gz', r'corrupt or truncated gzip \(t1ce image\)')
  path.write_bytes(b'this is not gzip at all' * 20)
  _expect_error(root, config, 'P1_t1ce.nii.gz', r'corrupt gzip \(t1ce image\): not a gzip stream')


def test_not_nifti(cohort):
  root, config = cohort
  path = root / 'P1' / 'P1_flair.nii.gz'
  path.write_bytes(gzip.compress(b'\x00' * 400))   # valid gzip, no NIfTI header inside.
  _expect_error(root, config, 'P1_flair.nii.gz', 'not a NIfTI file')


def test_truncated_uncompressed(tmp_path):
  _brats_case(tmp_path)
  path = tmp_path / 'P1' / 'P1_t1.nii'
  nib.save(nib.load(tmp_path / 'P1' / 'P1_t1.nii.gz'), path)
  (tmp_path / 'P1' / 'P1_t1.nii.gz').unlink()
  path.write_bytes(path.read_bytes()[:600])
  _expect_error(tmp_path, _config(tmp_path), 'P1_t1.nii', 'unreadable')


def test_not_3d(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_t2.nii.gz', np.stack([_volume(2)] * 2, axis=-1))
  _expect_error(root, config, 'P1_t2.nii.gz', r'not 3-D: shape \(8, 9, 7, 2\)')
  _write(root / 'P1' / 'P1_t2.nii.gz', _volume(2)[:, :, 0])
  _expect_error(root, config, 'P1_t2.nii.gz', 'not 3-D')


def test_trailing_singleton_counts_as_3d(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_t2.nii.gz', _volume(2)[..., None])
  loaded = load_case(_only_case(root, config), config)
  np.testing.assert_array_equal(loaded.images['t2'], _volume(2))


def test_msd_not_4d_or_channel_missing(tmp_path):
  c = msd.get_config()
  c.dataset.root = str(tmp_path)
  _write(tmp_path / 'imagesTr' / 'BRATS_001.nii.gz', _volume(0))
  _write(tmp_path / 'labelsTr' / 'BRATS_001.nii.gz', _label())
  _expect_error(tmp_path, c, 'BRATS_001.nii.gz', r'expected a 4-D image with channel')
  _write(tmp_path / 'imagesTr' / 'BRATS_001.nii.gz', np.stack([_volume(0)] * 3, axis=-1))
  err = _expect_error(tmp_path, c, 'BRATS_001.nii.gz', r'channel 3 \(at least 4 channels\)')
  assert 'imagesTr' in err.path


def test_shapes_differ(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_flair.nii.gz', _volume(3, (8, 9, 6)))
  err = _expect_error(root, config, 'P1_flair.nii.gz', r'shape \(8, 9, 6\) differs')
  assert 'P1_t1.nii.gz' in str(err)   # names the reference it was compared with.


def test_affines_differ(cohort):
  root, config = cohort
  shifted = np.eye(4)
  shifted[0, 3] = 0.5
  _write(root / 'P1' / 'P1_t1ce.nii.gz', _volume(1), shifted)
  _expect_error(root, config, 'P1_t1ce.nii.gz', r'affine differs .* by up to 0.5')
  shifted[0, 3] = config.prep.affine_atol / 2   # within tolerance: accepted.
  _write(root / 'P1' / 'P1_t1ce.nii.gz', _volume(1), shifted)
  load_case(_only_case(root, config), config)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite(cohort, bad):
  root, config = cohort
  volume = _volume(2)
  volume[1, 2, 3] = bad
  volume[4, 4, 4] = bad
  _write(root / 'P1' / 'P1_t2.nii.gz', volume)
  _expect_error(root, config, 'P1_t2.nii.gz', r't2 image contains 2 non-finite values')


def test_empty_image(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_flair.nii.gz', np.zeros(SHAPE, np.int16))
  _expect_error(root, config, 'P1_flair.nii.gz', r'empty \(all voxels are zero\)')


@pytest.mark.parametrize('values, shown', [((3, 7), '3, 7'), ((-1,), '-1'), ((300,), '300'),
                                           ((0.5,), '0.5'), ((2.25, 3), '2.25, 3')])
def test_label_values_outside_allowed(cohort, values, shown):
  root, config = cohort
  label = _label().astype(np.float32)
  for i, v in enumerate(values):
    label[0, 0, i] = v
  _write(root / 'P1' / 'P1_seg.nii.gz', label)
  _expect_error(root, config, 'P1_seg.nii.gz',
                r'label values \{' + shown + r'\} are outside dataset.allowed_labels')


def test_label_shape_and_affine_mismatch(cohort):
  root, config = cohort
  _write(root / 'P1' / 'P1_seg.nii.gz', _label((8, 9, 8)))
  _expect_error(root, config, 'P1_seg.nii.gz', r'label shape \(8, 9, 8\) differs')
  _write(root / 'P1' / 'P1_seg.nii.gz', _label(), np.diag([2.0, 1.0, 1.0, 1.0]))
  _expect_error(root, config, 'P1_seg.nii.gz', 'label affine differs')


def test_singular_affine(cohort):
  root, config = cohort
  img = nib.Nifti1Image(_volume(0), np.eye(4))
  img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)   # the sform wins over the qform.
  nib.save(img, root / 'P1' / 'P1_t1.nii.gz')
  _expect_error(root, config, 'P1_t1.nii.gz', 'affine is singular')


def test_validate_cohort_keeps_good_and_reports_bad(tmp_path):
  for cid in ('A', 'B', 'C', 'D'):
    _brats_case(tmp_path, cid)
  (tmp_path / 'B' / 'B_t1ce.nii.gz').unlink()
  nan = _volume(0)
  nan[0, 0, 0] = np.nan
  _write(tmp_path / 'D' / 'D_t1.nii.gz', nan)   # caught only by the full load.
  config = _config(tmp_path)
  cases = find_cases(config)
  good, bad = validate_cohort(cases, config)
  assert [c.case_id for c in good] == ['A', 'C']
  assert set(bad) == {'B', 'D'}
  assert 'B_t1ce.nii.gz' in bad['B'] and 'file missing' in bad['B']
  assert 'D_t1.nii.gz' in bad['D'] and 'non-finite' in bad['D']
  assert validate_cohort(cases, config, num_workers=2) == (good, bad)
  good, bad = validate_cohort(cases, config, full_load=False)
  assert [c.case_id for c in good] == ['A', 'C', 'D'] and set(bad) == {'B'}


def test_check_headers_reads_no_voxels(cohort):
  root, config = cohort
  path = root / 'P1' / 'P1_t2.nii.gz'
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  case = _only_case(root, config)
  check_headers(case, config)   # the header is intact, so the cheap check passes ...
  with pytest.raises(CaseError, match='gzip'):
    load_case(case, config)     # ... and the full load catches the truncated data.
