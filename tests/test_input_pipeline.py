"""Input pipeline: batch contract, uniform patient sampling, the global tumor share on any
number of processes, determinism whatever the threads, aligned augmentation, evaluation order
equal to TFDS's.

Training batches differ from the tf.data reader's by design, so no test compares them: that
reader shuffled a few shards' records in a buffer (an epoch came from a handful of patients,
each slice equally likely), while this one draws every sample from (seed, step, slot): a
patient uniformly, then one of its slices. One shard set serves every fold: a fold's split and
histogram references are applied when reading, and what comes out equals bitwise what
evaluation and new patients are fed (data_prep.inputs.case_inputs).
"""
import numpy as np
import pytest

from benchmarks.pipeline import toy_prepared_cohort
from clfc_jax import input_pipeline
from configs import default
from data_prep import folds, inputs, normalize, shards, store, tfds_builders, tfrecord

MODS = ('t1', 'flair')
FOLD = 0
Z = 16
_PROBS = ('flip_prob', 'rotate_prob', 'scale_prob', 'intensity_prob', 'gamma_prob', 'noise_prob',
          'bias_prob', 'blur_prob', 'lowres_prob', 'slab_prob')


def small_config(**augment):
  """32x32, two modalities; augmentation off unless probabilities are given (others 0)."""
  c = default.get_config()
  c.prep.crop_hw = (32, 32)
  c.dataset.modalities = MODS
  c.data.num_folds = 3
  c.data.val_fraction = 0.2
  a = c.data.augment
  for key in _PROBS:
    a[key] = augment.pop(key, 0.0)
  for key, value in augment.items():
    a[key] = value
  a.enabled = any(a[key] for key in _PROBS)
  return c


