"""The normal-appearance pipeline: train the IntroVAE on normal T1 slices, then reconstruct every
tumor case's pseudo-normal T1 (SPEC §1, §6).

`train_introvae` writes WORKDIR/introvae/:
  checkpoints/   orbax, one step per epoch end (the latest introvae.keep_checkpoints)
  events.*       TensorBoard scalars (every loss term of both updates, steps/s)
  metrics.jsonl  one JSON object per log event;  samples.png  real / μ-reconstructed / sampled
  summary.json   written last: training reached config.introvae.epochs.
`make_pseudo_normals` writes WORKDIR/pseudo_normal/<id>.npz ('t1' float16 [Z,H,W] in [-1, 1],
-1 outside the brain), fidelity.json / fidelity.md, and the tumor shards with pseudo-normal
stacks for every fold to run (`build_tumor_shards`).

Resume: epoch e's stream of normal slices is a pure function of (config.seed, e), checkpoints
sit at epoch ends and the IntroVAEState holds the rng, so a rerun continues where the last
checkpoint left off; pseudo-normal volumes already on disk are not recomputed.
Only input_pipeline / tfds_builders touch TensorFlow, and they are imported inside functions.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from clfc_jax import checkpoints as checkpoints_lib
from clfc_jax import introvae_train
from clfc_jax import run_log
from clfc_jax import sharding as sharding_lib

METRICS_NAME = run_log.METRICS_NAME
SUMMARY_NAME = 'summary.json'
SAMPLES_NAME = 'samples.png'
FIDELITY_NAME = 'fidelity'
_CHEAP_CPU_COMPILE = {'xla_backend_optimization_level': 0,
                      'xla_llvm_disable_expensive_passes': True}


class IntroVAEDiverged(RuntimeError):
  """A loss term became NaN/Inf at `step`; no checkpoint holds the bad state."""

  def __init__(self, step: int, terms, directory, last_good_step: Optional[int]):
    self.step, self.terms, self.last_good_step = int(step), tuple(terms), last_good_step
    super().__init__(
        f'IntroVAE training diverged at step {self.step}: non-finite {", ".join(self.terms)}; '
        f'the last good checkpoint is step {last_good_step} in {directory}/checkpoints '
        '(lower introvae.lr_encoder / lr_decoder, or check the normal T1 slices)')


# --- small pure helpers ---------------------------------------------------------------------------

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


def normal_fold(config) -> int:
  """The fold whose normal slices / reference the IntroVAE uses (the prep stage's first fold).

  It only matters without a normal cohort (the tumor-free-slice fallback).
  """
  from clfc_jax import stages  # pylint: disable=g-import-not-at-top
  return stages.folds_to_run(config)[0]


def _image_hw(config):
  return tuple(int(x) for x in config.prep.crop_hw)


def _compiler_options(config):
  cheap = config.introvae.get('cheap_cpu_compile', False) and jax.default_backend() == 'cpu'
  return _CHEAP_CPU_COMPILE if cheap else None


def _inference_options(config):
  """Reconstruction / sampling: without XLA:CPU's YNNPACK fusions unless
  config.train.cpu_ynn_fusions (32 slices at 192x160: 1.6 -> 1.3 s on 2 cores)."""
  options = _compiler_options(config)
  if (options is None and jax.default_backend() == 'cpu'
      and not config.train.get('cpu_ynn_fusions', True)):
    from clfc_jax import train  # pylint: disable=g-import-not-at-top
    options = train.NO_YNN_FUSIONS
  return options


def _atomic_write_text(path: Path, text: str):
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


# --- state, steps, restore ------------------------------------------------------------------------

# Settings of the training loop only: they change neither the model nor the compiled step.
_LOOP_KEYS = ('epochs', 'steps_per_epoch', 'log_every_steps', 'keep_checkpoints', 'num_samples',
              'recon_batch_size')


def _model_key(config):
  iv = {k: v for k, v in config.introvae.to_dict().items() if k not in _LOOP_KEYS}
  return json.dumps(iv, sort_keys=True, default=str), _image_hw(config)


_STATIC_CACHE, _FN_CACHE = {}, {}


def _shared_static(config, state):
  """`state` with the static fields (modules, optax transforms) shared by every state of the
  same model in this process: optax transforms compare by identity, so fresh ones would make
  every jitted step retrace and recompile."""
  static = _STATIC_CACHE.setdefault(_model_key(config), {
      'encoder': state.encoder, 'decoder': state.decoder, 'enc_tx': state.enc_tx,
      'dec_tx': state.dec_tx, 'weights': state.weights})
  return state.replace(**static)


def _fresh_state(config, mesh):
  """A newly initialised IntroVAEState, replicated over `mesh`."""
  state = introvae_train.create_state(config, jax.random.PRNGKey(int(config.seed)),
                                      _image_hw(config))
  return jax.device_put(_shared_static(config, state), sharding_lib.replicated(mesh))


def _abstract_state(config, mesh):
  """The IntroVAEState's shapes and dtypes, replicated over `mesh` (the restore target)."""
  abstract = jax.eval_shape(
      lambda key: introvae_train.create_state(config, key, _image_hw(config)),
      jax.random.PRNGKey(int(config.seed)))
  repl = sharding_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                      _shared_static(config, abstract))


