"""Figures from plain arrays: paper Figs. 2-4, pseudo-normal examples, IntroVAE samples and
training curves. Nothing here reads a workdir or runs a model (clfc_jax/report/gather.py
turns a workdir into these arrays), so it imports nothing of clfc_jax.

`plot_*` functions take plain arrays, write one PNG each (atomically) and return the
matplotlib Figure. Axial slices are shown
in radiological convention, in every panel: anterior up, the patient's right on the viewer's
left. A slice arrives as [H, W] with H running posterior -> anterior and W left -> right (the
prepared MNI layout; a canonical RAS+ native slice transposed); `radiological` flips both axes.

Figures are drawn on a bare matplotlib `Figure` (Agg canvas), never through pyplot, so nothing
global (backend, open figures) changes in the calling process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
import numpy as np

from data_prep import optional
from data_prep import store

LEVEL_NAMES = ('1/8', '1/4', '1/2', 'full')
# Fig. 3's point groups: (key, legend label, colour, marker).
FEATURE_GROUPS = (
    ('normal_zeta', 'normal, ζ(F_T)', '#1f77b4', 'o'),
    ('normal_g', 'normal, g(F_R)', '#2ca02c', '^'),
    ('tumor_zeta', 'tumor, ζ(F_T)', '#d62728', 'x'),
    ('tumor_g', 'tumor, g(F_R)', '#9467bd', '+'),
)
GT_COLOR = '#ffd400'        # ground truth contour (yellow)
PRED_COLOR = '#00e5ff'      # a method's prediction contour (cyan)
_METHOD_NAMES = {'clfc': 'CLFC (ours)', 'baseline1': 'Baseline-1', 'baseline2': 'Baseline-2',
                 'unet': 'U-Net'}


def method_name(method: str) -> str:
  return _METHOD_NAMES.get(method, method)


# --- display helpers ---------------------------------------------------------------------------
def radiological(slice_pa_lr) -> np.ndarray:
  """[H posterior->anterior, W left->right] -> display rows/columns: anterior up, right left."""
  return np.asarray(slice_pa_lr)[::-1, ::-1]


def display_range(image, mask=None, low=1.0, high=99.5):
  """Grey-value window: percentiles of the (brain) voxels, so a bright outlier cannot wash out
  the slice."""
  image = np.asarray(image, np.float32)
  values = image[mask] if mask is not None and np.any(mask) else image[image != 0]
  if values.size == 0:
    return float(image.min()), float(image.max()) + 1e-6
  lo, hi = np.percentile(values, [low, high])
  return float(lo), float(max(hi, lo + 1e-6))


def crop_box(mask, margin: int = 3):
  """(rows, cols) slices of the bounding box of `mask` plus a margin; everything if empty."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return slice(None), slice(None)
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
          slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def zoom_box(mask, shape, min_fraction: float = 0.5, scale: float = 2.2):
  """(rows, cols) slices of a window centred on `mask`: `scale` times its extent, at least
  `min_fraction` of the image per axis, so that small tumours' contours can be compared."""
  mask = np.asarray(mask, bool)
  if not mask.any():
    return slice(None), slice(None)
  out = []
  for axis, n in enumerate(shape):
    idx = np.flatnonzero(mask.any(axis=1 - axis))
    side = int(min(n, max(np.ceil(scale * (idx[-1] - idx[0] + 1)), np.ceil(min_fraction * n))))
    start = int(np.clip(round((idx[0] + idx[-1]) / 2 - side / 2), 0, n - side))
    out.append(slice(start, start + side))
  return tuple(out)


def _grid(rows: int, cols: int, panel_in: float = 2.2, extra_w: float = 0.0,
          extra_h: float = 0.45):
  fig = Figure(figsize=(cols * panel_in + extra_w, rows * panel_in + extra_h),
               layout='constrained')
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return fig, axes


def _contour(ax, mask, color, width=1.4, style='solid'):
  mask = np.asarray(mask, np.float32)
  if mask.any() and not mask.all():
    ax.contour(mask, levels=[0.5], colors=[color], linewidths=width, linestyles=style)


