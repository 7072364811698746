"""Patient-wise folds: disjoint, complete, seeded, stratified; validation from training folds."""
import numpy as np
import pytest

from configs import default
from data_prep import folds, store


def _cohort(n=23):
  ids = [f'P{i:03d}' for i in range(n)]
  groups = ['HGG' if i % 3 else 'LGG' for i in range(n)]
  return ids, groups


def test_folds_disjoint_complete_and_stratified():
  ids, groups = _cohort()
  fl = folds.make_folds(ids, groups, 5, seed=1)
  flat = [i for f in fl for i in f]
  assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
  assert max(map(len, fl)) - min(map(len, fl)) <= 1
  group_of = dict(zip(ids, groups))
  lgg = [sum(group_of[i] == 'LGG' for i in f) for f in fl]
  assert max(lgg) - min(lgg) <= 1


def test_folds_seeded():
  ids, groups = _cohort()
  assert folds.make_folds(ids, groups, 5, 3) == folds.make_folds(list(reversed(ids)),
                                                                 list(reversed(groups)), 5, 3)
  assert folds.make_folds(ids, groups, 5, 3) != folds.make_folds(ids, groups, 5, 4)


def test_split_val_inside_training_folds():
  ids, groups = _cohort()
  fl = folds.make_folds(ids, groups, 5, seed=0)
  tests = []
  for k in range(5):
    sp = folds.split_for_fold(fl, k, 0.2, seed=0)
    assert sp['test'] == fl[k]
    assert not set(sp['val']) & set(sp['test'])
    assert not set(sp['val']) & set(sp['train'])
    assert set(sp['train']) | set(sp['val']) == set(ids) - set(fl[k])
    assert len(sp['val']) == round(0.2 * (len(ids) - len(fl[k])))
    assert sp == folds.split_for_fold(fl, k, 0.2, seed=0)
    tests += sp['test']
  assert sorted(tests) == sorted(ids)
  with pytest.raises(ValueError):
    folds.split_for_fold(fl, 5, 0.2, 0)


def test_load_or_make_reuses_consistent_folds(tmp_path):
  ids, groups = _cohort(12)
  config = default.get_config()
  config.data.num_folds = 3
  path = tmp_path / 'folds.json'
  first = folds.load_or_make_folds(path, ids, groups, config)
  record = folds.load_folds(path)
  assert record['seed'] == config.data.split_seed and record['folds'] == first
  # A stored split is reused as is (even if made another way) while it matches the data.
  custom = [ids[:4], ids[4:8], ids[8:]]
  folds.save_folds(path, custom, config.data.split_seed)
  assert folds.load_or_make_folds(path, ids, groups, config) == custom
  # New patients make the stored split inconsistent: it is remade.
  more = folds.load_or_make_folds(path, ids + ['P999'], groups + ['HGG'], config)
  assert sorted(i for f in more for i in f) == sorted(ids + ['P999'])
  assert np.any([f != c for f, c in zip(more, custom)])


def test_prepared_ids_skip_non_cases(tmp_path):
  (tmp_path / 'A.json').write_text('{}')
  (tmp_path / 'A.npz').write_bytes(b'')
  (tmp_path / 'prep_summary.json').write_text('{}')
  (tmp_path / 'B.npz').write_bytes(b'')   # no JSON yet: incomplete.
  assert store.prepared_ids(tmp_path) == ['A']
