"""Synthetic BraTS/IXI-like cohorts built from the MNI152 tissue templates that nilearn ships.

Why: the project must run end to end offline. Each subject is the MNI152 GM/WM/CSF anatomy
warped by a random smooth deformation and a small random affine, rendered with a
tissue-dependent contrast per modality, a multiplicative bias field, Rician noise and a
scanner-like scale, and stored as int16 NIfTI on a BraTS-like (or, for normal subjects,
IXI-like sagittal) grid. Tumor subjects get an irregular lesion with nested BraTS labels
(2 edema, 4 enhancing rim, 1 necrosis / non-enhancing core), modality-specific appearance and
mass effect, plus the same subject's tumor-free T1 (the pseudo-normal ground truth).

Both layouts are skull-stripped (background 0), like BraTS.
Every subject is seeded from (seed, cohort part, index), so a subject does not depend on how
many others are generated. Generator constants live here, not in the config: they shape test
data, not the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
import time
from typing import Optional

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from data_prep import optional, store

MODALITIES = ('t1', 't1ce', 't2', 'flair')
LABEL_NECROSIS, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 4

# Normal-tissue contrast (CSF, GM, WM) per modality, relative units.
TISSUE_CONTRAST = {
    't1': (0.25, 0.60, 0.85),
    't1ce': (0.30, 0.62, 0.86),
    't2': (1.00, 0.55, 0.40),
    'flair': (0.15, 0.65, 0.50),
}
# Tumor appearance per modality: label -> relative intensity.
TUMOR_CONTRAST = {
    't1': {LABEL_EDEMA: 0.55, LABEL_ENHANCING: 0.50, LABEL_NECROSIS: 0.30},
    't1ce': {LABEL_EDEMA: 0.55, LABEL_ENHANCING: 1.35, LABEL_NECROSIS: 0.35},
    't2': {LABEL_EDEMA: 0.85, LABEL_ENHANCING: 0.70, LABEL_NECROSIS: 0.95},
    'flair': {LABEL_EDEMA: 0.95, LABEL_ENHANCING: 0.80, LABEL_NECROSIS: 0.70},
}
CONTRAST_JITTER = 0.06        # each tissue/tumor level is scaled by 1 ± this per subject.
EDEMA_OPACITY = 0.8           # edema keeps this share of its own look, the rest is tissue.
TUMOR_TEXTURE = 0.06          # multiplicative texture inside the tumor.

BRATS_SHAPE_1MM = (240, 240, 155)
BRATS_CENTRE_MNI = (0.0, -17.0, 12.0)     # grid centre in template mm (top of brain kept).
IXI_SHAPE_1MM = (256, 256, 150)           # sagittal: array axes run to P, S, R.
IXI_VOXEL_1MM = (0.9375, 0.9375, 1.2)
IXI_CENTRE_MNI = (0.0, -10.0, 20.0)

ROTATION_DEG = 5.0
TRANSLATION_MM = 5.0
SCALE_RANGE = 0.05
DEFORM_MM = (1.5, 3.0)        # std of the smooth displacement, drawn per subject.
DEFORM_CELL_MM = 12.0         # correlation length of the displacement.
BIAS_STRENGTH = (0.05, 0.12)  # std of the log bias field.
BIAS_CELL_MM = 40.0
NOISE_STD = (0.015, 0.04)     # Rician sigma relative to white matter.
SCANNER_SCALE = (300.0, 3000.0)

HGG_FRACTION = 0.75
HARD_FRACTION = 0.3           # small tumors near the cortex or the ventricles.
LARGE_RADIUS_MM = (12.0, 28.0)
SMALL_RADIUS_MM = (4.0, 9.0)
MASS_EFFECT = (0.15, 0.5)     # radial compression at the centre, small -> large tumors.
AXIS_FACTORS = (0.75, 1.3)    # ellipsoid semi-axes relative to the radius.
ROUGHNESS = (0.12, 0.3)       # log-amplitude of the lobulation.
CORE_FRACTION = (0.5, 0.8)    # core radius / envelope radius.
NECROSIS_FRACTION = (0.45, 0.75)  # necrosis radius / core radius.
HGG_NECROSIS_SHARE = 0.7      # HGG: edema + enhancing rim + necrosis, else edema + enhancing.
LGG_CORE_SHARE = 0.75         # LGG: edema + non-enhancing core, else edema only.
TISSUE_BRAIN_THRESHOLD = 0.5  # GM+WM+CSF above this is brain.
MIN_TUMOR_VOXELS = 8
MAX_TUMOR_DRAWS = 20


@dataclasses.dataclass
class Grid:
  """An output voxel grid: array shape and voxel -> world (mm) affine."""
  shape: tuple
  affine: np.ndarray


@dataclasses.dataclass
class SyntheticSubject:
  """One rendered subject; arrays are indexed like the file's data array."""
  images: dict                  # modality -> int16 array
  affine: np.ndarray            # 4x4, written as qform and sform
  label: Optional[np.ndarray] = None        # uint8, BraTS labels {0, 1, 2, 4}
  healthy_t1: Optional[np.ndarray] = None   # int16, the same subject without tumor
  info: dict = dataclasses.field(default_factory=dict)


