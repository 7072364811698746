"""Normal-appearance pipeline: IntroVAE training (logs, checkpoints, resume, NaN), pseudo-normal
volumes (format, matching, resume), fidelity report, pseudo-normal tumor shards."""
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from benchmarks.pipeline import toy_prepared_cohort
from clfc_jax import fidelity
from clfc_jax import pseudo_normal
from clfc_jax.train import introvae_steps as introvae_train
from clfc_jax.train import introvae_trainer as trainer
from clfc_jax.workdir import Workdir
from configs import default
from data_prep import folds, normalize, shards, store, tfds_builders

MODS = ('t1', 'flair')
Z, HW = 12, (32, 32)


def tiny_config(epochs=1):
  c = default.get_config()
  c.prep.crop_hw = HW
  c.dataset.modalities = MODS
  c.data.num_folds = 3
  c.data.val_fraction = 0.3
  c.introvae.channels = (8, 16)
  c.introvae.latent_dim = 16
  c.introvae.batch_size = 8
  c.introvae.epochs = epochs
  c.introvae.steps_per_epoch = 2
  c.introvae.log_every_steps = 1
  c.introvae.num_samples = 3
  c.introvae.recon_batch_size = 6   # rounds up to 8 on 4 devices: padding is exercised.
  c.introvae.cheap_cpu_compile = True
  return c


def _add_healthy_t1(cases_dir, case_id):
  """Re-saves a toy tumor case with a healthy T1: the tumor filled with the normal-brain mean."""
  pc = store.load_prepared(cases_dir, case_id)
  t1 = pc.modality('t1')
  tumor = pc.label > 0
  healthy = np.where(tumor, t1[pc.brain & ~tumor].mean(), t1) * pc.brain
  pc.healthy_t1 = healthy.astype(np.float32)
  store.save_prepared(pc, cases_dir)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
  """A toy prepared cohort (3 tumor cases with healthy T1s, 2 normal subjects), normal shards,
  an IntroVAE trained 1 epoch, rerun, then extended to 2 epochs (resume)."""
  wd = Workdir(tmp_path_factory.mktemp('work'))
  ids = toy_prepared_cohort(wd.prep, num_cases=3, num_normal=2, z=Z, hw=HW, modalities=MODS)
  for cid in ids:
    _add_healthy_t1(wd.prep_cases, cid)
  c = tiny_config(epochs=1)
  tfds_builders.build(tfds_builders.normal_t1_builder(c, wd.tfds, fold=0, prep_dir=wd.prep))
  first = trainer.train_introvae(c, wd)
  again = trainer.train_introvae(c, wd)
  events_before = (wd.introvae / trainer.METRICS_NAME).read_text().splitlines()
  longer = trainer.train_introvae(tiny_config(epochs=2), wd)
  return {'wd': wd, 'ids': ids, 'first': first, 'again': again, 'longer': longer,
          'events_before': events_before}


def _events(wd):
  return [json.loads(line) for line in (wd.introvae / trainer.METRICS_NAME).read_text().splitlines()]


def test_training_writes_checkpoints_logs_and_samples(work):
  wd, first = work['wd'], work['first']
  assert first['status'] == 'done' and first['epochs_run'] == 1 and first['final_step'] == 2
  assert first['batch_size'] == 8 and first['num_normal_slices'] > 8
  assert set(first['final']) >= {'enc/loss', 'dec/loss', 'enc/kl_real', 'dec/rec'}
  assert all(np.isfinite(v) for v in first['final'].values())
  train = [e for e in _events(wd) if e['event'] == 'train']
  assert [e['step'] for e in train][:2] == [1, 2]
  assert list(wd.introvae.glob('events.out.tfevents*'))
  assert (wd.introvae / 'checkpoints' / '2').is_dir()
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  png = matplotlib.image.imread(wd.introvae / trainer.SAMPLES_NAME)
  assert png.ndim == 3 and png.shape[0] > 50 and png.std() > 0.01
  assert json.loads((wd.introvae / trainer.SUMMARY_NAME).read_text())['final_step'] == 4


def test_rerun_resumes_instead_of_retraining(work):
  again, longer = work['again'], work['longer']
  assert again['epochs_run'] == 0 and again['final_step'] == 2
  assert again['final'] == work['first']['final']
  train_before = [e for e in work['events_before'] if '"event": "train"' in e]
  assert len(train_before) == 2   # the rerun trained no step.
  assert longer['epochs_run'] == 1 and longer['epochs_done'] == 2 and longer['final_step'] == 4
  events = _events(work['wd'])
  resumes = [e for e in events if e['event'] == 'resume']
  assert [e['step'] for e in resumes] == [2, 2]
  assert [e['step'] for e in events if e['event'] == 'train'] == [1, 2, 3, 4]
  assert sorted(int(p.name) for p in (work['wd'].introvae / 'checkpoints').iterdir()
                if p.name.isdigit()) == [2, 4]


