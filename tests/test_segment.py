"""New-patient segmentation: a real (tiny, briefly trained) CLFC-gated model and IntroVAE in a
workdir built here; patients stored as separate files, a folder and an MSD 4-D file, each in
its own orientation and shape, come back on exactly their own grid and overlap the truth.

The patients are training subjects stored anew (reoriented, cut, 4-D): what is tested is the
way in and back out of the model's space, not how well a 300-step model generalises. Their
tumors lie off-centre: a flipped axis would leave a Dice of 0 (x, y) or below 0.46 (z); it is
about 0.9."""
import json
import time

import jax
import nibabel as nib
import numpy as np
import pytest

from clfc_jax import checkpoints, evaluate, predict, segment, sharding
from clfc_jax.train import introvae_steps as introvae_train
from clfc_jax.train import steps as train
from clfc_jax.workdir import Workdir
from configs import demo
from data_prep import inputs, normalize, prepare, synthetic, validate
from data_prep.case import Case, CaseError, ImageRef

SEED = 342
TRAIN_SUBJECTS = (0, 7, 6, 4)   # deep tumors of 74, 78, 29, 18 ml; 0 and 7 are segmented
NATIVE_MM = 3.0
SEG_STEPS = 300
INTROVAE_STEPS = 10


def _config():
  """baseline2: the CLFC gates, attention and normal net of clfc without the SimSiam heads
  (identical at inference, cheaper to compile); 4 mm MNI grid, 48x48 crop, width 1/8."""
  c = demo.get_config('baseline2')
  c.prep.spacing = 4.0
  c.prep.reg.spacing = 4.0
  c.prep.crop_hw = (48, 48)
  c.model.width = 0.125
  # BatchNorm's running statistics trail the weights of a 300-step run at 0.9 (then the
  # inference-mode network over-segments); 0.5 follows them closely.
  c.model.bn_momentum = 0.5
  c.data.k = 1
  c.data.num_folds = 2
  c.introvae.channels = (8, 16)
  c.introvae.latent_dim = 16
  c.introvae.batch_size = 16
  c.introvae.recon_batch_size = 16
  c.introvae.keep_checkpoints = 1
  c.introvae.cheap_cpu_compile = True
  c.train.rng_impl = 'rbg'
  c.train.cheap_cpu_compile = True
  c.train.keep_checkpoints = 1
  c.train.batch_size = 8
  c.train.epochs = 1
  c.train.steps_per_epoch = SEG_STEPS
  c.train.lr = 2e-2
  c.eval.batch_size = 16
  return c


def _subject(index):
  return synthetic.make_tumor_subject(synthetic.subject_rng(SEED, 'tumor', index, 'plain'),
                                      NATIVE_MM, 'plain')