# --- Templates (loaded once per process) -------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mni():
  """GM, WM, CSF probability maps (float32, template grid) and the template affine."""
  datasets = optional.nilearn_datasets()
  t1 = datasets.load_mni152_template(resolution=1)
  gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
  wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
  # The template is skull-stripped: its support, with holes filled, is the brain.
  brain = ndi.binary_fill_holes(t1.get_fdata(dtype=np.float32) > 0)
  csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
  return {'gm': gm, 'wm': wm, 'csf': csf, 'brain': brain, 'affine': t1.affine.copy()}


@functools.lru_cache(maxsize=4)
def _tissues_for_spacing(spacing_mm: float):
  """Tissue maps pre-blurred for a coarser output grid (anti-aliasing), stacked [3, ...]."""
  m = _mni()
  sigma = 0.4 * (spacing_mm - 1.0) if spacing_mm > 1.0 else 0.0
  maps = [m[k] for k in ('csf', 'gm', 'wm')]
  if sigma > 0:
    maps = [ndi.gaussian_filter(a, sigma) for a in maps]
  return np.stack(maps)


@functools.lru_cache(maxsize=1)
def _tumor_sites():
  """Candidate tumor centres (template mm): deep white matter, near cortex, near ventricles."""
  m = _mni()
  step = 2  # candidates need no 1 mm precision; a 2 mm grid keeps the distance maps cheap.
  brain = m['brain'][::step, ::step, ::step]
  gm, wm, csf = (m[k][::step, ::step, ::step] for k in ('gm', 'wm', 'csf'))
  depth = ndi.distance_transform_edt(brain) * step
  ijk = np.indices(brain.shape).reshape(3, -1) * step
  mm = (m['affine'][:3, :3] @ ijk + m['affine'][:3, 3:4]).T.reshape(brain.shape + (3,))
  x, y, z = mm[..., 0], mm[..., 1], mm[..., 2]
  supratentorial = z > -10.0
  # Lateral ventricles: deep CSF within their MNI bounding box (not the interhemispheric fissure).
  ventricles = ((csf > 0.6) & (depth > 20.0) & (np.abs(x) > 2) & (np.abs(x) < 30) &
                (y > -45) & (y < 30) & (z > -5) & (z < 32))
  near_ventricles = ndi.distance_transform_edt(~ventricles) * step
  sites = {
      'deep': (wm > 0.5) & (depth > 20.0) & supratentorial,
      'cortex': (gm > 0.4) & (depth > 3.0) & (depth < 10.0) & supratentorial,
      'ventricle': (near_ventricles > 2.0) & (near_ventricles < 7.0) & (wm + gm > 0.5),
  }
  return {k: mm[v].astype(np.float64) for k, v in sites.items()}


# --- Grids ---------------------------------------------------------------------------------

