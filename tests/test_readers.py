"""Cohort readers: every layout of SPEC §9 found from tiny NIfTI files written here."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from configs import default, inhouse, msd
from data_prep.case import CaseError
from data_prep.readers import find_cases, find_normal_cases

SHAPE = (8, 9, 7)


def _write(path: Path, data=None, shape=SHAPE):
  path.parent.mkdir(parents=True, exist_ok=True)
  data = np.ones(shape, np.float32) if data is None else data
  nib.save(nib.Nifti1Image(data, np.eye(4)), path)
  return path


def _brats_case(root, cid, modalities=('t1', 't1ce', 't2', 'flair', 'seg'), suffix='.nii.gz'):
  for m in modalities:
    _write(root / f'{cid}_{m}{suffix}')


def _config(module=default, root=''):
  c = module.get_config()
  c.dataset.root = str(root)
  return c


def test_brats_groups_sorted_with_uncompressed_and_healthy(tmp_path):
  _brats_case(tmp_path / 'LGG' / 'P2', 'P2')
  _brats_case(tmp_path / 'HGG' / 'P3', 'P3', suffix='.nii')
  _brats_case(tmp_path / 'HGG' / 'P1', 'P1', modalities=('t1', 't1ce', 't2', 'flair', 'seg',
                                                            't1_healthy'))
  cases = find_cases(_config(root=tmp_path))
  assert [(c.case_id, c.group) for c in cases] == [('P1', 'HGG'), ('P2', 'LGG'), ('P3', 'HGG')]
  p1, p2, p3 = cases
  assert list(p1.images) == ['t1', 't1ce', 't2', 'flair']
  assert p1.images['t1ce'].path == tmp_path / 'HGG' / 'P1' / 'P1_t1ce.nii.gz'
  assert p1.images['t1ce'].channel is None
  assert p1.label.path == tmp_path / 'HGG' / 'P1' / 'P1_seg.nii.gz'
  assert p1.healthy_t1.path == tmp_path / 'HGG' / 'P1' / 'P1_t1_healthy.nii.gz'
  assert p2.healthy_t1 is None
  assert p3.images['flair'].path.name == 'P3_flair.nii'
  assert p3.label.path.name == 'P3_seg.nii'


def test_brats_flat_root_and_missing_modality_kept(tmp_path):
  _brats_case(tmp_path / 'B', 'B')
  _brats_case(tmp_path / 'A', 'A', modalities=('t1', 't2', 'flair', 'seg'))
  (tmp_path / 'notes').mkdir()   # a folder without case files is not a case.
  cases = find_cases(_config(root=tmp_path))
  assert [c.case_id for c in cases] == ['A', 'B']
  assert cases[0].group == ''
  assert not cases[0].images['t1ce'].path.exists()
  assert cases[0].images['t1ce'].path == tmp_path / 'A' / 'A_t1ce.nii.gz'


def test_brats_without_labels_is_unlabelled_but_one_label_labels_all(tmp_path):
  _brats_case(tmp_path / 'A', 'A', modalities=('t1', 't1ce', 't2', 'flair'))
  assert find_cases(_config(root=tmp_path))[0].label is None
  _brats_case(tmp_path / 'B', 'B')
  a, b = find_cases(_config(root=tmp_path))
  assert b.label.path.exists()
  assert a.label.path == tmp_path / 'A' / 'A_seg.nii.gz' and not a.label.path.exists()


def test_msd_channels_mapped_and_junk_ignored(tmp_path):
  for cid in ('BRATS_002', 'BRATS_001'):
    _write(tmp_path / 'imagesTr' / f'{cid}.nii.gz', shape=SHAPE + (4,))
    _write(tmp_path / 'labelsTr' / f'{cid}.nii.gz')
  (tmp_path / 'imagesTr' / '._BRATS_001.nii.gz').write_bytes(b'\x00\x05junk')
  (tmp_path / 'labelsTr' / '._BRATS_001.nii.gz').write_bytes(b'\x00\x05junk')
  (tmp_path / 'dataset.json').write_text('{}')
  cases = find_cases(_config(msd, tmp_path))
  assert [c.case_id for c in cases] == ['BRATS_001', 'BRATS_002']
  case = cases[0]
  assert list(case.images) == ['t1', 't1ce', 't2', 'flair']
  # MSD order FLAIR, T1w, T1gd, T2w.
  assert {m: r.channel for m, r in case.images.items()} == {'flair': 0, 't1': 1, 't1ce': 2, 't2': 3}
  assert all(r.path == tmp_path / 'imagesTr' / 'BRATS_001.nii.gz' for r in case.images.values())
  assert case.label.path == tmp_path / 'labelsTr' / 'BRATS_001.nii.gz'


def test_msd_without_labels_folder(tmp_path):
  _write(tmp_path / 'imagesTr' / 'BRATS_001.nii.gz', shape=SHAPE + (4,))
  assert find_cases(_config(msd, tmp_path))[0].label is None


def test_msd_modality_outside_channels_is_a_config_error(tmp_path):
  _write(tmp_path / 'imagesTr' / 'BRATS_001.nii.gz', shape=SHAPE + (4,))
  c = _config(msd, tmp_path)
  c.dataset.modalities = ('t1', 'dwi')
  with pytest.raises(ValueError, match='dwi'):
    find_cases(c)


def test_generic_inhouse_modalities(tmp_path):
  for cid in ('pat10', 'pat02'):
    for m in ('t1c', 'b0', 'md', 'fa', 'seg'):
      if (cid, m) != ('pat10', 'md'):
        _write(tmp_path / cid / f'{cid}_{m}.nii.gz')
  _write(tmp_path / 'pat02' / 'pat02_t1c_healthy.nii.gz')
  cases = find_cases(_config(inhouse, tmp_path))
  assert [c.case_id for c in cases] == ['pat02', 'pat10']
  assert list(cases[0].images) == ['t1c', 'b0', 'md', 'fa']
  assert cases[0].images['fa'].path == tmp_path / 'pat02' / 'pat02_fa.nii.gz'
  assert cases[0].label.path == tmp_path / 'pat02' / 'pat02_seg.nii.gz'
  assert cases[0].healthy_t1.path.name == 'pat02_t1c_healthy.nii.gz'
  assert cases[1].healthy_t1 is None
  assert not cases[1].images['md'].path.exists()


def test_generic_custom_pattern(tmp_path):
  _write(tmp_path / 'x1' / 'FA.nii')
  _write(tmp_path / 'x1' / 'MASK.nii')
  c = _config(inhouse, tmp_path)
  c.dataset.file_pattern = '{modality}.nii.gz'   # the reader also accepts the .nii twin.
  c.dataset.modalities = ('FA',)
  c.dataset.label_name = 'MASK'
  (case,) = find_cases(c)
  assert case.images['FA'].path == tmp_path / 'x1' / 'FA.nii'
  assert case.label.path == tmp_path / 'x1' / 'MASK.nii'


def test_ixi_t1_only(tmp_path):
  _write(tmp_path / 'IXI012-HH-1211-T1.nii.gz')
  _write(tmp_path / 'IXI002-Guys-0828-T1.nii.gz')
  _write(tmp_path / 'IXI002-Guys-0828-T2.nii.gz')
  _write(tmp_path / 'IXI002-Guys-0828-PD.nii.gz')
  (tmp_path / '._IXI013-HH-1212-T1.nii.gz').write_bytes(b'junk')
  cases = find_normal_cases(tmp_path, modality='t1c')
  assert [c.case_id for c in cases] == ['IXI002-Guys-0828', 'IXI012-HH-1211']
  assert cases[0].images == {'t1c': cases[0].images['t1c']}
  assert cases[0].images['t1c'].path.name == 'IXI002-Guys-0828-T1.nii.gz'
  assert cases[0].label is None and cases[0].group == 'normal'
  assert list(find_normal_cases(tmp_path, _config(inhouse))[0].images) == ['t1c']
  assert list(find_normal_cases(tmp_path)[0].images) == ['t1']


@pytest.mark.parametrize('layout', ['brats', 'msd', 'generic'])
def test_missing_or_empty_root(tmp_path, layout):
  c = _config(root=tmp_path / 'nowhere')
  c.dataset.layout = layout
  with pytest.raises(CaseError, match='does not exist') as e:
    find_cases(c)
  assert 'nowhere' in e.value.path
  c.dataset.root = str(tmp_path)
  (tmp_path / 'imagesTr').mkdir()
  with pytest.raises(CaseError, match='no cases found|no imagesTr'):
    find_cases(c)


def test_ixi_empty_root(tmp_path):
  _write(tmp_path / 'IXI002-Guys-0828-T2.nii.gz')
  with pytest.raises(CaseError, match='no IXI T1'):
    find_normal_cases(tmp_path)


def test_duplicate_ids_across_groups(tmp_path):
  _brats_case(tmp_path / 'HGG' / 'P1', 'P1')
  _brats_case(tmp_path / 'LGG' / 'P1', 'P1')
  with pytest.raises(CaseError, match='twice'):
    find_cases(_config(root=tmp_path))
