"""Augmentation of one 2.5D training example, in numpy / scipy (no TensorFlow, no JAX).

Why: a model trained on one generator or one scanner meets others (grids, gains, contrast,
bias, blur, thick slices, noise). Each example gets, from its own numpy Generator (so a
(seed, example index) pair always gives the same result, whatever reads the data):

* spatial (SPEC §7), one draw for the whole example: mirroring per in-plane axis, a small
  rotation and scaling about the centre; applied identically to every channel of `image`,
  to `normal`, to `label` (nearest) and to `brain` (nearest). Pixels brought in from outside
  take each channel's background (its corner value: 0 for the matched images, -1 for the
  pseudo-normal), label 0 and brain False.
* intensity, per modality (`per_modality`; else one draw for all, the TF pipeline's way), each
  with its own probability and the same parameters for all 2K+1 slices of that modality:
  in-plane blur, simulated low resolution, blur across the 2K+1 slices (thick slices), a
  smooth multiplicative bias field (one field for all modalities with `bias_shared`, as one
  receive coil makes it), Gaussian noise, contrast (scale and shift) and gamma.
  They act on each slice's foreground (pixels that differ from its background) only: the
  prepared images are 0 outside the brain at test time too.

The pseudo-normal stack gets the spatial transforms only (`normal_intensity` False). It is the
frozen IntroVAE's reconstruction in its own learned normal appearance, recomputed from each
test T1, so a scanner's gain, bias or blur does not pass into it one to one. Leaving it
untouched while the T1 changes teaches the CLFC comparison that scanner differences between
T1 and pseudo-normal are not tumor. `normal_intensity` True applies the normal modality's
intensity draws to it as well (the TF pipeline's behaviour).

Every random number is drawn whether or not its transform fires, in a fixed order, so turning
one transform on or off leaves the others' parameters as they were (and tests can isolate one).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

_BIAS_ORDER = 3   # degree of the bias field's polynomial (in-plane, image-centred).


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The Generator of one example: a pure function of (seed, example index)."""
  return np.random.default_rng([int(seed), int(index)])


@dataclasses.dataclass(frozen=True)
class ModalityDraw:
  """Intensity parameters of one modality (a transform is off when its flag is False)."""
  blur: bool
  blur_sigma: float           # pixels, in-plane
  lowres: bool
  lowres_factor: float        # down-sampling factor in-plane
  slab: bool
  slab_sigma: float           # slices, across the 2K+1 slices
  bias: bool
  bias_coefficients: tuple    # polynomial log-field, scaled so max |log field| = bias_amplitude
  bias_amplitude: float
  noise: bool
  contrast: bool
  scale: float
  shift: float
  gamma: bool
  gamma_value: float
  bias_kind: str = 'polynomial'   # or 'grid' (aug.bias_kind)
  bias_cell: float = 0.0          # grid: cell size as a fraction of the image height


@dataclasses.dataclass(frozen=True)
class Draw:
  """Every random choice of one example."""
  flips: tuple                # (flip axis 0, flip axis 1)
  angle_deg: float            # 0 when rotation does not fire
  zoom: float                 # 1 when scaling does not fire; > 1 enlarges
  modalities: tuple           # ModalityDraw per modality
  noise_seed: int

  @property
  def warps(self) -> bool:
    return self.angle_deg != 0.0 or self.zoom != 1.0


_BIAS_FIELDS = ('bias', 'bias_coefficients', 'bias_amplitude', 'bias_kind', 'bias_cell')


def _n_bias_terms():
  return (_BIAS_ORDER + 1) * (_BIAS_ORDER + 2) // 2


def _bias_rng(coefficients, stream: int) -> np.random.Generator:
  """The grid bias field's own Generators (stream 0: its cell size, 1: its values), seeded by
  the modality's polynomial draw: the grid kind draws nothing more from the example's stream,
  so every other parameter stays as it is."""
  words = np.frombuffer(np.asarray(coefficients, np.float64).tobytes(), np.uint64)
  return np.random.default_rng([*words.tolist(), stream])


def _draw_modality(rng, aug) -> ModalityDraw:
  u = rng.uniform(size=7)
  draw = ModalityDraw(
      blur=bool(u[0] < aug.blur_prob), blur_sigma=float(rng.uniform(*aug.blur_sigma)),
      lowres=bool(u[1] < aug.lowres_prob), lowres_factor=float(rng.uniform(*aug.lowres_factor)),
      slab=bool(u[2] < aug.slab_prob), slab_sigma=float(rng.uniform(*aug.slab_sigma)),
      bias=bool(u[3] < aug.bias_prob),
      bias_coefficients=tuple(rng.uniform(-1.0, 1.0, _n_bias_terms()).tolist()),
      bias_amplitude=float(rng.uniform(0.0, aug.bias_strength)),
      noise=bool(u[4] < aug.noise_prob),
      contrast=bool(u[5] < aug.intensity_prob),
      scale=float(rng.uniform(1.0 - aug.intensity_scale, 1.0 + aug.intensity_scale)),
      shift=float(rng.uniform(-aug.intensity_shift, aug.intensity_shift)),
      gamma=bool(u[6] < aug.gamma_prob), gamma_value=float(rng.uniform(*aug.gamma_range)))
  kind = getattr(aug, 'bias_kind', 'polynomial')
  if kind == 'polynomial':
    return draw
  if kind != 'grid':
    raise ValueError(f"augment.bias_kind={kind!r}; expected 'polynomial' or 'grid'")
  cell = float(_bias_rng(draw.bias_coefficients, 0).uniform(*aug.bias_cell))
  return dataclasses.replace(draw, bias_kind='grid', bias_cell=cell)


