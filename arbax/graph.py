"""Flatten objects into (GraphDef, leaves) and build them back: the one traversal
that split/merge/state/update and every transform share.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> from arbax import graph
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    ...     self.n = 3
    >>> fl = graph.flatten(Foo())
    >>> fl.graphdef, fl.paths
    (GraphDef(Foo(w=Param), num_leaves=1), [('w',)])
    >>> graph.unflatten(fl.graphdef, fl.leaves).w is fl.leaves[0]
    True

A GraphDef describes structure only (classes, static attributes, metadata,
where shared references point) as a tree of defs (``arbax.defs``); the leaves
are the Variables, raw arrays and ``jax.Ref`` s in pytree order (attributes
sorted by name, like ``jax.tree.leaves``). Plain values (ints, strings, ...) in
containers held as data are structure in graph mode and leaves in tree mode,
where the state follows JAX: ``{'w': Param, 'k': 3}`` has leaves at ``'k'`` and
``'w'`` with ``graph=False``, only at ``'w'`` with ``graph=True``. Equal structures give equal
GraphDefs, which hash once: they are static arguments of ``jax.jit``.

Tree mode (``graph=False``) requires every Variable, Pytree and Ref to be
reachable once; graph mode (the default, as in NNX) records later references as
refs and rebuilds them shared. A reference cycle is a ref to an ancestor: graph
mode rebuilds it, tree mode refuses it like any alias.

Walking objects: ``children`` is the one definition of what lies one level
below a value (a Pytree's attributes, container items, a JAX node's children);
``walk`` visits a whole graph with it, children before parents, on an explicit
stack (any depth); ``find_first`` finds the first value that matches.

Speed: a GraphDef builds through compiled closures shared by equal structures
(``arbax.builders``), and ``flatten_cached`` reuses the flattening of an
unchanged object (any structural change bumps ``_settings.EPOCH``).
"""
from __future__ import annotations

import types
import typing as tp
import weakref

import jax
import numpy as np

from arbax import _settings, _structure, builders, caches, nodedefs
from arbax._walk import (SHALLOW, allow_depth, container_children, iter_matching, key_name,
                         sort_key)
from arbax.defs import (VAR, NODE, STATIC, REF, SEQ, MAP, JAXNODE, ARRAYREF, LEAF_DEF,
                        ARRAYREF_DEF, ArrayRefOutput, Hashed, JaxNodeDef, LeafInfo, NoUpdate,
                        NO_UPDATE, describe, iter_defs, jax_node_def, leaf_layout, map_def, named,
                        num_objects, numbered, obj_def, ref_def, seq_def, static_def, var_def)
from arbax.errors import AliasError, format_path
from arbax.pytree import Pytree, new_node, node_parts  # noqa: F401 (new_node re-exported)
from arbax.state import FlatState, GraphState, State, compile_getter, flat_dict, from_flat_state, skeleton
from arbax.variables import Variable, current_trace

__all__ = ['GraphDef', 'Flattened', 'flatten', 'unflatten', 'flatten_cached', 'new_node',
           'leaf_defs', 'children', 'walk', 'find_first', 'iter_matching', 'key_name', 'sort_key',
           'is_graph_object', 'NoUpdate', 'NO_UPDATE', 'ArrayRefOutput']

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)
NO_FIT = builders.NO_FIT
_END = object()


def is_graph_object(x) -> bool:
  """Whether ``x`` is an object of the graph: a Pytree, a Variable or a ``jax.Ref``."""
  return isinstance(x, (Pytree, Variable, jax.Ref))


