"""On-disk format of prepared (MNI-space) cases: WORKDIR/prep/{cases,normal}/<id>.npz + <id>.json.

The arrays are what registration produced (brain-masked, cropped, not yet histogram-matched:
the histogram references depend on the fold's training split, so matching happens when shards
are built). Each modality is divided by its 99.5th brain percentile and stored as float16; the
landmark-based histogram matching downstream is invariant to that per-case scale.
The JSON holds everything needed to map a prediction back to the native file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

# WORKDIR/prep's layout (clfc_jax.workdir builds every other path on these).
CASES_DIR = 'cases'          # prepared tumor cases
NORMAL_DIR = 'normal'        # prepared normal-cohort subjects
FOLDS_FILE = 'folds.json'    # the patient-wise folds (data_prep.folds)


@dataclasses.dataclass
class PreparedCase:
  case_id: str
  images: np.ndarray               # float [M, Z, H, W] in `modalities` order
  brain: np.ndarray                # bool [Z, H, W]
  label: Optional[np.ndarray]      # uint8 [Z, H, W] raw label values, None for normal subjects
  meta: dict                       # modalities, group, native geometry, MNI grid, crop, transform
  healthy_t1: Optional[np.ndarray] = None   # float [Z, H, W] (synthetic cohorts)

  @property
  def modalities(self):
    return tuple(self.meta['modalities'])

  def modality(self, name):
    return self.images[self.modalities.index(name)]


def save_prepared(pc: PreparedCase, directory) -> Path:
  """Writes <id>.npz then <id>.json; the JSON's presence marks the case complete."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {'images': pc.images.astype(np.float16), 'brain': pc.brain.astype(bool)}
  if pc.label is not None:
    arrays['label'] = pc.label.astype(np.uint8)
  if pc.healthy_t1 is not None:
    arrays['healthy_t1'] = pc.healthy_t1.astype(np.float16)
  npz = directory / f'{pc.case_id}.npz'
  save_npz(npz, **arrays)
  write_text(directory / f'{pc.case_id}.json', json.dumps(pc.meta, indent=1, default=_jsonable))
  return npz


# --- atomic writes: a reader never sees half a file, a crash never leaves one ---------------------

def _suffix(path: Path) -> str:
  return '.nii.gz' if path.name.endswith('.nii.gz') else path.suffix


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
  """Yields a hidden temporary path beside `path`; it replaces `path` when the block ends.

  The temporary keeps the suffix (.nii.gz, .npz, .png), so writers that pick the format by
  suffix still work. If the block raises, the temporary is removed and `path` is untouched.
  Nest several (contextlib.ExitStack) to write every file or none. The temporary's name is
  unique to the process and call: hosts of a multi-host job that write the same file (each
  fits the same fold's histogram references) each replace it whole, and the last one wins.
  """
  path = Path(path)
  suffix = _suffix(path)
  stem = path.name[:len(path.name) - len(suffix)]
  tmp = path.with_name(f'.{stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
  """`path` gets `text` atomically."""
  with atomic_write(path) as tmp:
    tmp.write_text(text, encoding='utf-8')
  return Path(path)


def save_npz(path, **arrays) -> Path:
  """A compressed .npz written atomically."""
  with atomic_write(path) as tmp:
    np.savez_compressed(tmp, **arrays)
  return Path(path)


def load_prepared(directory, case_id) -> PreparedCase:
  directory = Path(directory)
  meta = json.loads((directory / f'{case_id}.json').read_text())
  with np.load(directory / f'{case_id}.npz') as z:
    return PreparedCase(
        case_id=case_id,
        images=z['images'].astype(np.float32),
        brain=z['brain'],
        label=z['label'] if 'label' in z else None,
        meta=meta,
        healthy_t1=z['healthy_t1'].astype(np.float32) if 'healthy_t1' in z else None)


def load_prepared_meta(directory, case_id) -> dict:
  """The JSON half only: cheap, for listings and fold stratification."""
  return json.loads((Path(directory) / f'{case_id}.json').read_text())


def prepared_ids(directory):
  """Ids of the complete cases (both .npz and .json) in a prep folder, sorted."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(p.stem for p in directory.glob('*.json')
                if not p.name.startswith('.') and p.with_suffix('.npz').exists())


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, Path):
    return str(x)
  raise TypeError(f'not JSON serialisable: {type(x)}')
