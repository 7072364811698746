"""The synthetic BraTS/IXI-like cohort: determinism, labels, appearance, files (2 mm, few cases)."""
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from data_prep import synthetic

SPACING = 2.0
SEED = 7
# Subject indices whose tumors, together, show every BraTS label.
SUBJECTS = (0, 1, 2, 3)


@pytest.fixture(scope='module')
def subjects():
  return [synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', i), SPACING)
          for i in SUBJECTS]


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  """A cohort written through the command line: 2 tumor cases, 1 normal case."""
  out = tmp_path_factory.mktemp('cohort')
  rc = synthetic.main(['--out', str(out), '--tumor-cases', '2', '--normal-cases', '1',
                       '--seed', str(SEED), '--spacing', str(SPACING), '--no-progress'])
  assert rc == 0
  return out, json.loads((out / 'cohort.json').read_text())


def _arrays(subject):
  return [*subject.images.values(), subject.label, subject.healthy_t1]


def _brain(subject):
  return np.any([a > 0 for a in subject.images.values()], axis=0)


def _nearby_white_matter(subject, radius_vox=12):
  """Normal WM near the tumor: the brightest third of the healthy T1 in a shell around it.

  Local, so that the bias field cannot decide the comparison.
  """
  tumor = subject.label > 0
  near = ndi.binary_dilation(tumor, iterations=radius_vox)
  shell = near & ~ndi.binary_dilation(tumor, iterations=3) & (subject.healthy_t1 > 0)
  t1 = subject.healthy_t1[shell]
  return shell & (subject.healthy_t1 >= np.percentile(t1, 67))


def test_same_seed_gives_identical_arrays():
  a = synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', 5), SPACING)
  b = synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', 5), SPACING)
  c = synthetic.make_tumor_subject(synthetic.subject_rng(SEED + 1, 'tumor', 5), SPACING)
  for x, y in zip(_arrays(a), _arrays(b)):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
  assert not np.array_equal(a.images['t1'], c.images['t1'])
  assert not np.array_equal(a.label, c.label)
  n1 = synthetic.make_normal_subject(synthetic.subject_rng(SEED, 'normal', 0), SPACING)
  n2 = synthetic.make_normal_subject(synthetic.subject_rng(SEED, 'normal', 0), SPACING)
  n3 = synthetic.make_normal_subject(synthetic.subject_rng(SEED, 'normal', 1), SPACING)
  assert n1.images['t1'].tobytes() == n2.images['t1'].tobytes()
  assert not np.array_equal(n1.images['t1'], n3.images['t1'])


def test_cohort_subject_does_not_depend_on_cohort_size(cohort, subjects):
  out, summary = cohort
  entry = summary['tumor_cases'][1]
  folder = out / entry['path']
  alone = subjects[SUBJECTS.index(1)]
  for modality, arr in alone.images.items():
    on_disk = np.asanyarray(nib.load(folder / f"{entry['id']}_{modality}.nii.gz").dataobj)
    np.testing.assert_array_equal(on_disk, arr)
  seg = np.asanyarray(nib.load(folder / f"{entry['id']}_seg.nii.gz").dataobj)
  np.testing.assert_array_equal(seg, alone.label)


def test_labels_are_brats_nested_and_inside_brain(subjects):
  seen = set()
  for s in subjects:
    values = set(np.unique(s.label).tolist())
    assert values <= {0, 1, 2, 4}
    assert (s.label > 0).sum() > 0
    assert not np.any((s.label > 0) & ~_brain(s)), 'tumor outside the brain'
    # Nesting, outer to inner: edema (2) wraps enhancing (4) wraps necrosis (1); each inner
    # region grown by one voxel stays within the tumor regions around it (or leaves the brain).
    outside = ~_brain(s)
    order = [lab for lab in s.info['labels']]
    for i in range(1, len(order)):
      inner = np.isin(s.label, order[i:])
      around = np.isin(s.label, order[i - 1:]) | outside
      assert np.all(around[ndi.binary_dilation(inner)]), f'label {order[i]} not wrapped'
    seen |= values
  assert seen == {0, 1, 2, 4}, f'fixture subjects should show every label, saw {seen}'


def test_tumor_appearance_per_modality(subjects):
  checked = {'core': 0, 'enhancing': 0}
  for s in subjects:
    wm = _nearby_white_matter(s)
    edema = s.label == 2
    for m in ('flair', 't2'):
      assert s.images[m][edema].mean() > 1.2 * s.images[m][wm].mean(), m
    if (s.label == 4).sum() >= 5:
      t1ce = s.images['t1ce']
      assert t1ce[s.label == 4].mean() > 1.1 * t1ce[wm].mean()
      checked['enhancing'] += 1
    if (s.label == 1).sum() >= 5:
      t1 = s.images['t1']
      assert t1[s.label == 1].mean() < 0.8 * t1[wm].mean()
      checked['core'] += 1
  assert checked['core'] and checked['enhancing']


