"""The main job's stages, in order, and when each counts as done (orchestration only: what a
stage does lives in the module it calls; nothing imports this module but clfc_jax.main).

prep -> introvae -> pseudo_normal -> train -> evaluate -> report. A stage writes
WORKDIR/<stage>/DONE.json last; a stage whose marker exists is skipped, one without is
(re)run and resumes from whatever it finds (prepared cases, shards, checkpoints).
TensorFlow (the shard writer) loads only in the stages that write shards (clfc_jax.optional).
"""
import json
from pathlib import Path
import time

from absl import logging

from clfc_jax import evaluate
from clfc_jax import external
from clfc_jax import pseudo_normal
from clfc_jax.report import page as report_page
from clfc_jax.train import introvae_trainer
from clfc_jax.train import trainer
from clfc_jax.workdir import Workdir, folds_to_run
from configs import default
from data_prep import optional
from data_prep import folds as folds_lib
from data_prep import normalize, prepare, readers, shards, store, synthetic

STAGES = ('prep', 'introvae', 'pseudo_normal', 'train', 'evaluate', 'report')


def resolve_data_roots(config, wd: Workdir):
  """Where the tumor and normal cohorts are; generates the synthetic default on first use."""
  if config.dataset.root:
    return Path(config.dataset.root), (Path(config.dataset.normal_root)
                                       if config.dataset.normal_root else None)
  if 'synthetic' not in config:
    raise ValueError('config.dataset.root is empty: point it at your cohort '
                     '(e.g. --config.dataset.root=/data/MICCAI_BraTS_2019_Data_Training)')
  s = config.synthetic
  done = wd.synthetic / 'cohort.json'
  if not done.exists():
    logging.info('generating the synthetic cohort into %s', wd.synthetic)
    synthetic.generate_cohort(wd.synthetic, s.tumor_cases, s.normal_cases, s.seed, s.spacing,
                              profile=s.get('profile', 'train'))
  return wd.synthetic / 'BraTS', wd.synthetic / 'IXI'


def stage_prep(config, wd: Workdir):
  """NIfTI -> validated -> MNI152 -> prepared volumes; folds; histogram references; shards.

  The tumor shards are written once for every fold (each fold's references are applied when
  a slice is read); the pseudo_normal stage adds each IntroVAE's pseudo-normal stacks beside
  them.
  """
  tfds_builders = optional.tfds_builders()
  tumor_root, normal_root = resolve_data_roots(config, wd)
  summary = {'tumor': prepare.prepare_cohort(readers.find_cases(config, tumor_root), config,
                                             wd.prep_cases)}
  ids = store.prepared_ids(wd.prep_cases)
  if not ids:
    raise RuntimeError(f'no case could be prepared from {tumor_root}; see '
                       f'{wd.prep_cases / prepare.SUMMARY_NAME}')
  if normal_root is not None:
    summary['normal'] = prepare.prepare_cohort(readers.find_normal_cases(normal_root, config),
                                               config, wd.prep_normal)
  groups = [store.load_prepared_meta(wd.prep_cases, i).get('group', '') for i in ids]
  fold_lists = folds_lib.load_or_make_folds(wd.folds, ids, groups, config)
  modalities = tuple(config.dataset.modalities)
  for k in folds_to_run(config):
    split = folds_lib.split_for_fold(fold_lists, k, config.data.val_fraction,
                                     config.data.split_seed)
    normalize.load_or_fit_references(wd.hist_refs(k), wd.prep_cases,
                                     split['train'] + split['val'], modalities, config)
  tfds_builders.build(tfds_builders.tumor_slices_builder(config, wd.tfds, prep_dir=wd.prep))
  summary['normal_t1_slices'] = {}
  for key in wd.introvae_keys(config):   # the normal cohort, or each fold's training patients
    built = tfds_builders.build(tfds_builders.normal_t1_builder(
        config, wd.tfds, fold=0 if key is None else key, prep_dir=wd.prep))
    summary['normal_t1_slices'][shards.key_name(key)] = built.info.splits['train'].num_examples
  summary['cases'] = len(ids)
  summary['skipped'] = dict(summary['tumor']['skipped'], **summary.get('normal', {}).get(
      'skipped', {}))
  return summary


