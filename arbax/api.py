"""The functional State API: split, merge, state, update, clone, pop and friends.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    ...     self.n = nnx.BatchStat(jnp.zeros(()))
    >>> foo = Foo()
    >>> graphdef, params, rest = nnx.split(foo, nnx.Param, ...)
    >>> list(params), list(rest)
    (['w'], ['n'])
    >>> nnx.merge(graphdef, params, rest).w is foo.w    # merge shares the Variables
    True
    >>> nnx.update(foo, {'n': jnp.ones(())}); float(foo.n[...])
    1.0

``split`` and ``state`` return the object's own Variables (no copies), so a
State is a live view; ``merge`` builds new Pytrees around them (``copy=True``
copies them too) and ``update`` writes values into the existing Variables.

Tree mode (``graph=False``, the default) refuses shared references with a
ValueError naming both paths; graph mode stores them once and ``merge``
rebuilds them shared.
"""
from __future__ import annotations

import typing as tp
import warnings

import jax
import numpy as np

from arbax import _settings
from arbax import filters as filterlib
from arbax.errors import TraceContextError, format_path
from arbax.graph import (NO_FIT, GraphDef, Flattened, alias_error, flatten as _flatten, flatten_cached,
                         _sort_key)
from arbax.pytree import List, Pytree, node_parts
from arbax.state import (FlatState, compile_builder, flat_dict, from_flat_state, skeleton,
                         unmatched_error, map_state)
from arbax.variables import Variable, current_trace

# -- split / state ------------------------------------------------------------


def _groups(fl: Flattened, filters: tuple, *, strict: bool) -> list[tuple[list[int], tp.Any]]:
  """For each filter: the indices of the leaves it takes and the builder of their State.

  Structural filters (types, tags, paths) give the same answer for the same
  GraphDef, so the answer is memoized on it.
  """
  graphdef = fl.graphdef
  key = ('groups', filters, strict)
  try:
    found = graphdef.memo.get(key)
  except TypeError:  # an unhashable filter (a list): never memoized
    found = key = None
  if found is not None:
    return found
  predicates = filterlib.filters_to_predicates(filters)
  raw = any(not isinstance(leaf, Variable) for leaf in fl.leaves)
  cacheable = key is not None and all(
      filterlib.is_structural(p, raw_leaves=raw) for p in predicates)
  indices: list[list[int]] = [[] for _ in predicates]
  unmatched = []
  for i, (path, leaf) in enumerate(zip(fl.paths, fl.leaves)):
    for g, pred in enumerate(predicates):
      if pred(path, leaf):
        indices[g].append(i)
        break
    else:
      unmatched.append((path, leaf))
  if strict and unmatched:
    raise unmatched_error(unmatched, predicates)
  groups = [(idx, _builder_of([fl.paths[i] for i in idx])) for idx in indices]
  if cacheable:
    graphdef.memo[key] = groups
  return groups


def _builder_of(paths):
  return None if any(not p for p in paths) else compile_builder(skeleton(paths))


def _build(builder, leaves: list, paths: tp.Sequence):
  if builder is None:  # a leaf at the root: the "state" of a bare Variable is the Variable
    if len(leaves) == 1 and not paths[0]:
      return leaves[0]
    return from_flat_state(zip(paths, leaves))
  return builder(iter(leaves))


def _full_builder(graphdef: GraphDef):
  builder = graphdef.memo.get('state_builder', _MISSING)
  if builder is _MISSING:
    skel = graphdef.skeleton
    builder = graphdef.memo['state_builder'] = None if skel is None else compile_builder(skel)
  return builder


_MISSING = object()


def _states(fl: Flattened, filters: tuple, *, strict: bool) -> tuple:
  leaves = fl.leaves
  if not filters:
    return (_build(_full_builder(fl.graphdef), leaves, fl.paths),)
  out = []
  for idx, builder in _groups(fl, filters, strict=strict):
    out.append(_build(builder, [leaves[i] for i in idx], [fl.paths[i] for i in idx]))
  return tuple(out)


def split(node, *filters, graph: bool | None = None):
  """``(GraphDef, State, ...)``: one State per filter; each leaf goes to the first filter matching it.

  A leaf that no filter matches raises a ValueError naming its path; end the
  filters with ``...`` to catch the rest. The States hold the node's own
  Variables.
  """
  fl, _ = flatten_cached(node, graph=graph, context='tree-mode split')
  return (fl.graphdef, *_states(fl, filters, strict=True))


