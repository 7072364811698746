"""The segmentation training loop: resumable, logged, sharded over every device of every host.

`train_and_evaluate` trains one (method, fold) into WORKDIR/runs/<method>/fold<k>/:
  checkpoints/   orbax: the latest train.keep_checkpoints epochs + the best by val_dice
  events.*       TensorBoard (every loss term, lr, grad norm, steps/s, val Dice)
  metrics.jsonl  one JSON object per log event (train window, val, checkpoint, divergence)
  config.json    the resolved config;  summary.json  written last: the run is done.

Exact resume and NaN stops: see train/loop.py (shared with the IntroVAE's loop).

Multi-host: every process draws its own rows of each global batch (input_pipeline), the
global batch is sharded over the 'data' mesh axis; logs are written by process 0 only, while checkpoints are
written by every process together (orbax). Validation: every process predicts the WHOLE val
split (no cross-host gather of per-patient volumes; val is ~10% of the training patients).
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from clfc_jax import checkpoints as checkpoints_lib
from clfc_jax import input_pipeline
from clfc_jax import metrics as metrics_lib
from clfc_jax import run_log
from clfc_jax import sharding as sharding_lib
from clfc_jax.train import loop
from clfc_jax.train import steps as train_lib
from clfc_jax import workdir as workdir_lib
from clfc_jax.workdir import Workdir
from data_prep import labels

SUMMARY_NAME = 'summary.json'
METRICS_NAME = run_log.METRICS_NAME
# Loss terms first, so TrainingDiverged names the term that went bad rather than the sum.
_TERM_ORDER = ('dice_loss', 'ce', 'sim', 'loss', 'grad_norm', 'lr')
# config.train keys that only the loop reads: changing them does not change a compiled step.
_LOOP_ONLY_KEYS = ('log_every_steps', 'nan_check_every_steps', 'checkpoint_every_epochs',
                   'eval_every_epochs', 'keep_checkpoints', 'distributed', 'coordinator_address',
                   'num_processes', 'process_id')


class TrainingDiverged(loop.Diverged):
  """A loss term became NaN/Inf at `step`; the checkpoints on disk are all from before it."""
  HINT = 'lower train.lr or train.clip_norm, or check the input data'


epoch_seed = run_log.epoch_seed


# --- compiled steps -----------------------------------------------------------------------------

@functools.cache
def _compiled_steps(step_config: ml_collections.FrozenConfigDict, mesh,
                    total_steps) -> train_lib.StepFns:
  config = step_config.as_configdict()
  cheap = config.train.cheap_cpu_compile and jax.default_backend() == 'cpu'
  return train_lib.make_jitted_steps(
      config, mesh, total_steps=total_steps,
      compiler_options=train_lib.CHEAP_CPU_COMPILE if cheap else None)


def jitted_steps(config, mesh, total_steps) -> train_lib.StepFns:
  """Compiled steps, reused by later calls with the same config in this process (other folds,
  a resumed run), since compiling dominates short runs; keys that only the loop reads do not
  make new ones."""
  step_config = config.copy_and_resolve_references()
  with step_config.unlocked():   # the command line hands over a locked config
    for name in _LOOP_ONLY_KEYS:
      if name in step_config.train:
        del step_config.train[name]
  return _compiled_steps(ml_collections.FrozenConfigDict(step_config), mesh, total_steps)


def _host_rows(x, mesh) -> np.ndarray:
  """This process's rows of a data-sharded output (all rows on a single host)."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, jax.sharding.PartitionSpec(sharding_lib.DATA_AXIS)))


# --- validation ---------------------------------------------------------------------------------

def patient_dice(config, data_dir, fold, eval_fn, variables, mesh, split='val') -> dict:
  """{patient: Dice} over the prepared (MNI-space) slices of `split`: the WT Dice, or with
  task.regions 'wt_tc_et' the mean of the WT, TC and ET Dice (the model-selection score)."""
  return {p: float(np.mean(d)) for p, d in patient_region_dice(
      config, data_dir, fold, eval_fn, variables, mesh, split).items()}


