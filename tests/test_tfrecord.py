"""TF-free TFRecord reader: same examples as tfds.as_numpy, works without TF, catches corruption."""
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from benchmarks.pipeline import toy_prepared_cohort
from configs import default, demo
from data_prep import shards, tfds_builders, tfrecord

import no_tensorflow

SPLIT = shards.ALL_SPLIT
MODS = ('t1', 'flair')
REPO = Path(__file__).resolve().parents[1]


def small_config():
  c = default.get_config()
  c.prep.crop_hw = (32, 32)
  c.dataset.modalities = MODS
  c.data.num_folds = 3
  c.data.val_fraction = 0.2
  return c


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """TumorSlices (zlib float16 / bool / uint8 tensors, a plain float32 tensor, text, scalars),
  written as 3 shards (as a BraTS-size split is) to check the order across shards."""
  root = tmp_path_factory.mktemp('work')
  toy_prepared_cohort(root / 'prep', num_cases=6, modalities=MODS, seed=4)
  builder = tfds_builders.tumor_slices_builder(small_config(), root / 'tfds')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, num_shards=3))
  assert len(list(Path(builder.data_dir).glob(f'*-{SPLIT}.tfrecord-*-of-00003'))) == 3
  return Path(builder.data_dir)


def _tfds_examples(data_dir, split):
  builder = tfds.builder_from_directory(str(data_dir))
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _assert_same(got, want):
  assert set(got) == set(want)
  for key, w in want.items():
    g = got[key]
    assert type(g) is type(w), key
    if isinstance(w, bytes):
      assert g == w, key
    else:
      assert g.dtype == w.dtype and g.shape == w.shape, key
      assert g.tobytes() == w.tobytes(), key


def test_same_examples_as_tfds_in_the_same_order(built, split=SPLIT):
  source = tfrecord.ShardSource(built, split)     # writes the sidecars before TFDS reads.
  want = _tfds_examples(built, split)
  assert len(source) == len(want) > 0
  for i, w in enumerate(want):
    _assert_same(source[i], w)
  assert source[-1]['slice'] == want[-1]['slice']
  assert any(w['has_tumor'] for w in want) and not all(w['has_tumor'] for w in want)
  for name in ('patient', 'slice', 'has_tumor'):
    column = source.column(name)
    assert len(column) == len(want)
    assert [c for c in column] == [w[name] for w in want]
    assert column.dtype == (object if name == 'patient' else want[0][name].dtype)
  sidecars = [tfrecord.columns_sidecar(p) for p in source.paths]
  written = [p.stat().st_mtime_ns for p in sidecars]
  again = tfrecord.ShardSource(built, split)       # from the sidecars this time.
  np.testing.assert_array_equal(again.column('slice'), source.column('slice'))
  assert [p.stat().st_mtime_ns for p in sidecars] == written
  assert list(again.column('patient')) == list(source.column('patient'))
  with pytest.raises(KeyError, match='not a scalar'):
    source.column('image')
  with pytest.raises(IndexError):
    source[len(source)]