def graphdef(node, /, *, graph: bool | None = None) -> GraphDef:
  """The GraphDef of ``node`` (its structure, no state)."""
  return flatten_cached(node, graph=graph, context='tree-mode graphdef')[0].graphdef


def state(node, *filters, graph: bool | None = None):
  """The State of ``node`` (any pytree of objects): one State per filter, holding the live Variables.

  Unlike ``split``, leaves that no filter matches are left out.
  """
  fl, _ = flatten_cached(node, graph=graph, context='tree-mode state')
  states = _states(fl, filters, strict=False)
  return states[0] if len(states) == 1 else states


def variables(node, *filters, graph: bool | None = None):
  """The Variables of ``node`` as State(s); like ``state`` (raw array attributes included, as NNX)."""
  fl, _ = flatten_cached(node, graph=graph, context='tree-mode variables')
  states = _states(fl, filters, strict=False)
  return states[0] if len(states) == 1 else states


# -- merge --------------------------------------------------------------------


def merged_leaves(graphdef: GraphDef, states: tp.Sequence) -> list:
  """The leaves of ``states`` in ``graphdef``'s order, checking that they fit exactly."""
  paths = graphdef.leaf_paths
  if graphdef.skeleton is None:  # a bare Variable / array at the root
    if len(states) == 1 and not isinstance(states[0], dict) and len(paths) == 1:
      return [states[0]]
  for s in states:
    if not isinstance(s, dict):
      raise ValueError(f'merge expects States (or nested dicts) after the GraphDef, got a '
                       f'{type(s).__name__}: {s!r:.80}')
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


def merge(graphdef: GraphDef, /, *states, copy: bool = False, recreate_variables: bool = True):
  """Build an object from a GraphDef and the States ``split`` returned.

  The new object holds the States' Variables themselves (shared with the
  object that was split); ``copy=True`` gives it copies. Raw values in the
  States become Variables of the kind the GraphDef records.
  """
  del recreate_variables  # NNX's flag for its Variable internals; Variables here are always reused
  if isinstance(graphdef, tuple) and len(graphdef) == 2 and isinstance(graphdef[0], GraphDef):
    graphdef, states = graphdef[0], (graphdef[1], *states)
  if not isinstance(graphdef, GraphDef):
    raise ValueError(f'merge expects a GraphDef first, got a {type(graphdef).__name__}')
  if len(states) == 1 and not copy:
    out = graphdef.build_from_state(states[0])
    if out is not NO_FIT:
      return out
  return graphdef.build(merged_leaves(graphdef, states), copy_variables=copy)


# -- update -------------------------------------------------------------------


def update(node, state, /, *states) -> None:
  """Write the values of ``state`` (and ``states``) into the Variables of ``node`` in place.

  Accepts what ``state`` / ``split`` returned for the same structure, whole or
  filtered (``nnx.update((model, optimizer), nnx.state((model, optimizer)))``),
  and nested dicts of raw values. Every holder of a Variable sees the new value.
  A path ``node`` does not have yet is added as a new attribute of its parent.
  """
  fl, entry = flatten_cached(node, graph=True, context='update')
  trace = _TraceCheck()
  for s in (state, *states):
    if isinstance(s, Variable) or not isinstance(s, dict):
      raise ValueError(f'update expects States (or nested dicts), got a {type(s).__name__}')
    values: list = []
    if fl.graphdef.read_state(s, values):
      if entry is None or not _write_all_fast(entry, fl, values, trace):
        _write_all(node, fl, values, trace)
    else:
      _write_paths(node, fl, entry, flat_dict(s), trace)


class _TraceCheck:
  """Whether a Variable may be written now: one trace lookup per update, one comparison per
  distinct trace token."""

  __slots__ = ('current', 'ok')

  def __init__(self):
    self.current = current_trace()
    self.ok: set = set()

  def allows(self, v: Variable) -> bool:
    t = v._trace
    if id(t) in self.ok:
      return True
    if t == self.current:
      self.ok.add(id(t))
      return True
    return False


_SET = object.__setattr__
_PLAIN_SET_VALUE = Variable.set_value


def _write(target, new, trace: _TraceCheck, path) -> None:
  if new is target:
    return  # writing a Variable's value into itself
  value = new._value if isinstance(new, Variable) else new
  if (type(target).set_value is _PLAIN_SET_VALUE and not target._meta.items.get('hijax')
      and trace.allows(target)):
    _SET(target, '_value', value)
    return
  try:
    target.set_value(value)  # the Variable's own checks (and its error if the trace differs)
  except TraceContextError as e:
    raise TraceContextError(f'update cannot write the {type(target).__name__} at '
                            f'{format_path(path)}: {e}') from None


