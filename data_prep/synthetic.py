"""Synthetic BraTS/IXI-like cohorts built from the MNI152 tissue templates that nilearn ships.

Why: the project must run end to end offline, and a model trained on it should hold up on scans
from elsewhere. Each subject is the MNI152 GM/WM/CSF anatomy warped by a random smooth
deformation and a small random affine, then acquired by a random "scanner" (`Acquisition`):
grid orientation and voxel size, tissue contrast and contrast curve (gamma), in-plane blur,
thick slices resampled back to the grid, a multiplicative bias field, Rician noise, gain and
offset, intensity outliers and an imperfect skull strip (a residual non-brain rim, patches of
over-stripped cortex). Volumes are stored as int16 NIfTI with background 0, like BraTS.
Tumor subjects get one or more lobulated lesions (`TumorPlan`) with nested BraTS labels
(2 edema, 4 enhancing rim, 1 necrosis / non-enhancing core), edema that infiltrates along white
matter, modality-specific appearance and mass effect, plus the same subject's tumor-free T1
(same anatomy, same scanner draw: the pseudo-normal ground truth).

Profiles (`PROFILES`): 'train', the embedded default every demo model learns from, 'plain'
(one LPS grid at the nominal spacing, mild scanner variety, one focus: the generator as it was
before profiles, for tests that need a predictable grid and as a narrow baseline), and
'heldout', an independent test cohort drawn from its own seed stream, whose orientations
(incl. sagittal / coronal, oblique), finer grids, gains, contrast curves, blur, slice
thickness, bias, noise, skull-strip faults, outliers and infiltration come from ranges the
training profile does not use, and whose tumors are smaller (0.3-20 ml) with up to 4 foci.

Every subject is seeded from (seed, profile, cohort part, index), so a subject does not depend
on how many others are generated. Generator constants live here, not in the config: they shape
test data, not the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path
import time
from typing import Optional, Union

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy import special
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
# Residual non-brain tissue left by a poor skull strip (fat, dura, vessels): level range.
RIM_LEVEL = {'t1': (0.7, 1.3), 't1ce': (0.8, 1.5), 't2': (0.4, 1.0), 'flair': (0.3, 0.9)}
EDEMA_OPACITY = 0.8           # edema keeps this share of its own look, the rest is tissue.
TUMOR_TEXTURE = 0.06          # multiplicative texture inside the tumor.

BRATS_SHAPE_1MM = (240, 240, 155)         # field of view in mm along world x, y, z.
BRATS_CENTRE_MNI = (0.0, -17.0, 12.0)     # grid centre in template mm (top of brain kept).
IXI_SHAPE_1MM = (256, 256, 150)           # sagittal: array axes run to P, S, R.
IXI_VOXEL_1MM = (0.9375, 0.9375, 1.2)
IXI_CENTRE_MNI = (0.0, -10.0, 20.0)

ROTATION_DEG = 5.0
TRANSLATION_MM = 5.0
SCALE_RANGE = 0.05
DEFORM_MM = (1.5, 3.0)        # std of the smooth displacement, drawn per subject.
DEFORM_CELL_MM = 12.0         # correlation length of the displacement.
PATCH_CELL_MM = 30.0          # correlation length of the skull-strip fault patches.
PSF_TRUNCATE = 3.0            # Gaussian kernels end at this many sigmas (a finite reach).
PSF_MIN_SIGMA = 0.05          # voxels; a narrower in-plane blur is skipped.
OUTLIER_HOT = (2.0, 4.0)      # an outlier voxel is multiplied by this (hot) ...
OUTLIER_COLD = (0.0, 0.3)     # ... or this (cold, dropout)
OUTLIER_COLD_SHARE = 0.2

HARD_RADIUS_MM = (4.0, 28.0)  # radii over which the mass effect grows from low to high.
MASS_EFFECT = (0.15, 0.5)     # radial compression at the centre, small -> large tumors.
AXIS_FACTORS = (0.75, 1.3)    # ellipsoid semi-axes relative to the radius.
ROUGHNESS = (0.12, 0.3)       # log-amplitude of the lobulation.
ROUGH_CLIP = 1.5              # lobulation noise clipped at this many sigmas.
CORE_FRACTION = (0.5, 0.8)    # core radius / envelope radius.
NECROSIS_FRACTION = (0.45, 0.75)  # necrosis radius / core radius.
# Measured on 48 subjects per profile: lobulation and ellipsoid grow a ball's volume ~1.2x;
# infiltration lengthens the mean radius by ~0.53 x infiltration. The radius undoes both.
LOBULATION_VOLUME_GAIN = 1.2
INFILTRATION_REACH_GAIN = 0.53
SATELLITE_SHARE = (0.1, 0.5)  # of the whole-tumor volume, per extra focus (main focus keeps most).
HGG_NECROSIS_SHARE = 0.7      # HGG: edema + enhancing rim + necrosis, else edema + enhancing.
LGG_CORE_SHARE = 0.75         # LGG: edema + non-enhancing core, else edema only.
TISSUE_BRAIN_THRESHOLD = 0.5  # GM+WM+CSF above this is brain.
MIN_TUMOR_VOXELS = 8
MAX_TUMOR_DRAWS = 20
SITES = ('deep', 'cortex', 'ventricle')


# --- Profiles ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
  """The ranges a cohort is drawn from. (lo, hi) pairs are uniform unless said otherwise.

  Grid voxel sizes are in units of the nominal `spacing` (what a cohort's voxel count, hence
  its generation time, scales with); slice thickness, rim width and cut depth are in mm, as the
  anatomy is (at a coarse nominal spacing a thin slice is just the grid: no extra blur).
  """
  name: str
  stream: int                 # seed word: profiles never share random numbers.
  orientations: tuple         # nibabel axis codes of tumor grids; array axis 2 is the slice axis.
  inplane_voxel: tuple        # voxel size of array axis 0 / spacing ...
  inplane_aspect: tuple       # ... and axis 1 / axis 0.
  slice_voxel: tuple          # voxel size of array axis 2 / spacing.
  oblique_deg: tuple          # grid tilt about a random axis, degrees.
  gain: tuple                 # scanner scale per modality, log-uniform.
  offset: tuple               # additive, in units of the tissue levels, per modality.
  contrast_jitter: tuple      # each tissue / tumor level is scaled by 1 + U(-j, j).
  gamma: tuple                # contrast curve level ** gamma per modality, from intervals.
  bias_strength: tuple        # std of the log bias field.
  bias_cell_mm: tuple         # its correlation length.
  noise_std: tuple            # Rician sigma, in units of the tissue levels.
  psf_sigma: tuple            # in-plane Gaussian blur, voxels.
  thick_prob: float           # per modality: acquired in thick slices ...
  slice_thickness: tuple      # ... this thick (mm), resampled back to the grid.
  rim_prob: float             # a residual non-brain rim is left ...
  rim_width: tuple            # ... this wide (mm, one voxel at least) ...
  rim_cover: tuple            # ... over this share of the brain's surface.
  cut_prob: float             # cortex is over-stripped ...
  cut_depth: tuple            # ... this deep (mm, one voxel at least) ...
  cut_cover: tuple            # ... over this share of the surface (never into the tumor).
  outlier_fraction: tuple     # of the voxels, per modality; hot or cold spikes.
  tumor_ml: tuple             # whole-tumor target volume, log-uniform.
  foci_probs: tuple           # P(1 focus), P(2 foci), ...
  site_probs: tuple           # P(deep), P(cortex), P(ventricle) per focus.
  infiltration: tuple         # edema reaches 1 + this times further in pure white matter.
  hgg_fraction: float


PROFILES = {
    # The generator before profiles existed, in these terms: BraTS LPS grid at the nominal
    # spacing, mild gain / bias / noise / contrast variety, one focus. For tests and figures that
    # need a predictable grid, and as the narrow baseline the 'train' variety is measured against.
    'plain': Profile(
        name='plain', stream=2,
        orientations=('LPS',), inplane_voxel=(1.0, 1.0), inplane_aspect=(1.0, 1.0),
        slice_voxel=(1.0, 1.0),
        oblique_deg=(0.0, 0.0), gain=(300.0, 3000.0), offset=(0.0, 0.0),
        contrast_jitter=(0.06, 0.06), gamma=((1.0, 1.0),),
        bias_strength=(0.05, 0.12), bias_cell_mm=(40.0, 40.0), noise_std=(0.015, 0.04),
        psf_sigma=(0.0, 0.0), thick_prob=0.0, slice_thickness=(0.0, 0.0),
        rim_prob=0.0, rim_width=(0.0, 0.0), rim_cover=(0.0, 0.0),
        cut_prob=0.0, cut_depth=(0.0, 0.0), cut_cover=(0.0, 0.0), outlier_fraction=(0.0, 0.0),
        tumor_ml=(0.5, 100.0), foci_probs=(1.0,), site_probs=(0.7, 0.15, 0.15),
        infiltration=(0.0, 0.0), hgg_fraction=0.75),
    'train': Profile(
        name='train', stream=0,
        orientations=('LPS', 'RAS', 'LAS', 'RPS'),
        inplane_voxel=(1.0, 1.4), inplane_aspect=(0.9, 1.1), slice_voxel=(1.0, 2.0),
        oblique_deg=(0.0, 0.0),
        gain=(200.0, 5000.0), offset=(0.0, 0.05), contrast_jitter=(0.0, 0.10),
        gamma=((0.8, 1.25),),
        bias_strength=(0.03, 0.25), bias_cell_mm=(30.0, 80.0), noise_std=(0.01, 0.06),
        psf_sigma=(0.0, 0.7), thick_prob=0.4, slice_thickness=(1.5, 6.0),
        rim_prob=0.3, rim_width=(2.0, 5.0), rim_cover=(0.1, 0.5),
        cut_prob=0.3, cut_depth=(2.0, 5.0), cut_cover=(0.1, 0.4),
        outlier_fraction=(0.0, 2e-4),
        tumor_ml=(1.0, 200.0), foci_probs=(0.75, 0.17, 0.08), site_probs=(0.5, 0.25, 0.25),
        infiltration=(0.0, 0.6), hgg_fraction=0.75),
    'heldout': Profile(
        name='heldout', stream=1,
        orientations=('LPI', 'RAI', 'ASL', 'LSA'),
        inplane_voxel=(0.8, 1.0), inplane_aspect=(0.9, 1.1), slice_voxel=(0.8, 1.0),
        oblique_deg=(3.0, 12.0),
        gain=(30.0, 200.0), offset=(0.08, 0.2), contrast_jitter=(0.10, 0.15),
        gamma=((0.65, 0.8), (1.25, 1.5)),
        bias_strength=(0.25, 0.35), bias_cell_mm=(18.0, 30.0), noise_std=(0.06, 0.09),
        psf_sigma=(0.7, 1.1), thick_prob=0.4, slice_thickness=(6.0, 7.5),
        rim_prob=0.6, rim_width=(5.0, 8.0), rim_cover=(0.5, 0.9),
        cut_prob=0.5, cut_depth=(5.0, 7.0), cut_cover=(0.4, 0.6),
        outlier_fraction=(2e-4, 1e-3),
        tumor_ml=(0.3, 20.0), foci_probs=(0.3, 0.3, 0.25, 0.15), site_probs=(0.3, 0.35, 0.35),
        infiltration=(0.6, 1.0), hgg_fraction=0.75),
}


def get_profile(profile: Union[str, Profile]) -> Profile:
  if isinstance(profile, Profile):
    return profile
  if profile not in PROFILES:
    raise ValueError(f'unknown synthetic profile {profile!r}; expected one of {sorted(PROFILES)}')
  return PROFILES[profile]


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


# --- Parameter draws (plain values: cheap to draw, compare and test) ---------------------------

@dataclasses.dataclass(frozen=True)
class Acquisition:
  """One subject's scanner: every random acquisition setting, JSON-able through `summary()`."""
  orientation: str            # nibabel axis codes of the tumor grid (normal IXI grids are fixed).
  voxel_mm: tuple             # array axes 0, 1, 2.
  oblique_axis: tuple         # unit vector the grid is tilted about ...
  oblique_deg: float          # ... by this angle.
  gain: dict                  # modality -> scanner scale.
  offset: dict                # modality -> additive level.
  gamma: dict                 # modality -> contrast curve exponent.
  contrast: dict              # modality -> (csf, gm, wm) levels.
  tumor_contrast: dict        # modality -> {label: level}.
  bias_strength: float
  bias_cell_mm: float
  noise_std: float
  psf_sigma: float            # in-plane, voxels.
  slice_thickness_mm: dict    # modality -> thick-slice thickness (0: acquired on the grid).
  slice_phase: dict           # modality -> first slice centre, in slice thicknesses.
  rim_mm: float               # residual non-brain rim width (0: none).
  rim_cover: float
  rim_level: dict             # modality -> level of the rim tissue.
  cut_mm: float               # over-stripping depth (0: none).
  cut_cover: float
  outlier_fraction: float

  def summary(self) -> dict:
    def plain(v):
      if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
      if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
      return round(float(v), 5) if isinstance(v, float) else v
    return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _uniform(rng, lo_hi):
  return float(rng.uniform(*lo_hi))


