"""Table 1 and the index page from hand-made per-patient CSVs."""
import csv
import re
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks import pipeline
from clfc_jax import checkpoints, run_log, stats
from clfc_jax.report import page as report
from clfc_jax.train import steps as train
from clfc_jax.workdir import Workdir
from clfc_jax.models import segmenter
from configs import demo
from data_prep import store
import synthetic_workdirs

METHODS = ('clfc', 'baseline1', 'baseline2')
FOLDS = (0, 1)


def _results(seed=0, n_per_fold=6):
  """{method: {fold: [(patient, dice, sens, hd95)]}}; clfc a little better than the others."""
  rng = np.random.default_rng(seed)
  out = {}
  for mi, method in enumerate(METHODS):
    out[method] = {}
    for k in FOLDS:
      rows = []
      for j in range(n_per_fold):
        base = 0.8 + 0.01 * j + 0.02 * k
        dice = base - 0.03 * mi + rng.uniform(-0.01, 0.01)
        rows.append((f'P{k}{j:02d}', dice, dice + 0.02, 3.0 + 2 * mi + rng.uniform(0, 1)))
      out[method][k] = rows
  return out


def _write(workdir, results):
  for method, by_fold in results.items():
    for k, rows in by_fold.items():
      stats.write_per_patient(
          workdir / 'eval' / method / f'fold{k}' / 'per_patient.csv',
          [{'patient': p, 'dice': d, 'sensitivity': s, 'hd95': h, 'fold': k, 'method': method}
           for p, d, s, h in rows])


def _config():
  c = demo.get_config()
  c.methods = METHODS
  c.data.num_folds = len(FOLDS)
  return c


def test_table1_means_stds_and_wilcoxon(tmp_path):
  results = _results()
  _write(tmp_path, results)
  paths = report.write_report(_config(), tmp_path)
  assert paths['table1_md'] == tmp_path / 'report' / 'table1.md'
  with open(paths['table1_csv'], newline='') as f:
    table = {r['method']: r for r in csv.DictReader(f)}
  assert list(table) == list(METHODS)
  dice = {m: {p: d for k in FOLDS for p, d, _, _ in results[m][k]} for m in METHODS}
  for m in METHODS:
    values = np.array([dice[m][p] for p in sorted(dice[m])]) * 100
    hd = np.array([h for k in FOLDS for _, _, _, h in results[m][k]])
    assert int(table[m]['n']) == 12
    assert float(table[m]['dice_mean']) == pytest.approx(values.mean())
    assert float(table[m]['dice_std']) == pytest.approx(values.std(ddof=1))
    assert float(table[m]['hd95_mean']) == pytest.approx(hd.mean())
  for m in ('baseline1', 'baseline2'):
    ids = sorted(dice['clfc'])
    expected = scipy_stats.wilcoxon([dice['clfc'][i] for i in ids],
                                    [dice[m][i] for i in ids]).pvalue
    assert float(table[m]['p']) == pytest.approx(expected)
    assert expected < 0.01   # clfc is better for every patient
  index = paths['index'].read_text()
  assert paths['table1_md'].read_text() in index
  assert 'Per-fold means' in index and 'Missing' not in index
  # Per-fold means: fold 1 of baseline2 by hand.
  fold1 = np.mean([d for _, d, _, _ in results['baseline2'][1]]) * 100
  assert f'| Baseline-2 | 1 | 6 | {fold1:.2f} |' in index


def test_missing_method_or_fold_is_named(tmp_path):
  results = _results()
  del results['baseline2']
  results['baseline1'].pop(1)
  _write(tmp_path, results)
  with pytest.raises(FileNotFoundError) as e:
    report.write_report(_config(), tmp_path)
  message = str(e.value)
  assert 'baseline2 fold 0' in message and 'baseline2 fold 1' in message
  assert 'baseline1 fold 1' in message and 'clfc' not in message.split('(missing')[0]
  # A partial report on request: lists what is missing, no p-value on unequal patient sets.
  paths = report.write_report(_config(), tmp_path, allow_missing=True)
  index = paths['index'].read_text()
  assert 'Missing results' in index and 'baseline2/fold1/per_patient.csv' in index
  assert 'different patients' in index