def _write_all_fast(entry, fl: Flattened, values: list, trace: _TraceCheck) -> bool:
  """Write every leaf with no per-Variable checks, when the cache entry shows that is safe:
  all leaves are plain Variables and each trace they belong to is the current one."""
  plan = entry.memo.get('write_plan')
  if plan is None:
    plan = entry.memo['write_plan'] = _write_plan(fl.leaves)
  if plan is False or not all(token == trace.current for token in plan):
    return False
  for target, new in zip(fl.leaves, values):
    if new is not target:
      _SET(target, '_value', new._value if isinstance(new, Variable) else new)
  return True


def _write_plan(leaves):
  """One trace token per distinct trace of ``leaves`` (False if some leaf needs its own checks)."""
  tokens = {}
  for v in leaves:
    if not (isinstance(v, Variable) and type(v).set_value is _PLAIN_SET_VALUE
            and not v._meta.items.get('hijax')):
      return False
    # Tokens of one trace share its weak reference: group by it (by the token if jax changes)
    tokens.setdefault(id(getattr(v._trace, '_trace_ref', v._trace)), v._trace)
  return tuple(tokens.values())


def _write_all(node, fl: Flattened, values: list, trace: _TraceCheck) -> None:
  for path, target, new in zip(fl.paths, fl.leaves, values):
    if isinstance(target, Variable):
      _write(target, new, trace, path)
    elif new is not target:  # a raw array attribute: replaced on its parent
      _set_by_path(node, path, new.get_value() if isinstance(new, Variable) else new)


def _write_paths(node, fl: Flattened, entry, flat: dict, trace: _TraceCheck) -> None:
  index = entry.memo.get('index') if entry is not None else None
  if index is None:
    index = {path: i for i, path in enumerate(fl.paths)}
    if entry is not None:
      entry.memo['index'] = index
  for path, new in flat.items():
    i = index.get(path)
    if i is None:
      _add_path(node, path, new)
      continue
    target = fl.leaves[i]
    if isinstance(target, Variable):
      _write(target, new, trace, path)
    elif new is not target:
      _set_by_path(node, path, new.get_value() if isinstance(new, Variable) else new)


def _add_path(node, path, new) -> None:
  try:
    parent = _get_by_path(node, path[:-1])
  except (KeyError, IndexError, AttributeError, TypeError):
    parent = None
  if not path or not isinstance(parent, Pytree) or isinstance(parent, List):
    raise ValueError(f'update: {format_path(path)} is not in the {type(node).__name__} and its '
                     'parent is not an object it could be added to. Was the State made from '
                     'another structure?')
  _set_by_path(node, path, new)


def _child(obj, key):
  if isinstance(obj, Pytree) and not isinstance(obj, List) and not hasattr(type(obj), '__getitem__'):
    return getattr(obj, key)
  return obj[key]


def _get_by_path(root, path):
  for k in path:
    root = _child(root, k)
  return root


def _set_by_path(root, path, value):
  parent = _get_by_path(root, path[:-1])
  key = path[-1]
  if isinstance(parent, Pytree) and isinstance(key, str) and not hasattr(type(parent), '__setitem__'):
    setattr(parent, key, value)
  else:
    parent[key] = value


def _del_by_path(root, path):
  parent = _get_by_path(root, path[:-1])
  key = path[-1]
  if isinstance(parent, Pytree) and isinstance(key, str) and not hasattr(type(parent), '__delitem__'):
    delattr(parent, key)
  else:
    del parent[key]


# -- clone / pop --------------------------------------------------------------


def clone(node, variables: bool = True, *, arrays: bool = False, graph: bool | None = None):
  """A structural copy of ``node``: new Pytrees and (``variables=True``) new Variables with the same
  values and metadata, belonging to the current trace.

  ``arrays=True`` also copies raw arrays. Call it inside a transform on objects
  that came from outside, so they may be written there.
  """
  fl = _flatten(node, graph=graph, context='tree-mode clone')
  leaves = fl.leaves
  if arrays:
    leaves = [_copy_array(x) for x in leaves]
  return fl.graphdef.build(leaves, copy_variables=variables)


def _copy_array(x):
  if isinstance(x, Variable):
    return x.replace(_copy_array(x._value))
  if isinstance(x, np.ndarray):
    return x.copy()
  if isinstance(x, jax.Array):
    return jax.numpy.array(x, copy=True)
  return x


