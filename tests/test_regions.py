"""Tumour sub-regions end to end (task.regions='wt_tc_et'): raw labels in the shards, the
loader's nested level map, a region model that trains and validates per region, native-space
scoring per region with nested label maps written back in the input's convention, and the
per-region Table 1. The 'wt' path is checked to be the paper's binary one."""
import csv
import json

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from benchmarks import pipeline
from clfc_jax import checkpoints, evaluate, external, input_pipeline, losses, metrics
from clfc_jax.models import segmenter
from clfc_jax.report import page as report_page
from clfc_jax.train import steps as train
from clfc_jax.train import trainer
from clfc_jax.workdir import Workdir
from configs import default, demo
from data_prep import labels, shards, store
from data_prep import tfds_builders, tfrecord
import synthetic_workdirs
from tiny_configs import tiny_train_config

FOLD = 0


def _regions(c):
  c.task.regions = 'wt_tc_et'
  return c


def _toy_with_enhancing(prep_dir, seed):
  """benchmarks.pipeline's toy cohort (2 core, 1 rim: BraTS 2021 ED / NCR) with the inner core
  relabelled 4 (ET), so every region is present."""
  ids = pipeline.toy_prepared_cohort(prep_dir, num_cases=6, z=8, seed=seed)
  cases = prep_dir / store.CASES_DIR
  for case_id in ids:
    pc = store.load_prepared(cases, case_id)
    label = pc.label.copy()
    label[ndimage.binary_erosion(label == 2, iterations=1)] = 4
    store.save_prepared(store.PreparedCase(case_id, pc.images, pc.brain, label, pc.meta), cases)
  return ids


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
  root = tmp_path_factory.mktemp('regions_toy')
  ids = _toy_with_enhancing(root / 'prep', seed=5)
  config = _regions(tiny_train_config())
  tfds_builders.build(tfds_builders.tumor_slices_builder(config, root / 'tfds'))
  return {'root': root, 'ids': ids, 'config': config, 'data_dir': root / 'tfds'}


def test_shards_hold_raw_labels_and_the_loader_makes_each_task_target(toy):
  config = toy['config']
  wt_config = tiny_train_config()
  # Regions are applied at read time: 'wt' and 'wt_tc_et' read the same shards ...
  assert shards.tumor_config_name(config) == shards.tumor_config_name(wt_config)
  other = tiny_train_config()
  other.task.label_convention = 'msd'   # ... while another convention is another dataset.
  assert shards.tumor_config_name(other) != shards.tumor_config_name(wt_config)
  directory = shards.tumor_dir(config, toy['data_dir'])
  source = tfrecord.ShardSource(directory, shards.ALL_SPLIT)
  cases = toy['root'] / 'prep' / store.CASES_DIR
  seen = set()
  for i in range(len(source)):
    ex = source[i]
    pc = store.load_prepared(cases, bytes(ex['patient']).decode())
    raw = pc.label[int(ex['slice'])]
    np.testing.assert_array_equal(ex['label'], raw)
    assert bool(ex['has_tumor']) == bool(raw.any())
    seen |= set(np.unique(raw).tolist())
  assert seen == {0, 1, 2, 4}

  def batch_labels(c):
    it = input_pipeline.eval_iterator(c, toy['data_dir'], FOLD, 'train', 64)
    out = [(b['label'][b['valid']], b['patient'][b['valid']], b['slice'][b['valid']])
           for b in it]
    return [np.concatenate(x) for x in zip(*out)]

  levels, patients, slices = batch_labels(config)
  binary, _, _ = batch_labels(wt_config)
  raw = np.stack([store.load_prepared(cases, p.decode()).label[s]
                  for p, s in zip(patients, slices)])
  assert binary.dtype == levels.dtype == np.int32
  np.testing.assert_array_equal(binary, (raw > 0).astype(np.int32))   # the paper's target
  masks = labels.region_masks(raw, 'brats2021')
  np.testing.assert_array_equal(labels.levels_to_masks(levels, 3), masks)
  np.testing.assert_array_equal(
      np.asarray(losses.level_targets(jax.numpy.asarray(levels), 3)), masks.astype(np.float32))


