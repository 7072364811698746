"""2.5D stacks: axial slice s with its K neighbours on each side, edges replicated.

Channel layout (ARCHITECTURE.md batch contract): modality-major, slices s-K..s+K within a
modality. Edge replication = clipping the slice index into [0, Z-1].
"""
import numpy as np


def neighbour_indices(num_slices: int, s, k: int) -> np.ndarray:
  """Slice indices s-k..s+k clipped into the volume (s may be an array: one row per s)."""
  offsets = np.arange(-k, k + 1)
  return np.clip(np.asarray(s)[..., None] + offsets, 0, num_slices - 1)


def stack_25d(volume, s: int, k: int) -> np.ndarray:
  """[Z, H, W] -> [H, W, 2k+1] around slice s."""
  volume = np.asarray(volume)
  return np.moveaxis(volume[neighbour_indices(volume.shape[0], s, k)], 0, -1)


def slice_stack(images, s: int, k: int) -> np.ndarray:
  """[M, Z, H, W] -> [H, W, M*(2k+1)] for one slice s (modality-major)."""
  images = np.asarray(images)
  m, z, h, w = images.shape
  sub = images[:, neighbour_indices(z, s, k)]          # [M, 2k+1, H, W]
  return sub.transpose(2, 3, 0, 1).reshape(h, w, m * (2 * k + 1))


def case_stacks(images, k: int) -> np.ndarray:
  """[M, Z, H, W] -> [Z, H, W, M*(2k+1)]: every slice's stack at once (modality-major)."""
  images = np.asarray(images)
  m, z, h, w = images.shape
  sub = images[:, neighbour_indices(z, np.arange(z), k)]   # [M, Z, 2k+1, H, W]
  return sub.transpose(1, 3, 4, 0, 2).reshape(z, h, w, m * (2 * k + 1))
