"""BraTS2019 with the paper's settings. `--config=configs/brats.py:baseline2` picks an ablation.

Point `--config.dataset.root` at the folder holding HGG/ and LGG/ (the TFDS manual_dir) and
`--config.dataset.normal_root` at the IXI T1 folder.
"""
from configs import default


def get_config(method='clfc'):
  c = default.get_config()
  c.dataset.name = 'brats2019'
  c.dataset.layout = 'brats'
  return default.apply_method(c, method or 'clfc')