def pop(node, *filters):
  """Remove the Variables matching ``filters`` from ``node``; return them as State(s), one per filter.

  ``nnx.update(node, popped)`` puts them back.
  """
  if not filters:
    raise ValueError('Expected at least one filter: pop(node, nnx.Intermediate) for example.')
  fl = _flatten(node, graph=True)
  states = _states(fl, filters, strict=False)
  for s in states:
    for path in reversed(list(flat_dict(s))):  # reversed: later list items first
      _del_by_path(node, path)
  return states[0] if len(states) == 1 else states


# -- traversals ---------------------------------------------------------------


def _children(x, graph: bool):
  """``[(key, child)]`` of a node in pytree order, or None for a leaf."""
  if isinstance(x, Variable):
    return None
  if isinstance(x, Pytree):
    if not type(x)._arbax_pytree:
      return None
    keys, aux = node_parts(x)
    if graph and aux.static:
      keys = sorted((*keys, *(k for k, _ in aux.static)), key=_attr_sort_key)
    d = x.__dict__
    return [(k, d[k]) for k in keys]
  t = type(x)
  if t is tuple or t is list:
    return list(enumerate(x))
  if isinstance(x, dict):
    return [(k, x[k]) for k in sorted(x, key=_sort_key)]
  if x is None or isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, str, bool,
                                 type)) or callable(x):
    return None
  children, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if treedef.num_nodes == 1 and treedef.num_leaves == 1:
    return None
  from arbax.graph import _key_of
  return [(_key_of(kp[0]), c) for kp, c in children]


def _attr_sort_key(k):
  return (isinstance(k, str), k)


def _walk(node, graph: bool, context: str, visit_node, visit_leaf, visit_dup):
  """Post-order traversal shared by iter_graph / find_duplicates / recursive_map."""
  seen: dict = {}

  def go(x, path):
    if isinstance(x, (Variable, Pytree)):
      first = seen.get(id(x))
      if first is not None:
        if not graph:
          raise alias_error(type(x).__name__, path, first, f'tree-mode {context}')
        return visit_dup(x, path)
      seen[id(x)] = path
    children = _children(x, graph)
    if children is None:
      return visit_leaf(x, path)
    return visit_node(x, path, [(k, go(c, path + (k,))) for k, c in children])

  return go(node, ())


def iter_graph(node, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tuple, tp.Any]]:
  """``(path, value)`` for every Pytree, container, Variable and leaf in ``node``, children
  before their parent, in pytree order.

  Tree mode raises a ValueError on a shared reference; graph mode yields each
  object once and also yields the static attributes of Pytrees.
  """
  graph = _settings.graph_mode(graph)
  out: list = []

  def on_leaf(x, path):
    out.append((path, x))

  def on_node(x, path, _):
    out.append((path, x))

  _walk(node, graph, 'iter_graph', on_node, on_leaf, lambda x, path: None)
  return iter(out)


def find_duplicates(node, /, *, only: filterlib.Filter = ...) -> list[list[tuple]]:
  """Groups of paths that reach the same Variable or Pytree (shared references), for those
  matching ``only``."""
  predicate = filterlib.to_predicate(only)
  paths_by_id: dict = {}
  objects: dict = {}

  def note(x, path):
    if isinstance(x, (Variable, Pytree)):
      paths_by_id.setdefault(id(x), []).append(path)
      objects[id(x)] = x

  _walk(node, True, 'find_duplicates', lambda x, path, _: note(x, path),
        note, note)
  return [sorted(paths, key=lambda p: [_attr_sort_key(k) for k in p])
          for i, paths in paths_by_id.items()
          if len(paths) > 1 and predicate(paths[0], objects[i])]


def recursive_map(f: tp.Callable[[tuple, tp.Any], tp.Any], node, /, *, graph: bool | None = None):
  """Rebuild ``node`` bottom-up: ``f(path, x)`` is applied to every leaf, Variable, container and
  Pytree (the latter already holding the mapped children); the result replaces ``x``.

  Pytrees and containers are rebuilt (the original is not modified); in graph
  mode a shared object is mapped once and its result shared.
  """
  graph = _settings.graph_mode(graph)
  done: dict = {}

  def on_leaf(x, path):
    out = f(path, x)
    if isinstance(x, Variable):
      done[id(x)] = out
    return out

  def on_node(x, path, children):
    out = f(path, _rebuilt(x, children))
    if isinstance(x, Pytree):
      done[id(x)] = out
    return out

  def on_dup(x, path):
    if id(x) not in done:
      raise ValueError(f'recursive_map: {format_path(path)} refers back to an object that is '
                       'still being mapped (a reference cycle); recursive_map cannot rebuild '
                       'cycles.')
    return done[id(x)]

  return _walk(node, graph, 'recursive_map', on_node, on_leaf, on_dup)


