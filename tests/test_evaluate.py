"""Native-space evaluation on a real (synthetic, 2 mm) prepared cohort with a tiny real segmenter."""
import csv
import json
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from benchmarks import pipeline
from clfc_jax import checkpoints, evaluate, external, metrics, predict, sharding
from clfc_jax.report import page as report_page
from clfc_jax.train import steps as train
from clfc_jax.models import segmenter
from configs import default, demo
from data_prep import inputs as inputs_lib, normalize, prepare, readers, store
from data_prep.case import Case, CaseError, ImageRef
import synthetic_workdirs


def _config(method='clfc'):
  c = demo.get_config(method)
  c.model.width = 0.125
  c.data.k = 1
  c.data.num_folds = 2
  c.eval.batch_size = 8
  c.train.keep_checkpoints = 1
  return c


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  """WORKDIR with 2 prepared tumor cases, folds, fold-0 references, pseudo-normals, a checkpoint."""
  root = tmp_path_factory.mktemp('evaluate')
  config = _config()
  # The test's native grid: 2 mm isotropic.
  wd, split, refs = synthetic_workdirs.prepared_workdir(root, config, 2, 3, profile='plain')
  # No normal cohort: fold 0's own IntroVAE makes its pseudo-normals (pseudo_normal/fold0/).
  pipeline.write_toy_pseudo_normals(wd.prep, wd.pseudo_normal_dir(wd.introvae_key(0)),
                                    split['train'] + split['test'])
  model = segmenter.build_segmenter(config)
  state = train.create_train_state(
      config, jax.random.key(1, impl=config.train.rng_impl), model)
  with checkpoints.Checkpointer(wd.runs / 'clfc' / 'fold0' / 'checkpoints',
                                max_to_keep=1) as ckpt:
    ckpt.save(3, state, metrics={'val_dice': 0.5})
    ckpt.wait()
  return {'wd': wd, 'config': config, 'split': split, 'refs': refs, 'model': model,
          'variables': state.variables}


def _test_case(cohort):
  return store.load_prepared(cohort['wd'].prep_cases, cohort['split']['test'][0])


