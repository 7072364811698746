"""Pseudo-normal fidelity of an already trained IntroVAE, by Dec(μ) or by restoration (issue 12).

Reads a finished workdir (prep/ and introvae/; nothing is written there), makes the pseudo-normal
T1 of every prepared tumor case with predict.reconstruct_volume under the IntroVAE's own saved
config plus the given introvae.* overrides, and scores it with clfc_jax.fidelity against the
case's healthy T1. Prints one JSON line per variant; --out keeps the rows and the volumes.

  python experiments/restore_fidelity.py --workdir=W --noise-floor=F --variants='{"reconstruct":
      {"inference": "reconstruct"}, "restore": {"inference": "restore", "restore_steps": 3}}'
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from clfc_jax import fidelity, predict
from clfc_jax import sharding as sharding_lib
from clfc_jax import workdir as workdir_lib
from data_prep import inputs, normalize, store


def load(workdir):
  """(config of the trained IntroVAE, its params, the mesh, Workdir, normal landmarks)."""
  wd = workdir_lib.Workdir(workdir)
  if not wd.has_normal_cohort():
    raise SystemExit(f'{workdir}: no normal cohort; this script reads introvae/ only')
  config = workdir_lib.read_config(wd.introvae / workdir_lib.CONFIG_NAME)
  mesh = sharding_lib.make_mesh(jax.local_devices())
  params = predict.load_introvae(config, wd.introvae, mesh)
  landmarks = normalize.normal_t1_reference(wd.prep, config, None)
  return config, params, mesh, wd, landmarks


def cases(config, wd, landmarks, limit=None):
  """[(id, unit T1, unit healthy T1, brain, label)] of the cases with a healthy T1."""
  out = []
  for case_id in store.prepared_ids(wd.prep_cases)[:limit]:
    pc = store.load_prepared(wd.prep_cases, case_id)
    if pc.healthy_t1 is None or pc.label is None:
      continue
    t1 = config.dataset.normal_modality
    out.append((case_id, inputs.unit_t1(pc.modality(t1), pc.brain, landmarks, config),
                inputs.unit_t1(pc.healthy_t1, pc.brain, landmarks, config), pc.brain, pc.label))
  return out


def run_variant(config, params, mesh, data, overrides):
  """Pseudo-normals of every case under config + overrides: (rows, volumes, seconds).

  seconds: wall time of all cases after one untimed warm-up slice batch (compilation apart).
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      config.introvae[key] = value
  _, unit, _, brain, _ = data[0]
  predict.reconstruct_volume(config, params, unit, brain, mesh)   # compile
  start = time.perf_counter()
  volumes = [predict.reconstruct_volume(config, params, unit, brain, mesh)
             for _, unit, _, brain, _ in data]
  seconds = time.perf_counter() - start
  rows = [dict(case=cid, **fidelity.case_fidelity(v, unit, healthy, brain, label))
          for (cid, unit, healthy, brain, label), v in zip(data, volumes)]
  return rows, volumes, seconds


def tumor_oracle_rows(data, volumes):
  """Rows for the input outside the true tumour and `volumes` inside it: the best a restoration
  that moves pixels towards those volumes can do (it would need to know the tumour). A bound,
  not a method."""
  rows = []
  for (cid, unit, healthy, brain, label), v in zip(data, volumes):
    pseudo = np.where(label > 0, v, unit)
    rows.append(dict(case=cid, **fidelity.case_fidelity(pseudo, unit, healthy, brain, label)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--variants', required=True,
                      help='JSON {name: {introvae key: value}}, run in this order')
  parser.add_argument('--noise-floor', type=float, required=True)
  parser.add_argument('--limit', type=int, default=None, help='first N cases only')
  parser.add_argument('--oracle', action='store_true',
                      help='also score each variant inside the true tumour only (a bound)')
  parser.add_argument('--out', default=None, help='folder for <variant>/rows.json, volumes.npz')
  args = parser.parse_args()
  config, params, mesh, wd, landmarks = load(args.workdir)
  data = cases(config, wd, landmarks, args.limit)
  for name, overrides in json.loads(args.variants).items():
    rows, volumes, seconds = run_variant(config, params, mesh, data, overrides)
    summary = fidelity.summarize(rows)
    line = fidelity.verdict(summary, noise_floor=args.noise_floor, healthy_factor=2.0,
                            tumor_reduction=0.3)
    record = {'variant': name, 'overrides': overrides, 'cases': len(data),
              'seconds': round(seconds, 1), 'summary': summary, 'verdict': line}
    print(json.dumps(record), flush=True)
    if args.oracle:
      oracle = fidelity.summarize(tumor_oracle_rows(data, volumes))
      print(json.dumps({'variant': f'{name}: tumour-mask oracle', 'overrides': overrides,
                        'cases': len(data), 'seconds': None, 'summary': oracle,
                        'verdict': fidelity.verdict(oracle, noise_floor=args.noise_floor,
                                                    healthy_factor=2.0, tumor_reduction=0.3)}),
            flush=True)
    if args.out:
      out = Path(args.out) / name
      out.mkdir(parents=True, exist_ok=True)
      store.write_text(out / 'rows.json', json.dumps({**record, 'rows': rows}, indent=1))
      store.save_npz(out / 'volumes.npz', **{cid: v.astype(np.float16)
                                             for (cid, *_), v in zip(data, volumes)})


if __name__ == '__main__':
  main()
