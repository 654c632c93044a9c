"""Flatten nested mappings to ``{path: leaf}`` and back (``nnx.traversals``).

    >>> from arbax import traversals
    >>> flat = traversals.flatten_mapping({'a': 1, 'b': {'c': 2, 'd': {}}})
    >>> flat
    {('a',): 1, ('b', 'c'): 2}
    >>> traversals.unflatten_mapping(flat)
    {'a': 1, 'b': {'c': 2}}

Empty sub-mappings vanish unless ``keep_empty_nodes=True``, which keeps them
as ``empty_node`` so ``unflatten_mapping`` can restore them.
"""
from __future__ import annotations

import typing as tp
from collections.abc import Iterable, Mapping

import jax

__all__ = ['empty_node', 'EmptyNode', 'flatten_mapping', 'flatten_to_sequence',
           'unflatten_mapping']

IsLeaf = tp.Callable[[tuple, tp.Any], bool]


class EmptyNode:
  """Stands for an empty mapping in a flattened one; a JAX pytree with no leaves."""

  __slots__ = ()

  def __repr__(self):
    return 'empty_node'

  def __eq__(self, other):
    return isinstance(other, EmptyNode)

  def __hash__(self):
    return hash(EmptyNode)


jax.tree_util.register_pytree_node(EmptyNode, lambda _: ((), None), lambda _, __: empty_node)
empty_node = EmptyNode()


def _check_mapping(xs) -> None:
  if not isinstance(xs, Mapping):
    raise TypeError(f'expected a Mapping, got {type(xs).__qualname__}')


def flatten_to_sequence(xs: Mapping, /, *, is_leaf: IsLeaf | None = None) -> list[tuple[tuple, tp.Any]]:
  """``[(path, leaf)]`` of a nested mapping, in its iteration order; empty mappings are dropped.

  Args:
    xs: the nested mapping.
    is_leaf: ``is_leaf(path, sub_mapping)`` returning True keeps that sub-mapping whole.
  Returns:
    The ``(path tuple, leaf)`` pairs.
  """
  _check_mapping(xs)
  out: list[tuple[tuple, tp.Any]] = []

  def walk(x, path):
    if not isinstance(x, Mapping) or (is_leaf is not None and is_leaf(path, x)):
      out.append((path, x))
      return
    for k, v in x.items():
      walk(v, (*path, k))

  walk(xs, ())
  return out


def flatten_mapping(xs: Mapping, /, *, keep_empty_nodes: bool = False,
                    is_leaf: IsLeaf | None = None, sep: str | None = None) -> dict:
  """``{path: leaf}`` of a nested mapping.

  Args:
    xs: the nested mapping.
    keep_empty_nodes: keep empty sub-mappings as ``empty_node`` leaves.
    is_leaf: ``is_leaf(path, sub_mapping)`` returning True keeps that sub-mapping whole.
    sep: join the keys with ``sep`` into string paths (``'a/b'``) instead of tuples.
  Returns:
    The flat dict.
  """
  _check_mapping(xs)
  out: dict = {}

  def key(path):
    return path if sep is None else sep.join(path)

  def walk(x, path):
    if not isinstance(x, Mapping) or (is_leaf is not None and is_leaf(path, x)):
      out[key(path)] = x
      return
    if not x:
      if keep_empty_nodes and path:
        out[key(path)] = empty_node
      return
    for k, v in x.items():
      walk(v, (*path, k))

  walk(xs, ())
  return out


def unflatten_mapping(xs: Mapping | Iterable, /, *, sep: str | None = None) -> dict:
  """Nested dicts from ``{path: leaf}`` (or ``[(path, leaf)]``); ``empty_node`` becomes ``{}``.

  Args:
    xs: the flat mapping or pairs, as ``flatten_mapping`` / ``flatten_to_sequence`` give them.
    sep: the separator of string paths (as passed to ``flatten_mapping``).
  Returns:
    The nested dict.
  """
  items = xs.items() if isinstance(xs, Mapping) else xs
  if not isinstance(items, Iterable):
    raise TypeError(f'expected a Mapping or an iterable of (path, value), got '
                    f'{type(xs).__qualname__}')
  out: dict = {}
  for path, value in items:
    if sep is not None:
      path = path.split(sep)
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = {} if value is empty_node else value
  return out
