"""nnU-Net interop: the v2 raw layout as an input layout, and our folds as splits_final.json."""
import json

import nibabel as nib
import numpy as np
import pytest

from configs import default
from data_prep import folds, readers, validate
from data_prep.case import CaseError

SHAPE = (6, 7, 5)
# nnU-Net's own BraTS 2021 conversion: channels T1, T1ce, T2, Flair; labels 1 edema,
# 2 non-enhancing, 3 enhancing (our 'msd' convention), region-based.
BRATS_JSON = {
    'channel_names': {'0': 'T1', '1': 'T1ce', '2': 'T2', '3': 'Flair'},
    'labels': {'background': 0, 'whole tumor': [1, 2, 3], 'tumor core': [2, 3],
               'enhancing tumor': [3]},
    'regions_class_order': [1, 2, 3], 'numTraining': 2, 'file_ending': '.nii.gz'}


def _write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)


def _dataset(root, dataset_json=BRATS_JSON, ids=('BraTS2021_00002', 'BraTS2021_00000'),
             channels=4, labels=True, ending='.nii.gz'):
  root.mkdir(parents=True, exist_ok=True)
  (root / 'dataset.json').write_text(json.dumps(dataset_json))
  rng = np.random.default_rng(0)
  for cid in ids:
    for c in range(channels):
      _write(root / 'imagesTr' / f'{cid}_{c:04d}{ending}',
             (rng.random(SHAPE) + 0.5 + c).astype(np.float32))
    if labels:
      _write(root / 'labelsTr' / f'{cid}{ending}', rng.integers(0, 4, SHAPE).astype(np.uint8))
  return root


def _config(root, modalities=('t1', 't1ce', 't2', 'flair')):
  c = default.get_config()
  c.dataset.layout = 'nnunet'
  c.dataset.root = str(root)
  c.dataset.modalities = modalities
  c.dataset.allowed_labels = (0, 1, 2, 3)
  c.task.label_convention = 'msd'
  return c


def test_nnunet_layout_maps_channels_and_loads(tmp_path):
  root = _dataset(tmp_path / 'Dataset137_BraTS2021')
  (root / 'imagesTr' / '._BraTS2021_00000_0000.nii.gz').write_bytes(b'junk')
  c = _config(root, modalities=('flair', 't1ce', 't1', 't2'))
  cases = readers.find_cases(c)
  assert [x.case_id for x in cases] == ['BraTS2021_00000', 'BraTS2021_00002']
  case = cases[0]
  assert list(case.images) == ['flair', 't1ce', 't1', 't2']
  assert {m: r.path.name for m, r in case.images.items()} == {
      'flair': 'BraTS2021_00000_0003.nii.gz', 't1ce': 'BraTS2021_00000_0001.nii.gz',
      't1': 'BraTS2021_00000_0000.nii.gz', 't2': 'BraTS2021_00000_0002.nii.gz'}
  assert all(r.channel is None for r in case.images.values())
  assert case.label.path == root / 'labelsTr' / 'BraTS2021_00000.nii.gz'
  assert case.group == '' and case.healthy_t1 is None
  # The same Case records as every layout: validation reads them as it reads the others.
  loaded = validate.load_case(case, c)
  assert loaded.images['t1ce'].shape == SHAPE and loaded.label.max() <= 3
  assert np.all(loaded.images['flair'] >= 3.5)   # channel 3 holds values 3.5 .. 4.5.


def test_aliases_uncompressed_ending_and_unlabelled(tmp_path):
  names = {'0': 'FLAIR', '1': 'T1w', '2': 't1gd', '3': 'T2w'}   # MSD Task01 after conversion.
  dataset_json = {'channel_names': names, 'labels': {'background': 0, 'edema': 1},
                  'file_ending': '.nii'}
  root = _dataset(tmp_path / 'd', dataset_json, ids=('BRATS_001',), labels=False,
                  ending='.nii')
  (case,) = readers.find_cases(_config(root))
  assert {m: r.path.name for m, r in case.images.items()} == {
      't1': 'BRATS_001_0001.nii', 't1ce': 'BRATS_001_0002.nii', 't2': 'BRATS_001_0003.nii',
      'flair': 'BRATS_001_0000.nii'}
  assert case.label is None
  # BraTS 2023 channel names and an in-house 't1c' modality name.
  for name, key in [('t1n', 't1'), ('t1c', 't1ce'), ('T2-FLAIR', 'flair'), ('t2f', 'flair'),
                    ('T1Gd', 't1ce'), ('T1-CE', 't1ce'), ('DWI', 'dwi')]:
    assert readers.modality_key(name) == key


