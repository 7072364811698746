"""The synthetic BraTS/IXI-like cohort: determinism, labels, appearance, files, profiles and the
scanner / tumor variety each draw adds (2-3 mm, few cases)."""
import dataclasses
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


def test_tumor_appearance_per_modality():
  """The tumor's own look, through a scanner without blur, thick slices or noise (a thin
  enhancing rim in a thick-slice T1ce loses its contrast, as it does in real data)."""
  checked = {'core': 0, 'enhancing': 0}
  plain = _quiet(inplane_voxel=(1.0, 1.0), tumor_ml=(1.0, 200.0),
                 foci_probs=synthetic.PROFILES['train'].foci_probs)
  for i in SUBJECTS:
    s = synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', i, plain), SPACING,
                                     plain)
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
    # Beyond every focus' reach and the acquisition's blur both renders are the same computation.
    idx = np.indices(t1.shape).reshape(3, -1)
    world = (s.affine[:3, :3] @ idx + s.affine[:3, 3:4]).reshape((3,) + t1.shape)
    blur = s.info['acquisition']['blur_reach_mm']
    far = np.ones(t1.shape, bool)
    for focus in s.info['foci']:
      dist = np.sqrt(((world - np.reshape(focus['centre_mm'], (3, 1, 1, 1))) ** 2).sum(0))
      far &= dist > focus['reach_mm'] + blur + 2 * SPACING
    assert far.sum() > 0.5 * far.size
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
    vox_ml = np.prod(nib.affines.voxel_sizes(s.affine)) / 1000
    assert s.info['whole_tumor_ml'] == pytest.approx((s.label > 0).sum() * vox_ml, abs=1e-3)
    assert 0.2 * s.info['target_ml'] < s.info['whole_tumor_ml'] < 5 * s.info['target_ml']
    assert s.info['site'] == s.info['foci'][0]['site']
    assert s.info['profile'] == 'train'


def test_files_layout_dtype_and_orientation(cohort):
  out, summary = cohort
  assert summary['seed'] == SEED and summary['spacing_mm'] == SPACING
  assert len(summary['tumor_cases']) == 2 and len(summary['normal_cases']) == 1
  assert summary['profile'] == 'train'
  assert synthetic.brats_grid(SPACING).shape == (120, 120, 78)
  train = synthetic.PROFILES['train']
  for entry in summary['tumor_cases']:
    case_id = entry['id']
    assert case_id.startswith('BraTS19_SYN_') and case_id.endswith('_1')
    folder = out / 'BraTS' / entry['group'] / case_id
    acq = entry['acquisition']
    for name in ('t1', 't1ce', 't2', 'flair', 't1_healthy', 'seg'):
      img = nib.load(folder / f'{case_id}_{name}.nii.gz')
      assert list(img.shape) == entry['grid']['shape']
      assert img.get_data_dtype() == (np.uint8 if name == 'seg' else np.int16)
      np.testing.assert_allclose(img.affine, entry['grid']['affine'], atol=1e-5)
      assert ''.join(nib.aff2axcodes(img.affine)) == acq['orientation']
      assert acq['orientation'] in train.orientations
      assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1
      np.testing.assert_allclose(img.header.get_zooms(), acq['voxel_mm'], rtol=1e-4)
    # The grid covers the BraTS field of view (240 x 240 x 155 mm) on its own voxels.
    extent = np.abs(np.asarray(entry['grid']['affine'])[:3, :3]) @ entry['grid']['shape']
    assert np.all(extent >= np.array(synthetic.BRATS_SHAPE_1MM) - 1e-3)
    assert np.all(extent < np.array(synthetic.BRATS_SHAPE_1MM) + 2 * max(acq['voxel_mm']))
    assert entry['volume_ml']['2'] > 0
  [normal] = summary['normal_cases']
  ixi = nib.load(out / normal['path'])
  assert (out / normal['path']).name == f"{normal['id']}-T1.nii.gz"
  assert normal['id'].startswith('IXI') and '-SYN-' in normal['id']
  assert ixi.get_data_dtype() == np.int16
  assert nib.aff2axcodes(ixi.affine) == ('P', 'S', 'R')
  assert ''.join(nib.aff2axcodes(ixi.affine)) not in synthetic.PROFILES['train'].orientations
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
  with pytest.raises(ValueError, match='profile'):
    synthetic.subject_rng(0, 'tumor', 0, profile='test')