def test_resection_cavity_is_stored_but_is_no_tumour(tmp_path):
  """BraTS 2024 post-treatment: label 4 (cavity) stays in the shard, yet has_tumor is False
  and the target is 0 there (`label > 0` would have called it tumour)."""
  ids = pipeline.toy_prepared_cohort(tmp_path / 'prep', num_cases=6, z=8, seed=2)
  cases = tmp_path / 'prep' / store.CASES_DIR
  pc = store.load_prepared(cases, ids[0])
  cavity = np.where(pc.label > 0, 4, 0).astype(np.uint8)   # this case: only a cavity
  store.save_prepared(store.PreparedCase(ids[0], pc.images, pc.brain, cavity, pc.meta), cases)
  c = _regions(tiny_train_config())
  c.task.label_convention = 'brats2024_post'
  c.data.val_fraction = 0.0
  c.data.num_folds = 2
  tfds_builders.build(tfds_builders.tumor_slices_builder(c, tmp_path / 'tfds'))
  found = False
  source = tfrecord.ShardSource(shards.tumor_dir(c, tmp_path / 'tfds'), shards.ALL_SPLIT)
  for i in range(len(source)):
    ex = source[i]
    if bytes(ex['patient']).decode() == ids[0]:
      found = True
      assert not ex['has_tumor']
      assert set(np.unique(ex['label']).tolist()) <= {0, 4}
      target = input_pipeline.label_lut(c)[ex['label']]
      assert not target.any()
  assert found


def test_a_label_outside_the_convention_is_refused_naming_the_case(tmp_path):
  ids = pipeline.toy_prepared_cohort(tmp_path / 'prep', num_cases=6, z=8, seed=3)
  cases = tmp_path / 'prep' / store.CASES_DIR
  pc = store.load_prepared(cases, ids[1])
  label = pc.label.copy()
  label[label == 2] = 7
  store.save_prepared(store.PreparedCase(ids[1], pc.images, pc.brain, label, pc.meta), cases)
  with pytest.raises(ValueError, match=rf'{ids[1]}.*\[7\]'):
    tfds_builders.build(tfds_builders.tumor_slices_builder(tiny_train_config(), tmp_path / 'tfds'))


def test_a_region_model_trains_and_selects_on_the_mean_region_dice(toy, tmp_path):
  config = toy['config']
  summary = trainer.train_and_evaluate(config, tmp_path, FOLD, data_dir=toy['data_dir'])
  assert summary['status'] == 'done'
  run_dir = Workdir(tmp_path).run_dir(config.method, FOLD)
  events = [json.loads(line) for line in (run_dir / trainer.METRICS_NAME).read_text().splitlines()]
  train_events = [e for e in events if e.get('event') == 'train']
  assert train_events and all(np.isfinite(e['loss']) for e in train_events)
  vals = [e for e in events if e.get('event') == 'val']
  assert len(vals) == config.train.epochs
  for e in vals:
    per_region = [e[f'val_dice_{r}'] for r in ('wt', 'tc', 'et')]
    assert e['val_dice'] == pytest.approx(np.mean(per_region))
  best = max(vals, key=lambda e: e['val_dice'])
  assert summary['best_val_dice'] == pytest.approx(best['val_dice'])
  # The head has one logit per region.
  state, _, _ = trainer.restore_state(config, run_dir)
  assert state.params['head']['kernel'].shape[-1] == 3


def test_eval_step_nests_the_regions_and_wt_keeps_the_softmax():
  c = _regions(tiny_train_config())
  model = segmenter.build_segmenter(c)
  variables = segmenter.init_variables(model, jax.random.key(0), c)
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(2, 32, 32, model.image_channels)).astype(np.float32)}
  out = train.eval_step(variables, batch, model=model, config=c)
  probs, pred = np.asarray(out['probs']), np.asarray(out['pred'])
  assert probs.shape == (2, 32, 32, 3) and pred.shape == (2, 32, 32)
  masks = probs > c.eval.threshold
  np.testing.assert_array_equal(labels.levels_to_masks(pred, 3), labels.nest(masks))
  # nested_levels on hand-made, un-nested masks: ET alone still means TC and WT.
  hand = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(train.nested_levels(hand)), [3, 1, 2, 3, 0])
  wt = tiny_train_config()
  wt_model = segmenter.build_segmenter(wt)
  assert segmenter.output_channels(wt) == wt.model.n_classes == 2
  wt_vars = segmenter.init_variables(wt_model, jax.random.key(0), wt)
  wt_out = train.eval_step(wt_vars, batch, model=wt_model, config=wt)
  assert np.asarray(wt_out['probs']).shape == (2, 32, 32)


