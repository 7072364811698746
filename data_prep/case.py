"""The records that flow through data preparation, and the one error a bad case raises.

Array conventions (shared by every module):
  * `LoadedCase` arrays are in the file's canonical (RAS+) orientation, indexed [x, y, z].
  * Prepared (MNI-space) arrays are slice-major [Z, H, W]: Z = inferior→superior axial slices,
    H = posterior→anterior, W = left→right, cropped/padded to `prep.crop_hw`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional

import numpy as np


class CaseError(ValueError):
  """A case that cannot be used; the message names the file and the fault."""

  def __init__(self, path, problem: str):
    super().__init__(f'{path}: {problem}')
    self.path = str(path)
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """One image on disk; `channel` picks a volume from a 4-D file (MSD)."""
  path: Path
  channel: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Case:
  """A patient as found on disk, before anything is read."""
  case_id: str
  images: Mapping[str, ImageRef]        # modality -> file, in the config's modality order.
  label: Optional[ImageRef] = None      # None for normal (IXI) subjects and new patients.
  group: str = ''                       # 'HGG' / 'LGG' / 'normal' / ...
  healthy_t1: Optional[ImageRef] = None  # synthetic cohorts: the subject's tumor-free T1.


@dataclasses.dataclass(frozen=True)
class NativeGeometry:
  """Where a case came from, so that predictions can be written back onto it."""
  shape: tuple           # the file's spatial shape
  affine: np.ndarray     # the file's own 4x4 affine (before reorientation)


@dataclasses.dataclass
class LoadedCase:
  """A validated case in memory (canonical RAS+ orientation)."""
  case: Case
  images: dict           # modality -> float32 [x, y, z]
  label: Optional[np.ndarray]   # uint8 [x, y, z], raw label values
  affine: np.ndarray     # canonical 4x4 affine shared by every modality
  native: NativeGeometry
  healthy_t1: Optional[np.ndarray] = None
