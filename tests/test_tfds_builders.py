"""TFDS builders: contract shapes/dtypes, patient-wise splits, matching, pseudo-normal stacks."""
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pipeline import toy_prepared_cohort
from configs import default
from data_prep import folds, normalize, slices, store, tfds_builders
from data_prep.case import CaseError

MODS = ('t1', 'flair')
PN_IDS = ('P000', 'P001', 'P004')   # cases that get a pseudo-normal volume


def small_config():
  c = default.get_config()
  c.prep.crop_hw = (32, 32)
  c.dataset.modalities = MODS
  c.data.num_folds = 3
  c.data.val_fraction = 0.2
  return c


def _read_all(builder, split):
  return list(builder.as_dataset(split=split).as_numpy_iterator())


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('work')
  c = small_config()
  ids = toy_prepared_cohort(root / 'prep', num_cases=9, num_normal=2, modalities=MODS)
  rng = np.random.default_rng(1)
  for cid in PN_IDS:
    (root / 'pseudo_normal').mkdir(exist_ok=True)
    np.savez(root / 'pseudo_normal' / f'{cid}.npz',
             t1=rng.uniform(-1, 1, (12, 32, 32)).astype(np.float32))
  plain = tfds_builders.build(tfds_builders.tumor_slices_builder(
      c, root / 'tfds', 1, with_pseudo_normal=False))
  with_pn = tfds_builders.build(tfds_builders.tumor_slices_builder(
      c, root / 'tfds', 1, with_pseudo_normal=True))
  return {'root': root, 'config': c, 'ids': ids, 'plain': plain, 'pn': with_pn,
          'examples': {s: _read_all(plain, s) for s in ('train', 'val', 'test')},
          'pn_examples': _read_all(with_pn, 'train') + _read_all(with_pn, 'val') +
                         _read_all(with_pn, 'test')}


def test_examples_match_the_batch_contract(built):
  c = built['config']
  ex = built['examples']['train'][0]
  n = 2 * c.data.k + 1
  assert ex['image'].shape == (32, 32, len(MODS) * n) and ex['image'].dtype == np.float16
  assert ex['normal'].shape == (32, 32, n)
  assert ex['label'].shape == (32, 32) and ex['label'].dtype == np.uint8
  assert ex['brain'].shape == (32, 32) and ex['brain'].dtype == bool
  assert isinstance(ex['patient'], bytes) and ex['slice'].dtype == np.int32
  assert built['plain'].builder_config.name != built['pn'].builder_config.name


def test_every_brain_slice_in_exactly_one_split_patient_wise(built):
  root, c = built['root'], built['config']
  split = folds.prepared_split(root / 'prep', c, 1)
  seen = {}
  for name, examples in built['examples'].items():
    patients = {e['patient'].decode() for e in examples}
    assert patients == set(split[name])
    for e in examples:
      key = (e['patient'].decode(), int(e['slice']))
      assert key not in seen
      seen[key] = name
  expected = set()
  for cid in built['ids']:
    pc = store.load_prepared(root / 'prep' / 'cases', cid)
    frac = pc.brain.mean(axis=(1, 2))
    expected |= {(cid, s) for s in np.flatnonzero(frac >= c.data.min_brain_fraction)}
  assert set(seen) == expected
  # The examples of a split are stored in order: patient by patient, slice by slice.
  keys = [(e['patient'], int(e['slice'])) for e in built['examples']['test']]
  assert keys == sorted(keys)


