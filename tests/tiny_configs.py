"""Tiny training configs shared by the trainer tests and the two-process worker script."""
from configs import default


def tiny_train_config():
  """baseline1 (the fastest step to compile on CPU) at 32x32, width 0.125, K=1, 2 epochs."""
  c = default.get_config()
  default.apply_method(c, 'baseline1')
  c.model.width = 0.125
  c.prep.crop_hw = (32, 32)
  c.data.k = 1
  c.data.num_folds = 3
  c.data.val_fraction = 0.25
  c.train.batch_size = 4
  c.train.val_batch_size = 8
  c.train.epochs = 2
  c.train.steps_per_epoch = 3
  c.train.log_every_steps = 2
  c.train.rng_impl = 'rbg'
  c.train.cheap_cpu_compile = True
  return c
