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
where shared references point); the leaves are the Variables and raw arrays in
pytree order (attributes sorted by name, like ``jax.tree.leaves``). Equal
structures give equal GraphDefs, which hash once: they are static arguments
of ``jax.jit``.

Tree mode (``graph=False``) requires every Variable and Pytree to be reachable
once; graph mode (the default, as in NNX) records later references as refs and
rebuilds them shared. A reference cycle is a ref to an ancestor: graph mode
rebuilds it, tree mode refuses it like any alias.

Speed: a GraphDef compiles itself once into closures that rebuild the object
(``GraphDef.build``), and ``flatten_cached`` reuses the flattening of an
unchanged object (any structural change bumps ``_settings.EPOCH``).
"""
from __future__ import annotations

import sys
import types
import typing as tp
import weakref

import jax
import numpy as np

from arbax import _settings, _structure
from arbax.errors import AliasError, format_path
from arbax.nodedefs import NodeDef, NodeRef, TreeNodeDef, VariableDef
from arbax.pytree import Pytree, new_node, node_parts  # noqa: F401 (new_node re-exported)
from arbax.state import State, compile_getter, skeleton
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
  leaf of the matching State lives. ``graph`` records the mode it was made in
  (tree-mode and graph-mode GraphDefs differ, as in NNX). ``nodes`` is NNX's
  view of the structure (``NodeDef``, ``VariableDef``, ``NodeRef``,
  ``TreeNodeDef``; see ``arbax.nodedefs``), computed on first access.

  Two annotations serve the split/merge contexts (``nnx.split_context``):
  ``base``, the index of its first object when it continues the index space
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
    self._skeleton = None
    self.memo: dict = {}  # per-structure caches of the State API (filter partitions, path index)

  __class_getitem__ = classmethod(types.GenericAlias)  # ``GraphDef[Model]`` in annotations

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, GraphDef) and self._hash == other._hash
                             and self.graph == other.graph and self.base == other.base
                             and self.outer == other.outer and self.root == other.root)

  def __repr__(self):
    return f'GraphDef({_describe(self.root)}, num_leaves={len(self.leaf_paths)})'

  def __getstate__(self):
    return (self.root, self.leaf_paths, self.graph, self.base, self.outer)

  def __setstate__(self, state):
    root, paths, *rest = state  # older pickles hold only (root, leaf_paths)
    graph_, base, outer = (*rest, *(True, 0, None)[len(rest):])
    self.__init__(root, paths, graph_, base=base, outer=outer)

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

  def with_outer(self, outer: tuple | None, base: int | None = None) -> 'GraphDef':
    """The same structure with other context annotations (``base`` / ``outer``)."""
    if outer == self.outer and (base is None or base == self.base):
      return self
    return GraphDef(self.root, self.leaf_paths, self.graph,
                    base=self.base if base is None else base, outer=outer)

  def build_from_state(self, state):
    """``merge(self, state)`` for one full State, reading it while building (the fast path).

    Returns ``NO_FIT`` when ``state`` is not shaped like this GraphDef's State, or when
    the GraphDef has shared references; the caller then takes the general path.
    """
    builder = self.memo.get('from_state')
    if builder is None:
      refs = any(d[0] == REF for _, d in iter_defs(self.root))
      builder = self.memo['from_state'] = None if refs or self.skeleton is None else _fcompile(
          self.root)
    if builder is None:
      return NO_FIT
    try:
      return builder(state)
    except (_NoFit, KeyError, TypeError, IndexError):
      return NO_FIT

  def read_state(self, state, out: list) -> bool:
    """Append the leaves of a full ``state`` of this GraphDef to ``out``; False if it does not fit."""
    getter = self.memo.get('getter')
    if getter is None:
      skel = self.skeleton
      getter = self.memo['getter'] = (lambda s, o: False) if skel is None else compile_getter(skel)
    return getter(state, out)

  @property
  def skeleton(self) -> tuple | None:
    """The key structure of this GraphDef's full State (None when a leaf sits at the root)."""
    if self._skeleton is None:
      paths = self.leaf_paths
      self._skeleton = False if any(not p for p in paths) else skeleton(paths)
    return self._skeleton or None

  def build(self, leaves: tp.Iterable, *, copy_variables: bool = False, nodes: list | None = None,
            reuse: tp.Sequence | None = None):
    """The object described by this GraphDef around ``leaves`` (see ``unflatten``).

    ``reuse`` (one entry per Pytree / Variable of the GraphDef, in traversal
    order) updates existing objects in place instead of making new ones where
    its entry is not None: a Pytree gets the described attributes, a Variable
    the leaf as its value and the described metadata.
    """
    if self._has_refs is None:
      self._has_refs = any(d[0] == REF for _, d in iter_defs(self.root))
    reusing = reuse is not None
    track = nodes is not None or self._has_refs or reusing
    builder = self._builders.get((track, copy_variables, reusing))
    if builder is None:
      builder = self._builders[(track, copy_variables, reusing)] = _compile(
          self.root, _Options(track, copy_variables, reusing))
    if reusing:
      nodes = _ReusingNodes(reuse)
    it = iter(leaves)
    try:
      out = builder(it, [] if nodes is None else nodes)
    except StopIteration:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(self.leaf_paths)}, '
                       'got fewer.') from None
    if next(it, _END) is not _END:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(self.leaf_paths)}, '
                       'got more.')
    return out

  def apply(self, state, *states):
    """``graphdef.apply(state)(*args)`` calls the merged object and returns ``(out, (graphdef, state))``."""
    def call(*args, **kwargs):
      obj = self.build(_leaves_for(self, (state, *states)))
      out = obj(*args, **kwargs)
      fl = flatten(obj, graph=True)
      return out, (fl.graphdef, _state_of(fl))
    return call

  def build_into(self, leaves: tp.Sequence, nodes: list, reuse: tp.Mapping[int, tp.Any], *,
                 copy_variables: bool = False, recreate_variables: bool = True):
    """Like ``build``, but the objects whose index is in ``reuse`` are updated in place.

    A reused Pytree keeps its identity and gets the attributes this GraphDef
    describes (its old ones are dropped); a reused Variable takes the value
    (and, from a Variable leaf, the metadata) of its leaf. ``nodes`` holds the
    objects of the indices before ``self.base`` (refs may point at them) and
    receives the objects built. With ``recreate_variables=False`` raw leaves stay raw.
    The slow, general path of the update contexts (``nnx.merge_context``).
    """
    it = iter(leaves)
    out = _Rebuild(it, nodes, reuse, copy_variables, recreate_variables).build(self.root)
    if next(it, _END) is not _END:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(self.leaf_paths)}, '
                       'got more.')
    return out


