import pytest

from configs import brats, default, demo, inhouse, msd


@pytest.mark.parametrize('module', [brats, msd, inhouse, demo])
@pytest.mark.parametrize('method', default.METHODS)
def test_every_config_and_variant_builds(module, method):
  c = module.get_config(method)
  assert c.method == method
  assert all(v % 16 == 0 for v in c.prep.crop_hw)
  assert (c.loss.sim_weight > 0) == (method == 'clfc')
  assert c.model.use_normal_net == (method in ('clfc', 'baseline2'))


def test_unknown_method_is_rejected():
  with pytest.raises(ValueError, match='unknown method'):
    brats.get_config('nnunet')


def test_defaults_follow_spec():
  c = brats.get_config()
  assert c.data.k == 2 and c.train.batch_size == 4 and c.train.lr == 1e-2
  assert c.train.momentum == 0.95 and c.train.clip_norm == 12.0 and c.train.weight_decay == 3e-5
  assert (c.introvae.alpha, c.introvae.beta, c.introvae.margin) == (0.5, 0.04, 120.0)
  assert c.clfc.stop_grad_before_zeta


def test_brats_runs_the_papers_five_folds_by_default():
  c = brats.get_config()
  assert c.fold == -1 and c.data.num_folds == 5
  assert brats.get_config('baseline2').fold == -1


def test_demo_study_variant_runs_the_protocol_at_study_size():
  """`configs/demo.py:study`: every fold, every method, >= 60 tumour patients, else the demo."""
  from configs import demo
  study, base = demo.get_config('study'), demo.get_config()
  assert study.fold == -1 and study.synthetic.tumor_cases >= 60
  assert study.method == 'clfc' and set(study.methods) == {'clfc', 'baseline1', 'baseline2'}
  assert study.train.epochs * study.train.steps_per_epoch >= 500
  assert dict(study.model.to_dict(), epochs=0) == dict(base.model.to_dict(), epochs=0)
  assert demo.get_config('baseline2').method == 'baseline2'


def test_demo_regions_variant_is_the_demo_with_sub_regions():
  """`configs/demo.py:regions`: the demo with task.regions='wt_tc_et' and nothing else changed."""
  from configs import demo
  regions, base = demo.get_config('regions'), demo.get_config()
  assert regions.task.regions == 'wt_tc_et' and base.task.regions == 'wt'
  regions.task.regions = 'wt'
  assert regions.to_dict() == base.to_dict()