def patient_region_dice(config, data_dir, fold, eval_fn, variables, mesh, split='val',
                        records=None) -> dict:
  """{patient: [Dice per region of task.regions]} over the prepared slices of `split`.

  Every slice prediction is placed at its slice index in the patient's volume; Dice is then
  metrics.dice of the assembled volumes (slices not written to the shards have no brain).
  Prediction and label are nested level maps (region r is level > r; for 'wt' the binary map).
  """
  n_regions = len(labels.region_names(config))
  names = ('image', 'normal') if config.model.use_normal_net else ('image',)
  volumes = {}
  for host in input_pipeline.eval_iterator(
      config, data_dir, fold, split, int(config.train.val_batch_size), process_index=0,
      process_count=1, records=records):
    out = eval_fn(variables, sharding_lib.global_batch({k: host[k] for k in names}, mesh))
    pred = _host_rows(out['pred'], mesh)
    for i in np.flatnonzero(host['valid']):
      slices = volumes.setdefault(host['patient'][i].decode(), {})
      s = int(host['slice'][i])
      if s in slices:
        raise ValueError(f'{data_dir}: slice {s} of {host["patient"][i]!r} appears twice in '
                         f'the {split} split')
      slices[s] = (pred[i], host['label'][i])
  dice = {}
  for patient, slices in sorted(volumes.items()):
    order = sorted(slices)
    pred = np.stack([slices[s][0] for s in order])
    truth = np.stack([slices[s][1] for s in order])
    dice[patient] = [metrics_lib.dice(pred > r, truth > r) for r in range(n_regions)]
  return dice


# --- checkpoints ----------------------------------------------------------------------------------

def _root_key(config):
  return jax.random.key(int(config.seed), impl=config.train.get('rng_impl', None))


def abstract_state(config, mesh):
  """The TrainState's shapes and dtypes, replicated over `mesh` (the restore target)."""
  init = functools.partial(train_lib.create_train_state, config,
                           tx=train_lib.make_optimizer(config))
  abstract = jax.eval_shape(init, _root_key(config))
  repl = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)


def restore_state(config, run_dir, *, best: bool = True, mesh=None):
  """(TrainState, step, extra) of a run's best checkpoint (by validation Dice; the latest, with
  a warning, when none carries it) or, with best=False, its latest; replicated over `mesh`."""
  mesh = mesh or sharding_lib.make_mesh()
  directory = Path(run_dir) / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{directory}: no checkpoints (train {config.method!r} on this fold '
                            'first)')
  with checkpoints_lib.Checkpointer(directory, max_to_keep=int(config.train.keep_checkpoints)
                                    ) as ckpt:
    step = ckpt.best_step() if best else None
    if step is None:
      step = ckpt.latest_step()
      if step is None:
        raise FileNotFoundError(f'{directory}: no complete checkpoint')
      if best:
        logging.warning('%s: no checkpoint carries validation metrics; using the latest '
                        '(step %d)', directory, step)
    state, extra = ckpt.restore(step, abstract_state(config, mesh))
  return state, int(step), extra


# --- the loop -----------------------------------------------------------------------------------