def _rebuilt(x, children):
  if isinstance(x, Pytree):
    new = object.__new__(type(x))
    d = new.__dict__
    d.update(x.__dict__)
    d.pop('_arbax_seen', None)
    d['_arbax_kinds'] = dict(x.__dict__['_arbax_kinds'])
    d['_arbax_cache'] = None
    d.update(children)
    new._arbax_after_unflatten()
    return new
  values = [c for _, c in children]
  t = type(x)
  if t is tuple or t is list:
    return t(values)
  if isinstance(x, dict):
    out = t()
    dict.update(out, children)
    return out
  return jax.tree_util.tree_structure(x, is_leaf=lambda y: y is not x).unflatten(values)


# -- flatten / unflatten ------------------------------------------------------


class _Caller:
  """What ``nnx.call(...)`` returns: attribute / item access picks a method on the merged
  node; calling it returns ``(output, (graphdef, state))`` with the updated state."""

  def __init__(self, graphdef_state, path=()):
    self._graphdef_state = graphdef_state
    self._path = path

  def __getattr__(self, name):
    return _Caller(self._graphdef_state, self._path + (('attr', name),))

  def __getitem__(self, key):
    return _Caller(self._graphdef_state, self._path + (('item', key),))

  def __call__(self, *args, **kwargs):
    node = merge(*self._graphdef_state)
    method = node
    for how, key in self._path:
      method = getattr(method, key) if how == 'attr' else method[key]
    out = method(*args, **kwargs)
    return out, split(node)


def call(graphdef_state, /) -> _Caller:
  """Call a method of the node a ``(graphdef, state)`` pair describes, purely:

      y, (graphdef, state) = nnx.call((graphdef, state))(x)          # __call__
      _, (graphdef, state) = nnx.call((graphdef, state))['b'].reset()

  Equivalent to merge, call, split; handy inside plain ``jax`` transforms.
  """
  return _Caller(graphdef_state)


def as_pure(tree):
  """``tree`` with every Variable replaced by its value (e.g. a State for export)."""
  return jax.tree_util.tree_map(lambda x: x.get_value() if isinstance(x, Variable) else x, tree,
                                is_leaf=lambda x: isinstance(x, Variable))


def pure(tree):
  """Deprecated name of ``as_pure``."""
  warnings.warn('This function is deprecated. Use as_pure instead.', DeprecationWarning,
                stacklevel=2)
  return as_pure(tree)


def map(f: tp.Callable[[tuple, tp.Any], tp.Any], node, /, *, graph: bool | None = None,
        recreate_variables: bool = True):
  """A new node whose Variables are ``f(path, variable)``; ``node`` is unchanged.

      zeroed = nnx.map(lambda path, v: v.replace(jnp.zeros_like(v)), model)
  """
  graphdef, state = split(node, graph=graph)
  new_state = map_state(f, state)
  return merge(graphdef, new_state, recreate_variables=recreate_variables)


def flatten(node, /, *, with_paths: bool = True, graph: bool | None = None):
  """``(GraphDef, FlatState)``: the structure and the ``(path, leaf)`` pairs in pytree order;
  ``with_paths=False`` gives a plain list of leaves instead of the FlatState."""
  fl = _flatten(node, graph=graph, context='tree-mode flatten')
  if not with_paths:
    return fl.graphdef, list(fl.leaves)
  return fl.graphdef, FlatState(zip(fl.paths, fl.leaves), sort=False)


def unflatten(graphdef: GraphDef, state, /, *, copy_variables: bool = False,
              recreate_variables: bool = True):
  """Inverse of ``flatten``: accepts a FlatState, a State, ``[(path, leaf)]`` or a list of leaves."""
  del recreate_variables
  if isinstance(state, dict):
    return merge(graphdef, state, copy=copy_variables)
  if isinstance(state, FlatState):
    leaves = list(state.leaves)
  else:
    items = list(state)
    if items and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], tuple) for i in items):
      leaves = [v for _, v in items]
    else:
      leaves = items
  if len(leaves) != len(graphdef.leaf_paths):
    raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(graphdef.leaf_paths)}, '
                     f'got {len(leaves)}.')
  return graphdef.build(leaves, copy_variables=copy_variables)


__all__ = ['call', 'as_pure', 'pure', 'map', 'split', 'merge', 'state', 'update', 'graphdef', 'clone', 'pop', 'iter_graph',
           'variables', 'find_duplicates', 'recursive_map', 'flatten', 'unflatten']
