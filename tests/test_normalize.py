"""Histogram matching: references learned from the training split only, landmarks mapped."""
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from data_prep import folds, normalize, store
from data_prep.case import CaseError


def _case(case_id, seed, gain=1.0, modalities=('t1', 'flair')):
  rng = np.random.default_rng(seed)
  z, h, w = 8, 20, 20
  zz, yy, xx = np.mgrid[:z, :h, :w]
  brain = ((zz - 3.5) / 5) ** 2 + ((yy - 9.5) / 8) ** 2 + ((xx - 9.5) / 8) ** 2 < 1
  images = ndimage.gaussian_filter(rng.gamma(2.0, 1.0, (len(modalities), z, h, w)), (0, 1, 1, 1))
  images = gain * (images * (1 + seed % 3)) * brain
  meta = {'modalities': list(modalities), 'group': 'HGG'}
  return store.PreparedCase(case_id, images.astype(np.float32), brain,
                            np.zeros((z, h, w), np.uint8), meta)


def test_matched_training_landmarks_land_on_standard_scale():
  config = default.get_config()
  cases = [_case(f'c{i}', i) for i in range(4)]
  refs = normalize.fit_references(cases, ('t1', 'flair'), config)
  lo, hi = config.prep.hist.scale
  for m in ('t1', 'flair'):
    assert refs[m][0] == pytest.approx(lo) and refs[m][-1] == pytest.approx(hi)
    assert np.all(np.diff(refs[m]) > 0)
  for c in cases:
    matched = normalize.apply_reference(c.modality('t1'), c.brain, refs['t1'], config)
    assert matched.dtype == np.float32 and np.all(matched[~c.brain] == 0)
    got = np.percentile(matched[c.brain], config.prep.hist.percentiles)
    np.testing.assert_allclose(got, refs['t1'], atol=2e-3)
  # Values beyond the end landmarks are extrapolated, not clamped.
  c = cases[0]
  matched = normalize.apply_reference(c.modality('t1'), c.brain, refs['t1'], config)
  assert matched[c.brain].max() > hi and matched[c.brain].min() < lo


def test_references_use_training_split_only(tmp_path):
  config = default.get_config()
  config.data.num_folds = 3
  mods = ('t1', 'flair')
  ids = [f'c{i}' for i in range(6)]
  for i, cid in enumerate(ids):
    store.save_prepared(_case(cid, i), tmp_path)
  fl = folds.make_folds(ids, None, 3, 0)
  split = folds.split_for_fold(fl, 0, 0.2, 0)
  fit_ids = split['train'] + split['val']

  def fit():
    return normalize.fit_references((store.load_prepared(tmp_path, i) for i in fit_ids),
                                    mods, config)

  before = fit()
  test_id, train_id = split['test'][0], split['train'][0]
  warped = store.load_prepared(tmp_path, test_id)
  warped.images = np.sqrt(warped.images) * 7
  store.save_prepared(warped, tmp_path)
  for m in mods:
    np.testing.assert_array_equal(fit()[m], before[m])
  warped = store.load_prepared(tmp_path, train_id)
  warped.images = np.sqrt(warped.images)
  store.save_prepared(warped, tmp_path)
  assert not np.allclose(fit()['t1'], before['t1'])


def test_save_load_and_cache(tmp_path):
  config = default.get_config()
  cases = [_case(f'c{i}', i) for i in range(3)]
  for c in cases:
    store.save_prepared(c, tmp_path / 'cases')
  refs = normalize.fit_references(cases, ('t1',), config)
  path = normalize.save_references(refs, tmp_path / 'refs.json', fitted_on=['c0', 'c1', 'c2'])
  np.testing.assert_allclose(normalize.load_references(path)['t1'], refs['t1'])
  again = normalize.load_or_fit_references(path, tmp_path / 'cases', ['c0', 'c1', 'c2'],
                                           ('t1',), config)
  np.testing.assert_allclose(again['t1'], refs['t1'])
  fewer = normalize.load_or_fit_references(path, tmp_path / 'cases', ['c0', 'c1'], ('t1',), config)
  assert normalize.references_fitted_on(path) == ['c0', 'c1']
  assert not np.allclose(fewer['t1'], refs['t1'])
  (tmp_path / 'bad.json').write_text('{"nope": 1}')
  with pytest.raises(CaseError, match='bad.json'):
    normalize.load_references(tmp_path / 'bad.json')


def test_two_writers_of_one_file_each_replace_it_whole(tmp_path):
  """Hosts of a multi-host job fit and save the same fold's references at the same time: each
  atomic write has its own temporary, so neither fails and the file is one whole version."""
  path = tmp_path / 'hist_refs_fold0.json'
  with store.atomic_write(path) as first:
    with store.atomic_write(path) as second:
      assert first != second
      first.write_text('{"host": 0}')
      second.write_text('{"host": 1}')
    assert path.read_text() == '{"host": 1}'
  assert path.read_text() == '{"host": 0}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['hist_refs_fold0.json']   # no leftovers