_END = object()


class _Rebuild:
  """The interpretive builder behind ``GraphDef.build_into`` (see there)."""

  def __init__(self, leaves, nodes, reuse, copy_variables, recreate_variables):
    self.leaves, self.nodes, self.reuse = leaves, nodes, reuse
    self.copy, self.recreate = copy_variables, recreate_variables

  def next_leaf(self):
    try:
      return next(self.leaves)
    except StopIteration:
      raise ValueError('Incorrect number of leaves: the GraphDef needs more than were given.'
                       ) from None

  def build(self, d):
    tag = d[0]
    if tag == VAR:
      return self.variable(d)
    if tag == NODE:
      return self.node(d)
    if tag == LEAF:
      return self.next_leaf()
    if tag == STATIC:
      return d[1].value if isinstance(d[1], _Hashed) else d[1]
    if tag == REF:
      return self.nodes[d[1]]
    if tag == SEQ:
      return d[1]([self.build(c) for c in d[2]])
    if tag == MAP:
      out = d[1]()
      for k, c in zip(d[2], d[3]):
        dict.__setitem__(out, k, self.build(c))
      return out
    return d[1].unflatten([self.build(c) for c in d[3]])

  def variable(self, d):
    cls, meta = d[1], d[2]
    leaf = self.next_leaf()
    target = self.reuse.get(len(self.nodes))
    if target is not None:
      if not isinstance(target, Variable):
        raise ValueError(f'Expected a Variable for index {len(self.nodes)}, but the outer object '
                         f'there is a {type(target).__name__}.')
      object.__setattr__(target, '_value', leaf._value if isinstance(leaf, Variable) else leaf)
      if isinstance(leaf, Variable) and leaf._meta is not target._meta:
        object.__setattr__(target, '_meta', leaf._meta)
        _settings.bump_epoch()
      out = target
    elif isinstance(leaf, Variable):
      out = leaf.copy() if self.copy else leaf
      if type(out) is not cls:
        out = cls._from_parts(out._value, out._meta)
    else:
      out = cls._from_parts(leaf, meta) if self.recreate else leaf
    self.nodes.append(out)
    return out

  def node(self, d):
    cls, aux, children = d[1], d[2], d[3]
    index = len(self.nodes)
    obj = self.reuse.get(index)
    if obj is None:
      obj = object.__new__(cls)
    elif type(obj) is not cls:
      raise ValueError(f'Expected a node of type {cls.__name__} for index {index}, but the outer '
                       f'object there is a {type(obj).__name__}.')
    else:
      _settings.bump_epoch()  # its structure may change: transform caches must not trust it
    self.nodes.append(obj)  # before the children: they may refer back to it (cycles)
    kinds, template, hook = _node_template(cls, aux)
    od = template.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, c in children:
      od[k] = self.build(c)
    object.__setattr__(obj, '__dict__', od)
    if hook is not None:
      hook(obj)
    return obj


