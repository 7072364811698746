"""pyproject.toml: the console commands resolve, and the dependencies are requirements.txt."""
import ast
from pathlib import Path
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_console_commands_are_the_entry_points():
  scripts = PYPROJECT['project']['scripts']
  assert set(scripts) == {'clfc-jax', 'clfc-segment'}
  for target in scripts.values():
    # Read, not imported: both entry modules define absl flags of the same names.
    module, _, function = target.partition(':')
    tree = ast.parse((ROOT / (module.replace('.', '/') + '.py')).read_text())
    assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def test_dependencies_come_from_requirements_txt():
  assert PYPROJECT['project']['dynamic'] == ['dependencies']
  files = PYPROJECT['tool']['setuptools']['dynamic']['dependencies']['file']
  assert files == ['requirements.txt'] and (ROOT / files[0]).is_file()


def test_every_package_is_included():
  include = PYPROJECT['tool']['setuptools']['packages']['find']['include']
  packages = {p.parent.name for p in ROOT.glob('*/__init__.py')}
  assert packages == {pattern.rstrip('*') for pattern in include}
