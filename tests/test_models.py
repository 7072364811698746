"""Segmenter variants: shapes, parameter counts, stop-gradient, attention range, bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clfc_jax import losses
from clfc_jax.models.segmenter import build_segmenter, dummy_batch, init_variables
from configs.default import apply_method, get_config

SMALL_HW = (32, 48)


def make_config(method='clfc', k=0, width=1.0, **model):
  config = apply_method(get_config(), method)
  config.data.k = k
  config.model.width = width
  config.model.update(model)
  return config


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def reference_param_count(image_channels, normal_channels):
  """The authors' PyTorch layout (shared/bench/torch_reference.py), layer by layer."""
  def encdec(cin):
    n = 0
    for a, b in [(cin, 64), (64, 128), (128, 256), (256, 512)]:
      n += 9 * a * b + b + 2 * b                    # Conv3x3 + bias, BatchNorm scale/shift.
    for a, b in [(512, 512), (768, 256), (384, 128), (128, 64)]:
      n += 16 * a * b + b                           # ConvTranspose k4 + bias.
    return n
  gates = sum(2 * (nf * nf // 2 + nf // 2) + nf // 2 + 1 for nf in (512, 256, 128, 64))
  head = 9 * 64 * 2 + 2
  projection = sum((nf // 2) * 256 + 256 + 2 * (256 * 256 + 256) + 3 * 2 * 256
                   for nf in (512, 256, 128, 64))
  prediction = 4 * (256 * 128 + 128 + 2 * 128 + 128 * 256 + 256)
  return encdec(image_channels) + encdec(normal_channels) + gates + head + projection + prediction


def abstract_variables(config, hw=(192, 160), batch_size=1):
  model = build_segmenter(config)
  return model, jax.eval_shape(
      lambda r: init_variables(model, r, config, batch_size, hw), jax.random.key(0))


def test_parameter_count_matches_the_authors_model():
  _, variables = abstract_variables(make_config('clfc', k=0))
  assert reference_param_count(4, 1) == 20_894_054
  assert count(variables['params']) == 20_894_054
  # The flax ConvTranspose reference holds the very same parameters.
  _, reference = abstract_variables(make_config('clfc', k=0, upsample='conv_transpose'))
  assert jax.tree.map(jnp.shape, reference) == jax.tree.map(jnp.shape, variables)


def test_parameter_count_2p5d():
  # K=2: only the first convolutions grow, by 9 * 64 * (4*5 - 4) backbone + 9 * 64 * (5 - 1)
  # normal net: 20,894,054 + 11,520.
  _, variables = abstract_variables(make_config('clfc', k=2))
  assert reference_param_count(20, 5) == 20_905_574
  assert count(variables['params']) == 20_905_574


def test_level_shapes_full_size():
  batch = 2
  model, variables = abstract_variables(make_config('clfc', k=2), batch_size=batch)
  image, normal, label = dummy_batch(model, batch, (192, 160))
  outputs, _ = jax.eval_shape(
      lambda v: model.apply(v, image, normal, label=label, train=True, mutable=['batch_stats']),
      variables)
  assert image.shape[-1] == 20 and normal.shape[-1] == 5
  assert outputs['logits'].shape == (batch, 192, 160, 2)
  assert outputs['logits'].dtype == jnp.float32
  sizes = [(24, 20), (48, 40), (96, 80), (192, 160)]
  for level, ((h, w), nf) in enumerate(zip(sizes, (512, 256, 128, 64))):
    lv = outputs['levels'][level]
    assert lv['zeta'].shape == lv['g'].shape == (batch, h, w, nf // 2)
    assert lv['attention'].shape == (batch, h, w, 1)
    sim = outputs['simsiam'][level]
    for key in ('p_t', 'p_r', 'z_t', 'z_r'):
      assert sim[key].shape == (batch * h * w, 256)
    assert sim['mask'].shape == (batch * h * w,)


# Tests compile small graphs once each; XLA's cheap CPU compile keeps the file fast.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.fixture(scope='module')
def small_batch():
  keys = jax.random.split(jax.random.key(7), 3)
  h, w = SMALL_HW
  image = jax.random.normal(keys[0], (2, h, w, 4))
  normal = jax.random.normal(keys[1], (2, h, w, 1))
  label = np.zeros((2, h, w), np.int32)
  label[0, 8:20, 10:30] = 1
  label[1, 4:12, 30:44] = 1
  return image, normal, jnp.asarray(label)


def small_config(method='clfc', **model):
  return make_config(method, width=1 / 16, **model)


@pytest.fixture(scope='module')
def clfc_variables():
  """Initialised once; the other variants' variables are subsets of these."""
  config = small_config('clfc')
  return init_variables(build_segmenter(config), jax.random.key(1), config, 2, SMALL_HW)


BACKBONE = ('backbone_encoder', 'backbone_decoder', 'head')


def variant_variables(method, clfc_variables):
  """The variant's variables cut from the clfc model's (unet: its own last upsampling)."""
  def keep(tree, names):
    return {k: v for k, v in tree.items() if k in names}
  params, stats = clfc_variables['params'], clfc_variables['batch_stats']
  if method == 'clfc':
    return clfc_variables
  if method == 'baseline2':
    names = [k for k in params if not k.startswith('simsiam')]
    return {'params': keep(params, names), 'batch_stats': keep(stats, names)}
  variables = {'params': keep(params, BACKBONE), 'batch_stats': keep(stats, BACKBONE)}
  if method == 'unet':
    decoder = dict(variables['params']['backbone_decoder'])
    decoder['up3'] = {'kernel': 0.1 * jax.random.normal(jax.random.key(2), (4, 4, 12, 4)),
                      'bias': decoder['up3']['bias']}
    variables['params'] = {**variables['params'], 'backbone_decoder': decoder}
  return variables


@pytest.mark.parametrize('method', ['clfc', 'baseline1', 'baseline2', 'unet'])
def test_variants_small(small_batch, clfc_variables, method):
  image, normal, label = small_batch
  config = small_config(method)
  model = build_segmenter(config)
  variables = variant_variables(method, clfc_variables)
  # The variant's own initialisation has exactly this structure (unet: e1 skip, 8 + 4 inputs).
  expected = jax.eval_shape(lambda r: init_variables(model, r, config, 2, SMALL_HW),
                            jax.random.key(0))
  assert jax.tree.map(jnp.shape, expected) == jax.tree.map(jnp.shape, variables)
  use_normal = method in ('clfc', 'baseline2')
  normal_in = normal if use_normal else None

  def train_and_infer(v):
    train = model.apply(v, image, normal_in, label=label, train=True, mutable=['batch_stats'])
    return train, model.apply(v, image, normal_in, train=False)

  (outputs, new_vars), inference = run_compiled(train_and_infer, variables)
  assert outputs['logits'].shape == inference['logits'].shape == (2, *SMALL_HW, 2)
  assert len(outputs['levels']) == (4 if use_normal else 0)
  assert ('simsiam' in outputs) == (method == 'clfc')
  assert 'simsiam' not in inference
  assert jax.tree.map(jnp.shape, new_vars) == jax.tree.map(
      jnp.shape, {'batch_stats': variables['batch_stats']})
  assert np.all(np.isfinite(outputs['logits'])) and np.all(np.isfinite(inference['logits']))
  for level, lv in enumerate(outputs['levels']):
    h, w = SMALL_HW[0] // 2 ** (3 - level), SMALL_HW[1] // 2 ** (3 - level)
    assert lv['zeta'].shape == lv['g'].shape == (2, h, w, 32 // 2 ** (level + 1))
    assert lv['attention'].shape == (2, h, w, 1)
    a = np.asarray(lv['attention'])
    assert a.min() > 0.0 and a.max() < 1.0
  if method == 'clfc':
    masks = [np.asarray(s['mask']) for s in outputs['simsiam']]
    assert [m.size for m in masks] == [2 * 4 * 6, 2 * 8 * 12, 2 * 16 * 24, 2 * 32 * 48]
    # Ω_NR at full resolution is exactly "label == 0".
    np.testing.assert_array_equal(masks[-1], np.asarray(label).reshape(-1) == 0)
    assert 0 < masks[0].sum() < masks[0].size


def test_bad_inputs_are_named(small_batch, clfc_variables):
  image, normal, _ = small_batch
  model = build_segmenter(small_config('clfc'))
  with pytest.raises(ValueError, match='normal must be'):
    model.apply(clfc_variables, image, None, train=False)
  with pytest.raises(ValueError, match='image must be'):
    model.apply(clfc_variables, image[..., :3], normal, train=False)
  with pytest.raises(ValueError, match='needs label'):
    model.apply(clfc_variables, image, normal, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match='use_normal_net'):
    config = small_config('baseline1')
    config.clfc.enabled = True
    build_segmenter(config)


def sim_loss_grads(config, variables, batch):
  model = build_segmenter(config)
  image, normal, label = batch

  def sim_loss(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                             image, normal, label=label, train=True, mutable=['batch_stats'])
    return sum(losses.simsiam_level_loss(s, config.loss.sim_mask_mode)
               for s in outputs['simsiam'])

  return run_compiled(jax.grad(sim_loss), variables['params'])


def nonzero_leaves(tree):
  return [bool(np.any(np.asarray(x))) for x in jax.tree.leaves(tree)]


def test_stop_gradient_keeps_sim_loss_out_of_the_backbone(small_batch, clfc_variables):
  config = small_config('clfc')
  assert config.clfc.stop_grad_before_zeta
  grads = sim_loss_grads(config, clfc_variables, small_batch)
  assert not any(nonzero_leaves(grads['backbone_encoder']))    # exactly zero
  assert not any(nonzero_leaves(grads['backbone_decoder']))
  assert all(nonzero_leaves(grads['normal_encoder']))          # the normal net learns from it
  assert all(nonzero_leaves(grads['clfc3']['zeta']))

  config.clfc.stop_grad_before_zeta = False                    # the authors' code
  grads = sim_loss_grads(config, clfc_variables, small_batch)
  assert all(nonzero_leaves(grads['backbone_encoder']))


def test_bfloat16_activations(small_batch, clfc_variables):
  image, normal, label = small_batch
  config = small_config('clfc', dtype='bfloat16')
  model = build_segmenter(config)

  def loss_of(v):
    outputs, _ = model.apply(v, image, normal, label=label, train=True, mutable=['batch_stats'])
    loss, metrics = losses.segmentation_loss(outputs, label, config)
    return outputs['logits'], outputs['levels'][0]['zeta'], loss, metrics

  logits, zeta, loss, metrics = run_compiled(loss_of, clfc_variables)
  assert logits.dtype == jnp.float32 and zeta.dtype == jnp.bfloat16
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert float(metrics['sim']) != 0.0



@pytest.mark.parametrize('options', [None, {'xla_backend_optimization_level': 0}])
def test_max_pool_matches_flax_values_and_gradients_with_ties(options):
  """The reshape+max pool equals nn.max_pool forward and backward, ties (ReLU zeros, repeated
  values) included: the gradient goes to the first maximum of each window, never split."""
  import flax.linen as nn
  from clfc_jax.models.encdec import max_pool_2x2
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=(2, 8, 12, 3)), 1).astype(np.float32)   # many exact ties
  x[0, :4, :4] = 0.0
  cot = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)

  def ours(v):
    return jnp.sum(max_pool_2x2(v) * cot)

  def flax_pool(v):
    return jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) * cot)

  for f in (ours, flax_pool):
    assert np.isfinite(jax.jit(jax.grad(f)).lower(x).compile(compiler_options=options)(x)).all()
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  g_ours = jax.jit(jax.grad(ours)).lower(x).compile(compiler_options=options)(x)
  g_flax = jax.jit(jax.grad(flax_pool)).lower(x).compile(compiler_options=options)(x)
  np.testing.assert_array_equal(g_ours, g_flax)
  # Exactly one position per window receives the window's cotangent.
  per_window = np.asarray(g_ours).reshape(2, 4, 2, 6, 2, 3)
  np.testing.assert_allclose(per_window.sum(axis=(2, 4)), cot, rtol=1e-6)
  assert ((per_window != 0).sum(axis=(2, 4)) <= 1).all()