# A GraphDef passes through jax.jit / jax.tree as a pytree with no leaves: it is all static.
jax.tree_util.register_pytree_node(GraphDef, lambda g: ((), g), lambda g, _: g)


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


# -- NNX's view of a GraphDef (GraphDef.nodes) ---------------------------------


def node_view(graphdef: GraphDef) -> tp.Iterator:
  """The graph-mode ``nodes`` list: one entry per object, container and ref, in traversal order.

  Objects and Variables are numbered from ``graphdef.base`` in the order met,
  the numbering refs use.
  """
  outer = dict(graphdef.outer or ())
  index = graphdef.base
  for _, d in iter_defs(graphdef.root):
    tag = d[0]
    if tag == NODE or tag == VAR:
      if tag == NODE:
        yield NodeDef(d[1], index, outer.get(index), len(d[3]), d[2])
      else:
        yield VariableDef(d[1], index, outer.get(index), dict(d[2].items))
      index += 1
    elif tag == REF:
      yield NodeRef(d[1])
    elif tag == SEQ:
      yield NodeDef(d[1], None, None, len(d[2]))
    elif tag == MAP:
      yield NodeDef(d[1], None, None, len(d[2]))
    elif tag == JAXNODE:
      yield NodeDef(d[1].node_data()[0], None, None, len(d[3]), d[1])


def path_order(paths: tp.Sequence[tuple]) -> list[int]:
  """The positions of ``paths`` sorted by path (ints before strings at each level)."""
  return sorted(range(len(paths)), key=lambda i: tuple(_sort_key(k) for k in paths[i]))


def tree_view(graphdef: GraphDef) -> tp.Iterator:
  """The tree-mode ``nodes`` list: a TreeNodeDef for the whole tree, then its Variables in
  sorted-path order (``index`` is the position in that order)."""
  root = graphdef.root
  order = path_order(graphdef.leaf_paths)
  yield TreeNodeDef(_root_type(root), _treedef_of(graphdef),
                    tuple((graphdef.leaf_paths[i], i) for i in order))
  var_defs = [d for _, d in iter_defs(root) if d[0] == VAR]
  kinds = [d[0] for _, d in iter_defs(root) if d[0] in (VAR, LEAF)]
  var_of_leaf = {}
  it = iter(var_defs)
  for i, kind in enumerate(kinds):
    if kind == VAR:
      var_of_leaf[i] = next(it)
  for position, i in enumerate(order):
    d = var_of_leaf.get(i)
    if d is not None:
      yield VariableDef(d[1], position, None, dict(d[2].items))


def _root_type(d) -> type:
  tag = d[0]
  if tag in (NODE, VAR, SEQ, MAP):
    return d[1]
  if tag == JAXNODE:
    return d[1].node_data()[0]
  if tag == STATIC:
    return type(d[1].value if isinstance(d[1], _Hashed) else d[1])
  return jax.Array