def test_case_inputs_are_matched_modality_major_stacks(cohort):
  config, refs = cohort['config'], cohort['refs']
  pc = _test_case(cohort)
  pseudo = inputs_lib.load_pseudo_normal(cohort['wd'].pseudo_normal_file(pc.case_id, 0),
                                       pc.brain.shape)
  inputs = inputs_lib.case_inputs(pc, refs, config, pseudo)
  z, h, w = pc.brain.shape
  n = 2 * config.data.k + 1
  assert inputs['image'].shape == (z, h, w, 4 * n) and inputs['image'].dtype == np.float32
  assert inputs['normal'].shape == (z, h, w, n)
  for mi, m in enumerate(config.dataset.modalities):
    matched = normalize.apply_reference(pc.modality(m), pc.brain, refs[m], config)
    for s in (0, z // 2, z - 1):
      for j in range(n):
        src = int(np.clip(s - config.data.k + j, 0, z - 1))
        np.testing.assert_allclose(inputs['image'][s, :, :, mi * n + j], matched[src],
                                   atol=2e-3, rtol=1e-3)
  np.testing.assert_allclose(inputs['normal'][5, :, :, 0], pseudo[4], atol=1e-3)
  # baseline1 has no normal net; the full model refuses to run without its pseudo-normal.
  assert 'normal' not in inputs_lib.case_inputs(pc, refs, _config('baseline1'))
  with pytest.raises(CaseError, match='pseudo-normal'):
    inputs_lib.case_inputs(pc, refs, config)
  with pytest.raises(CaseError, match='no pseudo-normal'):
    inputs_lib.load_pseudo_normal(cohort['wd'].pseudo_normal_file('nobody', 0), pc.brain.shape)


def test_predict_volume_equals_unbatched_per_slice_prediction(cohort):
  config, model, variables = cohort['config'], cohort['model'], cohort['variables']
  pc = _test_case(cohort)
  pseudo = inputs_lib.load_pseudo_normal(cohort['wd'].pseudo_normal_file(pc.case_id, 0),
                                       pc.brain.shape)
  inputs = {k: v[30:37] for k, v in inputs_lib.case_inputs(pc, cohort['refs'], config,
                                                          pseudo).items()}
  mesh = sharding.make_mesh()
  assert len(mesh.local_devices) == 4
  fns = predict.segmenter_fns(config, mesh)
  prob = predict.predict_volume(fns, variables, inputs, 4, mesh)   # 4 + 3 padded
  assert prob.shape == (7,) + pc.brain.shape[1:] and prob.dtype == np.float32

  @jax.jit
  def one(image, normal):
    logits = model.apply(variables, image, normal, train=False)['logits']
    return jax.nn.softmax(logits, axis=-1)[..., 1]

  expected = np.concatenate([np.asarray(one(inputs['image'][i:i + 1], inputs['normal'][i:i + 1]))
                             for i in range(7)])
  np.testing.assert_allclose(prob, expected, atol=1e-5)
  assert prob.std() > 0   # a real network, not a constant
  with pytest.raises(ValueError, match='multiple of the 4 devices'):
    predict.predict_volume(fns, variables, inputs, 6, mesh)
  assert predict.round_batch(6, mesh) == 8


def test_true_label_as_probability_lands_on_the_native_label(cohort, tmp_path):
  config = cohort['config']
  pc = _test_case(cohort)
  scores, native_pred = evaluate.score_case((pc.label > 0).astype(np.float32), pc.meta, config)
  native = nib.load(pc.meta['label_file'])
  assert native_pred.shape == native.shape and native_pred.dtype == np.uint8
  assert set(np.unique(native_pred)) == {0, config.eval.wt_label}
  assert scores['dice'] >= 0.9 and scores['sensitivity'] >= 0.9
  assert scores['hd95'] <= 2 * max(native.header.get_zooms())
  truth = np.asarray(native.dataobj) > 0
  assert scores == metrics.case_metrics(native_pred, truth, native.header.get_zooms())
  path = evaluate.save_prediction(tmp_path / 'p_seg.nii.gz', native_pred, pc.meta, native)
  back = nib.load(path)
  assert back.shape == native.shape and back.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(back.affine, native.affine)
  np.testing.assert_array_equal(np.asarray(back.dataobj), native_pred)
  # An empty prediction of a tumor case: Dice 0, HD95 the image diagonal (BraTS convention).
  empty, _ = evaluate.score_case(np.zeros(pc.brain.shape, np.float32), pc.meta, config)
  assert empty['dice'] == 0.0 and empty['hd95'] > 100


def test_missing_label_file_is_a_case_error(cohort):
  pc = _test_case(cohort)
  meta = dict(pc.meta, label_file=str(cohort['wd'].root / 'gone_seg.nii.gz'))
  with pytest.raises(CaseError, match='gone_seg.nii.gz'):
    evaluate.score_case(np.zeros(pc.brain.shape, np.float32), meta, cohort['config'])


def test_evaluate_fold_writes_native_predictions_and_resumes(cohort):
  config, wd = cohort['config'], cohort['wd']
  test_id = cohort['split']['test'][0]
  summary = evaluate.evaluate_fold(config, wd.root, 0)
  assert summary['n'] == 1 and summary['evaluated_now'] == 1 and summary['checkpoint_step'] == 3
  out = wd.eval / 'clfc' / 'fold0'
  with open(out / 'per_patient.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['patient'] for r in rows] == [test_id]
  assert rows[0]['method'] == 'clfc' and rows[0]['fold'] == '0'
  choice = json.loads((out / evaluate.POSTPROCESS_NAME).read_text())
  assert cohort['split']['val'] == [] and choice['chosen_on'] == []   # no validation patient:
  assert choice['threshold'] == config.eval.threshold                 # the config's threshold
  # The written NIfTI has the input's geometry, and the CSV scores exactly that file.
  pred = nib.load(out / 'predictions' / f'{test_id}_seg.nii.gz')
  native = nib.load(store.load_prepared_meta(wd.prep_cases, test_id)['label_file'])
  assert pred.shape == native.shape and pred.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(pred.affine, native.affine)
  np.testing.assert_array_equal(pred.header.get_zooms(), native.header.get_zooms())
  assert pred.header['qform_code'] == native.header['qform_code']
  rescored = metrics.case_metrics(np.asarray(pred.dataobj), np.asarray(native.dataobj) > 0,
                                  native.header.get_zooms())
  for m in ('dice', 'sensitivity', 'hd95'):
    assert float(rows[0][m]) == pytest.approx(rescored[m], rel=1e-9)
    assert summary[m] == pytest.approx(rescored[m], rel=1e-9)
  # Resume: a patient already in the CSV is not evaluated again.
  rows[0]['dice'] = '0.125'
  with open(out / 'per_patient.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  again = evaluate.evaluate_fold(config, wd.root, 0)
  assert again['evaluated_now'] == 0 and again['dice'] == 0.125
  # Nothing outside WORKDIR/eval was written.
  assert not (wd.root / 'report').exists()


def test_threshold_is_chosen_on_the_validation_patients_native_probabilities(cohort):
  """An under-confident model (0.35 on the tumour) is thresholded below 0.5; the choice goes
  into a copy of the config only."""
  config, wd = cohort['config'], cohort['wd']
  ids = cohort['split']['train']   # stand-ins for a fold's validation patients

  def case_prob(case_id):
    pc = store.load_prepared(wd.prep_cases, case_id)
    return pc, np.where(pc.label > 0, 0.35, 0.0).astype(np.float32)

  choice = evaluate.choose_postprocessing(config, ids, case_prob)
  t = choice['threshold']   # 0.35 resampled linearly: 0.2 or 0.3 catch the most of it
  assert t in (0.2, 0.3) and choice['chosen_on'] == ids
  assert choice['threshold_dice'][t] == max(choice['threshold_dice'].values()) > 0.5
  assert choice['threshold_dice'][0.5] == 0.0
  chosen = evaluate.with_threshold(config, choice)
  assert chosen.eval.threshold == t and config.eval.threshold == 0.5
  assert evaluate.with_threshold(config, {'min_volume_ml': 0.0}) is config   # older files


def test_evaluate_fold_without_checkpoints_says_so(cohort):
  config = default.apply_method(_config(), 'baseline2')
  with pytest.raises(FileNotFoundError, match='baseline2'):
    evaluate.evaluate_fold(config, cohort['wd'].root, 0)


def test_anisotropic_reoriented_native_file_is_scored_in_its_own_axes(cohort, tmp_path):
  """A file stored A-S-L with 4 mm between sagittal planes: shape, affine and spacing are its own."""
  config = cohort['config']
  case = next(c for c in readers.find_cases(config, cohort['wd'].root.parent / 'syn' / 'BraTS')
              if c.case_id == cohort['split']['test'][0])
  folder = tmp_path / 'HGG' / 'ANISO'
  folder.mkdir(parents=True)
  for name, ref in dict(case.images, seg=case.label).items():
    img = nib.load(ref.path)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine),
                                           nib.orientations.axcodes2ornt(('A', 'S', 'L')))
    img = img.as_reoriented(ornt)
    affine = img.affine.copy()
    affine[:3, 2] *= 2   # every other plane along the third (L) axis
    data = np.asarray(img.dataobj)[:, :, ::2]
    nib.save(nib.Nifti1Image(data, affine), folder / f'ANISO_{name}.nii.gz')
  aniso = Case('ANISO', {m: ImageRef(folder / f'ANISO_{m}.nii.gz') for m in case.images},
               label=ImageRef(folder / 'ANISO_seg.nii.gz'), group='HGG')
  pc = prepare.prepare_case(aniso, config)
  native = nib.load(folder / 'ANISO_seg.nii.gz')
  assert native.header.get_zooms() == (2.0, 2.0, 4.0)
  scores, native_pred = evaluate.score_case((pc.label > 0).astype(np.float32), pc.meta, config)
  assert native_pred.shape == native.shape
  truth = np.asarray(native.dataobj) > 0
  assert scores == metrics.case_metrics(native_pred, truth, (2.0, 2.0, 4.0))
  assert scores['dice'] >= 0.85


def test_external_predictions_become_a_table1_row_with_a_p_value(cohort, tmp_path):
  """nnUNetv2_predict-style outputs (<case>.nii.gz on each native grid) are scored like our
  methods and sit in Table 1 beside them, with their Wilcoxon p-value against CLFC."""
  config, wd = cohort['config'], cohort['wd']
  evaluate.evaluate_fold(config, wd.root, 0)   # CLFC's rows (resumed when already there)
  folder = tmp_path / 'nnunet_preds'
  folder.mkdir()
  for case_id in cohort['split']['test']:
    label = nib.load(store.load_prepared_meta(wd.prep_cases, case_id)['label_file'])
    nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine,
                             label.header), folder / f'{case_id}.nii.gz')
  summary = evaluate.evaluate_external(config, wd.root, 'nnunet', folder, 0)
  assert summary['n'] == len(cohort['split']['test']) and summary['dice'] == pytest.approx(1.0)
  paths = report_page.write_report(config, wd.root, ['clfc', 'nnunet'], [0], with_figures=False)
  table = paths['table1_md'].read_text()
  row = next(line for line in table.splitlines() if line.startswith('| nnU-Net'))
  assert '| 100.00 ± 0.00 |' in row
  assert table.splitlines()[0].endswith('| p (dice vs CLFC (ours)) |')
  assert row.split('|')[-2].strip() != '—'   # a Wilcoxon cell, not the reference's dash
  assert external.parse_methods(f'nnunet={folder}, other = /x') == {'nnunet': folder,
                                                                    'other': Path('/x')}
  with pytest.raises(ValueError, match='name=FOLDER'):
    external.parse_methods('nnunet')


