"""Tumour label conventions and the nested regions WT ⊇ TC ⊇ ET (config.task).

A label file stores one integer per voxel whose meaning depends on the dataset; a model is
trained and scored on regions:
  * 'wt' (the paper): whole tumour, every tumour label.
  * 'wt_tc_et' (nnU-Net's and MONAI's BraTS setup): whole tumour ⊇ tumour core (necrosis /
    non-enhancing core + enhancing) ⊇ enhancing tumour, one sigmoid channel per region.

Conventions (`CONVENTIONS`, picked by config.task.label_convention):
  * 'brats2021': BraTS up to 2021 (and BraTS2019, the paper): 1 NCR/NET, 2 ED, 4 ET.
  * 'brats2023': BraTS 2023+ (GLI, MEN, MET, PED, SSA): 1 NCR, 2 ED, 3 ET.
  * 'msd': MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
  * 'brats2024_post': BraTS 2024 post-treatment glioma: 1 NETC, 2 SNFH (edema), 3 ET,
    4 resection cavity, which is a label but not tumour (in no region).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Convention:
  """Label values of one dataset family; `other` are allowed labels outside every region."""
  name: str
  core: int        # necrosis / non-enhancing tumour core (TC minus ET).
  edema: int       # peritumoural edema / SNFH (WT minus TC).
  enhancing: int   # enhancing tumour (ET).
  other: tuple = ()

  @property
  def tumour(self) -> tuple:
    return (self.core, self.edema, self.enhancing)

  @property
  def allowed(self) -> tuple:
    """Every value a label file of this convention may hold, background 0 included."""
    return tuple(sorted({0, *self.tumour, *self.other}))


CONVENTIONS = {
    'brats2021': Convention('brats2021', core=1, edema=2, enhancing=4),
    'brats2023': Convention('brats2023', core=1, edema=2, enhancing=3),
    'msd': Convention('msd', core=2, edema=1, enhancing=3),
    'brats2024_post': Convention('brats2024_post', core=1, edema=2, enhancing=3, other=(4,)),
}

# Regions outermost first: the nesting order, and the channel order of a region head.
REGIONS = {'wt': ('wt',), 'wt_tc_et': ('wt', 'tc', 'et')}


def convention(name) -> Convention:
  """The Convention called `name` (a Convention passes through; a config means its task's)."""
  if isinstance(name, Convention):
    return name
  if not isinstance(name, str):
    name = name.task.label_convention
  if name not in CONVENTIONS:
    raise ValueError(f'unknown task.label_convention {name!r}; expected one of '
                     f'{tuple(CONVENTIONS)}')
  return CONVENTIONS[name]


def region_names(regions) -> tuple:
  """('wt',) or ('wt', 'tc', 'et') for task.regions (a config means its task's; a config saved
  before config.task existed means the paper's 'wt')."""
  if not isinstance(regions, (str, tuple, list)):
    task = regions.get('task', None)
    regions = 'wt' if task is None else task.regions
  if isinstance(regions, (tuple, list)):
    regions = tuple(regions)
    if regions not in REGIONS.values():
      raise ValueError(f'regions {regions} are not one of {tuple(REGIONS.values())}')
    return regions
  if regions not in REGIONS:
    raise ValueError(f'unknown task.regions {regions!r}; expected one of {tuple(REGIONS)}')
  return REGIONS[regions]


def allowed_labels(name) -> tuple:
  """The label values a file of convention `name` may contain (dataset.allowed_labels)."""
  return convention(name).allowed


def region_values(name, region: str) -> tuple:
  """The label values making up `region` ('wt', 'tc' or 'et') in convention `name`."""
  c = convention(name)
  values = {'wt': c.tumour, 'tc': (c.core, c.enhancing), 'et': (c.enhancing,)}
  if region not in values:
    raise ValueError(f'unknown region {region!r}; expected one of {tuple(values)}')
  return values[region]


def region_masks(label, name, regions='wt_tc_et') -> np.ndarray:
  """bool [..., R] masks of a label map, one per region in REGIONS order.

  Values outside the convention's allowed labels are an error: a label file of another
  convention would otherwise give silently wrong regions (BraTS 2021's ET 4 read as the
  resection cavity of BraTS 2024, say).
  """
  label = np.asarray(label)
  c = convention(name)
  present = np.unique(label)
  bad = np.setdiff1d(present, c.allowed)
  if bad.size:
    raise ValueError(f'label values {bad.tolist()} are not in label convention {c.name!r} '
                     f'(allowed {c.allowed})')
  return np.stack([np.isin(label, region_values(c, r)) for r in region_names(regions)], -1)


def level_lut(name, regions) -> np.ndarray:
  """uint8 [256]: raw label value -> training target level (255 for a value the convention lacks).

  The level of a voxel is how many of the nested regions hold it: 0 outside WT, 1 in WT, and for
  'wt_tc_et' 2 in TC, 3 in ET. One integer map thus carries every region (region r is
  level > r), so the loader, the augmentation (nearest neighbour) and Ω_NR (level 0) treat it
  like the paper's binary WT map, which is exactly what it is for 'wt'.
  """
  c = convention(name)
  lut = np.full(256, 255, np.uint8)
  lut[list(c.allowed)] = 0
  for r, region in enumerate(region_names(regions)):
    lut[list(region_values(c, region))] = r + 1
  return lut


def levels_to_masks(levels, n_regions: int) -> np.ndarray:
  """bool [..., R] region masks of a level map (level_lut): region r is level > r."""
  return np.asarray(levels)[..., None] > np.arange(int(n_regions))


def nest(masks) -> np.ndarray:
  """Masks [..., R] (R = 1 or 3, WT, TC, ET) made nested: ET ⊆ TC ⊆ WT.

  A more specific region wins: an ET voxel is also TC and WT, a TC voxel also WT. This is what
  nnU-Net's region-based export does (regions painted outermost first, each overwriting the
  last), so the same probabilities give the same label map in both.
  """
  masks = np.asarray(masks, bool)
  if masks.shape[-1] not in (1, 3):
    raise ValueError(f'expected 1 (WT) or 3 (WT, TC, ET) region masks, got {masks.shape[-1]}')
  if masks.shape[-1] == 1:
    return masks.copy()
  et = masks[..., 2]
  tc = masks[..., 1] | et
  wt = masks[..., 0] | tc
  return np.stack([wt, tc, et], -1)


def to_label_map(regions, name, threshold: Optional[float] = None,
                 wt_label: Optional[int] = None) -> np.ndarray:
  """A uint8 label map in convention `name` from region masks or probabilities [..., R].

  With `threshold`, `regions` holds per-region probabilities and a region is present where its
  probability exceeds it. Regions are nested first (see `nest`); then ET gets the enhancing
  label, TC minus ET the core label, WT minus TC the edema label. A WT-only prediction (R = 1)
  thus comes out as edema, which every BraTS evaluator counts as WT and neither as TC nor ET;
  `wt_label` writes it as another value instead (config.eval.wt_label).
  """
  c = convention(name)
  regions = np.asarray(regions)
  masks = regions > threshold if threshold is not None else regions.astype(bool)
  masks = nest(masks)
  out = np.zeros(masks.shape[:-1], np.uint8)
  if masks.shape[-1] == 1:
    out[masks[..., 0]] = c.edema if wt_label is None else int(wt_label)
    return out
  out[masks[..., 0]] = c.edema
  out[masks[..., 1]] = c.core
  out[masks[..., 2]] = c.enhancing
  return out


def convert(label, source, target) -> np.ndarray:
  """A label map moved from convention `source` to `target` (tumour labels by meaning).

  Labels outside every region (a resection cavity) have no counterpart and become 0 unless
  the target has the same value among its own `other` labels.
  """
  s, t = convention(source), convention(target)
  label = np.asarray(label)
  out = to_label_map(region_masks(label, s, 'wt_tc_et'), t)
  for value in s.other:
    if value in t.other:
      out[label == value] = value
  return out