def draw(rng: np.random.Generator, aug, n_modalities: int) -> Draw:
  """All random parameters of one example, in a fixed order (see the module docstring)."""
  u = rng.uniform(size=4)
  flips = (bool(u[0] < aug.flip_prob), bool(u[1] < aug.flip_prob))
  angle = float(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
  zoom = float(rng.uniform(*aug.scale_range))
  per = [_draw_modality(rng, aug) for _ in range(n_modalities)]
  if not aug.per_modality:
    per = [per[0]] * n_modalities
  elif getattr(aug, 'bias_shared', False):
    # One receive coil: the bias field is the first modality's in every modality (its other
    # draws stay its own), so the ratios between modalities keep the tissue's contrast.
    shared = {f: getattr(per[0], f) for f in _BIAS_FIELDS}
    per = [dataclasses.replace(m, **shared) for m in per]
  return Draw(flips=flips, angle_deg=angle if u[2] < aug.rotate_prob else 0.0,
              zoom=zoom if u[3] < aug.scale_prob else 1.0, modalities=tuple(per),
              noise_seed=int(rng.integers(2 ** 63)))


# --- spatial -----------------------------------------------------------------------------------

def _source_coords(shape, angle_deg, zoom):
  """Input (row, col) of every output pixel: rotation by angle and zoom about the centre."""
  h, w = shape
  a = np.deg2rad(angle_deg)
  inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / zoom
  centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                           indexing='ij')
  out = np.stack([rows - centre[0], cols - centre[1]])
  return np.tensordot(inv, out, axes=1) + centre[:, None, None]


def _warp_dense(x, coords):
  """Bilinear warp of every channel of x [H, W, C]; outside pixels take the channel's corner.

  scipy's map_coordinates(order=1, mode='constant') per channel, done once for all channels
  (the four taps and weights are shared): it was ~40% of the augmentation's time at 192x160
  with 25 channels. tests/test_augment.py checks it against scipy.
  """
  h, w, channels = x.shape
  r, c = coords
  inside = ((r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)).ravel()
  r0 = np.clip(np.floor(r), 0, max(h - 2, 0)).astype(np.intp).ravel()
  c0 = np.clip(np.floor(c), 0, max(w - 2, 0)).astype(np.intp).ravel()
  fr = (r.ravel() - r0).astype(np.float32)[:, None]
  fc = (c.ravel() - c0).astype(np.float32)[:, None]
  flat = x.reshape(h * w, channels)
  top, bottom = r0 * w + c0, np.minimum(r0 + 1, h - 1) * w + c0
  right = (c0 + 1 < w).astype(np.intp)
  take = lambda idx: np.take(flat, idx, axis=0)
  out = ((take(top) * (1 - fc) + take(top + right) * fc) * (1 - fr) +
         (take(bottom) * (1 - fc) + take(bottom + right) * fc) * fr)
  out[~inside] = x[0, 0]
  return out.reshape(h, w, channels).astype(x.dtype, copy=False)


def _warp_nearest(x, coords, fill):
  return ndi.map_coordinates(x, coords, order=0, mode='constant', cval=fill, prefilter=False)


def spatial(example: dict, d: Draw) -> dict:
  """Mirroring, then rotation / scaling, identically on image, normal, label and brain."""
  out = dict(example)
  dense = [k for k in ('image', 'normal') if k in example]
  for axis, flip in enumerate(d.flips):
    if flip:
      for k in dense + ['label', 'brain']:
        out[k] = np.flip(out[k], axis)
  if d.warps:
    coords = _source_coords(out['label'].shape, d.angle_deg, d.zoom)
    for k in dense:
      out[k] = _warp_dense(np.ascontiguousarray(out[k]), coords)
    out['label'] = _warp_nearest(np.ascontiguousarray(out['label']), coords, 0)
    out['brain'] = _warp_nearest(out['brain'].astype(np.uint8), coords, 0).astype(bool)
  for k in dense + ['label', 'brain']:
    out[k] = np.ascontiguousarray(out[k])
  return out


# --- intensity ---------------------------------------------------------------------------------