def _image(array, affine):
  img = nib.Nifti1Image(array, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm', 'sec')
  return img


def _train_segmenter(config, mesh, cases, refs, pseudo):
  """SGD on every slice of the prepared cases (half the batch from tumor slices)."""
  images, normals, labels = [], [], []
  for pc in cases:
    case_inputs = inputs.case_inputs(pc, refs, config, pseudo[pc.case_id])
    images.append(case_inputs['image'])
    normals.append(case_inputs['normal'])
    labels.append((pc.label > 0).astype(np.int32))
  image, normal, label = map(np.concatenate, (images, normals, labels))
  tumor = np.flatnonzero(label.any(axis=(1, 2)))
  rng = np.random.default_rng(0)
  steps = train.make_jitted_steps(config, mesh, compiler_options=train.CHEAP_CPU_COMPILE)
  state = steps.init(jax.random.key(0, impl=config.train.rng_impl))
  b = int(config.train.batch_size)
  losses = []
  for _ in range(SEG_STEPS):
    idx = np.concatenate([rng.choice(tumor, b // 2), rng.choice(len(label), b - b // 2)])
    batch = {'image': image[idx], 'normal': normal[idx], 'label': label[idx]}
    state, metrics = steps.train(state, sharding.global_batch(batch, mesh))
    # Wait for each step, as the trainer does: queued steps' all-reduces can starve XLA:CPU's
    # thread pool on a busy 2-core machine (a rendezvous that never completes).
    losses.append(float(metrics['loss']))
  return state, float(np.mean(losses[-20:]))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """WORKDIR as the main job leaves it: config.json, per-fold histogram references, the IntroVAE
  reference, introvae/ and runs/baseline2/fold{0,1} checkpoints (fold 1: the same network with
  references fitted on other patients, for the ensemble)."""
  start = time.perf_counter()
  root = tmp_path_factory.mktemp('segment')
  config = _config()
  wd = Workdir(root / 'work')
  wd.root.mkdir()
  (wd.root / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  subjects, cases = {}, []
  for i in TRAIN_SUBJECTS:
    subjects[i] = _subject(i)
    folder = synthetic.write_tumor_subject(subjects[i], f'train{i}', root / 'train')
    case = Case(f'train{i}', {m: ImageRef(folder / f'train{i}_{m}.nii.gz')
                              for m in config.dataset.modalities},
                label=ImageRef(folder / f'train{i}_seg.nii.gz'))
    cases.append(prepare.prepare_loaded(validate.load_case(case, config), config))
  modalities = tuple(config.dataset.modalities)
  refs = normalize.fit_references(cases, modalities, config)
  normalize.save_references(refs, wd.hist_refs(0))
  normalize.save_references(normalize.fit_references(cases[:2], modalities, config),
                            wd.hist_refs(1))
  landmarks = normalize.fit_references(cases, ('t1',), config)
  normalize.save_references(landmarks, normalize.normal_reference_path(wd.prep))
  prep_s = time.perf_counter() - start

  # IntroVAE: a few steps on the T1 brain slices, saved as the introvae stage saves it.
  mesh = sharding.make_mesh()
  units = [inputs.unit_t1(pc.modality('t1'), pc.brain, landmarks['t1'], config)
           for pc in cases]
  slices = np.concatenate([u[pc.brain.any(axis=(1, 2))] for u, pc in zip(units, cases)])[..., None]
  iv_state, _ = introvae_train.fit_on_arrays(config, slices, INTROVAE_STEPS,
                                             compiler_options=train.CHEAP_CPU_COMPILE)
  with checkpoints.Checkpointer(wd.introvae / 'checkpoints', max_to_keep=1) as ckpt:
    ckpt.save(INTROVAE_STEPS, iv_state, extra={'epoch': 1})
    ckpt.wait()
  (wd.introvae / 'summary.json').write_text(json.dumps({'final_step': INTROVAE_STEPS}))
  params = jax.device_put({'enc': iv_state.enc_params, 'dec': iv_state.dec_params},
                          sharding.replicated(mesh))
  pseudo = {pc.case_id: predict.reconstruct_volume(config, params, u, pc.brain, mesh)
            for u, pc in zip(units, cases)}
  introvae_s = time.perf_counter() - start - prep_s

  state, loss = _train_segmenter(config, mesh, cases, refs, pseudo)
  for k in (0, 1):
    run_dir = wd.runs / config.method / f'fold{k}'
    with checkpoints.Checkpointer(run_dir / 'checkpoints', max_to_keep=1) as ckpt:
      ckpt.save(SEG_STEPS, state, metrics={'val_dice': 0.5})
      ckpt.wait()
    fold_config = config.copy_and_resolve_references()
    fold_config.fold = k
    (run_dir / 'config.json').write_text(fold_config.to_json_best_effort(indent=1))
  seconds = {'prep': prep_s, 'introvae': introvae_s,
             'segmenter': time.perf_counter() - start - prep_s - introvae_s}
  print('segment fixture seconds', {k: round(v, 1) for k, v in seconds.items()}, 'loss', loss)
  models = segment.load_models(None, wd.root)
  return {'root': root, 'wd': wd, 'config': config, 'subjects': subjects, 'models': models}


# --- patients on disk, each in its own orientation and shape --------------------------------
def _reorient(array, affine, axcodes, crop=(slice(None),) * 3):
  """`array` (3-D or 4-D) stored with axes `axcodes`, then cut to `crop`; the matching affine."""
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                         nib.orientations.axcodes2ornt(axcodes))
  data = nib.orientations.apply_orientation(array, ornt)
  new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
  new_affine[:, 3] = new_affine @ np.array([s.start or 0 for s in crop] + [1.0])
  return np.ascontiguousarray(data[crop]), new_affine


def _write(array, affine, path, sform_code=1):
  img = _image(array, affine)
  img.set_sform(affine, code=sform_code)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(img, path)
  return path


def _store(subject, axcodes, crop, folder, stem, sform_code=1):
  """The subject's modalities as <stem>_<m>.nii.gz; (paths, truth on the stored grid)."""
  paths = {}
  for m, array in subject.images.items():
    data, affine = _reorient(array, subject.affine, axcodes, crop)
    paths[m] = _write(data, affine, folder / f'{stem}_{m}.nii.gz', sform_code)
  truth, _ = _reorient(subject.label > 0, subject.affine, axcodes, crop)
  return paths, truth


def _store_msd(subject, axcodes, crop, path, config):
  volume = np.stack([subject.images[m] for m in config.dataset.msd_channels], axis=-1)
  data, affine = _reorient(volume, subject.affine, axcodes, crop)
  truth, _ = _reorient(subject.label > 0, subject.affine, axcodes, crop)
  return _write(data, affine, path), truth


def _dice(a, b):
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _assert_same_grid(out_path, input_path):
  out, ref = nib.load(out_path), nib.load(input_path)
  assert out.shape[:3] == ref.shape[:3]
  np.testing.assert_array_equal(out.affine, ref.affine)
  np.testing.assert_array_equal(out.header.get_sform(), ref.header.get_sform())
  np.testing.assert_array_equal(out.header.get_qform(), ref.header.get_qform())
  assert int(out.header['sform_code']) == int(ref.header['sform_code'])
  assert int(out.header['qform_code']) == int(ref.header['qform_code'])
  assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
  return out


def _cli(*args):
  """The command line, in this process (compiled models are reused); its exit status."""
  try:
    return segment.main(segment.parse_flags(['segment', *[str(a) for a in args]]))
  finally:
    segment.FLAGS.unparse_flags()


# --- the tests ------------------------------------------------------------------------------
def test_separate_files_in_ras_through_the_command_line(trained, tmp_path):
  wd, subject = trained['wd'], trained['subjects'][0]
  crop = (slice(3, -2), slice(None), slice(2, None))
  paths, truth = _store(subject, 'RAS', crop, tmp_path / 'in', 'pat_A')
  out = tmp_path / 'out'
  status = _cli(f'--workdir={wd.root}', *[f'--{m}={p}' for m, p in paths.items()], f'--out={out}',
                '--save-prob', '--save-pseudo-normal', '--save-attention')
  assert status == 0
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f'pat_A{suffix}' for suffix in segment.OUTPUT_SUFFIXES.values())
  seg = _assert_same_grid(out / 'pat_A_seg.nii.gz', paths['t1'])
  assert nib.aff2axcodes(seg.affine) == ('R', 'A', 'S') and seg.get_data_dtype() == np.uint8
  mask = np.asarray(seg.dataobj)
  assert set(np.unique(mask)) == {0, trained['config'].eval.wt_label}
  assert _dice(mask, truth) >= 0.7, _dice(mask, truth)
  prob = np.asarray(_assert_same_grid(out / 'pat_A_prob.nii.gz', paths['t1']).dataobj)
  np.testing.assert_array_equal(prob > trained['config'].eval.threshold, mask > 0)
  assert prob.min() >= 0 and prob.max() <= 1
  pseudo = np.asarray(_assert_same_grid(out / 'pat_A_pseudo_normal.nii.gz', paths['t1']).dataobj)
  brain = np.asarray(nib.load(paths['t1']).dataobj) > 0
  assert pseudo.min() >= 0 and pseudo.max() <= 1 and pseudo[brain].mean() > pseudo[~brain].mean()
  attention = _assert_same_grid(out / 'pat_A_attention.nii.gz', paths['t1'])
  assert attention.shape == mask.shape + (4,)
  maps = np.asarray(attention.dataobj)
  assert maps.min() >= 0 and maps.max() <= 1
  assert all(maps[..., level][brain].std() > 0 for level in range(4))


def test_a_modality_left_out_is_refused_before_any_work(trained, tmp_path):
  from absl import app
  paths, _ = _store(trained['subjects'][0], 'LPS', (slice(None),) * 3, tmp_path / 'in', 'p')
  with pytest.raises(app.UsageError, match='--flair'):
    _cli(f'--workdir={trained["wd"].root}', f'--t1={paths["t1"]}', f'--t1ce={paths["t1ce"]}',
         f'--t2={paths["t2"]}', f'--out={tmp_path / "out"}')
  case = segment.case_from_files({m: paths[m] for m in ('t1', 't1ce', 't2')})
  with pytest.raises(CaseError, match='no flair image') as info:
    segment.segment_case(trained['models'], case, tmp_path / 'out')
  assert info.value.path == str(paths['t1'])
  assert not (tmp_path / 'out').exists()


def test_cohort_folder_and_4d_file_and_a_bad_case(trained, tmp_path):
  """Batch mode: an LPS case folder, an MSD 4-D file stored ASR, a patient with a corrupt file;
  the bad one is reported and skipped, the others are segmented; a rerun keeps them."""
  config, subjects = trained['config'], trained['subjects']
  cohort, out = tmp_path / 'cohort', tmp_path / 'out'
  folder_paths, folder_truth = _store(subjects[7], 'LPS', (slice(2, -2), slice(1, None),
                                                           slice(None, -3)),
                                      cohort / 'HGG' / 'pat_B', 'pat_B', sform_code=2)
  msd_path, msd_truth = _store_msd(subjects[0], 'ASR', (slice(None), slice(4, None), slice(None)),
                                   cohort / 'pat_C.nii.gz', config)
  bad_paths, _ = _store(subjects[0], 'LPS', (slice(None),) * 3, cohort / 'HGG' / 'pat_D', 'pat_D')
  bad_paths['t1ce'].write_bytes(b'not a NIfTI file at all')
  cases, problems = segment.find_cases(cohort, config)
  assert [c.case_id for c in cases] == ['pat_B', 'pat_C', 'pat_D'] and not problems
  assert cases[1].images['t1'] == ImageRef(msd_path, channel=1)

  assert _cli(f'--workdir={trained["wd"].root}', f'--input-dir={cohort}', f'--out={out}') == 1
  assert sorted(p.name for p in out.iterdir()) == ['pat_B_seg.nii.gz', 'pat_C_seg.nii.gz']
  seg_b = _assert_same_grid(out / 'pat_B_seg.nii.gz', folder_paths['t1'])
  assert nib.aff2axcodes(seg_b.affine) == ('L', 'P', 'S') and int(seg_b.header['sform_code']) == 2
  assert _dice(seg_b.dataobj, folder_truth) >= 0.7, _dice(seg_b.dataobj, folder_truth)
  seg_c = _assert_same_grid(out / 'pat_C_seg.nii.gz', msd_path)
  assert seg_c.ndim == 3 and nib.aff2axcodes(seg_c.affine) == ('A', 'S', 'R')
  assert _dice(seg_c.dataobj, msd_truth) >= 0.7, _dice(seg_c.dataobj, msd_truth)

  # A rerun refuses to overwrite (and does no work); --overwrite replaces.
  stamp = lambda p: (p.stat().st_ino, p.stat().st_mtime_ns)   # a replaced file: a new inode
  before = {p.name: stamp(p) for p in out.iterdir()}
  summary = segment.segment_cases(trained['models'], cases[:2], out, progress=False)
  assert summary['exists'] == ['pat_B', 'pat_C'] and not summary['done']
  assert {p.name: stamp(p) for p in out.iterdir()} == before
  summary = segment.segment_cases(trained['models'], cases, out, progress=False, overwrite=True)
  assert summary['done'] == ['pat_B', 'pat_C'] and list(summary['failed']) == ['pat_D']
  assert str(bad_paths['t1ce']) in summary['failed']['pat_D']
  assert all(stamp(p)[0] != before[p.name][0] for p in out.iterdir())


def test_segment_case_api_times_every_phase(trained, tmp_path):
  subject = trained['subjects'][7]
  paths, truth = _store(subject, 'LPS', (slice(None),) * 3, tmp_path / 'in', 'pat_E')
  result = segment.segment_case(trained['models'], segment.case_from_files(paths), tmp_path / 'o')
  assert result['case_id'] == 'pat_E' and result['status'] == 'done'
  assert set(result['seconds']) == set(segment.PHASES)
  assert all(v > 0 for v in result['seconds'].values())
  assert _dice(nib.load(result['outputs']['seg']).dataobj, truth) >= 0.7


def test_segment_thresholds_where_the_evaluate_stage_chose_on_validation(trained, tmp_path):
  wd = trained['wd']
  path = wd.eval_dir('baseline2', 0) / evaluate.POSTPROCESS_NAME
  assert not path.exists()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'min_volume_ml': 0.0, 'threshold': 0.3}))
  try:
    models = segment.load_models(None, wd.root, fold=0)
  finally:
    path.unlink()
  assert models.config.eval.threshold == 0.3 and models.min_volume_ml == 0.0
  assert trained['models'].config.eval.threshold == 0.5   # no choice written: the config's
  paths, _ = _store(trained['subjects'][7], 'RAS', (slice(None),) * 3, tmp_path / 'in', 'pat_T')
  outputs = segment.segment_case(models, segment.case_from_files(paths), tmp_path / 'o',
                                 save_prob=True)['outputs']
  prob = np.asarray(nib.load(outputs['prob']).dataobj)
  seg = np.asarray(nib.load(outputs['seg']).dataobj) > 0
  assert ((prob > 0.3) & (prob <= 0.5)).any()
  np.testing.assert_array_equal(seg, prob > 0.3)


