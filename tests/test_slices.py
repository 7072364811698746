"""2.5D stacks: right neighbours at the volume edges, modality-major channel order."""
import numpy as np

from data_prep import slices


def _labelled_volume(z=6, h=4, w=3, offset=0.0):
  # every voxel of slice s holds s + offset, so a stack reads back its slice indices.
  return np.broadcast_to((np.arange(z) + offset)[:, None, None], (z, h, w)).astype(np.float32)


def test_stack_replicates_edges():
  vol = _labelled_volume()
  z = vol.shape[0]
  np.testing.assert_array_equal(slices.stack_25d(vol, 0, 2)[0, 0], [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(slices.stack_25d(vol, 1, 2)[0, 0], [0, 0, 1, 2, 3])
  np.testing.assert_array_equal(slices.stack_25d(vol, z - 1, 2)[0, 0], [3, 4, 5, 5, 5])
  assert slices.stack_25d(vol, 3, 2).shape == (4, 3, 5)
  np.testing.assert_array_equal(slices.stack_25d(vol, 3, 0)[..., 0], vol[3])


def test_case_stacks_modality_major_and_matches_single_slice():
  rng = np.random.default_rng(0)
  images = np.stack([_labelled_volume(offset=0.0), _labelled_volume(offset=100.0)])
  stacks = slices.case_stacks(images, 2)
  assert stacks.shape == (6, 4, 3, 10)
  np.testing.assert_array_equal(stacks[0, 1, 1], [0, 0, 0, 1, 2, 100, 100, 100, 101, 102])
  np.testing.assert_array_equal(stacks[5, 0, 2], [3, 4, 5, 5, 5, 103, 104, 105, 105, 105])
  noisy = rng.normal(size=(3, 7, 5, 4)).astype(np.float32)
  all_stacks = slices.case_stacks(noisy, 1)
  for s in (0, 3, 6):
    np.testing.assert_array_equal(all_stacks[s], slices.slice_stack(noisy, s, 1))
    for m in range(3):
      np.testing.assert_array_equal(all_stacks[s][..., 3 * m:3 * m + 3],
                                    slices.stack_25d(noisy[m], s, 1))