def _centred_affine(directions, voxel, shape, centre):
  """Affine with the given axis directions / voxel sizes whose grid centre maps to `centre`."""
  lin = np.asarray(directions, np.float64) * np.asarray(voxel, np.float64)[None, :]
  mid = (np.asarray(shape, np.float64) - 1.0) / 2.0
  aff = np.eye(4)
  aff[:3, :3] = lin
  aff[:3, 3] = np.asarray(centre, np.float64) - lin @ mid
  return aff


def brats_grid(spacing: float = 1.0) -> Grid:
  """BraTS-like grid: 240x240x155 at 1 mm (scaled with spacing), axes L-P-S, diag(-1,-1,1)."""
  shape = tuple(int(np.ceil(n / spacing)) for n in BRATS_SHAPE_1MM)
  aff = _centred_affine(np.diag([-1.0, -1.0, 1.0]), (spacing,) * 3, shape, BRATS_CENTRE_MNI)
  return Grid(shape, aff)


def ixi_grid(spacing: float = 1.0) -> Grid:
  """IXI-like sagittal grid: array axes point posterior, superior, right; slices are sagittal."""
  voxel = tuple(v * spacing for v in IXI_VOXEL_1MM)
  shape = tuple(int(np.ceil(n / spacing)) for n in IXI_SHAPE_1MM)
  directions = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  return Grid(shape, _centred_affine(directions, voxel, shape, IXI_CENTRE_MNI))


# --- Random fields and transforms ----------------------------------------------------------

def _smooth_field(rng, shape, voxel_mm, cell_mm):
  """Unit-variance smooth random field: Gaussian bumps on a coarse lattice, summed.

  Separable, so the upsampling is three small matrix products (BLAS) instead of a full-grid
  scipy zoom, which was most of the render time at 1 mm.
  """
  weights = []
  for n, v in zip(shape, voxel_mm):
    x = np.arange(n) * v
    centres = np.arange(-2 * cell_mm, x[-1] + 2 * cell_mm + 1e-6, cell_mm)
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / cell_mm) ** 2)
    weights.append((w / np.sqrt((w ** 2).sum(1, keepdims=True))).astype(np.float32))
  field = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
  for w in weights:  # contracts the leading coarse axis, appends the fine one.
    field = np.tensordot(field, w, axes=([0], [1]))
  return field


def _random_affine(rng):
  """World -> template mm: small rotation, translation and scaling about the brain centre."""
  angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3))
  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @
         np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @
         np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
  lin = rot @ np.diag(rng.uniform(1 - SCALE_RANGE, 1 + SCALE_RANGE, 3))
  centre = np.asarray(BRATS_CENTRE_MNI)
  aff = np.eye(4)
  aff[:3, :3] = lin
  aff[:3, 3] = centre - lin @ centre + rng.uniform(-TRANSLATION_MM, TRANSLATION_MM, 3)
  return aff


@functools.lru_cache(maxsize=1)
def _template_brain_bounds():
  idx = np.argwhere(_mni()['brain'])
  return idx.min(0), idx.max(0)


def _brain_box(grid: Grid, world_to_mni, margin_mm=12.0):
  """Index slices of the output grid that can contain brain (everything else stays 0)."""
  m = _mni()
  lo, hi = _template_brain_bounds()
  corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                      for c in (lo[2], hi[2])]).T
  world = np.linalg.inv(world_to_mni) @ (m['affine'] @ corners)
  vox = np.linalg.inv(grid.affine) @ world
  margin = margin_mm / np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
  start = np.floor(vox[:3].min(1) - margin).astype(int)
  stop = np.ceil(vox[:3].max(1) + margin).astype(int) + 1
  return tuple(slice(max(0, int(a)), min(n, int(b)))
               for a, b, n in zip(start, stop, grid.shape))


# --- Rendering -----------------------------------------------------------------------------

