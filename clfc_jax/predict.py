"""Inference with trained models: one padded, sharded slice predictor and the jitted functions
it runs, shared by the pseudo_normal stage, evaluation, the report's figures and
clfc_jax.segment (big_vision style: evaluators receive predict functions, not checkpoints).

  predict_slices      any jitted `(params, batch) -> [B, ...]` over N slices, in fixed batches
  segmenter_fns       a method's compiled eval (probability), attention and raw-output functions
  case_batch_norm     variables whose BatchNorm statistics lean towards one case's own
                      (test-time adaptation, config.eval.case_bn_weight)
  load_segmenter      a run's best checkpoint -> variables
  load_introvae       the frozen IntroVAE -> its parameters; reconstruct_volume -> pseudo-normal
                      (Dec(μ), the restoration or the inpainting, config.introvae.inference)

Compiled functions are cached per (config, mesh) with functools.cache on hashable keys
(ml_collections.FrozenConfigDict), since compiling dominates short runs.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clfc_jax import inpaint
from clfc_jax import sharding as sharding_lib
from clfc_jax.models import segmenter
from clfc_jax.train import introvae_trainer
from clfc_jax.train import steps as train_lib
from clfc_jax.train import trainer
from data_prep import inputs as inputs_lib


def round_batch(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's local device count."""
  n_dev = len(mesh.local_devices)
  return max(1, -(-int(batch_size) // n_dev)) * n_dev


def predict_slices(fn: Callable, params, inputs: Mapping[str, np.ndarray], batch_size: int,
                   mesh, output: Optional[str] = None) -> np.ndarray:
  """`fn(params, batch)` over the N slices of `inputs` ({name: [N, ...]}), concatenated (the
result may be an array or a pytree of arrays with the batch axis first).

  Slices go in fixed-size batches (the last one padded with zeros), so one compiled program
  serves every case; each batch is split over the mesh's 'data' axis, so `batch_size` must be
  a multiple of its local device count. `output` picks one entry of a dict result. Batches
  are dispatched before any result is fetched, so host and accelerator overlap.
  """
  n_dev = len(mesh.local_devices)
  if batch_size < 1 or batch_size % n_dev:
    raise ValueError(f'batch size {batch_size} is not a positive multiple of the '
                     f'{n_dev} devices')
  num_slices = next(iter(inputs.values())).shape[0]
  pending = []
  for start in range(0, num_slices, batch_size):
    chunk = {name: np.asarray(v[start:start + batch_size], np.float32)
             for name, v in inputs.items()}
    n = next(iter(chunk.values())).shape[0]
    if n < batch_size:
      chunk = {name: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1))
               for name, v in chunk.items()}
    out = fn(params, sharding_lib.global_batch(chunk, mesh))
    pending.append((out if output is None else out[output], n))
  if not pending:
    raise ValueError('no slices to predict')
  fetched = [jax.tree.map(lambda x, n=n: np.asarray(x)[:n], jax.device_get(p))
             for p, n in pending]
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *fetched)


# --- the segmenter -------------------------------------------------------------------------------

class SegmenterFns(NamedTuple):
  """A method's compiled inference functions; variables replicated, batches over 'data'."""
  model: object
  eval: Callable                  # (variables, batch) -> {'probs' [B,H,W](,R), 'pred' [B,H,W]}
  attention: Optional[Callable]   # (variables, batch) -> A_1..A_4 [B,H,W,4] (CLFC methods)
  apply: Callable                 # (variables, batch) -> the model's raw outputs (figures)
  batch_statistics: Callable      # (variables, batch) -> the batch's own BatchNorm statistics


def attention_maps(variables, batch, *, model):
  """CLFC attention A_1..A_4 (levels 1/8 .. full) bilinearly upsampled to the slice: [B,H,W,4]."""
  image = batch['image']
  out = model.apply(variables, image, batch.get('normal'), train=False)
  b, h, w = image.shape[:3]
  maps = [jax.image.resize(level['attention'].astype(jnp.float32), (b, h, w, 1), 'bilinear')
          for level in out['levels']]
  return jnp.concatenate(maps, axis=-1)