def test_wt_loss_is_the_softmax_dice_and_ce_of_the_binary_map():
  """'wt' keeps the paper's loss: the same numbers as dice_loss + CE on the binary map, while
  'wt_tc_et' scores the same logits' first three channels as sigmoids per region."""
  rng = np.random.default_rng(1)
  levels = rng.integers(0, 4, (2, 16, 16)).astype(np.int32)
  c = default.get_config()
  c.loss.ce_weight = 0.5
  logits2 = rng.normal(size=(2, 16, 16, 2)).astype(np.float32)
  loss, m = losses.segmentation_loss({'logits': logits2}, (levels > 0).astype(np.int32), c)
  binary = (levels > 0).astype(np.int32)
  expected = (losses.dice_loss(logits2, binary, c.loss.dice_smooth)
              + 0.5 * losses.cross_entropy(logits2, binary))
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  _regions(c)
  logits3 = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  loss, m = losses.segmentation_loss({'logits': logits3}, levels, c)
  targets = labels.levels_to_masks(levels, 3).astype(np.float32)
  p = 1 / (1 + np.exp(-logits3.astype(np.float64)))
  s = c.loss.dice_smooth
  dice = [(2 * (p[..., r] * targets[..., r]).sum() + s) /
          (p[..., r].sum() + targets[..., r].sum() + s) for r in range(3)]
  bce = -np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  assert float(m['dice_loss']) == pytest.approx(1 - np.mean(dice), rel=1e-5)
  assert float(m['ce']) == pytest.approx(bce, rel=1e-5)
  assert float(loss) == pytest.approx(1 - np.mean(dice) + 0.5 * bce, rel=1e-5)


# --- native space, on a real synthetic cohort -------------------------------------------------
def _config(method='clfc'):
  c = _regions(demo.get_config(method))
  c.model.width = 0.125
  c.data.k = 1
  c.data.num_folds = 2
  c.eval.batch_size = 8
  c.train.keep_checkpoints = 1
  c.train.rng_impl = 'rbg'
  c.postprocess.min_volume_candidates = (0.0, 0.5)
  return c


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  """WORKDIR: 4 prepared synthetic tumour cases (BraTS 2021 labels 1, 2, 4), fold-0 references,
  toy pseudo-normals and untrained clfc / baseline1 region checkpoints."""
  root = tmp_path_factory.mktemp('regions_eval')
  config = _config()
  wd, split, _ = synthetic_workdirs.prepared_workdir(root, config, 4, 3, profile='plain')
  pipeline.write_toy_pseudo_normals(wd.prep, wd.pseudo_normal_dir(wd.introvae_key(0)),
                                    store.prepared_ids(wd.prep_cases))
  for seed, method in enumerate(('clfc', 'baseline1')):
    mc = default.method_config(config, method)
    state = train.create_train_state(mc, jax.random.key(seed, impl='rbg'))
    with checkpoints.Checkpointer(wd.run_dir(method, 0) / 'checkpoints', max_to_keep=1) as ckpt:
      ckpt.save(3, state, metrics={'val_dice': 0.5})
      ckpt.wait()
  return {'wd': wd, 'config': config, 'split': split}


def test_true_regions_as_probabilities_land_on_the_native_regions(cohort):
  config = cohort['config']
  pc = store.load_prepared(cohort['wd'].prep_cases, cohort['split']['test'][0])
  prob = labels.region_masks(pc.label, 'brats2021').astype(np.float32)
  assert prob[..., 2].any() and prob[..., 1].any()
  scores, native_pred = evaluate.score_regions(prob, pc.meta, config, brain=pc.brain)
  native = nib.load(pc.meta['label_file'])
  truth = labels.region_masks(np.asarray(native.dataobj), 'brats2021')
  assert native_pred.shape == native.shape and native_pred.dtype == np.uint8
  assert set(np.unique(native_pred)) <= {0, 1, 2, 4}
  written = labels.region_masks(native_pred, 'brats2021')
  for r, region in enumerate(('wt', 'tc', 'et')):
    assert scores[region]['dice'] >= 0.75, region
    assert scores[region]['dice'] == pytest.approx(metrics.dice(written[..., r], truth[..., r]))
    assert 'lesion_dice' in scores[region] and 'lesion_hd95' in scores[region]


