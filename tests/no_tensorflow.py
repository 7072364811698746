"""Python code that makes `import tensorflow` fail in a fresh interpreter, as on an accelerator
machine without TensorFlow (tests run it with `python -c`)."""
import textwrap

# Prepend to a `python -c` program: a meta-path finder that refuses tensorflow and
# tensorflow_datasets, and None in sys.modules so that importlib.util.find_spec answers None
# (etils asks it), then a check that the block holds.
BLOCK_TENSORFLOW = textwrap.dedent('''
  import importlib.abc, sys
  class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
        raise ImportError(f'{name} is blocked in this test')
  sys.meta_path.insert(0, NoTensorFlow())
  sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None
  try:
    import tensorflow
    raise SystemExit('tensorflow imported')
  except ImportError:
    pass
''')