def _orientation_marks(ax):
  """'R' / 'L' / 'A' at the panel edges: the convention, readable without the caption."""
  style = dict(transform=ax.transAxes, color='white', fontsize=8, fontweight='bold')
  ax.text(0.02, 0.5, 'R', ha='left', va='center', **style)
  ax.text(0.98, 0.5, 'L', ha='right', va='center', **style)
  ax.text(0.5, 0.98, 'A', ha='center', va='top', **style)


def _blank(ax, text):
  ax.set_facecolor('#f0f0f0')
  ax.text(0.5, 0.5, text, ha='center', va='center', fontsize=9, color='#555555',
          transform=ax.transAxes, wrap=True)


def _save(fig, path, dpi) -> Figure:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with store.atomic_write(path) as tmp:
    fig.savefig(tmp, dpi=dpi, facecolor='white')
  return fig


def panels(fig: Figure) -> list:
  """The axes of a figure that show something (colour bars and hidden axes excluded)."""
  return [ax for ax in fig.axes
          if ax.get_visible() and ax.get_label() != '<colorbar>' and ax.has_data()]


# --- Fig. 2: segmentation overlays -------------------------------------------------------------
def plot_segmentation_overlays(rows: Sequence[Mapping], methods: Sequence[str], path,
                               dpi: int = 100) -> Figure:
  """Rows: patients; columns: ground truth, then each method's prediction on the same slice.

  Each row: {'title', 'image' [H, W], 'truth' [H, W] bool, 'predictions': {method: [H, W]
  bool or None}, 'dice': {method: float}, 'aspect'?: float}; arrays already in display order.
  The ground truth is drawn (dashed) in every method panel too, so misses and false alarms
  are the gaps between the two contours.
  """
  fig, axes = _grid(len(rows), 1 + len(methods), panel_in=2.3)
  for r, row in enumerate(rows):
    image = np.asarray(row['image'], np.float32)
    vmin, vmax = display_range(image, image != 0)
    aspect = row.get('aspect', 1.0)
    for c in range(1 + len(methods)):
      ax = axes[r, c]
      ax.imshow(image, cmap='gray', vmin=vmin, vmax=vmax, aspect=aspect,
                interpolation='bilinear')
      if c == 0:
        _contour(ax, row['truth'], GT_COLOR, 1.6)
        ax.set_title('Ground truth', fontsize=10)
        ax.set_ylabel(row['title'], fontsize=9)
        if r == 0:
          _orientation_marks(ax)
        continue
      method = methods[c - 1]
      pred = row['predictions'].get(method)
      if pred is None:
        ax.set_title(method_name(method), fontsize=10)
        ax.text(0.5, 0.5, 'no prediction', ha='center', va='center', color='white',
                transform=ax.transAxes)
        continue
      _contour(ax, pred, PRED_COLOR, 1.8)
      _contour(ax, row['truth'], GT_COLOR, 1.1, 'dashed')   # on top: both stay visible
      dice = row['dice'].get(method)
      dice_text = '' if dice is None else f'\nDice {100 * dice:.1f}%'
      ax.set_title(f'{method_name(method)}{dice_text}', fontsize=10)
  handles = [Line2D([], [], color=GT_COLOR, lw=2, label='ground truth (dashed in method panels)'),
             Line2D([], [], color=PRED_COLOR, lw=2, label='prediction')]
  fig.legend(handles=handles, loc='outside lower center', ncol=2, fontsize=9, frameon=False)
  return _save(fig, path, dpi)


# --- Fig. 3: PCA of the CLFC features ----------------------------------------------------------
def pca_2d(points: np.ndarray):
  """(2-D projection, explained variance ratios) of the rows of `points` (scikit-learn PCA)."""
  pca = optional.pca(n_components=2, svd_solver='full')
  return pca.fit_transform(np.asarray(points, np.float64)), pca.explained_variance_ratio_