@dataclasses.dataclass
class _Subject:
  """Everything random about a subject's anatomy and acquisition, on its brain box."""
  grid: Grid
  box: tuple
  world_to_mni: np.ndarray
  displacement: np.ndarray     # float32 [3, *box]: smooth deformation in mm
  bias: np.ndarray             # float32 [*box]
  noise: np.ndarray            # float32 [2, *box]: Rician noise components (unit std)
  noise_std: float
  contrast: dict               # modality -> (csf, gm, wm)
  tumor_contrast: dict         # modality -> {label: level}
  scale: dict                  # modality -> scanner scale
  spacing: float               # nominal output spacing: how much the templates are blurred


def _draw_subject(rng, grid: Grid, modalities, spacing) -> _Subject:
  world_to_mni = _random_affine(rng)
  box = _brain_box(grid, world_to_mni)
  shape = tuple(s.stop - s.start for s in box)
  voxel = np.sqrt((grid.affine[:3, :3] ** 2).sum(0))
  deform = rng.uniform(*DEFORM_MM)
  displacement = np.empty((3,) + shape, np.float32)
  for d in displacement:
    d[...] = _smooth_field(rng, shape, voxel, DEFORM_CELL_MM) * np.float32(deform)
  bias = np.exp(_smooth_field(rng, shape, voxel, BIAS_CELL_MM) *
               np.float32(rng.uniform(*BIAS_STRENGTH)))
  noise = rng.standard_normal((2,) + shape, dtype=np.float32)
  jitter = lambda: rng.uniform(1 - CONTRAST_JITTER, 1 + CONTRAST_JITTER)
  contrast = {m: tuple(v * jitter() for v in TISSUE_CONTRAST[m]) for m in modalities}
  tumor_contrast = {m: {k: v * jitter() for k, v in TUMOR_CONTRAST[m].items()}
                    for m in modalities}
  scale = {m: rng.uniform(*SCANNER_SCALE) for m in modalities}
  return _Subject(grid, box, world_to_mni, displacement, bias.astype(np.float32), noise,
                  float(rng.uniform(*NOISE_STD)), contrast, tumor_contrast, scale,
                  float(spacing))


def _world(grid: Grid, region):
  """World coordinates (mm, float32 [3, *region]) of the voxels in a region of the grid."""
  axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in region]
  shape = tuple(len(a) for a in axes)
  out = np.empty((3,) + shape, np.float32)
  for k in range(3):  # a sum of three broadcast rank-1 terms: no index grid is built.
    a = grid.affine[k].astype(np.float32)
    out[k] = (a[0] * axes[0][:, None, None] + a[1] * axes[1][None, :, None] +
              a[2] * axes[2][None, None, :] + a[3])
  return out


def _dot3(weights, stack):
  """sum_k weights[k] * stack[k], elementwise in a fixed order (bit-reproducible per voxel)."""
  w = np.asarray(weights, np.float32)
  return w[0] * stack[0] + w[1] * stack[1] + w[2] * stack[2]


def _sample_tissues(sub: _Subject, source_world):
  """CSF, GM, WM probabilities [3, ...] at source world points through the subject transform."""
  mni_vox = (np.linalg.inv(_mni()['affine']) @ sub.world_to_mni).astype(np.float32)
  coords = np.empty_like(source_world)
  for k in range(3):  # elementwise, not BLAS: a voxel's value must not depend on the array size.
    coords[k] = _dot3(mni_vox[k, :3], source_world) + mni_vox[k, 3]
  maps = _tissues_for_spacing(round(sub.spacing, 3))
  out = np.empty((len(maps),) + coords.shape[1:], np.float32)
  for t, o in zip(maps, out):
    ndi.map_coordinates(t, coords, output=o, order=1, mode='constant', cval=0.0,
                        prefilter=False)
  return out


def _local(region, box):
  """`region` (grid indices) expressed as slices into arrays that cover `box`."""
  return tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box))


def _acquire(sub: _Subject, modality, level, local):
  """Relative intensities -> bias, Rician noise, scanner scale; float32."""
  bias = sub.bias[local]
  n = sub.noise[(slice(None),) + local] * sub.noise_std
  signal = level * bias
  return np.sqrt((signal + n[0]) ** 2 + n[1] ** 2) * sub.scale[modality]