def _drop_lowest_slices(cases_dir, case_id, n):
  """Patients with different numbers of slices (the tumor sits high, so it stays)."""
  pc = store.load_prepared(cases_dir, case_id)
  store.save_prepared(store.PreparedCase(case_id, pc.images[:, n:], pc.brain[n:],
                                         pc.label[n:], pc.meta), cases_dir)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Tumor slices whose pseudo-normal is the matched T1 itself (so alignment is checkable);
  patients have 16, 13, 10 or 7 slices."""
  root = tmp_path_factory.mktemp('work')
  c = small_config()
  ids = toy_prepared_cohort(root / 'prep', num_cases=9, num_normal=2, modalities=MODS, z=Z,
                            seed=3)
  for i, cid in enumerate(ids):
    if i % 4:
      _drop_lowest_slices(root / 'prep' / 'cases', cid, 3 * (i % 4))
  split = folds.prepared_split(root / 'prep', c, FOLD)
  refs = normalize.load_or_fit_references(root / 'prep' / f'hist_refs_fold{FOLD}.json',
                                          root / 'prep' / 'cases', split['train'] + split['val'],
                                          MODS, c)
  (root / 'pseudo_normal').mkdir()
  for cid in store.prepared_ids(root / 'prep' / 'cases'):
    pc = store.load_prepared(root / 'prep' / 'cases', cid)
    np.savez(root / 'pseudo_normal' / f'{cid}.npz',
             t1=inputs.as_in_shards(inputs.matched_modalities(pc, refs, ('t1',), c)[0]))
  tfds_builders.build(tfds_builders.tumor_slices_builder(c, root / 'tfds'))
  tfds_builders.build(tfds_builders.pseudo_normal_builder(c, root / 'tfds', None))
  tfds_builders.build(tfds_builders.normal_t1_builder(c, root / 'tfds'))
  return root / 'tfds'


def _originals(c, data_dir, split='train'):
  out = {}
  for b in input_pipeline.eval_iterator(c, data_dir, FOLD, split, 16):
    for i in np.flatnonzero(b['valid']):
      out[(b['patient'][i], int(b['slice'][i]))] = {k: v[i] for k, v in b.items()}
  return out


def _train(c, data_dir, batch, seed, p=0, n=1):
  return input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=batch, seed=seed,
                                       process_index=p, process_count=n)


def _take(it, steps):
  try:
    return [next(it) for _ in range(steps)]
  finally:
    it.close()


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_follow_the_contract_and_are_seeded(data_dir):
  c = small_config()
  b = _take(_train(c, data_dir, 6, 5), 1)[0]
  n = 2 * c.data.k + 1
  assert set(b) == {'image', 'normal', 'label', 'brain', 'patient', 'slice'}
  assert b['image'].shape == (6, 32, 32, len(MODS) * n) and b['image'].dtype == np.float32
  assert b['normal'].shape == (6, 32, 32, n) and b['normal'].dtype == np.float32
  assert b['label'].shape == (6, 32, 32) and b['label'].dtype == np.int32
  assert b['brain'].shape == (6, 32, 32) and b['brain'].dtype == bool
  assert b['patient'].shape == (6,) and isinstance(b['patient'][0], bytes)
  assert b['slice'].shape == (6,) and b['slice'].dtype == np.int32
  _assert_batches_equal(b, _take(_train(c, data_dir, 6, 5), 1)[0])
  other = _take(_train(c, data_dir, 6, 6), 1)[0]
  assert list(zip(other['patient'], other['slice'])) != list(zip(b['patient'], b['slice']))
  c.model.use_normal_net = False    # baseline1: no `normal` in the batch.
  assert 'normal' not in _take(_train(c, data_dir, 6, 5), 1)[0]


def test_same_seed_and_step_give_the_same_batch_whatever_the_threads(data_dir):
  c = small_config(**{k: 0.5 for k in _PROBS})
  c.data.read_threads = 1
  one = _take(_train(c, data_dir, 6, 9), 4)
  c.data.read_threads = 3
  c.data.read_prefetch = 7
  many = _take(_train(c, data_dir, 6, 9), 4)
  for a, b in zip(one, many):
    _assert_batches_equal(a, b)
  assert not np.array_equal(one[0]['image'], one[1]['image'])


def test_spawned_worker_processes_give_the_same_batches(data_dir):
  """grain worker processes (spawned, so never a fork of this JAX process) change nothing."""
  c = small_config(flip_prob=0.5, rotate_prob=0.5, noise_prob=0.5)
  here = _take(_train(c, data_dir, 6, 3), 3)
  c.data.read_workers = 2
  spawned = _take(_train(c, data_dir, 6, 3), 3)
  for a, b in zip(here, spawned):
    assert type(b['image']) is np.ndarray    # copied out of grain's shared memory.
    _assert_batches_equal(a, b)


def test_processes_hold_contiguous_parts_of_one_global_batch(data_dir):
  """The global batch, and so its tumor share tumor_slots(8) = 3 of 8, is the same on 1, 2
  and 4 processes (a per-process rounding gave 4 of 8 with 4 processes of 2)."""
  c = small_config(flip_prob=0.5, rotate_prob=0.5)
  has_tumor = {k: bool(v['label'].any()) for k, v in _originals(small_config(), data_dir).items()}
  is_tumor_slot = input_pipeline.tumor_positions(8, c.data.tumor_fraction)
  assert input_pipeline.tumor_slots(8, c.data.tumor_fraction) == is_tumor_slot.sum() == 3
  assert input_pipeline.tumor_slots(4, c.data.tumor_fraction) == 1
  assert input_pipeline.tumor_slots(6, c.data.tumor_fraction) == 2
  whole = _take(_train(c, data_dir, 8, 4), 6)
  tumor_in_other_slots = 0
  for b in whole:
    tumor = np.array([has_tumor[(p, int(s))] for p, s in zip(b['patient'], b['slice'])])
    assert tumor[is_tumor_slot].all()
    tumor_in_other_slots += tumor[~is_tumor_slot].sum()
  assert 0 < tumor_in_other_slots < 6 * 5    # the other slots draw from every slice.
  for n in (2, 4):
    parts = [_take(_train(c, data_dir, 8, 4, p, n), 6) for p in range(n)]
    for t, b in enumerate(whole):
      local = [part[t] for part in parts]
      assert all(x['image'].shape[0] == 8 // n for x in local)
      _assert_batches_equal(b, {k: np.concatenate([x[k] for x in local]) for k in b})
  with pytest.raises(ValueError, match='not divisible'):
    _train(c, data_dir, 6, 0, 0, 4)


def test_patients_are_drawn_uniformly_not_by_their_number_of_slices(data_dir):
  """One epoch of 300 steps: per-patient counts within 4 binomial standard deviations of
  uniform; drawing slices uniformly instead would be far outside (patients have 7-16 slices)."""
  c = small_config()
  c.model.use_normal_net = False
  read, records = input_pipeline.fold_records(c, data_dir, FOLD, 'train')
  patients = read.source.column('patient')[records]
  tumor = read.source.column('has_tumor')[records]
  names, slices = np.unique(patients, return_counts=True)
  tumor_names = np.unique(patients[tumor])
  assert len(names) >= 4 and slices.max() >= 2 * slices.min()
  steps, batch = 300, 6
  is_tumor_slot = input_pipeline.tumor_positions(batch, c.data.tumor_fraction)
  drawn = {True: [], False: []}
  for b in _take(_train(c, data_dir, batch, 11), steps):
    for j, p in enumerate(b['patient']):
      drawn[bool(is_tumor_slot[j])].append(p)
  for tumor_slot, pool in ((False, names), (True, tumor_names)):
    got = np.array([drawn[tumor_slot].count(p) for p in pool])
    n, prob = got.sum(), 1.0 / len(pool)
    sd = np.sqrt(n * prob * (1 - prob))
    assert set(drawn[tumor_slot]) <= set(pool)
    assert np.abs(got - n * prob).max() < 4 * sd, (tumor_slot, got)
  # The test can fail: slice-proportional counts of the same draws lie far from uniform.
  n = len(drawn[False])
  proportional = n * slices / slices.sum()
  assert np.abs(proportional - n / len(names)).max() > 6 * np.sqrt(n / len(names))


def test_flips_move_image_label_and_normal_together(data_dir):
  c = small_config(flip_prob=1.0)
  originals = _originals(c, data_dir)
  b = _take(_train(c, data_dir, 6, 1), 1)[0]
  for i in range(6):
    o = originals[(b['patient'][i], int(b['slice'][i]))]
    for key in ('image', 'normal', 'label', 'brain'):
      np.testing.assert_array_equal(b[key][i], o[key][::-1, ::-1])


def test_spatial_and_intensity_augmentation_stays_aligned(data_dir):
  # The pseudo-normal is the matched T1 here: identical transforms keep them equal. The T1's
  # intensity draws reach the pseudo-normal only with normal_intensity (noise is drawn apart).
  c = small_config(flip_prob=0.5, rotate_prob=1.0, scale_prob=1.0, intensity_prob=1.0,
                   gamma_prob=1.0, bias_prob=0.5, blur_prob=0.5, normal_intensity=True)
  k = c.data.k
  batches = _take(_train(c, data_dir, 6, 2), 4)
  checked = 0
  for b in batches:
    np.testing.assert_allclose(b['normal'], b['image'][..., :2 * k + 1], atol=1e-5)
    for i in range(6):
      centre = b['image'][i, ..., k]
      tumor, brain = b['label'][i] == 1, b['brain'][i]
      assert not (tumor & ~brain).any()
      if tumor.sum() >= 4:     # the bright blob is still under the (nearest-warped) label.
        assert centre[tumor].mean() > centre[brain & ~tumor].mean()
        checked += 1
  assert checked >= 4
  o = _originals(small_config(), data_dir)[(b['patient'][-1], int(b['slice'][-1]))]
  assert not np.allclose(b['image'][-1], o['image'])
  c.data.augment.normal_intensity = False   # the default: spatial transforms only.
  b = _take(_train(c, data_dir, 6, 2), 1)[0]
  np.testing.assert_array_equal(b['label'], batches[0]['label'])
  assert not np.allclose(b['normal'], b['image'][..., :2 * k + 1], atol=1e-3)


def _tfds_records(c, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builders.tumor_slices_builder(c, data_dir)
  return list(tfds.as_numpy(builder.as_dataset(split=shards.ALL_SPLIT, shuffle_files=False)))


@pytest.mark.parametrize('fold,split', [(FOLD, 'train'), (FOLD, 'test'), (2, 'val')])
def test_eval_iterator_gives_the_folds_patients_as_evaluation_sees_them(data_dir, fold, split):
  """Fold `fold`'s `split` patients, in TFDS's record order, and every slice bitwise what
  inputs.case_inputs (evaluation, new patients) feeds with that fold's references."""
  c = small_config()
  prep = data_dir.parent / 'prep'
  ids = folds.prepared_split(prep, c, fold)
  refs = normalize.load_or_fit_references(normalize.reference_path(prep, fold), prep / 'cases',
                                          ids['train'] + ids['val'], MODS, c)
  want = [(r['patient'], int(r['slice'])) for r in _tfds_records(c, data_dir)
          if r['patient'].decode() in ids[split]]
  got = [{k: v[i] for k, v in b.items()}
         for b in input_pipeline.eval_iterator(c, data_dir, fold, split, 7)
         for i in np.flatnonzero(b['valid'])]
  assert [(g['patient'], int(g['slice'])) for g in got] == want
  assert len(got) == input_pipeline.num_examples(c, data_dir, fold, split) > 0
  cases = {}
  for g in got:
    cid = g['patient'].decode()
    if cid not in cases:
      pc = store.load_prepared(prep / 'cases', cid)
      with np.load(data_dir.parent / 'pseudo_normal' / f'{cid}.npz') as z:
        pn = z['t1']
      cases[cid] = (inputs.case_inputs(pc, refs, c, pseudo_normal=pn), pc)
    case, pc = cases[cid]
    s = int(g['slice'])
    np.testing.assert_array_equal(g['image'], case['image'][s])
    np.testing.assert_array_equal(g['normal'], case['normal'][s])
    np.testing.assert_array_equal(g['label'], pc.label[s] > 0)
    np.testing.assert_array_equal(g['brain'], pc.brain[s])
    assert g['image'].dtype == g['normal'].dtype == np.float32 and g['label'].dtype == np.int32


