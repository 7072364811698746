"""MSD Task01_BrainTumour (4-D images FLAIR, T1w, T1gd, T2w; labels 1/2/3)."""
from configs import default


def get_config(method='clfc'):
  c = default.get_config()
  c.dataset.name = 'msd_task01'
  c.dataset.layout = 'msd'
  c.dataset.label_name = 'label'
  c.dataset.allowed_labels = (0, 1, 2, 3)
  c.task.label_convention = 'msd'   # 1 edema, 2 non-enhancing, 3 enhancing.
  return default.apply_method(c, method or 'clfc')
