"""The report's figure functions on small hand-made arrays and NIfTI files."""
import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from clfc_jax import plots, run_log
from clfc_jax.report import gather


def _png(path):
  """The saved image as an [H, W, C] float array; fails on an unreadable or blank file."""
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 0.05   # not a blank canvas
  return image


def _disc(shape, centre, radius):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_radiological_puts_anterior_up_and_the_right_on_the_left():
  s = np.zeros((6, 5))
  s[5, 4] = 1          # most anterior (H last), most rightward (W last: left -> right)
  shown = plots.radiological(s)
  assert shown[0, 0] == 1 and shown.sum() == 1


def test_native_row_shows_an_lps_file_in_radiological_view(tmp_path):
  """A BraTS-like file stored L-P-S: a lesion in the right anterior brain lands top left."""
  shape = (40, 48, 10)
  affine = np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 48], [0, 0, 2.0, 0], [0, 0, 0, 1]])
  ras = np.zeros(shape, np.float32)   # built in RAS+ voxel order, then stored as LPS
  ras[4:36, 4:44, :] = 100.0
  ras[28:34, 34:42, 3:7] = 300.0      # high x = right, high y = anterior
  label_ras = (ras == 300.0).astype(np.uint8)
  label_ras[28:34, 34:42, 5] = 1
  label_ras[26:36, 32:44, 5] = 1      # largest cross-section on slice z = 5
  lps = lambda a: a[::-1, ::-1, :]
  ras_affine = np.array([[2.0, 0, 0, -38], [0, 2.0, 0, -46], [0, 0, 2.0, 0], [0, 0, 0, 1]])
  assert np.allclose(affine @ np.r_[39, 47, 0, 1], ras_affine @ np.r_[0, 0, 0, 1])
  for name, data in (('flair', ras), ('seg', label_ras)):
    nib.save(nib.Nifti1Image(lps(data), affine), tmp_path / f'{name}.nii.gz')
  pred = lps(label_ras).copy()
  pred[..., 5] = 0                    # this method misses the whole slice
  nib.save(nib.Nifti1Image(pred, affine), tmp_path / 'pred.nii.gz')
  meta = {'files': {'t1': str(tmp_path / 'flair.nii.gz'), 'flair': str(tmp_path / 'flair.nii.gz')},
          'label_file': str(tmp_path / 'seg.nii.gz')}
  row = gather.native_axial_row(meta, {'clfc': tmp_path / 'pred.nii.gz', 'baseline1': None},
                                 {'clfc': 0.5}, 'P1', 'brats2021')
  assert 'axial slice 5' in row['title']
  truth = row['truth']
  rows, cols = np.nonzero(truth)
  # Display: anterior up (small row index), the patient's right on the viewer's left.
  assert rows.mean() < truth.shape[0] / 2 and cols.mean() < truth.shape[1] / 2
  assert truth.sum() == 10 * 12 and row['image'].shape == truth.shape
  lesion = row['image'] == 300.0      # image and label share one display geometry
  assert lesion.any() and np.all(truth[lesion])
  assert not row['predictions']['clfc'].any() and row['predictions']['baseline1'] is None
  fig = plots.plot_segmentation_overlays([row, row], ['clfc', 'baseline1'],
                                           tmp_path / 'fig2.png')
  assert len(plots.panels(fig)) == 2 * 3
  _png(tmp_path / 'fig2.png')
  # BraTS 2024 post-treatment: the resection cavity (4) is a label but not tumour.
  cavity = label_ras.copy()
  cavity[4:10, 4:10, 5] = 4
  nib.save(nib.Nifti1Image(lps(cavity), affine), tmp_path / 'seg.nii.gz')
  row = gather.native_axial_row(meta, {}, {}, 'P1', 'brats2024_post')
  assert row['truth'].sum() == 10 * 12


def test_zoom_box_holds_the_tumor_and_a_minimum_field_of_view():
  mask = np.zeros((100, 80), bool)
  mask[10:14, 70:74] = True
  rows, cols = plots.zoom_box(mask, mask.shape, min_fraction=0.5)
  assert rows.stop - rows.start == 50 and cols.stop - cols.start == 40
  assert mask[rows, cols].sum() == mask.sum()
  assert plots.zoom_box(np.zeros((5, 5), bool), (5, 5)) == (slice(None), slice(None))


def test_pick_patients_best_median_worst_and_tumor_slices():
  results = {'patient': ['a', 'b', 'c', 'd', 'e'], 'fold': [0, 1, 0, 1, 0],
             'dice': [0.7, 0.9, 0.8, 0.6, 0.8]}
  # Ranked b, c, e (tie with c: by id), a, d.
  assert gather.pick_patients(results, 3) == [('b', 1), ('e', 0), ('d', 1)]
  assert gather.pick_patients(results, 1) == [('b', 1)]
  label = np.zeros((20, 8, 8), np.uint8)
  label[6:15, 2:4, 2:4] = 1
  label[9, :, :] = 2                  # the largest cross-section
  picked = plots.tumor_slices(label, 4)
  assert picked[0] == 9 and len(picked) == 4 and all(6 <= s < 15 for s in picked)
  assert plots.tumor_slices(np.zeros((7, 3, 3)), 4) == [3]


def test_feature_groups_split_regions_at_the_level_resolution():
  rng = np.random.default_rng(0)
  zeta = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  label = np.zeros((2, 16, 16), np.uint8)
  label[0, :8, :8] = 1                # 2x2 level pixels of slice 0 (stride 4)
  brain = np.ones((2, 16, 16), bool)
  brain[1] = False                    # slice 1: no brain, no normal vectors
  groups = plots.feature_groups(zeta, zeta, label, brain, max_points=100)
  assert len(groups['tumor_zeta']) == 4 and len(groups['normal_zeta']) == 12
  assert groups['cos_normal'] == pytest.approx(1.0) and groups['cos_tumor'] == pytest.approx(1.0)
  opposite = plots.feature_groups(zeta, -zeta, label, brain, max_points=5)
  assert opposite['cos_normal'] == pytest.approx(-1.0) and len(opposite['normal_g']) == 5


