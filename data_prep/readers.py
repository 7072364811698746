"""Finds the patients of a cohort on disk (SPEC §9) and returns them as `Case` records.

Nothing is read here beyond directory listings. A case that lacks a file is still returned,
with an `ImageRef` to the path where the file was expected (which does not exist): the cohort
build then reports it through `validate.load_case` / `validate.validate_cohort` ("file missing")
instead of the case silently vanishing.

Labels: a cohort is labelled when at least one of its cases has a label file; then every case
gets a label reference (missing ones fail validation). A cohort without any label file (new
patients, BraTS validation data, MSD imagesTs) gets `label=None` everywhere.

Every function returns cases sorted by case id, so the order is deterministic.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from data_prep.case import Case, CaseError, ImageRef

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
BRATS_GROUPS = ('HGG', 'LGG')
_IXI_T1 = re.compile(r'^(IXI\d+-[A-Za-z]+-\d+)-T1\.nii(\.gz)?$')


def find_cases(config, root=None) -> list[Case]:
  """The tumor cohort under `root` (default config.dataset.root) in config.dataset.layout."""
  d = config.dataset
  root = _existing_dir(root or d.root, f'{d.layout} cohort root')
  readers = {'brats': _find_brats, 'msd': _find_msd, 'generic': _find_generic,
             'nnunet': _find_nnunet}
  if d.layout not in readers:
    raise ValueError(f'unknown dataset.layout {d.layout!r}; expected one of {tuple(readers)}')
  cases = readers[d.layout](root, d)
  if not cases:
    raise CaseError(root, f'no cases found for layout {d.layout!r} ({_LAYOUT_HELP[d.layout]})')
  return _sorted_unique(cases, root)


def find_normal_cases(root, modality='t1') -> list[Case]:
  """IXI-style normal subjects: every `IXI<nnn>-<site>-<nnnn>-T1.nii[.gz]` below `root`.

  `modality` is the key the T1 gets in Case.images; a config instead of a string means its
  dataset.normal_modality.
  """
  if not isinstance(modality, str):
    modality = modality.dataset.normal_modality
  root = _existing_dir(root, 'normal (IXI) root')
  cases = []
  for path in root.rglob('IXI*-T1.nii*'):
    match = _IXI_T1.match(path.name)
    if match and path.is_file():
      cases.append(Case(match.group(1), {modality: ImageRef(path)}, label=None, group='normal'))
  if not cases:
    raise CaseError(root, 'no IXI T1 files found (expected IXI<nnn>-<site>-<nnnn>-T1.nii.gz)')
  return _sorted_unique(cases, root)


# --- new patients (clfc_jax.segment): a patient folder, files, 4-D files, a cohort folder -------
# Unlike find_cases, these take whatever a user hands over: any case folder names, a folder per
# patient or group, MSD imagesTs/, and files named `<modality>` or `*_<modality>`.
_MSD_FOLDERS = ('imagesTs', 'imagesTr')


def _stem(path: Path) -> str:
  return strip_nifti(path.name)


def _niftis(folder: Path) -> list:
  return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.')
                and p.name.endswith(NIFTI_SUFFIXES))


def case_from_files(files: Mapping[str, Any], case_id: Optional[str] = None) -> Case:
  """A patient given as modality -> file; the id defaults to the first file's name without
  its `_<modality>` ending."""
  if not files:
    raise ValueError('no image files given')
  images = {m: ImageRef(Path(p).expanduser()) for m, p in files.items()}
  if not case_id:
    modality, ref = next(iter(images.items()))
    case_id = _stem(ref.path)
    for ending in (f'_{modality}', f'-{modality}', f'.{modality}'):
      if case_id.lower().endswith(ending.lower()) and len(case_id) > len(ending):
        case_id = case_id[:-len(ending)]
  return Case(case_id, images)


def case_from_4d_file(path, config, case_id: Optional[str] = None) -> Case:
  """An MSD-style 4-D file; its channels are named by config.dataset.msd_channels."""
  path = Path(path).expanduser()
  channels = list(config.dataset.msd_channels)
  missing = [m for m in config.dataset.modalities if m not in channels]
  if missing:
    raise CaseError(path, f'modalities {missing} are not among dataset.msd_channels '
                    f'{tuple(channels)} (the 4-D file\'s channel names)')
  return Case(case_id or _stem(path),
              {m: ImageRef(path, channel=channels.index(m)) for m in config.dataset.modalities})


def case_from_folder(folder, config) -> Case:
  """A patient folder. Per modality: the dataset's file_pattern, else the one NIfTI named
  `<modality>` or `*_<modality>`; a folder holding a single NIfTI is a 4-D (MSD) case. A
  modality without a file points at its expected path: loading then says "file missing"."""
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise CaseError(folder, 'patient folder does not exist')
  files = _niftis(folder)
  modalities = list(config.dataset.modalities)
  matches = {m: [] for m in modalities}
  for path in files:
    stem = _stem(path).lower()
    for m in modalities:
      if stem == m.lower() or stem.endswith(f'_{m.lower()}'):
        matches[m].append(path)
  if len(files) == 1 and not any(matches.values()):
    return case_from_4d_file(files[0], config, case_id=folder.name)
  images = {}
  for m in modalities:
    expected = folder / config.dataset.file_pattern.format(case=folder.name, modality=m)
    if expected.is_file():
      images[m] = ImageRef(expected)
    elif len(matches[m]) == 1:
      images[m] = ImageRef(matches[m][0])
    elif len(matches[m]) > 1:
      names = ', '.join(p.name for p in matches[m])
      raise CaseError(folder, f'several files could be the {m} image: {names}')
    else:
      images[m] = ImageRef(expected)
  return Case(folder.name, images)


def find_patients(input_dir, config):
  """(cases, problems {id: reason}) of a folder of new patients, sorted by id.

  Patients: 4-D NIfTI files directly in the folder or in imagesTs/ / imagesTr/ (MSD), case
  folders, and case folders inside group folders (BraTS HGG/LGG). A patient that cannot even
  be described is a problem, never the end of the cohort.
  """
  root = Path(input_dir).expanduser()
  if not root.is_dir():
    raise CaseError(root, 'cohort folder does not exist or is not a folder')
  found, problems = [], {}

  def add(make, name):
    try:
      found.append(make())
    except CaseError as e:
      problems[name] = str(e)

  stems = [_stem(p).lower() for p in _niftis(root)]
  if all(any(s == m.lower() or s.endswith(f'_{m.lower()}') for s in stems)
         for m in config.dataset.modalities):
    raise CaseError(root, "holds one patient's modality files: give it as one patient "
                    '(--case-dir)')
  file_dirs = [root] + [root / d for d in _MSD_FOLDERS if (root / d).is_dir()]
  for d in file_dirs:
    for path in _niftis(d):
      add(lambda p=path: case_from_4d_file(p, config), _stem(path))
  subdirs = lambda f: sorted(p for p in f.iterdir() if p.is_dir() and not p.name.startswith(
      ('.', '__MACOSX')) and not (f == root and p.name in _MSD_FOLDERS + ('labelsTr',)))
  for sub in subdirs(root):
    folders = [sub] if _niftis(sub) else [g for g in subdirs(sub) if _niftis(g)]
    for folder in folders:
      add(lambda f=folder: case_from_folder(f, config), folder.name)
  ids = [c.case_id for c in found]
  dupes = sorted({i for i in ids if ids.count(i) > 1})
  if dupes:
    raise CaseError(root, f'patient ids occur twice: {dupes}')
  if not found and not problems:
    raise CaseError(root, 'no patients found (expected case folders with one NIfTI per '
                    'modality, or 4-D NIfTI files)')
  return sorted(found, key=lambda c: c.case_id), problems


_LAYOUT_HELP = {
    'brats': 'expected [HGG|LGG/]<ID>/<ID>_<modality>.nii.gz',
    'msd': 'expected imagesTr/<ID>.nii.gz and labelsTr/<ID>.nii.gz',
    'generic': 'expected <ID>/<file_pattern> per patient folder',
}


def _find_brats(root: Path, d) -> list[Case]:
  """Case folders directly under root, or one level down in group folders (HGG/LGG)."""
  found = []   # (folder, group)
  for entry in _subdirs(root):
    if _is_brats_case_folder(entry):
      found.append((entry, ''))
    else:
      found.extend((sub, entry.name) for sub in _subdirs(entry) if _is_brats_case_folder(sub))
  label_paths = [_nifti(folder / f'{folder.name}_{d.label_name}') for folder, _ in found]
  labelled = any(p.exists() for p in label_paths)
  cases = []
  for (folder, group), label_path in zip(found, label_paths):
    cid = folder.name
    images = {m: ImageRef(_nifti(folder / f'{cid}_{m}')) for m in d.modalities}
    healthy = _first_existing(folder / f'{cid}_{m}_healthy'
                              for m in dict.fromkeys((d.normal_modality, 't1')))
    cases.append(Case(cid, images, label=ImageRef(label_path) if labelled else None,
                      group=group, healthy_t1=ImageRef(healthy) if healthy else None))
  return cases


def _is_brats_case_folder(folder: Path) -> bool:
  prefix = folder.name + '_'
  return any(p.name.startswith(prefix) and _is_nifti(p) for p in folder.iterdir())


def _find_msd(root: Path, d) -> list[Case]:
  """imagesTr/<ID>.nii.gz 4-D files; config.dataset.msd_channels names their channels."""
  missing = [m for m in d.modalities if m not in d.msd_channels]
  if missing:
    raise ValueError(f'dataset.modalities {missing} are not among dataset.msd_channels '
                     f'{tuple(d.msd_channels)}')
  images_dir = root / 'imagesTr'
  if not images_dir.is_dir():
    raise CaseError(root, f'no imagesTr folder ({_LAYOUT_HELP["msd"]})')
  files = [p for p in images_dir.iterdir() if _is_nifti(p) and p.is_file()]
  label_paths = [root / 'labelsTr' / p.name for p in files]
  labelled = any(p.exists() for p in label_paths)
  cases = []
  for path, label_path in zip(files, label_paths):
    images = {m: ImageRef(path, channel=list(d.msd_channels).index(m)) for m in d.modalities}
    cases.append(Case(strip_nifti(path.name), images,
                      label=ImageRef(label_path) if labelled else None))
  return cases


def _find_generic(root: Path, d) -> list[Case]:
  """One folder per patient (holding at least one of its files); names from file_pattern."""

  def path(folder, modality):
    return _nifti_variant(folder / d.file_pattern.format(case=folder.name, modality=modality))

  folders = [f for f in _subdirs(root)
             if any(path(f, m).exists() for m in (*d.modalities, d.label_name))]

  label_paths = [path(f, d.label_name) for f in folders]
  labelled = any(p.exists() for p in label_paths)
  cases = []
  for folder, label_path in zip(folders, label_paths):
    images = {m: ImageRef(path(folder, m)) for m in d.modalities}
    healthy = path(folder, f'{d.normal_modality}_healthy')
    cases.append(Case(folder.name, images, label=ImageRef(label_path) if labelled else None,
                      healthy_t1=ImageRef(healthy) if healthy.exists() else None))
  return cases


def _existing_dir(root, what: str) -> Path:
  if not root:
    raise ValueError(f'no {what} given (set config.dataset.root / normal_root)')
  root = Path(root).expanduser()
  if not root.is_dir():
    raise CaseError(root, f'{what} does not exist or is not a folder')
  return root


def _subdirs(folder: Path):
  """Sub-folders, skipping hidden ones and macOS resource-fork junk."""
  return sorted(p for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith(('.', '__MACOSX')))


def _is_nifti(path: Path) -> bool:
  return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith('._')


def strip_nifti(name: str) -> str:
  """A NIfTI file name without its .nii / .nii.gz suffix (the patient or image id)."""
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _nifti(stem: Path) -> Path:
  """stem.nii.gz, or stem.nii when only that exists (BraTS ships both)."""
  return _first_existing([stem]) or stem.with_name(stem.name + '.nii.gz')


def _first_existing(stems) -> Optional[Path]:
  for stem in stems:
    for suffix in NIFTI_SUFFIXES:
      candidate = stem.with_name(stem.name + suffix)
      if candidate.is_file():
        return candidate
  return None


def _nifti_variant(path: Path) -> Path:
  """The given path, or its .nii / .nii.gz twin when only that exists."""
  if path.exists():
    return path
  stem = strip_nifti(path.name)
  if stem != path.name:
    return _first_existing([path.with_name(stem)]) or path
  return path


def _sorted_unique(cases: Sequence[Case], root: Path) -> list[Case]:
  cases = sorted(cases, key=lambda c: (c.case_id, c.group))
  seen = {}
  for case in cases:
    if case.case_id in seen:
      raise CaseError(root, f'case id {case.case_id!r} occurs twice '
                      f'(groups {seen[case.case_id]!r} and {case.group!r})')
    seen[case.case_id] = case.group
  return cases


# --- nnU-Net v2 raw layout ---------------------------------------------------------------------
# Channel names reduced by modality_key, per config modality; BraTS 2023 writes t1n/t1c/t2w/t2f,
# MSD FLAIR/T1w/t1gd/T2w, nnU-Net's BraTS 2021 conversion T1/T1ce/T2/Flair.
_MODALITY_ALIASES = {
    't1': ('t1', 't1w', 't1n', 't1native', 't1pre'),
    't1ce': ('t1ce', 't1c', 't1gd', 't1wce', 't1post', 't1contrast', 't1gad'),
    't2': ('t2', 't2w'),
    'flair': ('flair', 't2flair', 't2f', 't2wflair'),
}
_LAYOUT_HELP['nnunet'] = ('expected dataset.json, imagesTr/<ID>_<XXXX><file_ending> and '
                          'labelsTr/<ID><file_ending>')


def modality_key(name) -> str:
  """A modality or channel name reduced for matching: lower case, letters and digits only, with
  common aliases folded (T1Gd, T1c, T1-CE -> 't1ce'; T2-FLAIR, t2f -> 'flair'; T1w -> 't1')."""
  key = re.sub(r'[^a-z0-9]', '', str(name).lower())
  for canonical, aliases in _MODALITY_ALIASES.items():
    if key in aliases:
      return canonical
  return key


def read_nnunet_dataset_json(root) -> dict:
  """dataset.json of an nnU-Net raw dataset folder, checked.

  Returns {'channel_names': {int index: name}, 'labels': {name: int or tuple of ints},
  'file_ending': str, 'path': Path}. nnU-Net v1's 'modality' stands in for 'channel_names'
  and a missing 'file_ending' means '.nii.gz' (v1's only format); only NIfTI endings are read.
  """
  path = Path(root) / 'dataset.json'
  if not path.is_file():
    raise CaseError(path, f'no dataset.json ({_LAYOUT_HELP["nnunet"]})')
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CaseError(path, f'unreadable dataset.json ({e})') from None
  if not isinstance(record, dict):
    raise CaseError(path, 'dataset.json does not hold a JSON object')
  names = record.get('channel_names', record.get('modality'))
  if not isinstance(names, dict) or not names:
    raise CaseError(path, "dataset.json has no 'channel_names' (index -> name)")
  try:
    channels = {int(i): str(n) for i, n in names.items()}
  except ValueError:
    raise CaseError(path, f"dataset.json 'channel_names' keys must be channel indices, got "
                    f'{sorted(names)}') from None
  labels = record.get('labels')
  if not isinstance(labels, dict) or not labels:
    raise CaseError(path, "dataset.json has no 'labels' (name -> value)")
  try:
    labels = {str(k): int(v) if not isinstance(v, (list, tuple)) else tuple(int(x) for x in v)
              for k, v in labels.items()}
  except (TypeError, ValueError):
    raise CaseError(path, "dataset.json 'labels' values must be integers or lists of "
                    'integers (name -> value, nnU-Net v2)') from None
  ending = str(record.get('file_ending', '.nii.gz'))
  if ending not in NIFTI_SUFFIXES:
    raise CaseError(path, f'file_ending {ending!r} is not NIfTI {NIFTI_SUFFIXES}: convert '
                    'the images first')
  return {'channel_names': channels, 'labels': labels, 'file_ending': ending, 'path': path}


def nnunet_label_values(dataset_json) -> tuple:
  """Every label value dataset.json's 'labels' names (region lists flattened), sorted."""
  values = set()
  for v in dataset_json['labels'].values():
    values.update(v if isinstance(v, tuple) else (v,))
  return tuple(sorted(values))


def nnunet_channels(dataset_json, modalities) -> dict:
  """{modality: channel index} for the config's modalities, matched by modality_key."""
  path = dataset_json['path']
  by_key = {}
  for index, name in sorted(dataset_json['channel_names'].items()):
    key = modality_key(name)
    if key in by_key:
      raise CaseError(path, f'channels {by_key[key][1]!r} and {name!r} both read as '
                      f'modality {key!r}')
    by_key[key] = (index, name)
  found, missing = {}, []
  for m in modalities:
    if modality_key(m) in by_key:
      found[m] = by_key[modality_key(m)][0]
    else:
      missing.append(m)
  if missing:
    names = {i: n for i, n in sorted(dataset_json['channel_names'].items())}
    raise CaseError(path, f'dataset.modalities {missing} are not among channel_names {names} '
                    '(set dataset.modalities to names matching them)')
  return found


def _find_nnunet(root: Path, d) -> list[Case]:
  """imagesTr/<ID>_<XXXX><ending> per channel and labelsTr/<ID><ending>; dataset.json names
  the channels, matched to dataset.modalities case-insensitively with common aliases."""
  meta = read_nnunet_dataset_json(root)
  channels = nnunet_channels(meta, d.modalities)
  ending = meta['file_ending']
  images_dir = root / 'imagesTr'
  if not images_dir.is_dir():
    raise CaseError(root, f'no imagesTr folder ({_LAYOUT_HELP["nnunet"]})')
  pattern = re.compile(r'^(.+)_\d{4}' + re.escape(ending) + '$')
  ids = sorted({m.group(1) for p in images_dir.iterdir()
                if p.is_file() and not p.name.startswith('._') and (m := pattern.match(p.name))})
  label_paths = [root / 'labelsTr' / f'{cid}{ending}' for cid in ids]
  labelled = any(p.exists() for p in label_paths)
  cases = []
  for cid, label_path in zip(ids, label_paths):
    images = {m: ImageRef(images_dir / f'{cid}_{channels[m]:04d}{ending}') for m in d.modalities}
    cases.append(Case(cid, images, label=ImageRef(label_path) if labelled else None))
  return cases