def _log_uniform(rng, lo_hi):
  return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def _from_intervals(rng, intervals):
  """Uniform over a union of disjoint intervals."""
  lengths = np.array([b - a for a, b in intervals], np.float64) + 1e-12   # points allowed.
  k = rng.choice(len(intervals), p=lengths / lengths.sum())
  return _uniform(rng, intervals[k])


def draw_acquisition(rng: np.random.Generator, profile: Union[str, Profile] = 'train',
                     spacing: float = 1.0) -> Acquisition:
  """Every scalar setting of one subject's scanner (all modalities, whatever is rendered)."""
  p = get_profile(profile)
  orientation = str(p.orientations[rng.integers(len(p.orientations))])
  inplane = _uniform(rng, p.inplane_voxel) * spacing
  voxel = (inplane, inplane * _uniform(rng, p.inplane_aspect),
           _uniform(rng, p.slice_voxel) * spacing)
  axis = rng.standard_normal(3)
  axis /= np.linalg.norm(axis)
  oblique = _uniform(rng, p.oblique_deg)

  def jitter():
    return 1.0 + _uniform(rng, (-1.0, 1.0)) * _uniform(rng, p.contrast_jitter)

  gain, offset, gamma, contrast, tumor, thick, phase, rim_level = {}, {}, {}, {}, {}, {}, {}, {}
  for m in MODALITIES:
    gain[m] = _log_uniform(rng, p.gain)
    offset[m] = _uniform(rng, p.offset)
    gamma[m] = _from_intervals(rng, p.gamma)
    contrast[m] = tuple(v * jitter() for v in TISSUE_CONTRAST[m])
    tumor[m] = {k: v * jitter() for k, v in TUMOR_CONTRAST[m].items()}
    is_thick = rng.uniform() < p.thick_prob
    t = _uniform(rng, p.slice_thickness)
    thick[m] = t if is_thick else 0.0
    phase[m] = _uniform(rng, (0.0, 1.0))
    rim_level[m] = _uniform(rng, RIM_LEVEL[m])
  has_rim, has_cut = rng.uniform() < p.rim_prob, rng.uniform() < p.cut_prob
  rim_mm, rim_cover = _uniform(rng, p.rim_width), _uniform(rng, p.rim_cover)
  cut_mm, cut_cover = _uniform(rng, p.cut_depth), _uniform(rng, p.cut_cover)
  return Acquisition(
      orientation=orientation, voxel_mm=tuple(voxel), oblique_axis=tuple(axis.tolist()),
      oblique_deg=oblique, gain=gain, offset=offset, gamma=gamma, contrast=contrast,
      tumor_contrast=tumor, bias_strength=_uniform(rng, p.bias_strength),
      bias_cell_mm=_uniform(rng, p.bias_cell_mm), noise_std=_uniform(rng, p.noise_std),
      psf_sigma=_uniform(rng, p.psf_sigma), slice_thickness_mm=thick, slice_phase=phase,
      rim_mm=rim_mm if has_rim else 0.0, rim_cover=rim_cover, rim_level=rim_level,
      cut_mm=cut_mm if has_cut else 0.0, cut_cover=cut_cover,
      outlier_fraction=_uniform(rng, p.outlier_fraction))