def test_one_shard_set_serves_every_fold(data_dir):
  """The folds read the same records (no per-fold copy) and differ only in their references."""
  c = small_config()
  assert [d.name for d in (data_dir / shards.TUMOR_DATASET).iterdir()] == [
      shards.tumor_config_name(c)]
  read0, _ = input_pipeline.fold_records(c, data_dir, 0, 'test')
  read1, records1 = input_pipeline.fold_records(c, data_dir, 1, 'test')
  i = int(records1[0])
  a, b = read0(i), read1(i)
  assert (a['patient'], a['slice']) == (b['patient'], b['slice'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], b['image'])   # fold 0's and fold 1's references.
  np.testing.assert_array_equal(a['image'] == 0, b['image'] == 0)   # same brain.


def test_record_cache_gives_the_fresh_read_and_a_reused_reader_the_same_batches(data_dir):
  """Cached records equal fresh reads bitwise, come back as new arrays each time, respect the
  byte bound; one reader kept over epochs (the trainer's) changes no batch."""
  c = small_config(flip_prob=0.5, rotate_prob=0.5, intensity_prob=0.5, noise_prob=0.5)
  c.data.read_cache_mb = 0
  fresh, records = input_pipeline.fold_records(c, data_dir, FOLD, 'train')
  c.data.read_cache_mb = 1
  cached, _ = input_pipeline.fold_records(c, data_dir, FOLD, 'train')
  for i in records[:6]:
    first, again = cached(i), cached(i)
    for key, value in fresh(i).items():
      np.testing.assert_array_equal(first[key], value, err_msg=key)
      np.testing.assert_array_equal(again[key], value, err_msg=key)
      assert type(first[key]) is type(value)
      if isinstance(value, np.ndarray):
        assert first[key].dtype == value.dtype and first[key] is not again[key]
    first['image'][:] = 7   # a caller's change does not reach the cache.
    assert not (cached(i)['image'] == 7).all()
  assert fresh._held[0] == 0 and not fresh._records
  assert 0 < cached._held[0] <= 2**20 and len(cached._records) == 6
  c.data.read_cache_mb = 0.05   # 52 KB: some records only
  small, _ = input_pipeline.fold_records(c, data_dir, FOLD, 'train')
  for i in records:
    small(i)
  assert 0 < len(small._records) < len(records) and small._held[0] <= 0.05 * 2**20
  c.data.read_cache_mb = 64
  kept = input_pipeline.fold_records(c, data_dir, FOLD, 'train')
  for seed in (0, 1):   # two "epochs" through one reader vs a reader each
    reused = _take(input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=4,
                                                 seed=seed, records=kept), 3)
    for a, b in zip(reused, _take(_train(c, data_dir, 4, seed), 3)):
      _assert_batches_equal(a, b)


