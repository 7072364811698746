"""The inpainting pseudo-normal (clfc_jax/inpaint.py, introvae.inference='inpaint')."""
import jax
import numpy as np
from scipy import ndimage as ndi

from clfc_jax import inpaint
from clfc_jax import predict
from clfc_jax import sharding
from clfc_jax.train import introvae_steps
from configs import default

SHAPE = (16, 40, 40)


def _phantom(seed=0):
  """(healthy, lesioned, expected, brain, lesion): a 'white matter' slab with a one-voxel
  'cortical ribbon' that the blurred expectation misses, and a dark 7-voxel blob (the lesion)."""
  rng = np.random.default_rng(seed)
  zz, yy, xx = np.indices(SHAPE)
  brain = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 17 ** 2) & (zz > 0) & (zz < 15)
  healthy = np.where(brain, 0.6 + 0.1 * np.sin(yy / 5.0), -1.0)
  ribbon = brain & (np.abs(np.hypot(yy - 20, xx - 20) - 14) < 0.5)
  healthy = np.where(ribbon, 0.1, healthy)
  expected = np.where(brain, ndi.gaussian_filter(np.where(ribbon, 0.6, healthy), 2), -1.0)
  healthy = healthy + np.where(brain, 0.01 * rng.standard_normal(SHAPE), 0.0)
  lesion = (zz - 8) ** 2 + (yy - 18) ** 2 + (xx - 22) ** 2 <= 3.5 ** 2
  lesioned = np.where(lesion, -0.2, healthy)
  f32 = lambda a: np.asarray(a, np.float32)
  return f32(healthy), f32(lesioned), f32(expected), brain, lesion


def _iv(**kw):
  iv = default.get_config().introvae
  iv.update(kw)
  return iv


def test_mask_finds_the_blob_not_the_thin_ribbon():
  healthy, lesioned, expected, brain, lesion = _phantom()
  mask = inpaint.anomaly_mask(lesioned, expected, brain, threshold=0.2, polarity=-1,
                              smooth_vox=1.0, opening_vox=2, dilation_vox=1)
  assert mask[lesion].mean() > 0.95          # the lesion is found ...
  ribbon_far = brain & ~ndi.binary_dilation(lesion, iterations=4) & (lesioned < 0.3)
  assert ribbon_far.sum() > 100 and not mask[ribbon_far].any()   # ... the ribbon is not
  # Without the opening the ribbon (darker than the blur too) is taken for a lesion.
  unopened = inpaint.anomaly_mask(lesioned, expected, brain, threshold=0.2, polarity=-1,
                                  smooth_vox=0.0, opening_vox=0, dilation_vox=0)
  assert unopened[ribbon_far].mean() > 0.5
  # Polarity: a bright blob is not a T1 lesion, but +1 and 0 find it.
  bright = np.where(lesion, 1.0, healthy).astype(np.float32)
  kw = dict(threshold=0.2, smooth_vox=1.0, opening_vox=2, dilation_vox=0)
  assert not inpaint.anomaly_mask(bright, expected, brain, polarity=-1, **kw)[lesion].any()
  assert inpaint.anomaly_mask(bright, expected, brain, polarity=1, **kw)[lesion].mean() > 0.9
  assert inpaint.anomaly_mask(bright, expected, brain, polarity=0, **kw)[lesion].mean() > 0.9


def test_inpaint_keeps_healthy_tissue_and_fills_the_lesion_from_around_it():
  healthy, lesioned, expected, brain, lesion = _phantom()
  iv = _iv(inpaint_threshold=0.2, inpaint_polarity=-1, inpaint_smooth_mm=2.0,
           inpaint_opening_mm=4.0, inpaint_dilation_mm=2.0, inpaint_fill_mm=3.0)
  out = inpaint.inpaint(lesioned, expected, brain, iv, spacing_mm=2.0)
  assert out.dtype == np.float32 and out.shape == SHAPE
  assert np.all(out[~brain] == -1.0)
  mask = inpaint.anomaly_mask(lesioned, expected, brain, threshold=0.2, polarity=-1,
                              smooth_vox=1.0, opening_vox=2, dilation_vox=1)
  np.testing.assert_array_equal(out[brain & ~mask], lesioned[brain & ~mask])   # bit for bit
  err_in = np.abs(lesioned - healthy)[lesion].mean()
  err_out = np.abs(out - healthy)[lesion].mean()
  assert err_in > 0.7 and err_out < 0.1 * err_in   # the lesion is back near its healthy value


def test_fill_reaches_the_centre_of_a_hole_far_wider_than_sigma():
  zz, yy, xx = np.indices(SHAPE)
  unit = (0.3 + 0.01 * xx).astype(np.float32)
  hole = (yy - 20) ** 2 + (xx - 20) ** 2 <= 12 ** 2
  keep = np.ones(SHAPE, bool)
  out = inpaint.fill_from_surroundings(np.where(hole, -1.0, unit), keep, hole, sigma_vox=1.0)
  assert np.all(out[hole] > 0.2)                     # nothing left at the hole's -1
  np.testing.assert_allclose(out[hole], unit[hole], atol=0.08)
  np.testing.assert_array_equal(out[~hole], unit[~hole])


def test_reconstruct_volume_inpaints_against_dec_mu():
  """'inpaint' is the input where it agrees with Dec(μ) and the fill of Dec(μ)'s anomaly mask
  elsewhere: the composition of the reconstruct mode and inpaint.inpaint."""
  config = default.get_config()
  config.introvae.channels = (4, 8)
  config.introvae.latent_dim = 8
  config.introvae.recon_batch_size = 8
  config.prep.spacing = 2.0
  _, lesioned, _, brain, _ = _phantom()
  state = introvae_steps.create_state(config, jax.random.PRNGKey(0), SHAPE[1:])
  mesh = sharding.make_mesh()
  params = jax.device_put({'enc': state.enc_params, 'dec': state.dec_params},
                          sharding.replicated(mesh))
  dec_mu = predict.reconstruct_volume(config, params, lesioned, brain, mesh)
  # An untrained decoder's output is arbitrary: a threshold at the median residual makes a
  # mask of part of the brain.
  tau = float(np.median(ndi.gaussian_filter(lesioned - dec_mu, (0, 1, 1))[brain]))
  config.introvae.inference = 'inpaint'
  config.introvae.inpaint_threshold = tau
  config.introvae.inpaint_polarity = 1
  out = predict.reconstruct_volume(config, params, lesioned, brain, mesh)
  want = inpaint.inpaint(lesioned, dec_mu, brain, config.introvae, 2.0)
  np.testing.assert_array_equal(out, want)
  mask = inpaint.anomaly_mask(lesioned, dec_mu, brain, threshold=tau, polarity=1,
                              smooth_vox=1.0, opening_vox=2, dilation_vox=1)
  assert 0 < mask.sum() < brain.sum()      # a real mask: some of the brain, not all of it
  np.testing.assert_array_equal(out[brain & ~mask], lesioned[brain & ~mask])
