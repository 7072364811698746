"""The main job: `python -m clfc_jax.main --config=configs/brats.py[:method] --workdir=DIR`.

Runs the requested stages in order (`--stages=prep,introvae,...`; default: all). Each stage is
skipped when its output is complete and resumed when it is not; see clfc_jax/stages.py.
"""
import json
import logging as logging_std
import time
from pathlib import Path

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clfc_jax import host_memory, stages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:method]).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where every stage reads and writes.')
_STAGES = flags.DEFINE_list('stages', list(stages.STAGES),
                            f'Stages to run, in pipeline order: {",".join(stages.STAGES)}.')
flags.mark_flags_as_required(['config', 'workdir'])


def save_config(config, workdir: Path):
  """Writes WORKDIR/config.json; an earlier, different config is kept under configs_history/."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / 'config.json'
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists() and path.read_text() != text:
    history = workdir / 'configs_history'
    history.mkdir(exist_ok=True)
    path.rename(history / f'config.{time.strftime("%Y%m%d-%H%M%S")}.json')
  path.write_text(text)


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
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', str(workdir / 'cache' / 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  logging.info('workdir %s, method %s, stages %s', workdir, config.method, _STAGES.value)
  summary = stages.run(config, workdir, _STAGES.value)
  print(json.dumps(summary, indent=1, default=str))


if __name__ == '__main__':
  host_memory.reexec_with_huge_page_malloc()   # before JAX starts (see host_memory)
  app.run(main)