def _apply(variables, batch, *, model):
  return model.apply(variables, batch['image'], batch.get('normal'), train=False)


def _batch_statistics(variables, batch, *, model):
  """{module: {'mean', 'var'}}: the batch's own statistics of every BatchNorm that shapes the
  prediction (the encoders'; the SimSiam heads only train). A train-mode pass with momentum 0
  returns them as its new running statistics; no parameter changes."""
  _, new = model.clone(bn_momentum=0.0, simsiam=False).apply(
      variables, batch['image'], batch.get('normal'), train=True, mutable=['batch_stats'])
  return {name: stats for name, stats in new['batch_stats'].items()
          if not name.startswith('simsiam')}


@functools.cache
def _segmenter_fns(config: ml_collections.FrozenConfigDict, mesh) -> SegmenterFns:
  config = config.as_configdict()
  model = segmenter.build_segmenter(config)
  repl, data = sharding_lib.replicated(mesh), sharding_lib.data_sharding(mesh)
  attention = None
  if config.clfc.enabled:
    attention = jax.jit(functools.partial(attention_maps, model=model),
                        in_shardings=(repl, data), out_shardings=data)
  return SegmenterFns(model=model, eval=train_lib.make_jitted_steps(config, mesh, model).eval,
                      attention=attention,
                      apply=jax.jit(functools.partial(_apply, model=model),
                                    in_shardings=(repl, data)),
                      batch_statistics=jax.jit(functools.partial(_batch_statistics, model=model),
                                               in_shardings=(repl, data), out_shardings=repl))


def segmenter_fns(config, mesh) -> SegmenterFns:
  """The compiled functions of config's method, shared by every fold and later call (the test
  fold and the list of methods do not change them)."""
  key = config.copy_and_resolve_references()
  with key.unlocked():
    key.fold = 0
    key.methods = ()
  return _segmenter_fns(ml_collections.FrozenConfigDict(key), mesh)


def load_segmenter(config, run_dir, mesh):
  """({'params', 'batch_stats'} of the best checkpoint in run_dir, its step), replicated."""
  state, step, _ = trainer.restore_state(config, run_dir, best=True, mesh=mesh)
  return state.variables, step


def case_bn_weight(config) -> float:
  """config.eval.case_bn_weight, checked to lie in [0, 1]; 0 for configs saved before it."""
  weight = float(config.eval.get('case_bn_weight', 0.0))
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f'config.eval.case_bn_weight={weight}; expected a weight in [0, 1]')
  return weight


