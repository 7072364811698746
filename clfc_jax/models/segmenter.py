"""Backbone + normal-appearance net + CLFC gates + SimSiam heads, per variant from config (SPEC §3-§5).

Call convention (the train step relies on it):
  outputs, new_vars = model.apply(variables, image, normal, label=label, train=True,
                                  mutable=['batch_stats'])
  outputs = model.apply(variables, image, normal, train=False)
outputs: 'logits' [B, H, W, n_classes] float32 (softmax classes, or one sigmoid per region with
task.regions 'wt_tc_et'); 'levels': per decoder level (1/8 .. full)
{'zeta', 'g', 'attention'} ([] without CLFC); in training with SimSiam also 'simsiam': per
level {'p_t', 'p_r', 'z_t', 'z_r', 'mask'} (see clfc.SimSiamHeads).
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clfc_jax.models.clfc import ClfcGate, SimSiamHeads
from clfc_jax.models.encdec import Decoder, Encoder, encoder_channels, scaled_width
from clfc_jax.models.layers import Conv
from data_prep import labels

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DOWNSAMPLING = 16   # four max-pools: H and W must be multiples of this.
# Initialisation runs once: on XLA:CPU a cheaper compile halves its cost (~100 random inits).
CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


def _normal_region(label, size):
  """Ω_NR (not whole tumor) nearest-downsampled to `size` (h, w), PyTorch 'nearest' indexing.

  `label` is the nested level map (0 outside WT), so Ω_NR is "not WT" with sub-regions too:
  L_sim pulls ζ(F_T) towards g(F_R) only where the scan should look like its pseudo-normal
  (SPEC §4), and that is everywhere outside the whole tumour. TC and ET lie inside WT, and
  edema (WT minus TC) is no more normal than the core: taking only "not TC" or "not ET" would
  teach the gate that abnormal tissue matches its reconstruction, the opposite of the method.
  """
  stride_h, stride_w = label.shape[1] // size[0], label.shape[2] // size[1]
  return label[:, ::stride_h, ::stride_w] == 0


class Segmenter(nn.Module):
  """The segmentation model of one variant; build it with build_segmenter(config)."""
  channels: Sequence[int]
  image_channels: int
  normal_channels: int
  n_classes: int = 2
  dtype: Any = jnp.float32
  upsample: str = 'phase'
  use_normal_net: bool = True
  full_skips: bool = False
  clfc: bool = True
  stop_grad_before_zeta: bool = True
  simsiam: bool = True
  proj_dim: int = 256
  pred_hidden: int = 128
  sim_mask_mode: str = 'normal_only'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def _check(self, image, normal, label, train):
    if image.ndim != 4 or image.shape[-1] != self.image_channels:
      raise ValueError(f'image must be [B, H, W, {self.image_channels}] (modalities x (2K+1)), '
                       f'got {image.shape}')
    if image.shape[1] % DOWNSAMPLING or image.shape[2] % DOWNSAMPLING:
      raise ValueError(f'image H and W must be multiples of {DOWNSAMPLING}, got {image.shape}')
    if self.use_normal_net:
      expected = image.shape[:3] + (self.normal_channels,)
      if normal is None or normal.shape != expected:
        got = None if normal is None else normal.shape
        raise ValueError(f'normal must be {expected} (2K+1 pseudo-normal slices), got {got}')
    if train and self.simsiam and (label is None or label.shape != image.shape[:3]):
      got = None if label is None else label.shape
      raise ValueError(f'training with SimSiam needs label {image.shape[:3]}, got {got}')

  @nn.compact
  def __call__(self, image, normal=None, label=None, train: bool = False):
    self._check(image, normal, label, train)
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
    refs = None
    if self.use_normal_net:
      normal_feats = Encoder(self.channels, self.dtype, name='normal_encoder', **bn)(
          normal.astype(self.dtype), train)
      refs = Decoder(self.channels, self.full_skips, self.upsample, self.dtype,
                     name='normal_decoder')(normal_feats)

    levels, gate = [], None
    if self.clfc:
      gates = [ClfcGate(self.stop_grad_before_zeta, self.dtype, name=f'clfc{level}')
               for level in range(len(self.channels))]

      def gate(level, f_t):
        f_t, zeta, g, attention = gates[level](f_t, refs[level])
        levels.append(dict(zeta=zeta, g=g, attention=attention))
        return f_t

    feats = Encoder(self.channels, self.dtype, name='backbone_encoder', **bn)(
        image.astype(self.dtype), train)
    outs = Decoder(self.channels, self.full_skips, self.upsample, self.dtype,
                   name='backbone_decoder')(feats, gate)
    logits = Conv(self.n_classes, (3, 3), padding='SAME', dtype=self.dtype,
                     name='head')(outs[-1])
    outputs = dict(logits=logits.astype(jnp.float32), levels=levels)

    if self.simsiam and train:
      sims = []
      for level, lv in enumerate(levels):
        heads = SimSiamHeads(self.proj_dim, self.pred_hidden, self.sim_mask_mode, self.dtype,
                             name=f'simsiam{level}', **bn)
        sims.append(heads(lv['zeta'], lv['g'], _normal_region(label, lv['zeta'].shape[1:3])))
      outputs['simsiam'] = sims
    return outputs


def output_channels(config) -> int:
  """Head width: config.model.n_classes softmax classes for task.regions 'wt' (the paper),
  one sigmoid logit per region (WT, TC, ET) for 'wt_tc_et'."""
  regions = labels.region_names(config)
  return int(config.model.n_classes) if len(regions) == 1 else len(regions)


def build_segmenter(config) -> Segmenter:
  """The model of config.method's variant (configs.default.apply_method sets the switches)."""
  m, cl = config.model, config.clfc
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}; expected one of {tuple(DTYPES)}')
  if cl.enabled and not m.use_normal_net:
    raise ValueError('config.clfc.enabled needs config.model.use_normal_net')
  if cl.use_simsiam and not cl.enabled:
    raise ValueError('config.clfc.use_simsiam needs config.clfc.enabled')
  slices = 2 * config.data.k + 1
  return Segmenter(
      channels=encoder_channels(config),
      image_channels=len(config.dataset.modalities) * slices,
      normal_channels=slices,
      n_classes=output_channels(config),
      dtype=DTYPES[m.dtype],
      upsample=m.upsample,
      use_normal_net=m.use_normal_net,
      full_skips=m.full_skips,
      clfc=cl.enabled,
      stop_grad_before_zeta=cl.stop_grad_before_zeta,
      simsiam=cl.use_simsiam,
      proj_dim=scaled_width(cl.proj_dim, m.width),
      pred_hidden=scaled_width(cl.pred_hidden, m.width),
      sim_mask_mode=config.loss.sim_mask_mode,
      bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon)


def dummy_batch(model: Segmenter, batch_size=1, hw=(192, 160)):
  """Zero image / normal / label of the shapes `model` expects."""
  h, w = hw
  image = jnp.zeros((batch_size, h, w, model.image_channels), jnp.float32)
  normal = (jnp.zeros((batch_size, h, w, model.normal_channels), jnp.float32)
            if model.use_normal_net else None)
  return image, normal, jnp.zeros((batch_size, h, w), jnp.int32)


def init_variables(model: Segmenter, rng, config, batch_size=1, hw: Optional[Sequence[int]] = None):
  """{'params', 'batch_stats'} for inputs of size hw (default config.prep.crop_hw).

  Initialised in training mode so the SimSiam heads (used only in training) exist. Works under
  jax.eval_shape / jit too (then traced as is, without the cheaper CPU compile).
  """
  image, normal, label = dummy_batch(model, batch_size, tuple(hw or config.prep.crop_hw))

  def init(r):
    return model.init(r, image, normal, label=label, train=True)

  if isinstance(rng, jax.core.Tracer):
    return init(rng)
  options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(init).lower(rng).compile(compiler_options=options)(rng)