@dataclasses.dataclass(frozen=True)
class TumorPlan:
  """What a subject's tumor is, before it is placed in the anatomy."""
  group: str                  # HGG | LGG
  labels: tuple               # outer -> inner, e.g. (2, 4, 1)
  target_ml: float            # whole-tumor volume aimed at (the brain edge changes it)
  focus_ml: tuple             # its split over the foci, main focus first.
  sites: tuple                # per focus: deep | cortex | ventricle
  infiltration: float


def draw_tumor_plan(rng: np.random.Generator,
                    profile: Union[str, Profile] = 'train') -> TumorPlan:
  p = get_profile(profile)
  group = 'HGG' if rng.uniform() < p.hgg_fraction else 'LGG'
  u = rng.uniform()
  if group == 'HGG':
    labels = (LABEL_EDEMA, LABEL_ENHANCING, LABEL_NECROSIS) if u < HGG_NECROSIS_SHARE else (
        LABEL_EDEMA, LABEL_ENHANCING)
  else:
    labels = (LABEL_EDEMA, LABEL_NECROSIS) if u < LGG_CORE_SHARE else (LABEL_EDEMA,)
  total = _log_uniform(rng, p.tumor_ml)
  n = int(rng.choice(len(p.foci_probs), p=np.asarray(p.foci_probs) / sum(p.foci_probs))) + 1
  weights = np.array([1.0] + [_uniform(rng, SATELLITE_SHARE) for _ in range(n - 1)])
  focus_ml = tuple(float(v) for v in total * weights / weights.sum())
  sites = tuple(str(SITES[rng.choice(len(SITES), p=np.asarray(p.site_probs))])
                for _ in range(n))
  return TumorPlan(group, labels, float(total), focus_ml, sites,
                   _uniform(rng, p.infiltration))