def test_case_batch_norm_normalises_with_the_case_own_statistics(cohort):
  """Weight 1 is AdaBN: predicting with the adapted statistics equals a train-mode pass (batch
  statistics) over the same slices, so a global scanner gain on every input cancels, which
  fixed statistics do not; weight 0.5 is the midpoint, weight 0 the variables themselves."""
  config, model, variables = cohort['config'], cohort['model'], cohort['variables']
  pc = _test_case(cohort)
  pseudo = inputs_lib.load_pseudo_normal(cohort['wd'].pseudo_normal_file(pc.case_id, 0),
                                         pc.brain.shape)
  brain = inputs_lib.brain_slices(pc.brain, config.data.min_brain_fraction)
  idx = brain[:len(brain) // 4 * 4]
  case = {k: v[idx] for k, v in inputs_lib.case_inputs(pc, cohort['refs'], config,
                                                       pseudo).items()}
  label = pc.label[idx].astype(np.int32)
  mesh = sharding.make_mesh()
  fns = predict.segmenter_fns(config, mesh)
  config = config.copy_and_resolve_references()
  config.eval.case_bn_weight, config.eval.case_bn_slices = 1.0, len(idx)

  def adapted_prob(inputs, weight=1.0):
    config.eval.case_bn_weight = weight
    adapted = predict.case_batch_norm(fns, variables, inputs, pc.brain[idx], config, mesh)
    return adapted, predict.predict_volume(fns, adapted, inputs, 8, mesh)

  adapted, prob = adapted_prob(case)
  out, _ = jax.jit(lambda image, normal, label: model.apply(
      variables, image, normal, label=label, train=True, mutable=['batch_stats']))(
          case['image'], case['normal'], label)
  expected = np.asarray(jax.nn.softmax(out['logits'], axis=-1)[..., 1])
  np.testing.assert_allclose(prob, expected, atol=1e-4)
  assert prob.std() > 0.01

  gained = {k: 1.7 * v for k, v in case.items()}
  _, prob_gained = adapted_prob(gained)
  np.testing.assert_allclose(prob_gained, prob, atol=1e-3)
  # Statistics fixed at this case's (a model trained on this scanner) do not cancel the gain.
  fixed = predict.predict_volume(fns, adapted, gained, 8, mesh)
  assert np.abs(fixed - prob).max() > 100 * np.abs(prob_gained - prob).max()

  half, _ = adapted_prob(case, 0.5)
  for name in adapted['batch_stats']:
    jax.tree.map(lambda h, a, r: np.testing.assert_allclose(h, 0.5 * (a + r), rtol=1e-5,
                                                            atol=1e-6),
                 half['batch_stats'][name], adapted['batch_stats'][name],
                 variables['batch_stats'][name])
  assert {n for n in adapted['batch_stats']
          if adapted['batch_stats'][n] is not variables['batch_stats'][n]} == {
              'backbone_encoder', 'normal_encoder'}
  config.eval.case_bn_weight = 0.0
  assert predict.case_batch_norm(fns, variables, case, pc.brain[idx], config, mesh) is variables
  config.eval.case_bn_weight = 1.5
  with pytest.raises(ValueError, match='case_bn_weight'):
    predict.case_batch_norm(fns, variables, case, pc.brain[idx], config, mesh)