class GraphDef:
  """The structure of an object without its state: ``nnx.split``'s first result.

  Hashable and equal for equal structures; ``leaf_paths`` lists where each
  leaf of the matching State lives. ``graph`` records the mode it was made in
  (tree-mode and graph-mode GraphDefs differ, as in NNX). ``nodes`` is NNX's
  view of the structure (``NodeDef``, ``VariableDef``, ``NodeRef``,
  ``ArrayRefDef``, ``TreeNodeDef``; see ``arbax.nodedefs``), computed on first access.

  Two annotations serve the split/merge contexts (``nnx.split_context``):
  ``base``, the number of its first object when it continues the index space
  of earlier splits (the objects before it appear as refs), and ``outer``,
  ``((index, outer_index), ...)`` for the objects that came from outside a
  transform. Both are part of equality.
  """

  __slots__ = ('root', 'leaf_paths', 'graph', 'base', 'outer', '_hash', '_builders', '_has_refs',
               '_skeleton', 'memo')

  def __init__(self, root: tuple, leaf_paths: tuple, graph: bool = True, *, base: int = 0,
               outer: tuple | None = None):
    self.root = root
    self.leaf_paths = leaf_paths
    self.graph = graph
    self.base = base
    self.outer = outer or None
    self._hash = hash(root)
    self._builders: dict = {}
    self._has_refs = None
    self._skeleton: tuple | tp.Literal[False] | None = None  # False: a leaf at the root
    self.memo: dict = {}  # per-structure caches of the State API (filter partitions, path index)

  __class_getitem__ = classmethod(types.GenericAlias)  # ``GraphDef[Model]`` in annotations

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    if self is other:
      return True
    if not (isinstance(other, GraphDef) and self._hash == other._hash and self.graph == other.graph
            and self.base == other.base and self.outer == other.outer):
      return False
    if self.depth > SHALLOW:  # tuples compare recursively: a deep structure needs a higher limit
      with self.deep():
        return self.root == other.root
    return self.root == other.root

  def __repr__(self):
    with self.deep():
      return f'GraphDef({describe(self.root)}, num_leaves={len(self.leaf_paths)})'

  def __getstate__(self):
    return (self.root, self.leaf_paths, self.graph, self.base, self.outer)

  def __setstate__(self, state):
    root, paths, *rest = state  # older pickles hold only (root, leaf_paths), as plain tuples
    graph_, base, outer = tp.cast('tuple[bool, int, tuple | None]',
                                  (*rest, *(True, 0, None)[len(rest):]))
    self.__init__(named(root), paths, graph_, base=base, outer=outer)

  @property
  def num_leaves(self) -> int:
    return len(self.leaf_paths)

  @property
  def nodes(self) -> list:
    """NNX's flat list of node definitions (see ``arbax.nodedefs``); a view, built once."""
    view = self.memo.get('nodes')
    if view is None:
      view = self.memo['nodes'] = tuple(node_view(self) if self.graph else tree_view(self))
    return list(view)

  @property
  def depth(self) -> int:
    """How deeply the structure nests (the longest path of a def); ``flatten`` records it."""
    found = self.memo.get('depth')
    if found is None:
      found = self.memo['depth'] = max((len(p) for p, _ in iter_defs(self.root)), default=0)
    return found

  def deep(self):
    """A context that lets building and reading recurse through this structure's depth."""
    return allow_depth(self.depth)

  @property
  def has_refs(self) -> bool:
    """Whether some object is reached twice (the def holds refs)."""
    if self._has_refs is None:
      self._has_refs = any(d[0] == REF for _, d in iter_defs(self.root))
    return self._has_refs

  def with_outer(self, outer: tuple | None, base: int | None = None) -> 'GraphDef':
    """The same structure with other context annotations (``base`` / ``outer``)."""
    if outer == self.outer and (base is None or base == self.base):
      return self
    out = GraphDef(self.root, self.leaf_paths, self.graph,
                   base=self.base if base is None else base, outer=outer)
    if 'depth' in self.memo:
      out.memo['depth'] = self.memo['depth']
    return out

  def build_from_state(self, state):
    """``merge(self, state)`` for one full State, reading it while building (the fast path).

    Returns ``NO_FIT`` when ``state`` is not shaped like this GraphDef's State, or when
    the GraphDef has shared references or Refs; the caller then takes the general path.
    """
    builder = self.memo.get('from_state', _END)
    if builder is _END:
      plain = (self.skeleton is not None and not self.has_refs
               and not any(d[0] == ARRAYREF for _, d in iter_defs(self.root)))
      with self.deep():
        builder = self.memo['from_state'] = builders.fused(self.root) if plain else None
    if builder is None:
      return NO_FIT
    try:
      if self.depth > SHALLOW:
        with self.deep():
          return builder(state, current_trace())
      return builder(state, current_trace())
    except (builders.NoFit, KeyError, TypeError, IndexError):
      return NO_FIT

  def read_state(self, state, out: list) -> bool:
    """Append the leaves of a full ``state`` of this GraphDef to ``out``; False if it does not fit."""
    getter = self.memo.get('getter')
    if getter is None:
      skel = self.skeleton
      with self.deep():
        getter = self.memo['getter'] = (lambda s, o: False) if skel is None else compile_getter(skel)
    if self.depth > SHALLOW:
      with self.deep():
        return getter(state, out)
    return getter(state, out)

  @property
  def skeleton(self) -> tuple | None:
    """The key structure of this GraphDef's full State (None when a leaf sits at the root)."""
    if self._skeleton is None:
      paths = self.leaf_paths
      self._skeleton = False if any(not p for p in paths) else skeleton(paths)
    return self._skeleton or None

  def build(self, leaves: tp.Iterable, *, copy_variables: bool = False, nodes: list | None = None,
            reuse: tp.Sequence | tp.Mapping | None = None, recreate_variables: bool = True,
            adopt_class: bool = True):
    """The object described by this GraphDef around ``leaves`` (in leaf order).

    A leaf that is a Variable is used as is (``copy_variables`` copies it); a raw
    value where the GraphDef has a Variable becomes a new Variable of that kind and
    metadata, created in the current trace (``recreate_variables=False``: it stays raw).

    Args:
      leaves: the leaves, as ``flatten`` lists them.
      copy_variables: give the object copies of the Variables among ``leaves``.
      nodes: receives every object built, numbered as in ``arbax.defs``; when it
        already holds objects (those numbered before ``self.base``: an index space
        continued), refs to them resolve to them.
      reuse: by object number (a list, or a mapping), existing objects to update in
        place instead of making new ones: a Pytree gets the described attributes, a
        Variable the leaf's value and the described metadata.
      recreate_variables: wrap raw values in Variables of the recorded kind.
      adopt_class: a reused Pytree of another class takes the described class
        (False: a ValueError, as NNX's update contexts raise).

    Returns:
      The object.
    """
    if self.depth > SHALLOW:
      with self.deep():
        return self._build(leaves, copy_variables, nodes, reuse, recreate_variables, adopt_class)
    return self._build(leaves, copy_variables, nodes, reuse, recreate_variables, adopt_class)

  def _build(self, leaves, copy_variables, nodes, reuse, recreate_variables, adopt_class):
    reusing = reuse is not None
    track = nodes is not None or reusing or self.has_refs
    opts = builders.Options(track, copy_variables, reusing, recreate_variables, adopt_class)
    builder = self._builders.get(opts)
    if builder is None:
      builder = self._builders[opts] = builders.compiled(self.root, opts)
    target = nodes
    if reusing:
      prefix = () if nodes is None else nodes
      nodes = builders.ReusingNodes(prefix, _reuse_list(reuse, len(prefix) + self._num_objects()))
    elif nodes is None:
      nodes = []
    it = iter(leaves)
    try:
      out = builder(it, nodes, current_trace())
    except StopIteration:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(self.leaf_paths)}, '
                       'got fewer.') from None
    if next(it, _END) is not _END:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(self.leaf_paths)}, '
                       'got more.')
    if reusing:
      _settings.bump_epoch()  # objects updated in place may have a new structure
      if target is not None:
        target.extend(nodes[len(target):])
    return out

  def _num_objects(self) -> int:
    n = self.memo.get('num_objects')
    if n is None:
      n = self.memo['num_objects'] = num_objects(self.root)
    return n

  def apply(self, state, *states):
    """``graphdef.apply(state)(*args)`` calls the merged object and returns ``(out, (graphdef, state))``."""
    def call(*args, **kwargs):
      obj = self.build(_leaves_for(self, (state, *states)))
      out = obj(*args, **kwargs)
      fl = flatten(obj, graph=True)
      return out, (fl.graphdef, _state_of(fl))
    return call