# --- Profiles: what each draws, and that each draw shows in the volumes ------------------------

N_DRAWS = 300
RENDER_MM = 3.0   # the scanner-trait renders: coarse and fast.


def _draws(profile, seed=0):
  acqs, plans = [], []
  for i in range(N_DRAWS):
    rng = synthetic.subject_rng(seed, 'tumor', i, profile)
    acqs.append(synthetic.draw_acquisition(rng, profile, SPACING))
    plans.append(synthetic.draw_tumor_plan(rng, profile))
  return acqs, plans


def _span(values):
  values = np.asarray(list(values), np.float64)
  return values.min(), values.max()


def _inside(values, lo_hi):
  values = list(values)
  if not values:
    return True
  lo, hi = _span(values)
  return lo_hi[0] - 1e-9 <= lo and hi <= lo_hi[1] + 1e-9


def test_profiles_are_deterministic_and_use_their_own_seed_streams():
  for name in synthetic.PROFILES:
    acqs, plans = _draws(name)
    assert _draws(name) == (acqs, plans)
    other_acqs, other_plans = _draws(name, seed=1)
    assert sum(a != b for a, b in zip(acqs, other_acqs)) == N_DRAWS
    assert sum(a != b for a, b in zip(plans, other_plans)) > 0.9 * N_DRAWS
  words = {name: synthetic.subject_rng(0, 'tumor', 0, name).integers(2 ** 62)
           for name in synthetic.PROFILES}
  assert len(set(words.values())) == len(words)
  # 'train' keeps the stream it had before profiles existed.
  assert words['train'] == np.random.default_rng([0, 0, 0]).integers(2 ** 62)


def test_each_profile_draws_within_its_documented_ranges():
  for name, p in synthetic.PROFILES.items():
    acqs, plans = _draws(name)
    assert {a.orientation for a in acqs} == set(p.orientations)
    assert _inside([a.voxel_mm[0] / SPACING for a in acqs], p.inplane_voxel)
    assert _inside([a.voxel_mm[1] / a.voxel_mm[0] for a in acqs], p.inplane_aspect)
    assert _inside([a.voxel_mm[2] / SPACING for a in acqs], p.slice_voxel)
    assert _inside([a.oblique_deg for a in acqs], p.oblique_deg)
    for field in ('gain', 'offset'):
      assert _inside([v for a in acqs for v in getattr(a, field).values()], getattr(p, field))
    gammas = [v for a in acqs for v in a.gamma.values()]
    assert all(any(lo <= g <= hi for lo, hi in p.gamma) for g in gammas)
    for field in ('bias_strength', 'bias_cell_mm', 'noise_std', 'psf_sigma'):
      assert _inside([getattr(a, field) for a in acqs], getattr(p, field)), field
    thick = [t for a in acqs for t in a.slice_thickness_mm.values()]
    assert _inside([t for t in thick if t > 0], p.slice_thickness)
    assert np.mean(np.greater(thick, 0)) == pytest.approx(p.thick_prob, abs=0.05)
    assert np.mean([a.rim_mm > 0 for a in acqs]) == pytest.approx(p.rim_prob, abs=0.08)
    assert _inside([a.rim_mm for a in acqs if a.rim_mm], p.rim_width)
    assert np.mean([a.cut_mm > 0 for a in acqs]) == pytest.approx(p.cut_prob, abs=0.08)
    assert _inside([a.cut_mm for a in acqs if a.cut_mm], p.cut_depth)
    assert _inside([a.outlier_fraction for a in acqs], p.outlier_fraction)
    # Tumors: volume, foci, sites, infiltration, grade; labels as BraTS has them.
    assert _inside([q.target_ml for q in plans], p.tumor_ml)
    assert all(sum(q.focus_ml) == pytest.approx(q.target_ml) for q in plans)
    assert all(q.focus_ml[0] == max(q.focus_ml) for q in plans)
    counts = np.bincount([len(q.focus_ml) for q in plans], minlength=len(p.foci_probs) + 1)[1:]
    np.testing.assert_allclose(counts / N_DRAWS, p.foci_probs, atol=0.08)
    sites = [s for q in plans for s in q.sites]
    np.testing.assert_allclose([sites.count(s) / len(sites) for s in synthetic.SITES],
                               p.site_probs, atol=0.08)
    assert _inside([q.infiltration for q in plans], p.infiltration)
    assert np.mean([q.group == 'HGG' for q in plans]) == pytest.approx(p.hgg_fraction, abs=0.08)
    assert {q.labels for q in plans} == {(2, 4, 1), (2, 4), (2, 1), (2,)}