def test_pca_and_the_feature_scatter(tmp_path):
  rng = np.random.default_rng(1)
  direction = np.array([3.0, 4.0, 0.0, 0.0]) / 5
  points = rng.normal(size=(300, 1)) * 10 * direction + rng.normal(size=(300, 4)) * 0.1
  projected, ratio = plots.pca_2d(points)
  assert projected.shape == (300, 2) and ratio[0] > 0.99
  assert abs(np.corrcoef(projected[:, 0], points @ direction)[0, 1]) > 0.999
  groups = {k: rng.normal(size=(50, 8)) + i for i, (k, *_) in enumerate(plots.FEATURE_GROUPS)}
  fig = plots.plot_feature_pca({'clfc': dict(groups, cos_normal=0.5, cos_tumor=0.1),
                                  'baseline2': groups}, tmp_path / 'fig3.png', 'level 1/4')
  assert len(plots.panels(fig)) == 2
  assert 'cos' in plots.panels(fig)[0].get_title()
  _png(tmp_path / 'fig3.png')


def test_attention_and_pseudo_normal_figures(tmp_path):
  rng = np.random.default_rng(2)
  image = rng.random((24, 20))
  truth = _disc((24, 20), (10, 8), 4)
  rows = [{'method': m, 'image': image, 'truth': truth, 'prob': truth * 0.9,
           'attention': [rng.random((24 // 2 ** (3 - l), 20 // 2 ** (3 - l))) for l in range(4)]}
          for m in ('clfc', 'baseline2')]
  brain = np.ones((24, 20), bool)
  att = np.where(truth, 0.9, 0.2)[::2, ::2]    # a 1/2-resolution map that marks the tumor
  assert plots.region_means(att, truth, brain) == pytest.approx((0.9, 0.2))
  rows[0]['means'] = [plots.region_means(a, truth, brain) for a in rows[0]['attention']]
  fig = plots.plot_attention_maps(rows, tmp_path / 'fig4.png', 'case, slice 3')
  assert plots.panels(fig)[1].get_xlabel().startswith('mean: tumor ')
  assert len(plots.panels(fig)) == 2 * (4 + 2)
  assert any(ax.get_label() == '<colorbar>' for ax in fig.axes)
  _png(tmp_path / 'fig4.png')
  unit = 2 * image - 1
  pn_rows = [{'title': 'with', 'tumor_t1': unit, 'pseudo': unit * 0.5, 'healthy': unit * 0.6,
              'truth': truth},
             {'title': 'without', 'tumor_t1': unit, 'pseudo': unit * 0.5, 'healthy': None,
              'truth': truth}]
  fig = plots.plot_pseudo_normals(pn_rows, tmp_path / 'pn.png')
  # 5 columns; the row without a healthy T1 leaves its two panels blank.
  assert len(plots.panels(fig)) == 5 + 3
  _png(tmp_path / 'pn.png')
  fig = plots.plot_pseudo_normals(pn_rows[1:], tmp_path / 'pn_only.png')
  assert len(plots.panels(fig)) == 3


def test_training_curves_from_jsonl_logs(tmp_path):
  def log(path, sim, dice):
    lines = [{'event': 'start', 'step': 0}]
    for epoch in (1, 2, 3):
      lines.append({'event': 'train', 'step': 10 * epoch - 5, 'epoch': epoch, 'loss': 1.0 / epoch,
                    'dice_loss': 0.5 / epoch, 'sim': sim})
      lines.append({'event': 'val', 'step': 10 * epoch, 'epoch': epoch, 'val_dice': dice[epoch - 1]})
    path.write_text('\n'.join(json.dumps(x) for x in lines) + '\n{"event": "tr')   # torn line
    return path
  clfc = run_log.read_events(log(tmp_path / 'a.jsonl', -0.5, [0.2, 0.6, 0.5]))
  base = run_log.read_events(log(tmp_path / 'b.jsonl', 0.0, [0.3, 0.4, 0.7]))
  assert len(clfc) == 7
  xs, ys = plots._series(clfc, 'val', 'val_dice', plots._epoch_axis(clfc)[0])
  np.testing.assert_allclose(xs, [1, 2, 3])
  assert plots._series(base, 'train', 'sim', None)[0].size == 0   # switched off: not drawn
  fig = plots.plot_training_curves({('clfc', 0): clfc, ('baseline2', 0): base},
                                     tmp_path / 'curves.png')
  # total loss, Dice loss, L_sim, validation Dice (no cross-entropy logged).
  shown = plots.panels(fig)
  assert [ax.get_title() for ax in shown] == ['total loss', 'Dice loss', 'L_sim (Σ levels)',
                                              'validation Dice (patient mean)']
  assert len(shown[2].get_lines()) == 1                 # baseline2's zero L_sim left out
  assert shown[0].get_xlabel() == 'epoch'
  _png(tmp_path / 'curves.png')
  iv = [{'event': 'train', 'step': s, 'epoch': 1 + s // 10, 'enc/loss': 10.0 / s,
         'dec/loss': 5.0 / s, 'enc/mse': 1.0 / s, 'enc/kl_real': 50.0, 'enc/kl_rec': 60.0,
         'enc/kl_fake': 70.0} for s in range(1, 30)]
  fig = plots.plot_introvae_curves(iv, tmp_path / 'iv.png', margin=120.0)
  assert len(plots.panels(fig)) == 3
  _png(tmp_path / 'iv.png')