jax.tree_util.register_pytree_node(GraphDef, lambda g: ((), g), lambda g, _: g)


def _reuse_list(reuse, size: int) -> list:
  if isinstance(reuse, tp.Mapping):
    return [reuse.get(i) for i in range(size)]
  out = list(reuse)
  if len(out) < size:
    out.extend([None] * (size - len(out)))
  return out


def leaf_defs(graphdef: GraphDef) -> tuple[LeafInfo, ...]:
  """Each leaf of ``graphdef`` in leaf order: its def, path, object number and parent (see
  ``arbax.defs.leaf_layout``); computed once per GraphDef."""
  found = graphdef.memo.get('leaf_defs')
  if found is None:
    found = graphdef.memo['leaf_defs'] = leaf_layout(graphdef.root, graphdef.base)
  return found


# -- NNX's view of a GraphDef (GraphDef.nodes) ---------------------------------


def node_view(graphdef: GraphDef) -> tp.Iterator:
  """The graph-mode ``nodes`` list: one entry per object, container and ref, in traversal order.

  Objects are numbered from ``graphdef.base`` in the order met (see ``arbax.defs``),
  the numbering refs use.
  """
  outer = dict(graphdef.outer or ())
  for _, d, index in numbered(graphdef.root, graphdef.base):
    tag = d[0]
    if tag == NODE:
      yield nodedefs.NodeDef(d[1], index, outer.get(index), len(d[3]), d[2])
    elif tag == VAR:
      index = tp.cast(int, index)  # numbered: a Variable always has a number
      slot = None
      if d.ref_slot:
        slot = nodedefs.ArrayRefDef(index + 1, outer.get(index + 1))
      yield nodedefs.VariableDef(d[1], index, outer.get(index), dict(d[2].items), slot)
    elif tag == ARRAYREF:
      yield nodedefs.ArrayRefDef(tp.cast(int, index), outer.get(index))
    elif tag == REF:
      yield nodedefs.NodeRef(d[1])
    elif tag == SEQ:
      yield nodedefs.NodeDef(d[1], None, None, len(d[2]))
    elif tag == MAP:
      yield nodedefs.NodeDef(d[1], None, None, len(d[2]))
    elif tag == JAXNODE:
      yield nodedefs.NodeDef(tp.cast(JaxNodeDef, d).cls, None, None, len(d[3]), d[1])