def plot_feature_pca(panels: Mapping[str, Mapping], path, subtitle: str = '',
                     dpi: int = 100) -> Figure:
  """One scatter per method of its ζ(F_T) / g(F_R) pixel vectors, PCA fitted per method.

  panels: {method: {group key of FEATURE_GROUPS: [N, C] array, 'cos_normal'?: float,
  'cos_tumor'?: float}}; absent or empty groups are left out.
  """
  fig, axes = _grid(1, len(panels), panel_in=4.0, extra_h=0.6)
  for ax, (method, groups) in zip(axes[0], panels.items()):
    present = [(k, lab, col, mk) for k, lab, col, mk in FEATURE_GROUPS
               if k in groups and len(groups[k])]
    if not present:
      _blank(ax, 'no feature vectors')
      continue
    projected, ratio = pca_2d(np.concatenate([groups[k] for k, *_ in present]))
    start = 0
    for key, label, color, marker in present:
      n = len(groups[key])
      xy = projected[start:start + n]
      start += n
      filled = marker not in ('x', '+')
      ax.scatter(xy[:, 0], xy[:, 1], s=9 if filled else 14, c=color, marker=marker,
                 alpha=0.4 if filled else 0.8, linewidths=0.0 if filled else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f'PC 1 ({100 * ratio[0]:.0f}% of variance)', fontsize=9)
    ax.set_ylabel(f'PC 2 ({100 * ratio[1]:.0f}%)', fontsize=9)
    title = method_name(method)
    if groups.get('cos_normal') is not None:
      title += (f'\nmean cos(ζ, g): normal {groups["cos_normal"]:.2f}, tumor '
                f'{groups.get("cos_tumor", float("nan")):.2f}')
    ax.set_title(title, fontsize=10)
  first = next(iter(panels.values()))
  count = lambda k: f' ({len(first[k])} pixels)' if k in first else ''
  handles = [Line2D([], [], ls='', marker=mk, color=col, markersize=7, label=lab + count(k))
             for k, lab, col, mk in FEATURE_GROUPS]
  fig.legend(handles=handles, loc='outside lower center', ncol=2, fontsize=9, frameon=False)
  if subtitle:
    fig.suptitle(subtitle, fontsize=10)
  return _save(fig, path, dpi)


def feature_groups(zeta, g, label, brain, max_points: int, seed: int = 0) -> dict:
  """Pixel vectors of one level split by region, plus the mean per-pixel cosine of ζ and g.

  zeta, g: [N, h, w, C]; label, brain: [N, H, W] at full resolution, nearest-downsampled here
  as the SimSiam mask is (stride H/h). Normal = inside the brain and outside the tumor (the
  background outside the head would otherwise swamp the scatter).
  """
  zeta, g = np.asarray(zeta, np.float32), np.asarray(g, np.float32)
  sh, sw = label.shape[1] // zeta.shape[1], label.shape[2] // zeta.shape[2]
  tumor = np.asarray(label)[:, ::sh, ::sw] > 0
  inside = np.asarray(brain)[:, ::sh, ::sw].astype(bool)
  regions = {'tumor': tumor, 'normal': inside & ~tumor}
  rng = np.random.default_rng(seed)
  out = {}
  for region, mask in regions.items():
    z_vec, g_vec = zeta[mask], g[mask]
    if len(z_vec):
      cos = np.sum(z_vec * g_vec, -1) / (np.linalg.norm(z_vec, axis=-1) *
                                         np.linalg.norm(g_vec, axis=-1) + 1e-8)
      out[f'cos_{region}'] = float(cos.mean())
    pick = rng.permutation(len(z_vec))[:max_points]
    out[f'{region}_zeta'], out[f'{region}_g'] = z_vec[pick], g_vec[pick]
  return out


