"""WORKDIR's layout (ARCHITECTURE.md's workdir contract), which folds a run covers and which
IntroVAE each fold uses.

A leaf: every stage, the report and clfc_jax.segment find their files through `Workdir`, so the
layout is written down once. prep/'s own layout comes from data_prep.store and normalize.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import ml_collections

from data_prep import normalize, shards, store

CONFIG_NAME = 'config.json'   # the resolved config, at the root and in every run folder


class Workdir:
  """Named paths inside WORKDIR."""

  def __init__(self, root):
    self.root = Path(root)
    self.config = self.root / CONFIG_NAME
    self.configs_history = self.root / 'configs_history'
    self.jax_cache = self.root / 'cache' / 'jax'
    self.synthetic = self.root / 'data' / 'synthetic'
    self.prep = self.root / 'prep'
    self.prep_cases = self.prep / store.CASES_DIR
    self.prep_normal = self.prep / store.NORMAL_DIR
    self.folds = self.prep / store.FOLDS_FILE
    self.tfds = self.root / 'tfds'
    self.introvae = self.root / 'introvae'
    self.pseudo_normal = self.root / 'pseudo_normal'
    self.runs = self.root / 'runs'
    self.eval = self.root / 'eval'
    self.report = self.root / 'report'

  def hist_refs(self, fold: int) -> Path:
    """Fold `fold`'s histogram references (fitted on its training patients only)."""
    return normalize.reference_path(self.prep, fold)

  @property
  def hist_refs_normal(self) -> Path:
    return normalize.normal_reference_path(self.prep)

  def marker(self, stage: str) -> Path:
    """WORKDIR/<stage>/DONE.json: written last, so the stage counts as done."""
    return self.root / stage / 'DONE.json'

  def run_dir(self, method: str, fold: int) -> Path:
    """runs/<method>/fold<k>: checkpoints, TensorBoard events, metrics.jsonl, summary.json."""
    return self.runs / method / f'fold{int(fold)}'

  def eval_dir(self, method: str, fold: int) -> Path:
    """eval/<method>/fold<k>: per_patient.csv, predictions/, summary.json."""
    return self.eval / method / f'fold{int(fold)}'

  # --- the normal-appearance half: one IntroVAE per normal cohort, or one per fold -------------
  def has_normal_cohort(self) -> bool:
    """Whether the job has a normal cohort (IXI: prepared subjects in prep/normal, or their T1
    reference): then one IntroVAE serves every fold; without one each fold trains its own on its
    training patients' tumor-free slices."""
    return shards.has_normal_cohort(self.prep)

  def introvae_key(self, fold: int) -> Optional[int]:
    """Which IntroVAE test fold `fold` uses: None (the normal cohort's) or the fold itself."""
    return shards.introvae_key(self.prep, fold)

  def introvae_keys(self, config) -> list:
    """The IntroVAEs the folds to run need: [None] with a normal cohort, else one per fold."""
    return sorted({self.introvae_key(k) for k in folds_to_run(config)},
                  key=lambda k: -1 if k is None else k)

  def introvae_dir(self, key: Optional[int] = None) -> Path:
    """introvae/ (normal cohort) or introvae/fold<k>/ (fold k's own, fallback)."""
    return self.introvae if key is None else self.introvae / f'fold{int(key)}'

  def pseudo_normal_dir(self, key: Optional[int] = None) -> Path:
    """pseudo_normal/ or pseudo_normal/fold<k>/: the reconstructions of that IntroVAE."""
    return self.pseudo_normal if key is None else self.pseudo_normal / f'fold{int(key)}'

  def pseudo_normal_file(self, case_id: str, key: Optional[int] = None) -> Path:
    return self.pseudo_normal_dir(key) / f'{case_id}.npz'

  def trained_folds(self, method: str) -> list:
    """Folds of `method` with a checkpoint folder, ascending."""
    folder = self.runs / method
    if not folder.is_dir():
      return []
    return sorted(int(d.name[4:]) for d in folder.glob('fold*')
                  if d.name[4:].isdigit() and (d / 'checkpoints').is_dir())


def folds_to_run(config) -> list:
  """config.fold, or every fold when it is -1 (the paper's five-fold protocol)."""
  return list(range(config.data.num_folds)) if config.fold < 0 else [config.fold]


def _tuples(x):
  """JSON lists back to the tuples the configs use (to_json_best_effort writes tuples as lists)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def read_config(path) -> ml_collections.ConfigDict:
  """A config saved as JSON by the main job (WORKDIR/config.json, runs/.../config.json)."""
  path = Path(path)
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f'{path}: no readable config ({e}); is this a workdir of '
                            'clfc_jax.main? (or pass --config)') from None


def write_config(config, path) -> Path:
  """`config` as JSON (what read_config reads back), atomically."""
  return store.write_text(path, config.to_json_best_effort(indent=1))