def path_order(paths: tp.Sequence[tuple]) -> list[int]:
  """The positions of ``paths`` sorted by path (ints before strings at each level)."""
  return sorted(range(len(paths)), key=lambda i: tuple(sort_key(k) for k in paths[i]))


def tree_view(graphdef: GraphDef) -> tp.Iterator:
  """The tree-mode ``nodes`` list: a TreeNodeDef for the whole tree, then its Variables in
  sorted-path order (``index`` is the position in that order)."""
  order = path_order(graphdef.leaf_paths)
  yield nodedefs.TreeNodeDef(_root_type(graphdef.root), _treedef_of(graphdef),
                             tuple((graphdef.leaf_paths[i], i) for i in order))
  layout = leaf_defs(graphdef)
  for position, i in enumerate(order):
    d = layout[i].d
    if d[0] == VAR:
      yield nodedefs.VariableDef(d[1], position, None, dict(d[2].items))


def _root_type(d) -> type:
  tag = d[0]
  if tag in (NODE, VAR, SEQ, MAP, JAXNODE):
    return d.cls
  if tag == STATIC:
    return type(d.value)
  if tag == ARRAYREF:
    return jax.Ref
  return jax.Array


def _treedef_of(graphdef: GraphDef):
  """The JAX treedef of the object, Variables as leaves (built around placeholder leaves)."""
  placeholders = [object() for _ in graphdef.leaf_paths]
  obj = graphdef.build(placeholders)
  return jax.tree_util.tree_structure(obj, is_leaf=lambda x: isinstance(x, Variable))


# -- flatten ---------------------------------------------------------------------------


class Flattened(tp.NamedTuple):
  graphdef: GraphDef
  leaves: list          # Variables, raw arrays and Refs, in pytree order
  paths: list           # the path of each leaf
  nodes: list           # every object met, numbered (the index of refs; see arbax.defs)


def alias_error(what: str, path, first_path, context: str = 'tree-mode',
                type_name: str | None = None, obj=None) -> AliasError:
  """The tree-mode sharing error: the NNX guide's sentence, NNX's "Duplicate ... found at paths"
  listing, and the fix."""
  shared = 'shared Variable references' if what == 'Variable' else 'shared references (or cycles)'
  return AliasError(
      f'{what} at {format_path(path)} was already seen at {format_path(first_path)}. '
      f'{context} does not support {shared}.\n'
      f'Duplicate {type_name or what} found at paths:\n\n'
      f'  - {format_path(first_path)}\n  - {format_path(path)}\n\n'
      'Tree mode (graph=False) does not support shared references. Pass graph=True (or use '
      'nnx.set_graph_mode(True)) to allow sharing, or make the two references separate objects '
      '(e.g. with nnx.clone).', obj=obj, path=path,
      first_path=first_path)


def not_a_pytree_error(x, context: str, path, *, compat: bool = False) -> ValueError:
  """The error of a tree-mode walk meeting an object of a ``pytree=False`` class (``compat``:
  also point at the ``nnx.compat`` version of the function ``context`` names)."""
  hint = f' (or use the nnx.compat version of {context})' if compat else ''
  return ValueError(
      f"Cannot use '{context}' with graph=False on a '{type(x).__name__}' instance that has "
      f'pytree=False. Found at path: {format_path(path)}. Classes declared with pytree=False are '
      f'not JAX pytrees, so tree mode cannot look inside them: pass graph=True{hint}, or declare '
      'the class without pytree=False.')


