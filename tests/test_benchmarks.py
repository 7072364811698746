"""The benchmark suite at tiny size: real steps, real cost analysis, real sharded runs."""
import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from benchmarks import heldout
from benchmarks import inference
from benchmarks import machine
from benchmarks import run
from benchmarks import scaling
from configs import demo
from data_prep import prepare, synthetic, validate


def test_device_peaks_by_kind():
  assert machine.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4e12
  assert machine.peak_flops('NVIDIA H100 PCIe', 'bfloat16') == 756.5e12
  assert machine.peak_flops('NVIDIA H200', 'float32') == machine.peak_flops('H100', 'float32')
  assert machine.peak_flops('cpu', 'float32') is None
  assert machine.peak_flops('cpu', 'float32', cpu_peak_gflops=100) == 100e9


def test_sharded_step_matches_one_device():
  args = scaling.parse_args(['--method', 'baseline1', '--width', '0.125', '--h', '32', '--w',
                             '32', '--k', '1', '--batch', '4', '--steps', '1'])
  config = scaling.step_config(args)
  config.train.cheap_cpu_compile = True
  config.train.rng_impl = 'rbg'
  runs = [scaling.measure_devices(config, jax.devices()[:n], steps=1) for n in (1, 2)]
  rows = scaling.compare(runs)
  assert [r['devices'] for r in rows] == [1, 2]
  assert rows[0]['params_max_abs_diff'] == 0.0
  assert rows[1]['loss_abs_diff'] < 1e-4
  assert rows[1]['params_max_abs_diff'] < 1e-4
  assert rows[1]['diff_over_update'] < 1e-2   # float noise, not a device-count dependence
  # One step moved the parameters much further than the two runs differ.
  assert np.max(np.abs(runs[1][2])) > 0 and rows[1]['step_s'] > 0


def test_suite_writes_results_and_skips_what_is_missing(tmp_path, monkeypatch):
  """Tiny steps through the suite; the largest-batch search (GPU only by default) forced on:
  this CPU never runs out of memory, so it doubles 4 -> 8 and stops at the limit."""
  real = run.module_available
  monkeypatch.setattr(run, 'module_available',
                      lambda name: name not in ('tensorflow', 'SimpleITK') and real(name))
  argv = ['--suite', 'train_step,pipeline,prep', '--methods', 'baseline1', '--width', '0.125',
          '--h', '32', '--w', '32', '--k', '1', '--steps', '1', '--torch', 'no',
          '--cpu-peak-gflops', '50', '--search-max-batch', 'yes', '--max-batch-limit', '8',
          '--cheap-compile', '--out', str(tmp_path)]
  results = run.main(argv)
  step = json.loads((tmp_path / 'train_step.json').read_text())
  measured = step['rows'][0]
  assert measured['method'] == 'baseline1' and measured['step_s'] > 0
  assert measured['devices'] == jax.device_count()   # the child sees the same 4 CPU devices
  # XLA's count exceeds the forward pass's lower bound: every conv weight meets at least the
  # 4x4 pixels of the deepest (1/8) level of each of the 4 slices, 2 FLOPs a time.
  assert measured['flops_per_step'] > 2 * measured['params'] * 4 * 16
  assert measured['peak_memory_bytes'] > 2 * 4 * measured['params']   # params + momentum
  expected_mfu = measured['flops_per_step'] / measured['step_s'] / (50e9 * measured['devices'])
  assert measured['mfu'] == pytest.approx(expected_mfu, rel=0.01, abs=1e-4)
  for key in ('init_s', 'compile_s', 'compile_cpu_s', 'step_min_s', 'step_cpu_s',
              'slices_per_s', 'loss', 'time'):   # what other tools read from train_step
    assert key in measured
  biggest = step['rows'][1]   # a real step at the largest batch found
  assert biggest['batch'] == 8 and biggest['step_s'] > 0
  assert biggest['peak_memory_bytes'] > measured['peak_memory_bytes']   # twice the activations
  assert biggest['note'] == ("largest B that fits (doubling until out of memory; tried "
                             "{'4': True, '8': True}, search limit hit)")
  assert results['pipeline']['skipped'] == 'tensorflow not installed'
  assert results['prep']['skipped'] == 'simpleitk not installed'
  assert json.loads((tmp_path / 'pipeline.json').read_text())['machine']['cpu_count'] > 0
  summary = (tmp_path / 'summary.md').read_text()
  assert 'skipped: tensorflow not installed' in summary
  assert f"| baseline1 | 4 | {measured['step_s']:.4g} |" in summary
  assert machine.cpu_model() in summary


def test_inference_times_every_phase_of_a_patient():
  """segment_case on a 3 mm synthetic patient, models from the throwaway workdir."""
  config = demo.get_config('baseline2')   # CLFC gates and the IntroVAE; no SimSiam to compile
  config.prep.spacing = config.prep.reg.spacing = 4.0
  config.prep.crop_hw = (48, 48)
  config.model.width = 0.125
  config.data.k = 1
  config.introvae.channels = (8, 16)
  config.introvae.latent_dim = 16
  config.introvae.recon_batch_size = 16
  config.eval.batch_size = 16
  config.train.rng_impl = 'rbg'
  args = inference.parse_args(['--cases', '2', '--patient-spacing', '3', '--out', ''])
  result = inference.run(args, config)
  assert result['method'] == 'baseline2'
  assert result['case'].startswith('80x80x52 at 3 mm')
  for case in ('first_case_s', 'steady_case_s'):
    assert set(result[case]) == set(inference.PHASES) | {'total'}
    assert all(result[case][p] > 0 for p in inference.PHASES)
  assert result['first_case_s']['segment'] > result['steady_case_s']['segment']  # compile


