"""TFDS TFRecord shards read without TensorFlow: a random-access source for grain.

The accelerator machine has JAX but no TensorFlow, so the shards the TFDS builders write
(data_prep/tfds_builders.py) are read here with numpy, zlib and google-crc32c only:

  * TFRecord framing: each record is [uint64 length][uint32 masked CRC32C of the 8 length
    bytes][payload][uint32 masked CRC32C of the payload], little-endian. `index_records` reads
    only the 12-byte headers (seeking over payloads) and gives every payload's (offset, length);
    reading a record re-checks its header against the index and verifies both CRCs.
  * tf.train.Example: a small protobuf wire-format parser (`parse_example`), zero-copy on the
    payload (see its docstring for the field numbers).
  * TFDS features: features.json / dataset_info.json are read as plain JSON and each feature is
    decoded as tfds.as_numpy decodes it (Tensor / Scalar with encoding none, bytes or zlib; Text).
  * `ShardSource`: one split as a grain RandomAccessDataSource, plus `column(name)` for the small
    features of every record. Record indexes and columns are cached in sidecars next to each
    shard (`<shard>.index.npz`, `<shard>.columns.npz`), stamped with the shard's size and mtime.

Never import tensorflow or tensorflow_datasets here: this module must work where they are absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
import threading
from typing import Optional
import weakref
import zlib

from absl import logging
import google_crc32c
import numpy as np

_HEADER = 12            # uint64 length + uint32 masked CRC of the length.
_FOOTER = 4             # uint32 masked CRC of the payload.
_MASK_DELTA = 0xa282ead8
_SIDECAR_VERSION = 1    # bump when the sidecar layout changes: old sidecars are then rebuilt.


class RecordError(ValueError):
  """A corrupt or truncated TFRecord file; the message names the file and the byte offset."""

  def __init__(self, path, offset: int, what: str):
    self.path, self.offset = str(path), int(offset)
    super().__init__(f'{path}: at byte {offset}: {what}')


class DatasetError(ValueError):
  """A TFDS dataset directory this reader cannot read (missing files, unsupported features)."""


# --- TFRecord framing --------------------------------------------------------------------------

def masked_crc(data) -> int:
  """TFRecord's masked CRC32C: rotate right by 15 bits, add a constant (mod 2^32)."""
  # google-crc32c's C extension takes numpy arrays (zero copy) but not memoryviews.
  crc = google_crc32c.value(np.frombuffer(data, np.uint8))
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff


def _check_header(path, header, offset: int) -> int:
  """The payload length of the 12-byte header at `offset`, its CRC verified."""
  length = int.from_bytes(header[:8], 'little')
  crc = int.from_bytes(header[8:12], 'little')
  if masked_crc(header[:8]) != crc:
    raise RecordError(path, offset, f'record header CRC mismatch (length field says {length}, '
                      f'stored CRC {crc:#010x}, computed {masked_crc(header[:8]):#010x}): '
                      'corrupt length')
  return length


def _stamp(path) -> np.ndarray:
  st = os.stat(path)
  return np.array([_SIDECAR_VERSION, st.st_size, st.st_mtime_ns], np.int64)


def _load_sidecar(sidecar: Path, stamp: np.ndarray) -> Optional[dict]:
  """The sidecar's arrays if it was written for this exact file (size, mtime), else None."""
  try:
    with np.load(sidecar, allow_pickle=False) as z:
      if 'stamp' not in z or not np.array_equal(z['stamp'], stamp):
        return None
      return {k: z[k] for k in z.files if k != 'stamp'}
  except (OSError, ValueError, EOFError, KeyError):   # absent, partial or foreign: rebuild.
    return None


def _save_sidecar(sidecar: Path, stamp: np.ndarray, arrays: dict) -> None:
  """Writes atomically (temp file + rename), so readers never see half a sidecar; a read-only
  dataset directory just goes without one."""
  try:
    fd, tmp = tempfile.mkstemp(dir=sidecar.parent, prefix=f'.{sidecar.name}.', suffix='.tmp')
  except OSError as e:
    logging.warning('cannot cache %s (%s): the shard is re-indexed next time', sidecar, e)
    return
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, stamp=stamp, **arrays)
    os.replace(tmp, sidecar)
  except OSError as e:
    logging.warning('cannot cache %s (%s): the shard is re-indexed next time', sidecar, e)
    Path(tmp).unlink(missing_ok=True)