_PLAIN_STATIC = (int, float, complex, str, bool, type)


def flatten(obj, *, graph: bool | None = None, prefix: tuple = (),
            context: str = 'tree-mode split', mark_seen: bool = False,
            known: tp.Sequence = (), watch: list | None = None) -> Flattened:
  """Walk ``obj`` once: its GraphDef, its leaves with their paths, and the objects met.

  ``mark_seen`` flags the Pytrees met so later structural changes to them
  invalidate transform caches (see ``_structure``). ``watch``, if given, receives
  the mutable containers met (Pytree ``__dict__``s, lists, dicts, States, static
  lists with their snapshots, mutable pytree nodes): ``_structure.Watch(watch)``
  then tells, per call, whether the result may still be reused. In graph mode, objects in
  ``known`` become refs to their number there: ``unflatten(..., nodes=<list of the
  same length>)`` then resolves them to that list's objects (a transform maps its
  outputs back to the caller's objects this way).
  """
  graph = _settings.graph_mode(graph)
  start = 0 if watch is None else len(watch)

  def attempt():
    if watch is not None:
      del watch[start:]  # a retry (see _deep) starts afresh
    return _walk_defs(obj, graph, prefix, context, mark_seen, known, watch)

  try:
    root, leaves, paths, nodes, depth = _deep(attempt)
  except RecursionError:
    raise RecursionError(
        f'{context}: the object is nested too deeply to flatten (more than about '
        f'{_MAX_DEPTH} levels). Hold long chains of layers in an nnx.List instead of nesting '
        'them.') from None
  graphdef = GraphDef(root, tuple(paths), graph)
  graphdef.memo['depth'] = depth - len(prefix) if depth else 0  # spares a walk of the defs
  return Flattened(graphdef, leaves, paths, nodes[len(known):])


def _walk_defs(obj, graph: bool, prefix: tuple, context: str, mark_seen: bool, known, watch):
  """One flatten walk: ``(root def, leaves, paths, objects, depth)`` (see ``flatten``; ``depth``:
  the length of the longest path below a container, counting ``prefix``; 0 when none)."""
  deepest = 0
  leaves: list = []
  paths: list = []
  nodes: list = list(known)
  seen: dict = {id(o): (i, ('<input>',)) for i, o in enumerate(known) if o is not None}

  def leaf(x, path, d):
    leaves.append(x)
    paths.append(path)
    return d

  def shared(x, path, what: str, type_name=None):
    if graph:
      return ref_def(seen[id(x)][0])
    raise alias_error(what, path, seen[id(x)][1], context, type_name, x)

  def visit(x, path, attribute=False):
    # `attribute`: x is a Pytree's data attribute itself, where any value but None is a leaf
    # (as JAX sees the Pytree). Inside containers, tree mode follows JAX too (every JAX leaf,
    # an int or a str included, is a leaf), while graph mode keeps non-array values static.
    nonlocal deepest
    if isinstance(x, Variable):
      if id(x) in seen:
        return shared(x, path, 'Variable', type(x).__name__)
      seen[id(x)] = (len(nodes), path)
      nodes.append(x)
      meta = x._meta
      if meta.items.get('ref'):  # its Ref is numbered right after it (see arbax.defs)
        raw = x.get_raw_value()
        if isinstance(raw, jax.Ref):
          seen.setdefault(id(raw), (len(nodes), path))
          nodes.append(raw)
        else:
          nodes.append(None)
      return leaf(x, path, var_def(type(x), meta))
    if isinstance(x, Pytree):  # pytree=False classes too: graph nodes, as in NNX
      if id(x) in seen:
        return shared(x, path, type(x).__name__)
      if not graph and not type(x)._arbax_pytree:
        raise not_a_pytree_error(x, context, path)
      seen[id(x)] = (len(nodes), path)
      nodes.append(x)
      if mark_seen:
        _structure.mark_seen(x)
      keys, aux = node_parts(x)
      d = x.__dict__
      if watch is not None:
        watch.append(d)
        watch.extend((d[k], snap) for k, snap in aux.mutable)
      if keys and len(path) >= deepest:
        deepest = len(path) + 1
      attrs = []
      for k in keys:
        attrs.append((k, visit(d[k], path + (k,), True)))
      return obj_def(type(x), aux, tuple(attrs))
    if isinstance(x, ARRAY_TYPES):
      return leaf(x, path, LEAF_DEF)
    if isinstance(x, jax.Ref):  # a mutable array: state, numbered and shared like an object
      if id(x) in seen:
        return shared(x, path, 'Ref')
      seen[id(x)] = (len(nodes), path)
      nodes.append(x)
      return leaf(x, path, ARRAYREF_DEF)
    t = type(x)
    if t is tuple or t is list:
      if t is list and watch is not None:
        watch.append(x)
      if x and len(path) >= deepest:
        deepest = len(path) + 1
      items = []
      for i, c in enumerate(x):
        items.append(visit(c, path + (i,)))
      return seq_def(t, tuple(items))
    if t is dict or t is State:
      if watch is not None:
        watch.append(x)
      keys = tuple(sorted(x, key=sort_key))
      if keys and len(path) >= deepest:
        deepest = len(path) + 1
      items = []
      for k in keys:
        items.append(visit(x[k], path + (k,)))
      return map_def(t, keys, tuple(items))
    as_leaf = attribute or not graph
    if x is None or isinstance(x, _PLAIN_STATIC) or callable(x):
      return leaf(x, path, LEAF_DEF) if as_leaf and x is not None else static_def(x)
    kids, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # an opaque leaf JAX does not know
      return leaf(x, path, LEAF_DEF) if as_leaf else static_def(x)
    if watch is not None and not isinstance(x, tuple):  # NamedTuples cannot change in place
      watch.append(x)
    keys = tuple(key_name(kp[0]) for kp, _ in kids)
    if keys and len(path) >= deepest:
      deepest = len(path) + 1
    items = []
    for k, (_, c) in zip(keys, kids):
      items.append(visit(c, path + (k,)))
    return jax_node_def(treedef, keys, tuple(items))

  try:
    return visit(obj, prefix), leaves, paths, nodes, deepest
  finally:
    # The closures refer to each other: break the cycle so they (and the leaves) are freed now.
    visit = leaf = shared = _CLEARED  # noqa: F841