def _cached_fn(name, config, make):
  key = (name,) + _model_key(config)
  if key not in _FN_CACHE:
    _FN_CACHE[key] = make()
  return _FN_CACHE[key]


def _train_step_fn(config, mesh):
  """The jitted alternating step: state replicated, batch split over 'data' (state donated).

  Cached per model and devices: a resumed or longer run in the same process reuses it.
  """
  repl, data = sharding_lib.replicated(mesh), sharding_lib.data_sharding(mesh)
  devices = tuple(d.id for d in mesh.devices.flat)
  return _cached_fn(('train_step', devices), config, lambda: jax.jit(
      introvae_train.train_step, in_shardings=(repl, {'image': data}),
      out_shardings=(repl, repl), donate_argnums=0, compiler_options=_compiler_options(config)))


def reconstruct_fn(config):
  """Jitted `(enc_params, dec_params, images) -> Dec(μ(images))`, cached per model.

  Public: clfc_jax.segment reconstructs new patients with it.
  """
  return _cached_fn('reconstruct', config, lambda: jax.jit(
      functools.partial(introvae_train.reconstruct, config=config),
      compiler_options=_inference_options(config)))


def _sample_fn(config, num):
  """Jitted `(dec_params, rng) -> num prior samples`, cached per model."""
  return _cached_fn(('sample', num), config, lambda: jax.jit(
      functools.partial(introvae_train.sample, config=config, image_hw=_image_hw(config),
                        num=num), compiler_options=_inference_options(config)))


def restore_introvae(config, wd, mesh=None):
  """The trained (final) IntroVAEState, replicated over `mesh`; clear errors if not trained."""
  mesh = mesh or sharding_lib.make_mesh()
  directory = Path(wd.introvae) / 'checkpoints'
  summary_path = Path(wd.introvae) / SUMMARY_NAME
  if not summary_path.exists():
    raise FileNotFoundError(f'{summary_path}: the IntroVAE has not finished training '
                            '(run the introvae stage first)')
  final_step = int(json.loads(summary_path.read_text())['final_step'])
  with checkpoints_lib.Checkpointer(
      directory, max_to_keep=int(config.introvae.keep_checkpoints)) as ckpt:
    if ckpt.latest_step() != final_step:
      raise FileNotFoundError(f'{directory}: latest checkpoint {ckpt.latest_step()} is not the '
                              f'final step {final_step} of {summary_path}')
    state, _ = ckpt.restore(final_step, _abstract_state(config, mesh))
  return state


# --- training -------------------------------------------------------------------------------------