def index_sidecar(path) -> Path:
  return Path(f'{path}.index.npz')


def _scan(path) -> np.ndarray:
  size = os.path.getsize(path)
  rows = []
  with open(path, 'rb', buffering=0) as f:
    pos = 0
    while pos < size:
      f.seek(pos)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise RecordError(path, pos, f'truncated record header ({len(header)} of {_HEADER} '
                          f'bytes before the end of the {size}-byte file)')
      length = _check_header(path, header, pos)
      end = pos + _HEADER + length + _FOOTER
      if end > size:
        raise RecordError(path, pos, f'record of {length} bytes runs past the end of the '
                          f'{size}-byte file (truncated file?)')
      rows.append((pos + _HEADER, length))
      pos = end
  return np.array(rows, np.int64).reshape(-1, 2)


def index_records(path, *, cache: bool = True) -> np.ndarray:
  """[N, 2] int64 (payload offset, payload length) of every record of a TFRecord file.

  Reads only the headers (verifying each length's CRC). With `cache`, the index is kept in a
  sidecar `<path>.index.npz` stamped with the file's size and mtime: a BraTS-size split has tens
  of thousands of records on many shards, and every training process (and grain worker) would
  otherwise re-read all their headers at start-up; a changed file invalidates its sidecar.
  """
  path = Path(path)
  if not cache:
    return _scan(path)
  stamp = _stamp(path)
  cached = _load_sidecar(index_sidecar(path), stamp)
  if cached is not None and 'records' in cached:
    return cached['records']
  records = _scan(path)
  _save_sidecar(index_sidecar(path), stamp, {'records': records})
  return records


def read_record(fd: int, path, offset: int, length: int) -> bytes:
  """The payload at `offset` (from the index), header and both CRCs verified; one pread."""
  start = offset - _HEADER
  data = os.pread(fd, _HEADER + length + _FOOTER, start)
  if len(data) < _HEADER + length + _FOOTER:
    raise RecordError(path, start, f'record truncated: wanted {_HEADER + length + _FOOTER} '
                      f'bytes, the file has {len(data)} (file changed since it was indexed?)')
  view = memoryview(data)
  stored_length = _check_header(path, view[:_HEADER], start)
  if stored_length != length:
    raise RecordError(path, start, f'record length {stored_length} differs from the index '
                      f'({length}): the file changed since it was indexed')
  payload = view[_HEADER:_HEADER + length]
  crc = int.from_bytes(view[_HEADER + length:], 'little')
  if masked_crc(payload) != crc:
    raise RecordError(path, offset, f'payload CRC mismatch ({length}-byte payload, stored '
                      f'{crc:#010x}, computed {masked_crc(payload):#010x}): corrupt data')
  return payload


# --- tf.train.Example wire format --------------------------------------------------------------
#
#   Example  { Features features = 1; }
#   Features { map<string, Feature> feature = 1; }   (entries: string key = 1; Feature value = 2)
#   Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                           Int64List int64_list = 3; } }
#   BytesList { repeated bytes value = 1; }
#   FloatList { repeated float value = 1 [packed = true]; }   (fixed32, packed or not)
#   Int64List { repeated int64 value = 1 [packed = true]; }   (varint, packed or not)
#
# Wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32. Repeated submessages and
# repeated list values merge (concatenate), as protobuf parsing does.

def _varint(buf, pos: int):
  result = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7f) << shift
    if b < 0x80:
      return result, pos
    shift += 7


