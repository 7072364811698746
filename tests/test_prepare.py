"""The prep stage on a tiny synthetic cohort (2 mm): alignment, the way back, cohort runs."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from configs import demo
from data_prep import prepare, readers, register, store, synthetic
from data_prep.case import Case, ImageRef

MODALITIES = ('t1', 't1ce', 't2', 'flair')


def _dice(a, b):
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _case_from_folder(case_id, folder, group='HGG'):
  images = {m: ImageRef(folder / f'{case_id}_{m}.nii.gz') for m in MODALITIES}
  return Case(case_id, images, label=ImageRef(folder / f'{case_id}_seg.nii.gz'), group=group,
              healthy_t1=ImageRef(folder / f'{case_id}_t1_healthy.nii.gz'))


def _reoriented_copy(case, root, axcodes=('A', 'S', 'L')):
  """The same subject stored in another voxel order (as some scanners write it)."""
  case_id = case.case_id + 'R'
  folder = root / 'HGG' / case_id
  folder.mkdir(parents=True)
  refs = dict(case.images, seg=case.label, t1_healthy=case.healthy_t1)
  for name, ref in refs.items():
    img = nib.load(ref.path)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(axcodes))
    nib.save(img.as_reoriented(ornt), folder / f'{case_id}_{name}.nii.gz')
  return _case_from_folder(case_id, folder)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp('cohort')
  info = synthetic.generate_cohort(root, 2, 1, seed=3, spacing=2.0, progress=False)
  config = demo.get_config()
  good = readers.find_cases(config, root / 'BraTS')
  assert len(good) == 2
  # Broken copies: a NaN in FLAIR, and a modality whose file is missing.
  nan_case = _case_from_folder('BraTS19_SYN_NAN_1', root / 'bad_nan' / 'BraTS19_SYN_NAN_1')
  folder = Path(nan_case.images['t1'].path).parent
  folder.mkdir(parents=True)
  for name, ref in dict(good[0].images, seg=good[0].label, t1_healthy=good[0].healthy_t1).items():
    img = nib.load(ref.path)
    data = np.asarray(img.dataobj).astype(np.float32)
    if name == 'flair':
      data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), folder / f'BraTS19_SYN_NAN_1_{name}.nii.gz')
  missing = dict(good[1].images, t2=ImageRef(root / 'nowhere' / 'BraTS19_SYN_MIS_1_t2.nii.gz'))
  missing_case = Case('BraTS19_SYN_MIS_1', missing, label=good[1].label, group='HGG')
  centres = {c['id']: c['centre_mm'] for c in info['tumor_cases']}
  return root, config, good, [nan_case, missing_case], centres


@pytest.fixture(scope='module')
def prepared(cohort):
  _, config, good, _, _ = cohort
  return prepare.prepare_case(good[0], config)


def test_crop_box_is_fixed_and_holds_the_brain():
  config = demo.get_config()
  _, mask = register.mni_template(config.prep.spacing)
  view = sitk.GetArrayFromImage(mask)
  box = prepare.crop_box(view, config.prep.crop_hw)
  (z0, z1), (h0, h1), (w0, w1) = box
  assert (h1 - h0, w1 - w0) == tuple(config.prep.crop_hw)
  z_present = np.flatnonzero(view.any(axis=(1, 2)))
  assert (z0, z1) == (z_present[0], z_present[-1] + 1)
  # The demo crop (192 x 160 mm) holds the whole template brain.
  assert register.crop_to_box(view, box).sum() == view.sum()
  assert prepare.crop_box(view.copy(), config.prep.crop_hw) == box


def test_prepare_case_aligns_to_the_template(cohort, prepared):
  _, config, good, _, centres = cohort
  pc = prepared
  box = pc.meta['crop_box']
  shape = tuple(b - a for a, b in box)
  assert pc.images.shape == (4,) + shape and shape[1:] == tuple(config.prep.crop_hw)
  assert pc.modalities == MODALITIES
  assert pc.brain.shape == pc.label.shape == pc.healthy_t1.shape == shape
  assert set(np.unique(pc.label)) <= {0, 1, 2, 4} and (pc.label > 0).any()
  assert np.all(pc.images[:, ~pc.brain] == 0)
  for image in pc.images:   # scaled by the 99.5th brain percentile
    assert np.percentile(image[pc.brain], config.prep.scale_percentile) == pytest.approx(1.0)
  # The T1 now looks like the template T1 voxel by voxel.
  template = prepare.mni_space(config).template
  template_crop = register.crop_to_box(sitk.GetArrayFromImage(template), box)
  normal = pc.brain & (pc.label == 0)
  assert np.corrcoef(template_crop[normal], pc.modality('t1')[normal])[0, 1] > 0.5
  # The tumor sits where the generator put it in MNI mm (left/right, front/back, up/down).
  grid = pc.meta['mni_grid']
  zz, hh, ww = np.nonzero(pc.label > 0)
  index = np.array([ww.mean() + box[2][0], hh.mean() + box[1][0], zz.mean() + box[0][0]])
  centre_ras = np.array(grid['origin']) * [-1, -1, 1] + index * np.array(grid['spacing'])
  assert np.linalg.norm(centre_ras - centres[good[0].case_id]) < 15.0
  json.dumps(pc.meta)   # the meta is plain JSON
  assert pc.meta['registration_metric'] < -0.2 and pc.meta['brain_coverage'] > 0.9
  assert set(pc.meta['seconds']) >= {'load', 'register', 'resample', 'total'}


def test_normal_subject_registers_its_normal_modality(cohort):
  root, config, _, _, _ = cohort
  (case,) = readers.find_normal_cases(root / 'IXI', config)
  pc = prepare.prepare_case(case, config)
  assert pc.modalities == ('t1',) and pc.meta['group'] == 'normal'
  assert pc.label is None and pc.healthy_t1 is None
  assert pc.images.shape[1:] == pc.brain.shape and pc.meta['brain_coverage'] > 0.9
  native = nib.load(case.images['t1'].path)   # sagittal IXI grid: its own shape comes back
  assert register.to_native(pc.brain, pc.meta).shape == native.shape


def test_to_native_lands_on_the_native_label(cohort, prepared, tmp_path):
  _, config, good, _, _ = cohort
  native = nib.load(good[0].label.path)
  back = register.to_native(prepared.label > 0, prepared.meta, 'nearest')
  assert back.shape == native.shape
  assert _dice(back, np.asarray(native.dataobj)) >= 0.9
  # A file stored in another voxel order gets its own order back, for its own affine.
  copy = _reoriented_copy(good[0], tmp_path)
  pc = prepare.prepare_case(copy, config)
  native = nib.load(copy.label.path)
  back = register.to_native(pc.label > 0, pc.meta, 'nearest')
  assert back.shape == native.shape and back.shape != prepared.meta['native_shape']
  assert _dice(back, np.asarray(native.dataobj)) >= 0.9
  np.testing.assert_allclose(pc.meta['native_affine'], native.affine, atol=1e-5)
  # Linear interpolation of a probability map, and the whole-grid input form.
  full = register.paste_box(pc.label.astype(np.float32),
                            [tuple(b) for b in pc.meta['crop_box']],
                            tuple(reversed(pc.meta['mni_grid']['size'])))
  soft = register.to_native((full > 0).astype(np.float32), pc.meta, 'linear')
  assert soft.dtype == np.float32 and _dice(soft > 0.5, np.asarray(native.dataobj)) >= 0.9
  with pytest.raises(ValueError, match='neither'):
    register.to_native(np.zeros((3, 4, 5)), pc.meta)


def test_prepare_cohort_skips_bad_cases_and_resumes(cohort, tmp_path):
  root, config, good, bad, _ = cohort
  out = tmp_path / 'prep'
  cases = good + bad
  summary = prepare.prepare_cohort(cases, config, out, num_workers=2, progress=False)
  good_ids = sorted(c.case_id for c in good)
  assert summary['prepared'] == good_ids and summary['reused'] == []
  assert set(summary['skipped']) == {c.case_id for c in bad}
  assert 'BraTS19_SYN_NAN_1_flair.nii.gz' in summary['skipped']['BraTS19_SYN_NAN_1']
  assert 'BraTS19_SYN_MIS_1_t2.nii.gz' in summary['skipped']['BraTS19_SYN_MIS_1']
  assert json.loads((out / prepare.SUMMARY_NAME).read_text())['prepared'] == good_ids
  assert sorted(p.name for p in out.glob('*.npz')) == [f'{i}.npz' for i in good_ids]
  # What was saved maps back onto the native label through its JSON alone.
  loaded = store.load_prepared(out, good_ids[0])
  assert set(loaded.meta['seconds']) >= {'load', 'register', 'resample', 'total'}
  native = nib.load(next(c for c in good if c.case_id == good_ids[0]).label.path)
  assert _dice(register.to_native(loaded.label, loaded.meta), np.asarray(native.dataobj)) >= 0.9

  # Resume: finished cases are reused untouched, only a removed one is redone.
  stamp = (out / f'{good_ids[1]}.npz').stat().st_mtime_ns
  (out / f'{good_ids[0]}.json').unlink()
  again = prepare.prepare_cohort(cases, config, out, num_workers=1, progress=False)
  assert again['prepared'] == [good_ids[0]] and again['reused'] == [good_ids[1]]
  assert set(again['skipped']) == {c.case_id for c in bad}
  assert (out / f'{good_ids[1]}.npz').stat().st_mtime_ns == stamp

  # The prep folder may not be the folder of a user's input files.
  with pytest.raises(ValueError, match='input file'):
    prepare.prepare_cohort(good, config, Path(good[0].images['t1'].path).parent, progress=False)


def _with_skull(path, folder, case_id='IXI901-SKL-0901'):
  """The normal subject with its head on, as in an unstripped IXI T1: a dark shell of dura and
  bone (0-5 mm outside the brain, above 0) and a bright one of marrow and scalp fat (5-10 mm)."""
  img = nib.load(path)
  data = np.asarray(img.dataobj, np.float32)
  brain = data > 0
  voxel = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
  outside = ndi.distance_transform_edt(~brain, sampling=voxel)
  wm = np.percentile(data[brain], 90)
  bone = (outside > 0) & (outside <= 5.0)
  scalp = (outside > 5.0) & (outside <= 10.0)
  data[bone] = 0.08 * wm
  data[scalp] = 1.2 * wm
  folder.mkdir(parents=True, exist_ok=True)
  out = folder / f'{case_id}-T1.nii.gz'
  nib.save(nib.Nifti1Image(data.astype(np.int16), img.affine), out)
  return out, bone | scalp, img.affine


def _to_crop(mask, affine, meta, config):
  """A native mask on the prepared crop grid, through the case's own transform."""
  canon = nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), affine))
  moving = register.to_sitk(np.asarray(canon.dataobj), canon.affine)
  pulled = register.resample(moving, prepare.mni_space(config).crop_grid,
                             register.transform_from_meta(meta['transform']), 'nearest')
  return sitk.GetArrayFromImage(pulled) > 0