class FeatureProbe(tfds.core.GeneratorBasedBuilder):
  """Every feature kind / encoding / dtype the reader decodes, beyond the project's builders."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    t = tfds.features.Tensor
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'f16_none': t(shape=(2, 3), dtype=np.float16),
        'f64_none': t(shape=(3,), dtype=np.float64),
        'i8_none': t(shape=(2, 2), dtype=np.int8),
        'u64_none': t(shape=(2,), dtype=np.uint64),
        'bool_none': t(shape=(4,), dtype=np.bool_),
        'u16_bytes': t(shape=(3, 2), dtype=np.uint16, encoding='bytes'),
        'f32_zlib': t(shape=(5, 1), dtype=np.float32, encoding='zlib'),
        'free_zlib': t(shape=(None, 2), dtype=np.int32, encoding='zlib'),
        'f32': tfds.features.Scalar(dtype=np.float32),
        'i64': tfds.features.Scalar(dtype=np.int64),
        'text': tfds.features.Text(),
    }), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(5):
      yield i, {
          'f16_none': rng.normal(size=(2, 3)).astype(np.float16),
          'f64_none': rng.normal(size=3) * 1e-3,
          'i8_none': rng.integers(-128, 128, (2, 2)).astype(np.int8),
          'u64_none': np.array([2**64 - 1 - i, i], np.uint64),
          'bool_none': rng.random(4) < 0.5,
          'u16_bytes': rng.integers(0, 2**16, (3, 2)).astype(np.uint16),
          'f32_zlib': rng.normal(size=(5, 1)).astype(np.float32),
          'free_zlib': np.arange(2 * i, dtype=np.int32).reshape(i, 2),
          'f32': np.float32(rng.normal()),
          'i64': -(2**40) * i,
          'text': f'ex\u00e9mple {i}',
      }


def test_every_tensor_encoding_and_dtype_matches_tfds(tmp_path):
  builder = FeatureProbe(data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  source = tfrecord.ShardSource(builder.data_dir, 'train')
  want = list(tfds.as_numpy(builder.as_dataset(split='train')))
  assert len(source) == len(want) == 5
  for i, w in enumerate(want):
    _assert_same(source[i], w)
  assert source.column('text')[1] == 'ex\u00e9mple 1'.encode()


def test_pickles_without_its_files_and_reads_after_fork(built):
  source = tfrecord.ShardSource(built, SPLIT)
  first = source[0]
  clone = pickle.loads(pickle.dumps(source))
  _assert_same(clone[0], first)
  assert len(pickle.dumps(source)) < 100_000
  pid = os.fork()
  if pid == 0:   # the child reads through the parent's object: it must open its own files.
    ok = source[3]['image'].tobytes() == clone[3]['image'].tobytes()
    os._exit(0 if ok else 1)
  # Poll rather than block: a child that hangs (a fork of a multithreaded process) fails the
  # test instead of hanging the suite.
  deadline = time.monotonic() + 120
  while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
  if done[0] == 0:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail('the forked reader did not finish within 120 s')
  assert done[1] == 0
  _assert_same(source[0], first)


_NO_TF = no_tensorflow.BLOCK_TENSORFLOW + textwrap.dedent('''
  import hashlib
  from data_prep import tfrecord
  source = tfrecord.ShardSource(sys.argv[1], sys.argv[2], cache=False)
  digest = hashlib.sha256()
  for i in range(len(source)):
    for key, value in sorted(source[i].items()):
      digest.update(value if isinstance(value, bytes) else value.tobytes())
  digest.update(source.column('patient').astype(bytes).tobytes())
  assert not any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')
                 for m, module in sys.modules.items() if module is not None)
  print(len(source), digest.hexdigest())
''')


def test_reads_where_tensorflow_cannot_be_imported(built):
  out = subprocess.run([sys.executable, '-c', _NO_TF, str(built), SPLIT], capture_output=True,
                       text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       check=False, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  want = _tfds_examples(built, SPLIT)
  for w in want:
    for key, value in sorted(w.items()):
      digest.update(value if isinstance(value, bytes) else value.tobytes())
  digest.update(np.array([w['patient'] for w in want]).tobytes())
  assert out.stdout.split() == [str(len(want)), digest.hexdigest()]


def _copy_dataset(built, dest) -> Path:
  shutil.copytree(built, dest, ignore=shutil.ignore_patterns('*.npz'))
  return next(dest.glob(f'*-{SPLIT}.tfrecord-00000-of-*'))


def _flip(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x10
  path.write_bytes(bytes(data))


def test_a_corrupt_payload_names_the_file_and_offset(built, tmp_path):
  shard = _copy_dataset(built, tmp_path / 'ds')
  records = tfrecord.index_records(shard, cache=False)
  offset, length = records[2]
  _flip(shard, int(offset + length // 2))
  source = tfrecord.ShardSource(shard.parent, SPLIT)   # indexing reads headers only.
  source[1]
  with pytest.raises(tfrecord.RecordError, match='payload CRC mismatch') as e:
    source[2]
  assert str(shard) in str(e.value) and f'at byte {offset}:' in str(e.value)
  assert isinstance(e.value, ValueError) and e.value.offset == offset
  with pytest.raises(tfrecord.RecordError, match=f'at byte {offset}:'):
    source.column('slice')


def test_a_corrupt_length_names_the_file_and_offset(built, tmp_path):
  shard = _copy_dataset(built, tmp_path / 'ds')
  header = int(tfrecord.index_records(shard, cache=False)[3, 0]) - 12
  _flip(shard, header + 1)
  with pytest.raises(tfrecord.RecordError, match='header CRC mismatch') as e:
    tfrecord.ShardSource(shard.parent, SPLIT)
  assert str(shard) in str(e.value) and f'at byte {header}:' in str(e.value)
  # A truncated file is named too.
  _flip(shard, header + 1)
  shard.write_bytes(shard.read_bytes()[:header + 100])
  with pytest.raises(tfrecord.RecordError, match=f'at byte {header}: .*past the end'):
    tfrecord.index_records(shard, cache=False)


def test_the_index_sidecar_is_reused_and_rebuilt_when_the_file_changes(built, tmp_path):
  shard = _copy_dataset(built, tmp_path / 'ds')
  records = tfrecord.index_records(shard)
  sidecar = tfrecord.index_sidecar(shard)
  written = sidecar.stat().st_mtime_ns
  np.testing.assert_array_equal(tfrecord.index_records(shard), records)
  assert sidecar.stat().st_mtime_ns == written       # read, not rewritten.
  offset, length = (int(x) for x in records[0])
  first = shard.read_bytes()[offset - 12:offset + length + 4]
  with open(shard, 'ab') as f:                        # one more (valid) record.
    f.write(first)
  grown = tfrecord.index_records(shard)
  assert len(grown) == len(records) + 1
  np.testing.assert_array_equal(grown[:-1], records)
  assert grown[-1, 1] == length
  np.testing.assert_array_equal(tfrecord.index_records(shard, cache=False), grown)


def test_parser_reads_packed_and_unpacked_lists():
  ex = tf.train.Example(features=tf.train.Features(feature={
      'b': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'', b'xyz', b'\x00' * 300])),
      'f': tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -2.25, 3e30])),
      'i': tf.train.Feature(int64_list=tf.train.Int64List(
          value=[0, 1, 127, 128, 2**40, -1, -2**63] + list(range(50)))),
      'e': tf.train.Feature(),
  }))
  got = tfrecord.parse_example(ex.SerializeToString())
  assert [bytes(v) for v in got['b'][1]] == [b'', b'xyz', b'\x00' * 300]
  np.testing.assert_array_equal(got['f'][1], np.float32([1.5, -2.25, 3e30]))
  assert got['i'][1].dtype == np.int64
  assert got['i'][1].tolist() == [0, 1, 127, 128, 2**40, -1, -2**63] + list(range(50))
  assert got['e'] == ('empty', [])
  assert set(tfrecord.parse_example(ex.SerializeToString(), {'f'})) == {'f'}
  # Unpacked repeated values (legal on the wire; older writers produce them).
  def entry(key, feature):
    body = b'\x0a' + bytes([len(key)]) + key + b'\x12' + bytes([len(feature)]) + feature
    return b'\x0a' + bytes([len(body)]) + body
  floats = b''.join(b'\x0d' + np.float32(v).tobytes() for v in (0.5, 7.0))
  ints = b'\x08\x05\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01'
  features = (entry(b'f', b'\x12' + bytes([len(floats)]) + floats) +
              entry(b'i', b'\x1a' + bytes([len(ints)]) + ints))
  got = tfrecord.parse_example(b'\x0a' + bytes([len(features)]) + features)
  assert got['f'][1].tolist() == [0.5, 7.0] and got['i'][1].tolist() == [5, -1]


def _speed(config, tmp_path, name):
  c = config
  c.data.num_folds = 3
  mods = tuple(c.dataset.modalities)
  toy_prepared_cohort(tmp_path / name / 'prep', num_cases=3, z=8, hw=tuple(c.prep.crop_hw),
                      modalities=mods)
  builder = tfds_builders.build(tfds_builders.tumor_slices_builder(c, tmp_path / name / 'tfds'))
  source = tfrecord.ShardSource(builder.data_dir, SPLIT)
  source[0]
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < 0.5:
    source[n % len(source)]
    n += 1
  rate = n / (time.perf_counter() - start)
  payload = int(np.mean(source._records[:, 1]))  # pylint: disable=protected-access
  print(f'\nShardSource[i] {name} {tuple(c.prep.crop_hw)} K={c.data.k} {len(mods)} modalities '
        f'(payload ~{payload // 1024} KiB): {rate:.0f} records/s')
  return rate


def test_speed_demo_and_full_size(tmp_path):
  assert _speed(demo.get_config(), tmp_path, 'demo') > 0
  assert _speed(default.get_config(), tmp_path, 'full') > 0
