"""Objects in and out of pure pytrees: ``to_tree`` / ``from_tree`` (for transforms you write
with plain JAX), and ``prefix`` (per-Variable axes for ``in_axes`` / ``out_axes``).

    >>> import arbax as nnx
    >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> pure = nnx.to_tree((m, {'again': m}))       # objects -> NodeStates, sharing kept
    >>> type(pure[0]).__name__, type(pure[1]['again'].graphdef.nodes[0]).__name__
    ('NodeStates', 'NodeRef')
    >>> back = nnx.from_tree(pure)
    >>> back[0] is back[1]['again']
    True

``to_tree`` replaces every object (Pytree) and Variable in a pytree by a
``NodeStates`` (its GraphDef and State(s)); all of them are split in one
``split_context``, so an object met twice is stored once and ``from_tree``
rebuilds the sharing. With ``ctxtag`` they become steps of an
``nnx.update_context`` and the outer objects are updated in place at the end.

``prefix(node, {filter: value})`` gives the pytree of per-Variable values
(e.g. vmap axes): the node's own shape in tree mode, a ``TreeState`` (the
shape of its State) in graph mode.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax

from arbax import _settings
from arbax import filters as filterlib
from arbax.api import group_states, iter_graph
from arbax.contexts import MergeContext, SplitContext, merge_context, split_context
from arbax.errors import format_path
from arbax.graph import GraphDef
from arbax.pytree import Pytree
from arbax.refmaps import RefMap, flatten_indexed
from arbax.variables import Variable


class _Missing:
  def __repr__(self):
    return 'MISSING'


MISSING = _Missing()


def is_graph_node(x) -> bool:
  """Whether ``x`` is one of the objects ``to_tree`` converts: a Pytree or a Variable.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> nnx.extract.is_graph_node(nnx.Param(1.0)), nnx.extract.is_graph_node(jnp.ones(2))
      (True, False)

  Args:
    x: anything.

  Returns:
    True for a Pytree or a Variable.
  """
  return isinstance(x, (Pytree, Variable))


def _jax_key(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def nnx_path(key_path) -> tuple:
  """A JAX key path as an NNX path: ``(GetAttrKey('w'), SequenceKey(0))`` -> ``('w', 0)``."""
  return tuple(_jax_key(k) for k in key_path)


# -- NodeStates ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeStates:
  """An object as a pytree: its GraphDef (None in a prefix), its State(s) and static ``metadata``.

  ``to_tree`` makes them; ``from_tree`` turns them back into objects. The
  GraphDef and States are pytree children, ``metadata`` is static.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> node = nnx.NodeStates.from_split(*nnx.split(model, nnx.Param))
      >>> node.graphdef == nnx.graphdef(model), list(node.state)
      (True, ['bias', 'kernel'])

  Args:
    _graphdef: the GraphDef, or None for a prefix.
    states: the States, a tuple.
    metadata: static data carried along (a transform's per-object options).
  """
  _graphdef: GraphDef | None
  states: tuple
  metadata: tp.Any = None

  @property
  def graphdef(self) -> GraphDef:
    """The GraphDef; a ValueError for a NodeStates made as a prefix (without one)."""
    if self._graphdef is None:
      raise ValueError('This NodeStates has no GraphDef (it was made with from_states or '
                       'from_prefixes, as a prefix).')
    return self._graphdef

  @property
  def state(self):
    """The one State; a ValueError when there are several (use ``.states``)."""
    if len(self.states) != 1:
      raise ValueError(f'NodeStates.state needs exactly one State, this one has {len(self.states)}; '
                       'use .states.')
    return self.states[0]

  @classmethod
  def from_split(cls, graphdef: GraphDef | None, state, /, *states, metadata: tp.Any = None):
    """``NodeStates.from_split(*ctx.split(obj, ...))``: a NodeStates of what a split returned.

    Args:
      graphdef: the GraphDef (or None).
      state: the first State.
      *states: the others.
      metadata: static data carried along.

    Returns:
      The NodeStates.
    """
    return cls(graphdef, (state, *states), metadata)

  @classmethod
  def from_states(cls, state, /, *states):
    """A NodeStates of States alone (no GraphDef), to use as a prefix.

    Args:
      state: the first State.
      *states: the others.

    Returns:
      The NodeStates.
    """
    return cls(None, (state, *states), None)

  @classmethod
  def from_prefixes(cls, prefixes: tp.Iterable, /, *, metadata: tp.Any = None):
    """A NodeStates to use as an ``in_axes`` / ``out_axes`` prefix: one entry per State.

        >>> import arbax as nnx
        >>> nnx.NodeStates.from_prefixes([0, None]).states
        (0, None)

    Args:
      prefixes: one prefix value per State.
      metadata: static data carried along.

    Returns:
      The NodeStates.
    """
    return cls(None, tuple(prefixes), metadata)

  def replace(self, **kwargs):
    """A copy with the given fields changed (``states=``, ``metadata=``, ``_graphdef=``)."""
    return dataclasses.replace(self, **kwargs)


jax.tree_util.register_dataclass(NodeStates, data_fields=['_graphdef', 'states'],
                                 meta_fields=['metadata'])


def default_split_fn(ctx: SplitContext, path, prefix, leaf) -> NodeStates:
  """What ``to_tree`` does with each object: one NodeStates of its whole State.

      >>> import arbax as nnx
      >>> with nnx.split_context() as ctx:
      ...   node = nnx.extract.default_split_fn(ctx, (), None, nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> type(node).__name__, list(node.state)
      ('NodeStates', ['bias', 'kernel'])

  Args:
    ctx: the SplitContext the whole tree is split in.
    path: the JAX key path of the object in the tree.
    prefix: its prefix value (ignored).
    leaf: the object.

  Returns:
    ``NodeStates.from_split(*ctx.split(leaf))``.
  """
  return NodeStates.from_split(*ctx.split(leaf))


def merge_tree_node(ctx: MergeContext, path, prefix, leaf):
  """What ``from_tree`` does with each NodeStates: merge it in the shared MergeContext.

      >>> import arbax as nnx
      >>> node = nnx.to_tree(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> with nnx.merge_context() as ctx:
      ...   type(nnx.extract.merge_tree_node(ctx, (), None, node)).__name__
      'Linear'

  Args:
    ctx: the MergeContext the whole tree is merged in.
    path: the JAX key path of the leaf in the tree.
    prefix: its prefix value (ignored).
    leaf: the NodeStates (anything else is a ValueError naming the path).

  Returns:
    The object.
  """
  if not isinstance(leaf, NodeStates):
    raise ValueError(f'from_tree expected a NodeStates at {format_path(nnx_path(path))}, got a '
                     f'{type(leaf).__name__}.')
  return ctx.merge(leaf.graphdef, *leaf.states)


def is_tree_node(x) -> bool:
  """Whether ``x`` is a NodeStates: the leaves ``from_tree`` merges by default.

      >>> import arbax as nnx
      >>> pure = nnx.to_tree((nnx.Param(1.0), 2.0))
      >>> [nnx.extract.is_tree_node(x) for x in pure]
      [True, False]

  Args:
    x: anything.

  Returns:
    True for a NodeStates.
  """
  return isinstance(x, NodeStates)


# -- prefixes and aliasing -------------------------------------------------------


def broadcast_prefix(prefix_tree, full_tree, prefix_is_leaf=None, tree_is_leaf=None) -> list:
  """The prefix value of each leaf of ``full_tree``, in leaf order.

  Each leaf of ``prefix_tree`` covers the whole subtree of ``full_tree`` at its
  place (``None`` and objects are prefix leaves), as ``in_axes`` do.

      >>> import arbax as nnx
      >>> nnx.extract.broadcast_prefix((0, None), ([1, 2], 3))
      [0, 0, None]

  Args:
    prefix_tree: a prefix of ``full_tree``.
    full_tree: the tree.
    prefix_is_leaf: more leaves of ``prefix_tree`` (as ``is_leaf``).
    tree_is_leaf: the leaves of ``full_tree`` (as ``is_leaf``).

  Returns:
    A list with one prefix value per leaf of ``full_tree``.
  """
  out: list = []

  def add(value, subtree):
    out.extend([value] * jax.tree_util.tree_structure(subtree, is_leaf=tree_is_leaf).num_leaves)

  def is_leaf(x):
    return x is None or is_graph_node(x) or (prefix_is_leaf is not None and prefix_is_leaf(x))

  jax.tree.map(add, prefix_tree, full_tree, is_leaf=is_leaf)
  return out


def check_consistent_aliasing(node, prefix, /, *, node_prefixes: dict | None = None,
                              base_path: tuple = ()) -> None:
  """Raise a ValueError if a Variable reached from several places gets different prefixes.

  ``node_prefixes`` (``{id: [(path, prefix), ...]}``) accumulates across calls,
  so the objects of one transform call are checked together. A ``TreeState``
  prefix (from ``nnx.prefix``) is asked for each Variable's own prefix.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> seen = {}
      >>> nnx.extract.check_consistent_aliasing(model, 0, node_prefixes=seen)
      >>> nnx.extract.check_consistent_aliasing(model, 1, node_prefixes=seen)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
        ...
      ValueError: Inconsistent aliasing detected. ...

  Args:
    node: an object (walked in graph mode).
    prefix: its prefix value (or a ``TreeState`` of per-Variable values).
    node_prefixes: the record of earlier calls, updated in place.
    base_path: the path of ``node`` in the whole tree (for the message).
  """
  if node_prefixes is None:
    node_prefixes = {}
  names: dict = {}
  for path, value in iter_graph(node, graph=True):
    if not isinstance(value, Variable):
      continue
    if isinstance(prefix, TreeState) and prefix.prefix_fn is not None:
      value_prefix = prefix.prefix_fn(path, value)
    else:
      value_prefix = prefix
    names[id(value)] = type(value).__name__
    node_prefixes.setdefault(id(value), []).append((base_path + path, value_prefix))
  problems = []
  for key, entries in node_prefixes.items():
    distinct = []
    for _, p in entries:
      if not any(p is q or p == q for q in distinct):
        distinct.append(p)
    if len(distinct) > 1:
      where = '\n'.join(f'  {format_path(path)}: {p!r}' for path, p in entries)
      problems.append(f'{names.get(key, "Variable")}:\n{where}')
  if problems:
    raise ValueError('Inconsistent aliasing detected. The following nodes have different '
                     'prefixes (one object must be mapped the same way wherever it is reached; '
                     'give its places the same prefix):\n' + '\n'.join(problems))


# -- to_tree / from_tree ---------------------------------------------------------


def to_tree(tree, /, *, prefix: tp.Any = MISSING, split_fn: tp.Callable = default_split_fn,
            map_non_graph_nodes: bool = False, ctxtag: tp.Hashable | None = None,
            check_aliasing: bool = True):
  """``tree`` with every object and Variable replaced by a pure pytree (``NodeStates`` by default).

  All objects are split in one ``split_context(ctxtag)``, so an object met
  twice is stored once (its second GraphDef is a ref) and ``from_tree``
  rebuilds the sharing. Use it to pass objects through a plain JAX transform.

      >>> import jax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> pure = nnx.to_tree((model, 1.0))
      >>> type(pure[0]).__name__, pure[1], [x.shape for x in jax.tree.leaves(pure[0])]
      ('NodeStates', 1.0, [(3,), (2, 3)])

  Args:
    tree: any pytree holding objects.
    prefix: a prefix tree of ``tree`` (e.g. ``in_axes``); each object gets its prefix
      value, and a Variable reached with two different prefixes raises a ValueError.
    split_fn: ``(SplitContext, key_path, prefix, obj) -> pytree``.
    map_non_graph_nodes: call ``split_fn`` on the other leaves too.
    ctxtag: the tag of the ``nnx.update_context`` this split belongs to.
    check_aliasing: check the prefixes of shared Variables (needs ``prefix``).

  Returns:
    The pure pytree.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_graph_node)
  if prefix is MISSING or prefix is None:
    prefixes = [prefix] * len(leaves)
  else:
    prefixes = broadcast_prefix(prefix, tree, tree_is_leaf=is_graph_node)
  node_prefixes: dict = {}
  out = []
  with split_context(ctxtag) as ctx:
    for (key_path, leaf), leaf_prefix in zip(leaves, prefixes):
      if is_graph_node(leaf):
        if check_aliasing and prefix is not MISSING and prefix is not None:
          check_consistent_aliasing(leaf, leaf_prefix, node_prefixes=node_prefixes,
                                    base_path=nnx_path(key_path))
        leaf = split_fn(ctx, key_path, leaf_prefix, leaf)
      elif map_non_graph_nodes:
        leaf = split_fn(ctx, key_path, leaf_prefix, leaf)
      out.append(leaf)
  return treedef.unflatten(out)


def from_tree(tree, /, *, prefix: tp.Any = MISSING, merge_fn: tp.Callable = merge_tree_node,
              is_node_leaf: tp.Callable = is_tree_node, is_leaf: tp.Callable = is_tree_node,
              map_non_graph_nodes: bool = False, is_inner: bool | None = None,
              ctxtag: tp.Hashable | None = None):
  """The inverse of ``to_tree``: every ``NodeStates`` becomes an object again.

  Each leaf selected by ``is_node_leaf`` goes through ``merge_fn(ctx, path,
  prefix, leaf)``, all in one ``merge_context(ctxtag, is_inner)``, so shared
  objects come back shared. The objects hold copies of the Variables.

      >>> import jax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> pure = nnx.to_tree({'a': model, 'b': model})
      >>> back = nnx.from_tree(jax.tree.map(lambda x: 2 * x, pure))
      >>> back['a'] is back['b'], bool((back['a'].kernel[...] == 2 * model.kernel[...]).all())
      (True, True)

  Args:
    tree: the pure pytree.
    prefix: a prefix tree, as for ``to_tree``; each merged leaf gets its value.
    merge_fn: ``(MergeContext, key_path, prefix, leaf) -> object``.
    is_node_leaf: which leaves to merge.
    is_leaf: where to stop flattening ``tree``.
    map_non_graph_nodes: call ``merge_fn`` on the other leaves too.
    is_inner: inside the transform (True) or outside (False), with ``ctxtag``.
    ctxtag: the tag of the ``nnx.update_context`` this merge belongs to.

  Returns:
    The pytree with objects.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  if prefix is MISSING or prefix is None:
    prefixes = [prefix] * len(leaves)
  else:
    prefixes = broadcast_prefix(prefix, tree, prefix_is_leaf=is_leaf, tree_is_leaf=is_leaf)
  out = []
  with merge_context(ctxtag, is_inner) as ctx:
    for (key_path, leaf), leaf_prefix in zip(leaves, prefixes):
      if map_non_graph_nodes or is_node_leaf(leaf) or isinstance(leaf, Variable):
        leaf = merge_fn(ctx, key_path, leaf_prefix, leaf)
      out.append(leaf)
  return treedef.unflatten(out)


def clear_non_graph_nodes(tree):
  """``tree`` with every leaf that is not an object or Variable replaced by None.

      >>> import arbax as nnx
      >>> nnx.extract.clear_non_graph_nodes((nnx.Param(1.0), 2, 'a'))[1:]
      (None, None)

  Args:
    tree: any pytree.

  Returns:
    The same structure, objects kept.
  """
  return jax.tree.map(lambda x: x if is_graph_node(x) else None, tree, is_leaf=is_graph_node)


# -- prefix ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeState:
  """An object in graph mode as a pytree: its GraphDef and State.

  Static data: the GraphDef and the ``prefix_fn`` that made the State's values,
  when it came from ``nnx.prefix``; the State is the child.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> axes = nnx.prefix(model, {nnx.PathContains('kernel'): 1, ...: None}, graph=True)
      >>> type(axes).__name__, axes.state.to_pure_dict()
      ('TreeState', {'bias': None, 'kernel': 1})

  Args:
    graphdef: the object's GraphDef (or None).
    state: its State (or the per-Variable values).
    prefix_fn: ``(path, variable) -> value``, when the values came from one.
  """
  graphdef: GraphDef | None
  state: tp.Any
  prefix_fn: tp.Callable | None = dataclasses.field(default=None, compare=False)

  def replace(self, **kwargs):
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **kwargs)


class _Opaque:
  """Static data compared as always equal (a function must not make two prefixes differ)."""

  __slots__ = ('value',)

  def __init__(self, value):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, _Opaque)

  def __hash__(self):
    return 0


def _tree_state_flatten_with_keys(ts: TreeState):
  return [(jax.tree_util.GetAttrKey('state'), ts.state)], (ts.graphdef, _Opaque(ts.prefix_fn))


def _tree_state_unflatten(aux, children):
  graphdef, fn = aux
  return TreeState(graphdef, children[0], fn.value)


jax.tree_util.register_pytree_with_keys(TreeState, _tree_state_flatten_with_keys,
                                        _tree_state_unflatten)


def _prefix_fn(filter_map) -> tp.Callable:
  if not isinstance(filter_map, tp.Mapping):
    return filter_map
  pairs = [(filterlib.to_predicate(f), value) for f, value in filter_map.items()]
  filters = list(filter_map)

  def prefix_of(path, leaf):
    for predicate, value in pairs:
      if predicate(path, leaf):
        return value
    raise ValueError(f'No filter matched the {type(leaf).__name__} at {format_path(path)}: the '
                     f'filters are {filters}. Add one for it, or end the mapping with `...: value`.')
  return prefix_of


def to_tree_states(tree, prefix_fn: tp.Callable | None = None):
  """``tree`` with each object replaced by a ``TreeState``, all flattened in one index space.

  In graph mode an object met again becomes a ref with an empty State.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> first, again = nnx.extract.to_tree_states((model, model))
      >>> list(first.state), list(again.state)
      (['bias', 'kernel'], [])

  Args:
    tree: any pytree holding objects.
    prefix_fn: recorded in each TreeState (see ``prefix``).

  Returns:
    The tree of TreeStates.
  """
  refs = RefMap()

  def convert(x):
    if not is_graph_node(x):
      return x
    fl = flatten_indexed(x, refs, None, context='prefix')
    state, = group_states(fl, (), strict=False)
    return TreeState(fl.graphdef, state, prefix_fn)

  return jax.tree.map(convert, tree, is_leaf=is_graph_node)


def prefix(node, filter_map: tp.Mapping | tp.Callable, /, *, graph: bool | None = None):
  """The pytree of per-Variable values that ``filter_map`` assigns, e.g. ``vmap`` axes.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> axes = nnx.prefix(model, {nnx.PathContains('kernel'): 0, ...: None}, graph=False)
      >>> type(axes).__name__, axes.kernel, axes.bias
      ('Linear', 0, None)

  Args:
    node: an object (or pytree of objects).
    filter_map: ``{filter: value}`` (the first matching filter wins; no match raises a
      ValueError naming the path) or a function ``(path, variable) -> value``.
    graph: tree mode gives ``node``'s own shape with the values in place of its
      Variables; graph mode gives ``TreeState``s whose ``state`` holds the values (an
      object met twice appears once), the form graph-mode transforms take. None uses
      ``nnx.set_graph_mode``.

  Returns:
    The prefix tree.
  """
  graph = _settings.graph_mode(graph)
  prefix_of = _prefix_fn(filter_map)

  def values_of(tree, base: tuple):
    return jax.tree_util.tree_map_with_path(lambda kp, v: prefix_of(base + nnx_path(kp), v), tree,
                                            is_leaf=lambda x: isinstance(x, Variable))

  if not graph:
    return values_of(node, ())

  def per_object(key_path, x):
    if isinstance(x, TreeState):  # the State's paths continue the path to the object
      return x.replace(state=values_of(x.state, nnx_path(key_path)))
    return prefix_of(nnx_path(key_path), x)

  return jax.tree_util.tree_map_with_path(per_object, to_tree_states(node, prefix_of),
                                          is_leaf=lambda x: isinstance(x, (TreeState, Variable)))


__all__ = ['NodeStates', 'TreeState', 'to_tree', 'from_tree', 'prefix', 'clear_non_graph_nodes',
           'broadcast_prefix', 'check_consistent_aliasing', 'default_split_fn', 'merge_tree_node',
           'is_tree_node', 'is_graph_node', 'to_tree_states']