# --- Fig. 4: attention maps --------------------------------------------------------------------
def plot_attention_maps(rows: Sequence[Mapping], path, subtitle: str = '',
                        dpi: int = 100) -> Figure:
  """Rows: methods; columns: input with ground truth, A_l for each level, the prediction.

  Each row: {'method', 'image' [H, W], 'truth' [H, W], 'attention': [[h_l, w_l] per level],
  'prob' [H, W], 'means'?: [(tumor, rest of brain) per level]}; arrays already in display
  order. A_l shares one 0..1 colour scale; the means go under each map.
  """
  num_levels = max(len(r['attention']) for r in rows)
  cols = 2 + num_levels
  fig, axes = _grid(len(rows), cols, panel_in=2.0, extra_h=0.9)
  mappable = None
  for r, row in enumerate(rows):
    image = np.asarray(row['image'], np.float32)
    vmin, vmax = display_range(image, image != 0)
    height, width = image.shape
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    ax = axes[r, 0]
    ax.imshow(image, cmap='gray', vmin=vmin, vmax=vmax)
    _contour(ax, row['truth'], GT_COLOR, 1.4)
    ax.set_ylabel(method_name(row['method']), fontsize=10)
    if r == 0:
      ax.set_title('Input, ground truth', fontsize=10)
      _orientation_marks(ax)
    for level in range(num_levels):
      ax = axes[r, 1 + level]
      if level >= len(row['attention']):
        _blank(ax, 'no level')
        continue
      att = np.asarray(row['attention'][level], np.float32)
      mappable = ax.imshow(att, cmap='viridis', vmin=0.0, vmax=1.0, extent=extent,
                           interpolation='nearest')
      _contour(ax, row['truth'], 'white', 0.8, 'dashed')
      if row.get('means'):
        tumor, rest = row['means'][level]
        ax.set_xlabel(f'mean: tumor {tumor:.2f} · brain {rest:.2f}', fontsize=8)
      if r == 0:
        name = LEVEL_NAMES[level] if num_levels == len(LEVEL_NAMES) else str(level)
        ax.set_title(f'A_{level + 1} ({name}, {att.shape[0]}×{att.shape[1]})', fontsize=9)
    ax = axes[r, -1]
    ax.imshow(image, cmap='gray', vmin=vmin, vmax=vmax)
    _contour(ax, np.asarray(row['prob']) > 0.5, PRED_COLOR, 1.4)
    _contour(ax, row['truth'], GT_COLOR, 1.0, 'dashed')
    if r == 0:
      ax.set_title('Prediction', fontsize=10)
  if mappable is not None:
    bar = fig.colorbar(mappable, ax=axes[:, 1:1 + num_levels].ravel().tolist(), shrink=0.5,
                       location='bottom', aspect=40)
    bar.set_label('attention A_l', fontsize=9)
  if subtitle:
    fig.suptitle(subtitle, fontsize=10)
  return _save(fig, path, dpi)


# --- pseudo-normal examples --------------------------------------------------------------------
def plot_pseudo_normals(rows: Sequence[Mapping], path, dpi: int = 100) -> Figure:
  """Rows: patients; columns: tumor T1, pseudo-normal T1, healthy T1 (when any row has one),
  |pseudo - tumor T1| (what the IntroVAE changed) and |pseudo - healthy| (its error).

  Each row: {'title', 'tumor_t1', 'pseudo', 'healthy' or None, 'truth'}: [H, W] in [-1, 1],
  display order. Difference maps share one 0..1 scale.
  """
  with_healthy = any(r.get('healthy') is not None for r in rows)
  titles = ['Tumor T1', 'Pseudo-normal T1'] + (['Healthy T1 (truth)'] if with_healthy else [])
  titles += ['|pseudo − tumor T1|'] + (['|pseudo − healthy|'] if with_healthy else [])
  fig, axes = _grid(len(rows), len(titles), panel_in=2.1, extra_w=0.7)
  mappable = None
  for r, row in enumerate(rows):
    tumor, pseudo = np.asarray(row['tumor_t1']), np.asarray(row['pseudo'])
    healthy = row.get('healthy')
    panels = [('image', tumor), ('image', pseudo)]
    if with_healthy:
      panels.append(('image', healthy))
    panels.append(('diff', np.abs(pseudo - tumor)))
    if with_healthy:
      panels.append(('diff', None if healthy is None else np.abs(pseudo - np.asarray(healthy))))
    for c, (kind, data) in enumerate(panels):
      ax = axes[r, c]
      if r == 0:
        ax.set_title(titles[c], fontsize=10)
      if data is None:
        _blank(ax, 'healthy T1\nnot known')
        continue
      if kind == 'image':
        ax.imshow(data, cmap='gray', vmin=-1.0, vmax=1.0)
      else:
        mappable = ax.imshow(data, cmap='magma', vmin=0.0, vmax=1.0)
      _contour(ax, row['truth'], GT_COLOR if kind == 'image' else 'white', 0.9, 'dashed')
    axes[r, 0].set_ylabel(row['title'], fontsize=9)
    if r == 0:
      _orientation_marks(axes[0, 0])
  if mappable is not None:
    diff_cols = [i for i, t in enumerate(titles) if t.startswith('|')]
    bar = fig.colorbar(mappable, ax=axes[:, diff_cols].ravel().tolist(), shrink=0.8, pad=0.01)
    bar.set_label('absolute difference ([-1, 1] units)', fontsize=9)
  return _save(fig, path, dpi)