def _fields(buf):
  """(field number, wire type, value or (start, end) for length-delimited) of a message."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value = (pos, pos + n)
      pos += n
    elif wire == 5:
      value, pos = (pos, pos + 4), pos + 4
    elif wire == 1:
      value, pos = (pos, pos + 8), pos + 8
    else:
      raise ValueError(f'unsupported protobuf wire type {wire} (field {number})')
    if pos > end:
      raise ValueError(f'field {number} runs past the end of its message')
    yield number, wire, value


def _varints(buf) -> np.ndarray:
  """Packed varints as int64 (two's complement, as int64 fields are encoded), vectorised."""
  b = np.frombuffer(buf, np.uint8)
  if b.size == 0:
    return np.zeros(0, np.int64)
  if b[-1] >= 0x80:
    raise ValueError('packed varints end mid-value')
  last = b < 0x80
  group = np.concatenate([[0], np.cumsum(last[:-1])])
  first = np.flatnonzero(np.concatenate([[True], last[:-1]]))
  shift = (np.arange(b.size) - first[group]).astype(np.uint64) * np.uint64(7)
  parts = (b & 0x7f).astype(np.uint64) << shift
  return np.add.reduceat(parts, first).view(np.int64)


def _short_varints(buf) -> np.ndarray:
  """Packed varints, a few of them (a scalar's one): a loop beats numpy's call overhead."""
  values, pos = [], 0
  while pos < len(buf):
    v, pos = _varint(buf, pos)
    values.append(v)
  return np.array(values, np.uint64).view(np.int64)


def _parse_feature(buf):
  """('bytes', [memoryview]) | ('float', float32 array) | ('int64', int64 array)."""
  kind, values = None, []
  for number, wire, value in _fields(buf):
    if wire != 2 or number not in (1, 2, 3):
      continue
    new = ('bytes', 'float', 'int64')[number - 1]
    if new != kind:      # oneof: the last kind set wins.
      kind, values = new, []
    sub = buf[value[0]:value[1]]
    for n, w, v in _fields(sub):
      if n != 1:
        continue
      chunk = sub[v[0]:v[1]] if isinstance(v, tuple) else v
      if kind == 'bytes' and w == 2:
        values.append(chunk)
      elif kind == 'float' and w in (2, 5):
        values.append(np.frombuffer(chunk, '<f4'))
      elif kind == 'int64' and w == 2:
        values.append(_varints(chunk) if len(chunk) > 16 else _short_varints(chunk))
      elif kind == 'int64' and w == 0:
        values.append(np.array([chunk], np.uint64).view(np.int64))
      else:
        raise ValueError(f'{kind}_list value with wire type {w}')
  if kind is None:
    return 'empty', []
  if kind == 'bytes':
    return kind, values
  dtype = np.float32 if kind == 'float' else np.int64
  return kind, (np.concatenate(values).astype(dtype, copy=False) if values
                else np.zeros(0, dtype))


def parse_example(payload, keys=None) -> dict:
  """A serialised tf.train.Example -> {name: (kind, values)}, only `keys` if given.

  kind is 'bytes' (values: list of memoryviews into the payload, not copied), 'float'
  (float32 array), 'int64' (int64 array) or 'empty' (a Feature with no list set).
  """
  buf = memoryview(payload)
  out = {}
  for number, wire, span in _fields(buf):
    if number != 1 or wire != 2:
      continue
    features = buf[span[0]:span[1]]
    for n, w, entry_span in _fields(features):
      if n != 1 or w != 2:
        continue
      entry = features[entry_span[0]:entry_span[1]]
      name, value = '', None
      for en, ew, ev in _fields(entry):
        if en == 1 and ew == 2:
          name = bytes(entry[ev[0]:ev[1]]).decode()
        elif en == 2 and ew == 2:
          value = entry[ev[0]:ev[1]]
      if keys is None or name in keys:   # map semantics: the last entry for a key wins.
        out[name] = _parse_feature(value) if value is not None else ('empty', [])
  return out


# --- TFDS features -----------------------------------------------------------------------------

class Feature:
  """One top-level TFDS feature as features.json describes it, and its numpy decoding."""

  def __init__(self, name: str, kind: str, dtype=None, shape=(), encoding: str = 'none'):
    self.name, self.kind, self.encoding = name, kind, encoding
    self.dtype = np.dtype(dtype) if dtype is not None else None
    self.shape = tuple(shape)

  @property
  def small(self) -> bool:
    """A scalar or a text: cheap to keep for every record (`ShardSource.column`)."""
    return self.kind == 'Text' or self.shape == ()

  def decode(self, kind: str, values):
    """The value tfds.as_numpy gives: numpy scalar / array, or bytes for a Text."""
    if self.kind == 'Text' or (self.dtype.kind in 'SUO' and self.encoding == 'none'):
      if kind != 'bytes':
        raise ValueError(f'expected a bytes_list, found a {kind} list')
      if self.shape == ():
        if len(values) != 1:
          raise ValueError(f'expected one bytes value, found {len(values)}')
        return bytes(values[0])
      return np.array([bytes(v) for v in values], object).reshape(self._shape(len(values)))
    if self.encoding != 'none':
      if kind != 'bytes' or len(values) != 1:
        raise ValueError(f'expected one {self.encoding}-encoded bytes value, found a {kind} '
                         f'list of {len(values)}')
      nbytes = self.dtype.itemsize * int(np.prod([d or 1 for d in self.shape]))
      # The output buffer sized up front: zlib's default (16 KiB, grown) costs ~15% more.
      raw = (zlib.decompress(values[0], bufsize=nbytes) if self.encoding == 'zlib'
             else values[0])
      # tf.io.decode_raw reads little-endian; a copy, so the array is writable like TF's.
      flat = np.frombuffer(raw, self.dtype.newbyteorder('<')).astype(self.dtype)
    else:
      if kind not in ('int64', 'float'):
        raise ValueError(f'expected an int64 or float list, found {kind}')
      # Stored as int64 / float32 and cast like TFDS's tf.cast (bools: nonzero; uint64: bits).
      if self.dtype == np.bool_:
        flat = values != 0
      elif self.dtype == np.uint64:
        flat = values.view(np.uint64)
      else:
        flat = values.astype(self.dtype)
    if self.shape == ():
      if flat.size != 1:
        raise ValueError(f'expected one value, found {flat.size}')
      return flat[0]
    return flat.reshape(self._shape(flat.size))

  def _shape(self, size):
    shape = tuple(-1 if d is None else d for d in self.shape)
    known = int(np.prod([d for d in shape if d != -1]))
    if (-1 not in shape and size != known) or (-1 in shape and size % max(known, 1)):
      raise ValueError(f'{size} values do not fit shape {self.shape}')
    return shape


_KINDS = {'Tensor', 'Scalar', 'Text'}


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise DatasetError(f'{path}: missing (is this a TFDS dataset version directory, e.g. '
                       '<data_dir>/tumor_slices/<config>/1.0.0?)') from None
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path}: unreadable: {e}') from None


