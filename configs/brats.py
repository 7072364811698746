"""BraTS2019 with the paper's settings. `--config=configs/brats.py:baseline2` picks an ablation.

Point `--config.dataset.root` at the folder holding HGG/ and LGG/ (the TFDS manual_dir) and
`--config.dataset.normal_root` at the IXI T1 folder. The paper's protocol is the default: all
five folds (`--config.fold=3` runs one).
"""
from configs import default


def get_config(method='clfc'):
  c = default.get_config()
  c.dataset.name = 'brats2019'
  c.dataset.layout = 'brats'
  c.fold = -1                # five-fold patient-wise cross validation (paper §3).
  return default.apply_method(c, method or 'clfc')
