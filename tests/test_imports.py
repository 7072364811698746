"""The import graph flows one way (ARCHITECTURE.md): read statically with `ast`, every import
counted, those inside functions too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('clfc_jax', 'data_prep', 'configs', 'benchmarks')
# Modules that may import TensorFlow: the shard writer, which the rest of the project reaches
# only through data_prep.optional (the reader, clfc_jax.input_pipeline, needs no TensorFlow).
TENSORFLOW_MODULES = {'data_prep.tfds_builders'}


def _modules() -> dict:
  found = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob('*.py'):
      parts = path.relative_to(ROOT).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      found[name] = path
  return found


MODULES = _modules()


def _imports(name: str, path: Path):
  """[(imported module, line, inside a function)] of one file, project modules resolved
  (`from pkg import mod` names the module `pkg.mod`)."""
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        up = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(up + ([base] if base else []))
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base
                 for a in node.names]
    else:
      continue
    out += [(t, node.lineno, id(node) in in_function) for t in targets]
  return out


def _project_graph() -> dict:
  graph = {}
  for name, path in MODULES.items():
    graph[name] = {t for t, _, _ in _imports(name, path) if t in MODULES and t != name}
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_walker_sees_every_package():
  assert {'clfc_jax.stages', 'clfc_jax.train.trainer', 'clfc_jax.report.page',
          'data_prep.inputs', 'configs.default', 'benchmarks.run'} <= set(MODULES)
  assert 'clfc_jax.workdir' in _project_graph()['clfc_jax.stages']


def test_no_import_cycle():
  assert _cycle(_project_graph()) is None


def test_the_cycle_finder_finds_one():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_no_project_module_is_imported_inside_a_function():
  inner = [f'{name}:{line} imports {target}' for name, path in MODULES.items()
           for target, line, in_function in _imports(name, path)
           if in_function and target.split('.')[0] in PACKAGES]
  assert not inner, inner


def test_inner_imports_only_in_the_optional_library_dispatcher():
  inner = [f'{name}:{line} imports {target}' for name, path in MODULES.items()
           if name != 'data_prep.optional'
           for target, line, in_function in _imports(name, path) if in_function]
  assert not inner, inner


def test_nothing_but_main_imports_stages():
  graph = _project_graph()
  assert sorted(n for n, deps in graph.items() if 'clfc_jax.stages' in deps) == ['clfc_jax.main']


def test_tensorflow_only_in_the_shard_modules():
  users = sorted(name for name, path in MODULES.items()
                 if any(t.split('.')[0] in ('tensorflow', 'tensorflow_datasets')
                        for t, _, _ in _imports(name, path)))
  assert set(users) <= TENSORFLOW_MODULES, users
  graph = _project_graph()
  importers = sorted(n for n, deps in graph.items() if deps & TENSORFLOW_MODULES)
  assert set(importers) <= TENSORFLOW_MODULES, importers


@pytest.mark.parametrize('leaf', ['clfc_jax.plots', 'clfc_jax.workdir', 'clfc_jax.metrics'])
def test_leaves_import_no_stage_code(leaf):
  deps = {d for d in _project_graph()[leaf] if d.startswith('clfc_jax')}
  assert not deps, deps