def test_ensemble_averages_the_folds_probabilities(trained, tmp_path):
  wd = trained['wd']
  assert [m.fold for m in trained['models'].members] == [0]   # config.fold
  paths, _ = _store(trained['subjects'][7], 'RAS', (slice(None),) * 3, tmp_path / 'in', 'pat_F')
  case = segment.case_from_files(paths)
  probs = {}
  for name, kwargs in (('0', {'fold': 0}), ('1', {'fold': 1}), ('both', {'ensemble': True})):
    models = trained['models'] if name == '0' else segment.load_models(None, wd.root, **kwargs)
    segment.segment_case(models, case, tmp_path / name, save_prob=True)
    probs[name] = np.asarray(nib.load(tmp_path / name / 'pat_F_prob.nii.gz').dataobj)
  assert [m.fold for m in models.members] == [0, 1]
  assert np.abs(probs['0'] - probs['1']).max() > 0.01   # different references, different inputs
  np.testing.assert_allclose(probs['both'], (probs['0'] + probs['1']) / 2, atol=1e-4)


def test_4d_image_flag_with_mirroring_tta(trained, tmp_path):
  path, truth = _store_msd(trained['subjects'][7], 'PIR', (slice(None, -3),) + (slice(None),) * 2,
                           tmp_path / 'pat_G.nii.gz', trained['config'])
  case = segment.case_from_4d_file(path, trained['config'])
  segment.segment_case(trained['models'], case, tmp_path / 'plain', save_prob=True)
  assert _cli(f'--workdir={trained["wd"].root}', f'--image={path}', f'--out={tmp_path / "tta"}',
              '--tta', '--save-prob') == 0
  seg = _assert_same_grid(tmp_path / 'tta' / 'pat_G_seg.nii.gz', path)
  assert _dice(seg.dataobj, truth) >= 0.7, _dice(seg.dataobj, truth)
  plain, tta = (np.asarray(nib.load(tmp_path / d / 'pat_G_prob.nii.gz').dataobj)
                for d in ('plain', 'tta'))
  assert 1e-3 < np.abs(plain - tta).max() < 0.9   # four mirrorings averaged: close, not equal


