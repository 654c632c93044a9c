"""Flatten objects into (GraphDef, leaves) and build them back: the one traversal
that split/merge/state/update and every transform share.

A GraphDef describes structure only (classes, static attributes, metadata,
where shared references point); the leaves are the Variables and raw arrays in
pytree order (attributes sorted by name, like ``jax.tree.leaves``). Equal
structures give equal GraphDefs, which hash once: they are static arguments
of ``jax.jit``.

Tree mode (the default) requires every Variable and Pytree to be reachable
once; graph mode (``graph=True``) records later references as refs and
rebuilds them shared.
"""
from __future__ import annotations

import typing as tp

import jax
import numpy as np

from arbax import _settings
from arbax.errors import format_path
from arbax.pytree import Pytree, PytreeAux, new_node, node_parts
from arbax.state import State
from arbax.variables import Variable

# Def tags. Defs are plain nested tuples (C-speed hashing and comparison):
#   (VAR, cls, meta)                      a Variable (consumes one leaf)
#   (NODE, cls, aux, ((key, def), ...))   a Pytree
#   (LEAF,)                               a raw array (consumes one leaf)
#   (STATIC, value)                       a non-array value inside a container
#   (REF, index)                          graph mode: the index-th node/Variable seen
#   (SEQ, type, (def, ...))               tuple / list
#   (MAP, type, keys, (def, ...))         dict / State
#   (JAXNODE, treedef, keys, (def, ...))  any other registered pytree node
VAR, NODE, LEAF, STATIC, REF, SEQ, MAP, JAXNODE = range(8)
LEAF_DEF = (LEAF,)
ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


class _Hashed:
  """Wraps an unhashable static value so defs stay hashable (compared by equality)."""

  __slots__ = ('value',)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return hash(type(self.value).__name__)

  def __eq__(self, other):
    try:
      return isinstance(other, _Hashed) and bool(self.value == other.value)
    except Exception:
      return False


def _static_def(value):
  try:
    hash(value)
  except TypeError:
    value = _Hashed(value)
  return (STATIC, value)


class GraphDef:
  """The structure of an object without its state: ``nnx.split``'s first result.

  Hashable and equal for equal structures; ``leaf_paths`` lists where each
  leaf of the matching State lives.
  """

  __slots__ = ('root', 'leaf_paths', '_hash')

  def __init__(self, root: tuple, leaf_paths: tuple):
    self.root = root
    self.leaf_paths = leaf_paths
    self._hash = hash(root)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, GraphDef) and self._hash == other._hash
                             and self.root == other.root)

  def __repr__(self):
    return f'GraphDef({_describe(self.root)}, num_leaves={len(self.leaf_paths)})'

  def apply(self, state, *states):
    """``graphdef.apply(state)(*args)`` calls the merged object and returns ``(out, (graphdef, state))``."""
    def call(*args, **kwargs):
      obj = merge(self, state, *states)
      out = obj(*args, **kwargs)
      return out, flatten(obj, graph=True)[:2]
    return call


def _describe(d) -> str:
  tag = d[0]
  if tag == NODE:
    return f'{d[1].__name__}(' + ', '.join(f'{k}={_describe(c)}' for k, c in d[3]) + ')'
  if tag == VAR:
    return d[1].__name__
  if tag == REF:
    return f'ref[{d[1]}]'
  if tag == LEAF:
    return 'leaf'
  if tag == STATIC:
    return repr(d[1])
  return f'{getattr(d[1], "__name__", "node")}[...]'


class Flattened(tp.NamedTuple):
  graphdef: GraphDef
  leaves: list          # Variables and raw arrays, in pytree order
  paths: list           # the path of each leaf
  nodes: list           # every Pytree and Variable seen, in order (index of REF defs)


def alias_error(what: str, path, first_path, context: str = 'tree-mode') -> ValueError:
  return ValueError(
      f'{what} at {format_path(path)} was already seen at {format_path(first_path)}. '
      f'{context} does not support shared Variable references. '
      'Pass graph=True (or use nnx.graphlib.set_graph_mode(True)) to allow sharing, '
      'or make the two references separate objects.')


