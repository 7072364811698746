"""Segmentation training: the state, the optimizer (SPEC §7) and the pure train/eval steps.

Steps are pure `(state, batch) -> (state, metrics)` functions; `make_jitted_steps` compiles
them once with explicit shardings (state replicated, batch split over 'data') so one program
serves 1 CPU, 8 GPUs or many hosts. The training loop, checkpoints and logging build on these.
"""
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from clfc_jax import sharding as sharding_lib
from clfc_jax.losses import segmentation_loss
from clfc_jax.models import segmenter
from data_prep import labels

BATCH_INPUTS = ('image', 'normal', 'label')   # what the model and the loss read.


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and nothing else (a plain pytree)."""
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def total_train_steps(config) -> int:
  return int(config.train.epochs * config.train.steps_per_epoch)


def learning_rate_schedule(config, total_steps: Optional[int] = None) -> optax.Schedule:
  """Poly decay lr·(1 − t/T)^p, stepped once per epoch like the reference (SPEC §7).

  t counts whole epochs of `train.steps_per_epoch` steps when train.poly_per_epoch, single
  steps otherwise; past T the rate stays 0.
  """
  t = config.train
  total = total_steps or total_train_steps(config)
  interval = max(int(t.steps_per_epoch), 1) if t.get('poly_per_epoch', True) else 1

  def schedule(step):
    done = (jnp.asarray(step) // interval) * interval
    frac = jnp.clip(done / total, 0.0, 1.0)
    return t.lr * (1.0 - frac) ** t.poly_power
  return schedule


def make_optimizer(config, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """SGD-Nesterov in PyTorch's order: clip the raw gradient, add wd·param, momentum, lr.

  PyTorch's clip_grad_norm_ runs before SGD.step, which then couples weight decay into the
  gradient (g + wd·p) ahead of the momentum buffer; optax.trace(nesterov=True) updates the
  buffer exactly as torch.optim.SGD (buf = m·buf + g; g + m·buf). Every parameter, biases and
  BatchNorm scales included, decays, as with `model.parameters()`.
  """
  t = config.train
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm),
      optax.add_decayed_weights(t.weight_decay),
      optax.trace(decay=t.momentum, nesterov=t.nesterov),
      optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)),
  )


def _build_model(config, model):
  return segmenter.build_segmenter(config) if model is None else model


def create_train_state(config, rng: jax.Array, model=None,
                       tx: Optional[optax.GradientTransformation] = None) -> TrainState:
  """Fresh parameters, BatchNorm statistics and optimizer state (pure: jit it to place it)."""
  model = _build_model(config, model)
  tx = tx or make_optimizer(config)
  init_rng, state_rng = jax.random.split(rng)
  variables = segmenter.init_variables(model, init_rng, config, batch_size=1)
  params = variables['params']
  return TrainState(params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=state_rng)


def _model_inputs(batch, config):
  normal = batch.get('normal') if config.model.use_normal_net else None
  return batch['image'], normal


def train_step(state: TrainState, batch: dict, *, model, config,
               total_steps: Optional[int] = None):
  """One SGD step on one (global) batch; returns the new state and scalar metrics."""
  tx = make_optimizer(config, total_steps)
  image, normal = _model_inputs(batch, config)
  label = batch['label']

  def loss_fn(params):
    outputs, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, image, normal, label=label,
        train=True, mutable=['batch_stats'])
    loss, metrics = segmentation_loss(outputs, label, config)
    return loss, (metrics, new_vars['batch_stats'])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=learning_rate_schedule(config, total_steps)(state.step))
  new_state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                            step=state.step + 1)
  return new_state, metrics


_TTA_FLIPS = ((), (1,), (2,), (1, 2))   # mirrorings of the in-plane axes (H, W).


def eval_step(variables, batch: dict, *, model, config):
  """Probabilities and prediction (inference BN).

  task.regions 'wt': foreground probability [B,H,W] float32 and the argmax [B,H,W] int32.
  'wt_tc_et': sigmoid per region [B,H,W,R] and the nested level map [B,H,W] int32 (regions
  above config.eval.threshold, nested ET ⊆ TC ⊆ WT like labels.nest; region r is level > r).
  With config.eval.tta the probabilities average over the four in-plane mirrorings.
  """
  image, normal = _model_inputs(batch, config)
  regions = len(labels.region_names(config)) > 1
  activation = jax.nn.sigmoid if regions else functools.partial(jax.nn.softmax, axis=-1)
  flips = _TTA_FLIPS if config.eval.tta else ((),)
  probs = 0.0
  for axes in flips:
    flip = (lambda x, a=axes: x if x is None or not a else jnp.flip(x, a))
    outputs = model.apply(variables, flip(image), flip(normal), train=False)
    logits = outputs['logits'].astype(jnp.float32)
    probs = probs + flip(activation(logits))
  probs = probs / len(flips)
  if regions:
    return {'probs': probs, 'pred': nested_levels(probs > config.eval.threshold)}
  return {'probs': probs[..., 1], 'pred': jnp.argmax(probs, axis=-1).astype(jnp.int32)}


def nested_levels(masks):
  """int32 level map [...] of region masks [..., R] made nested (a voxel of an inner region is
  in every outer one, labels.nest's rule): the index of its innermost region, plus one."""
  inner = jnp.cumsum(masks[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1] > 0
  return jnp.sum(inner, axis=-1).astype(jnp.int32)


class StepFns(NamedTuple):
  """Compiled entry points; state/variables replicated, batches sharded over 'data'."""
  init: Callable      # rng -> TrainState (placed, replicated)
  train: Callable     # (state, batch) -> (state, metrics); the old state is donated
  eval: Callable      # (variables, batch) -> {'probs', 'pred'}


# XLA:CPU at -O0: compiles about 40% faster, steps run about 50% slower (tests, smoke runs).
CHEAP_CPU_COMPILE = {'xla_backend_optimization_level': 0,
                     'xla_llvm_disable_expensive_passes': True}
# No YNNPACK library fusions on XLA:CPU (an empty list of fusion kinds): config.train.cpu_ynn_fusions.
NO_YNN_FUSIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def make_jitted_steps(config, mesh, model=None, total_steps: Optional[int] = None,
                      compiler_options: Optional[dict] = None) -> StepFns:
  """jit with explicit shardings; batches must hold only arrays (see sharding.global_batch).

  compiler_options go to XLA for every step (e.g. CHEAP_CPU_COMPILE). Without them, the CPU
  train and eval steps get NO_YNN_FUSIONS unless config.train.cpu_ynn_fusions (eval: 32 slices
  at 192x160 in 2.34 s instead of 2.75 s on 2 cores; at -O0, without YNNPACK,
  XLA:CPU's results drifted 7x past the sharded-vs-single-device test tolerance; at -O3 they
  match as closely as with it).
  """
  model = _build_model(config, model)
  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharding(mesh)
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  step_options = compiler_options
  if (compiler_options is None and mesh.devices.flat[0].platform == 'cpu'
      and not config.train.get('cpu_ynn_fusions', True)):
    step_options = NO_YNN_FUSIONS
  init = jit(functools.partial(create_train_state, config, model=model,
                               tx=make_optimizer(config, total_steps)),
             out_shardings=repl)
  train = jax.jit(functools.partial(train_step, model=model, config=config,
                                    total_steps=total_steps),
                  compiler_options=step_options,
                  in_shardings=(repl, data), out_shardings=(repl, repl),
                  donate_argnums=(0,) if config.train.get('donate_state', True) else ())
  evaluate = jax.jit(functools.partial(eval_step, model=model, config=config),
                     compiler_options=step_options,
                     in_shardings=(repl, data), out_shardings=data)
  return StepFns(init=init, train=train, eval=evaluate)