_MAX_DEPTH = 10_000
_CLEARED: tp.Any = None  # what _walk_defs's closures are reset to (typed Any: they are functions)


def _deep(fn):
  """``fn()`` for a recursive walk, allowing deep nesting (1,000 Modules inside one another):
  on a RecursionError it is retried once under ``allow_depth``."""
  try:
    return fn()
  except RecursionError:
    pass
  with allow_depth(_MAX_DEPTH, calls_per_level=1):  # the walk calls itself once per level
    return fn()


def unflatten(graphdef: GraphDef | tuple, leaves: tp.Sequence, *, copy_variables: bool = False,
              nodes: list | None = None):
  """Build objects from a GraphDef and its leaves (in pytree order); see ``GraphDef.build``."""
  if not isinstance(graphdef, GraphDef):
    graphdef = GraphDef(named(graphdef), ())
  return graphdef.build(leaves, copy_variables=copy_variables, nodes=nodes)


# -- walking objects: one definition of children, one walker -----------------------------


def children(x, *, graph: bool = True, statics: bool = False) -> list[tuple] | None:
  """``[(key, child)]`` one level below ``x`` in pytree order, or None for a leaf.

  A Variable and a ``jax.Ref`` are leaves; a Pytree's children are its data
  attributes (``statics``: its static attributes too, all sorted by key); a tuple,
  list, dict (or State) its items; any other registered JAX node its children. In
  tree mode a Pytree of a ``pytree=False`` class is a leaf (JAX does not see inside).

      >>> import arbax as nnx
      >>> from arbax import graph
      >>> [k for k, _ in graph.children(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))]
      ['bias', 'kernel']
  """
  if isinstance(x, Variable):
    return None
  if isinstance(x, Pytree):
    if not graph and not type(x)._arbax_pytree:
      return None
    keys, aux = node_parts(x)
    if statics and aux.static:
      keys = sorted((*keys, *(k for k, _ in aux.static)), key=_attr_sort_key)
    d = x.__dict__
    return [(k, d[k]) for k in keys]
  if isinstance(x, jax.Ref):
    return None
  return container_children(x)


def _attr_sort_key(k):
  return (isinstance(k, str), k)


def find_first(root, match: tp.Callable[[tp.Any], bool], *, graph: bool = True
               ) -> tuple[tuple, tp.Any] | None:
  """``(path, value)`` of the first value under ``root`` (itself included) that ``match``
  accepts, walking ``children`` (each object once); None if there is none.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> from arbax import graph
      >>> graph.find_first([1, {'w': nnx.Param(jnp.ones(2))}], lambda v: isinstance(v, nnx.Param))[0]
      (1, 'w')
  """
  return next(iter_matching(root, match, lambda x: children(x, graph=graph)), None)