def test_heldout_draws_what_train_never_does():
  (ta, tp), (ha, hp) = _draws('train'), _draws('heldout')
  assert not {a.orientation for a in ta} & {a.orientation for a in ha}
  assert max(a.oblique_deg for a in ta) == 0 < min(a.oblique_deg for a in ha)
  # Finer grids, lower gains, harsher contrast curves, blur, bias, noise, thicker slices.
  assert _span(a.voxel_mm[0] for a in ha)[1] <= _span(a.voxel_mm[0] for a in ta)[0]
  assert _span(g for a in ha for g in a.gain.values())[1] <= _span(
      g for a in ta for g in a.gain.values())[0]
  train_gamma = _span(g for a in ta for g in a.gamma.values())
  assert not any(train_gamma[0] < g < train_gamma[1] for a in ha for g in a.gamma.values())
  for field in ('psf_sigma', 'bias_strength', 'noise_std', 'outlier_fraction'):
    assert _span(getattr(a, field) for a in ta)[1] <= _span(getattr(a, field) for a in ha)[0]
  assert _span(t for a in ta for t in a.slice_thickness_mm.values())[1] <= _span(
      t for a in ha for t in a.slice_thickness_mm.values() if t)[0]
  assert _span(a.rim_mm for a in ta)[1] <= _span(a.rim_mm for a in ha if a.rim_mm)[0]
  # Smaller tumors, more foci (up to 4), more infiltration.
  assert _span(q.target_ml for q in hp)[1] <= 20.0 < _span(q.target_ml for q in tp)[1]
  assert np.median([q.target_ml for q in hp]) < 0.35 * np.median([q.target_ml for q in tp])
  assert max(len(q.focus_ml) for q in tp) == 3 < max(len(q.focus_ml) for q in hp)
  assert np.mean([len(q.focus_ml) > 1 for q in hp]) > 2 * np.mean([len(q.focus_ml) > 1
                                                                    for q in tp])
  assert _span(q.infiltration for q in tp)[1] <= _span(q.infiltration for q in hp)[0]


def _quiet(**changes):
  """The train profile on one fixed grid with no noise and no optional scanner trait."""
  base = dataclasses.replace(
      synthetic.PROFILES['train'], orientations=('LPS',), inplane_voxel=(1.0, 1.0),
      inplane_aspect=(1.0, 1.0), slice_voxel=(1.0, 1.0), noise_std=(0.0, 0.0),
      psf_sigma=(0.0, 0.0), thick_prob=0.0,
      rim_prob=0.0, cut_prob=0.0, outlier_fraction=(0.0, 0.0), gain=(1000.0, 1000.0),
      offset=(0.0, 0.0), foci_probs=(1.0,), tumor_ml=(20.0, 20.0))
  return dataclasses.replace(base, **changes)


def _render(profile, index=0):
  rng = synthetic.subject_rng(SEED, 'tumor', index, profile)
  return synthetic.make_tumor_subject(rng, RENDER_MM, profile)


@pytest.fixture(scope='module')
def plain():
  return _render(_quiet())


def _mask(subject):
  """What the files store: the brain, plus a rim and minus cuts where the scanner drew them."""
  return _brain(subject)


MODALITIES_AND_HEALTHY = synthetic.MODALITIES + ('t1_healthy',)


def _get(subject, name):
  return subject.healthy_t1 if name == 't1_healthy' else subject.images[name]


