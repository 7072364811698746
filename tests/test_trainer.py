"""The training loop on a tiny real dataset and model: files, exact resume, NaN stop, val Dice.

baseline1 (no normal-appearance net) keeps XLA:CPU compiles short; the CLFC step itself is
tested in test_train_step.py. Steps compile once per process (the trainer caches them).
"""
import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from benchmarks.pipeline import toy_prepared_cohort
from clfc_jax import checkpoints, input_pipeline, run_log, sharding
from clfc_jax.train import trainer
from clfc_jax.workdir import Workdir
from data_prep import tfds_builders
from compiles import xla_compiles
from tiny_configs import tiny_train_config

import no_tensorflow

FOLD = 0
REPO = Path(__file__).resolve().parents[1]


def _run_dir(workdir, c):
  return Workdir(workdir).run_dir(c.method, FOLD)


def tiny_config():
  return tiny_train_config()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  toy_prepared_cohort(root / 'prep', num_cases=6, z=8, seed=1)
  tfds_builders.build(tfds_builders.tumor_slices_builder(tiny_config(), root / 'tfds'))
  return root / 'tfds'


def _final_state(c, workdir):
  state, _, extra = trainer.restore_state(c, _run_dir(workdir, c), best=False)
  return jax.device_get(state), extra


def _tensorboard_tags(directory) -> set:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in directory.glob('events.out.tfevents.*'):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      tags.update(v.tag for v in event_pb2.Event.FromString(record).summary.value)
  return tags


def _events(workdir, c):
  path = _run_dir(workdir, c) / trainer.METRICS_NAME
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
  c = tiny_config()
  workdir = tmp_path_factory.mktemp('straight')
  summary = trainer.train_and_evaluate(c, workdir, FOLD, data_dir=data_dir)
  return c, workdir, summary


def test_run_writes_checkpoints_logs_and_summary(uninterrupted, data_dir):
  c, workdir, summary = uninterrupted
  spe = c.train.steps_per_epoch
  assert summary['status'] == 'done' and summary['epochs_run'] == 2
  assert summary['final_step'] == 2 * spe
  assert 0.0 <= summary['best_val_dice'] <= 1.0 and summary['best_step'] in (spe, 2 * spe)
  out = _run_dir(workdir, c)
  assert out == workdir / 'runs' / 'baseline1' / 'fold0'
  assert json.loads((out / trainer.SUMMARY_NAME).read_text())['final_step'] == 2 * spe
  assert {'train/loss', 'train/dice_loss', 'train/ce', 'train/sim', 'train/lr', 'train/grad_norm',
          'train/steps_per_s', 'val/val_dice'} <= _tensorboard_tags(out)
  events = _events(workdir, c)
  kinds = [e['event'] for e in events]
  assert kinds[0] == 'start' and kinds[-1] == 'summary'
  assert kinds.count('val') == 2 and kinds.count('checkpoint') == 2
  train_logs = [e for e in events if e['event'] == 'train']
  # Logged every 2 (global) steps and at each epoch's end.
  assert [e['step'] for e in train_logs] == [2, 3, 4, 6]
  for e in train_logs:
    for key in ('loss', 'dice_loss', 'ce', 'sim', 'lr', 'grad_norm', 'steps_per_s'):
      assert np.isfinite(e[key]), key
  vals = [e for e in events if e['event'] == 'val']
  n_val_patients = len({p for b in input_pipeline.eval_iterator(c, data_dir, FOLD, 'val', 8)
                        for p, v in zip(b['patient'], b['valid']) if v})
  assert all(e['patients'] == n_val_patients > 0 for e in vals)
  assert summary['best_val_dice'] == max(e['val_dice'] for e in vals)
  with checkpoints.Checkpointer(out / 'checkpoints', max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [spe, 2 * spe]


def test_a_finished_run_is_not_run_again(uninterrupted):
  c, workdir, summary = uninterrupted
  n_events = len(_events(workdir, c))
  again = trainer.train_and_evaluate(c, workdir, FOLD)   # no data_dir: it must not be read.
  assert again['status'] == 'already done'
  assert again['final_step'] == summary['final_step']
  assert len(_events(workdir, c)) == n_events


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(uninterrupted, data_dir,
                                                               tmp_path):
  c, straight_dir, _ = uninterrupted
  first = trainer.train_and_evaluate(c, tmp_path, FOLD, stop_after_epochs=1, data_dir=data_dir)
  assert first['status'] == 'stopped' and first['final_step'] == c.train.steps_per_epoch
  assert not (_run_dir(tmp_path, c) / trainer.SUMMARY_NAME).exists()
  # XLA compilations while resuming: a restored state that differed from a fresh one in
  # sharding, dtype or weak type would compile the train step again.
  with xla_compiles() as compiles:
    second = trainer.train_and_evaluate(c, tmp_path, FOLD, data_dir=data_dir)
  assert second['status'] == 'done' and second['epochs_run'] == 1
  assert compiles == []   # every step, checkpoint and check was compiled by the first run
  assert 'resume' in [e['event'] for e in _events(tmp_path, c)]
  resumed, _ = _final_state(c, tmp_path)
  straight, _ = _final_state(c, straight_dir)
  assert int(resumed.step) == int(straight.step) == 2 * c.train.steps_per_epoch
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed),
                          jax.tree.leaves(straight)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def test_epoch_streams_differ_and_are_seeded():
  assert trainer.epoch_seed(0, 1) == trainer.epoch_seed(0, 1)
  seeds = {trainer.epoch_seed(s, e) for s in range(3) for e in range(50)}
  assert len(seeds) == 150 and all(0 <= s < 2 ** 31 for s in seeds)