def flatten(obj, *, graph: bool | None = None, prefix: tuple = (),
            context: str = 'tree-mode split', mark_seen: bool = False) -> Flattened:
  """Walk ``obj`` once: its GraphDef, its leaves with their paths, and the objects met.

  ``mark_seen`` flags the Pytrees met so later structural changes to them
  invalidate transform caches (see ``_settings.EPOCH``).
  """
  graph = _settings.graph_mode(graph)
  leaves: list = []
  paths: list = []
  nodes: list = []
  seen: dict = {}

  def visit(x, path):
    if isinstance(x, Variable):
      key = id(x)
      if key in seen:
        if graph:
          return (REF, seen[key][0])
        raise alias_error('Variable', path, seen[key][1], context)
      seen[key] = (len(nodes), path)
      nodes.append(x)
      leaves.append(x)
      paths.append(path)
      return (VAR, type(x), x._meta)
    if isinstance(x, Pytree) and type(x)._arbax_pytree:
      key = id(x)
      if key in seen:
        if graph:
          return (REF, seen[key][0])
        raise alias_error(type(x).__name__, path, seen[key][1], context)
      seen[key] = (len(nodes), path)
      nodes.append(x)
      if mark_seen:
        x.__dict__['_arbax_seen'] = True
      keys, aux = node_parts(x)
      d = x.__dict__
      return (NODE, type(x), aux, tuple((k, visit(d[k], path + (k,))) for k in keys))
    if isinstance(x, ARRAY_TYPES):
      leaves.append(x)
      paths.append(path)
      return LEAF_DEF
    t = type(x)
    if t is tuple or t is list:
      return (SEQ, t, tuple(visit(c, path + (i,)) for i, c in enumerate(x)))
    if t is dict or t is State:
      keys = tuple(sorted(x, key=_sort_key))
      return (MAP, t, keys, tuple(visit(x[k], path + (k,)) for k in keys))
    if x is None or isinstance(x, (int, float, complex, str, bool, type)) or callable(x):
      return _static_def(x)
    children_with_keys, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda y: y is not x)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
      return _static_def(x)  # an opaque leaf JAX does not know
    keys = tuple(_key_of(kp[0]) for kp, _ in children_with_keys)
    return (JAXNODE, treedef, keys,
            tuple(visit(c, path + (k,)) for k, (_, c) in zip(keys, children_with_keys)))

  root = visit(obj, prefix)
  return Flattened(GraphDef(root, tuple(paths)), leaves, paths, nodes)


def _sort_key(k):
  return (isinstance(k, str), str(type(k)), k)


def _key_of(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def unflatten(graphdef: GraphDef | tuple, leaves: tp.Sequence, *, copy_variables: bool = False,
              nodes: list | None = None):
  """Build objects from a GraphDef and its leaves (in pytree order).

  A leaf that is a Variable is used as is (``copy_variables`` copies it); a raw
  value where the GraphDef has a Variable becomes a new Variable of that kind
  and metadata, created in the current trace.
  """
  root = graphdef.root if isinstance(graphdef, GraphDef) else graphdef
  it = iter(leaves)
  nodes = [] if nodes is None else nodes

  def build(d):
    tag = d[0]
    if tag == VAR:
      leaf = next(it)
      if isinstance(leaf, Variable):
        v = leaf.copy() if copy_variables else leaf
        if type(v) is not d[1]:
          v = d[1]._from_parts(v._value, v._meta)
      else:
        v = d[1]._from_parts(leaf, d[2])
      nodes.append(v)
      return v
    if tag == NODE:
      cls, aux, children = d[1], d[2], d[3]
      obj = object.__new__(cls)
      nodes.append(obj)  # before the children: refs may point back at it
      values = [build(c) for _, c in children]
      _fill_node(obj, aux, values)
      return obj
    if tag == LEAF:
      return next(it)
    if tag == STATIC:
      value = d[1]
      return value.value if isinstance(value, _Hashed) else value
    if tag == REF:
      return nodes[d[1]]
    if tag == SEQ:
      return d[1](build(c) for c in d[2])
    if tag == MAP:
      out = d[1]()
      for k, c in zip(d[2], d[3]):
        dict.__setitem__(out, k, build(c))
      return out
    if tag == JAXNODE:
      return d[1].unflatten([build(c) for c in d[3]])
    raise AssertionError(f'unknown def {d!r}')

  return build(root)


def _fill_node(obj, aux: PytreeAux, values):
  d = obj.__dict__
  kinds = {k: False for k, _ in aux.static}
  kinds.update((k, True) for k in aux.data_keys)
  d['_arbax_kinds'] = kinds
  by_key = dict(aux.static)
  by_key.update(zip(aux.data_keys, values))
  for k in aux.order:
    d[k] = by_key[k]
  d['_arbax_cache'] = (aux.data_keys, aux)
  obj._arbax_after_unflatten()


def iter_defs(root):
  """Every def under ``root`` with its path, in traversal order (nodes before children)."""
  stack = [((), root)]
  while stack:
    path, d = stack.pop()
    yield path, d
    tag = d[0]
    if tag == NODE:
      stack.extend(reversed([(path + (k,), c) for k, c in d[3]]))
    elif tag == SEQ:
      stack.extend(reversed([(path + (i,), c) for i, c in enumerate(d[2])]))
    elif tag in (MAP, JAXNODE):
      stack.extend(reversed([(path + (k,), c) for k, c in zip(d[2], d[3])]))


__all__ = ['GraphDef', 'Flattened', 'flatten', 'unflatten', 'new_node', 'merge']


def merge(graphdef, *states, copy: bool = False):  # re-exported by api; defined there
  from arbax.api import merge as _merge
  return _merge(graphdef, *states, copy=copy)