def walk(node, *, graph: bool, context: str, visit_node: tp.Callable, visit_leaf: tp.Callable,
         visit_dup: tp.Callable, statics: bool = True):
  """Visit everything under ``node``, children before their parent, on an explicit stack.

  ``visit_leaf(x, path)`` for leaves (Variables, arrays, static values),
  ``visit_node(x, path, [(key, child result), ...])`` for Pytrees and containers,
  and ``visit_dup(x, path)`` when graph mode meets a Variable or Pytree again;
  returns the root's result. Tree mode follows the pytree: a Variable met twice or a
  cycle raises a ValueError naming both paths, a shared Pytree without Variables is
  simply visited again, and a ``pytree=False`` object raises.
  """
  seen: dict = {}         # graph mode: every object met; tree mode: the Variables met
  in_progress: dict = {}  # tree mode: the Pytrees on the current path (a cycle returns to one)
  # A frame: [x, path, its (key, child) pairs still to visit (reversed), results, tracked]
  stack: list = []

  def enter(x, path):
    """The result of a leaf or duplicate at once; for a node, push its frame (None)."""
    if isinstance(x, Variable) or isinstance(x, jax.Ref):
      first = seen.get(id(x))
      if first is not None:
        if not graph:
          raise alias_error(type(x).__name__ if isinstance(x, jax.Ref) else 'Variable', path,
                            first, f'tree-mode {context}', type(x).__name__)
        return visit_dup(x, path)
      seen[id(x)] = path
      return visit_leaf(x, path)
    tracked = None
    if isinstance(x, Pytree):
      if not graph and not type(x)._arbax_pytree:
        raise not_a_pytree_error(x, context, path, compat=True)
      tracked = seen if graph else in_progress
      first = tracked.get(id(x))
      if first is not None:
        if not graph:
          raise alias_error(type(x).__name__, path, first, f'tree-mode {context}')
        return visit_dup(x, path)
      tracked[id(x)] = path
    kids = children(x, graph=graph, statics=statics and graph)
    if kids is None:
      return visit_leaf(x, path)
    stack.append([x, path, kids[::-1], [], tracked])
    return _NOTHING

  result = enter(node, ())
  while stack:
    frame = stack[-1]
    pending = frame[2]
    if pending:
      key, child = pending.pop()
      out = enter(child, frame[1] + (key,))
      if out is not _NOTHING:  # a leaf or a duplicate; a node pushed its frame instead
        frame[3].append((key, out))
      continue
    stack.pop()
    x, path, _, results, tracked = frame
    out = visit_node(x, path, results)
    if tracked is in_progress:
      del in_progress[id(x)]
    if stack:
      stack[-1][3].append((path[-1], out))
    else:
      result = out
  return result


_NOTHING = object()


# -- the flatten cache --------------------------------------------------------
# The State API flattens the same model again and again (a training loop calls
# nnx.state / nnx.update every step). An unchanged object flattens to the same
# result. A result is reused while the epoch is unchanged (every structural
# change made through the API bumps it) and its Watch finds every mutable
# container it was made from unchanged (changes made behind the API's back);
# see ``_structure``.


class CachedFlat:
  """A cache entry: the flattening, the objects (weakly) it was made from, and its Watch."""

  __slots__ = ('refs', 'epoch', 'fl', 'memo', 'watch')

  def __init__(self, refs, epoch, fl, watch: _structure.Watch | None = None):
    self.refs = refs
    self.epoch = epoch
    self.fl = fl
    self.memo: dict = {}  # derived data valid as long as the entry (see api.update)
    self.watch = _structure.Watch() if watch is None else watch

  def valid_for(self, roots: tuple) -> bool:
    """Whether this entry still describes ``roots`` (the per-call check)."""
    return (self.epoch == _settings.EPOCH[0] and all(r() is o for r, o in zip(self.refs, roots))
            and self.watch.unchanged())


_CACHE = caches.bounded('flattenings of unchanged objects', maxsize=64)
_ONCE = caches.bounded('roots flattened once, not cached yet', maxsize=256)


def _roots(obj):
  if isinstance(obj, Pytree):
    return (obj,)
  if type(obj) is tuple and obj and all(isinstance(x, (Pytree, Variable)) for x in obj):
    return obj
  return None


