"""The segmentation training loop: resumable, logged, sharded over every device of every host.

`train_and_evaluate` trains one (method, fold) into WORKDIR/runs/<method>/fold<k>/:
  checkpoints/   orbax: the latest train.keep_checkpoints epochs + the best by val_dice
  events.*       TensorBoard (every loss term, lr, grad norm, steps/s, val Dice)
  metrics.jsonl  one JSON object per log event (train window, val, checkpoint, divergence)
  config.json    the resolved config;  summary.json  written last: the run is done.

Exact resume: epoch e's training stream is a pure function of (config.seed, e) (the iterator
is re-created each epoch with `epoch_seed`), checkpoints sit at epoch boundaries and the
TrainState holds everything else (rng included), so a run killed after a checkpoint and
resumed ends bitwise equal to an uninterrupted one (same device count, same compiler).

Multi-host: every process reads its own part of the training split, the global batch is
sharded over the 'data' mesh axis; logs are written by process 0 only, while checkpoints are
written by every process together (orbax). Validation: every process predicts the WHOLE val
split (no cross-host gather of per-patient volumes; val is ~10% of the training patients).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from clfc_jax import checkpoints as checkpoints_lib
from clfc_jax import metrics as metrics_lib
from clfc_jax import run_log
from clfc_jax import sharding as sharding_lib
from clfc_jax import train as train_lib

SUMMARY_NAME = 'summary.json'
METRICS_NAME = run_log.METRICS_NAME
# Loss terms first, so TrainingDiverged names the term that went bad rather than the sum.
_TERM_ORDER = ('dice_loss', 'ce', 'sim', 'loss', 'grad_norm', 'lr')


class TrainingDiverged(RuntimeError):
  """A loss term became NaN/Inf at `step`; the checkpoints on disk are all from before it."""

  def __init__(self, step: int, terms, run_dir, last_good_step: Optional[int]):
    self.step, self.terms = int(step), tuple(terms)
    self.term = self.terms[0]
    self.last_good_step = last_good_step
    super().__init__(
        f'training diverged at step {self.step}: non-finite {", ".join(self.terms)}; '
        f'the last good checkpoint is step {last_good_step} in {run_dir}/checkpoints '
        '(lower train.lr or train.clip_norm, or check the input data)')


epoch_seed = run_log.epoch_seed


def run_dir(workdir, config, fold: int) -> Path:
  """WORKDIR/runs/<method>/fold<k> (ARCHITECTURE.md's workdir contract)."""
  return Path(workdir) / 'runs' / config.method / f'fold{int(fold)}'


# --- compiled steps -----------------------------------------------------------------------------

_STEP_CACHE = {}
# config.train keys that only the loop reads: changing them does not change a compiled step.
_LOOP_ONLY_KEYS = ('log_every_steps', 'nan_check_every_steps', 'checkpoint_every_epochs',
                   'eval_every_epochs', 'keep_checkpoints', 'distributed', 'coordinator_address',
                   'num_processes', 'process_id')


def _steps(config, mesh, total_steps) -> train_lib.StepFns:
  """Compiled steps, reused by later calls with the same config in this process (other folds,
  a resumed run), since compiling dominates short runs."""
  step_config = config.copy_and_resolve_references()
  with step_config.unlocked():   # the command line hands over a locked config
    for name in _LOOP_ONLY_KEYS:
      if name in step_config.train:
        del step_config.train[name]
  key = (step_config.to_json_best_effort(), tuple(d.id for d in mesh.devices.flat), total_steps)
  if key not in _STEP_CACHE:
    cheap = config.train.cheap_cpu_compile and jax.default_backend() == 'cpu'
    _STEP_CACHE[key] = train_lib.make_jitted_steps(
        config, mesh, total_steps=total_steps,
        compiler_options=train_lib.CHEAP_CPU_COMPILE if cheap else None)
  return _STEP_CACHE[key]


def _device_fields(host_batch, names) -> dict:
  return {k: host_batch[k] for k in names if k in host_batch}


def _host_rows(x, mesh) -> np.ndarray:
  """This process's rows of a data-sharded output (all rows on a single host)."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, jax.sharding.PartitionSpec(sharding_lib.DATA_AXIS)))


# --- validation ---------------------------------------------------------------------------------

def patient_dice(config, data_dir, fold, eval_fn, variables, mesh, split='val') -> dict:
  """{patient: Dice (WT)} over the prepared (MNI-space) slices of `split`.

  Every slice prediction is placed at its slice index in the patient's volume; Dice is then
  metrics.dice of the assembled volumes (slices not written to the shards have no brain).
  """
  from clfc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  names = ('image', 'normal') if config.model.use_normal_net else ('image',)
  volumes = {}
  for host in input_pipeline.eval_iterator(config, data_dir, fold, split,
                                           int(config.train.val_batch_size), process_index=0,
                                           process_count=1):
    out = eval_fn(variables, sharding_lib.global_batch(_device_fields(host, names), mesh))
    pred = _host_rows(out['pred'], mesh)
    for i in np.flatnonzero(host['valid']):
      slices = volumes.setdefault(host['patient'][i].decode(), {})
      s = int(host['slice'][i])
      if s in slices:
        raise ValueError(f'{data_dir}: slice {s} of {host["patient"][i]!r} appears twice in '
                         f'the {split} split')
      slices[s] = (pred[i] > 0, host['label'][i] > 0)
  dice = {}
  for patient, slices in sorted(volumes.items()):
    order = sorted(slices)
    dice[patient] = metrics_lib.dice(np.stack([slices[s][0] for s in order]),
                                     np.stack([slices[s][1] for s in order]))
  return dice


# --- the loop -----------------------------------------------------------------------------------

def _read_summary(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def restore_state(config, workdir, fold: int, *, best: bool = True, mesh=None):
  """(TrainState, extra) of a run's best (or latest) checkpoint, replicated over `mesh`."""
  mesh = mesh or sharding_lib.make_mesh()
  directory = run_dir(workdir, config, fold) / 'checkpoints'
  if not directory.exists():
    raise FileNotFoundError(f'{directory}: no checkpoints (train first)')
  abstract = _abstract_state(config, mesh)
  with checkpoints_lib.Checkpointer(directory, max_to_keep=int(config.train.keep_checkpoints)
                                    ) as ckpt:
    restored = ckpt.restore_best(abstract) if best else ckpt.restore_latest(abstract)
  if restored is None:
    raise FileNotFoundError(f'{directory}: no {"best" if best else "latest"} checkpoint')
  return restored


def _abstract_state(config, mesh):
  init = functools.partial(train_lib.create_train_state, config,
                           tx=train_lib.make_optimizer(config))
  abstract = jax.eval_shape(init, _root_key(config))
  repl = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)


