"""How objects show themselves: reprs with per-kind counts and bytes, treescope in notebooks.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> print(repr(nnx.Param(jnp.ones((2, 5)))).splitlines()[0])
    Param( # 10 (40 B)
"""
from __future__ import annotations

import sys
import typing as tp

import jax
import numpy as np

from arbax.pytree import Dict, List, Pytree, attributes, node_parts
from arbax.variables import Variable

__all__ = ['display', 'tabulate']

_INDENT = '  '


def _size_and_bytes(x) -> tuple[int, int]:
  """(elements, bytes) of the arrays in ``x``; Python scalars are not counted (as in NNX)."""
  size = 0
  nbytes = 0
  for leaf in jax.tree_util.tree_leaves(x):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      n = int(np.prod(leaf.shape)) if leaf.shape else 1
      size += n
      try:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
          nbytes += int(jax.random.key_data(leaf).nbytes) if not isinstance(leaf, jax.core.Tracer) else 8 * n
        else:
          nbytes += n * np.dtype(leaf.dtype).itemsize
      except Exception:
        pass
  return size, nbytes


def _fmt_bytes(n: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1000 or unit == 'GB':
      return f'{n} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1000
  return f'{n} B'


def kind_name(v: Variable) -> str:
  return getattr(type(v), '_arbax_display_kind', None) or type(v).__name__


def _count_kinds(obj) -> dict[str, list[int]]:
  counts: dict[str, list[int]] = {}
  seen: set = set()

  def visit(x):
    if isinstance(x, (Variable, Pytree)):
      if id(x) in seen:
        return
      seen.add(id(x))
    if isinstance(x, Variable):
      size, nbytes = _size_and_bytes(x._value)
      if not size and not nbytes:  # no arrays (a Python scalar, a tuple of ints): not counted
        return
      entry = counts.setdefault(kind_name(x), [0, 0])
      entry[0] += size
      entry[1] += nbytes
    elif isinstance(x, Pytree):
      keys, _ = node_parts(x)
      for k in keys:
        visit(x.__dict__[k])
    elif isinstance(x, dict):
      for v in x.values():
        visit(v)
    elif isinstance(x, (list, tuple)):
      for v in x:
        visit(v)

  visit(obj)
  return counts


def _summary(obj) -> str:
  counts = _count_kinds(obj)
  if not counts:
    return ''
  parts = [f'{k}: {n:,} ({_fmt_bytes(b)})' for k, (n, b) in counts.items()]
  if len(counts) > 1:
    total_n = sum(n for n, _ in counts.values())
    total_b = sum(b for _, b in counts.values())
    parts.append(f'Total: {total_n:,} ({_fmt_bytes(total_b)})')
  return ' # ' + ', '.join(parts)


def _array_repr(x, full: bool) -> str:
  if isinstance(x, jax.core.Tracer):
    return repr(x)
  size = int(np.prod(x.shape)) if x.shape else 1
  if full or size <= 1:
    return repr(x)
  return f'{type(x).__name__ if isinstance(x, np.ndarray) else "Array"}(shape={x.shape}, dtype={x.dtype!r})'


def _indent_rest(text: str, level: int) -> str:
  return text.replace('\n', '\n' + _INDENT * level)


def _value_repr(x, level: int, full: bool, seen: set) -> str:
  if isinstance(x, (Variable, Pytree)):
    return _object_repr(x, level, full, seen)
  if isinstance(x, (jax.Array, np.ndarray)) and hasattr(x, 'shape'):
    return _indent_rest(_array_repr(x, full), level)
  if isinstance(x, dict) and not full:  # a plain dict attribute: inline, like its repr
    return '{' + ', '.join(f'{k!r}: {_value_repr(v, level, full, seen)}' for k, v in x.items()) + '}'
  if isinstance(x, dict):  # a nested State level
    return _block('{', '}', [f'{k!r}: {_value_repr(v, level + 1, full, seen)}' for k, v in x.items()],
                  level)
  if isinstance(x, (list, tuple)) and any(isinstance(v, (Variable, Pytree, jax.Array)) for v in x):
    inner = ', '.join(_value_repr(v, level, full, seen) for v in x)
    if isinstance(x, list):
      return f'[{inner}]'
    return f'({inner},)' if len(x) == 1 else f'({inner})'
  return _indent_rest(repr(x), level)


def _block(open_: str, close: str, entries: list[str], level: int) -> str:
  """``open_`` + one entry per line, indented one level + ``close`` (``open_ + close`` if empty)."""
  if not entries:
    return open_ + close
  pad = _INDENT * (level + 1)
  return open_ + '\n' + ',\n'.join(pad + e for e in entries) + '\n' + _INDENT * level + close


def _object_repr(obj, level: int, full: bool, seen: set) -> str:
  name = type(obj).__name__
  if id(obj) in seen:  # a Pytree met again (shared or a cycle): shown in full once
    return f'{name}(...)'
  if isinstance(obj, Variable):
    size, nbytes = _size_and_bytes(obj._value)
    header = f'{name}( # {size:,} ({_fmt_bytes(nbytes)})' if size else f'{name}('
    entries = [f'value={_value_repr(obj._value, level + 1, full, seen)}']
    entries += [f'{k}={_indent_rest(repr(v), level + 1)}' for k, v in obj._meta.items.items()
                if k not in ('hijax', 'ref') or v]
    return _block(header, ')', entries, level)
  seen.add(id(obj))
  if isinstance(obj, dict):  # State
    entries = [f'{k!r}: {_value_repr(v, level + 1, full, seen)}' for k, v in obj.items()]
    return _block(f'{name}({{', '})', entries, level)
  if isinstance(obj, List):
    return _block(f'{name}([', '])', [_value_repr(v, level + 1, full, seen) for v in obj], level)
  if isinstance(obj, Dict):
    entries = [f'{k!r}: {_value_repr(v, level + 1, full, seen)}' for k, v in obj.items()]
    return _block(f'{name}({{', '})', entries, level)
  entries = [f'{k}={_value_repr(v, level + 1, full, seen)}' for k, v, _ in attributes(obj)
             if not (isinstance(k, str) and k.startswith('_'))]
  return _block(f'{name}({_summary(obj)}', ')', entries, level)


def object_repr(obj) -> str:
  """The repr of Variables, Pytrees and States.

  Arrays are shown in full at the top (a Variable or a State) and as shape and
  dtype inside a Pytree, as NNX does.
  """
  full = isinstance(obj, (dict, Variable))
  return _object_repr(obj, 0, full, set())


def _in_notebook() -> bool:
  ipython = sys.modules.get('IPython')
  if ipython is None:
    return False
  try:
    shell = ipython.get_ipython()
  except Exception:
    return False
  return shell is not None and 'ZMQ' in type(shell).__name__


def display(*objs) -> None:
  """Show objects: an interactive treescope view in notebooks, the repr elsewhere."""
  for obj in objs:
    if _in_notebook():
      import treescope
      treescope.display(obj)
    else:
      print(repr(obj))


def treescope_repr(obj, path, subtree_renderer):
  import treescope.repr_lib as repr_lib
  if isinstance(obj, Variable):
    fields = {'value': obj._value, **{k: v for k, v in obj._meta.items.items()
                                       if k not in ('hijax', 'ref') or v}}
  elif isinstance(obj, dict):
    fields = dict(obj)
  else:
    fields = {str(k): v for k, v, _ in attributes(obj)}
  return repr_lib.render_object_constructor(
      object_type=type(obj), attributes=fields, path=path,
      subtree_renderer=subtree_renderer, roundtrippable=False)


def tabulate(obj, *args, **kwargs) -> str:
  """A rich table of the Variables of ``obj``: path, kind, shape, dtype, size."""
  from rich.console import Console
  from rich.table import Table
  from arbax.api import variables
  table = Table(title=type(obj).__name__)
  for col in ('path', 'kind', 'shape', 'dtype', 'size'):
    table.add_column(col)
  for path, v in variables(obj).flat_state():
    value = v.get_value()
    size, nbytes = _size_and_bytes(value)
    table.add_row(''.join(f'[{k}]' if isinstance(k, int) else f'.{k}' for k in path), kind_name(v),
                  str(getattr(value, 'shape', '')), str(getattr(value, 'dtype', type(value).__name__)),
                  f'{size} ({_fmt_bytes(nbytes)})')
  console = Console(record=True, width=120)
  with console.capture() as capture:
    console.print(table)
  return capture.get()
