"""The pseudo_normal stage: the frozen IntroVAE reconstructs every tumor case's T1 as a
normal-looking T1, once (SPEC §1, §6), and we measure how faithful that is.

`make_pseudo_normals` writes, for one IntroVAE (the normal cohort's, or fold k's own without one:
Workdir.introvae_key), wd.pseudo_normal_dir(key)/<id>.npz ('t1' float16 [Z,H,W] in [-1, 1],
-1 outside the brain) and fidelity.json / fidelity.md there; `build_tumor_shards` writes their
2.5D stacks as the tumor shards' companion (one per IntroVAE). Volumes already on disk are not
recomputed, so a rerun resumes.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from clfc_jax import fidelity
from clfc_jax import predict
from clfc_jax import sharding as sharding_lib
from data_prep import optional
from data_prep import inputs, normalize, shards, store
from data_prep.case import CaseError

FIDELITY_NAME = 'fidelity'


def _pseudo_normal_ok(path: Path) -> bool:
  try:
    with np.load(path) as z:
      return inputs.PSEUDO_NORMAL_KEY in z.files
  except (OSError, ValueError):
    return False


def make_pseudo_normals(config, wd, key: Optional[int] = None, *,
                        build_shards: bool = True) -> dict:
  """Pseudo-normal T1 of every prepared tumor case by IntroVAE `key`, a fidelity report, and
  their stacks beside the tumor shards.

  Each case's T1 (dataset.normal_modality) is matched to the IntroVAE's normal reference and
  scaled to [-1, 1] exactly like the training slices; every axial slice is reconstructed from
  μ. Files already on disk are kept (resumable); writes are atomic. With build_shards, the
  stacks are written as the tumor shards' companion for IntroVAE `key` (rebuilt when a volume
  was (re)written).
  Returns {cases, written, skipped, seconds_reconstruct, seconds_per_case, fidelity (means),
  shards ({split: examples}), seconds}.
  """
  start_time = time.time()
  out_dir = wd.pseudo_normal_dir(key)
  out_dir.mkdir(parents=True, exist_ok=True)
  ids = store.prepared_ids(wd.prep_cases)
  if not ids:
    raise FileNotFoundError(f'{wd.prep_cases}: no prepared tumor cases (run the prep stage)')
  # Every process reconstructs its own share of the cases on its local devices.
  mesh = sharding_lib.make_mesh(jax.local_devices())
  landmarks = normalize.normal_t1_reference(wd.prep, config, key)
  params = predict.load_introvae(config, wd.introvae_dir(key), mesh)
  modality = config.dataset.normal_modality
  mine = ids[jax.process_index()::jax.process_count()]
  written, skipped, recon_seconds = [], [], 0.0
  for case_id in tqdm(mine, desc='pseudo-normal', disable=jax.process_index() != 0):
    path = wd.pseudo_normal_file(case_id, key)
    if path.exists() and _pseudo_normal_ok(path):
      skipped.append(case_id)
      continue
    where = Path(wd.prep_cases) / f'{case_id}.npz'
    pc = store.load_prepared(wd.prep_cases, case_id)
    if modality not in pc.modalities:
      raise CaseError(where, f'lacks the normal-appearance modality {modality!r} '
                      f'(has {pc.modalities})')
    try:
      unit = inputs.unit_t1(pc.modality(modality), pc.brain, landmarks, config)
    except ValueError as e:
      raise CaseError(where, f'{modality}: {e}') from None
    t0 = time.perf_counter()
    pseudo = predict.reconstruct_volume(config, params, unit, pc.brain, mesh)
    recon_seconds += time.perf_counter() - t0
    if not np.all(np.isfinite(pseudo)):
      raise CaseError(where, 'the IntroVAE reconstruction is not finite (diverged model?)')
    store.save_npz(path, **{inputs.PSEUDO_NORMAL_KEY: pseudo.astype(np.float16)})
    written.append(case_id)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('pseudo_normal: volumes written')
  summary = {'cases': len(ids), 'written': len(written), 'skipped': len(skipped),
             'seconds_reconstruct': round(recon_seconds, 2),
             'seconds_per_case': round(recon_seconds / max(len(written), 1), 3)}
  if jax.process_index() == 0:
    fidelity = fidelity_report(config, wd, landmarks, key)
    summary['fidelity'] = fidelity['mean']
    if build_shards:
      summary['shards'] = build_tumor_shards(config, wd, key, stale=bool(written))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('pseudo_normal: report and shards written')
  summary['seconds'] = round(time.time() - start_time, 2)
  return summary


# --- fidelity -------------------------------------------------------------------------------------

def fidelity_report(config, wd, landmarks, key: Optional[int] = None) -> dict:
  """fidelity.{json,md} of IntroVAE `key`'s pseudo-normals (wd.pseudo_normal_dir(key)) over the
  cases with a known healthy T1 (synthetic cohorts): MAE and SSIM in healthy tissue and inside
  the tumour, of the pseudo-normal and of the input T1, each against the healthy T1
  (clfc_jax.fidelity), per case and mean, and a verdict line against config.fidelity's targets.

  Each healthy T1 is matched and scaled exactly like the tumor T1. Returns the JSON record:
  {cases: [per case], n, cases_with_tumor, tumor_closer, tumor_reduction, mean, verdict}.
  """
  out_dir = wd.pseudo_normal_dir(key)
  modality = config.dataset.normal_modality
  f = config.fidelity
  rows = []
  for case_id in store.prepared_ids(wd.prep_cases):
    with np.load(Path(wd.prep_cases) / f'{case_id}.npz') as z:
      if 'healthy_t1' not in z.files or 'label' not in z.files:
        continue
    path = wd.pseudo_normal_file(case_id, key)
    if not path.exists():
      continue
    pc = store.load_prepared(wd.prep_cases, case_id)
    pseudo = inputs.load_pseudo_normal(path, pc.brain.shape)
    tumor_unit = inputs.unit_t1(pc.modality(modality), pc.brain, landmarks, config)
    healthy_unit = inputs.unit_t1(pc.healthy_t1, pc.brain, landmarks, config)
    rows.append(dict(case=case_id, **fidelity.case_fidelity(
        pseudo, tumor_unit, healthy_unit, pc.brain, pc.label, ssim_sigma=tuple(f.ssim_sigma))))
  record = dict(fidelity.summarize(rows), cases=rows)
  record['verdict'] = (fidelity.verdict(record, noise_floor=f.noise_floor,
                                        healthy_factor=f.healthy_factor,
                                        tumor_reduction=f.tumor_reduction)
                       if rows else 'no case with a known healthy T1')
  record['note'] = ('[-1, 1] units, against the healthy T1 (matched and scaled like the IntroVAE '
                    'input); *_input: the tumor T1 itself, the reference point.')
  store.write_text(out_dir / f'{FIDELITY_NAME}.json', json.dumps(record, indent=1))
  store.write_text(out_dir / f'{FIDELITY_NAME}.md', _fidelity_markdown(record))
  return record


def _fidelity_markdown(record) -> str:
  fmt = lambda v: '–' if v is None else f'{v:.4f}'
  fields = fidelity.FIELDS
  lines = ['# Pseudo-normal fidelity', '',
           'MAE and SSIM against the healthy T1 (synthetic cases; [-1, 1] units), in healthy '
           'tissue and inside the tumour, of the pseudo-normal and of the input (the tumour T1 '
           'the IntroVAE was given): inside the tumour the pseudo-normal should be the closer.',
           '', f'**{record["verdict"]}**', '',
           '| case | ' + ' | '.join(fields) + ' |', '|---|' + '---:|' * len(fields)]
  for r in record['cases']:
    lines.append(f'| {r["case"]} | ' + ' | '.join(fmt(r[k]) for k in fields) + ' |')
  lines.append('| **mean** | ' + ' | '.join(fmt(record['mean'][k]) for k in fields) + ' |')
  return '\n'.join(lines) + '\n'


# --- shards ---------------------------------------------------------------------------------------

def build_tumor_shards(config, wd, key: Optional[int], *, stale: bool = False) -> dict:
  """IntroVAE `key`'s pseudo-normal stacks as the tumor shards' companion; {split: examples}.
  `stale`: volumes were (re)written since, so an existing build (ours, derived) is replaced."""
  tfds_builders = optional.tfds_builders()
  existing = shards.pseudo_normal_dir(config, wd.tfds, key)
  if stale and existing.exists():
    shutil.rmtree(existing)
  tfds_builders.build(tfds_builders.tumor_slices_builder(config, wd.tfds, prep_dir=wd.prep))
  builder = tfds_builders.pseudo_normal_builder(config, wd.tfds, key, prep_dir=wd.prep,
                                                pseudo_normal_dir=wd.pseudo_normal_dir(key))
  built = tfds_builders.build(builder)
  out = {name: split.num_examples for name, split in built.info.splits.items()}
  logging.info('pseudo-normal stacks of %s: %s', shards.key_name(key), out)
  return out
