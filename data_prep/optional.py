"""Heavy or optional libraries, imported on first use: the one place that imports lazily.

TensorFlow is absent on accelerator machines (and slow to import), so the TFDS shard writer
that stands on it loads only when a stage writes shards (the reader, clfc_jax.input_pipeline,
needs no TensorFlow and is imported normally); nilearn (seconds to import) only when the
MNI152 templates are read; scikit-learn and markdown-it only when the report draws its PCA or
its page. A missing one gives an ImportError that says what needs it.
It sits in data_prep, the top row of the import graph, so every module can use it.
"""
import functools
import importlib

_NEEDED_FOR = {
    'data_prep.tfds_builders': 'writing the TFDS shards (prep and pseudo_normal stages)',
    'nilearn.datasets': 'the MNI152 templates (registration, synthetic cohorts)',
    'sklearn.decomposition': "the report's feature PCA",
    'markdown_it': "the report's HTML page",
}


@functools.cache
def load(module: str):
  """`importlib.import_module(module)`, with an error that says what it is needed for."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f'{module} could not be imported ({e}); it is needed for '
                      f'{_NEEDED_FOR.get(module, "this step")}: pip install -r requirements.txt'
                      ) from e


def tfds_builders():
  """data_prep.tfds_builders: the TFDS builders (TensorFlow)."""
  return load('data_prep.tfds_builders')


def nilearn_datasets():
  """nilearn.datasets, which ships the MNI152 2009 templates in its wheel."""
  return load('nilearn.datasets')


def pca(**kwargs):
  """A scikit-learn PCA."""
  return load('sklearn.decomposition').PCA(**kwargs)


def markdown_it():
  """A markdown-it-py parser class."""
  return load('markdown_it').MarkdownIt
