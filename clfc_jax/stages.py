"""What each stage of the main job reads and writes in WORKDIR, and when it counts as done.

prep -> introvae -> pseudo_normal -> train -> evaluate -> report. A stage writes
WORKDIR/<stage>/DONE.json last; a stage whose marker exists is skipped, one without is
(re)run and resumes from whatever it finds (prepared cases, shards, checkpoints).
Heavy modules are imported inside the stage functions, so that `--stages=train` on an
accelerator machine never imports the data-preparation stack.
"""
import json
import time
from pathlib import Path

from absl import logging

STAGES = ('prep', 'introvae', 'pseudo_normal', 'train', 'evaluate', 'report')


class Workdir:
  """Named paths inside WORKDIR (ARCHITECTURE.md's workdir contract)."""

  def __init__(self, root):
    self.root = Path(root)
    self.synthetic = self.root / 'data' / 'synthetic'
    self.prep = self.root / 'prep'
    self.prep_cases = self.prep / 'cases'
    self.prep_normal = self.prep / 'normal'
    self.folds = self.prep / 'folds.json'
    self.tfds = self.root / 'tfds'
    self.introvae = self.root / 'introvae'
    self.pseudo_normal = self.root / 'pseudo_normal'
    self.runs = self.root / 'runs'
    self.eval = self.root / 'eval'
    self.report = self.root / 'report'

  def hist_refs(self, fold):
    return self.prep / f'hist_refs_fold{fold}.json'

  @property
  def hist_refs_normal(self):
    return self.prep / 'hist_refs_normal.json'

  def marker(self, stage):
    return self.root / stage / 'DONE.json'


def folds_to_run(config):
  return list(range(config.data.num_folds)) if config.fold < 0 else [config.fold]


def resolve_data_roots(config, wd: Workdir):
  """Where the tumor and normal cohorts are; generates the synthetic default on first use."""
  if config.dataset.root:
    return Path(config.dataset.root), (Path(config.dataset.normal_root)
                                       if config.dataset.normal_root else None)
  if 'synthetic' not in config:
    raise ValueError('config.dataset.root is empty: point it at your cohort '
                     '(e.g. --config.dataset.root=/data/MICCAI_BraTS_2019_Data_Training)')
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  s = config.synthetic
  done = wd.synthetic / 'cohort.json'
  if not done.exists():
    logging.info('generating the synthetic cohort into %s', wd.synthetic)
    synthetic.generate_cohort(wd.synthetic, s.tumor_cases, s.normal_cases, s.seed, s.spacing)
  return wd.synthetic / 'BraTS', wd.synthetic / 'IXI'


def stage_prep(config, wd: Workdir):
  """NIfTI -> validated -> MNI152 -> prepared volumes; folds; histogram references; shards.

  Tumor shards are written here without pseudo-normal stacks (enough for baseline1); the
  pseudo_normal stage adds a second build with them.
  """
  from data_prep import folds as folds_lib  # pylint: disable=g-import-not-at-top
  from data_prep import normalize, prepare, readers, store, tfds_builders  # pylint: disable=g-import-not-at-top
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
    tfds_builders.build(tfds_builders.tumor_slices_builder(
        config, wd.tfds, k, with_pseudo_normal=False, prep_dir=wd.prep))
  first = folds_to_run(config)[0]
  normal_builder = tfds_builders.build(tfds_builders.normal_t1_builder(
      config, wd.tfds, fold=first, prep_dir=wd.prep))
  summary['normal_t1_slices'] = normal_builder.info.splits['train'].num_examples
  summary['cases'] = len(ids)
  summary['skipped'] = dict(summary['tumor']['skipped'], **summary.get('normal', {}).get(
      'skipped', {}))
  return summary


def stage_introvae(config, wd: Workdir):
  """Trains the IntroVAE on normal T1 slices (frozen afterwards)."""
  from clfc_jax import normal_appearance  # pylint: disable=g-import-not-at-top
  return normal_appearance.train_introvae(config, wd)


def stage_pseudo_normal(config, wd: Workdir):
  """Reconstructs every tumor case's pseudo-normal T1 once; shards with the 2.5D stacks."""
  from clfc_jax import normal_appearance  # pylint: disable=g-import-not-at-top
  return normal_appearance.make_pseudo_normals(config, wd)


def _method_config(config, method):
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.apply_method(config.copy_and_resolve_references(), method)


def ensure_tumor_shards(config, wd: Workdir):
  """Builds the folds' tumor shards if these data settings (K, crop, folds, validation share)
  have none yet: from the prepared volumes, so no registration is redone. Existing builds
  are reused as they are."""
  from data_prep import tfds_builders  # pylint: disable=g-import-not-at-top
  with_pn = any(wd.pseudo_normal.glob('*.npz')) if wd.pseudo_normal.is_dir() else False
  for k in folds_to_run(config):
    tfds_builders.build(tfds_builders.tumor_slices_builder(
        config, wd.tfds, k, with_pseudo_normal=with_pn, prep_dir=wd.prep,
        pseudo_normal_dir=wd.pseudo_normal))


def stage_train(config, wd: Workdir):
  """Trains every method of config.methods on every fold to run."""
  from clfc_jax import trainer  # pylint: disable=g-import-not-at-top
  ensure_tumor_shards(config, wd)
  return {f'{m}/fold{k}': trainer.train_and_evaluate(_method_config(config, m), wd.root, k)
          for m in config.methods for k in folds_to_run(config)}


def stage_evaluate(config, wd: Workdir):
  """Scores every method's best checkpoint on its held-out fold, in native space."""
  from clfc_jax import evaluate  # pylint: disable=g-import-not-at-top
  return {f'{m}/fold{k}': evaluate.evaluate_fold(_method_config(config, m), wd.root, k, m)
          for m in config.methods for k in folds_to_run(config)}


def stage_report(config, wd: Workdir):
  """Table 1, Wilcoxon tests and figures under WORKDIR/report."""
  from clfc_jax import report  # pylint: disable=g-import-not-at-top
  return report.write_report(config, wd.root, list(config.methods), folds_to_run(config))


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
    marker.write_text(json.dumps(record, indent=1, default=str))
    results[stage] = record
  return results
