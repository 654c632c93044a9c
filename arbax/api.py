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

Graph mode (the default, as in NNX) stores a shared Variable or object once
and ``merge`` rebuilds it shared; tree mode (``graph=False``) refuses shared
references with a ValueError naming both paths. ``unpack`` bundles the
GraphDef with each State (``GraphState``); ``flatten`` / ``unflatten`` are the
flat forms (see ``arbax.refmaps`` for flattens sharing one index space).
"""
from __future__ import annotations

import typing as tp
import warnings

import jax
import numpy as np

from arbax import _settings
from arbax._walk import SHALLOW
from arbax import filters as filterlib
from arbax.errors import TraceContextError, format_path
from arbax.defs import LEAF_DEF, STATIC
from arbax.graph import (NO_FIT, GraphDef, Flattened, state_mapping, flatten as _flatten,
                         flatten_cached, merged_leaves, path_order, walk)
from arbax.pytree import List, Pytree
from arbax.refmaps import IndexMap, RefMap, flatten_indexed, unflatten_indexed
from arbax.state import (FlatState, GraphState, State, compile_builder, flat_dict, from_flat_state,
                         skeleton, unmatched_error, map_state)
from arbax.variables import Variable, current_trace

Node = tp.TypeVar('Node')
PureState = tuple[GraphDef[Node], State]  # what ``nnx.split(node)`` returns, as a type

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


def group_states(fl: Flattened, filters: tuple, *, strict: bool) -> tuple:
  """The States of a flattening, one per filter (``strict``: every leaf must match one); with
  no filters, one State of everything. A leaf at the root is returned as itself."""
  if fl.graphdef.depth > SHALLOW:
    with fl.graphdef.deep():
      return _group_states(fl, filters, strict)
  return _group_states(fl, filters, strict)


def _group_states(fl: Flattened, filters: tuple, strict: bool) -> tuple:
  leaves = fl.leaves
  if not filters:
    return (_build(_full_builder(fl.graphdef), leaves, fl.paths),)
  out = []
  for idx, builder in _groups(fl, filters, strict=strict):
    out.append(_build(builder, [leaves[i] for i in idx], [fl.paths[i] for i in idx]))
  return tuple(out)


def _flat(node, graph: bool | None, context: str):
  """``flatten_cached``, except that a bare value (``42``, a function) is its own single leaf,
  as NNX treats a root it does not know."""
  fl, entry = flatten_cached(node, graph=graph, context=context)
  if fl.graphdef.root[0] == STATIC and node is not None:
    return Flattened(GraphDef(LEAF_DEF, ((),), fl.graphdef.graph), [node], [()], []), None
  return fl, entry


def split(node, *filters, graph: bool | None = None):
  """Split ``node`` into its GraphDef (the structure) and State(s) (the Variables).

  Each leaf goes to the first filter that matches it; a leaf no filter matches
  raises a ValueError naming its path, so end the filters with ``...`` to catch
  the rest. The States hold the node's own Variables (no copies): writing into
  them writes into ``node``. A node that is itself a leaf (a Variable, an array)
  is its own "State": ``nnx.split(v)`` returns ``(graphdef, v)``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> foo = Foo()
      >>> graphdef, params, rest = nnx.split(foo, nnx.Param, ...)
      >>> list(params), list(rest), params['w'] is foo.w
      (['w'], ['n'], True)

  Args:
    node: an object, or any pytree of objects.
    *filters: how to group the leaves (types, tags, predicates, ``...``); none
      gives one State of everything.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    ``(graphdef, state)``, or ``(graphdef, state_1, ..., state_n)`` for n filters.
  """
  fl, _ = _flat(node, graph, 'tree-mode split')
  return (fl.graphdef, *group_states(fl, filters, strict=True))


def graphdef(node, /, *, graph: bool | None = None) -> GraphDef:
  """The GraphDef of ``node``: its structure without its state, as ``split`` returns it.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> nnx.graphdef(Foo()) == nnx.graphdef(Foo())    # same structure, same GraphDef
      True

  Args:
    node: an object, or any pytree of objects.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    The GraphDef; ``nnx.merge(graphdef, state)`` rebuilds an object from it.
  """
  return _flat(node, graph, 'tree-mode graphdef')[0].graphdef


def _live_states(node, filters: tuple, graph: bool | None, context: str):
  """The body of ``state`` and ``variables``: the live leaves grouped by ``filters`` (unmatched
  ones left out); ``context`` names the caller in tree-mode errors."""
  fl, _ = _flat(node, graph, context)
  states = group_states(fl, filters, strict=False)
  return states[0] if len(states) == 1 else states


@tp.overload
def state(node, /, *, graph: bool | None = None) -> State: ...
@tp.overload
def state(node, filter, /, *, graph: bool | None = None) -> State: ...
@tp.overload
def state(node, filter, filter2, /, *filters, graph: bool | None = None) -> tuple[State, ...]: ...
def state(node, *filters, graph: bool | None = None) -> tp.Any:
  """The State of ``node``: its live Variables, one State per filter.

  Unlike ``split``, leaves that no filter matches are simply left out, and there
  is no GraphDef. The State holds the Variables themselves, not copies.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> foo = Foo()
      >>> list(nnx.state(foo)), list(nnx.state(foo, nnx.Param))
      (['n', 'w'], ['w'])
      >>> nnx.state(foo, nnx.Param)['w'] is foo.w
      True

  Args:
    node: an object, or any pytree of objects.
    *filters: how to group the leaves; none gives one State of everything.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    A State for zero or one filter, else a tuple of States (one per filter).
  """
  return _live_states(node, filters, graph, 'tree-mode state')


def variables(node, *filters, graph: bool | None = None):
  """The Variables of ``node`` as State(s): the same as ``state`` (raw arrays included, as NNX).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> list(nnx.variables(Foo(), nnx.BatchStat))
      ['n']

  Args:
    node: an object, or any pytree of objects.
    *filters: how to group the leaves; none gives one State of everything.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    A State for zero or one filter, else a tuple of States (one per filter).
  """
  return _live_states(node, filters, graph, 'tree-mode variables')


def unpack(node, *filters, graph: bool | None = None):
  """Like ``split``, but each State comes bundled with the GraphDef as a ``GraphState``.

  ``nnx.merge`` takes the GraphStates back without a separate GraphDef to carry.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> foo = Foo()
      >>> params, rest = nnx.unpack(foo, nnx.Param, ...)
      >>> list(params), nnx.merge(params, rest).w is foo.w
      (['w'], True)

  Args:
    node: the object to unpack.
    *filters: as for ``split``; with none or one filter a single GraphState is returned.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    A GraphState, or a tuple of them for two filters or more.
  """
  graphdef, *states = split(node, *filters, graph=graph)
  out = tuple(GraphState(graphdef, s) for s in states)
  return out[0] if len(out) == 1 else out


# -- merge --------------------------------------------------------------------


def _positional_leaves(graphdef: GraphDef, leaves: tp.Sequence) -> list:
  """A list of leaves as ``flatten(..., with_paths=False)`` returns them, in ``graphdef``'s order.

  Tree-mode lists are in sorted-path order (NNX's), graph-mode ones in traversal order.
  """
  leaves = list(leaves)
  if len(leaves) != len(graphdef.leaf_paths):
    raise ValueError(f'Incorrect number of leaves: the GraphDef needs {len(graphdef.leaf_paths)}, '
                     f'got {len(leaves)}.')
  order = _tree_order(graphdef)
  if order is None:
    return leaves
  out = [None] * len(leaves)
  for position, i in enumerate(order):
    out[i] = leaves[position]
  return out


def _tree_order(graphdef: GraphDef) -> list[int] | None:
  """For a tree-mode GraphDef, the leaf indices in sorted-path order (None when it is the
  traversal order already, or in graph mode)."""
  if graphdef.graph:
    return None
  order = graphdef.memo.get('tree_order', _MISSING)
  if order is _MISSING:
    order = path_order(graphdef.leaf_paths)
    order = graphdef.memo['tree_order'] = None if order == sorted(order) else order
  return order


def _graphdef_and_states(first, states):
  if isinstance(first, GraphState):
    for gs in (first, *states):
      if not isinstance(gs, GraphState):
        raise ValueError(f'Expected GraphState objects after a GraphState, got a '
                         f'{type(gs).__name__}. Pass all states as nnx.unpack returned them.')
      if gs._graphdef != first._graphdef:
        raise ValueError('The GraphDef must be the same for all GraphState objects: they come '
                         'from different objects (or different nnx.unpack calls on a changed one).')
    return first._graphdef, tuple(gs._state for gs in (first, *states))
  if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], GraphDef):
    return first[0], (first[1], *states)
  if not isinstance(first, GraphDef):
    raise TypeError(f'merge expects a GraphDef (or GraphState) first, got a {type(first).__name__}.')
  return first, states


def merge(graphdef: GraphDef | GraphState, /, *states, copy: bool = False,
          recreate_variables: bool = True) -> tp.Any:
  """Build an object from a GraphDef and the States ``split`` returned (or from GraphStates).

  The new object holds the States' Variables themselves (shared with the
  object that was split); ``copy=True`` gives it copies. Raw values in the
  States become Variables of the kind the GraphDef records, unless
  ``recreate_variables=False`` (they then stay raw values).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> foo = Foo()
      >>> graphdef, state = nnx.split(foo)
      >>> nnx.merge(graphdef, state).w is foo.w, nnx.merge(graphdef, state, copy=True).w is foo.w
      (True, False)
      >>> type(nnx.merge(graphdef, {'w': jnp.zeros(2)}).w).__name__   # raw values: re-wrapped
      'Param'

  Args:
    graphdef: the GraphDef from ``split``, or the first GraphState from ``unpack``.
    *states: the States (nested dicts, FlatStates, or one list of leaves in flatten's order).
    copy: give the new object copies of the Variables.
    recreate_variables: wrap raw values in Variables of the recorded kind.

  Returns:
    The rebuilt object.
  """
  if type(graphdef) is not GraphDef:
    graphdef, states = _graphdef_and_states(graphdef, states)
  if not states:
    raise TypeError("merge() missing 1 required positional argument: 'state'")
  if len(states) == 1 and not copy and recreate_variables:
    out = graphdef.build_from_state(states[0])
    if out is not NO_FIT:
      return out
  if type(states[0]) is list:
    if len(states) != 1:
      raise ValueError('merge: a list of leaves must be the only state passed.')
    leaves = _positional_leaves(graphdef, states[0])
  else:
    leaves = merged_leaves(graphdef, states)
  if recreate_variables:
    return graphdef.build(leaves, copy_variables=copy)
  return unflatten_indexed(graphdef, leaves, None, None, copy_variables=copy,
                           recreate_variables=False)


# -- update -------------------------------------------------------------------


def update(node, state, /, *states) -> None:
  """Write the values of ``state`` (and ``states``) into the Variables of ``node`` in place.

  Accepts what ``state`` / ``split`` / ``unpack`` returned for the same
  structure, whole or filtered (``nnx.update((model, optimizer),
  nnx.state((model, optimizer)))``), and nested dicts of raw values. Every
  holder of a Variable sees the new value. A path ``node`` does not have yet
  is added to its parent (an object, dict or list); a non-Variable entry
  replaces the parent's value. For a bare Variable ``node``, pass the one
  value (or Variable) to write; empty States alongside it are ignored.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> foo = Foo()
      >>> w = foo.w
      >>> nnx.update(foo, {'w': jnp.array([3.0, 4.0])})
      >>> foo.w is w, w[...].tolist()                 # the same Variable, a new value
      (True, [3.0, 4.0])

  Args:
    node: the object (or pytree of objects) to write into.
    state: a State, nested dict, GraphState or FlatState.
    *states: more of them, applied in order.
  """
  if isinstance(node, Variable):
    _update_variable(node, (state, *states))
    return
  fl, entry = flatten_cached(node, graph=True, context='update')
  trace = _TraceCheck()
  for s in (state, *states):
    if isinstance(s, (GraphState, FlatState)):
      s = state_mapping(s)
    if isinstance(s, Variable) or not isinstance(s, dict):
      raise ValueError(f'update expects States (or nested dicts), got a {type(s).__name__}')
    values: list = []
    if fl.graphdef.read_state(s, values):
      if entry is None or not _write_all_fast(entry, fl, values, trace):
        _write_all(node, fl, values, trace)
    else:
      _write_paths(node, fl, entry, flat_dict(s), trace)


def _update_variable(target: Variable, states: tuple) -> None:
  given = [s for s in states if not (isinstance(s, (dict, FlatState, GraphState)) and not s)]
  if len(given) != 1 or isinstance(given[0], (dict, GraphState)):
    raise ValueError(f'update of a bare {type(target).__name__} expects exactly one non-empty '
                     f'state (its new value or a Variable), got {states!r:.200}')
  new = given[0]
  if isinstance(new, FlatState):
    new = state_mapping(new) if new.paths != ((),) else new.leaves[0]
  _write(target, new, _TraceCheck(), ())


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
  key = path[-1] if path else None
  if isinstance(parent, (list, List)) and isinstance(key, int) and key == len(parent):
    parent.append(new)
    return
  if not (isinstance(parent, dict) or isinstance(parent, Pytree) and not isinstance(parent, List)
          or isinstance(parent, (list, List)) and isinstance(key, int) and key < len(parent)):
    raise ValueError(f'update: {format_path(path)} is not in the {type(node).__name__} and its '
                     f'parent ({type(parent).__name__}) is not an object, dict or list it could be '
                     'added to. Was the State made from another structure?')
  _set_by_path(node, path, new)


def _child(obj, key):
  if isinstance(obj, Pytree) and not isinstance(obj, List) and not hasattr(type(obj), '__getitem__'):
    return getattr(obj, key)
  return tp.cast(tp.Any, obj)[key]  # a container, or a Pytree whose class defines __getitem__


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
    tp.cast(tp.Any, parent)[key] = value  # a container, or a Pytree defining __setitem__


def _del_by_path(root, path):
  parent = _get_by_path(root, path[:-1])
  key = path[-1]
  if isinstance(parent, Pytree) and isinstance(key, str) and not hasattr(type(parent), '__delitem__'):
    delattr(parent, key)
  else:
    del tp.cast(tp.Any, parent)[key]  # a container, or a Pytree defining __delitem__


# -- clone / pop --------------------------------------------------------------


def clone(node, variables: bool = True, *, arrays: bool = False, graph: bool | None = None):
  """A structural copy of ``node``: new objects and (``variables=True``) new Variables.

  The copies have the same values and metadata and belong to the current trace,
  so calling it inside a transform on objects from outside gives objects that
  may be written there. Shared references stay shared in the copy.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> foo = Foo()
      >>> twin = nnx.clone(foo)
      >>> twin.w[...] = jnp.zeros(2)
      >>> foo.w[...].tolist(), twin.w[...].tolist()
      ([1.0, 1.0], [0.0, 0.0])

  Args:
    node: an object, or any pytree of objects.
    variables: give the copy new Variables (False: it shares ``node``'s).
    arrays: also copy the arrays (raw ones and those in the Variables).
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    The copy.
  """
  # The cached flattening (as split's): cloning the same model again walks nothing.
  fl, _ = flatten_cached(node, graph=graph, context='tree-mode clone')
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
  """Remove the Variables matching ``filters`` from ``node``; return them, one State per filter.

  ``nnx.update(node, popped)`` puts them back.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.seen = nnx.Intermediate(3)
      >>> foo = Foo()
      >>> popped = nnx.pop(foo, nnx.Intermediate)
      >>> list(popped), hasattr(foo, 'seen')
      (['seen'], False)

  Args:
    node: the object to remove Variables from (graph mode).
    *filters: at least one filter; each Variable goes to the first that matches.

  Returns:
    A State for one filter, else a tuple of States.
  """
  if not filters:
    raise ValueError('Expected at least one filter: pop(node, nnx.Intermediate) for example.')
  fl = _flatten(node, graph=True)
  states = group_states(fl, filters, strict=False)
  with fl.graphdef.deep():  # reading a State back recurses through its depth
    for s in states:
      for path in reversed(list(flat_dict(s))):  # reversed: later list items first
        _del_by_path(node, path)
  return states[0] if len(states) == 1 else states


# -- traversals ---------------------------------------------------------------


def _attr_sort_key(k):
  return (isinstance(k, str), k)


def iter_graph(node, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tuple, tp.Any]]:
  """``(path, value)`` for everything in ``node``, children before their parent.

  Every Pytree, container, Variable and leaf is visited in pytree order (keys
  sorted); the root comes last at path ``()``. Graph mode yields a shared object
  once and also yields the static attributes of Pytrees; tree mode raises a
  ValueError on a shared reference.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> [path for path, _ in nnx.iter_graph(Foo())]
      [('n',), ('w',), ()]

  Args:
    node: an object, or any pytree of objects.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    An iterator of ``(path, value)`` pairs.
  """
  graph = _settings.graph_mode(graph)
  out: list = []

  def on_leaf(x, path):
    out.append((path, x))

  def on_node(x, path, _):
    out.append((path, x))

  walk(node, graph=graph, context='iter_graph', visit_node=on_node, visit_leaf=on_leaf,
       visit_dup=lambda x, path: None)
  return iter(out)


def find_duplicates(node, /, *, only: filterlib.Filter = ...) -> list[list[tuple]]:
  """The shared references in ``node``: groups of paths that reach the same Variable or Pytree.

      >>> import arbax as nnx
      >>> class Tied(nnx.Module):
      ...   def __init__(self):
      ...     self.encoder = self.decoder = nnx.Param(1.0)
      >>> nnx.find_duplicates(Tied())
      [[('decoder',), ('encoder',)]]

  Args:
    node: an object, or any pytree of objects (walked in graph mode).
    only: a filter: only the shared objects it matches (at their first path) are reported.

  Returns:
    One list of sorted paths per shared object.
  """
  predicate = filterlib.to_predicate(only)
  paths_by_id: dict = {}
  objects: dict = {}

  def note(x, path):
    if isinstance(x, (Variable, Pytree)):
      paths_by_id.setdefault(id(x), []).append(path)
      objects[id(x)] = x

  walk(node, graph=True, context='find_duplicates', visit_node=lambda x, path, _: note(x, path),
       visit_leaf=note, visit_dup=note)
  return [sorted(paths, key=lambda p: [_attr_sort_key(k) for k in p])
          for i, paths in paths_by_id.items()
          if len(paths) > 1 and predicate(paths[0], objects[i])]


def recursive_map(f: tp.Callable[[tuple, tp.Any], tp.Any], node, /, *, graph: bool | None = None):
  """Rebuild ``node`` bottom-up, replacing everything in it by ``f(path, x)``.

  ``f`` is applied to every leaf, Variable, container and Pytree (the latter
  already holding the mapped children) and its result replaces ``x``. Pytrees
  and containers are rebuilt, so ``node`` is not modified; in graph mode a
  shared object is mapped once and its result shared.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> foo = Foo()
      >>> double = lambda path, x: x.replace(2 * x[...]) if isinstance(x, nnx.Variable) else x
      >>> nnx.recursive_map(double, foo).w[...].tolist(), foo.w[...].tolist()
      ([2.0, 2.0], [1.0, 1.0])

  Args:
    f: ``f(path, x) -> replacement``.
    node: an object, or any pytree of objects.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.

  Returns:
    The rebuilt node.
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

  return walk(node, graph=graph, context='recursive_map', visit_node=on_node, visit_leaf=on_leaf,
              visit_dup=on_dup)


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
  """Call a method of the object a ``(graphdef, state)`` pair describes, purely.

  Equivalent to merge, call, split: the call returns ``(output, (graphdef,
  state))`` with the updated state. The merged object holds the pair's own
  Variables, so value updates also show in the State passed in. Attribute and
  item access choose the method (``nnx.call(pair)['b'].reset()``). Handy
  inside plain ``jax`` transforms, where the pair is a pytree.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.count = nnx.BatchStat(jnp.array(0))
      ...   def __call__(self, x):
      ...     self.count[...] += 1
      ...     return 2 * x
      ...   def reset(self):
      ...     self.count[...] = 0
      >>> pair = nnx.split(Counter())
      >>> y, pair = nnx.call(pair)(3)                 # __call__
      >>> y, int(pair[1]['count'][...])
      (6, 1)
      >>> _, pair = nnx.call(pair).reset()
      >>> int(pair[1]['count'][...])
      0

  Args:
    graphdef_state: a ``(graphdef, state)`` pair as ``nnx.split`` returns it.

  Returns:
    A caller: call it to run ``__call__``, or pick a method on it first.
  """
  return _Caller(graphdef_state)


def as_pure(tree):
  """``tree`` with every Variable replaced by its value: plain arrays, e.g. a State for export.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> state = nnx.State({'w': nnx.Param(jnp.ones(2)), 'n': nnx.BatchStat(0)})
      >>> nnx.as_pure(state)['n'], type(nnx.as_pure(state)['w']).__name__
      (0, 'ArrayImpl')

  Args:
    tree: any pytree (a State, a tuple of States, ...).

  Returns:
    The same pytree with values in place of Variables.
  """
  return jax.tree_util.tree_map(lambda x: x.get_value() if isinstance(x, Variable) else x, tree,
                                is_leaf=lambda x: isinstance(x, Variable))


def pure(tree):
  """Deprecated name of ``as_pure``: warns (DeprecationWarning), then returns ``as_pure(tree)``.

      >>> import warnings, arbax as nnx
      >>> with warnings.catch_warnings(record=True):
      ...   nnx.pure({'w': nnx.Param(1.0)})
      {'w': 1.0}

  Args:
    tree: any pytree.

  Returns:
    The same pytree with values in place of Variables.
  """
  warnings.warn('This function is deprecated. Use as_pure instead.', DeprecationWarning,
                stacklevel=2)
  return as_pure(tree)


def map(f: tp.Callable[[tuple, tp.Any], tp.Any], node, /, *, graph: bool | None = None,
        recreate_variables: bool = True):
  """A new node whose Variables are ``f(path, variable)``; ``node`` is unchanged.

  ``f`` may return a Variable (used as it is: returning ``v`` keeps that very
  Variable) or a raw value, which becomes a new Variable of the kind and metadata
  of the one it replaces, or stays a raw value with ``recreate_variables=False``.
  A bare Variable ``node`` is mapped as the single leaf at path ``()``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> foo = Foo()
      >>> zeroed = nnx.map(lambda path, v: jnp.zeros_like(v), foo)
      >>> type(zeroed.w).__name__, zeroed.w[...].tolist(), foo.w[...].tolist()
      ('Param', [0.0, 0.0], [1.0, 1.0])

  Args:
    f: ``f(path, variable) -> Variable or value``.
    node: the object (or pytree of objects) to map.
    graph: graph mode (shared references allowed); None uses ``nnx.set_graph_mode``.
    recreate_variables: wrap raw results in Variables of the replaced kind.

  Returns:
    A new object of ``node``'s structure.
  """
  graphdef, state = split(node, graph=graph)
  if graphdef.skeleton is None:  # the root is a leaf (a Variable, an array): its own "state"
    new_state = f((), state)
  else:
    new_state = map_state(f, state)
  return merge(graphdef, new_state, recreate_variables=recreate_variables)


def flatten(node, /, *, with_paths: bool = True, ref_index: RefMap | None = None,
            ref_outer_index: RefMap | None = None, graph: bool | None = None):
  """``(GraphDef, FlatState)``: the structure and the ``(path, leaf)`` pairs.

  Graph mode lists the leaves in traversal order, tree mode sorted by path
  (NNX's orders); ``with_paths=False`` gives a plain list of leaves in the
  same order. ``ref_index`` (a ``RefMap``) lets several flattens share one
  index space: objects it holds become refs, new ones are added to it;
  ``ref_outer_index`` records for each object the index of the outer object
  it stands for (see ``nnx.update_context``). Both imply graph mode.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      ...     self.n = nnx.BatchStat(jnp.zeros(()))
      >>> graphdef, flat = nnx.flatten(Foo())
      >>> [path for path, _ in flat]
      [('n',), ('w',)]
      >>> nnx.unflatten(graphdef, flat).w is flat[1][1]
      True

  Args:
    node: the object (or pytree of objects) to flatten.
    with_paths: return a FlatState (True) or a list of leaves (False).
    ref_index: the shared object -> index map to continue (graph mode).
    ref_outer_index: inner object -> outer index, recorded in the GraphDef.
    graph: graph mode; None uses ``nnx.set_graph_mode``.

  Returns:
    ``(graphdef, flat_state)`` or ``(graphdef, leaves)``.
  """
  if ref_index is not None or ref_outer_index is not None:
    if graph is False:
      raise ValueError('flatten: ref_index / ref_outer_index need graph mode; drop graph=False.')
    fl = flatten_indexed(node, ref_index, ref_outer_index, context='flatten')
  else:
    fl = _flat_uncached(node, graph)
  paths, leaves = fl.paths, fl.leaves
  order = _tree_order(fl.graphdef)
  if order is not None:
    paths, leaves = [paths[i] for i in order], [leaves[i] for i in order]
  if not with_paths:
    return fl.graphdef, list(leaves)
  return fl.graphdef, FlatState(zip(paths, leaves), sort=False)


def _flat_uncached(node, graph: bool | None) -> Flattened:
  fl = _flatten(node, graph=graph, context='tree-mode flatten')
  if fl.graphdef.root[0] == STATIC and node is not None:
    return Flattened(GraphDef(LEAF_DEF, ((),), fl.graphdef.graph), [node], [()], [])
  return fl


def unflatten(graphdef: GraphDef, state, /, *, index_ref: IndexMap | None = None,
              outer_index_outer_ref: IndexMap | None = None, copy_variables: bool = False,
              recreate_variables: bool = True):
  """Inverse of ``flatten``: build the object of ``graphdef`` around ``state``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Foo(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.ones(2))
      >>> graphdef, leaves = nnx.flatten(Foo(), with_paths=False)
      >>> nnx.unflatten(graphdef, [nnx.Param(jnp.zeros(2))]).w[...].tolist()
      [0.0, 0.0]

  Args:
    graphdef: from ``flatten`` / ``split``.
    state: a FlatState, a State (or nested dict), or a list of leaves in flatten's order.
    index_ref: the shared index -> object map (``IndexMap``) of the unflattens so far;
      refs resolve in it and the new objects are added to it.
    outer_index_outer_ref: outer index -> outer object: objects the GraphDef records
      with an outer index found here are those outer objects, updated in place.
    copy_variables: give the object copies of the Variables in ``state``.
    recreate_variables: wrap raw values in Variables of the recorded kind.

  Returns:
    The rebuilt object.
  """
  leaves = _unflatten_leaves(graphdef, state)
  if (index_ref is None and outer_index_outer_ref is None and recreate_variables
      and graphdef.base == 0):
    return graphdef.build(leaves, copy_variables=copy_variables)
  return unflatten_indexed(graphdef, leaves, index_ref, outer_index_outer_ref,
                           copy_variables=copy_variables, recreate_variables=recreate_variables)


def _unflatten_leaves(graphdef: GraphDef, state) -> list:
  n = len(graphdef.leaf_paths)
  if graphdef.skeleton is None and not isinstance(state, (dict, GraphState, FlatState, list)):
    return [state]  # the GraphDef of a bare leaf, and that leaf
  if isinstance(state, FlatState):
    if state.paths == graphdef.leaf_paths:
      return list(state.leaves)
    if len(state) != n:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {n}, got {len(state)}.')
    by_path = dict(zip(state.paths, state.leaves))
    try:
      return [by_path[p] for p in graphdef.leaf_paths]
    except KeyError as e:
      raise ValueError(f'unflatten: the FlatState has no leaf at {format_path(e.args[0])}, which '
                       'the GraphDef needs. Was it made from another structure?') from None
  if isinstance(state, (dict, GraphState)):
    state = state_mapping(state)
    found = len(flat_dict(state))
    if found != n and graphdef.skeleton is not None:
      raise ValueError(f'Incorrect number of leaves: the GraphDef needs {n}, the State has '
                       f'{found}.')
    return merged_leaves(graphdef, (state,))
  items = list(state)
  if items and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], tuple) for i in items):
    return _unflatten_leaves(graphdef, FlatState(items, sort=False))
  return _positional_leaves(graphdef, items)


__all__ = ['call', 'as_pure', 'pure', 'map', 'split', 'merge', 'state', 'update', 'graphdef', 'clone',
           'pop', 'iter_graph', 'variables', 'find_duplicates', 'recursive_map', 'flatten',
           'unflatten', 'unpack', 'PureState']