def read_features(data_dir) -> dict:
  """{name: Feature} from a TFDS dataset directory's features.json (a flat FeaturesDict)."""
  path = Path(data_dir) / 'features.json'
  top = _read_json(path)
  if top.get('pythonClassName', '').rsplit('.', 1)[-1] != 'FeaturesDict':
    raise DatasetError(f'{path}: the top-level feature is {top.get("pythonClassName")}, '
                       'this reader needs a FeaturesDict')
  out = {}
  for name, spec in top.get('featuresDict', {}).get('features', {}).items():
    kind = spec.get('pythonClassName', '').rsplit('.', 1)[-1]
    if kind not in _KINDS:
      raise DatasetError(f'{path}: feature {name!r} is a {spec.get("pythonClassName")}; this '
                         f'reader decodes {sorted(_KINDS)} only')
    if kind == 'Text':
      if spec.get('text'):
        raise DatasetError(f'{path}: feature {name!r}: Text with an encoder is not supported')
      out[name] = Feature(name, 'Text', np.object_)
      continue
    t = spec['tensor']
    dims = tuple(None if int(d) < 0 else int(d) for d in t.get('shape', {}).get('dimensions', []))
    if dims.count(None) > 1 or t.get('optional'):
      raise DatasetError(f'{path}: feature {name!r}: dynamic-shape or optional tensors are not '
                         'supported')
    encoding = t.get('encoding', 'none').lower()
    if encoding not in ('none', 'bytes', 'zlib'):
      raise DatasetError(f'{path}: feature {name!r}: unknown encoding {encoding!r}')
    dtype = np.object_ if t['dtype'] == 'string' else np.dtype(t['dtype'])
    out[name] = Feature(name, kind, dtype, dims, encoding)
  if not out:
    raise DatasetError(f'{path}: no features')
  return out


