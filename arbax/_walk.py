"""Walking plain values: the children of a container one level down, and the search for values
inside one, with an explicit stack (no recursion, so depth is not limited).

    >>> from arbax import _walk
    >>> _walk.container_children({'b': [1, 2], 'a': 3})
    [('a', 3), ('b', [1, 2])]
    >>> _walk.find_first({'b': [1, 'x'], 'a': 3}, lambda v: v == 'x')
    (('b', 1), 'x')

This is the bottom layer: it knows Python containers and JAX pytree nodes, not
Pytrees or Variables (``arbax.graph.children`` adds those, with the graph and
tree mode rules, on top of ``container_children``).
"""
from __future__ import annotations

import contextlib
import sys
import typing as tp

import jax
import numpy as np

__all__ = ['container_children', 'iter_matching', 'find_first', 'sort_key', 'key_name',
           'PLAIN_LEAVES', 'allow_depth', 'SHALLOW']

# Values that are never containers, checked by type first: most values are one of these.
PLAIN_LEAVES = frozenset({int, float, bool, complex, str, bytes, type(None)})
_OPAQUE = (jax.Array, np.ndarray, np.generic, type)


def sort_key(k):
  """The order of dict keys in pytrees: ints before strings, then by type name and value."""
  return (isinstance(k, str), str(type(k)), k)


def key_name(entry):
  """A JAX key path entry (``DictKey``, ``SequenceKey``, ``GetAttrKey``, ...) as a plain key."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def container_children(x) -> list[tuple[tp.Any, tp.Any]] | None:
  """``[(key, child)]`` of a tuple, list, dict (sorted keys) or other registered JAX node, one
  level down; None for a leaf (arrays, scalars, strings, None, types, callables, and values JAX
  does not know)."""
  t = type(x)
  if t in PLAIN_LEAVES:
    return None
  if t is tuple or t is list:
    return list(enumerate(x))
  if isinstance(x, dict):
    try:
      keys = sorted(x, key=sort_key)
    except TypeError:  # keys of one type that do not order: insertion order
      keys = list(x)
    return [(k, x[k]) for k in keys]
  if isinstance(x, _OPAQUE) or callable(x):
    return None
  kids, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:
    return None
  return [(key_name(kp[0]), c) for kp, c in kids]


def iter_matching(root, match: tp.Callable[[tp.Any], bool],
                  children: tp.Callable[[tp.Any], tp.Any] = container_children
                  ) -> tp.Iterator[tuple[tuple, tp.Any]]:
  """``(path, value)`` of every value under ``root`` that ``match`` accepts, outermost first in
  pytree order; nothing below a matched value is visited, and a container reached twice (shared,
  or a cycle) is visited once."""
  stack: list[tuple[tuple, tp.Any]] = [((), root)]
  seen: set = set()
  while stack:
    path, x = stack.pop()
    if match(x):
      yield path, x
      continue
    kids = children(x)
    if not kids:
      continue
    if id(x) in seen:
      continue
    seen.add(id(x))
    stack.extend([(path + (k,), c) for k, c in reversed(kids)])


def find_first(root, match: tp.Callable[[tp.Any], bool],
               children: tp.Callable[[tp.Any], tp.Any] = container_children
               ) -> tuple[tuple, tp.Any] | None:
  """``(path, value)`` of the first value under ``root`` (``root`` itself included) that
  ``match`` accepts, or None. See ``iter_matching``."""
  return next(iter_matching(root, match, children), None)


SHALLOW = 150  # structures nested up to this depth never need allow_depth


@contextlib.contextmanager
def allow_depth(depth: int, calls_per_level: int = 5):
  """Let the block recurse through ``depth`` levels of a structure (``calls_per_level`` Python
  calls each): raises the recursion limit for the block when it is too low. The recursive
  builders and readers recurse through Python calls only, which in this Python do not use the
  C stack, so a higher limit is safe for them.

      >>> import sys
      >>> with allow_depth(5_000):
      ...   sys.getrecursionlimit() >= 25_000
      True
  """
  needed = calls_per_level * depth + 1000
  limit = sys.getrecursionlimit()
  if needed <= limit:
    yield
    return
  sys.setrecursionlimit(needed)
  try:
    yield
  finally:
    sys.setrecursionlimit(limit)