# --- Grids ---------------------------------------------------------------------------------

_AXIS_CODES = {'R': (1, 0, 0), 'L': (-1, 0, 0), 'A': (0, 1, 0), 'P': (0, -1, 0),
               'S': (0, 0, 1), 'I': (0, 0, -1)}


def _centred_affine(directions, voxel, shape, centre):
  """Affine with the given axis directions / voxel sizes whose grid centre maps to `centre`."""
  lin = np.asarray(directions, np.float64) * np.asarray(voxel, np.float64)[None, :]
  mid = (np.asarray(shape, np.float64) - 1.0) / 2.0
  aff = np.eye(4)
  aff[:3, :3] = lin
  aff[:3, 3] = np.asarray(centre, np.float64) - lin @ mid
  return aff


def _rotation(axis, deg):
  """Rodrigues: rotation by `deg` about the unit vector `axis`."""
  k = np.asarray(axis, np.float64)
  kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
  a = np.deg2rad(deg)
  return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def brats_grid(spacing: float = 1.0) -> Grid:
  """BraTS-like grid: 240x240x155 at 1 mm (scaled with spacing), axes L-P-S, diag(-1,-1,1)."""
  shape = tuple(int(np.ceil(n / spacing)) for n in BRATS_SHAPE_1MM)
  aff = _centred_affine(np.diag([-1.0, -1.0, 1.0]), (spacing,) * 3, shape, BRATS_CENTRE_MNI)
  return Grid(shape, aff)


def acquisition_grid(acq: Acquisition) -> Grid:
  """The BraTS field of view (240 x 240 x 155 mm about the same centre) on the scanner's grid."""
  directions = np.array([_AXIS_CODES[c] for c in acq.orientation], np.float64).T
  world_axis = np.argmax(np.abs(directions), axis=0)
  directions = _rotation(acq.oblique_axis, acq.oblique_deg) @ directions
  fov = np.asarray(BRATS_SHAPE_1MM, np.float64)[world_axis]
  shape = tuple(int(np.ceil(f / v - 1e-6)) for f, v in zip(fov, acq.voxel_mm))
  return Grid(shape, _centred_affine(directions, acq.voxel_mm, shape, BRATS_CENTRE_MNI))


def ixi_grid(spacing: float = 1.0) -> Grid:
  """IXI-like sagittal grid: array axes point posterior, superior, right; slices are sagittal."""
  voxel = tuple(v * spacing for v in IXI_VOXEL_1MM)
  shape = tuple(int(np.ceil(n / spacing)) for n in IXI_SHAPE_1MM)
  directions = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  return Grid(shape, _centred_affine(directions, voxel, shape, IXI_CENTRE_MNI))


def _voxel_sizes(grid: Grid):
  return np.sqrt((grid.affine[:3, :3] ** 2).sum(0))


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
  margin = margin_mm / _voxel_sizes(grid)
  start = np.floor(vox[:3].min(1) - margin).astype(int)
  stop = np.ceil(vox[:3].max(1) + margin).astype(int) + 1
  return tuple(slice(max(0, int(a)), min(n, int(b)))
               for a, b, n in zip(start, stop, grid.shape))