def case_batch_norm(fns: SegmenterFns, variables, inputs: Mapping[str, np.ndarray], brain,
                    config, mesh):
  """`variables` whose BatchNorm statistics are (1 - w) x the running ones + w x this case's
  own, w = config.eval.case_bn_weight; `variables` itself at w = 0 (the paper).

  Why: a scan from another scanner shifts every encoder channel's mean and variance, and the
  running statistics of the training scans then misplace the features the rest of the network
  reads. Mixing in the case's own statistics is Schneider et al. 2020 (covariate-shift
  adaptation, their prior weight N/(N+n)); w = 1 is AdaBN (Li et al. 2016). The statistics come
  from one train-mode pass over at most eval.case_bn_slices of the case's slices that hold brain
  (`brain` [Z, H, W]; the slices the shards hold), evenly spaced: one pass, so that every
  layer's statistics are taken under the previous layers' case statistics, as in training.
  """
  weight = case_bn_weight(config)
  if weight == 0.0:
    return variables
  brain_slices = inputs_lib.brain_slices(brain, config.data.min_brain_fraction)
  if not len(brain_slices):
    return variables
  n_dev = len(mesh.local_devices)
  count = max(n_dev, min(len(brain_slices), int(config.eval.case_bn_slices)) // n_dev * n_dev)
  pick = brain_slices[np.round(np.linspace(0, len(brain_slices) - 1, count)).astype(int)]
  batch = {name: np.asarray(v[pick], np.float32) for name, v in inputs.items()}
  case = fns.batch_statistics(variables, sharding_lib.global_batch(batch, mesh))
  stats = dict(variables['batch_stats'])
  for name, own in case.items():
    stats[name] = jax.tree.map(lambda running, of_case: (1.0 - weight) * running
                               + weight * of_case, stats[name], own)
  return {**variables, 'batch_stats': stats}


def predict_volume(fns: SegmenterFns, variables, inputs: Mapping[str, np.ndarray],
                   batch_size: int, mesh) -> np.ndarray:
  """Foreground probability [Z, H, W] float32 of every slice of one case ([Z, H, W, R], one
  sigmoid per region, with task.regions 'wt_tc_et')."""
  return predict_slices(fns.eval, variables, inputs, batch_size, mesh, output='probs')


# --- the IntroVAE --------------------------------------------------------------------------------

def load_introvae(config, introvae_dir, mesh):
  """{'enc', 'dec'}: the frozen IntroVAE's parameters (Workdir.introvae_dir), replicated over
  `mesh`.

  Restored over the global mesh (every process takes part, as orbax expects), then copied from
  the host onto `mesh` (which may hold only this process's devices).
  """
  state = introvae_trainer.restore_introvae(config, introvae_dir)
  enc, dec = jax.device_get((state.enc_params, state.dec_params))
  return jax.device_put({'enc': enc, 'dec': dec}, sharding_lib.replicated(mesh))


INFERENCE_MODES = ('reconstruct', 'restore', 'inpaint')


def inference_mode(config) -> str:
  """config.introvae.inference, checked; a config saved before the setting existed
  reconstructs."""
  mode = config.introvae.get('inference', 'reconstruct')
  if mode not in INFERENCE_MODES:
    raise ValueError(f'introvae.inference={mode!r}; expected one of {INFERENCE_MODES}')
  return mode


def pseudo_normal_fn(config) -> Callable:
  """The jitted `(enc, dec, images) -> [B,H,W,1]` of config.introvae.inference: 'reconstruct'
  Dec(μ(x)) (SPEC §6), 'restore' (restoration under the IntroVAE prior) or, for 'inpaint',
  Dec(μ(x)) as the expectation that clfc_jax.inpaint compares the volume with."""
  mode = inference_mode(config)
  if mode in ('reconstruct', 'inpaint'):
    return introvae_trainer.reconstruct_fn(config)
  return introvae_trainer.restore_fn(config)


def reconstruct_volume(config, params, unit: np.ndarray, brain, mesh) -> np.ndarray:
  """The pseudo-normal of every brain-containing axial slice of `unit` [Z,H,W] in [-1, 1]
  (config.introvae.inference: Dec(μ(x)), the restoration, or the input inpainted where it is
  darker than Dec(μ(x)) in blobs, clfc_jax.inpaint); -1 elsewhere.

  Slices go through the jitted function in batches of introvae.recon_batch_size (rounded up
  to the device count), split over the 'data' axis of `mesh`.
  """
  recon = pseudo_normal_fn(config)
  out = np.full(unit.shape, -1.0, np.float32)
  idx = np.flatnonzero(np.asarray(brain).reshape(len(brain), -1).any(axis=1))
  if len(idx):
    out[idx] = predict_slices(
        lambda p, batch: recon(p['enc'], p['dec'], batch['image']), params,
        {'image': np.asarray(unit, np.float32)[idx, ..., None]},
        round_batch(config.introvae.recon_batch_size, mesh), mesh)[..., 0]
  out = np.where(brain, np.clip(out, -1.0, 1.0), -1.0).astype(np.float32)
  if inference_mode(config) == 'inpaint':
    out = inpaint.inpaint(unit, out, brain, config.introvae, config.prep.spacing)
  return out
