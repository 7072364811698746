"""TFDS builders: one tumor shard set for every fold (stored half of the matching, every brain
slice once), the pseudo-normal companion record for record, normal T1 slices, determinism."""
from pathlib import Path
import re

import numpy as np
import pytest

from benchmarks.pipeline import toy_prepared_cohort
from configs import default
from data_prep import folds, normalize, shards, slices, store, tfds_builders
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


def _read_all(builder, split=shards.ALL_SPLIT):
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
  tumor = tfds_builders.build(tfds_builders.tumor_slices_builder(c, root / 'tfds'))
  pn = tfds_builders.build(tfds_builders.pseudo_normal_builder(c, root / 'tfds', None))
  return {'root': root, 'config': c, 'ids': ids, 'tumor': tumor, 'pn': pn,
          'examples': _read_all(tumor), 'pn_examples': _read_all(pn)}


def test_examples_hold_the_stored_half_and_a_brain_stack(built):
  c = built['config']
  ex = built['examples'][0]
  n = 2 * c.data.k + 1
  assert ex['image'].shape == (32, 32, len(MODS) * n) and ex['image'].dtype == np.float16
  assert ex['landmarks'].shape == (len(MODS), len(c.prep.hist.percentiles))
  assert ex['label'].shape == (32, 32) and ex['label'].dtype == np.uint8
  assert ex['brain'].shape == (32, 32, n) and ex['brain'].dtype == bool
  assert isinstance(ex['patient'], bytes) and ex['slice'].dtype == np.int32
  assert 'normal' not in ex
  assert list(built['tumor'].info.splits) == [shards.ALL_SPLIT]


def test_every_brain_slice_of_every_patient_once_in_order(built):
  root, c = built['root'], built['config']
  keys = [(e['patient'].decode(), int(e['slice'])) for e in built['examples']]
  expected = []
  for cid in sorted(built['ids']):
    pc = store.load_prepared(root / 'prep' / 'cases', cid)
    frac = pc.brain.mean(axis=(1, 2))
    expected += [(cid, int(s)) for s in np.flatnonzero(frac >= c.data.min_brain_fraction)]
  assert keys == expected   # patient by patient, slice by slice, each once.


def test_stored_half_finishes_into_the_folds_matching(built):
  """Stored values mapped from their landmarks onto fold 1's references are the exact
  histogram matching (normalize.apply_reference) to float16 precision."""
  root, c = built['root'], built['config']
  split = folds.prepared_split(root / 'prep', c, 1)
  refs = normalize.load_or_fit_references(normalize.reference_path(root / 'prep', 1),
                                          root / 'prep' / 'cases', split['train'] + split['val'],
                                          MODS, c)
  k, n = c.data.k, 2 * c.data.k + 1
  ex = built['examples'][7]
  pc = store.load_prepared(root / 'prep' / 'cases', ex['patient'].decode())
  matched = np.stack([normalize.apply_reference(pc.modality(m), pc.brain, refs[m], c)
                      for m in MODS])
  want = slices.slice_stack(matched, int(ex['slice']), k)
  stored = ex['image'].reshape(32, 32, len(MODS), n)
  got = np.stack([normalize.apply_stored(stored[..., j, :], ex['brain'], ex['landmarks'][j],
                                         refs[m]) for j, m in enumerate(MODS)], 2)
  np.testing.assert_allclose(got.reshape(want.shape), want, rtol=2e-3, atol=2e-3)
  s = int(ex['slice'])
  np.testing.assert_array_equal(ex['label'], pc.label[s])   # raw: the loader makes targets
  np.testing.assert_array_equal(ex['brain'], slices.stack_25d(pc.brain, s, k))
  assert set(np.unique(np.concatenate([e['label'] for e in built['examples']]))
             ) == {0, 1, 2}   # the toy cohort's BraTS 2021 rim (1) and core (2) both kept
  for e in built['examples']:
    assert bool(e['has_tumor']) == bool(e['label'].any())
  assert any(e['has_tumor'] for e in built['examples'])
  assert not all(e['has_tumor'] for e in built['examples'])


def test_pseudo_normal_companion_holds_each_patients_slices_and_their_neighbours(built):
  """One slice per record: per patient, every slice within K of its tumour records (clipped
  to the volume), so every 2.5D stack can be assembled; the stored values are the volume's."""
  root, k = built['root'], built['config'].data.k
  tumor = {}
  for e in built['examples']:
    tumor.setdefault(e['patient'].decode(), []).append(int(e['slice']))
  companion = {}
  for e in built['pn_examples']:
    companion.setdefault(e['patient'].decode(), []).append(int(e['slice']))
  assert list(companion) == list(tumor)   # same patients, same order.
  for cid, got in companion.items():
    z = store.load_prepared(root / 'prep' / 'cases', cid).brain.shape[0]
    assert got == list(range(max(0, min(tumor[cid]) - k), min(z - 1, max(tumor[cid]) + k) + 1))
  volumes = {cid: np.load(root / 'pseudo_normal' / f'{cid}.npz')['t1'] for cid in PN_IDS}
  for e in built['pn_examples']:
    cid = e['patient'].decode()
    assert e['normal'].shape == (32, 32)
    if cid in volumes:
      assert e['has_pseudo_normal']
      np.testing.assert_array_equal(e['normal'],
                                    volumes[cid][int(e['slice'])].astype(np.float16))
    else:
      assert not e['has_pseudo_normal'] and not e['normal'].any()


@pytest.mark.parametrize('workers', [1, 2])
def test_shards_are_deterministic_in_process_or_in_workers(built, tmp_path, workers):
  """A rebuild, in this process or in config.prep.shard_workers spawned processes, writes
  byte-identical shards."""
  c = built['config'].copy_and_resolve_references()
  c.prep.shard_workers = workers
  again = tfds_builders.build(tfds_builders.tumor_slices_builder(
      c, tmp_path / 'tfds', prep_dir=built['root'] / 'prep'))
  shard = re.compile(r'\.tfrecord-\d{5}-of-\d{5}$')   # not the readers' index sidecars.
  first = sorted(p for p in Path(built['tumor'].data_dir).iterdir() if shard.search(p.name))
  second = sorted(p for p in Path(again.data_dir).iterdir() if shard.search(p.name))
  assert [p.name for p in first] == [p.name for p in second] and first
  for x, y in zip(first, second):
    assert x.read_bytes() == y.read_bytes()


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
  builder = tfds_builders.tumor_slices_builder(small_config(), tmp_path / 'tfds')
  with pytest.raises(CaseError, match='no prepared cases'):
    tfds_builders.build(builder)
  with pytest.raises(CaseError, match='build the tumor slices before'):
    tfds_builders.build(tfds_builders.pseudo_normal_builder(small_config(), tmp_path / 'tfds',
                                                            None))


def test_case_with_wrong_crop_names_the_file(tmp_path):
  c = small_config()
  toy_prepared_cohort(tmp_path / 'prep', num_cases=3, z=6, hw=(16, 16), modalities=MODS)
  with pytest.raises(CaseError, match=r'P00\d\.npz.*crop'):
    tfds_builders.build(tfds_builders.tumor_slices_builder(c, tmp_path / 'tfds'))