def test_normal_brain_extraction_drops_the_skull(cohort, prepared, tmp_path):
  root, config, good, _, _ = cohort
  (case,) = readers.find_normal_cases(root / 'IXI', config)
  _, head, affine = _with_skull(case.images['t1'].path, tmp_path / 'IXI')
  (skulled,) = readers.find_normal_cases(tmp_path / 'IXI', config)
  old_config = demo.get_config()
  old_config.prep.normal_brain_extraction = 'template'   # the tumour cohort's rule
  assert config.prep.normal_brain_extraction == 'refined'
  old = prepare.prepare_case(skulled, old_config)
  new = prepare.prepare_case(skulled, config)
  np.testing.assert_allclose(old.meta['transform']['mni_to_native_ras'],   # one alignment,
                             new.meta['transform']['mni_to_native_ras'], atol=1e-6)  # two masks
  brain_native = np.asarray(nib.load(case.images['t1'].path).dataobj) > 0
  truth = _to_crop(brain_native, affine, new.meta, config)
  # Skull and scalp more than a voxel away from the brain (its edge voxels are mixed).
  skull = _to_crop(head, affine, new.meta, config) & ~ndi.binary_dilation(truth)
  assert (old.brain & skull).sum() > 0.05 * old.brain.sum()
  assert (new.brain & skull).sum() < 0.005 * new.brain.sum()
  assert _dice(new.brain, truth) > 0.97 > 0.93 > _dice(old.brain, truth)
  # The T1 landmarks are brain-only again: those of the same subject without its skull, from
  # the 30th percentile up (below, the stripped file's dark partial-volume edge weighs in).
  stripped = prepare.prepare_case(case, config)
  landmarks = lambda pc: np.percentile(pc.modality('t1')[pc.brain], (30, 50, 70, 90, 99))
  new_off = np.abs(landmarks(new) - landmarks(stripped))
  old_off = np.abs(landmarks(old) - landmarks(stripped))
  assert new_off.max() < 0.03 and new_off.mean() < 0.5 * old_off.mean(), (new_off, old_off)
  # Tumour cases keep the tumour cohort's rule, whatever the normal setting.
  tumor_old = prepare.prepare_case(good[0], old_config)
  np.testing.assert_array_equal(tumor_old.brain, prepared.brain)
  np.testing.assert_allclose(tumor_old.images, prepared.images, atol=1e-5)