def test_images_are_matched_with_the_folds_training_references(built):
  root, c = built['root'], built['config']
  split = folds.prepared_split(root / 'prep', c, 1)
  refs_path = root / 'prep' / 'hist_refs_fold1.json'
  assert normalize.references_fitted_on(refs_path) == sorted(split['train'] + split['val'])
  refs = normalize.load_references(refs_path)
  ex = built['examples']['test'][3]
  pc = store.load_prepared(root / 'prep' / 'cases', ex['patient'].decode())
  matched = np.stack([normalize.apply_reference(pc.modality(m), pc.brain, refs[m], c)
                      for m in MODS])
  want = slices.slice_stack(matched, int(ex['slice']), c.data.k)
  np.testing.assert_allclose(ex['image'].astype(np.float32), want, rtol=2e-3, atol=2e-3)
  s = int(ex['slice'])
  np.testing.assert_array_equal(ex['label'], pc.label[s])   # raw: the loader makes targets
  np.testing.assert_array_equal(ex['brain'], pc.brain[s])
  assert set(np.unique(np.concatenate([e['label'] for e in built['examples']['train']]))
             ) == {0, 1, 2}   # the toy cohort's BraTS 2021 rim (1) and core (2) both kept
  for e in built['examples']['train']:
    assert bool(e['has_tumor']) == bool(e['label'].any())
  assert any(e['has_tumor'] for e in built['examples']['train'])
  assert not all(e['has_tumor'] for e in built['examples']['train'])


def test_pseudo_normal_present_or_absent(built):
  root, k = built['root'], built['config'].data.k
  for e in built['examples']['train']:
    assert not e['has_pseudo_normal'] and not e['normal'].any()
  volumes = {cid: np.load(root / 'pseudo_normal' / f'{cid}.npz')['t1'] for cid in PN_IDS}
  for e in built['pn_examples']:
    cid = e['patient'].decode()
    if cid in volumes:
      assert e['has_pseudo_normal']
      np.testing.assert_allclose(e['normal'].astype(np.float32),
                                 slices.stack_25d(volumes[cid], int(e['slice']), k),
                                 atol=1e-3)
    else:
      assert not e['has_pseudo_normal'] and not e['normal'].any()


def test_normal_t1_slices_and_fallback(built):
  root, c = built['root'], built['config']
  normal = tfds_builders.build(tfds_builders.normal_t1_builder(c, root / 'tfds'))
  assert normal.builder_config.name.startswith('normal_')
  examples = _read_all(normal, 'train')
  assert {e['patient'] for e in examples} == {b'N009', b'N010'}
  for e in examples:
    assert e['image'].shape == (32, 32, 1) and -1 <= e['image'].min() <= e['image'].max() <= 1
  fallback = tfds_builders.build(tfds_builders.normal_t1_builder(
      c, root / 'tfds', fold=1, source='fallback'))
  split = folds.prepared_split(root / 'prep', c, 1)
  examples = _read_all(fallback, 'train')
  assert examples
  margin = c.data.tumor_free_margin
  for e in examples:
    cid = e['patient'].decode()
    assert cid in split['train'] + split['val']
    label = store.load_prepared(root / 'prep' / 'cases', cid).label
    s = int(e['slice'])
    assert not label[max(0, s - margin):s + margin + 1].any()


def test_missing_prepared_cases_is_a_clear_error(tmp_path):
  builder = tfds_builders.tumor_slices_builder(small_config(), tmp_path / 'tfds', 0,
                                               with_pseudo_normal=False)
  with pytest.raises(CaseError, match='no prepared cases'):
    tfds_builders.build(builder)


def test_shards_are_deterministic(built, tmp_path):
  again = tfds_builders.build(tfds_builders.tumor_slices_builder(
      built['config'], tmp_path / 'tfds', 1, with_pseudo_normal=False,
      prep_dir=built['root'] / 'prep'))
  first = sorted(p for p in Path(built['plain'].data_dir).iterdir() if '.tfrecord' in p.name)
  second = sorted(p for p in Path(again.data_dir).iterdir() if '.tfrecord' in p.name)
  assert [p.name for p in first] == [p.name for p in second] and first
  for a, b in zip(first, second):
    assert a.read_bytes() == b.read_bytes()


def test_case_with_wrong_crop_names_the_file(tmp_path):
  c = small_config()
  toy_prepared_cohort(tmp_path / 'prep', num_cases=3, z=6, hw=(16, 16), modalities=MODS)
  with pytest.raises(CaseError, match=r'P00\d\.npz.*crop'):
    tfds_builders.build(tfds_builders.tumor_slices_builder(c, tmp_path / 'tfds', 0,
                                                           with_pseudo_normal=False))