def _every(epoch: int, interval) -> bool:
  """Whether `epoch` (1-based) is a multiple of `interval`; 0 or less: never (only the end)."""
  return int(interval) > 0 and epoch % int(interval) == 0


def _val_examples(config, data_dir, fold) -> int:
  from clfc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    n = input_pipeline.num_examples(config, data_dir, fold, 'val')
  except (KeyError, ValueError):   # tfds: "Unknown split 'val'".
    n = 0
  if not n:
    raise ValueError(f'{data_dir}: fold {fold} has no val split to select the model on '
                     f'(data.val_fraction={config.data.val_fraction}); the test fold is never '
                     'used for that')
  return n


def _root_key(config):
  return jax.random.key(int(config.seed), impl=config.train.get('rng_impl', None))


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
  out_dir = run_dir(workdir, config, fold)
  summary_path = out_dir / SUMMARY_NAME
  done = _read_summary(summary_path)
  if done is not None:
    logging.info('%s: already trained (%s)', out_dir, SUMMARY_NAME)
    return dict(done, status='already done')
  data_dir = Path(data_dir) if data_dir else Path(workdir) / 'tfds'
  is_main = jax.process_index() == 0
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'config.json').write_text(config.to_json_best_effort(indent=1))

  epochs, spe = int(t.epochs), int(t.steps_per_epoch)
  _val_examples(config, data_dir, fold)
  total_steps = train_lib.total_train_steps(config)
  mesh = sharding_lib.make_mesh()
  steps = _steps(config, mesh, total_steps)
  ckpt = checkpoints_lib.Checkpointer(out_dir / 'checkpoints',
                                      max_to_keep=int(t.keep_checkpoints))
  log = run_log.RunLog(out_dir, is_main)
  try:
    restored = ckpt.restore_latest(_abstract_state(config, mesh))
    if restored is None:
      state, extra = steps.init(_root_key(config)), {}
    else:
      state, extra = restored
    first_epoch = int(extra.get('epoch', 0))
    history = list(extra.get('val_history', []))
    if int(state.step) != first_epoch * spe:
      raise ValueError(f'{ckpt.directory}: checkpoint at step {int(state.step)} is not the end '
                       f'of epoch {first_epoch} ({spe} steps per epoch): the config changed?')
    log.event('resume' if restored else 'start', first_epoch * spe, epoch=first_epoch,
              processes=jax.process_count(), devices=jax.device_count())
    last_epoch = epochs if stop_after_epochs is None else min(
        epochs, first_epoch + int(stop_after_epochs))
    for epoch in range(first_epoch, last_epoch):
      state = _train_epoch(config, data_dir, fold, steps.train, state, epoch, mesh, log,
                           batch_hook, out_dir, ckpt, is_main)
      end = epoch + 1
      val = None
      if _every(end, t.eval_every_epochs) or end == epochs:
        val = _validate(config, data_dir, fold, steps.eval, state, mesh, log, end)
        history.append({'epoch': end, 'step': end * spe, 'val_dice': val})
      if _every(end, t.checkpoint_every_epochs) or end in (epochs, last_epoch):
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
  if summary['status'] == 'done' and is_main:
    tmp = summary_path.with_suffix('.tmp')
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(summary_path)
  return summary