def _treedef_of(graphdef: GraphDef):
  """The JAX treedef of the object, Variables as leaves (built around placeholder leaves)."""
  placeholders = [object() for _ in graphdef.leaf_paths]
  obj = graphdef.build(placeholders)
  return jax.tree_util.tree_structure(obj, is_leaf=lambda x: isinstance(x, Variable))


class Flattened(tp.NamedTuple):
  graphdef: GraphDef
  leaves: list          # Variables and raw arrays, in pytree order
  paths: list           # the path of each leaf
  nodes: list           # every Pytree and Variable seen, in order (index of REF defs)


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
      'Pass graph=True (or use nnx.set_graph_mode(True)) to allow sharing, or make the two '
      'references separate objects (e.g. with nnx.clone).', obj=obj, path=path,
      first_path=first_path)


def flatten(obj, *, graph: bool | None = None, prefix: tuple = (),
            context: str = 'tree-mode split', mark_seen: bool = False,
            known: tp.Sequence = (), watch: list | None = None) -> Flattened:
  """Walk ``obj`` once: its GraphDef, its leaves with their paths, and the objects met.

  ``mark_seen`` flags the Pytrees met so later structural changes to them
  invalidate transform caches (see ``_structure``). ``watch``, if given, receives
  the mutable containers met (Pytree ``__dict__``s, lists, dicts, States, static
  lists with their snapshots, mutable pytree nodes): ``_structure.Watch(watch)``
  then tells, per call, whether the result may still be reused. In graph mode, objects in
  ``known`` become refs to their index there: ``unflatten(..., nodes=<list of the
  same length>)`` then resolves them to that list's objects (a transform maps its
  outputs back to the caller's objects this way).
  """
  graph = _settings.graph_mode(graph)
  leaves: list = []
  paths: list = []
  nodes: list = list(known)
  seen: dict = {id(o): (i, ('<input>',)) for i, o in enumerate(known)}

  ref_paths: dict = {}

  def raw_leaf(x, path):
    leaves.append(x)
    paths.append(path)
    return LEAF_DEF

  def visit(x, path, attribute=False):
    # `attribute`: x is a Pytree's data attribute itself, where any value but None is a leaf
    # (as JAX sees the Pytree); inside containers, graph mode keeps non-array values static.
    if isinstance(x, Variable):
      key = id(x)
      if key in seen:
        if graph:
          return (REF, seen[key][0])
        raise alias_error('Variable', path, seen[key][1], context, type(x).__name__, x)
      seen[key] = (len(nodes), path)
      nodes.append(x)
      leaves.append(x)
      paths.append(path)
      return (VAR, type(x), x._meta)
    if isinstance(x, Pytree):  # pytree=False classes too: graph nodes, as in NNX
      key = id(x)
      if key in seen:
        if graph:
          return (REF, seen[key][0])
        raise alias_error(type(x).__name__, path, seen[key][1], context, obj=x)
      if not graph and not type(x)._arbax_pytree:
        raise ValueError(
            f"Cannot use '{context}' with graph=False on a '{type(x).__name__}' instance that has "
            f'pytree=False. Found at path: {format_path(path)}. Classes declared with pytree=False '
            'are not JAX pytrees, so tree mode cannot look inside them: pass graph=True, or '
            'declare the class without pytree=False.')
      seen[key] = (len(nodes), path)
      nodes.append(x)
      if mark_seen:
        _structure.mark_seen(x)
      keys, aux = node_parts(x)
      d = x.__dict__
      if watch is not None:
        watch.append(d)
        watch.extend((d[k], snap) for k, snap in aux.mutable)
      return (NODE, type(x), aux, tuple((k, visit(d[k], path + (k,), True)) for k in keys))
    if isinstance(x, ARRAY_TYPES):
      return raw_leaf(x, path)
    if isinstance(x, jax.Ref):  # a mutable array: state, and shared like a Variable
      first = ref_paths.setdefault(id(x), path)
      if first is not path and not graph:
        raise alias_error('Ref', path, first, context, obj=x)
      return raw_leaf(x, path)
    t = type(x)
    if t is tuple or t is list:
      if t is list and watch is not None:
        watch.append(x)
      return (SEQ, t, tuple(visit(c, path + (i,)) for i, c in enumerate(x)))
    if t is dict or t is State:
      if watch is not None:
        watch.append(x)
      keys = tuple(sorted(x, key=_sort_key))
      return (MAP, t, keys, tuple(visit(x[k], path + (k,)) for k in keys))
    if x is None or isinstance(x, (int, float, complex, str, bool, type)) or callable(x):
      return raw_leaf(x, path) if attribute and x is not None else _static_def(x)
    children_with_keys, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda y: y is not x)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # an opaque leaf JAX does not know
      return raw_leaf(x, path) if attribute else _static_def(x)
    if watch is not None and not isinstance(x, tuple):  # NamedTuples cannot change in place
      watch.append(x)
    keys = tuple(_key_of(kp[0]) for kp, _ in children_with_keys)
    return (JAXNODE, treedef, keys,
            tuple(visit(c, path + (k,)) for k, (_, c) in zip(keys, children_with_keys)))

  try:
    root = visit(obj, prefix)
  except RecursionError:
    raise RecursionError(
        f'{context}: the object is nested too deeply to flatten. Each level of nesting (a '
        f"Module holding a Module ...) takes about two of Python's {sys.getrecursionlimit()} "
        'allowed stack frames. Hold long chains of layers in an nnx.List instead of nesting '
        'them, or raise the limit with sys.setrecursionlimit(...).') from None
  return Flattened(GraphDef(root, tuple(paths), graph), leaves, paths, nodes[len(known):])


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
  if not isinstance(graphdef, GraphDef):
    graphdef = GraphDef(graphdef, ())
  return graphdef.build(leaves, copy_variables=copy_variables, nodes=nodes)