def train_introvae(config, wd, *, stop_after_epochs: Optional[int] = None,
                   batch_hook: Optional[Callable[[dict, int], dict]] = None) -> dict:
  """Trains the IntroVAE on the normal T1 slices (WORKDIR/tfds) into WORKDIR/introvae.

  Global batch: introvae.batch_size rounded down to a multiple of the device count; epochs ×
  steps_per_epoch alternating encoder/decoder updates. Resumes from the latest checkpoint.
  stop_after_epochs: return after this many epochs of THIS call (status 'stopped'), as if
  preempted. batch_hook(host_batch, step) -> host_batch: a test seam on every host batch.
  Returns {status, epochs_run, epochs_done, final_step, steps_per_epoch, batch_size,
  num_normal_slices, final (last logged window's mean of every loss term), seconds}.
  Raises IntroVAEDiverged on a non-finite loss or parameter (nothing bad is checkpointed).
  """
  from clfc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  iv = config.introvae
  out_dir = Path(wd.introvae)
  is_main = jax.process_index() == 0
  if is_main:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'config.json').write_text(config.to_json_best_effort(indent=1))
  mesh = sharding_lib.make_mesh()
  fold = normal_fold(config)
  batch = round_batch(iv.batch_size, mesh.devices.size)
  num_slices = input_pipeline.num_normal_slices(config, wd.tfds, fold=fold)
  spe, epochs = steps_per_epoch(config, num_slices, batch), int(iv.epochs)
  step_fn = _train_step_fn(config, mesh)
  ckpt = checkpoints_lib.Checkpointer(out_dir / 'checkpoints',
                                      max_to_keep=int(iv.keep_checkpoints))
  log = run_log.RunLog(out_dir, is_main, tb_prefix='introvae')
  final = _read_json(out_dir / SUMMARY_NAME).get('final', {})   # kept when nothing is left to run.
  try:
    restored = ckpt.restore_latest(_abstract_state(config, mesh))
    if restored is None:
      state, first_epoch = _fresh_state(config, mesh), 0
    else:
      state, extra = restored
      first_epoch = int(extra.get('epoch', 0))
      if int(state.step) != first_epoch * spe:
        raise ValueError(f'{ckpt.directory}: checkpoint at step {int(state.step)} is not the '
                         f'end of epoch {first_epoch} ({spe} steps per epoch): did '
                         'introvae.batch_size / steps_per_epoch or the normal slices change?')
      if first_epoch > epochs:
        raise ValueError(f'{ckpt.directory}: trained {first_epoch} epochs, more than '
                         f'introvae.epochs={epochs}; use a fresh WORKDIR/introvae')
    log.event('resume' if restored else 'start', first_epoch * spe, epoch=first_epoch,
              batch_size=batch, steps_per_epoch=spe, normal_slices=num_slices,
              devices=jax.device_count())
    last_epoch = epochs if stop_after_epochs is None else min(
        epochs, first_epoch + int(stop_after_epochs))
    for epoch in range(first_epoch, last_epoch):
      state, final = _train_epoch(config, wd, fold, step_fn, state, epoch, spe, batch, mesh,
                                  log, batch_hook, ckpt, is_main)
      end = epoch + 1
      ckpt.save(end * spe, state, extra={'epoch': end})
      log.event('checkpoint', end * spe, epoch=end)
    ckpt.wait()
    if is_main:
      save_samples(config, wd, state, out_dir / SAMPLES_NAME)
    summary = {'status': 'done' if last_epoch == epochs else 'stopped',
               'epochs_run': last_epoch - first_epoch, 'epochs_done': last_epoch,
               'final_step': last_epoch * spe, 'steps_per_epoch': spe, 'batch_size': batch,
               'num_normal_slices': num_slices, 'normal_fold': fold, 'final': final,
               'seconds': round(time.time() - start_time, 2)}
    log.event('summary', last_epoch * spe, **summary)
  finally:
    ckpt.close()
    log.close()
  if summary['status'] == 'done' and is_main:
    _atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=1))
  return summary


def _train_epoch(config, wd, fold, step_fn, state, epoch, spe, batch, mesh, log, batch_hook,
                 ckpt, is_main):
  """One epoch on the stream of epoch_seed(config.seed, epoch); returns (state, last window).

  A step's metrics are fetched after the next step is dispatched (the device never idles) and
  checked for NaN/Inf; the params are checked before the epoch's checkpoint.
  """
  from clfc_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  log_every = max(int(config.introvae.log_every_steps), 1)
  it = input_pipeline.normal_t1_iterator(config, wd.tfds, batch, epoch_seed(config.seed, epoch),
                                         fold=fold)

  def check(step, metrics):
    bad = run_log.nonfinite_terms(jax.device_get(metrics))
    if bad:
      err = IntroVAEDiverged(step, bad, wd.introvae, ckpt.latest_step())
      log.event('diverged', step, epoch=epoch, terms=bad, message=str(err))
      raise err

  pending, window, last = None, [], {}
  window_start = time.perf_counter()
  bar = tqdm(total=spe, desc=f'introvae epoch {epoch + 1}/{int(config.introvae.epochs)}',
             disable=not is_main, leave=False)
  try:
    for i in range(spe):
      step = epoch * spe + i
      host = next(it)
      if batch_hook is not None:
        host = batch_hook(host, step)
      state, metrics = step_fn(state, sharding_lib.global_batch({'image': host['image']}, mesh))
      window.append(metrics)
      bar.update(1)
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      if (step + 1) % log_every == 0 or i == spe - 1:
        check(*pending)
        pending = None
        host_window = jax.device_get(window)
        seconds = time.perf_counter() - window_start
        last = {k: float(np.mean([m[k] for m in host_window])) for k in host_window[0]}
        log.event('train', step + 1, dict(last, steps_per_s=len(window) / max(seconds, 1e-9)),
                  epoch=epoch + 1)
        bar.set_postfix(enc=f'{last["enc/loss"]:.1f}', dec=f'{last["dec/loss"]:.1f}')
        window, window_start = [], time.perf_counter()
    if not bool(run_log.all_finite((state.enc_params, state.dec_params))):
      check(epoch * spe + spe - 1, {'params': np.array(np.nan)})
  finally:
    bar.close()
    it.close()
  return state, last


