"""Segmentation losses (SPEC §4): soft Dice, optional cross-entropy, SimSiam L_sim. Pure functions.

Every reduction runs in float32 whatever the activation dtype.
"""
import jax
import jax.numpy as jnp
import optax

from clfc_jax.sums import fused_sums
from data_prep import labels

COSINE_EPS = 1e-8   # PyTorch F.cosine_similarity's norm floor.


def foreground_probability(logits):
  """P(any tumor class) per pixel, float32 [B, H, W]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(probs[..., 1:], axis=-1)


def dice_loss(logits, label, smooth, fn_weight=0.5):
  """1 - (2Σpy + s) / (Σp + Σy + s), pooled over the whole batch.

  fn_weight β != 0.5 makes it the Tversky loss (Salehi et al. 2017), 1 - (2Σpy + s) /
  (2Σpy + 2(1-β)Σp(1-y) + 2βΣ(1-p)y + s): a missed tumour pixel costs β / (1 - β) times a
  false one (β = 0.5 is the Dice above, computed as written so that it stays bit for bit).
  """
  p = foreground_probability(logits)
  y = (label > 0).astype(jnp.float32)
  if fn_weight == 0.5:
    return 1.0 - (2.0 * jnp.sum(p * y) + smooth) / (jnp.sum(p) + jnp.sum(y) + smooth)
  tp = jnp.sum(p * y)
  fp = jnp.sum(p) - tp
  fn = jnp.sum(y) - tp
  beta = float(fn_weight)
  return 1.0 - (2.0 * tp + smooth) / (2.0 * tp + 2.0 * (1.0 - beta) * fp + 2.0 * beta * fn
                                      + smooth)


def per_sample_dice_loss(logits, label, smooth):
  """1 - mean over the slices that hold tumour of their own (2Σpy + s) / (Σp + Σy + s).

  Why: pooled over the batch, a slice through a 0.5-ml tumour is a few pixels beside another
  slice's thousands, and missing it costs almost nothing; here it weighs as much as any other
  slice with tumour. Slices without tumour add nothing to this term (the CE still sees them);
  a batch without any tumour falls back to the pooled Dice, which then penalises false
  positives.
  """
  p = foreground_probability(logits)
  y = (label > 0).astype(jnp.float32)
  axes = tuple(range(1, p.ndim))
  tp, sp, sy = jnp.sum(p * y, axes), jnp.sum(p, axes), jnp.sum(y, axes)
  has = (sy > 0).astype(jnp.float32)
  per = (2.0 * tp + smooth) / (sp + sy + smooth)
  n = jnp.sum(has)
  pooled = (2.0 * jnp.sum(tp) + smooth) / (jnp.sum(sp) + jnp.sum(sy) + smooth)
  return 1.0 - jnp.where(n > 0, jnp.sum(per * has) / jnp.maximum(n, 1.0), pooled)


def sample_and_batch_dice_loss(logits, label, smooth):
  """The mean of the pooled Dice loss and the per-slice one (dice_pooling='both').

  Why: the per-slice term finds small tumours (a slice through a 0.5-ml tumour weighs like any
  other), but it says nothing about slices without tumour, where the pooled term still counts
  every false-positive pixel against the batch's tumour.
  """
  return 0.5 * (dice_loss(logits, label, smooth) + per_sample_dice_loss(logits, label, smooth))


def region_dice_loss(logits, targets, smooth):
  """Region-based soft Dice: sigmoid per region channel, one pooled Dice per region, their mean.

  `logits` [B, H, W, R] (one independent sigmoid per region, nnU-Net's region-based training:
  WT, TC, ET overlap, so no softmax); `targets` [B, H, W, R] 0/1 (region_targets). Each
  region's 1 - (2Σpy + s) / (Σp + Σy + s) is pooled over the whole batch like dice_loss, so a
  slice without ET adds nothing to the ET term instead of a Dice of 0 or 1.
  """
  if logits.shape != targets.shape:
    raise ValueError(f'region logits {logits.shape} and targets {targets.shape} differ')
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  y = targets.astype(jnp.float32)
  axes = tuple(range(p.ndim - 1))
  dice = (2.0 * jnp.sum(p * y, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(y, axes) + smooth)
  return 1.0 - jnp.mean(dice)


def region_targets(label, region_values):
  """0/1 float32 [..., R] targets of an integer label map; `region_values` holds one tuple of
  label values per region (data_prep.labels.region_values, e.g. ((1, 2, 4), (1, 4), (4,)))."""
  label = label[..., None]
  return jnp.stack([jnp.any(label == jnp.asarray(v, label.dtype), axis=-1)
                    for v in region_values], axis=-1).astype(jnp.float32)


def level_targets(levels, n_regions: int):
  """0/1 float32 [..., R] targets of a nested level map (input_pipeline.label_lut): region r
  is level > r, so WT ⊇ TC ⊇ ET holds in the targets by construction."""
  return (levels[..., None] > jnp.arange(n_regions, dtype=levels.dtype)).astype(jnp.float32)


def region_bce(logits, targets):
  """Mean per-pixel, per-region sigmoid binary cross-entropy (the region head's CE term)."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets))


def cross_entropy(logits, label):
  """Mean pixel-wise softmax cross-entropy."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), label.astype(jnp.int32)))


def negative_cosine(p, z):
  """D(p, z) = -cos(p, stop_gradient(z)) per row of [N, C]."""
  p = p.astype(jnp.float32)
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  # Three channel sums in one fused pass each (sums.py: 126 MB per tensor at full resolution).
  dot, p_sq, z_sq = fused_sums(p * z, p * p, z * z, axis=-1)
  # Norms floored at COSINE_EPS like optax.safe_norm: a finite gradient for an all-zero vector.
  floor = COSINE_EPS * COSINE_EPS
  return -dot / (jnp.sqrt(jnp.maximum(p_sq, floor)) * jnp.sqrt(jnp.maximum(z_sq, floor)))


def simsiam_level_loss(heads, mask_mode):
  """L_sim,l = ½[D(p_t, z_r) + D(p_r, z_t)], averaged over Ω_NR ('normal_only') or every
  pixel ('zero_tumor', the authors' code, whose tumor vectors were zeroed before the heads)."""
  d = 0.5 * (negative_cosine(heads['p_t'], heads['z_r']) +
             negative_cosine(heads['p_r'], heads['z_t']))
  if mask_mode == 'zero_tumor':
    return jnp.mean(d)
  if mask_mode != 'normal_only':
    raise ValueError(f"config.loss.sim_mask_mode={mask_mode!r}; expected 'normal_only' or "
                     "'zero_tumor'")
  w = heads['mask'].astype(jnp.float32)
  return jnp.sum(d * w) / jnp.maximum(jnp.sum(w), 1.0)


def segmentation_loss(outputs, label, config):
  """L = Dice + ce_weight·CE + sim_weight·Σ_l L_sim,l; returns (loss, metrics of every term).

  task.regions 'wt' (the paper): softmax Dice on the foreground and softmax CE of the binary
  map. 'wt_tc_et': `label` is the nested level map, the logits one sigmoid per region; Dice is
  region_dice_loss and CE the per-region sigmoid BCE (nnU-Net's region-based training).
  """
  lo = config.loss
  logits = outputs['logits']
  n_regions = len(labels.region_names(config))
  if n_regions == 1:
    pooling = lo.get('dice_pooling', 'batch')
    if pooling in ('sample', 'both'):
      if lo.get('dice_fn_weight', 0.5) != 0.5:
        raise ValueError(f'config.loss.dice_pooling={pooling} has no Tversky form; set '
                         'loss.dice_fn_weight=0.5 or dice_pooling=batch')
      loss_fn = per_sample_dice_loss if pooling == 'sample' else sample_and_batch_dice_loss
      dice = loss_fn(logits, label, lo.dice_smooth)
    elif pooling == 'batch':
      dice = dice_loss(logits, label, lo.dice_smooth, lo.get('dice_fn_weight', 0.5))
    else:
      raise ValueError(f"config.loss.dice_pooling={pooling!r}; expected 'batch', 'sample' "
                       "or 'both'")
    ce = cross_entropy(logits, label)
  else:
    targets = level_targets(label, n_regions)
    dice = region_dice_loss(logits, targets, lo.dice_smooth)
    ce = region_bce(logits, targets)
  loss = dice + lo.ce_weight * ce
  metrics = {'dice_loss': dice, 'ce': ce}
  sim = jnp.zeros((), jnp.float32)
  for level, heads in enumerate(outputs.get('simsiam', ())):
    level_loss = simsiam_level_loss(heads, lo.sim_mask_mode)
    metrics[f'sim_l{level}'] = level_loss
    sim = sim + level_loss
  metrics['sim'] = sim
  loss = loss + lo.sim_weight * sim
  metrics['loss'] = loss
  return loss, metrics