# -- compiled builders --------------------------------------------------------
# Each def compiles to a closure ``build(leaves_iterator, nodes) -> object``, so a
# GraphDef rebuilds without re-dispatching on tags. ``track`` (append every
# Pytree and Variable to ``nodes``, which refs index) and ``copy`` (copy the
# Variables) are fixed at compile time; without them a Variable child of a node
# is placed inline, the common case of merge.


class _Options(tp.NamedTuple):
  track: bool
  copy: bool
  reuse: bool = False


class _ReusingNodes(list):
  """The ``nodes`` list of a reusing build: also knows which existing object each index reuses."""

  def __init__(self, reuse: tp.Sequence):
    super().__init__()
    self.reuse = reuse


def _adopt_dict(obj, cls, new_dict: dict) -> None:
  """Give an existing Pytree the attributes ``new_dict`` describes, keeping its own bookkeeping
  entries (``_arbax_*`` keys the template does not set) and the identity of its ``__dict__``."""
  d = obj.__dict__
  kept = {k: v for k, v in d.items() if isinstance(k, str) and k.startswith('_arbax_')
          and k not in new_dict}
  d.clear()
  d.update(new_dict)
  d.update(kept)
  if type(obj) is not cls:
    obj.__class__ = cls


def _node_template(cls, aux: PytreeAux):
  """What every rebuilt node of this structure starts from: its attribute kinds, a ``__dict__``
  template (attribute order of the original, which repr shows; data slots filled by the
  caller) and the class's after-unflatten hook, if it has one."""
  kinds = {k: False for k, _ in aux.static}
  kinds.update((k, True) for k in aux.data_keys)
  template = {'_arbax_kinds': None, '_arbax_cache': (aux.data_keys, aux)}
  template.update((k, None) for k in aux.order)
  template.update(aux.static)
  hook = cls._arbax_after_unflatten
  return kinds, template, (None if hook is Pytree._arbax_after_unflatten else hook)


def _compile(d, opts: _Options) -> tp.Callable:
  return _COMPILERS[d[0]](d, opts)


def _var_fixer(cls, meta, copy: bool):
  """What a leaf at a Variable def becomes: the Variable itself, a copy, or a new one."""
  from_parts = cls._from_parts

  def fix(leaf):
    if isinstance(leaf, Variable):
      if copy:
        leaf = leaf.copy()
      if type(leaf) is not cls:
        leaf = from_parts(leaf._value, leaf._meta)
      return leaf
    return from_parts(leaf, meta)
  return fix


