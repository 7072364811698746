"""Label conventions and nested regions: round trips, nesting, the resection cavity."""
import numpy as np
import pytest

from configs import brats, msd
from data_prep import labels

SHAPE = (6, 7, 5)


def _random_label(rng, name):
  return rng.choice(labels.allowed_labels(name), size=SHAPE).astype(np.uint8)


@pytest.mark.parametrize('name', sorted(labels.CONVENTIONS))
def test_round_trip_every_preset(name):
  rng = np.random.default_rng(0)
  label = _random_label(rng, name)
  masks = labels.region_masks(label, name, 'wt_tc_et')
  assert masks.shape == SHAPE + (3,) and masks.dtype == bool
  back = labels.to_label_map(masks, name)
  c = labels.CONVENTIONS[name]
  tumour = np.isin(label, c.tumour)
  np.testing.assert_array_equal(back[tumour], label[tumour])
  assert not back[~tumour].any()   # background, and labels in no region (the cavity), are 0.
  # Probabilities with a threshold give the same map.
  probs = np.where(masks, 0.9, 0.2).astype(np.float32)
  np.testing.assert_array_equal(labels.to_label_map(probs, name, threshold=0.5), back)


def test_region_values_per_preset():
  assert labels.region_values('brats2021', 'wt') == (1, 2, 4)
  assert labels.region_values('brats2021', 'tc') == (1, 4)
  assert labels.region_values('brats2023', 'et') == (3,)
  assert labels.region_values('msd', 'tc') == (2, 3)   # non-enhancing + enhancing.
  assert labels.region_values('msd', 'wt') == (2, 1, 3)
  assert labels.allowed_labels('brats2024_post') == (0, 1, 2, 3, 4)
  assert labels.allowed_labels('brats2021') == (0, 1, 2, 4)


def test_hand_made_map():
  label = np.array([0, 1, 2, 4, 2, 1], np.uint8)
  wt, tc, et = np.moveaxis(labels.region_masks(label, 'brats2021'), -1, 0)
  np.testing.assert_array_equal(wt, [0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(tc, [0, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(et, [0, 0, 0, 1, 0, 0])
  (only_wt,) = np.moveaxis(labels.region_masks(label, 'brats2021', 'wt'), -1, 0)
  np.testing.assert_array_equal(only_wt, wt)


def test_nesting_enforced_on_arbitrary_masks():
  rng = np.random.default_rng(1)
  raw = rng.random(SHAPE + (3,)) < 0.3    # not nested: ET where TC is off, and so on.
  assert (raw[..., 2] & ~raw[..., 1]).any()
  nested = labels.nest(raw)
  wt, tc, et = np.moveaxis(nested, -1, 0)
  assert not (et & ~tc).any() and not (tc & ~wt).any()
  np.testing.assert_array_equal(et, raw[..., 2])   # the most specific region is kept as is.
  np.testing.assert_array_equal(wt, raw.any(-1))
  for name in labels.CONVENTIONS:
    out = labels.to_label_map(raw, name)
    np.testing.assert_array_equal(labels.region_masks(out, name), nested)


def test_resection_cavity_is_not_tumour():
  label = np.array([0, 4, 4, 3, 1, 2], np.uint8)
  masks = labels.region_masks(label, 'brats2024_post')
  assert not masks[1:3].any()     # cavity voxels: in no region.
  np.testing.assert_array_equal(masks[:, 0], [0, 0, 0, 1, 1, 1])
  # The same value is enhancing tumour in BraTS 2021.
  assert labels.region_masks(label[:3], 'brats2021')[1:].all()
  # Conversion keeps the cavity only where the target has one.
  np.testing.assert_array_equal(labels.convert(label, 'brats2024_post', 'brats2023'),
                                [0, 0, 0, 3, 1, 2])
  np.testing.assert_array_equal(labels.convert(label, 'brats2024_post', 'brats2024_post'),
                                label)


def test_wt_only_prediction():
  probs = np.array([[0.1], [0.7], [0.5]], np.float32)
  np.testing.assert_array_equal(labels.to_label_map(probs, 'brats2021', 0.5), [0, 2, 0])
  np.testing.assert_array_equal(labels.to_label_map(probs, 'brats2021', 0.5, wt_label=1),
                                [0, 1, 0])


def test_convert_between_conventions():
  rng = np.random.default_rng(2)
  label = _random_label(rng, 'brats2021')
  as_msd = labels.convert(label, 'brats2021', 'msd')
  np.testing.assert_array_equal(as_msd[label == 2], 1)   # edema
  np.testing.assert_array_equal(as_msd[label == 1], 2)   # necrosis / non-enhancing
  np.testing.assert_array_equal(as_msd[label == 4], 3)   # enhancing
  np.testing.assert_array_equal(labels.convert(as_msd, 'msd', 'brats2021'), label)


def test_errors_and_config():
  with pytest.raises(ValueError, match=r"\[3\].*'brats2021'"):
    labels.region_masks(np.array([0, 3]), 'brats2021')
  with pytest.raises(ValueError, match='unknown task.label_convention'):
    labels.convention('brats2099')
  with pytest.raises(ValueError, match='unknown task.regions'):
    labels.region_names('et_only')
  with pytest.raises(ValueError, match='1 \\(WT\\) or 3'):
    labels.nest(np.zeros((2, 2), bool))
  # The dataset configs' allowed labels are their conventions' labels.
  for module in (brats, msd):
    c = module.get_config()
    assert labels.region_names(c) == ('wt',)
    assert labels.allowed_labels(c) == tuple(c.dataset.allowed_labels)