# --- training curves ---------------------------------------------------------------------------
def _epoch_axis(records) -> tuple:
  """(steps per epoch or None, axis label): epochs from the end-of-epoch events' step/epoch."""
  for rec in records:
    if rec.get('event') in ('val', 'checkpoint') and rec.get('epoch'):
      return rec['step'] / rec['epoch'], 'epoch'
  return None, 'step'


def _series(records, event, key, per_epoch):
  """(x, y) of one logged scalar; empty when absent or identically zero (a switched-off loss
  term, e.g. L_sim of the baselines, would otherwise draw a misleading flat line)."""
  xs, ys = [], []
  for rec in records:
    if rec.get('event') == event and key in rec and rec[key] is not None:
      xs.append(rec['step'] / per_epoch if per_epoch else rec['step'])
      ys.append(float(rec[key]))
  if not any(ys):
    return np.zeros(0), np.zeros(0)
  return np.asarray(xs), np.asarray(ys)


def plot_training_curves(runs: Mapping[tuple, Sequence[Mapping]], path,
                         dpi: int = 100) -> Figure:
  """Training loss terms and validation Dice vs epoch, one line per method (colour) and fold
  (line style). runs: {(method, fold): metrics.jsonl records}."""
  panels = [('train', 'loss', 'total loss'), ('train', 'dice_loss', 'Dice loss'),
            ('train', 'ce', 'cross-entropy'), ('train', 'sim', 'L_sim (Σ levels)'),
            ('val', 'val_dice', 'validation Dice (patient mean)')]
  panels = [p for p in panels if any(_series(r, p[0], p[1], None)[0].size for r in runs.values())]
  cols = min(len(panels), 3)
  nrows = -(-len(panels) // cols)
  fig = Figure(figsize=(3.6 * cols, 2.9 * nrows + 0.4), layout='constrained')
  axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  methods = list(dict.fromkeys(m for m, _ in runs))
  # Earlier methods wider: lines that coincide (baseline2 tracks clfc closely) stay visible.
  widths = {m: 1.2 + 1.4 * (len(methods) - 1 - i) / max(len(methods) - 1, 1)
            for i, m in enumerate(methods)}
  colors = {m: f'C{i}' for i, m in enumerate(methods)}
  styles = ['-', '--', ':', '-.']
  folds = sorted({k for _, k in runs})
  xlabel = 'step'
  for ax, (event, key, title) in zip(axes, panels):
    for (method, fold), records in runs.items():
      per_epoch, xlabel = _epoch_axis(records)
      xs, ys = _series(records, event, key, per_epoch)
      if xs.size:
        ax.plot(xs, ys, color=colors[method], ls=styles[folds.index(fold) % len(styles)],
                marker='o' if event == 'val' else None, ms=3, lw=widths[method], alpha=0.9)
        if event == 'val':
          best = int(np.argmax(ys))
          ax.plot(xs[best], ys[best], marker='*', ms=11, color=colors[method], mec='k',
                  mew=0.6, ls='')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=colors[m], lw=2, label=method_name(m)) for m in methods]
  if len(folds) > 1:
    handles += [Line2D([], [], color='k', ls=styles[i % len(styles)], label=f'fold {k}')
                for i, k in enumerate(folds)]
  handles.append(Line2D([], [], ls='', marker='*', ms=10, color='grey', mec='k',
                        label='best validation (evaluated checkpoint)'))
  fig.legend(handles=handles, loc='outside lower center', ncol=len(handles), fontsize=9,
             frameon=False)
  return _save(fig, path, dpi)


