"""Input pipeline: batch contract, tumor share per batch, aligned augmentation, process shards."""
import numpy as np
import pytest

from benchmarks.pipeline import toy_prepared_cohort
from configs import default
from data_prep import folds, normalize, store, tfds_builders
from clfc_jax import input_pipeline

MODS = ('t1', 'flair')
FOLD = 0


def small_config(**augment):
  c = default.get_config()
  c.prep.crop_hw = (32, 32)
  c.dataset.modalities = MODS
  c.data.num_folds = 3
  c.data.val_fraction = 0.2
  c.data.shuffle_buffer = 64
  a = c.data.augment
  for key in ('flip_prob', 'rotate_prob', 'scale_prob', 'intensity_prob', 'gamma_prob',
              'noise_prob'):
    a[key] = augment.get(key, 0.0)
  a.enabled = bool(augment)
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Tumor slices whose pseudo-normal is the matched T1 itself (so alignment is checkable)."""
  root = tmp_path_factory.mktemp('work')
  c = small_config()
  toy_prepared_cohort(root / 'prep', num_cases=9, num_normal=2, modalities=MODS, seed=3)
  split = folds.prepared_split(root / 'prep', c, FOLD)
  refs = normalize.load_or_fit_references(root / 'prep' / f'hist_refs_fold{FOLD}.json',
                                          root / 'prep' / 'cases', split['train'] + split['val'],
                                          MODS, c)
  (root / 'pseudo_normal').mkdir()
  for cid in store.prepared_ids(root / 'prep' / 'cases'):
    pc = store.load_prepared(root / 'prep' / 'cases', cid)
    np.savez(root / 'pseudo_normal' / f'{cid}.npz',
             t1=normalize.apply_reference(pc.modality('t1'), pc.brain, refs['t1'], c))
  tfds_builders.build(tfds_builders.tumor_slices_builder(c, root / 'tfds', FOLD,
                                                         with_pseudo_normal=True))
  tfds_builders.build(tfds_builders.normal_t1_builder(c, root / 'tfds'))
  return root / 'tfds'


def _originals(c, data_dir, split='train'):
  out = {}
  for b in input_pipeline.eval_iterator(c, data_dir, FOLD, split, 16):
    for i in np.flatnonzero(b['valid']):
      out[(b['patient'][i], int(b['slice'][i]))] = {k: v[i] for k, v in b.items()}
  return out


def test_batches_follow_the_contract_and_are_seeded(data_dir):
  c = small_config()
  it = input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6, process_index=0,
                                     process_count=1, seed=5)
  b = next(it)
  n = 2 * c.data.k + 1
  assert b['image'].shape == (6, 32, 32, len(MODS) * n) and b['image'].dtype == np.float32
  assert b['normal'].shape == (6, 32, 32, n) and b['normal'].dtype == np.float32
  assert b['label'].shape == (6, 32, 32) and b['label'].dtype == np.int32
  assert b['brain'].shape == (6, 32, 32) and b['brain'].dtype == bool
  assert b['patient'].shape == (6,) and isinstance(b['patient'][0], bytes)
  assert b['slice'].dtype == np.int32
  again = next(input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6,
                                             process_index=0, process_count=1, seed=5))
  np.testing.assert_array_equal(b['image'], again['image'])
  c.model.use_normal_net = False    # baseline1: no `normal` in the batch.
  b1 = next(input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6,
                                          process_index=0, process_count=1, seed=5))
  assert 'normal' not in b1


def test_a_third_of_every_batch_has_tumor(data_dir):
  c = small_config()
  assert input_pipeline.tumor_slots(6, c.data.tumor_fraction) == 2
  assert input_pipeline.tumor_slots(4, c.data.tumor_fraction) == 1
  it = input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6, process_index=0,
                                     process_count=1, seed=0)
  has_tumor = np.stack([next(it)['label'].reshape(6, -1).any(axis=1) for _ in range(20)])
  assert has_tumor[:, :2].all()
  assert not has_tumor[:, 2:].all()    # the rest is drawn from every slice.


def test_flips_move_image_label_and_normal_together(data_dir):
  c = small_config(flip_prob=1.0)
  originals = _originals(c, data_dir)
  b = next(input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6,
                                         process_index=0, process_count=1, seed=1))
  for i in range(6):
    o = originals[(b['patient'][i], int(b['slice'][i]))]
    for key in ('image', 'normal', 'label', 'brain'):
      np.testing.assert_array_equal(b[key][i], o[key][::-1, ::-1])


def test_spatial_and_intensity_augmentation_stays_aligned(data_dir):
  c = small_config(flip_prob=0.5, rotate_prob=1.0, scale_prob=1.0, intensity_prob=1.0,
                   gamma_prob=1.0)
  k = c.data.k
  it = input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6, process_index=0,
                                     process_count=1, seed=2)
  checked = 0
  for _ in range(4):
    b = next(it)
    # the pseudo-normal is the matched T1 here: identical augmentation keeps them equal.
    np.testing.assert_allclose(b['normal'], b['image'][..., :2 * k + 1], atol=1e-5)
    for i in range(6):
      centre = b['image'][i, ..., k]
      tumor, brain = b['label'][i] == 1, b['brain'][i]
      assert not (tumor & ~brain).any()
      if tumor.sum() >= 4:     # the bright blob is still under the (nearest-warped) label.
        assert centre[tumor].mean() > centre[brain & ~tumor].mean()
        checked += 1
  assert checked >= 4
  originals = _originals(small_config(), data_dir)
  o = originals[(b['patient'][-1], int(b['slice'][-1]))]
  assert not np.allclose(b['image'][-1], o['image'])


def test_two_processes_read_disjoint_slices(data_dir):
  c = small_config()
  seen = []
  for p in (0, 1):
    it = input_pipeline.train_iterator(c, data_dir, FOLD, global_batch_size=6, process_index=p,
                                       process_count=2, seed=0)
    keys = set()
    for _ in range(15):
      b = next(it)
      assert b['image'].shape[0] == 3
      keys |= set(zip(b['patient'], b['slice'].tolist()))
    seen.append(keys)
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] <= set(_originals(c, data_dir))


def test_eval_iterator_ordered_once_with_padding(data_dir):
  c = small_config()
  n = input_pipeline.num_examples(c, data_dir, FOLD, 'test')
  batches = list(input_pipeline.eval_iterator(c, data_dir, FOLD, 'test', 7))
  assert len(batches) == -(-n // 7)
  assert all(b['image'].shape[0] == 7 for b in batches)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == n and valid[:n].all()
  keys = [(p, s) for b in batches for p, s, v in zip(b['patient'], b['slice'], b['valid']) if v]
  assert keys == sorted(keys) and len(set(keys)) == n


def test_normal_t1_iterator(data_dir):
  c = small_config()
  assert input_pipeline.num_normal_slices(c, data_dir) > 0
  b = next(input_pipeline.normal_t1_iterator(c, data_dir, 8, seed=0, process_index=0,
                                             process_count=1))
  assert set(b) == {'image'} and b['image'].shape == (8, 32, 32, 1)
  assert b['image'].dtype == np.float32 and -1 <= b['image'].min() < b['image'].max() <= 1