def _to_int16(x, brain):
  return np.where(brain, np.clip(np.rint(x), 0, np.iinfo(np.int16).max), 0).astype(np.int16)


def _render_normal(sub: _Subject, modalities):
  """Tumor-free volumes (modality -> int16, full grid); background is 0."""
  world = _world(sub.grid, sub.box) + sub.displacement
  tissues = _sample_tissues(sub, world)
  brain = np.zeros(sub.grid.shape, bool)
  brain[sub.box] = tissues.sum(0) > TISSUE_BRAIN_THRESHOLD
  local = _local(sub.box, sub.box)
  images = {}
  for m in modalities:
    level = _dot3(sub.contrast[m], tissues)
    full = np.zeros(sub.grid.shape, np.float32)
    full[sub.box] = _acquire(sub, m, level, local)
    images[m] = _to_int16(full, brain)
  return images


# --- Tumors --------------------------------------------------------------------------------

@dataclasses.dataclass
class _TumorSpec:
  centre: np.ndarray      # world mm
  radius: float           # edema envelope radius, mm
  axes: np.ndarray        # 3x3: rotation @ diag(1 / semi-axis factors)
  roughness: float
  core_fraction: float    # of the envelope, in the distance field's units
  necrosis_fraction: float
  labels: tuple           # outer -> inner, e.g. (2, 4, 1)
  mass_effect: float
  group: str
  site: str


def _draw_tumor(rng, sub: _Subject) -> _TumorSpec:
  hard = rng.uniform() < HARD_FRACTION
  site = rng.choice(['cortex', 'ventricle']) if hard else 'deep'
  radius = rng.uniform(*(SMALL_RADIUS_MM if hard else LARGE_RADIUS_MM))
  candidates = _tumor_sites()[str(site)]
  mni = candidates[rng.integers(len(candidates))] + rng.uniform(-2.0, 2.0, 3)
  centre = (np.linalg.inv(sub.world_to_mni) @ np.append(mni, 1.0))[:3]
  q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
  axes = q @ np.diag(1.0 / rng.uniform(*AXIS_FACTORS, 3))
  group = 'HGG' if rng.uniform() < HGG_FRACTION else 'LGG'
  u = rng.uniform()
  if group == 'HGG':
    labels = (LABEL_EDEMA, LABEL_ENHANCING, LABEL_NECROSIS) if u < HGG_NECROSIS_SHARE else (
        LABEL_EDEMA, LABEL_ENHANCING)
  else:
    labels = (LABEL_EDEMA, LABEL_NECROSIS) if u < LGG_CORE_SHARE else (LABEL_EDEMA,)
  size = (radius - SMALL_RADIUS_MM[0]) / (LARGE_RADIUS_MM[1] - SMALL_RADIUS_MM[0])
  mass = MASS_EFFECT[0] + (MASS_EFFECT[1] - MASS_EFFECT[0]) * float(np.clip(size, 0, 1))
  return _TumorSpec(centre, float(radius), axes, float(rng.uniform(*ROUGHNESS)),
                    float(rng.uniform(*CORE_FRACTION)), float(rng.uniform(*NECROSIS_FRACTION)),
                    labels, mass, group, str(site))


def _tumor_region(sub: _Subject, spec: _TumorSpec):
  """Grid slices around the tumor holding its lesion and its mass effect (within the box)."""
  reach = _mass_reach(spec)
  vox = np.linalg.inv(sub.grid.affine) @ np.append(spec.centre, 1.0)
  half = reach / np.sqrt((sub.grid.affine[:3, :3] ** 2).sum(0)) + 1
  return tuple(slice(max(b.start, int(np.floor(c - h))), min(b.stop, int(np.ceil(c + h)) + 1))
               for c, h, b in zip(vox[:3], half, sub.box))


def _mass_reach(spec: _TumorSpec):
  return 2.0 * spec.radius + 10.0


