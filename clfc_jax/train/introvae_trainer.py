"""The IntroVAE's training loop: normal T1 slices in, WORKDIR/introvae out (SPEC §6).

With a normal cohort one IntroVAE serves every fold (WORKDIR/introvae/); without one, each test
fold k gets its own, trained on fold k's training patients only (WORKDIR/introvae/fold<k>/), so
no test patient ever reaches the IntroVAE that makes its fold's pseudo-normals.
`train_introvae` writes that folder:
  checkpoints/   orbax, one step per epoch end (the latest introvae.keep_checkpoints)
  events.*       TensorBoard scalars (every loss term of both updates, steps/s)
  metrics.jsonl  one JSON object per log event;  config.json  the resolved config
  samples.png    real / μ-reconstructed / sampled slices
  summary.json   written last: training reached config.introvae.epochs.
Exact resume and NaN stops: see train/loop.py (shared with the segmentation loop). The
frozen model is restored for inference with `restore_introvae`; `reconstruct_fn` and
`sample_fn` are its jitted inference functions.
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from clfc_jax import checkpoints as checkpoints_lib
from clfc_jax import input_pipeline
from clfc_jax import plots
from clfc_jax import run_log
from clfc_jax import sharding as sharding_lib
from clfc_jax import workdir as workdir_lib
from clfc_jax.train import introvae_steps
from clfc_jax.train import loop
from clfc_jax.train import steps as train_lib

METRICS_NAME = run_log.METRICS_NAME
SUMMARY_NAME = 'summary.json'
SAMPLES_NAME = 'samples.png'
CHEAP_CPU_COMPILE = {'xla_backend_optimization_level': 0,
                     'xla_llvm_disable_expensive_passes': True}
# Settings of the loop only: they change neither the model nor the compiled step.
_LOOP_KEYS = ('epochs', 'steps_per_epoch', 'log_every_steps', 'keep_checkpoints', 'num_samples',
              'recon_batch_size')
_STATIC_FIELDS = ('encoder', 'decoder', 'enc_tx', 'dec_tx', 'weights')


class IntroVAEDiverged(loop.Diverged):
  """A loss term became NaN/Inf at `step`; no checkpoint holds the bad state."""
  WHAT = 'IntroVAE training'
  HINT = 'lower introvae.lr_encoder / lr_decoder, or check the normal T1 slices'


def epoch_seed(seed: int, epoch: int) -> int:
  """The normal-slice stream seed of one epoch (its own stream, apart from segmentation's)."""
  return run_log.epoch_seed(seed, epoch, stream='introvae')


def round_batch(batch_size: int, num_devices: int) -> int:
  """The batch rounded down to a multiple of the device count (at least one per device)."""
  return max(num_devices, (int(batch_size) // num_devices) * num_devices)


def steps_per_epoch(config, num_slices: int, batch_size: int) -> int:
  """introvae.steps_per_epoch, or one pass over the normal slices when it is 0."""
  spe = int(config.introvae.steps_per_epoch)
  return spe if spe > 0 else max(1, int(num_slices) // int(batch_size))


def image_hw(config) -> tuple:
  return tuple(int(x) for x in config.prep.crop_hw)


def model_config(config) -> ml_collections.FrozenConfigDict:
  """What the IntroVAE's modules, optimizers and compiled functions depend on (hashable):
  config.introvae without the loop's settings (models/introvae.py reads nothing else)."""
  iv = {k: v for k, v in config.introvae.to_dict().items() if k not in _LOOP_KEYS}
  return ml_collections.FrozenConfigDict({'introvae': iv})


def compiler_options(config):
  cheap = config.introvae.get('cheap_cpu_compile', False) and jax.default_backend() == 'cpu'
  return CHEAP_CPU_COMPILE if cheap else None


@functools.cache
def _static_fields(model: ml_collections.FrozenConfigDict, hw: tuple) -> dict:
  """The IntroVAEState's static fields (modules, optax transforms), one set per model: optax
  transforms compare by identity, so fresh ones would make every jitted step retrace."""
  abstract = jax.eval_shape(
      lambda key: introvae_steps.create_state(model.as_configdict(), key, hw),
      jax.random.PRNGKey(0))
  return {name: getattr(abstract, name) for name in _STATIC_FIELDS}


def _shared_static(config, state):
  return state.replace(**_static_fields(model_config(config), image_hw(config)))


def _fresh_state(config, mesh):
  """A newly initialised IntroVAEState, replicated over `mesh`."""
  state = introvae_steps.create_state(config, jax.random.PRNGKey(int(config.seed)),
                                      image_hw(config))
  return jax.device_put(_shared_static(config, state), sharding_lib.replicated(mesh))


def abstract_state(config, mesh):
  """The IntroVAEState's shapes and dtypes, replicated over `mesh` (the restore target)."""
  abstract = jax.eval_shape(
      lambda key: introvae_steps.create_state(config, key, image_hw(config)),
      jax.random.PRNGKey(int(config.seed)))
  repl = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                      _shared_static(config, abstract))


@functools.cache
def _jitted_train_step(model: ml_collections.FrozenConfigDict, mesh, options_key):
  repl, data = sharding_lib.replicated(mesh), sharding_lib.data_sharding(mesh)
  return jax.jit(introvae_steps.train_step, in_shardings=(repl, {'image': data}),
                 out_shardings=(repl, repl), donate_argnums=0,
                 compiler_options=dict(options_key) if options_key else None)


def train_step_fn(config, mesh):
  """The jitted alternating step: state replicated, batch split over 'data' (state donated).

  Cached per model and mesh: a resumed or longer run in the same process reuses it.
  """
  options = compiler_options(config)
  return _jitted_train_step(model_config(config), mesh, _options_key(options))


def _options_key(options):
  return tuple(sorted(options.items())) if options else None


def inference_options(config):
  """Reconstruction / sampling: without XLA:CPU's YNNPACK fusions unless
  config.train.cpu_ynn_fusions (32 slices at 192x160: 1.6 -> 1.3 s on 2 cores)."""
  options = compiler_options(config)
  if (options is None and jax.default_backend() == 'cpu'
      and not config.train.get('cpu_ynn_fusions', True)):
    options = train_lib.NO_YNN_FUSIONS
  return options


@functools.cache
def _jitted_reconstruct(model: ml_collections.FrozenConfigDict, options_key):
  return jax.jit(functools.partial(introvae_steps.reconstruct, config=model.as_configdict()),
                 compiler_options=dict(options_key) if options_key else None)


def reconstruct_fn(config):
  """Jitted `(enc_params, dec_params, images) -> Dec(μ(images))`, one per model."""
  return _jitted_reconstruct(model_config(config), _options_key(inference_options(config)))


@functools.cache
def _jitted_restore(model: ml_collections.FrozenConfigDict, options_key):
  return jax.jit(functools.partial(introvae_steps.restore, config=model.as_configdict()),
                 compiler_options=dict(options_key) if options_key else None)


def restore_fn(config):
  """Jitted `(enc_params, dec_params, images) -> x̂`, the restoration under the IntroVAE prior
  (introvae_steps.restore with config.introvae.restore_*), one per model and setting."""
  return _jitted_restore(model_config(config), _options_key(inference_options(config)))


@functools.cache
def _jitted_sample(model: ml_collections.FrozenConfigDict, hw: tuple, num: int, options_key):
  return jax.jit(functools.partial(introvae_steps.sample, config=model.as_configdict(),
                                   image_hw=hw, num=num),
                 compiler_options=dict(options_key) if options_key else None)


def sample_fn(config, num: int):
  """Jitted `(dec_params, rng) -> num prior samples`, one per model and count."""
  return _jitted_sample(model_config(config), image_hw(config), int(num),
                        _options_key(inference_options(config)))


def save_samples(config, wd, state, path: Path, fold: Optional[int] = None):
  """PNG grid: rows real normal slices, their μ-reconstructions, decoded prior samples."""
  n = max(int(config.introvae.num_samples), 1)
  it = input_pipeline.normal_t1_iterator(
      config, wd.tfds, n, epoch_seed(config.seed, -1), fold=_slices_fold(fold),
      process_index=0, process_count=1)
  with contextlib.closing(it):
    real = next(it)['image']
  enc, dec = jax.device_get((state.enc_params, state.dec_params))
  recon = np.asarray(reconstruct_fn(config)(enc, dec, real))
  fake = np.asarray(sample_fn(config, n)(dec, rng=jax.random.PRNGKey(int(config.seed))))
  plots.plot_introvae_samples({'real': real[..., 0], 'reconstructed': recon[..., 0],
                               'sampled': fake[..., 0]}, path,
                              title=f'IntroVAE step {int(state.step)}')


def restore_introvae(config, introvae_dir, mesh=None):
  """The trained (final) IntroVAEState in `introvae_dir` (Workdir.introvae_dir), replicated over
  `mesh`; clear errors if it is not trained."""
  mesh = mesh or sharding_lib.make_mesh()
  directory = Path(introvae_dir) / 'checkpoints'
  summary_path = Path(introvae_dir) / SUMMARY_NAME
  if not summary_path.exists():
    raise FileNotFoundError(f'{summary_path}: the IntroVAE has not finished training '
                            '(run the introvae stage first)')
  final_step = int(json.loads(summary_path.read_text())['final_step'])
  with checkpoints_lib.Checkpointer(
      directory, max_to_keep=int(config.introvae.keep_checkpoints)) as ckpt:
    if ckpt.latest_step() != final_step:
      raise FileNotFoundError(f'{directory}: latest checkpoint {ckpt.latest_step()} is not the '
                              f'final step {final_step} of {summary_path}')
    state, _ = ckpt.restore(final_step, abstract_state(config, mesh))
  return state


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def _slices_fold(fold: Optional[int]) -> int:
  """The fold argument of the normal-slice datasets (it matters only in the fallback)."""
  return 0 if fold is None else int(fold)


def train_introvae(config, wd, fold: Optional[int] = None, *,
                   stop_after_epochs: Optional[int] = None,
                   batch_hook: Optional[Callable[[dict, int], dict]] = None) -> dict:
  """Trains the IntroVAE on the normal T1 slices (WORKDIR/tfds) into wd.introvae_dir(fold).

  fold: None for the normal cohort's IntroVAE, else fold k's own (Workdir.introvae_key).

  Global batch: introvae.batch_size rounded down to a multiple of the device count; epochs ×
  steps_per_epoch alternating encoder/decoder updates. Resumes from the latest checkpoint.
  stop_after_epochs: return after this many epochs of THIS call (status 'stopped'), as if
  preempted. batch_hook(host_batch, step) -> host_batch: a test seam on every host batch.
  Returns {status, epochs_run, epochs_done, final_step, steps_per_epoch, batch_size,
  num_normal_slices, final (last logged window's mean of every loss term), seconds}.
  Raises IntroVAEDiverged on a non-finite loss or parameter (nothing bad is checkpointed).
  """
  start_time = time.time()
  iv = config.introvae
  out_dir = wd.introvae_dir(fold)
  is_main = jax.process_index() == 0
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(config, out_dir / workdir_lib.CONFIG_NAME)
  mesh = sharding_lib.make_mesh()
  slices_fold = _slices_fold(fold)
  batch = round_batch(iv.batch_size, mesh.devices.size)
  num_slices = input_pipeline.num_normal_slices(config, wd.tfds, fold=slices_fold)
  spe, epochs = steps_per_epoch(config, num_slices, batch), int(iv.epochs)
  step_fn = train_step_fn(config, mesh)
  ckpt = checkpoints_lib.Checkpointer(out_dir / 'checkpoints',
                                      max_to_keep=int(iv.keep_checkpoints))
  log = run_log.RunLog(out_dir, is_main, tb_prefix='introvae')
  final = _read_json(out_dir / SUMMARY_NAME).get('final', {})   # kept when nothing is left to run.
  try:
    state, _, first_epoch = loop.resume(ckpt, abstract_state(config, mesh),
                                        lambda: _fresh_state(config, mesh), spe, epochs)
    log.event('resume' if first_epoch else 'start', first_epoch * spe, epoch=first_epoch,
              batch_size=batch, steps_per_epoch=spe, normal_slices=num_slices,
              devices=jax.device_count())
    last_epoch = epochs if stop_after_epochs is None else min(
        epochs, first_epoch + int(stop_after_epochs))
    for epoch in range(first_epoch, last_epoch):
      # The iterator's state is the epoch number, which the checkpoint's `extra` holds.
      it = input_pipeline.normal_t1_iterator(config, wd.tfds, batch,
                                             epoch_seed(config.seed, epoch), fold=slices_fold)
      with contextlib.closing(it):
        state, final = loop.run_epoch(
            step_fn, state, it, epoch=epoch, num_epochs=epochs, steps_per_epoch=spe,
            fields=('image',), mesh=mesh, log=log, log_every=iv.log_every_steps,
            check_every=1,
            diverged=lambda step, bad: IntroVAEDiverged(step, bad, out_dir,
                                                        ckpt.latest_step()),
            params_of=lambda s: (s.enc_params, s.dec_params), desc='introvae epoch',
            postfix=lambda m: {'enc': f'{m["enc/loss"]:.1f}', 'dec': f'{m["dec/loss"]:.1f}'},
            batch_hook=batch_hook, is_main=is_main)
      end = epoch + 1
      ckpt.save(end * spe, state, extra={'epoch': end})
      log.event('checkpoint', end * spe, epoch=end)
    ckpt.wait()
    if is_main:
      save_samples(config, wd, state, out_dir / SAMPLES_NAME, fold)
    summary = {'status': 'done' if last_epoch == epochs else 'stopped',
               'epochs_run': last_epoch - first_epoch, 'epochs_done': last_epoch,
               'final_step': last_epoch * spe, 'steps_per_epoch': spe, 'batch_size': batch,
               'num_normal_slices': num_slices, 'fold': fold, 'final': final,
               'seconds': round(time.time() - start_time, 2)}
    log.event('summary', last_epoch * spe, **summary)
  finally:
    ckpt.close()
    log.close()
  loop.write_summary_if_done(out_dir / SUMMARY_NAME, summary, is_main)
  return summary