def stage_introvae(config, wd: Workdir):
  """Trains the IntroVAE(s) on normal T1 slices (frozen afterwards): one on the normal cohort,
  or, without one, one per fold on that fold's training patients (Workdir.introvae_keys)."""
  return {shards.key_name(key): introvae_trainer.train_introvae(config, wd, key)
          for key in wd.introvae_keys(config)}


def stage_pseudo_normal(config, wd: Workdir):
  """Reconstructs every tumor case's pseudo-normal T1 once per IntroVAE; shards with the 2.5D
  stacks, each fold's from its own IntroVAE."""
  return {shards.key_name(key): pseudo_normal.make_pseudo_normals(config, wd, key)
          for key in wd.introvae_keys(config)}


def ensure_tumor_shards(config, wd: Workdir):
  """Builds the tumor shards if these data settings (K, crop, histogram settings) have none
  yet, and the pseudo-normal stacks of each IntroVAE that has made some: from the prepared
  volumes, so no registration is redone. Existing builds are reused as they are."""
  tfds_builders = optional.tfds_builders()
  tfds_builders.build(tfds_builders.tumor_slices_builder(config, wd.tfds, prep_dir=wd.prep))
  for key in wd.introvae_keys(config):
    pn_dir = wd.pseudo_normal_dir(key)
    if pn_dir.is_dir() and any(pn_dir.glob('*.npz')):
      tfds_builders.build(tfds_builders.pseudo_normal_builder(
          config, wd.tfds, key, prep_dir=wd.prep, pseudo_normal_dir=pn_dir))


def stage_train(config, wd: Workdir):
  """Trains every method of config.methods on every fold to run."""
  ensure_tumor_shards(config, wd)
  return {f'{m}/fold{k}': trainer.train_and_evaluate(default.method_config(config, m), wd.root, k)
          for m in config.methods for k in folds_to_run(config)}


def _external(config) -> dict:
  return external.parse_methods(config.report.get('external', ''))


def stage_evaluate(config, wd: Workdir):
  """Scores every method's best checkpoint on its held-out fold, in native space, and the
  external predictions of config.report.external the same way."""
  out = {f'{m}/fold{k}': evaluate.evaluate_fold(default.method_config(config, m), wd.root, k)
         for m in config.methods for k in folds_to_run(config)}
  for name, folder in _external(config).items():
    for k in folds_to_run(config):
      out[f'{name}/fold{k}'] = evaluate.evaluate_external(config, wd.root, name, folder, k)
  return out


def stage_report(config, wd: Workdir):
  """Table 1, Wilcoxon tests and figures under WORKDIR/report."""
  methods = list(config.methods) + list(_external(config))
  return report_page.write_report(config, wd.root, methods, folds_to_run(config))


_STAGE_FNS = {
    'prep': stage_prep,
    'introvae': stage_introvae,
    'pseudo_normal': stage_pseudo_normal,
    'train': stage_train,
    'evaluate': stage_evaluate,
    'report': stage_report,
}


def run(config, workdir, stages):
  """Runs `stages` in pipeline order; returns a summary per stage."""
  wd = Workdir(workdir)
  results = {}
  for stage in STAGES:
    if stage not in stages:
      continue
    marker = wd.marker(stage)
    if marker.exists():
      logging.info('stage %s: already done (%s)', stage, marker)
      results[stage] = json.loads(marker.read_text())
      continue
    start = time.time()
    out = _STAGE_FNS[stage](config, wd)
    record = {'status': 'done', 'seconds': round(time.time() - start, 1), 'summary': out}
    marker.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(marker, json.dumps(record, indent=1, default=str))
    results[stage] = record
  return results