def _push(world, deformed, spec: _TumorSpec):
  """Mass effect: sample tissue from closer to the centre, so tissue is pushed outward.

  Radial pull k (1 - (r/R)^2)^2 * (x - c) for r = |x - c| < R, applied on top of the subject's
  smooth deformation: compactly supported and monotone in r for k < 1 (no folding), and
  exactly the identity beyond R (bit-identical to the healthy render there).
  """
  c = spec.centre.astype(np.float32).reshape((3,) + (1,) * (world.ndim - 1))
  offset = world - c
  q2 = (offset ** 2).sum(0) / np.float32(_mass_reach(spec) ** 2)
  pull = np.float32(spec.mass_effect) * np.maximum(1.0 - q2, 0.0) ** 2
  return np.where(q2 < 1.0, deformed - offset * pull, deformed)


def _tumor_distance(rng, world, spec: _TumorSpec, voxel):
  """Irregular normalised distance from the tumor centre (< 1 inside the edema envelope).

  A lobulated, star-shaped lesion: the ellipsoidal radius scaled by exp(smooth noise), so
  every sub-region contains the centre. The noise is clipped (exp(-0.45) at roughness 0.3)
  so that the lesion stays within 2.1 R, inside its mass-effect reach (2 R + 10 mm).
  """
  c = spec.centre.astype(np.float32).reshape((3,) + (1,) * (world.ndim - 1))
  local = np.tensordot(spec.axes.T.astype(np.float32), world - c, axes=1)
  r = np.sqrt((local ** 2).sum(0)) / np.float32(spec.radius)
  cell = max(2.0, spec.radius / 2.5)
  shape = world.shape[1:]
  rough = np.clip(_smooth_field(rng, shape, voxel, cell), -1.5, 1.5) * np.float32(spec.roughness)
  core_rough = _smooth_field(rng, shape, voxel, cell) * np.float32(spec.roughness / 2)
  texture = _smooth_field(rng, shape, voxel, max(2.0, spec.radius / 4))
  return r * np.exp(rough), r * np.exp(rough + core_rough), texture


def _nested_labels(masks, labels, brain):
  """Label map in which every inner region is wrapped by the outer ones (one voxel at least).

  Thin envelopes would otherwise let a core voxel touch healthy tissue; such voxels take the
  label around them. The brain's edge counts as wrapping (tumors may reach the surface).
  """
  out = np.zeros(brain.shape, np.uint8)
  envelope = masks[0]
  out[envelope] = labels[0]
  for mask, lab in zip(masks[1:], labels[1:]):
    envelope = mask & ndi.binary_erosion(envelope | ~brain)
    out[envelope] = lab
  return out


def _render_tumor(rng, sub: _Subject, spec: _TumorSpec, images):
  """Overwrites the tumor region of `images` in place; returns the label map (full grid)."""
  region = _tumor_region(sub, spec)
  local = _local(region, sub.box)
  voxel = np.sqrt((sub.grid.affine[:3, :3] ** 2).sum(0))
  world = _world(sub.grid, region)
  source = _push(world, world + sub.displacement[(slice(None),) + local], spec)
  tissues = _sample_tissues(sub, source)
  region_brain = tissues.sum(0) > TISSUE_BRAIN_THRESHOLD

  d_outer, d_inner, texture = _tumor_distance(rng, world, spec, voxel)
  # Partial volume: memberships ramp linearly over half a voxel (hard labels at 0.5) and are
  # exactly 0 beyond it, so healthy tissue is untouched.
  width = np.float32(0.5 * voxel.mean() / spec.radius)
  soft = lambda d, level: np.clip((np.float32(level) - d) / width + 0.5, 0.0, 1.0)
  levels = [1.0, spec.core_fraction, spec.core_fraction * spec.necrosis_fraction]
  weights = [soft(d_outer, levels[0])] + [soft(d_inner, lv) for lv in levels[1:len(spec.labels)]]
  inside = region_brain.astype(np.float32)
  weights = [w * inside for w in weights]
  # Each inner region lies within the one around it.
  for i in range(1, len(weights)):
    weights[i] = np.minimum(weights[i], weights[i - 1])
  label = _nested_labels([w > 0.5 for w in weights], spec.labels, region_brain)

  for m in images:
    normal = _dot3(sub.contrast[m], tissues)
    look = sub.tumor_contrast[m]
    # Innermost first: each shell blends its own look over what lies inside it.
    inner = np.float32(look[spec.labels[-1]])
    for lab, w in zip(reversed(spec.labels[:-1]), reversed(weights[1:])):
      inner = w * inner + (1 - w) * np.float32(look[lab])
    inner = inner * (1.0 + TUMOR_TEXTURE * texture)
    # Edema shows a little of the tissue beneath it; the core does not.
    core_w = weights[1] if len(weights) > 1 else 0.0
    outer_w = weights[0] * (EDEMA_OPACITY + (1 - EDEMA_OPACITY) * core_w)
    level = (1 - outer_w) * normal + outer_w * inner
    patch = _acquire(sub, m, level, local)
    images[m][region] = _to_int16(patch, region_brain)
  full_label = np.zeros(sub.grid.shape, np.uint8)
  full_label[region] = label
  return full_label