def test_step_benchmarks_import_no_tensorflow():
  """A GPU box with JAX but no TensorFlow runs them: none may import it (a fresh process)."""
  code = ('import sys; import benchmarks.run, benchmarks.train_step, benchmarks.scaling, '
          'benchmarks.inference, clfc_jax.segment; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets", "torch")))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True, cwd=Path(run.__file__).parents[1])
  assert done.stdout.strip() == '[]'


def test_rounds_combine_to_median_ratio_and_range():
  """clfc beside PyTorch over alternating rounds: median ratio, its range, a failed round dropped."""
  jax_rows = [{'step_s': s, 'compile_s': c} for s, c in ((2.5, 9.0), (2.7, 8.0), (2.6, 8.5))]
  torch_rows = [{'step_s': s} for s in (5.5, 5.0, 5.4)]
  rounds = list(zip(jax_rows, torch_rows)) + [({'error': 'killed'}, {'step_s': 9.0})]
  row = run.combine_rounds(rounds)
  assert row['step_s'] == 2.6 and row['compile_s'] == 8.5    # the JAX round of median time
  assert row['torch']['step_s'] == 5.4
  assert row['torch_over_jax'] == round(5.4 / 2.6, 2)         # median of 2.2, 1.85, 2.08
  assert [r['torch_over_jax'] for r in row['rounds']] == [2.2, 1.852, 2.077]
  assert row['note'] == 'median of 3 alternating rounds; torch/jax 1.85-2.20'
  assert run.combine_rounds([({'error': 'oom'}, {'step_s': 5.0})]) == {
      'error': 'oom', 'torch': {'step_s': 5.0}}


def test_heldout_scores_every_patient_in_its_native_space(tmp_path):
  """The held-out check end to end on one small patient, with fresh (untrained) tiny models:
  the cohort is the heldout profile's, each mask lies on its patient's own grid and is scored."""
  config = demo.get_config('baseline1')   # no IntroVAE needed; the scoring path is the same
  config.prep.spacing = config.prep.reg.spacing = 4.0
  config.prep.crop_hw = (48, 48)
  config.model.width = 0.125
  config.data.k = 1
  config.eval.batch_size = 16
  config.train.rng_impl = 'rbg'
  config.fold = 0
  case, _ = inference.write_patient(tmp_path / 'ref', 0, spacing=3.0)
  reference = prepare.prepare_loaded(validate.load_case(case, config, require_label=False),
                                     config)
  workdir = inference.build_workdir(config, tmp_path / 'work', [reference])
  args = heldout.parse_args(['--workdir', str(workdir), '--cases', '1', '--spacing', '3',
                             '--keep', str(tmp_path / 'kept'), '--out', '', '--shifts', 'grid',
                             '--ceiling'])
  result = heldout.run(args)
  [row] = result['cases']
  # The ceiling: the patient's own label through the 4 mm grid and back, nearly whole; the
  # untrained model is far below it.
  [best] = result['ceiling']['cases']
  assert best['case'] == row['case'] and best['tumor_ml'] == pytest.approx(row['tumor_ml'])
  assert best['dice'] > 0.7 and best['dice'] > row['dice'] + 0.3
  assert result['shifts']['grid']['ceiling']['dice']['mean'] > 0.7
  assert result['cohort']['profile'] == 'heldout' and result['summary']['all']['n'] == 1
  assert 0.0 <= row['dice'] <= 1.0 and row['hd95'] >= 0.0 and row['tumor_ml'] > 0
  mask = nib.load(str(tmp_path / 'kept' / 'masks' / f'{row["case"]}_seg.nii.gz'))
  assert list(mask.shape) == row['shape']
  assert list(result['shifts']) == ['grid'] and result['shifts']['grid']['all']['n'] == 1
  grid_case = json.loads((tmp_path / 'kept' / 'shift_grid' / 'cohort' / 'cohort.json')
                         .read_text())['tumor_cases'][0]
  axes = ''.join(nib.aff2axcodes(np.asarray(grid_case['grid']['affine'])))
  assert axes in synthetic.PROFILES['heldout'].orientations   # not one of train's
  table = heldout.markdown(result)
  assert '| all | 1 |' in table and '| grid | 1 |' in table and '| ... its ceiling | 1 |' in table


def test_shift_profiles_take_one_group_of_heldout_ranges():
  train, held = synthetic.PROFILES['train'], synthetic.PROFILES['heldout']
  assert set(heldout.shift_groups('all')) == set(heldout.SHIFT_GROUPS)
  grouped = [f for fields in heldout.SHIFT_GROUPS.values() for f in fields]
  assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(train)
                                   if f.name not in ('name', 'stream', 'hgg_fraction'))
  for group, fields in heldout.SHIFT_GROUPS.items():
    p = heldout.shift_profile(group)
    assert p.stream == held.stream != train.stream
    for f in dataclasses.fields(train):
      if f.name in fields:
        assert getattr(p, f.name) == getattr(held, f.name)
      elif f.name not in ('name', 'stream'):
        assert getattr(p, f.name) == getattr(train, f.name)
  with pytest.raises(ValueError, match='unknown shift group'):
    heldout.shift_profile('weather')