def flatten_cached(obj, *, graph: bool | None = None, context: str = 'tree-mode split'):
  """``(Flattened, CachedFlat | None)`` of ``obj``, reusing the last result while it is unchanged.

  The returned lists are shared with the cache: read them, never mutate them.
  """
  graph = _settings.graph_mode(graph)
  roots = _roots(obj)
  if roots is None:
    return flatten(obj, graph=graph, context=context), None
  key = (tuple(map(id, roots)), graph)
  entry = _CACHE.get(key)
  if entry is not None and entry.valid_for(roots):
    if _structure.checking():
      fresh = flatten(obj, graph=graph, context=context)
      _structure.verify(f'the cached flattening ({context})', entry.fl.graphdef, entry.fl.leaves,
                        fresh.graphdef, fresh.leaves, fresh.paths)
    return entry.fl, entry
  if entry is None and _ONCE.pop(key, None) is None:
    # A first sight is not cached: an entry (GraphDef, Watch copies) costs a few times the
    # State, which a one-off nnx.state (a checkpoint, a summary) should not leave behind.
    # (An id reused by a new object only makes its entry come one call early.)
    _ONCE[key] = True
    return flatten(obj, graph=graph, context=context), None
  containers: list = []
  fl = flatten(obj, graph=graph, context=context, mark_seen=True, watch=containers)
  if not _cacheable(fl.graphdef.root):
    return fl, None
  # The entry must not keep the objects alive: it drops the nodes (which hold
  # them), refers to the roots weakly and leaves the cache when one dies.
  watch = _structure.Watch(containers)
  if watch.keeps_alive(roots):  # a cycle back to the roots: the entry would never be evicted
    return fl, None
  kept = Flattened(fl.graphdef, fl.leaves, fl.paths, [])
  evict = _evicter(key)
  try:
    refs = tuple(weakref.ref(o, evict) for o in roots)
  except TypeError:
    return fl, None
  entry = _CACHE[key] = CachedFlat(refs, _settings.EPOCH[0], kept, watch)
  return kept, entry


def _evicter(key):
  def evict(dead_ref):
    entry = _CACHE.get(key)
    if entry is not None and dead_ref in entry.refs:
      del _CACHE[key]
  return evict


def _cacheable(root) -> bool:
  # Every container a flattening walks into is watched; an unhashable value held as a
  # static leaf (compared by equality, kept by reference in the GraphDef) is not, so
  # a tree holding one is flattened every time.
  return not any(d[0] == STATIC and type(d[1]) is Hashed for _, d in iter_defs(root))


# -- used by GraphDef.apply and api.merge --------------------------------------
def merged_leaves(graphdef: GraphDef, states: tp.Sequence) -> list:
  """The leaves of ``states`` in ``graphdef``'s order, checking that they fit exactly.

  ``states`` are States or nested dicts (FlatStates and GraphStates are accepted
  too); for a GraphDef whose root is a leaf, the one non-empty entry is that leaf.
  """
  paths = graphdef.leaf_paths
  if graphdef.skeleton is None:  # a bare Variable / array at the root
    given = [s for s in states if not (isinstance(s, (dict, FlatState)) and not s)]
    if len(given) == 1 and len(paths) == 1:
      leaf = given[0]
      if isinstance(leaf, FlatState) and leaf.paths == ((),):
        leaf = leaf.leaves[0]
      if not isinstance(leaf, (dict, FlatState, GraphState)):
        return [leaf]
  states = [state_mapping(s) for s in states]
  if len(states) == 1:
    out: list = []
    if graphdef.read_state(states[0], out):
      return out
  flat: dict = {}
  for s in states:
    flat.update(flat_dict(s))
  leaves = []
  for path in paths:
    try:
      leaves.append(flat.pop(path))
    except KeyError:
      raise ValueError(f'merge: the states have no value for {format_path(path)}, which the '
                       'GraphDef needs. Pass every State that split returned.') from None
  if flat:
    extra = next(iter(flat))
    raise ValueError(f'merge: the states have a value at {format_path(extra)} that the GraphDef '
                     'has no place for. Was the State made from another structure?')
  return leaves


def state_mapping(s):
  if isinstance(s, dict):
    return s
  if isinstance(s, GraphState):
    return s._state
  if isinstance(s, FlatState):
    return from_flat_state(s)
  raise ValueError(f'merge expects States (or nested dicts) after the GraphDef, got a '
                   f'{type(s).__name__}: {s!r:.80}')


def _leaves_for(graphdef: GraphDef, states) -> list:
  return merged_leaves(graphdef, states)


def _state_of(fl: Flattened):
  return from_flat_state(zip(fl.paths, fl.leaves))