def _format_template(template: str, mapping: dict) -> str:
  for key, value in mapping.items():
    template = template.replace('{' + key + '}', value)
  return template


def split_files(data_dir, split: str) -> tuple:
  """(shard paths in reading order, examples per shard) of a split, from dataset_info.json."""
  data_dir = Path(data_dir)
  info = _read_json(data_dir / 'dataset_info.json')
  file_format = info.get('fileFormat', 'tfrecord')
  if file_format != 'tfrecord':
    raise DatasetError(f'{data_dir / "dataset_info.json"}: file format {file_format!r}, this '
                       'reader reads tfrecord only')
  splits = {s['name']: s for s in info.get('splits', [])}
  if split not in splits:
    raise DatasetError(f'{data_dir}: no split {split!r} (has {sorted(splits)})')
  s = splits[split]
  lengths = [int(n) for n in s.get('shardLengths', [])]
  template = s.get('filepathTemplate') or '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
  digits = max(5, len(str(len(lengths))))   # TFDS pads shard numbers to at least 5 digits.
  paths = []
  for i in range(len(lengths)):
    index, total = f'{i:0{digits}d}', f'{len(lengths):0{digits}d}'
    paths.append(data_dir / _format_template(template, {
        'DATASET': info['name'], 'SPLIT': split, 'FILEFORMAT': 'tfrecord', 'SHARD_INDEX': index,
        'NUM_SHARDS': total, 'SHARD_X_OF_Y': f'{index}-of-{total}'}))
  return paths, lengths


# --- A random-access source over one split -----------------------------------------------------

def columns_sidecar(path) -> Path:
  return Path(f'{path}.columns.npz')


def _pack_column(feature: Feature, values: list) -> dict:
  if feature.dtype == object:   # npz stores no object arrays: bytes joined, plus lengths.
    return {f'{feature.name}.bytes': np.frombuffer(b''.join(values), np.uint8),
            f'{feature.name}.lengths': np.array([len(v) for v in values], np.int64)}
  return {feature.name: np.array(values, feature.dtype)}


def _unpack_column(feature: Feature, arrays: dict) -> Optional[np.ndarray]:
  if feature.dtype == object:
    data, lengths = arrays.get(f'{feature.name}.bytes'), arrays.get(f'{feature.name}.lengths')
    if data is None or lengths is None:
      return None
    data, ends = data.tobytes(), np.cumsum(lengths)
    out = np.empty(len(lengths), object)
    out[:] = [data[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())]
    return out
  return arrays.get(feature.name)


def _close_fds(fds: dict, pid: int):
  if os.getpid() == pid:
    for fd in fds.values():
      os.close(fd)
  fds.clear()