def test_resumed_training_equals_an_uninterrupted_run(work, tmp_path):
  src = work['wd']
  wd = Workdir(tmp_path)
  os.symlink(src.prep, wd.prep)
  os.symlink(src.tfds, wd.tfds)
  straight = trainer.train_introvae(tiny_config(epochs=2), wd)
  assert straight['epochs_run'] == 2 and straight['final_step'] == 4
  c = tiny_config(epochs=2)
  a, b = trainer.restore_introvae(c, src.introvae), trainer.restore_introvae(c, wd.introvae)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_epoch_stream_depends_only_on_seed_and_epoch():
  assert trainer.epoch_seed(0, 3) == trainer.epoch_seed(0, 3)
  assert len({trainer.epoch_seed(0, e) for e in range(5)} | {trainer.epoch_seed(1, 0)}) == 6
  assert trainer.round_batch(120, 8) == 120 and trainer.round_batch(10, 4) == 8 and trainer.round_batch(2, 4) == 4


@pytest.fixture(scope='module')
def pseudo(work):
  wd = work['wd']
  c = tiny_config(epochs=2)
  summary = pseudo_normal.make_pseudo_normals(c, wd)
  mtimes = {p.name: p.stat().st_mtime_ns for p in wd.pseudo_normal.glob('*.npz')}
  rerun = pseudo_normal.make_pseudo_normals(c, wd, build_shards=False)
  return {'summary': summary, 'rerun': rerun, 'mtimes': mtimes, 'config': c}


def test_pseudo_normals_one_file_per_case_in_unit_range(work, pseudo):
  wd = work['wd']
  assert pseudo['summary']['written'] == 3 and pseudo['summary']['cases'] == 3
  assert sorted(p.stem for p in wd.pseudo_normal.glob('*.npz')) == sorted(work['ids'])
  for cid in work['ids']:
    pc = store.load_prepared(wd.prep_cases, cid)
    with np.load(wd.pseudo_normal / f'{cid}.npz') as z:
      t1 = z['t1']
    assert t1.shape == (Z,) + HW and t1.dtype == np.float16
    assert t1.min() >= -1 and t1.max() <= 1
    assert np.all(t1[~pc.brain] == -1)
    assert np.std(t1[pc.brain].astype(np.float32)) > 0


def test_pseudo_normal_is_the_mu_reconstruction_of_the_matched_t1(work, pseudo):
  wd, c = work['wd'], pseudo['config']
  cid = work['ids'][0]
  pc = store.load_prepared(wd.prep_cases, cid)
  landmarks = normalize.normal_t1_reference(wd.prep, c, 0)
  unit = normalize.to_unit_range(normalize.apply_reference(pc.modality('t1'), pc.brain,
                                                           landmarks, c), pc.brain, c)
  state = trainer.restore_introvae(c, wd.introvae)
  assert int(state.step) == 4
  enc, dec = jax.device_get((state.enc_params, state.dec_params))
  s = Z // 2
  expected = np.asarray(introvae_train.reconstruct(enc, dec, unit[s][None, ..., None], c))[0, ..., 0]
  expected = np.where(pc.brain[s], expected, -1.0)
  with np.load(wd.pseudo_normal / f'{cid}.npz') as z:
    np.testing.assert_allclose(z['t1'][s].astype(np.float32), expected, atol=2e-3)


def test_pseudo_normals_resume_without_rewriting(work, pseudo):
  rerun = pseudo['rerun']
  assert rerun['written'] == 0 and rerun['skipped'] == 3
  now = {p.name: p.stat().st_mtime_ns for p in work['wd'].pseudo_normal.glob('*.npz')}
  assert now == pseudo['mtimes']


def test_fidelity_report_fields(work, pseudo):
  wd = work['wd']
  record = json.loads((wd.pseudo_normal / 'fidelity.json').read_text())
  assert record['n'] == 3 and len(record['cases']) == 3 and record['cases_with_tumor'] == 3
  for row in record['cases']:
    assert row['tumor_voxels'] > 0
    for field in fidelity.FIELDS:
      assert np.isfinite(row[field]) and (row[field] >= 0 if field.startswith('mae') else
                                          -1 <= row[field] <= 1)
    # The toy tumor is the only difference between tumor and healthy T1.
    assert row['mae_tumor_input'] > 0.05
  assert record['mean']['mae_tumor_input'] == pytest.approx(
      np.mean([r['mae_tumor_input'] for r in record['cases']]))
  assert 0 <= record['tumor_closer'] <= 3
  assert record['verdict'].startswith(('PASS', 'FAIL'))
  assert pseudo['summary']['fidelity'] == record['mean']
  text = (wd.pseudo_normal / 'fidelity.md').read_text()
  assert '| **mean** |' in text and record['verdict'] in text


