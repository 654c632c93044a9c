"""How objects show themselves: reprs with per-kind counts and bytes, treescope in notebooks.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> print(repr(nnx.Param(jnp.ones((2, 5)))).splitlines()[0])
    Param( # 10 (40 B)

The reprs are NNX's: Python containers inline, classes by name (``dtype=float32``),
arrays in full at the top of a Variable or State and as shape and dtype inside
a layer. Variables, Pytrees and States reach these functions through
``arbax.reprhook``, where this module installs them when imported.
"""
from __future__ import annotations

import sys
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from arbax import graph, reprhook
from arbax.pytree import Dict, List, Pytree, attributes
from arbax.rngs import RngState
from arbax.state import State
from arbax.variables import Variable

__all__ = ['display', 'object_repr', 'treescope_repr', 'size_and_bytes', 'in_notebook']

_INDENT = '  '


def size_and_bytes(x) -> tuple[int, int]:
  """(elements, bytes) of the arrays in ``x``; Python scalars are not counted (as in NNX)."""
  size = 0
  nbytes = 0
  for leaf in jax.tree_util.tree_leaves(x):
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      n = int(np.prod(leaf.shape)) if leaf.shape else 1
      size += n
      try:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
          traced = isinstance(leaf, Tracer)
          nbytes += 8 * n if traced else int(jax.random.key_data(leaf).nbytes)
        else:
          nbytes += n * np.dtype(leaf.dtype).itemsize
      except Exception:
        pass
  return size, nbytes


def _fmt_bytes(n: int) -> str:
  scaled: float = n
  for unit in ('B', 'KB', 'MB', 'GB'):
    if scaled < 1000 or unit == 'GB':
      return f'{n} {unit}' if unit == 'B' else f'{scaled:.1f} {unit}'
    scaled /= 1000
  return f'{n} B'


def kind_name(v: Variable) -> str:
  """The kind a Variable is counted under: its class, RNG state all as ``RngState`` (as in NNX)."""
  return 'RngState' if isinstance(v, RngState) else type(v).__name__


# -- per-kind counts -------------------------------------------------------------
class _Context:
  """One repr call: the Pytrees already shown and the counts of every node (computed once)."""

  __slots__ = ('shown', 'counts')

  def __init__(self):
    self.shown: set[int] = set()
    self.counts: dict[int, dict[str, list[int]]] = {}


def _counts(x, ctx: _Context) -> dict[str, list[int]]:
  """``{kind: [elements, bytes]}`` under the Variable or Pytree ``x``. A Variable or Pytree
  reachable twice is counted at its first place only (depth-first, in pytree order)."""
  memo = ctx.counts.get(id(x))
  if memo is not None:
    return memo
  stack = [_open(x, ctx)]  # frames: (its counts, the objects below it still to count, reversed)
  while True:
    out, pending = stack[-1]
    if pending:
      child = pending.pop()
      if id(child) not in ctx.counts:
        stack.append(_open(child, ctx))
      continue
    stack.pop()
    if not stack:
      return out
    into = stack[-1][0]
    for kind, (n, b) in out.items():
      entry = into.setdefault(kind, [0, 0])
      entry[0] += n
      entry[1] += b


def _is_object(x) -> bool:
  return isinstance(x, (Variable, Pytree))


def _open(x, ctx: _Context) -> tuple[dict, list]:
  """Start counting ``x``: a Variable's own counts, or the objects a Pytree holds (through
  containers) to count next."""
  out: dict[str, list[int]] = {}
  ctx.counts[id(x)] = out
  if isinstance(x, Variable):
    size, nbytes = size_and_bytes(x._value)
    if size or nbytes:  # no arrays (a Python scalar, a tuple of ints): not counted
      out[kind_name(x)] = [size, nbytes]
    return out, []
  below = [obj for _, value in graph.children(x, statics=False) or ()
           for _, obj in graph.iter_matching(value, _is_object)]
  return out, below[::-1]


def _summary(counts: dict[str, list[int]]) -> str:
  if not counts:
    return ''
  parts = [f'{k}: {n:,} ({_fmt_bytes(b)})' for k, (n, b) in counts.items()]
  if len(counts) > 1:
    total_n = sum(n for n, _ in counts.values())
    total_b = sum(b for _, b in counts.values())
    parts.append(f'Total: {total_n:,} ({_fmt_bytes(total_b)})')
  return ' # ' + ', '.join(parts)


# -- text reprs ------------------------------------------------------------------
def _array_repr(x, short: bool) -> str:
  size = int(np.prod(x.shape)) if x.shape else 1
  if short and size > 1:
    return f'Array(shape={x.shape}, dtype={x.dtype!r})'
  return repr(x)


def _indent(text: str) -> str:
  """Indent the continuation lines of a rendered value placed one level deeper."""
  return text.replace('\n', '\n' + _INDENT)