def test_scanner_changes_leave_anatomy_and_tumor_alone(plain):
  """Gain scales the images; the label, grid and (noise-free) anatomy stay the same."""
  brighter = _render(_quiet(gain=(2000.0, 2000.0)))
  np.testing.assert_array_equal(brighter.label, plain.label)
  np.testing.assert_array_equal(brighter.affine, plain.affine)
  for m, arr in plain.images.items():
    assert np.abs(brighter.images[m].astype(np.float64) - 2.0 * arr).max() <= 1.0, m
  offset = _render(_quiet(offset=(0.1, 0.1)))
  inside = _mask(plain)
  np.testing.assert_allclose(offset.images['t1'][inside].astype(np.float64),
                             plain.images['t1'][inside] + 100.0, atol=1.0)


def test_thick_slices_blur_across_slices_only(plain):
  thick = _render(_quiet(thick_prob=1.0, slice_thickness=(12.0, 12.0)))
  np.testing.assert_array_equal(thick.label, plain.label)
  inside = ndi.binary_erosion(_mask(plain), iterations=2)
  for m in MODALITIES_AND_HEALTHY:
    before, after = (np.asarray(_get(s, m), np.float64) for s in (plain, thick))
    across = [np.abs(np.diff(x, axis=2))[inside[..., 1:]].mean() for x in (before, after)]
    within = [np.abs(np.diff(x, axis=0))[inside[1:]].mean() for x in (before, after)]
    # Slices 4x thicker than the grid's: detail across slices goes first (anatomy that
    # changes from slice to slice also softens in-plane edges, less so).
    assert across[1] < 0.6 * across[0], m
    assert across[1] / across[0] < 0.8 * within[1] / within[0], m


def test_in_plane_blur_blurs_within_slices(plain):
  blurred = _render(_quiet(psf_sigma=(1.0, 1.0)))
  np.testing.assert_array_equal(blurred.label, plain.label)
  inside = ndi.binary_erosion(_mask(plain), iterations=2)
  for m in MODALITIES_AND_HEALTHY:
    before, after = (np.asarray(_get(s, m), np.float64) for s in (plain, blurred))
    within = [np.abs(np.diff(x, axis=1))[inside[:, 1:]].mean() for x in (before, after)]
    across = [np.abs(np.diff(x, axis=2))[inside[..., 1:]].mean() for x in (before, after)]
    assert within[1] < 0.7 * within[0], m
    assert within[1] / within[0] < 0.85 * across[1] / across[0], m


def test_skull_strip_faults_add_a_rim_and_cut_cortex_not_tumor(plain):
  brain = _mask(plain)
  rimmed = _render(_quiet(rim_prob=1.0, rim_width=(6.0, 6.0), rim_cover=(0.5, 0.5)))
  extra = _mask(rimmed) & ~brain
  assert not np.any(brain & ~_mask(rimmed))
  assert extra.sum() > 0.02 * brain.sum()
  # The same rim in the healthy T1, within two voxels (6 mm) of its anatomical brain.
  healthy = plain.healthy_t1 > 0
  healthy_extra = (rimmed.healthy_t1 > 0) & ~healthy
  assert not np.any(healthy_extra & ~ndi.binary_dilation(healthy, iterations=2))
  assert (healthy_extra != extra).mean() < 1e-3       # only the tumor's mass effect differs.
  np.testing.assert_array_equal(rimmed.label, plain.label)

  cut = _render(_quiet(cut_prob=1.0, cut_depth=(6.0, 6.0), cut_cover=(0.5, 0.5)))
  removed = brain & ~_mask(cut)
  assert not np.any(_mask(cut) & ~brain)
  assert removed.sum() > 0.02 * brain.sum()
  assert not np.any(removed & ndi.binary_erosion(brain, iterations=3))   # only the surface
  assert not np.any(removed & (cut.label > 0))
  np.testing.assert_array_equal(cut.label, plain.label)
  assert np.all(cut.healthy_t1[removed] == 0)


