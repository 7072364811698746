"""The main job: `python -m clfc_jax.main --config=configs/brats.py[:method] --workdir=DIR`.

Runs the requested stages in order (`--stages=prep,introvae,...`; default: all). Each stage is
skipped when its output is complete and resumed when it is not; see clfc_jax/stages.py.
"""
# The command line restarts itself with huge-page malloc before anything heavy loads
# (clfc_jax.host_memory: glibc reads its tunables only at process start).
from clfc_jax import host_memory
if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import logging as logging_std
from pathlib import Path
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from clfc_jax import stages
from clfc_jax.workdir import Workdir
from data_prep import store

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:method]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where every stage reads and writes.')
_STAGES = flags.DEFINE_list('stages', list(stages.STAGES),
                            f'Stages to run, in pipeline order: {",".join(stages.STAGES)}.')
flags.mark_flags_as_required(['config', 'workdir'])


def save_config(config, workdir: Path):
  """Writes WORKDIR/config.json; an earlier, different config is kept under configs_history/."""
  wd = Workdir(workdir)
  wd.root.mkdir(parents=True, exist_ok=True)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if wd.config.exists() and wd.config.read_text() != text:
    wd.configs_history.mkdir(exist_ok=True)
    wd.config.rename(wd.configs_history / f'config.{time.strftime("%Y%m%d-%H%M%S")}.json')
  store.write_text(wd.config, text)


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax / TFDS chatter (per-save throughput, dataset construction, deprecations,
  'read out of order' notices) out of the log; their errors still show."""

  _NOISY = ('orbax', 'tensorflow_datasets', 'etils')

  def filter(self, record):
    return record.levelno >= logging_std.ERROR or not any(
        n in record.pathname for n in self._NOISY)


def main(argv):
  quiet = _QuietLibraries()
  for handler in [logging.get_absl_handler()] + logging_std.getLogger().handlers:
    handler.addFilter(quiet)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = Path(_WORKDIR.value).expanduser().resolve()
  unknown = [s for s in _STAGES.value if s not in stages.STAGES]
  if unknown:
    raise app.UsageError(f'unknown stage(s) {unknown}; choose from {stages.STAGES}')
  save_config(config, workdir)
  # Compiled steps are reused across stages, resumed runs and reruns (XLA:CPU compiles of the
  # full model take ~15 s each).
  jax.config.update('jax_compilation_cache_dir', str(Workdir(workdir).jax_cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  logging.info('workdir %s, method %s, stages %s', workdir, config.method, _STAGES.value)
  summary = stages.run(config, workdir, _STAGES.value)
  print(json.dumps(summary, indent=1, default=str))


def cli():
  """The `clfc-jax` console command (pyproject.toml): `python -m clfc_jax.main` by another name."""
  host_memory.reexec_with_huge_page_malloc()
  app.run(main)


if __name__ == '__main__':
  app.run(main)