def save_samples(config, wd, state, path: Path):
  """PNG grid: rows real normal slices, their μ-reconstructions, decoded prior samples."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from clfc_jax import figures, input_pipeline  # pylint: disable=g-import-not-at-top
  n = max(int(config.introvae.num_samples), 1)
  hw = _image_hw(config)
  it = input_pipeline.normal_t1_iterator(config, wd.tfds, n, epoch_seed(config.seed, -1),
                                         fold=normal_fold(config), process_index=0,
                                         process_count=1)
  try:
    real = next(it)['image']
  finally:
    it.close()
  enc, dec = _host_params(state)
  recon = np.asarray(reconstruct_fn(config)(enc, dec, real))
  fake = np.asarray(_sample_fn(config, n)(dec, rng=jax.random.PRNGKey(int(config.seed))))
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 1.6 * 3 * hw[0] / hw[1]), squeeze=False)
  for row, (name, images) in enumerate((('real', real), ('reconstructed', recon),
                                        ('sampled', fake))):
    for col in range(n):
      ax = axes[row, col]
      # Anterior up, patient's right on the left, as in every report figure.
      ax.imshow(figures.radiological(images[col, ..., 0]), cmap='gray', vmin=-1, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, 0].set_ylabel(name)
  fig.suptitle(f'IntroVAE step {int(state.step)}')
  fig.tight_layout()
  tmp = path.with_name(f'.{path.stem}.tmp.png')
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def _host_params(state):
  """Encoder/decoder params as process-local arrays (replicated, so any copy will do)."""
  return jax.device_get((state.enc_params, state.dec_params))


# --- pseudo-normal volumes ------------------------------------------------------------------------

def unit_t1(volume, brain, landmarks, config) -> np.ndarray:
  """A T1 volume as the IntroVAE saw its training slices: matched to `landmarks`, in [-1, 1]."""
  from data_prep import normalize  # pylint: disable=g-import-not-at-top
  matched = normalize.apply_reference(volume, brain, landmarks, config)
  return normalize.to_unit_range(matched, brain, config)


def reconstruct_volume(recon_fn, enc, dec, unit, brain, batch_size: int, mesh) -> np.ndarray:
  """Dec(μ(x)) of every brain-containing axial slice of `unit` [Z,H,W]; -1 elsewhere.

  Slices go through `recon_fn` in fixed batches of `batch_size` (the last one padded with -1
  slices), split over the 'data' axis of `mesh`.
  """
  out = np.full(unit.shape, -1.0, np.float32)
  idx = np.flatnonzero(np.asarray(brain).reshape(len(brain), -1).any(axis=1))
  for start in range(0, len(idx), batch_size):
    chunk = idx[start:start + batch_size]
    images = np.full((batch_size,) + unit.shape[1:] + (1,), -1.0, np.float32)
    images[:len(chunk), ..., 0] = unit[chunk]
    batch = sharding_lib.global_batch({'image': images}, mesh)
    out[chunk] = np.asarray(recon_fn(enc, dec, batch['image']))[:len(chunk), ..., 0]
  out = np.where(brain, np.clip(out, -1.0, 1.0), -1.0)
  return out.astype(np.float32)


def _save_npz_atomic(path: Path, **arrays):
  tmp = path.with_name(f'.{path.stem}.tmp.npz')
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _pseudo_normal_ok(path: Path) -> bool:
  try:
    with np.load(path) as z:
      return 't1' in z.files
  except (OSError, ValueError):
    return False


def make_pseudo_normals(config, wd, *, build_shards: bool = True,
                        folds: Optional[Sequence[int]] = None) -> dict:
  """Pseudo-normal T1 of every prepared tumor case, a fidelity report, and the shards.

  Each case's T1 (dataset.normal_modality) is matched to the IntroVAE's normal reference and
  scaled to [-1, 1] exactly like the training slices; every axial slice is reconstructed from
  μ. Files already on disk are kept (resumable); writes are atomic. With build_shards, the
  tumor shards with pseudo-normal stacks are built for `folds` (default: the folds to run).
  Returns {cases, written, skipped, seconds_reconstruct, seconds_per_case, fidelity (means),
  shards ({fold: {split: examples}}), seconds}.
  """
  from clfc_jax import stages  # pylint: disable=g-import-not-at-top
  from data_prep import normalize, store  # pylint: disable=g-import-not-at-top
  from data_prep.case import CaseError  # pylint: disable=g-import-not-at-top
  start_time = time.time()
  out_dir = Path(wd.pseudo_normal)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = store.prepared_ids(wd.prep_cases)
  if not ids:
    raise FileNotFoundError(f'{wd.prep_cases}: no prepared tumor cases (run the prep stage)')
  # Every process reconstructs its own share of the cases on its local devices.
  mesh = sharding_lib.make_mesh(jax.local_devices())
  n_dev = mesh.devices.size
  batch_size = n_dev * max(1, math.ceil(int(config.introvae.recon_batch_size) / n_dev))
  landmarks = normalize.normal_t1_reference(wd.prep, config, normal_fold(config))
  # Restored over the global mesh (every process takes part, as orbax expects), then copied
  # from the host onto this process's devices.
  enc, dec = jax.device_put(_host_params(restore_introvae(config, wd)),
                            sharding_lib.replicated(mesh))
  recon_fn = reconstruct_fn(config)
  modality = config.dataset.normal_modality
  mine = ids[jax.process_index()::jax.process_count()]
  written, skipped, recon_seconds = [], [], 0.0
  for case_id in tqdm(mine, desc='pseudo-normal', disable=jax.process_index() != 0):
    path = out_dir / f'{case_id}.npz'
    if path.exists() and _pseudo_normal_ok(path):
      skipped.append(case_id)
      continue
    where = Path(wd.prep_cases) / f'{case_id}.npz'
    pc = store.load_prepared(wd.prep_cases, case_id)
    if modality not in pc.modalities:
      raise CaseError(where, f'lacks the normal-appearance modality {modality!r} '
                      f'(has {pc.modalities})')
    try:
      unit = unit_t1(pc.modality(modality), pc.brain, landmarks, config)
    except ValueError as e:
      raise CaseError(where, f'{modality}: {e}') from None
    t0 = time.perf_counter()
    pseudo = reconstruct_volume(recon_fn, enc, dec, unit, pc.brain, batch_size, mesh)
    recon_seconds += time.perf_counter() - t0
    if not np.all(np.isfinite(pseudo)):
      raise CaseError(where, 'the IntroVAE reconstruction is not finite (diverged model?)')
    _save_npz_atomic(path, t1=pseudo.astype(np.float16))
    written.append(case_id)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('pseudo_normal: volumes written')
  summary = {'cases': len(ids), 'written': len(written), 'skipped': len(skipped),
             'seconds_reconstruct': round(recon_seconds, 2),
             'seconds_per_case': round(recon_seconds / max(len(written), 1), 3)}
  if jax.process_index() == 0:
    fidelity = fidelity_report(config, wd, landmarks)
    summary['fidelity'] = fidelity['mean']
    if build_shards:
      summary['shards'] = build_tumor_shards(
          config, wd, stages.folds_to_run(config) if folds is None else folds)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('pseudo_normal: report and shards written')
  summary['seconds'] = round(time.time() - start_time, 2)
  return summary


# --- fidelity -------------------------------------------------------------------------------------

_FIDELITY_FIELDS = ('mae_tumor_pseudo', 'mae_tumor_input', 'mae_normal_pseudo',
                    'mae_normal_input')


def case_fidelity(pseudo, tumor_unit, healthy_unit, brain, label) -> dict:
  """MAE vs the healthy T1 inside the tumor (label > 0) and in the rest of the brain.

  `*_pseudo` compares the pseudo-normal T1, `*_input` the tumor T1 the IntroVAE was given;
  the pseudo-normal should be the closer of the two inside the tumor.
  """
  brain = np.asarray(brain, bool)
  tumor = brain & (np.asarray(label) > 0)
  normal = brain & ~tumor

  def mae(a, region):
    return float(np.mean(np.abs(a[region] - healthy_unit[region]))) if region.any() else None

  return {'tumor_voxels': int(tumor.sum()), 'normal_voxels': int(normal.sum()),
          'mae_tumor_pseudo': mae(pseudo, tumor), 'mae_tumor_input': mae(tumor_unit, tumor),
          'mae_normal_pseudo': mae(pseudo, normal), 'mae_normal_input': mae(tumor_unit, normal)}


def fidelity_report(config, wd, landmarks) -> dict:
  """WORKDIR/pseudo_normal/fidelity.{json,md} over the cases with a known healthy T1.

  Each healthy T1 is matched and scaled exactly like the tumor T1. Returns the JSON record:
  {cases: [per case], mean: {field: mean over cases}, pseudo_closer_in_tumor: count, n}.
  """
  from data_prep import store  # pylint: disable=g-import-not-at-top
  out_dir = Path(wd.pseudo_normal)
  modality = config.dataset.normal_modality
  rows = []
  for case_id in store.prepared_ids(wd.prep_cases):
    with np.load(Path(wd.prep_cases) / f'{case_id}.npz') as z:
      if 'healthy_t1' not in z.files or 'label' not in z.files:
        continue
    path = out_dir / f'{case_id}.npz'
    if not path.exists():
      continue
    pc = store.load_prepared(wd.prep_cases, case_id)
    with np.load(path) as z:
      pseudo = z['t1'].astype(np.float32)
    tumor_unit = unit_t1(pc.modality(modality), pc.brain, landmarks, config)
    healthy_unit = unit_t1(pc.healthy_t1, pc.brain, landmarks, config)
    rows.append(dict(case=case_id, **case_fidelity(pseudo, tumor_unit, healthy_unit, pc.brain,
                                                   pc.label)))
  mean = {}
  for field in _FIDELITY_FIELDS:
    values = [r[field] for r in rows if r[field] is not None]
    mean[field] = float(np.mean(values)) if values else None
  closer = sum(1 for r in rows if r['mae_tumor_pseudo'] is not None and
               r['mae_tumor_pseudo'] < r['mae_tumor_input'])
  with_tumor = sum(1 for r in rows if r['mae_tumor_pseudo'] is not None)
  record = {'n': len(rows), 'cases_with_tumor': with_tumor, 'pseudo_closer_in_tumor': closer,
            'mean': mean, 'cases': rows,
            'note': 'MAE in [-1, 1] units vs the healthy T1 (matched and scaled like the '
                    'IntroVAE input); *_input: the tumor T1 itself, the reference point.'}
  _atomic_write_text(out_dir / f'{FIDELITY_NAME}.json', json.dumps(record, indent=1))
  _atomic_write_text(out_dir / f'{FIDELITY_NAME}.md', _fidelity_markdown(record))
  return record


def _fidelity_markdown(record) -> str:
  fmt = lambda v: '–' if v is None else f'{v:.4f}'
  lines = ['# Pseudo-normal fidelity', '',
           'Mean absolute error against the healthy T1 (synthetic cases; [-1, 1] units). '
           '"input" is the tumor T1 the IntroVAE was given: inside the tumor, the '
           'pseudo-normal should be closer to the healthy T1 than the input is.', '',
           f'Cases: {record["n"]}; pseudo-normal closer inside the tumor in '
           f'{record["pseudo_closer_in_tumor"]} of {record["cases_with_tumor"]}.', '',
           '| case | tumor voxels | tumor: pseudo | tumor: input | normal: pseudo | '
           'normal: input |', '|---|---:|---:|---:|---:|---:|']
  for r in record['cases']:
    lines.append(f'| {r["case"]} | {r["tumor_voxels"]} | ' +
                 ' | '.join(fmt(r[f]) for f in _FIDELITY_FIELDS) + ' |')
  lines.append('| **mean** | | ' + ' | '.join(fmt(record['mean'][f]) for f in _FIDELITY_FIELDS)
               + ' |')
  return '\n'.join(lines) + '\n'


# --- shards ---------------------------------------------------------------------------------------

def build_tumor_shards(config, wd, folds: Sequence[int]) -> dict:
  """TFDS tumor shards with pseudo-normal stacks for each fold; {fold: {split: examples}}."""
  from data_prep import tfds_builders  # pylint: disable=g-import-not-at-top
  out = {}
  for k in folds:
    builder = tfds_builders.build(tfds_builders.tumor_slices_builder(
        config, wd.tfds, int(k), with_pseudo_normal=True, prep_dir=wd.prep,
        pseudo_normal_dir=wd.pseudo_normal))
    out[int(k)] = {name: split.num_examples for name, split in builder.info.splits.items()}
  logging.info('pseudo-normal tumor shards: %s', out)
  return out