def _train_epoch(config, data_dir, fold, train_fn, state, epoch, mesh, log, batch_hook,
                 out_dir, ckpt, is_main):
  """One epoch of steps on the stream of `epoch_seed(config.seed, epoch)`.

  NaN/Inf check (every metric: a NaN input can leave the loss finite but not the gradient):
  fetching a step's metrics blocks the host until that step ends, so step i's are read only
  after step i+1 is dispatched (the device never idles; the bad state is one step old when
  caught), every train.nan_check_every_steps steps; every step of a log window is checked when
  it is logged, and the parameters at the end of the epoch, before any checkpoint.
  """
  from clfc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  t = config.train
  spe, log_every = int(t.steps_per_epoch), max(int(t.log_every_steps), 1)
  check_every = max(int(t.get('nan_check_every_steps', 1)), 1)
  it = input_pipeline.train_iterator(config, data_dir, fold, global_batch_size=int(t.batch_size),
                                     seed=epoch_seed(config.seed, epoch))

  def check(step, host_metrics):
    bad = run_log.nonfinite_terms(host_metrics, _TERM_ORDER)
    if bad:
      err = TrainingDiverged(step, bad, out_dir, ckpt.latest_step())
      log.event('diverged', step, epoch=epoch, terms=bad, message=str(err))
      raise err

  pending, window = None, []
  window_start = time.perf_counter()
  bar = tqdm(total=spe, desc=f'{config.method} fold{fold} epoch {epoch + 1}/{int(t.epochs)}',
             disable=not is_main, leave=False)
  try:
    for i in range(spe):
      step = epoch * spe + i
      host = next(it)
      if batch_hook is not None:
        host = batch_hook(host, step)
      batch = sharding_lib.global_batch(_device_fields(host, train_lib.BATCH_INPUTS), mesh)
      state, metrics = train_fn(state, batch)
      window.append((step, metrics))
      bar.update(1)
      if pending is not None:
        check(pending[0], jax.device_get(pending[1]))
        pending = None
      if (step + 1) % check_every == 0:
        pending = (step, metrics)
      if (step + 1) % log_every == 0 or i == spe - 1:
        host_window = jax.device_get([m for _, m in window])
        for (s, _), m in zip(window, host_window):
          check(s, m)
        seconds = time.perf_counter() - window_start
        scalars = {k: float(np.mean([m[k] for m in host_window])) for k in host_window[0]}
        scalars['steps_per_s'] = len(window) / max(seconds, 1e-9)
        log.event('train', step + 1, scalars, tb_prefix='train', epoch=epoch + 1)
        bar.set_postfix(loss=f'{scalars["loss"]:.4f}')
        pending, window, window_start = None, [], time.perf_counter()
    if not bool(run_log.all_finite(state.params)):
      check(epoch * spe + spe - 1, {'params': np.nan})
  finally:
    bar.close()
    it.close()
  return state


def _validate(config, data_dir, fold, eval_fn, state, mesh, log, epoch) -> float:
  start = time.perf_counter()
  dice = patient_dice(config, data_dir, fold, eval_fn, state.variables, mesh)
  if not dice:
    raise ValueError(f'{data_dir}: fold {fold} has an empty val split (data.val_fraction)')
  val = float(np.mean(list(dice.values())))
  step = epoch * int(config.train.steps_per_epoch)
  log.event('val', step, {'val_dice': val}, tb_prefix='val', epoch=epoch,
            patients=len(dice), seconds=round(time.perf_counter() - start, 2))
  logging.info('%s fold%d epoch %d: val Dice %.4f over %d patients', config.method, fold,
               epoch, val, len(dice))
  return val
