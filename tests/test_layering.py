"""The package's layers, checked from the source: imports point down only.

Each module has a rank; it may import arbax modules of a lower rank only, always at the top of
the file (an import inside a function hides a dependency that points up). The ranks are the
layering of docs/architecture.md: a new module gets one here, next to what it builds on.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'arbax'

LAYERS = [
    # foundations: no arbax imports
    {'errors', '_settings', 'caches', 'reprhook', 'ids', 'traversals', 'cell', 'nodedefs', 'filters',
     '_walk', 'nn.activations', 'nn.pooling', 'transforms.inflight'},
    {'_structure', 'hijax_variable', 'placement'},   # bookkeeping, hijax cells, array placement
    {'variables'},
    {'state', 'abstract_init'},                      # abstract_init: eval_shape's shortcuts
    {'pytree', 'sharding', 'nn.initializers'},
    {'defs'},                                        # what a GraphDef is made of
    {'builders'},                                    # GraphDef -> objects
    {'graph'},                                       # the one traversal
    {'refmaps'},
    {'api'},                                         # the State API
    {'contexts', 'module', 'rngs', 'hijax'},
    {'display', 'extract', 'capture', 'helpers', 'checkpoint', 'training.optimizer',
     'training.ema', 'training.metrics'},
    {'summary', 'transforms._propagate'},            # the transform mechanism
    {'transforms.jit', 'transforms.autodiff', 'transforms.control', 'transforms.iteration',
     'transforms.shard_map', 'transforms.general', 'transforms.metadata'},
    {'nn.dtypes', 'spmd', 'graphlib'},
    {'nn.linear', 'nn.conv', 'nn.embed', 'nn.normalization', 'nn.stochastic', 'compat'},
    {'nn.lora', 'nn.attention', 'nn.recurrent'},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> dict:
  out = {}
  for path in ROOT.rglob('*.py'):
    name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
    if name != '__init__' and not name.endswith('.__init__'):
      out[name] = path
  return out


def arbax_imports(path: pathlib.Path):
  """``(module imported, line, inside a function)`` for every import of an arbax module."""
  tree = ast.parse(path.read_text())
  known = modules()
  nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'arbax':
      base = node.module[len('arbax'):].lstrip('.')
      for alias in node.names:
        full = f'{base}.{alias.name}' if base else alias.name
        name = full if full in known else base
        if name:
          yield name, node.lineno, id(node) in nested
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('arbax.'):
          yield alias.name[len('arbax.'):], node.lineno, id(node) in nested


def test_every_module_has_a_layer():
  missing = sorted(set(modules()) - set(RANK))
  assert not missing, f'give these modules a rank in tests/test_layering.py: {missing}'


@pytest.mark.parametrize('name', sorted(modules()))
def test_imports_point_down_and_sit_at_the_top(name):
  path = modules()[name]
  problems = []
  for imported, line, inside_function in arbax_imports(path):
    if inside_function:
      problems.append(f'line {line}: imports arbax.{imported} inside a function')
    elif imported in RANK and RANK[imported] >= RANK.get(name, len(LAYERS)):
      problems.append(f'line {line}: imports arbax.{imported} (layer {RANK[imported]}) from layer '
                      f'{RANK.get(name)}')
  assert not problems, f'arbax/{path.relative_to(ROOT)}:\n' + '\n'.join(problems)


@pytest.mark.parametrize('name', sorted(modules()))
def test_no_private_name_is_imported_from_another_module(name):
  # A name two modules need gets a public name in the lower one; private modules
  # (``_settings``, ``_propagate``) are fine to import, their private names are not.
  known = modules()
  problems = []
  for node in ast.walk(ast.parse(modules()[name].read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('arbax'):
      base = node.module[len('arbax'):].lstrip('.')
      for alias in node.names:
        full = f'{base}.{alias.name}' if base else alias.name
        if alias.name.startswith('_') and full not in known:
          problems.append(f'line {node.lineno}: from {node.module} import {alias.name}')
  assert not problems, f'arbax/{name}:\n' + '\n'.join(problems)
