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

Tree mode (the default) requires every Variable and Pytree to be reachable
once; graph mode (``graph=True``) records later references as refs and
rebuilds them shared. A reference cycle is a ref to an ancestor: graph mode
rebuilds it, tree mode refuses it like any alias.

Speed: a GraphDef compiles itself once into closures that rebuild the object
(``GraphDef.build``), and ``flatten_cached`` reuses the flattening of an
unchanged object (any structural change bumps ``_settings.EPOCH``).
"""
from __future__ import annotations

import typing as tp
import weakref

import jax
import numpy as np

from arbax import _settings
from arbax.errors import format_path
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
  leaf of the matching State lives.
  """

  __slots__ = ('root', 'leaf_paths', '_hash', '_builders', '_has_refs', '_skeleton', 'memo')

  def __init__(self, root: tuple, leaf_paths: tuple):
    self.root = root
    self.leaf_paths = leaf_paths
    self._hash = hash(root)
    self._builders: dict = {}
    self._has_refs = None
    self._skeleton = None
    self.memo: dict = {}  # per-structure caches of the State API (filter partitions, path index)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (isinstance(other, GraphDef) and self._hash == other._hash
                             and self.root == other.root)

  def __repr__(self):
    return f'GraphDef({_describe(self.root)}, num_leaves={len(self.leaf_paths)})'

  def __getstate__(self):
    return (self.root, self.leaf_paths)

  def __setstate__(self, state):
    self.__init__(*state)

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

  def build(self, leaves: tp.Iterable, *, copy_variables: bool = False, nodes: list | None = None):
    """The object described by this GraphDef around ``leaves`` (see ``unflatten``)."""
    if self._has_refs is None:
      self._has_refs = any(d[0] == REF for _, d in iter_defs(self.root))
    track = nodes is not None or self._has_refs
    builder = self._builders.get((track, copy_variables))
    if builder is None:
      builder = self._builders[(track, copy_variables)] = _compile(
          self.root, _Options(track, copy_variables))
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


_END = object()


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


class Flattened(tp.NamedTuple):
  graphdef: GraphDef
  leaves: list          # Variables and raw arrays, in pytree order
  paths: list           # the path of each leaf
  nodes: list           # every Pytree and Variable seen, in order (index of REF defs)


def alias_error(what: str, path, first_path, context: str = 'tree-mode') -> ValueError:
  """The tree-mode sharing error, worded as the NNX guide shows it, plus the fix."""
  shared = 'shared Variable references' if what == 'Variable' else 'shared references (or cycles)'
  return ValueError(
      f'{what} at {format_path(path)} was already seen at {format_path(first_path)}. '
      f'{context} does not support {shared}. Pass graph=True (or use '
      'nnx.graphlib.set_graph_mode(True)) to allow sharing, or make the two references '
      'separate objects.')


def flatten(obj, *, graph: bool | None = None, prefix: tuple = (),
            context: str = 'tree-mode split', mark_seen: bool = False,
            known: tp.Sequence = ()) -> Flattened:
  """Walk ``obj`` once: its GraphDef, its leaves with their paths, and the objects met.

  ``mark_seen`` flags the Pytrees met so later structural changes to them
  invalidate transform caches (see ``_settings.EPOCH``). In graph mode, objects in
  ``known`` become refs to their index there: ``unflatten(..., nodes=<list of the
  same length>)`` then resolves them to that list's objects (a transform maps its
  outputs back to the caller's objects this way).
  """
  graph = _settings.graph_mode(graph)
  leaves: list = []
  paths: list = []
  nodes: list = list(known)
  seen: dict = {id(o): (i, ('<input>',)) for i, o in enumerate(known)}

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
  return Flattened(GraphDef(root, tuple(paths)), leaves, paths, nodes[len(known):])


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
  return build_node


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
# result, and every structural change of a flattened (``mark_seen``) object
# bumps _settings.EPOCH, so a result stays valid while the epoch is unchanged.
# Only trees made of objects that report their changes qualify: Pytrees,
# Variables, tuples and immutable JAX nodes; a plain list or dict may change
# silently, so a tree holding one is flattened every time.


class CachedFlat:
  """A cache entry: the flattening and the objects (weakly) it was made from."""

  __slots__ = ('refs', 'epoch', 'fl', 'memo')

  def __init__(self, refs, epoch, fl):
    self.refs = refs
    self.epoch = epoch
    self.fl = fl
    self.memo: dict = {}  # derived data valid as long as the entry (see api.update)


_CACHE: dict = {}
_CACHE_SIZE = 64


def _roots(obj):
  if isinstance(obj, Pytree) and type(obj)._arbax_pytree:
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
  if entry is not None and entry.epoch == _settings.EPOCH[0] and all(
      r() is o for r, o in zip(entry.refs, roots)):
    return entry.fl, entry
  fl = flatten(obj, graph=graph, context=context, mark_seen=True)
  if not _cacheable(fl.graphdef.root):
    return fl, None
  # The entry must not keep the objects alive: it drops the nodes (which hold
  # them), refers to the roots weakly and leaves the cache when one dies.
  kept = Flattened(fl.graphdef, fl.leaves, fl.paths, [])
  evict = _evicter(key)
  try:
    refs = tuple(weakref.ref(o, evict) for o in roots)
  except TypeError:
    return fl, None
  if len(_CACHE) >= _CACHE_SIZE:
    _CACHE.pop(next(iter(_CACHE)))
  entry = _CACHE[key] = CachedFlat(refs, _settings.EPOCH[0], kept)
  return kept, entry


def _evicter(key):
  def evict(dead_ref):
    entry = _CACHE.get(key)
    if entry is not None and dead_ref in entry.refs:
      del _CACHE[key]
  return evict


def _cacheable(root) -> bool:
  # Plain lists and dicts can change without bumping the epoch. States are dicts too, but
  # the ones held by objects (an Optimizer's moments) are made by arbax and never edited
  # in place, so they may be cached like tuples.
  for _, d in iter_defs(root):
    tag = d[0]
    if tag == SEQ and d[1] is not tuple or tag == MAP and d[1] is not State:
      return False
    if tag == JAXNODE and not issubclass(d[1].node_data()[0], tuple):
      return False
  return True


# -- used by GraphDef.apply (api.merge / api.state are the public versions) ---
def _leaves_for(graphdef: GraphDef, states) -> list:
  from arbax.api import merged_leaves
  return merged_leaves(graphdef, states)


def _state_of(fl: Flattened):
  from arbax.state import from_flat_state
  return from_flat_state(zip(fl.paths, fl.leaves))


__all__ = ['GraphDef', 'Flattened', 'flatten', 'unflatten', 'flatten_cached', 'new_node']