def test_missing_modality_and_bad_dataset_json(tmp_path):
  root = _dataset(tmp_path / 'd', ids=('A',))
  with pytest.raises(CaseError, match=r"\['dwi'\] are not among channel_names") as e:
    readers.find_cases(_config(root, modalities=('t1', 'dwi')))
  assert e.value.path.endswith('dataset.json')
  bad = dict(BRATS_JSON, channel_names={'0': 'T1', '1': 'T1w'})
  (root / 'dataset.json').write_text(json.dumps(bad))
  with pytest.raises(CaseError, match="both read as modality 't1'"):
    readers.find_cases(_config(root, modalities=('t1',)))
  (root / 'dataset.json').write_text(json.dumps(dict(BRATS_JSON, file_ending='.png')))
  with pytest.raises(CaseError, match='not NIfTI'):
    readers.find_cases(_config(root))
  (root / 'dataset.json').write_text(json.dumps({'labels': {'background': 0}}))
  with pytest.raises(CaseError, match='channel_names'):
    readers.find_cases(_config(root))
  (root / 'dataset.json').unlink()
  with pytest.raises(CaseError, match='no dataset.json') as e:
    readers.find_cases(_config(root))
  assert e.value.path.endswith('dataset.json')


def test_missing_channel_file_is_kept_for_validation(tmp_path):
  root = _dataset(tmp_path / 'd', ids=('A', 'B'))
  (root / 'imagesTr' / 'B_0002.nii.gz').unlink()
  c = _config(root)
  cases = readers.find_cases(c)
  assert not cases[1].images['t2'].path.exists()
  with pytest.raises(CaseError, match='B_0002'):
    validate.load_case(cases[1], c)


def test_label_values_of_dataset_json(tmp_path):
  meta = readers.read_nnunet_dataset_json(_dataset(tmp_path / 'd', ids=('A',)))
  assert readers.nnunet_label_values(meta) == (0, 1, 2, 3)
  assert meta['labels']['tumor core'] == (2, 3)
  assert meta['channel_names'] == {0: 'T1', 1: 'T1ce', 2: 'T2', 3: 'Flair'}


# --- splits_final.json -------------------------------------------------------------------------
def test_splits_final_round_trip(tmp_path):
  ids = [f'P{i:02d}' for i in range(11)]
  fl = folds.make_folds(ids, None, 3, seed=0)
  splits = folds.nnunet_splits(fl)
  assert len(splits) == 3
  for k, s in enumerate(splits):
    assert s['val'] == fl[k]                       # nnU-Net's val = our test fold.
    assert sorted(s['train'] + s['val']) == sorted(ids)
    assert not set(s['train']) & set(s['val'])
    # Our train + val of that fold is nnU-Net's train.
    ours = folds.split_for_fold(fl, k, 0.2, seed=0)
    assert sorted(ours['train'] + ours['val']) == s['train']
  path = folds.save_nnunet_splits(tmp_path / 'splits_final.json', fl)
  on_disk = json.loads(path.read_text())
  assert isinstance(on_disk, list) and set(on_disk[0]) == {'train', 'val'}
  assert folds.load_nnunet_splits(path) == fl


def test_splits_final_refuses_non_kfold(tmp_path):
  path = tmp_path / 'splits_final.json'
  path.write_text(json.dumps([{'train': ['a', 'b'], 'val': ['c']},
                              {'train': ['a', 'c'], 'val': ['b']}]))   # 'a' in no val list.
  with pytest.raises(CaseError, match="fold 0: 'train'"):
    folds.load_nnunet_splits(path)
  path.write_text(json.dumps([{'train': ['b'], 'val': ['a']}, {'train': ['a'], 'val': ['a']}]))
  with pytest.raises(CaseError, match='more than one fold'):
    folds.load_nnunet_splits(path)
  path.write_text('{"train": []}')
  with pytest.raises(CaseError, match='not an nnU-Net splits file'):
    folds.load_nnunet_splits(path)
  with pytest.raises(ValueError, match='more than one fold'):
    folds.nnunet_splits([['a', 'b'], ['b']])