def test_command_line_refuses_two_inputs(trained, tmp_path):
  from absl import app
  with pytest.raises(app.UsageError, match='exactly one input'):
    _cli(f'--workdir={trained["wd"].root}', f'--image={tmp_path / "a.nii.gz"}',
         f'--case-dir={tmp_path}', f'--out={tmp_path / "out"}')
  with pytest.raises(app.UsageError, match='exclude'):
    _cli(f'--workdir={trained["wd"].root}', f'--case-dir={tmp_path}', '--ensemble', '--fold=1',
         f'--out={tmp_path / "out"}')
  assert not (tmp_path / 'out').exists()


def _bad_folder(trained, root, fault):
  subject = trained['subjects'][0]
  paths, _ = _store(subject, 'LPS', (slice(None),) * 3, root / 'pat_X', 'pat_X')
  if fault == 'missing modality':
    paths['flair'].unlink()
    return paths['flair'], 'file missing'
  if fault == 'mismatched geometry':
    img = nib.load(paths['t2'])
    shifted = img.affine.copy()
    shifted[:3, 3] += 6.0
    _write(np.asarray(img.dataobj), shifted, paths['t2'])
    return paths['t2'], 'affine differs'
  data = paths['t1ce'].read_bytes()
  paths['t1ce'].write_bytes(data[:len(data) // 2])   # a copy cut short
  return paths['t1ce'], 'truncated'


@pytest.mark.parametrize('fault', ['missing modality', 'mismatched geometry', 'unreadable file'])
def test_bad_input_names_the_file_and_writes_nothing(trained, tmp_path, fault):
  bad_path, problem = _bad_folder(trained, tmp_path, fault)
  case = segment.case_from_folder(tmp_path / 'pat_X', trained['config'])
  out = tmp_path / 'out'
  with pytest.raises(CaseError, match=problem) as info:
    segment.segment_case(trained['models'], case, out, save_prob=True)
  assert info.value.path == str(bad_path)
  assert not out.exists()
  assert sorted(p.name for p in (tmp_path / 'pat_X').iterdir()) == sorted(
      p.name for p in (tmp_path / 'pat_X').glob('pat_X_*.nii.gz'))   # no stray temporaries


def test_case_batch_norm_applies_to_new_patients(trained, tmp_path):
  """--case-bn-weight reaches every patient: its own BatchNorm statistics change the
  probability, and the tumour is still found; a weight outside [0, 1] is refused up front."""
  models = segment.load_models(None, trained['wd'].root, case_bn_weight=1.0)
  assert models.members[0].config.eval.case_bn_weight == 1.0
  paths, truth = _store(trained['subjects'][7], 'RAS', (slice(None),) * 3, tmp_path / 'in',
                        'pat_B')
  case = segment.case_from_files(paths)
  probs = {}
  for name, m in (('running', trained['models']), ('case', models)):
    outputs = segment.segment_case(m, case, tmp_path / name, save_prob=True)['outputs']
    probs[name] = np.asarray(nib.load(outputs['prob']).dataobj)
    assert _dice(nib.load(outputs['seg']).dataobj, truth) >= 0.7
  assert np.abs(probs['case'] - probs['running']).max() > 1e-3
  assert _cli(f'--workdir={trained["wd"].root}', f'--case-dir={paths["t1"].parent}',
              f'--out={tmp_path / "bad"}', '--case-bn-weight=1.5') == 1
  assert not (tmp_path / 'bad').exists()