# --- Public API ----------------------------------------------------------------------------

def subject_rng(seed: int, part: str, index: int) -> np.random.Generator:
  """Generator for one subject, independent of how many subjects a cohort has."""
  return np.random.default_rng([int(seed), {'tumor': 0, 'normal': 1}[part], int(index)])


def make_tumor_subject(rng: np.random.Generator, spacing: float = 1.0) -> SyntheticSubject:
  """A BraTS-like tumor subject: t1, t1ce, t2, flair, BraTS labels and the healthy T1.

  `info`: group (HGG/LGG), site (deep/cortex/ventricle), radius_mm, labels present (outer to
  inner), centre_mm (world = NIfTI RAS mm of the written files), mass_effect, mass_reach_mm
  (beyond it the T1 equals the healthy T1 bit for bit), volume_ml per label, whole_tumor_ml.
  """
  grid = brats_grid(spacing)
  sub = _draw_subject(rng, grid, MODALITIES, spacing)
  healthy = _render_normal(sub, MODALITIES)
  for _ in range(MAX_TUMOR_DRAWS):
    # A lesion centred at the brain's edge can end up (almost) outside it: draw again.
    spec = _draw_tumor(rng, sub)
    images = {m: a.copy() for m, a in healthy.items()}
    label = _render_tumor(rng, sub, spec, images)
    if (label > 0).sum() >= MIN_TUMOR_VOXELS:
      break
  else:
    raise RuntimeError(f'no tumor fitted inside the brain in {MAX_TUMOR_DRAWS} draws')
  healthy_t1 = healthy['t1']
  present = tuple(int(v) for v in spec.labels if np.any(label == v))
  voxel_ml = float(np.prod(np.sqrt((grid.affine[:3, :3] ** 2).sum(0)))) / 1000.0
  volumes = {str(k): round(float((label == k).sum() * voxel_ml), 4) for k in (1, 2, 4)}
  info = {'group': spec.group, 'site': spec.site, 'radius_mm': round(spec.radius, 2),
          'labels': list(present), 'centre_mm': [round(float(v), 2) for v in spec.centre],
          'mass_effect': round(spec.mass_effect, 3),
          'mass_reach_mm': round(_mass_reach(spec), 2), 'volume_ml': volumes,
          'whole_tumor_ml': round(float((label > 0).sum() * voxel_ml), 4)}
  return SyntheticSubject(images, grid.affine, label, healthy_t1, info)


def make_normal_subject(rng: np.random.Generator, spacing: float = 1.0,
                        layout: str = 'ixi') -> SyntheticSubject:
  """A tumor-free T1 on an IXI-like sagittal grid (`layout='ixi'`) or the BraTS grid."""
  grids = {'ixi': ixi_grid, 'brats': brats_grid}
  if layout not in grids:
    raise ValueError(f'unknown layout {layout!r}; expected one of {sorted(grids)}')
  grid = grids[layout](spacing)
  sub = _draw_subject(rng, grid, ('t1',), spacing)
  images = _render_normal(sub, ('t1',))
  return SyntheticSubject(images, grid.affine, info={'layout': layout})