def _block(open_: str, close: str, entries: list[str]) -> str:
  """``open_`` + one entry per line, indented one level + ``close`` (``open_ + close`` if empty)."""
  if not entries:
    return open_ + close
  return open_ + '\n' + ',\n'.join(_INDENT + _indent(e) for e in entries) + '\n' + close


def _value(x, short: bool, ctx: _Context) -> str:
  """How a value is shown: Python containers inline, classes by name; inside a layer
  (``short``) arrays of more than one element as shape and dtype."""
  if isinstance(x, Variable):
    return _variable(x, short, ctx)
  if isinstance(x, State):
    return _state(x, short, ctx)
  if isinstance(x, Pytree):
    return _pytree(x, ctx)
  if isinstance(x, (jax.Array, np.ndarray)):
    return _array_repr(x, short)
  if isinstance(x, type):
    return x.__name__
  if type(x) is list:
    return '[' + ', '.join(_value(v, short, ctx) for v in x) + ']'
  if type(x) is tuple:
    inner = ', '.join(_value(v, short, ctx) for v in x)
    return f'({inner},)' if len(x) == 1 else f'({inner})'
  if type(x) is dict:
    return '{' + ', '.join(f'{k!r}: {_value(v, short, ctx)}' for k, v in x.items()) + '}'
  return repr(x)


def _shown_metadata(v: Variable) -> list[tuple[str, tp.Any]]:
  """The metadata worth showing: the switches only when they are not in their usual state
  (``hijax``/``ref`` when on, ``eager_sharding`` when off), as NNX prints them."""
  usual = {'hijax': False, 'ref': False, 'eager_sharding': True}
  return [(k, x) for k, x in v._meta.items.items() if k not in usual or x != usual[k]]


def _variable(v: Variable, short: bool, ctx: _Context) -> str:
  size, nbytes = size_and_bytes(v._value)
  name = type(v).__name__
  header = f'{name}( # {size:,} ({_fmt_bytes(nbytes)})' if size else f'{name}('
  entries = [f'value={_value(v._value, short, ctx)}']
  entries += [f'{k}={_value(x, short, ctx)}' for k, x in _shown_metadata(v)]
  return _block(header, ')', entries)


def _state(s, short: bool, ctx: _Context) -> str:
  def level(m, open_, close):
    return _block(open_, close, [
        f'{k!r}: ' + (level(v, '{', '}') if isinstance(v, dict) else _value(v, short, ctx))
        for k, v in m.items()])
  return level(s, f'{type(s).__name__}({{', '})')


def _pytree(obj: Pytree, ctx: _Context) -> str:
  name = type(obj).__name__
  if id(obj) in ctx.shown:  # met again (shared or a cycle): shown in full once
    return f'{name}(...)'
  ctx.shown.add(id(obj))
  # As in NNX, nnx.List / nnx.Dict show their items' arrays in full; layers abbreviate them.
  if isinstance(obj, List):
    return _block(f'{name}([', '])', [_value(v, False, ctx) for v in obj])
  if isinstance(obj, Dict):
    return _block(f'{name}({{', '})', [f'{k!r}: {_value(v, False, ctx)}' for k, v in obj.items()])
  header = f'{name}({_summary(_counts(obj, ctx))}'  # first: counts the whole subtree once
  return _block(header, ')', [f'{k}={_value(v, True, ctx)}' for k, v in shown_attributes(obj)])


def shown_attributes(obj: Pytree) -> list[tuple[tp.Any, tp.Any]]:
  """``(name, value)`` of the attributes a repr shows: private names only when they are data."""
  return [(k, v) for k, v, is_data in attributes(obj)
          if is_data or not (isinstance(k, str) and k.startswith('_'))]


def object_repr(obj) -> str:
  """The repr of a Variable, Pytree or State, as NNX prints it.

  Arrays are shown in full at the top (a Variable or a State) and as shape and
  dtype inside a layer; a layer's first line counts its Variables per kind.
  """
  return _value(obj, False, _Context())


# -- notebooks -------------------------------------------------------------------
def in_notebook() -> bool:
  """Whether this runs in a Jupyter kernel (where rich output and treescope render)."""
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
    if in_notebook():
      import treescope
      treescope.display(obj)
    else:
      print(repr(obj))


def treescope_repr(obj, path, subtree_renderer):
  """The treescope rendering of a Variable, Pytree or State: a constructor-like view with the
  fields the repr shows; each layer class gets a color of its own."""
  import treescope.formatting_util as formatting_util
  import treescope.repr_lib as repr_lib
  color = None
  if isinstance(obj, Variable):
    fields = {'value': obj._value, **dict(_shown_metadata(obj))}
  elif isinstance(obj, dict):
    fields = dict(obj)
  else:
    fields = {str(k): v for k, v in shown_attributes(obj)}
    if not isinstance(obj, (List, Dict)):
      color = formatting_util.color_from_string(type(obj).__qualname__)
  return repr_lib.render_object_constructor(
      object_type=type(obj), attributes=fields, path=path,
      subtree_renderer=subtree_renderer, roundtrippable=False, color=color)


reprhook.install(object_repr, treescope_repr)