def test_a_csv_in_the_wrong_place_is_refused(tmp_path):
  results = _results()
  _write(tmp_path, results)
  src = tmp_path / 'eval' / 'clfc' / 'fold0' / 'per_patient.csv'
  (tmp_path / 'eval' / 'clfc' / 'fold1' / 'per_patient.csv').write_text(src.read_text())
  with pytest.raises(ValueError, match='expected only fold 1'):
    report.write_report(_config(), tmp_path)


def test_figures_without_their_inputs_are_skipped_with_a_note(tmp_path):
  _write(tmp_path, _results())
  paths = report.write_report(_config(), tmp_path)
  index = paths['index'].read_text()
  for title in ('Fig. 2', 'Fig. 3', 'Fig. 4', 'Pseudo-normal', 'Training curves', 'IntroVAE'):
    section = index.split(f'## {title}')[1].split('\n## ')[0]
    assert '*Figure skipped: ' in section and '![' not in section, title
  assert not list((tmp_path / 'report').glob('figures/*.png'))
  html = paths['index_html'].read_text()
  assert '<table>' in html and 'Figure skipped' in html and '<img' not in html
  # Tables only, on request: no figure sections at all.
  index = report.write_report(_config(), tmp_path, with_figures=False)['index'].read_text()
  assert 'Fig. 2' not in index and 'Table 1' in index