@pytest.mark.parametrize('check_every,log_every', [(1, 2), (100, 100)])
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path,
                                                                   check_every, log_every):
  c = tiny_config()
  c.train.nan_check_every_steps = check_every
  c.train.log_every_steps = log_every
  spe = c.train.steps_per_epoch
  bad_step = spe + 1     # in epoch 2, after epoch 1's checkpoint.
  seen = []

  def inject_nan(batch, step):
    seen.append(step)
    if step == bad_step:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch

  with pytest.raises(trainer.TrainingDiverged, match=f'step {bad_step}') as err:
    trainer.train_and_evaluate(c, tmp_path, FOLD, batch_hook=inject_nan, data_dir=data_dir)
  # A NaN image leaves this model's forward loss finite (XLA's max/ReLU drop NaNs) but not
  # its gradients: every metric of the step is watched, not only the loss.
  assert err.value.step == bad_step and 'grad_norm' in err.value.terms
  assert err.value.last_good_step == spe
  # Checked one step late every step; or, checking rarely, when the epoch's window is logged.
  assert seen == list(range(bad_step + 2 if check_every == 1 else 2 * spe))
  state, extra = _final_state(c, tmp_path)
  assert int(state.step) == spe and extra['epoch'] == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert [e['event'] for e in _events(tmp_path, c)][-1] == 'diverged'
  assert not (_run_dir(tmp_path, c) / trainer.SUMMARY_NAME).exists()


def test_divergence_names_the_loss_term_before_the_sum():
  nan = np.float32(np.nan)
  terms = run_log.nonfinite_terms({'loss': nan, 'grad_norm': nan, 'sim_l1': nan,
                                   'dice_loss': nan, 'ce': np.float32(0.5), 'lr': 0.01},
                                  trainer._TERM_ORDER)
  assert terms == ['dice_loss', 'sim_l1', 'loss', 'grad_norm']


def test_patient_dice_of_perfect_and_empty_predictions(data_dir):
  """Dice is assembled per patient: the label as prediction scores 1, all-background 0."""
  c = tiny_config()
  mesh = sharding.make_mesh()
  truth = {}
  for b in input_pipeline.eval_iterator(c, data_dir, FOLD, 'val', 8):
    for i in np.flatnonzero(b['valid']):
      truth[(b['patient'][i], int(b['slice'][i]))] = b['label'][i]

  def oracle(_, batch):   # the label, looked up by the image it came with.
    del batch
    return {'pred': sharding.global_batch({'x': oracle.labels.pop(0)}, mesh)['x']}

  oracle.labels = []
  for b in input_pipeline.eval_iterator(c, data_dir, FOLD, 'val', 8):
    oracle.labels.append(b['label'])
  dice = trainer.patient_dice(c, data_dir, FOLD, oracle, None, mesh)
  assert set(dice) == {p.decode() for p, _ in truth} and all(v == 1.0 for v in dice.values())

  def empty(_, batch):
    zeros = np.zeros(batch['image'].shape[:3], np.int32)
    return {'pred': sharding.global_batch({'x': zeros}, mesh)['x']}

  dice = trainer.patient_dice(c, data_dir, FOLD, empty, None, mesh)
  has_tumor = {p.decode() for (p, _), lab in truth.items() if lab.any()}
  assert has_tumor and all(dice[p] == 0.0 for p in has_tumor)


_NO_TF_TRAIN = no_tensorflow.BLOCK_TENSORFLOW + textwrap.dedent('''
  from clfc_jax.train import trainer
  from tiny_configs import tiny_train_config
  c = tiny_train_config()
  c.train.epochs, c.train.steps_per_epoch = 1, 2
  summary = trainer.train_and_evaluate(c, sys.argv[2], 0, data_dir=sys.argv[1])
  loaded = [m for m, module in sys.modules.items()
            if module is not None and m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]
  assert not loaded, loaded
  print('summary', summary['status'], summary['final_step'], summary['best_val_dice'] >= 0)
''')


def test_trains_where_tensorflow_cannot_be_imported(data_dir, tmp_path):
  """The accelerator machine has JAX but no TensorFlow: the train stage must not need it."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]))
  out = subprocess.run([sys.executable, '-c', _NO_TF_TRAIN, str(data_dir), str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, env=env, check=False,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[-4:] == ['summary', 'done', '2', 'True']
