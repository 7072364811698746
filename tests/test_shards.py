"""data_prep.shards names the TFDS datasets exactly as the builders (and TFDS) lay them out."""
from pathlib import Path

import pytest

from benchmarks.pipeline import toy_prepared_cohort
from configs import default, inhouse
from data_prep import shards, tfds_builders


def small_config():
  c = default.get_config()
  c.prep.crop_hw = (32, 32)
  c.dataset.modalities = ('t1', 'flair')
  c.data.num_folds = 3
  c.data.val_fraction = 0.2
  return c


def _variants():
  a = small_config()
  b = small_config()
  b.data.k = 1
  b.prep.hist.percentiles = (1, 50, 99)
  c = inhouse.get_config()     # another normal modality and modality list.
  return [a, b, c]


@pytest.mark.parametrize('variant', range(3))
def test_names_agree_with_the_tfds_builders(variant, tmp_path):
  c = _variants()[variant]
  builder = tfds_builders.tumor_slices_builder(c, tmp_path)
  assert Path(builder.data_dir) == shards.tumor_dir(c, tmp_path)
  for key in (None, 0, 2):
    builder = tfds_builders.pseudo_normal_builder(c, tmp_path, key)
    assert Path(builder.data_dir) == shards.pseudo_normal_dir(c, tmp_path, key)
  for fold in (0, 2):
    for source in shards.NORMAL_SOURCES:
      builder = tfds_builders.normal_t1_builder(c, tmp_path, fold=fold, source=source)
      assert Path(builder.data_dir) == shards.normal_dir(c, tmp_path, source=source, fold=fold)


def test_names_change_with_the_content_not_with_the_fold_split():
  a, b, c = _variants()
  assert len({shards.tumor_config_name(x) for x in (a, b, c)}) == 3
  other_split = small_config()
  other_split.data.num_folds, other_split.data.val_fraction = 5, 0.1
  assert shards.tumor_config_name(other_split) == shards.tumor_config_name(a)
  assert len({shards.pseudo_normal_config_name(x, key) for x in (a, b, c)
              for key in (None, 0, 1)}) == 9
  assert (shards.normal_config_name(a, 'normal', 0) == shards.normal_config_name(a, 'normal', 3)
          != shards.normal_config_name(a, 'fallback', 0)
          != shards.normal_config_name(a, 'fallback', 3))
  with pytest.raises(ValueError, match='source'):
    shards.normal_dir(a, '/tmp', source='ixi')


def test_is_built_normal_source_and_introvae_key_follow_a_real_build(tmp_path):
  c = small_config()
  toy_prepared_cohort(tmp_path / 'prep', num_cases=4, z=4, modalities=('t1', 'flair'), seed=0)
  data_dir = tmp_path / 'tfds'
  builder = tfds_builders.tumor_slices_builder(c, data_dir)
  target = shards.tumor_dir(c, data_dir)
  assert not shards.is_built(target) and not builder.is_prepared()
  tfds_builders.build(builder)
  assert shards.is_built(target) and builder.is_prepared()
  assert not shards.is_built(shards.pseudo_normal_dir(c, data_dir, None))
  # No normal cohort prepared or built: the IntroVAE falls back to tumor-free slices, per fold.
  assert shards.normal_source(c, data_dir) == 'fallback'
  assert shards.introvae_key(tmp_path / 'prep', 2) == 2
  assert tfds_builders.normal_t1_builder(c, data_dir).data_dir == str(
      shards.normal_slices_dir(c, data_dir))
  toy_prepared_cohort(tmp_path / 'prep', num_cases=0, num_normal=1, z=4, seed=1)
  assert shards.normal_source(c, data_dir) == 'normal'
  assert shards.introvae_key(tmp_path / 'prep', 2) is None