def test_eval_iterator_ordered_once_with_padding_and_process_parts(data_dir):
  c = small_config()
  n = input_pipeline.num_examples(c, data_dir, FOLD, 'test')
  batches = list(input_pipeline.eval_iterator(c, data_dir, FOLD, 'test', 7))
  assert len(batches) == -(-n // 7)
  assert all(b['image'].shape[0] == 7 for b in batches)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == n and valid[:n].all()
  keys = [(p, s) for b in batches for p, s, v in zip(b['patient'], b['slice'], b['valid']) if v]
  assert keys == sorted(keys) and len(set(keys)) == n
  assert batches[-1]['patient'][-1] == b'' and not batches[-1]['image'][-1].any()
  parts = [[(p, s) for b in input_pipeline.eval_iterator(c, data_dir, FOLD, 'test', 7,
                                                         process_index=i, process_count=3)
            for p, s, v in zip(b['patient'], b['slice'], b['valid']) if v] for i in range(3)]
  assert parts[0] + parts[1] + parts[2] == keys
  assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_normal_t1_iterator(data_dir):
  c = small_config()
  assert input_pipeline.num_normal_slices(c, data_dir) > 0
  it = input_pipeline.normal_t1_iterator(c, data_dir, 8, seed=0, process_index=0,
                                         process_count=1)
  b = _take(it, 1)[0]
  assert set(b) == {'image'} and b['image'].shape == (8, 32, 32, 1)
  assert b['image'].dtype == np.float32 and -1 <= b['image'].min() < b['image'].max() <= 1
  halves = [_take(input_pipeline.normal_t1_iterator(c, data_dir, 8, seed=0, process_index=p,
                                                    process_count=2), 1)[0] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), b['image'])


def test_missing_shards_name_what_to_build(data_dir, tmp_path):
  c = small_config()
  c.data.k = 1   # another data setting: no shards of it yet.
  with pytest.raises(FileNotFoundError, match='tumor shards not built yet'):
    input_pipeline.train_iterator(c, data_dir, 1, global_batch_size=6, seed=0,
                                  process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='normal T1 slices not built'):
    input_pipeline.num_normal_slices(c, tmp_path / 'tfds')
  c = small_config()
  assert shards.is_built(shards.tumor_dir(c, data_dir))
  assert shards.is_built(shards.pseudo_normal_dir(c, data_dir, None))
