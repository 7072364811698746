"""The main job end to end, through its command line: synthetic cohort -> prep -> introvae ->
pseudo_normal -> train -> evaluate -> report, at toy sizes; a rerun skips every finished stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clfc_jax import stages

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    '--config.synthetic.tumor_cases=5', '--config.synthetic.normal_cases=2',
    '--config.methods=("clfc","baseline1")',
    '--config.model.width=0.125',
    '--config.introvae.channels=(8,16)', '--config.introvae.latent_dim=16',
    '--config.introvae.batch_size=8', '--config.introvae.epochs=1',
    '--config.introvae.steps_per_epoch=2', '--config.introvae.cheap_cpu_compile=True',
    '--config.train.epochs=1', '--config.train.steps_per_epoch=2',
    '--config.train.batch_size=4', '--config.train.cheap_cpu_compile=True',
]


def run_main(workdir, *extra):
  cmd = [sys.executable, '-m', 'clfc_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', *TINY, *extra]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp('main')
  run_main(wd)
  return wd


def test_every_stage_finishes_and_leaves_its_marker(workdir):
  for stage in stages.STAGES:
    record = json.loads((workdir / stage / 'DONE.json').read_text())
    assert record['status'] == 'done', stage
  config = json.loads((workdir / 'config.json').read_text())
  assert config['method'] == 'clfc' and config['model']['width'] == 0.125


def test_report_has_table1_with_both_methods(workdir):
  table = (workdir / 'report' / 'table1.md').read_text()
  assert 'CLFC' in table and 'Baseline-1' in table
  assert (workdir / 'report' / 'table1.csv').exists()


def test_predictions_lie_on_the_input_geometry(workdir):
  preds = sorted((workdir / 'eval' / 'clfc' / 'fold0' / 'predictions').glob('*_seg.nii.gz'))
  assert preds
  for pred_path in preds:
    case_id = pred_path.name[:-len('_seg.nii.gz')]
    truth = nib.load(next((workdir / 'data' / 'synthetic' / 'BraTS').glob(
        f'*/{case_id}/{case_id}_seg.nii.gz')))
    pred = nib.load(pred_path)
    assert pred.shape == truth.shape
    np.testing.assert_allclose(pred.affine, truth.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_a_rerun_skips_every_finished_stage(workdir):
  before = {s: (workdir / s / 'DONE.json').stat().st_mtime for s in stages.STAGES}
  run_main(workdir)
  after = {s: (workdir / s / 'DONE.json').stat().st_mtime for s in stages.STAGES}
  assert before == after


def test_a_bad_stage_name_is_refused(tmp_path):
  cmd = [sys.executable, '-m', 'clfc_jax.main', '--config=configs/demo.py',
         f'--workdir={tmp_path}', '--stages=prep,trian']
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'trian' in proc.stderr