def _read_summary(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _val_examples(config, data_dir, fold) -> int:
  try:
    n = input_pipeline.num_examples(config, data_dir, fold, 'val')
  except (KeyError, ValueError):   # tfrecord.DatasetError: no split 'val'.
    n = 0
  if not n:
    raise ValueError(f'{data_dir}: fold {fold} has no val split to select the model on '
                     f'(data.val_fraction={config.data.val_fraction}); the test fold is never '
                     'used for that')
  return n


def train_and_evaluate(config, workdir, fold: int, *, stop_after_epochs: Optional[int] = None,
                       batch_hook: Optional[Callable[[dict, int], dict]] = None,
                       data_dir=None) -> dict:
  """Trains fold `fold` (its 'train' split), validates on its 'val' split; returns a summary.

  Resumes from the latest checkpoint; a run whose summary.json exists is not run again.
  stop_after_epochs: return (status 'stopped', checkpoint saved) after this many epochs of THIS
    call, as if preempted. batch_hook(host_batch, step) -> host_batch: a test seam applied to
    every host-local training batch before it goes to the devices (e.g. to inject a NaN).
  data_dir: the TFDS directory, default WORKDIR/tfds.
  Summary: status ('done' | 'stopped' | 'already done'), best_val_dice, best_step,
    epochs_run (this call), epochs_done, final_step, seconds.
  Raises TrainingDiverged on a non-finite loss (the bad state is never saved).
  """
  start_time = time.time()
  t = config.train
  if t.distributed and not jax.distributed.is_initialized():
    sharding_lib.maybe_initialize_distributed(config)
  wd = Workdir(workdir)
  out_dir = wd.run_dir(config.method, fold)
  summary_path = out_dir / SUMMARY_NAME
  done = _read_summary(summary_path)
  if done is not None:
    logging.info('%s: already trained (%s)', out_dir, SUMMARY_NAME)
    return dict(done, status='already done')
  data_dir = Path(data_dir) if data_dir else wd.tfds
  is_main = jax.process_index() == 0
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(config, out_dir / workdir_lib.CONFIG_NAME)

  epochs, spe = int(t.epochs), int(t.steps_per_epoch)
  _val_examples(config, data_dir, fold)
  total_steps = train_lib.total_train_steps(config)
  mesh = sharding_lib.make_mesh()
  steps = jitted_steps(config, mesh, total_steps)
  ckpt = checkpoints_lib.Checkpointer(out_dir / 'checkpoints',
                                      max_to_keep=int(t.keep_checkpoints))
  log = run_log.RunLog(out_dir, is_main)
  try:
    state, extra, first_epoch = loop.resume(ckpt, abstract_state(config, mesh),
                                            lambda: steps.init(_root_key(config)), spe, epochs)
    history = list(extra.get('val_history', []))
    log.event('resume' if first_epoch else 'start', first_epoch * spe, epoch=first_epoch,
              processes=jax.process_count(), devices=jax.device_count())
    last_epoch = epochs if stop_after_epochs is None else min(
        epochs, first_epoch + int(stop_after_epochs))
    # One reader per split for the whole run, so that its record cache outlives the epochs.
    readers = {split: input_pipeline.fold_records(config, data_dir, fold, split)
               for split in ('train', 'val')}
    for epoch in range(first_epoch, last_epoch):
      state = _train_epoch(config, data_dir, fold, steps.train, state, epoch, mesh, log,
                           batch_hook, out_dir, ckpt, is_main, readers['train'])
      end = epoch + 1
      val = None
      if loop.every(end, t.eval_every_epochs) or end == epochs:
        val = _validate(config, data_dir, fold, steps.eval, state, mesh, log, end,
                        readers['val'])
        history.append({'epoch': end, 'step': end * spe, 'val_dice': val})
      if loop.every(end, t.checkpoint_every_epochs) or end in (epochs, last_epoch):
        ckpt.save(end * spe, state, metrics=None if val is None else {'val_dice': val},
                  extra={'epoch': end, 'val_history': history})
        log.event('checkpoint', end * spe, epoch=end)
    ckpt.wait()
    best_step = ckpt.best_step()
    best = [h for h in history if h['step'] == best_step]
    summary = {
        'status': 'done' if last_epoch == epochs else 'stopped',
        'best_val_dice': best[0]['val_dice'] if best else None,
        'best_step': best_step, 'epochs_run': last_epoch - first_epoch,
        'epochs_done': last_epoch, 'final_step': last_epoch * spe,
        'seconds': round(time.time() - start_time, 2)}
    log.event('summary', last_epoch * spe, **summary)
  finally:
    ckpt.close()
    log.close()
  loop.write_summary_if_done(summary_path, summary, is_main)
  return summary


def _train_epoch(config, data_dir, fold, train_fn, state, epoch, mesh, log, batch_hook,
                 out_dir, ckpt, is_main, records=None):
  """One epoch of steps on the stream of `epoch_seed(config.seed, epoch)` (see loop.run_epoch).

  The iterator's whole state is the epoch number (its batches are a pure function of the
  seed and the step within the epoch), which the checkpoint's `extra` holds.
  """
  t = config.train
  it = input_pipeline.train_iterator(
      config, data_dir, fold, global_batch_size=int(t.batch_size),
      seed=epoch_seed(config.seed, epoch), records=records)
  with contextlib.closing(it):
    state, _ = loop.run_epoch(
        train_fn, state, it, epoch=epoch, num_epochs=int(t.epochs),
        steps_per_epoch=int(t.steps_per_epoch), fields=train_lib.BATCH_INPUTS, mesh=mesh,
        log=log, log_every=t.log_every_steps, check_every=t.get('nan_check_every_steps', 1),
        diverged=lambda step, bad: TrainingDiverged(step, bad, out_dir, ckpt.latest_step()),
        params_of=lambda s: s.params, term_order=_TERM_ORDER, tb_prefix='train',
        desc=f'{config.method} fold{fold} epoch', postfix=lambda m: {'loss': f'{m["loss"]:.4f}'},
        batch_hook=batch_hook, is_main=is_main)
  return state


def _validate(config, data_dir, fold, eval_fn, state, mesh, log, epoch, records=None) -> float:
  start = time.perf_counter()
  dice = patient_region_dice(config, data_dir, fold, eval_fn, state.variables, mesh,
                             records=records)
  if not dice:
    raise ValueError(f'{data_dir}: fold {fold} has an empty val split (data.val_fraction)')
  per_region = np.mean(list(dice.values()), axis=0)
  val = float(np.mean(per_region))   # the mean region Dice selects the best checkpoint.
  scalars = {'val_dice': val}
  regions = labels.region_names(config)
  if len(regions) > 1:
    scalars.update({f'val_dice_{r}': float(d) for r, d in zip(regions, per_region)})
  step = epoch * int(config.train.steps_per_epoch)
  log.event('val', step, scalars, tb_prefix='val', epoch=epoch,
            patients=len(dice), seconds=round(time.perf_counter() - start, 2))
  logging.info('%s fold%d epoch %d: val Dice %.4f over %d patients', config.method, fold,
               epoch, val, len(dice))
  return val