def test_native_regions_are_nested_whatever_the_probabilities(cohort):
  """An ET probability where WT's is low still gives ET ⊆ TC ⊆ WT in the written map (an ET
  voxel is TC and WT too: labels.nest), and small-component removal on WT takes TC/ET along."""
  config = cohort['config']
  pc = store.load_prepared(cohort['wd'].prep_cases, cohort['split']['test'][0])
  prob = np.zeros(pc.brain.shape + (3,), np.float32)
  z, h, w = (n // 2 for n in pc.brain.shape)
  prob[z - 4:z + 4, h - 6:h + 6, w - 6:w + 6, 0] = 1.0          # WT block
  prob[z - 2:z + 2, h - 2:h + 8, w - 2:w + 2, 2] = 1.0          # ET, partly outside WT, no TC
  masks, _ = evaluate.native_mask(prob, pc.meta, config)
  assert masks[..., 2].any()
  assert not (masks[..., 2] & ~masks[..., 1]).any() and not (masks[..., 1] & ~masks[..., 0]).any()
  assert (masks[..., 1] == masks[..., 2]).all()   # TC came only from ET
  # A tiny separate ET speck is dropped with its WT component (keep_largest keeps the block).
  prob[2:3, 2:3, 2:3, 2] = 1.0
  cleaned, _ = evaluate.native_mask(prob, pc.meta, config, min_volume_ml=1.0)
  labelled, n = ndimage.label(cleaned[..., 0], np.ones((3, 3, 3)))
  assert n == 1 and (cleaned[..., 2] <= cleaned[..., 0]).all()


def test_evaluate_and_report_per_region(cohort):
  config, wd = cohort['config'], cohort['wd']
  test_ids = cohort['split']['test']
  for method in ('clfc', 'baseline1'):
    summary = evaluate.evaluate_fold(config, wd.root, 0, method)
    assert summary['n'] == len(test_ids) and set(summary['regions']) == {'wt', 'tc', 'et'}
    out = wd.eval_dir(method, 0)
    for region in ('wt', 'tc', 'et'):
      with open(out / external.csv_name(region), newline='') as f:
        rows = list(csv.DictReader(f))
      assert sorted(r['patient'] for r in rows) == sorted(test_ids)
      assert 'lesion_dice' in rows[0] and 'lesion_hd95' in rows[0]
    for case_id in test_ids:
      pred = np.asarray(nib.load(out / 'predictions' / f'{case_id}_seg.nii.gz').dataobj)
      assert set(np.unique(pred)) <= set(labels.allowed_labels('brats2021'))
      masks = labels.region_masks(pred, 'brats2021')
      assert not (masks[..., 2] & ~masks[..., 1]).any()
      assert not (masks[..., 1] & ~masks[..., 0]).any()
      meta = store.load_prepared_meta(wd.prep_cases, case_id)
      truth = labels.region_masks(np.asarray(nib.load(meta['label_file']).dataobj), 'brats2021')
      with open(out / external.csv_name('et'), newline='') as f:
        et = {r['patient']: r for r in csv.DictReader(f)}
      assert float(et[case_id]['dice']) == pytest.approx(
          metrics.dice(masks[..., 2], truth[..., 2]), rel=1e-9)
  paths = report_page.write_report(config, wd.root, ['clfc', 'baseline1'], [0],
                                   with_figures=False)
  text = paths['index'].read_text()
  for title in ('Table 1, WT', 'Table 1, TC', 'Table 1, ET'):
    assert title in text
  assert text.count('Lesion Dice (%)') == 3
  for region in ('wt', 'tc', 'et'):
    with open(paths[f'table1_{region}_csv'], newline='') as f:
      rows = {r['method']: r for r in csv.DictReader(f)}
    assert set(rows) == {'clfc', 'baseline1'}
    assert 0.0 <= float(rows['baseline1']['p']) <= 1.0
  with open(paths['table1_md'].with_suffix('.csv'), newline='') as f:
    assert {r['region'] for r in csv.DictReader(f)} == {'wt', 'tc', 'et'}