def _compile_var(d, opts):
  fix = _var_fixer(d[1], d[2], opts.copy)
  track = opts.track
  if opts.reuse:
    meta, set_attr = d[2], object.__setattr__

    def reuse_var(it, nodes):
      old = nodes.reuse[len(nodes)]
      leaf = next(it)
      if old is None:
        var = fix(leaf)
      else:
        var = old
        set_attr(var, '_value', leaf._value if isinstance(leaf, Variable) else leaf)
        if var._meta is not meta:
          set_attr(var, '_meta', meta)
      nodes.append(var)
      return var
    return reuse_var

  def build_var(it, nodes):
    leaf = fix(next(it))
    if track:
      nodes.append(leaf)
    return leaf
  return build_var


def _compile_node(d, opts):
  cls, aux, children = d[1], d[2], d[3]
  inline = not opts.track and not opts.copy
  specs = []  # (key, Variable class or None, fixer or child builder)
  for k, c in children:
    if inline and c[0] == VAR:
      specs.append((k, c[1], _var_fixer(c[1], c[2], False)))
    else:
      specs.append((k, None, _compile(c, opts)))
  specs = tuple(specs)
  kinds, template, hook = _node_template(cls, aux)
  new, set_dict = object.__new__, object.__setattr__
  track = opts.track

  def build_node(it, nodes):
    obj = new(cls)
    if track:
      nodes.append(obj)  # before the children: refs (cycles) may point back at it
    od = template.copy()
    od['_arbax_kinds'] = kinds.copy()
    set_dict(obj, '__dict__', od)
    for k, var_cls, b in specs:
      if var_cls is None:
        od[k] = b(it, nodes)
      else:
        leaf = next(it)
        od[k] = leaf if type(leaf) is var_cls else b(leaf)
    if hook is not None:
      hook(obj)
    return obj

  def reuse_node(it, nodes):
    old = nodes.reuse[len(nodes)]
    obj = new(cls) if old is None else old
    nodes.append(obj)
    od = template.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, _, b in specs:
      od[k] = b(it, nodes)
    if old is None:
      set_dict(obj, '__dict__', od)
    else:
      _adopt_dict(obj, cls, od)
    if hook is not None:
      hook(obj)
    return obj
  return reuse_node if opts.reuse else build_node


def _compile_leaf(d, opts):
  def build_leaf(it, nodes):
    return next(it)
  return build_leaf


def _compile_static(d, opts):
  value = d[1].value if isinstance(d[1], _Hashed) else d[1]

  def build_static(it, nodes):
    return value
  return build_static


def _compile_ref(d, opts):
  index = d[1]

  def build_ref(it, nodes):
    return nodes[index]
  return build_ref


def _compile_seq(d, opts):
  t, builders = d[1], tuple(_compile(c, opts) for c in d[2])

  def build_seq(it, nodes):
    return t([b(it, nodes) for b in builders])
  return build_seq


def _compile_map(d, opts):
  t, pairs = d[1], tuple(zip(d[2], (_compile(c, opts) for c in d[3])))

  def build_map(it, nodes):
    out = t()
    for k, b in pairs:
      dict.__setitem__(out, k, b(it, nodes))
    return out
  return build_map


def _compile_jaxnode(d, opts):
  treedef, builders = d[1], tuple(_compile(c, opts) for c in d[3])

  def build_jaxnode(it, nodes):
    return treedef.unflatten([b(it, nodes) for b in builders])
  return build_jaxnode


# -- fused builders: read a State while building (merge's fast path) ----------
# Each def with leaves compiles to ``f(entry)`` where ``entry`` is its part of
# the State (the leaf itself for a Variable); defs without leaves get None. Any
# mismatch between the State and the GraphDef raises _NoFit (or the KeyError of
# a missing key), and merge falls back to matching paths one by one.

NO_FIT = object()


class _NoFit(Exception):
  pass


_BRANCHES = frozenset({dict, State})