def test_shards_carry_the_pseudo_normal_stacks(work, pseudo):
  wd, c = work['wd'], pseudo['config']
  assert pseudo['summary']['shards'][shards.ALL_SPLIT] > 0
  builder = tfds_builders.pseudo_normal_builder(c, wd.tfds, None)
  assert builder.is_prepared()
  ex = next(iter(builder.as_dataset(split=shards.ALL_SPLIT).as_numpy_iterator()))
  assert ex['has_pseudo_normal']
  with np.load(wd.pseudo_normal / f'{ex["patient"].decode()}.npz') as z:
    centre = z['t1'][int(ex['slice'])]
  np.testing.assert_array_equal(ex['normal'], centre)


def test_nan_in_training_raises_a_clear_error(work, tmp_path):
  src = work['wd']
  wd = Workdir(tmp_path)
  os.symlink(src.prep, wd.prep)
  os.symlink(src.tfds, wd.tfds)

  def poison(batch, step):
    return {'image': np.full_like(batch['image'], np.nan)} if step == 1 else batch

  with pytest.raises(trainer.IntroVAEDiverged, match='non-finite .*enc/loss') as info:
    trainer.train_introvae(tiny_config(epochs=1), wd, batch_hook=poison)
  assert info.value.step == 1 and info.value.last_good_step is None
  assert not (wd.introvae / trainer.SUMMARY_NAME).exists()
  assert not [p for p in (wd.introvae / 'checkpoints').iterdir() if p.name.isdigit()]
  assert any(e['event'] == 'diverged' for e in _events(wd))


def test_pseudo_normals_need_a_trained_introvae(tmp_path):
  wd = Workdir(tmp_path)
  toy_prepared_cohort(wd.prep, num_cases=1, num_normal=1, z=Z, hw=HW, modalities=MODS)
  with pytest.raises(FileNotFoundError, match='introvae stage'):
    pseudo_normal.make_pseudo_normals(tiny_config(), wd)


def test_without_a_normal_cohort_each_fold_trains_its_own_introvae(tmp_path):
  """The fallback: fold k's IntroVAE, T1 reference and pseudo-normals come from fold k's
  training patients only, so no test patient of any fold reaches the IntroVAE of its fold
  (before: fold 0's IntroVAE, trained on folds 1-4's test patients, served every fold)."""
  wd = Workdir(tmp_path)
  ids = toy_prepared_cohort(wd.prep, num_cases=6, num_normal=0, z=Z, hw=HW, modalities=MODS)
  c = tiny_config(epochs=1)
  c.fold = -1
  c.data.tumor_free_margin = 0
  assert not wd.has_normal_cohort()
  assert wd.introvae_keys(c) == [0, 1, 2]
  for k in (0, 2):
    tfds_builders.build(tfds_builders.normal_t1_builder(c, wd.tfds, fold=k, prep_dir=wd.prep))
    test_ids = set(folds.prepared_split(wd.prep, c, k)['test'])
    slices = tfds.as_numpy(tfds_builders.normal_t1_builder(c, wd.tfds, fold=k).as_dataset(
        split='train'))
    seen = {ex['patient'].decode() for ex in slices}
    assert seen and not seen & test_ids, (k, seen, test_ids)
    summary = trainer.train_introvae(c, wd, k)
    assert summary['fold'] == k and (wd.introvae_dir(k) / trainer.SUMMARY_NAME).exists()
    pseudo_normal.make_pseudo_normals(c, wd, k, build_shards=False)
    assert sorted(p.stem for p in wd.pseudo_normal_dir(k).glob('*.npz')) == sorted(ids)
    assert normalize.normal_reference_path(wd.prep, k).exists()
  assert not (wd.introvae / trainer.SUMMARY_NAME).exists()
  assert not list(wd.pseudo_normal.glob('*.npz'))   # nothing shared between folds
  assert not wd.introvae_dir(1).exists()


def test_with_a_normal_cohort_one_introvae_serves_every_fold(work):
  c = tiny_config()
  c.fold = -1
  assert work['wd'].has_normal_cohort() and work['wd'].introvae_keys(c) == [None]
  assert work['wd'].introvae_dir(work['wd'].introvae_key(2)) == work['wd'].introvae