def _slab_operator(n, thickness_vox, phase):
  """[n, n] matrix along the slice axis: thick slices (Gaussian profile, FWHM = thickness)
  centred every `thickness_vox` voxels from `phase`, linearly interpolated back to the grid."""
  tau = float(thickness_vox)
  grid = np.arange(n, dtype=np.float64)
  centres = np.arange(phase * tau - tau, n - 1 + tau + 1e-9, tau)
  sigma = tau / 2.3548
  d = np.clip(centres, 0, n - 1)[:, None] - grid[None, :]
  profile = np.where(np.abs(d) <= PSF_TRUNCATE * sigma, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
  profile /= profile.sum(1, keepdims=True)
  j = np.clip(np.floor((grid - centres[0]) / tau).astype(int), 0, len(centres) - 2)
  f = (grid - centres[j]) / tau
  back = np.zeros((n, len(centres)))
  back[np.arange(n), j] = 1.0 - f
  back[np.arange(n), j + 1] = f
  return (back @ profile).astype(np.float32)


# --- Rendering -----------------------------------------------------------------------------

@dataclasses.dataclass
class _Subject:
  """Everything random about a subject's anatomy and acquisition, on its brain box."""
  grid: Grid
  box: tuple
  world_to_mni: np.ndarray
  acq: Acquisition
  displacement: np.ndarray     # float32 [3, *box]: smooth deformation in mm
  bias: np.ndarray             # float32 [*box]
  noise: np.ndarray            # float32 [2, *box]: Rician noise components (unit std)
  patches: dict                # 'rim' / 'cut' -> float32 [*box] smooth fields (drawn if used)
  outliers: dict               # modality -> (flat box indices, factors)
  slab: dict                   # modality -> slice-axis operator or None
  spacing: float               # nominal output spacing: how much the templates are blurred

  @property
  def voxel(self):
    return _voxel_sizes(self.grid)

  @property
  def blur_reach_mm(self) -> float:
    """How far the acquisition's blur carries a change (beyond it, voxels are unaffected)."""
    v = self.voxel
    inplane = (np.ceil(PSF_TRUNCATE * self.acq.psf_sigma + 0.5) * v[:2].max()
               if self.acq.psf_sigma > PSF_MIN_SIGMA else 0.0)
    across = 0.0
    for op in self.slab.values():
      if op is not None:
        rows, cols = np.nonzero(op)
        across = max(across, float(np.abs(rows - cols).max()) * v[2])
    # The kernels' support is a box: its half-diagonal bounds the distance a change travels.
    return float(np.sqrt(2 * inplane ** 2 + across ** 2))


def _draw_subject(anatomy_rng, scanner_rng, grid: Grid, acq: Acquisition, spacing) -> _Subject:
  """Anatomy (pose, deformation) and the scanner's random fields on the subject's brain box."""
  world_to_mni = _random_affine(anatomy_rng)
  box = _brain_box(grid, world_to_mni)
  shape = tuple(s.stop - s.start for s in box)
  voxel = _voxel_sizes(grid)
  deform = anatomy_rng.uniform(*DEFORM_MM)
  displacement = np.empty((3,) + shape, np.float32)
  for d in displacement:
    d[...] = _smooth_field(anatomy_rng, shape, voxel, DEFORM_CELL_MM) * np.float32(deform)
  rng = scanner_rng
  bias = np.exp(_smooth_field(rng, shape, voxel, acq.bias_cell_mm) *
                np.float32(acq.bias_strength)).astype(np.float32)
  noise = rng.standard_normal((2,) + shape, dtype=np.float32)
  size = int(np.prod(shape))
  outliers = {}
  for m in MODALITIES:
    count = int(rng.poisson(acq.outlier_fraction * size))
    idx = rng.integers(0, size, count)
    cold = rng.uniform(size=count) < OUTLIER_COLD_SHARE
    factor = np.where(cold, rng.uniform(*OUTLIER_COLD, count), rng.uniform(*OUTLIER_HOT, count))
    outliers[m] = (idx, factor.astype(np.float32))
  patches = {}
  if acq.rim_mm > 0:
    patches['rim'] = _smooth_field(rng, shape, voxel, PATCH_CELL_MM)
  if acq.cut_mm > 0:
    patches['cut'] = _smooth_field(rng, shape, voxel, PATCH_CELL_MM)
  slab = {m: (_slab_operator(shape[2], acq.slice_thickness_mm[m] / voxel[2],
                             acq.slice_phase[m])
              if acq.slice_thickness_mm[m] > 1.05 * voxel[2] else None)
          for m in MODALITIES}
  return _Subject(grid, box, world_to_mni, acq, displacement, bias, noise, patches, outliers,
                  slab, float(spacing))


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


def _skull_strip(sub: _Subject, brain, protect=None):
  """(rim, cut) bool [*box]: residual non-brain tissue outside `brain`, over-stripped cortex.

  Both come from smooth random patches over the surface; `protect` (the tumor) is never cut.
  """
  acq, voxel = sub.acq, sub.voxel.mean()
  rim = cut = None
  if acq.rim_mm > 0:
    n = max(1, int(round(acq.rim_mm / voxel)))
    shell = ndi.binary_dilation(brain, iterations=n) & ~brain
    rim = shell & (sub.patches['rim'] > special.ndtri(1.0 - acq.rim_cover))
  if acq.cut_mm > 0:
    n = max(1, int(round(acq.cut_mm / voxel)))
    surface = brain & ~ndi.binary_erosion(brain, iterations=n)
    cut = surface & (sub.patches['cut'] > special.ndtri(1.0 - acq.cut_cover))
    if protect is not None:
      cut &= ~ndi.binary_dilation(protect, iterations=2)
  return rim, cut


def _stored_mask(brain, rim, cut):
  mask = brain | rim if rim is not None else brain.copy()
  if cut is not None:
    mask &= ~cut
  return mask


def _acquire(sub: _Subject, modality, level, mask):
  """Relative levels on the box -> the stored int16 volume (full grid, 0 outside `mask`).

  Contrast curve, in-plane blur, thick slices, bias, Rician noise, offset and gain, outliers.
  Every step is local (finite kernels) and per voxel reproducible, so two levels maps that
  differ only in one region give volumes that differ only within blur_reach_mm of it.
  """
  acq = sub.acq
  x = np.maximum(level, 0.0)
  if acq.gamma[modality] != 1.0:
    x = np.power(x, np.float32(acq.gamma[modality]))
  if acq.psf_sigma > PSF_MIN_SIGMA:
    voxel = sub.voxel
    for axis in (0, 1):
      x = ndi.gaussian_filter1d(x, acq.psf_sigma * voxel[:2].max() / voxel[axis], axis=axis,
                                mode='nearest', truncate=PSF_TRUNCATE)
  op = sub.slab[modality]
  if op is not None:
    x = (x.reshape(-1, x.shape[2]) @ op.T).reshape(x.shape)
  signal = x * sub.bias
  sigma = np.float32(acq.noise_std)
  value = np.sqrt((signal + sigma * sub.noise[0]) ** 2 + (sigma * sub.noise[1]) ** 2)
  value = (value + np.float32(acq.offset[modality])) * np.float32(acq.gain[modality])
  idx, factor = sub.outliers[modality]
  flat = value.reshape(-1)
  flat[idx] *= factor
  full = np.zeros(sub.grid.shape, np.int16)
  full[sub.box] = np.where(mask, np.clip(np.rint(value), 0, np.iinfo(np.int16).max), 0)
  return full


def _normal_levels(sub: _Subject, modalities):
  """Tumor-free relative levels (modality -> float32 [*box]) and the anatomical brain mask."""
  world = _world(sub.grid, sub.box) + sub.displacement
  tissues = _sample_tissues(sub, world)
  brain = tissues.sum(0) > TISSUE_BRAIN_THRESHOLD
  return {m: _dot3(sub.acq.contrast[m], tissues) for m in modalities}, brain


def _with_rim(levels, rim, brain, acq):
  """Levels with the rim's tissue where the rim lies outside the brain (in place)."""
  if rim is not None:
    outside = rim & ~brain
    for m, lv in levels.items():
      lv[outside] = np.float32(acq.rim_level[m])
  return levels


# --- Tumors --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Focus:
  centre: np.ndarray      # world mm
  radius: float           # edema envelope radius, mm
  axes: np.ndarray        # 3x3: rotation @ diag(1 / semi-axis factors)
  roughness: float
  core_fraction: float    # of the envelope, in the distance field's units
  necrosis_fraction: float
  mass_effect: float
  site: str


def _radius_for_ml(ml, infiltration):
  """Envelope radius whose lesion has `ml` on average (lobulation, ellipsoid, infiltration)."""
  ball = (3.0 * ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
  return float(ball / (LOBULATION_VOLUME_GAIN ** (1.0 / 3.0) *
                       (1.0 + INFILTRATION_REACH_GAIN * infiltration)))


def _place_foci(rng, sub: _Subject, plan: TumorPlan):
  foci = []
  for ml, site in zip(plan.focus_ml, plan.sites):
    radius = _radius_for_ml(ml, plan.infiltration)
    candidates = _tumor_sites()[site]
    mni = candidates[rng.integers(len(candidates))] + rng.uniform(-2.0, 2.0, 3)
    centre = (np.linalg.inv(sub.world_to_mni) @ np.append(mni, 1.0))[:3]
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    axes = q @ np.diag(1.0 / rng.uniform(*AXIS_FACTORS, 3))
    size = (radius - HARD_RADIUS_MM[0]) / (HARD_RADIUS_MM[1] - HARD_RADIUS_MM[0])
    mass = MASS_EFFECT[0] + (MASS_EFFECT[1] - MASS_EFFECT[0]) * float(np.clip(size, 0, 1))
    foci.append(_Focus(centre, radius, axes, float(rng.uniform(*ROUGHNESS)),
                       float(rng.uniform(*CORE_FRACTION)), float(rng.uniform(*NECROSIS_FRACTION)),
                       mass, site))
  return foci


def _mass_reach(focus: _Focus):
  """Radius of the mass effect's support."""
  return 2.0 * focus.radius + 10.0


def _reach(focus: _Focus, infiltration):
  """Radius beyond which the focus changes nothing (mass effect and lesion, before blur)."""
  lesion = (focus.radius * AXIS_FACTORS[1] * (1.0 + infiltration) *
            np.exp(ROUGH_CLIP * ROUGHNESS[1]) + 2.0)
  return max(_mass_reach(focus), float(lesion))


def _focus_region(sub: _Subject, focus: _Focus, infiltration):
  """Grid slices around a focus holding its lesion and its mass effect (within the box)."""
  vox = np.linalg.inv(sub.grid.affine) @ np.append(focus.centre, 1.0)
  # An axis-aligned box holding the ball of radius reach, for any (oblique) grid.
  half = _reach(focus, infiltration) * np.sqrt((np.linalg.inv(sub.grid.affine[:3, :3]) ** 2)
                                               .sum(1)) + 1
  return tuple(slice(max(b.start, int(np.floor(c - h))), min(b.stop, int(np.ceil(c + h)) + 1))
               for c, h, b in zip(vox[:3], half, sub.box))


def _union(regions):
  return tuple(slice(min(r[k].start for r in regions), max(r[k].stop for r in regions))
               for k in range(3))


def _push(world, deformed, focus: _Focus):
  """Mass effect: sample tissue from closer to the centre, so tissue is pushed outward.

  Radial pull k (1 - (r/R)^2)^2 * (x - c) for r = |x - c| < R, applied on top of the subject's
  smooth deformation: compactly supported and monotone in r for k < 1 (no folding), and
  exactly the identity beyond R (bit-identical to the healthy render there).
  """
  c = focus.centre.astype(np.float32).reshape((3,) + (1,) * (world.ndim - 1))
  offset = world - c
  q2 = (offset ** 2).sum(0) / np.float32(_mass_reach(focus) ** 2)
  pull = np.float32(focus.mass_effect) * np.maximum(1.0 - q2, 0.0) ** 2
  return np.where(q2 < 1.0, deformed - offset * pull, deformed)


def _focus_distance(rng, world, focus: _Focus, voxel):
  """Irregular normalised distance from a focus centre (< 1 inside the edema envelope).

  A lobulated, star-shaped lesion: the ellipsoidal radius scaled by exp(smooth noise), so
  every sub-region contains the centre. The noise is clipped at ROUGH_CLIP sigmas, so the
  lesion stays within _reach.
  """
  c = focus.centre.astype(np.float32).reshape((3,) + (1,) * (world.ndim - 1))
  local = np.tensordot(focus.axes.T.astype(np.float32), world - c, axes=1)
  r = np.sqrt((local ** 2).sum(0)) / np.float32(focus.radius)
  cell = max(2.0, focus.radius / 2.5)
  shape = world.shape[1:]
  rough = (np.clip(_smooth_field(rng, shape, voxel, cell), -ROUGH_CLIP, ROUGH_CLIP) *
           np.float32(focus.roughness))
  core_rough = _smooth_field(rng, shape, voxel, cell) * np.float32(focus.roughness / 2)
  return r * np.exp(rough), r * np.exp(rough + core_rough)


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


def _render_tumor(rng, sub: _Subject, plan: TumorPlan, foci, levels, brain):
  """Tumor levels in place of the healthy ones, in the foci's region.

  Returns (region, label over the region, levels over the region per modality, brain over
  the region).
  """
  regions = [_focus_region(sub, f, plan.infiltration) for f in foci]
  region = _union(regions)
  local = _local(region, sub.box)
  voxel = sub.voxel
  world = _world(sub.grid, region)
  source = world + sub.displacement[(slice(None),) + local]
  for f in foci:
    source = _push(world, source, f)
  tissues = _sample_tissues(sub, source)
  region_brain = tissues.sum(0) > TISSUE_BRAIN_THRESHOLD
  wm = tissues[2]

  # Partial volume: memberships ramp linearly over half a voxel (hard labels at 0.5) and are
  # exactly 0 beyond it, so healthy tissue is untouched.
  n_shells = len(plan.labels)
  weights = [np.zeros(region_brain.shape, np.float32) for _ in range(n_shells)]
  for f, r in zip(foci, regions):
    sub_local = _local(r, region)
    w_world = world[(slice(None),) + sub_local]
    d_outer, d_inner = _focus_distance(rng, w_world, f, voxel)
    # Infiltration: edema reaches further where the tissue is white matter.
    d_outer = d_outer / (1.0 + np.float32(plan.infiltration) * wm[sub_local])
    width = np.float32(0.5 * voxel.mean() / f.radius)
    soft = lambda d, level, w=width: np.clip((np.float32(level) - d) / w + 0.5, 0.0, 1.0)
    levels_f = [1.0, f.core_fraction, f.core_fraction * f.necrosis_fraction]
    ws = [soft(d_outer, levels_f[0])] + [soft(d_inner, lv) for lv in levels_f[1:n_shells]]
    for s in range(n_shells):
      np.maximum(weights[s][sub_local], ws[s], out=weights[s][sub_local])
  inside = region_brain.astype(np.float32)
  weights = [w * inside for w in weights]
  # Each inner region lies within the one around it.
  for i in range(1, len(weights)):
    weights[i] = np.minimum(weights[i], weights[i - 1])
  label = _nested_labels([w > 0.5 for w in weights], plan.labels, region_brain)
  texture = _smooth_field(rng, region_brain.shape, voxel, max(2.0, foci[0].radius / 4))

  out = {}
  for m in levels:
    normal = _dot3(sub.acq.contrast[m], tissues)
    look = sub.acq.tumor_contrast[m]
    # Innermost first: each shell blends its own look over what lies inside it.
    inner = np.float32(look[plan.labels[-1]])
    for lab, w in zip(reversed(plan.labels[:-1]), reversed(weights[1:])):
      inner = w * inner + (1 - w) * np.float32(look[lab])
    inner = inner * (1.0 + TUMOR_TEXTURE * texture)
    # Edema shows a little of the tissue beneath it; the core does not.
    core_w = weights[1] if len(weights) > 1 else 0.0
    outer_w = weights[0] * (EDEMA_OPACITY + (1 - EDEMA_OPACITY) * core_w)
    out[m] = (1 - outer_w) * normal + outer_w * inner
  return region, label, out, region_brain


# --- Public API ----------------------------------------------------------------------------

_PARTS = {'tumor': 0, 'normal': 1}


def subject_rng(seed: int, part: str, index: int,
                profile: Union[str, Profile] = 'train') -> np.random.Generator:
  """Generator for one subject, independent of how many subjects a cohort has.

  Profiles use disjoint seed streams: (seed, part, index) for 'train' (as before profiles
  existed), (seed, part, index, stream) for the others.
  """
  p = get_profile(profile)
  words = [int(seed), _PARTS[part], int(index)] + ([p.stream] if p.stream else [])
  return np.random.default_rng(words)


def _streams(rng):
  """Independent (scanner, anatomy, tumor) generators of one subject: a different scanner
  setting leaves the anatomy and the tumor as they were (on the same grid)."""
  return rng.spawn(3)


def _round(values):
  return [round(float(v), 2) for v in values]


def make_tumor_subject(rng: np.random.Generator, spacing: float = 1.0,
                       profile: Union[str, Profile] = 'train') -> SyntheticSubject:
  """A BraTS-like tumor subject: t1, t1ce, t2, flair, BraTS labels and the healthy T1.

  The healthy T1 is the same anatomy through the same scanner draw, without the tumor: beyond
  every focus' reach_mm + acquisition.blur_reach_mm it equals the T1 bit for bit.
  `info`: group (HGG/LGG), labels present (outer to inner), centre_mm (the label's centroid in
  world = NIfTI RAS mm of the files), volume_ml per label, whole_tumor_ml, target_ml,
  infiltration, foci (centre_mm, radius_mm, site, mass_effect, reach_mm; main focus first), the
  main focus' site, radius_mm, mass_effect and mass_reach_mm (its reach), and acquisition (the
  scanner draw, blur_reach_mm included).
  """
  p = get_profile(profile)
  scanner_rng, anatomy_rng, tumor_rng = _streams(rng)
  acq = draw_acquisition(scanner_rng, p, spacing)
  plan = draw_tumor_plan(tumor_rng, p)
  grid = acquisition_grid(acq)
  sub = _draw_subject(anatomy_rng, scanner_rng, grid, acq, spacing)
  levels, brain = _normal_levels(sub, MODALITIES)
  for _ in range(MAX_TUMOR_DRAWS):
    # A lesion centred at the brain's edge can end up (almost) outside it: place it again.
    foci = _place_foci(tumor_rng, sub, plan)
    region, region_label, region_levels, region_brain = _render_tumor(
        tumor_rng, sub, plan, foci, levels, brain)
    if (region_label > 0).sum() >= MIN_TUMOR_VOXELS:
      break
  else:
    raise RuntimeError(f'no tumor fitted inside the brain in {MAX_TUMOR_DRAWS} draws')
  local = _local(region, sub.box)
  label_box = np.zeros(brain.shape, np.uint8)
  label_box[local] = region_label
  tumor_brain = brain.copy()
  tumor_brain[local] = region_brain
  rim, cut = _skull_strip(sub, brain, protect=label_box > 0)
  _with_rim(levels, rim, brain, acq)
  healthy_t1 = _acquire(sub, 't1', levels['t1'], _stored_mask(brain, rim, cut))
  for m in MODALITIES:
    levels[m][local] = region_levels[m]
  _with_rim(levels, rim, tumor_brain, acq)
  mask = _stored_mask(tumor_brain, rim, cut)
  images = {m: _acquire(sub, m, levels[m], mask) for m in MODALITIES}
  label = np.zeros(grid.shape, np.uint8)
  label[sub.box] = label_box

  present = tuple(int(v) for v in plan.labels if np.any(label == v))
  voxel_ml = float(np.prod(sub.voxel)) / 1000.0
  volumes = {str(k): round(float((label == k).sum() * voxel_ml), 4) for k in (1, 2, 4)}
  foci_info = [{'centre_mm': _round(f.centre), 'radius_mm': round(f.radius, 2), 'site': f.site,
                'mass_effect': round(f.mass_effect, 3),
                'reach_mm': round(_reach(f, plan.infiltration), 2)} for f in foci]
  main = foci_info[0]
  centroid = grid.affine[:3, :3] @ np.argwhere(label > 0).mean(0) + grid.affine[:3, 3]
  info = {'group': plan.group, 'site': main['site'], 'radius_mm': main['radius_mm'],
          'labels': list(present), 'centre_mm': _round(centroid),
          'mass_effect': main['mass_effect'], 'mass_reach_mm': main['reach_mm'],
          'volume_ml': volumes, 'whole_tumor_ml': round(float((label > 0).sum() * voxel_ml), 4),
          'target_ml': round(plan.target_ml, 3), 'infiltration': round(plan.infiltration, 3),
          'foci': foci_info, 'profile': p.name,
          'acquisition': {**acq.summary(), 'blur_reach_mm': round(sub.blur_reach_mm, 2)}}
  return SyntheticSubject(images, grid.affine, label, healthy_t1, info)


def make_normal_subject(rng: np.random.Generator, spacing: float = 1.0, layout: str = 'ixi',
                        profile: Union[str, Profile] = 'train') -> SyntheticSubject:
  """A tumor-free T1 on an IXI-like sagittal grid (`layout='ixi'`) or a BraTS-like grid.

  The IXI grid is fixed (the layout's own); everything else about the scanner is drawn from
  the profile. `layout='brats'` uses the profile's grids too.
  """
  if layout not in ('ixi', 'brats'):
    raise ValueError(f"unknown layout {layout!r}; expected one of ['brats', 'ixi']")
  p = get_profile(profile)
  scanner_rng, anatomy_rng, _ = _streams(rng)
  acq = draw_acquisition(scanner_rng, p, spacing)
  if layout == 'ixi':
    grid = ixi_grid(spacing)
    acq = dataclasses.replace(acq, orientation=''.join(nib.aff2axcodes(grid.affine)),
                              voxel_mm=tuple(float(v) for v in _voxel_sizes(grid)),
                              oblique_deg=0.0)
  else:
    grid = acquisition_grid(acq)
  sub = _draw_subject(anatomy_rng, scanner_rng, grid, acq, spacing)
  levels, brain = _normal_levels(sub, ('t1',))
  rim, cut = _skull_strip(sub, brain)
  _with_rim(levels, rim, brain, acq)
  images = {'t1': _acquire(sub, 't1', levels['t1'], _stored_mask(brain, rim, cut))}
  info = {'layout': layout, 'profile': p.name,
          'acquisition': {**acq.summary(), 'blur_reach_mm': round(sub.blur_reach_mm, 2)}}
  return SyntheticSubject(images, grid.affine, info=info)


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
                    spacing: float = 1.0, progress: bool = True,
                    profile: Union[str, Profile] = 'train') -> dict:
  """Writes DIR/BraTS/{HGG,LGG}/..., DIR/IXI/IXI*-T1.nii.gz and, last, DIR/cohort.json.

  Tumor cases have per-case grids (the profile's orientations and voxel sizes): cohort.json
  lists each case's grid; 'grids' holds the fixed IXI grid and, for reference, the nominal
  BraTS one.
  """
  p = get_profile(profile)
  if tumor_cases < 0 or normal_cases < 0:
    raise ValueError('case counts must be >= 0')
  if not spacing > 0:
    raise ValueError(f'spacing must be positive, got {spacing}')
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'cohort.json').unlink(missing_ok=True)  # written last: marks a complete cohort.
  grids = {'brats': brats_grid(spacing), 'ixi': ixi_grid(spacing)}
  summary = {'seed': int(seed), 'spacing_mm': float(spacing), 'generator': 'data_prep.synthetic',
             'profile': p.name, 'skull_stripped': True,
             'grids': {k: {'shape': list(g.shape), 'affine': g.affine.round(6).tolist()}
                       for k, g in grids.items()},
             'tumor_cases': [], 'normal_cases': []}
  jobs = [('tumor', i) for i in range(tumor_cases)] + [('normal', i) for i in range(normal_cases)]
  start = time.time()
  for part, i in tqdm(jobs, desc='synthetic cohort', unit='case', disable=not progress):
    rng = subject_rng(seed, part, i, p)
    if part == 'tumor':
      case_id = tumor_case_id(i)
      subject = make_tumor_subject(rng, spacing, p)
      folder = write_tumor_subject(subject, case_id, out / 'BraTS')
      summary['tumor_cases'].append(
          {'id': case_id, 'path': str(folder.relative_to(out)),
           'grid': {'shape': list(subject.label.shape),
                    'affine': np.round(subject.affine, 6).tolist()}, **subject.info})
    else:
      case_id = normal_case_id(i)
      subject = make_normal_subject(rng, spacing, 'ixi', p)
      path = out / 'IXI' / f'{case_id}-T1.nii.gz'
      save_nifti(subject.images['t1'], subject.affine, path)
      summary['normal_cases'].append({'id': case_id, 'path': str(path.relative_to(out)),
                                      **subject.info})
  summary['seconds'] = round(time.time() - start, 2)
  store.write_text(out / 'cohort.json', json.dumps(summary, indent=1))
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--out', required=True, help='cohort folder to write')
  parser.add_argument('--tumor-cases', type=int, default=20)
  parser.add_argument('--normal-cases', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--spacing', type=float, default=1.0, help='nominal voxel size, mm')
  parser.add_argument('--profile', default='train', choices=sorted(PROFILES),
                      help="'train' (the embedded default), 'heldout' (an independent test "
                           "cohort from ranges the training profile does not use) or 'plain' "
                           '(one LPS grid at --spacing, mild scanner variety, one focus)')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  summary = generate_cohort(args.out, args.tumor_cases, args.normal_cases, args.seed,
                            args.spacing, progress=not args.no_progress, profile=args.profile)
  print(f"wrote {len(summary['tumor_cases'])} tumor and {len(summary['normal_cases'])} normal "
        f"{summary['profile']} cases to {args.out} in {summary['seconds']} s")
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