class ShardSource:
  """Random access to one split of a TFDS dataset directory, without TensorFlow.

  `source[i]` is the i-th example as tfds.as_numpy gives it (same global order: the split's
  shards in order, records in file order; the builders disable shuffling). `column(name)` gives a
  small feature (scalar or text) for every record without decoding the big tensors, e.g. to
  build per-patient or tumor / non-tumor index lists for a sampler.

  Satisfies grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`) and pickles
  without its open files, so grain worker processes each open the shards lazily.
  """

  def __init__(self, data_dir, split: str, *, cache: bool = True):
    """`data_dir`: the dataset version directory (the builder's `data_dir`, holding
    dataset_info.json); `cache`: keep record indexes and columns in sidecars next to shards."""
    self.data_dir, self.split, self._cache = Path(data_dir), split, cache
    self.features = read_features(self.data_dir)
    self.paths, lengths = split_files(self.data_dir, split)
    parts = []
    for path, expected in zip(self.paths, lengths):
      if not path.exists():
        raise DatasetError(f'{path}: shard of split {split!r} missing')
      records = index_records(path, cache=cache)
      if len(records) != expected:
        raise DatasetError(f'{path}: {len(records)} records, dataset_info.json says {expected}')
      parts.append(records)
    self._records = (np.concatenate(parts) if parts else np.zeros((0, 2), np.int64))
    self._shard = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
    self._columns = {}
    self._init_files()

  def _init_files(self):
    self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
    # Closes this process's descriptors when the source is collected, safely at exit too.
    self._closer = weakref.finalize(self, _close_fds, self._fds, self._pid)

  def __getstate__(self):
    state = dict(self.__dict__)
    for key in ('_fds', '_pid', '_lock', '_closer'):
      del state[key]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_files()

  def close(self):
    """Closes this process's open shard files (they reopen on the next read)."""
    _close_fds(self._fds, self._pid)

  def _fd(self, shard: int) -> int:
    if self._pid != os.getpid():   # forked: the parent's descriptors are not ours to share.
      self._closer.detach()
      self._init_files()
    fd = self._fds.get(shard)
    if fd is None:
      with self._lock:
        fd = self._fds.get(shard)
        if fd is None:
          fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
    return fd

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self):
    return f'ShardSource({str(self.data_dir)!r}, {self.split!r}, {len(self)} examples)'

  def _payload(self, i: int):
    shard = int(self._shard[i])
    offset, length = (int(x) for x in self._records[i])
    return self.paths[shard], read_record(self._fd(shard), self.paths[shard], offset, length)

  def _check_index(self, i) -> int:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'{self!r}: index {i} out of range')
    return i % len(self)

  def _decode(self, path, i, payload, features) -> dict:
    where = int(self._records[i, 0])
    try:
      parsed = parse_example(payload, set(features))
    except (ValueError, IndexError) as e:   # IndexError: a field runs off the payload's end.
      raise RecordError(path, where, f'malformed tf.train.Example: {e}') from None
    out = {}
    for name, feature in features.items():
      if name not in parsed:
        raise RecordError(path, where, f'example lacks feature {name!r}')
      try:
        out[name] = feature.decode(*parsed[name])
      except (ValueError, zlib.error) as e:
        raise RecordError(path, where, f'feature {name!r}: {e}') from None
    return out

  def __getitem__(self, index) -> dict:
    i = self._check_index(index)
    path, payload = self._payload(i)
    return self._decode(path, i, payload, self.features)

  def column(self, name: str) -> np.ndarray:
    """A small feature (scalar or text) of every record, in order: dtype as `source[i][name]`
    (object array of bytes for a Text). Computed once per shard (cached in memory and, with
    `cache`, in a `<shard>.columns.npz` sidecar); parses only the small fields."""
    if name not in self.features:
      raise KeyError(f'{self!r}: no feature {name!r} (has {sorted(self.features)})')
    if not self.features[name].small:
      raise KeyError(f'{self!r}: {name!r} is a {self.features[name].shape} tensor, not a '
                     'scalar or text column; read it with source[i]')
    if name not in self._columns:
      small = {n: f for n, f in self.features.items() if f.small}
      per_shard = [self._shard_columns(s, small) for s in range(len(self.paths))]
      for n in small:
        parts = [p[n] for p in per_shard]
        self._columns[n] = (np.concatenate(parts) if parts else
                            np.zeros(0, small[n].dtype))
    return self._columns[name]

  def _shard_columns(self, shard: int, small: dict) -> dict:
    path = self.paths[shard]
    stamp = _stamp(path) if self._cache else None
    if self._cache:
      cached = _load_sidecar(columns_sidecar(path), stamp) or {}
      out = {n: _unpack_column(f, cached) for n, f in small.items()}
      if all(v is not None for v in out.values()):
        return out
    values = {n: [] for n in small}
    for i in np.flatnonzero(self._shard == shard):
      _, payload = self._payload(i)
      for n, v in self._decode(path, i, payload, small).items():
        values[n].append(v)
    arrays = {}
    for n, f in small.items():
      arrays.update(_pack_column(f, values[n]))
    if self._cache:
      _save_sidecar(columns_sidecar(path), stamp, arrays)
    return {n: _unpack_column(f, arrays) for n, f in small.items()}