def test_table1_by_tumour_volume_splits_every_method_by_the_native_label(tmp_path):
  results = _results()
  _write(tmp_path, results)
  cases = Workdir(tmp_path).prep_cases
  cases.mkdir(parents=True)
  affine = np.diag([2.0, 2.0, 2.5, 1.0])   # 10 mm^3 per voxel: 100 voxels = 1 ml.
  voxels = {0: 200, 1: 200, 2: 1000, 3: 1000, 4: 4000, 5: 4000}
  volumes = {}
  for k in FOLDS:
    for j, n in voxels.items():
      patient = f'P{k}{j:02d}'
      if patient == 'P105':
        continue                             # no prepared case: left out, and named.
      n = 500 if patient == 'P100' else n    # exactly 5 ml: the bin above the edge.
      label = np.zeros((20, 20, 20), np.uint8)
      label.reshape(-1)[:n] = 2
      label.reshape(-1)[:n // 4] = 4           # every tumour label counts.
      path = tmp_path / 'labels' / f'{patient}_seg.nii.gz'
      path.parent.mkdir(exist_ok=True)
      nib.save(nib.Nifti1Image(label, affine), str(path))
      (cases / f'{patient}.json').write_text(f'{{"label_file": "{path}"}}')
      volumes[patient] = n / 100.0
  index = report.write_report(_config(), tmp_path, with_figures=False)['index'].read_text()
  section = index.split('## Table 1 by tumour volume')[1].split('\n## ')[0]
  assert 'Left out (no prepared case or label file): P105.' in section
  dice = {m: {p: d for k in FOLDS for p, d, _, _ in results[m][k]} for m in METHODS}
  bins = {'< 5 ml': lambda v: v < 5, '5-30 ml': lambda v: 5 <= v < 30,
          '>= 30 ml': lambda v: v >= 30}
  for label, inside in bins.items():
    ids = sorted(p for p, v in volumes.items() if inside(v))
    assert len(ids) == {'< 5 ml': 3, '5-30 ml': 5, '>= 30 ml': 3}[label]
    for m in METHODS:
      values = np.array([dice[m][p] for p in ids]) * 100
      row = f'| {label} | {report.tables.method_name(m)} | {len(ids)} | {values.mean():.2f} ± '
      assert row in section, (row, section)
    p = scipy_stats.wilcoxon([dice['clfc'][i] for i in ids],
                             [dice['baseline1'][i] for i in ids]).pvalue
    line = next(l for l in section.splitlines() if l.startswith(f'| {label} | Baseline-1 |'))
    assert line.endswith(f'| {stats.format_p(p)} |')
  # Off in the config: no such section, and no label is read.
  config = _config()
  config.report.volume_strata_ml = ()
  index = report.write_report(config, tmp_path, with_figures=False)['index'].read_text()
  assert 'by tumour volume' not in index
  with pytest.raises(ValueError, match='volume_strata_ml'):
    report.tables.volume_strata({'a': 1.0}, (0.0, 5.0))


# --- figures from a small real workdir ---------------------------------------------------------
def _figure_config():
  c = demo.get_config()
  c.methods = ('clfc', 'baseline1', 'baseline2')
  c.model.width = 0.125
  c.data.k = 1
  c.data.num_folds = 2
  c.report.feature_slices = 2
  c.report.figure_patients = 2
  c.train.keep_checkpoints = 1
  return c


@pytest.fixture(scope='module')
def figure_workdir(tmp_path_factory):
  """Two prepared synthetic cases, fold 0's references, stand-in pseudo-normals, a fresh clfc
  checkpoint and training log; eval CSVs for clfc (prediction = truth) and baseline1 (no
  prediction files); baseline2 was never trained."""
  root = tmp_path_factory.mktemp('report_figures')
  config = _figure_config()
  wd, split, _ = synthetic_workdirs.prepared_workdir(root, config, 2, 5)
  ids = store.prepared_ids(wd.prep_cases)
  pipeline.write_toy_pseudo_normals(wd.prep, wd.pseudo_normal_dir(wd.introvae_key(0)), ids)
  model = segmenter.build_segmenter(config)
  state = train.create_train_state(config, jax.random.key(1, impl=config.train.rng_impl), model)
  run = wd.runs / 'clfc' / 'fold0'
  with checkpoints.Checkpointer(run / 'checkpoints', max_to_keep=1) as ckpt:
    ckpt.save(3, state, metrics={'val_dice': 0.5})
    ckpt.wait()
  log = run_log.RunLog(run, enabled=True)
  for step in (1, 2, 3):
    log.event('train', step, {'loss': 1.0 / step, 'dice_loss': 0.5 / step, 'sim': -0.1 * step},
              epoch=step)
    log.event('val', step, {'val_dice': 0.2 * step}, epoch=step)
  log.close()
  test_id = split['test'][0]
  meta = store.load_prepared_meta(wd.prep_cases, test_id)
  pred = wd.eval / 'clfc' / 'fold0' / 'predictions' / f'{test_id}_seg.nii.gz'
  pred.parent.mkdir(parents=True)
  shutil.copyfile(meta['label_file'], pred)
  for method, dice in (('clfc', 0.9), ('baseline1', 0.8)):
    stats.write_per_patient(wd.eval / method / 'fold0' / 'per_patient.csv',
                            [{'patient': test_id, 'dice': dice, 'sensitivity': 0.9, 'hd95': 2.0,
                              'fold': 0, 'method': method}])
  return {'wd': wd, 'config': config, 'test_id': test_id}


def test_report_draws_every_figure_it_has_inputs_for(figure_workdir):
  wd, config = figure_workdir['wd'], figure_workdir['config']
  config.methods = ('clfc', 'baseline1')
  paths = report.write_report(config, wd.root, folds=[0])
  index = paths['index'].read_text()
  made = {k: p for k, p in paths.items() if k.startswith('figure_')}
  assert set(made) == {'figure_fig2_segmentation', 'figure_fig3_feature_pca',
                       'figure_fig4_attention', 'figure_pseudo_normals',
                       'figure_training_curves'}
  for path in made.values():
    assert path.stat().st_size > 10_000 and f'](figures/{path.name})' in index
  referenced = re.findall(r'!\[[^\]]*\]\((figures/[^)]+\.png)\)', index)
  assert len(referenced) == len(made)
  assert all((wd.report / r).is_file() for r in referenced)
  # The IntroVAE never ran here: its section says so in one line.
  introvae = index.split('## IntroVAE training')[1]
  assert 'Figure skipped: no IntroVAE training log' in introvae
  html = paths['index_html'].read_text()
  assert html.count('src="data:image/png;base64,') == len(made)
  assert '<table>' in html and '<h2>Fig. 3: CLFC feature vectors (PCA)</h2>' in html


def test_an_untrained_method_is_left_out_of_figs_3_and_4_with_a_note(figure_workdir):
  wd, config = figure_workdir['wd'], figure_workdir['config']
  config.methods = ('clfc', 'baseline1', 'baseline2')
  paths = report.write_report(config, wd.root, folds=[0], allow_missing=True)
  index = paths['index'].read_text()
  for title in ('Fig. 3', 'Fig. 4'):
    section = index.split(f'## {title}')[1].split('\n## ')[0]
    assert '![' in section and 'Baseline-2 left out' in section and 'no checkpoints' in section