def plot_introvae_curves(records: Sequence[Mapping], path, margin: Optional[float] = None,
                         dpi: int = 100) -> Figure:
  """IntroVAE losses vs epoch: encoder/decoder objectives, reconstruction MSE, the KL terms
  (with the hinge margin m, when given, that the encoder pushes the KL of fakes towards)."""
  per_epoch, xlabel = _epoch_axis(records)
  panels = [('objectives', (('enc/loss', 'encoder L_E'), ('dec/loss', 'decoder L_G'))),
            ('reconstruction MSE', (('enc/mse', 'MSE'),)),
            ('KL divergences (encoder step)', (('enc/kl_real', 'real'), ('enc/kl_rec', 'rec.'),
                                               ('enc/kl_fake', 'sampled')))]
  fig = Figure(figsize=(10.0, 3.2), layout='constrained')
  axes = fig.subplots(1, len(panels))
  for ax, (title, keys) in zip(axes, panels):
    for key, label in keys:
      xs, ys = _series(records, 'train', key, per_epoch)
      if xs.size:
        ax.plot(xs, ys, lw=1.4, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if margin is not None and title.startswith('KL') and ax.has_data():
      ax.axhline(float(margin), color='k', ls='--', lw=1.0, label=f'margin m = {margin:g}')
    if ax.has_data():
      ax.legend(fontsize=8)
      if title.startswith('objectives') or title.startswith('reconstruction'):
        ys = np.concatenate([line.get_ydata() for line in ax.get_lines()])
        if np.all(ys > 0) and ys.max() / ys.min() > 50:
          ax.set_yscale('log')
  return _save(fig, path, dpi)




# --- IntroVAE samples ----------------------------------------------------------------------------
def plot_introvae_samples(rows: Mapping[str, np.ndarray], path, title: str = '',
                          dpi: int = 100) -> Figure:
  """Rows (e.g. real / reconstructed / sampled) of [N, H, W] slices in [-1, 1], prepared
  (MNI) layout; shown in radiological convention like every other figure."""
  names = list(rows)
  n = max(len(np.asarray(v)) for v in rows.values())
  h, w = np.asarray(next(iter(rows.values()))).shape[1:3]
  fig = Figure(figsize=(1.6 * n, 1.6 * len(names) * h / w + 0.4), layout='constrained')
  axes = np.asarray(fig.subplots(len(names), n, squeeze=False))
  for r, name in enumerate(names):
    images = np.asarray(rows[name])
    for c in range(n):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c < len(images):
        ax.imshow(radiological(images[c]), cmap='gray', vmin=-1, vmax=1)
    axes[r, 0].set_ylabel(name)
  if title:
    fig.suptitle(title)
  return _save(fig, path, dpi)


# --- array helpers the gathering code shares ---------------------------------------------------
def tumor_slices(label, count: int) -> list:
  """`count` axial slice indices through the tumor: the largest cross-section first, then
  slices evenly spread over the tumor's extent."""
  area = (np.asarray(label) > 0).sum(axis=(1, 2))
  if not area.any():
    return [int(len(area) // 2)]
  inside = np.flatnonzero(area)
  best = int(np.argmax(area))
  spread = inside[np.linspace(0, len(inside) - 1, num=count + 2).round().astype(int)[1:-1]]
  return list(dict.fromkeys([best] + [int(s) for s in spread]))[:max(count, 1)]


def region_means(attention, label, brain) -> tuple:
  """(mean A_l inside the tumor, mean A_l in the rest of the brain) of one [h, w] map, with the
  full-resolution masks nearest-downsampled as the SimSiam mask is; NaN for an empty region."""
  attention = np.asarray(attention, np.float32)
  sh, sw = label.shape[0] // attention.shape[0], label.shape[1] // attention.shape[1]
  tumor = np.asarray(label)[::sh, ::sw] > 0
  rest = np.asarray(brain, bool)[::sh, ::sw] & ~tumor
  mean = lambda m: float(attention[m].mean()) if m.any() else float('nan')
  return mean(tumor), mean(rest)