def save_nifti(array: np.ndarray, affine: np.ndarray, path) -> None:
  """Writes a NIfTI with qform and sform both set (scanner code) and mm units."""
  img = nib.Nifti1Image(array, affine)
  img.header.set_data_dtype(array.dtype)
  img.header.set_xyzt_units('mm', 'sec')
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(img, str(path))


def tumor_case_id(index: int) -> str:
  return f'BraTS19_SYN_{index + 1:03d}_1'


def normal_case_id(index: int) -> str:
  return f'IXI{index + 1:03d}-SYN-{index + 1:04d}'


def write_tumor_subject(subject: SyntheticSubject, case_id: str, brats_dir) -> Path:
  """<brats_dir>/<HGG|LGG>/<id>/<id>_{t1,t1ce,t2,flair,seg,t1_healthy}.nii.gz."""
  folder = Path(brats_dir) / subject.info['group'] / case_id
  for m, arr in subject.images.items():
    save_nifti(arr, subject.affine, folder / f'{case_id}_{m}.nii.gz')
  save_nifti(subject.label, subject.affine, folder / f'{case_id}_seg.nii.gz')
  save_nifti(subject.healthy_t1, subject.affine, folder / f'{case_id}_t1_healthy.nii.gz')
  return folder


def generate_cohort(out_dir, tumor_cases: int, normal_cases: int, seed: int,
                    spacing: float = 1.0, progress: bool = True) -> dict:
  """Writes DIR/BraTS/{HGG,LGG}/..., DIR/IXI/IXI*-T1.nii.gz and, last, DIR/cohort.json."""
  if tumor_cases < 0 or normal_cases < 0:
    raise ValueError('case counts must be >= 0')
  if not spacing > 0:
    raise ValueError(f'spacing must be positive, got {spacing}')
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'cohort.json').unlink(missing_ok=True)  # written last: marks a complete cohort.
  grids = {'brats': brats_grid(spacing), 'ixi': ixi_grid(spacing)}
  summary = {'seed': int(seed), 'spacing_mm': float(spacing), 'generator': 'data_prep.synthetic',
             'skull_stripped': True,
             'grids': {k: {'shape': list(g.shape), 'affine': g.affine.round(6).tolist()}
                       for k, g in grids.items()},
             'tumor_cases': [], 'normal_cases': []}
  jobs = [('tumor', i) for i in range(tumor_cases)] + [('normal', i) for i in range(normal_cases)]
  start = time.time()
  for part, i in tqdm(jobs, desc='synthetic cohort', unit='case', disable=not progress):
    rng = subject_rng(seed, part, i)
    if part == 'tumor':
      case_id = tumor_case_id(i)
      subject = make_tumor_subject(rng, spacing)
      folder = write_tumor_subject(subject, case_id, out / 'BraTS')
      summary['tumor_cases'].append(
          {'id': case_id, 'path': str(folder.relative_to(out)), **subject.info})
    else:
      case_id = normal_case_id(i)
      subject = make_normal_subject(rng, spacing, 'ixi')
      path = out / 'IXI' / f'{case_id}-T1.nii.gz'
      save_nifti(subject.images['t1'], subject.affine, path)
      summary['normal_cases'].append({'id': case_id, 'path': str(path.relative_to(out))})
  summary['seconds'] = round(time.time() - start, 2)
  store.write_text(out / 'cohort.json', json.dumps(summary, indent=1))
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--out', required=True, help='cohort folder to write')
  parser.add_argument('--tumor-cases', type=int, default=20)
  parser.add_argument('--normal-cases', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--spacing', type=float, default=1.0, help='output voxel size, mm')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  summary = generate_cohort(args.out, args.tumor_cases, args.normal_cases, args.seed,
                            args.spacing, progress=not args.no_progress)
  print(f"wrote {len(summary['tumor_cases'])} tumor and {len(summary['normal_cases'])} normal "
        f"cases to {args.out} in {summary['seconds']} s")
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