def test_healthy_t1_matches_away_from_tumor_and_differs_inside(subjects):
  for s in subjects:
    t1, healthy = s.images['t1'].astype(np.float64), s.healthy_t1.astype(np.float64)
    # Beyond the mass effect's reach both renders are the same computation.
    idx = np.indices(t1.shape).reshape(3, -1)
    world = (s.affine[:3, :3] @ idx + s.affine[:3, 3:4]).reshape((3,) + t1.shape)
    dist = np.sqrt(((world - np.reshape(s.info['centre_mm'], (3, 1, 1, 1))) ** 2).sum(0))
    far = dist > s.info['mass_reach_mm'] + 2 * SPACING
    np.testing.assert_array_equal(t1[far], healthy[far])
    # Near (but outside) the tumor only the mass effect moves tissue: small differences.
    tumor = s.label > 0
    ring = ndi.binary_dilation(tumor, iterations=6) & ~ndi.binary_dilation(tumor, iterations=3)
    ring &= (t1 > 0) & (healthy > 0)
    wm_level = healthy[_nearby_white_matter(s)].mean()
    assert np.abs(t1[~ndi.binary_dilation(tumor, iterations=3)] -
                  healthy[~ndi.binary_dilation(tumor, iterations=3)]).mean() < 0.02 * wm_level
    assert np.abs(t1[ring] - healthy[ring]).mean() < 0.3 * wm_level
    # Inside the tumor the T1s differ clearly.
    assert np.abs(t1[tumor] - healthy[tumor]).mean() > 0.05 * wm_level


def test_background_is_zero_and_tumor_case_metadata(subjects):
  for s in subjects:
    assert s.images['t1'].dtype == np.int16 and s.healthy_t1.dtype == np.int16
    brain = _brain(s)
    assert 0.05 < brain.mean() < 0.6
    for arr in s.images.values():
      assert arr.min() >= 0 and arr[~brain].max() == 0
    assert s.info['group'] in ('HGG', 'LGG')
    assert s.info['site'] in ('deep', 'cortex', 'ventricle')
    vox_ml = SPACING ** 3 / 1000
    assert s.info['whole_tumor_ml'] == pytest.approx((s.label > 0).sum() * vox_ml)


def test_files_layout_dtype_and_orientation(cohort):
  out, summary = cohort
  assert summary['seed'] == SEED and summary['spacing_mm'] == SPACING
  assert len(summary['tumor_cases']) == 2 and len(summary['normal_cases']) == 1
  grid = synthetic.brats_grid(SPACING)
  assert grid.shape == (120, 120, 78)
  for entry in summary['tumor_cases']:
    case_id = entry['id']
    assert case_id.startswith('BraTS19_SYN_') and case_id.endswith('_1')
    folder = out / 'BraTS' / entry['group'] / case_id
    for name in ('t1', 't1ce', 't2', 'flair', 't1_healthy', 'seg'):
      img = nib.load(folder / f'{case_id}_{name}.nii.gz')
      assert img.shape == grid.shape
      assert img.get_data_dtype() == (np.uint8 if name == 'seg' else np.int16)
      np.testing.assert_allclose(img.affine, grid.affine, atol=1e-5)
      assert nib.aff2axcodes(img.affine) == ('L', 'P', 'S')
      assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1
      np.testing.assert_allclose(img.header.get_zooms(), (SPACING,) * 3)
    assert entry['volume_ml']['2'] > 0
  [normal] = summary['normal_cases']
  ixi = nib.load(out / normal['path'])
  assert (out / normal['path']).name == f"{normal['id']}-T1.nii.gz"
  assert normal['id'].startswith('IXI') and '-SYN-' in normal['id']
  assert ixi.get_data_dtype() == np.int16
  assert nib.aff2axcodes(ixi.affine) == ('P', 'S', 'R')
  assert nib.aff2axcodes(ixi.affine) != nib.aff2axcodes(grid.affine)
  np.testing.assert_allclose(ixi.header.get_zooms(), (1.875, 1.875, 2.4))
  data = np.asanyarray(ixi.dataobj)
  # Sagittal acquisition: the last array axis runs left-right across a plausible brain width.
  lr_extent = np.ptp(np.nonzero(data.any(axis=(0, 1)))[0]) * 2.4
  assert 110 < lr_extent < 170


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='layout'):
    synthetic.make_normal_subject(synthetic.subject_rng(0, 'normal', 0), SPACING, layout='x')
  with pytest.raises(ValueError, match='spacing'):
    synthetic.generate_cohort('/nonexistent/never', 1, 0, 0, spacing=0.0, progress=False)