def _bias_field(shape, coefficients, amplitude, kind='polynomial', cell=0.0):
  """exp(log field), the log scaled to max |.| = amplitude. 'polynomial': a cubic in centred,
  unit-range coordinates (one smooth swell); 'grid': cubic interpolation of Gaussian values on
  a grid of `cell` x image-height cells (the finer fields of old coils and 7 T scanners)."""
  h, w = shape
  if kind == 'grid':
    rows = int(np.ceil(1.0 / cell)) + 1
    cols = int(np.ceil(w / (h * cell))) + 1
    values = _bias_rng(coefficients, 1).standard_normal((rows, cols))
    log = ndi.zoom(values, (h / rows, w / cols), order=3, mode='nearest', grid_mode=True)
  else:
    y = np.linspace(-1.0, 1.0, h)[:, None]
    x = np.linspace(-1.0, 1.0, w)[None, :]
    log = np.zeros(shape)
    k = 0
    for i in range(_BIAS_ORDER + 1):
      for j in range(_BIAS_ORDER + 1 - i):
        log = log + coefficients[k] * y ** i * x ** j
        k += 1
  log = log - log.mean()
  peak = np.abs(log).max()
  if peak > 0:
    log *= amplitude / peak
  return np.exp(log).astype(np.float32)


def _lowres(x, factor):
  """x [H, W, S] as if acquired with pixels `factor` times larger (anti-alias blur, linear
  down-sampling), brought back to its own grid (linear)."""
  h, w = x.shape[:2]
  small = ndi.gaussian_filter(x, (0.5 * factor, 0.5 * factor, 0), mode='nearest')
  small = ndi.zoom(small, (1 / factor, 1 / factor, 1), order=1, mode='nearest', grid_mode=True)
  return ndi.zoom(small, (h / small.shape[0], w / small.shape[1], 1), order=1, mode='nearest',
                  grid_mode=True)


def intensity(x, fg, m: ModalityDraw, noise_rng, noise_std) -> np.ndarray:
  """One modality's stack x [H, W, S] (float32), transformed on its foreground `fg` [H, W, S]."""
  y = x
  if m.blur:
    y = ndi.gaussian_filter(y, (m.blur_sigma, m.blur_sigma, 0), mode='nearest')
  if m.lowres:
    y = _lowres(y, m.lowres_factor)
  if m.slab and y.shape[2] > 1:
    y = ndi.gaussian_filter1d(y, m.slab_sigma, axis=2, mode='nearest')
  if m.bias:
    y = y * _bias_field(y.shape[:2], m.bias_coefficients, m.bias_amplitude, m.bias_kind,
                        m.bias_cell)[..., None]
  if m.noise:
    y = y + noise_rng.normal(0.0, noise_std, y.shape).astype(np.float32)
  if m.contrast:
    y = y * np.float32(m.scale) + np.float32(m.shift)
  if m.gamma and fg.any():
    # On the modality's own foreground range, the same for its 2K+1 slices.
    lo, hi = y[fg].min(), y[fg].max()
    span = max(float(hi - lo), 1e-6)
    y = lo + span * np.power(np.clip((y - lo) / span, 0.0, 1.0), m.gamma_value)
  if y is x:
    return x
  return np.where(fg, y, x).astype(np.float32)


def _apply_intensity(stack, n_groups, draws, noise_rng, noise_std):
  """stack [H, W, n_groups * S]: group g (a modality's S slices) gets draws[g]."""
  s = stack.shape[2] // n_groups
  background = stack[:1, :1, :]
  fg = stack != background
  out = stack.copy()
  for g, m in enumerate(draws):
    sl = slice(g * s, (g + 1) * s)
    out[..., sl] = intensity(stack[..., sl], fg[..., sl], m, noise_rng, noise_std)
  return out


def augment_example(example: dict, rng: np.random.Generator, aug, k: int,
                    normal_index: int = 0, return_draw: bool = False):
  """One augmented example (a new dict; other keys pass through untouched).

  example: 'image' float32 [H, W, M(2K+1)] modality-major, optional 'normal' float32
  [H, W, 2K+1], 'label' int [H, W], 'brain' bool [H, W]. aug: config.data.augment.
  normal_index: the modality whose intensity draws the pseudo-normal shares when
  aug.normal_intensity. Identity (the same arrays) when aug.enabled is False.
  """
  s = 2 * int(k) + 1
  image = example['image']
  if image.ndim != 3 or image.shape[2] % s:
    raise ValueError(f"augment: image shape {image.shape} is not [H, W, M*(2K+1)] for K={k}")
  n_modalities = image.shape[2] // s
  if 'normal' in example and example['normal'].shape[2] != s:
    raise ValueError(f"augment: normal shape {example['normal'].shape} is not [H, W, {s}]")
  if not aug.enabled:
    return (dict(example), None) if return_draw else dict(example)
  d = draw(rng, aug, n_modalities)
  out = spatial(example, d)
  noise_rng = np.random.default_rng(d.noise_seed)
  out['image'] = _apply_intensity(np.asarray(out['image'], np.float32), n_modalities,
                                  d.modalities, noise_rng, aug.noise_std)
  if 'normal' in out and aug.normal_intensity:
    out['normal'] = _apply_intensity(np.asarray(out['normal'], np.float32), 1,
                                     (d.modalities[normal_index],), noise_rng, aug.noise_std)
  out['label'] = out['label'].astype(example['label'].dtype, copy=False)
  return (out, d) if return_draw else out