def test_outliers_are_sparse_hot_or_cold_voxels(plain):
  spiky = _render(_quiet(outlier_fraction=(2e-3, 2e-3)))
  for m in MODALITIES_AND_HEALTHY:
    before, after = (np.asarray(_get(s, m), np.float64) for s in (plain, spiky))
    changed = (before != after) & (before > 50)
    assert 0 < changed.sum() < 4e-3 * before.size, m
    ratio = after[changed] / before[changed]
    hot = (ratio > 1.9) & (ratio < 4.1)
    cold = ratio < 0.31
    assert np.all(hot | cold) and hot.mean() > 0.5, m


def test_contrast_curve_changes_tissue_contrast(plain):
  steep = _render(_quiet(gamma=((1.5, 1.5),)))
  t1 = [np.asarray(s.images['t1'], np.float64) for s in (plain, steep)]
  inside = _mask(plain) & (plain.label == 0)
  lo, hi = np.percentile(t1[0][inside], [20, 90])
  dark, bright = inside & (t1[0] < lo), inside & (t1[0] > hi)
  contrast = [x[dark].mean() / x[bright].mean() for x in t1]
  assert contrast[1] < contrast[0] ** 1.3          # (dark / bright) ** 1.5, before the blur.


def test_multifocal_tumors_have_their_foci(plain):
  s = _render(_quiet(foci_probs=(0.0, 0.0, 1.0), tumor_ml=(40.0, 40.0)))
  assert len(s.info['foci']) == 3 and set(np.unique(s.label)) <= {0, 1, 2, 4}
  idx = np.indices(s.label.shape).reshape(3, -1)
  world = (s.affine[:3, :3] @ idx + s.affine[:3, 3:4]).T.reshape(s.label.shape + (3,))
  tumor = world[s.label > 0]
  found = 0
  for focus in s.info['foci']:
    nearest = np.sqrt(((tumor - focus['centre_mm']) ** 2).sum(1)).min()
    found += nearest < max(focus['radius_mm'], RENDER_MM)
  assert found >= 2
  assert 0.2 * 40 < s.info['whole_tumor_ml'] < 5 * 40
  radii = [f['radius_mm'] for f in s.info['foci']]
  assert radii[0] == max(radii)


def test_heldout_cohort_from_the_command_line(tmp_path):
  rc = synthetic.main(['--out', str(tmp_path), '--tumor-cases', '1', '--normal-cases', '1',
                       '--seed', str(SEED), '--spacing', str(RENDER_MM), '--profile', 'heldout',
                       '--no-progress'])
  assert rc == 0
  summary = json.loads((tmp_path / 'cohort.json').read_text())
  assert summary['profile'] == 'heldout'
  [entry] = summary['tumor_cases']
  folder = tmp_path / entry['path']
  seg = nib.load(folder / f"{entry['id']}_seg.nii.gz")
  assert ''.join(nib.aff2axcodes(seg.affine)) in synthetic.PROFILES['heldout'].orientations
  direction = seg.affine[:3, :3] / nib.affines.voxel_sizes(seg.affine)
  assert np.abs(direction).max(0).min() < np.cos(np.deg2rad(2.0))   # an oblique grid
  assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
  t1 = np.asarray(nib.load(folder / f"{entry['id']}_t1.nii.gz").dataobj)
  healthy = np.asarray(nib.load(folder / f"{entry['id']}_t1_healthy.nii.gz").dataobj)
  assert np.mean(t1[t1 > 0] == healthy[t1 > 0]) > 0.5
  # Same seed and index, other profile: another subject.
  train = synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', 0), RENDER_MM)
  assert train.info['acquisition']['orientation'] != entry['acquisition']['orientation']
  [normal] = summary['normal_cases']
  assert normal['profile'] == 'heldout' and (tmp_path / normal['path']).exists()


def test_plain_profile_keeps_the_nominal_brats_grid():
  s = synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', 0, 'plain'), RENDER_MM,
                                   'plain')
  grid = synthetic.brats_grid(RENDER_MM)
  assert s.label.shape == grid.shape
  np.testing.assert_allclose(s.affine, grid.affine, atol=1e-9)
  acq = s.info['acquisition']
  assert len(s.info['foci']) == 1 and acq['rim_mm'] == 0 and acq['cut_mm'] == 0
  assert not any(acq['slice_thickness_mm'].values()) and acq['blur_reach_mm'] == 0