def _num_leaves(d) -> int:
  tag = d[0]
  if tag in (VAR, LEAF):
    return 1
  if tag == NODE:
    return sum(_num_leaves(c) for _, c in d[3])
  if tag == SEQ:
    return sum(_num_leaves(c) for c in d[2])
  if tag in (MAP, JAXNODE):
    return sum(_num_leaves(c) for c in d[3])
  return 0


def _fcompile(d):
  tag = d[0]
  if tag == VAR:
    cls, fix = d[1], _var_fixer(d[1], d[2], False)

    def read_var(leaf):
      if type(leaf) is cls:
        return leaf
      if type(leaf) in _BRANCHES:
        raise _NoFit
      return fix(leaf)
    return read_var
  if tag == LEAF:
    def read_leaf(leaf):
      if type(leaf) in _BRANCHES:
        raise _NoFit
      return leaf
    return read_leaf
  if tag == STATIC:
    value = d[1].value if isinstance(d[1], _Hashed) else d[1]

    def read_static(_):
      return value
    return read_static
  if tag == NODE:
    return _fcompile_node(d)
  keys = tuple(range(len(d[2]))) if tag == SEQ else d[2]
  defs = d[2] if tag == SEQ else d[3]
  specs, expected = _child_specs(keys, defs)
  if tag == SEQ:
    t = d[1]

    def read_seq(level):
      return t(_read_children(level, specs, expected).values())
    return read_seq
  if tag == MAP:
    t = d[1]

    def read_map(level):
      out = t()
      dict.update(out, _read_children(level, specs, expected))
      return out
    return read_map
  treedef = d[1]

  def read_jaxnode(level):
    return treedef.unflatten(list(_read_children(level, specs, expected).values()))
  return read_jaxnode


def _child_specs(keys, defs):
  """``((key, reader, has_leaves), ...)`` and how many keys the State level must have."""
  specs = tuple((k, _fcompile(c), _num_leaves(c) > 0) for k, c in zip(keys, defs))
  return specs, sum(1 for _, _, has in specs if has)


def _read_children(level, specs, expected) -> dict:
  if expected and (type(level) not in _BRANCHES or len(level) != expected):
    raise _NoFit
  return {k: f(level[k] if has else None) for k, f, has in specs}


def _fcompile_node(d):
  cls, aux, children = d[1], d[2], d[3]
  specs, expected = _child_specs([k for k, _ in children], [c for _, c in children])
  inline = tuple((k, c[1], f) if c[0] == VAR else (k, None, f)
                 for (k, f, _), (_, c) in zip(specs, children))
  empty = tuple((k, f) for k, f, has in specs if not has)
  filled = tuple(spec for spec, (_, _, has) in zip(inline, specs) if has)
  kinds, template, hook = _node_template(cls, aux)
  new, set_dict = object.__new__, object.__setattr__

  def read_node(level):
    if expected and (type(level) not in _BRANCHES or len(level) != expected):
      raise _NoFit
    obj = new(cls)
    od = template.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, var_cls, f in filled:
      entry = level[k]
      od[k] = entry if type(entry) is var_cls else f(entry)
    for k, f in empty:
      od[k] = f(None)
    set_dict(obj, '__dict__', od)
    if hook is not None:
      hook(obj)
    return obj
  return read_node


_COMPILERS = {VAR: _compile_var, NODE: _compile_node, LEAF: _compile_leaf,
              STATIC: _compile_static, REF: _compile_ref, SEQ: _compile_seq, MAP: _compile_map,
              JAXNODE: _compile_jaxnode}


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


_CACHE: dict = {}
_CACHE_SIZE = 64


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
  if len(_CACHE) >= _CACHE_SIZE:
    _CACHE.pop(next(iter(_CACHE)))
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
  return not any(d[0] == STATIC and isinstance(d[1], _Hashed) for _, d in iter_defs(root))


# -- used by GraphDef.apply (api.merge / api.state are the public versions) ---
def _leaves_for(graphdef: GraphDef, states) -> list:
  from arbax.api import merged_leaves
  return merged_leaves(graphdef, states)


def _state_of(fl: Flattened):
  from arbax.state import from_flat_state
  return from_flat_state(zip(fl.paths, fl.leaves))


__all__ = ['GraphDef', 'Flattened', 'flatten', 'unflatten', 'flatten_cached', 'new_node']
