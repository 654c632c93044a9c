"""The one mechanism every NNX transform shares: Variables in -> updates out -> write back.

A call of a transformed function goes through three steps:

1. ``ArgPlan`` splits the arguments into *graph* arguments (those holding
   Pytrees or Variables), flattened together into one GraphDef plus a flat list
   of leaves, and *plain* arguments (arrays, pytrees of arrays) that JAX sees
   unchanged. The plan is cached by the identity of the graph arguments and
   the structure epoch, so a steady training loop skips the walk entirely.
2. Inside the JAX transform, ``rebuild`` makes fresh objects around the traced
   leaves, the user function runs, and ``collect_updates`` finds the Variables
   whose value is no longer the input tracer.
3. After the JAX call returned, ``finish`` assigns only the changed
   Variables (and raw array attributes). Nothing is written when anything
   raised: a failed call leaves the caller's state as it was.

Graph updates (graph mode with ``graph_updates=True``, NNX's default): structure
is static under a trace, so ``Inner.result`` compares the rebuilt arguments'
structure after the call with the one they were built from. Unchanged (the
steady case), only values travel. Changed (an attribute added, deleted or
replaced, a List edited, a Variable created), the new structure of the
arguments and the output is recorded with the compiled call as one GraphDef
plus, for each object in it, which of the caller's objects it is; ``finish``
replays it after every call onto the caller's objects (see ``restructure``).
"""
from __future__ import annotations

import contextlib
import gc
import typing as tp
import weakref as _weakref

import jax
import numpy as np

from arbax import _settings, _structure
from arbax.errors import AliasError, format_path
from arbax.defs import (LEAF_DEF, STATIC, LEAF, REF, VAR, NODE, ARRAYREF, ArrayRefOutput, iter_defs,
                        numbered)
from arbax.graph import (GraphDef, flatten, unflatten, ARRAY_TYPES, find_first, is_graph_object,
                         leaf_defs)
from arbax.extract import TreeState
from arbax.pytree import Pytree
from arbax.variables import Variable

_set = object.__setattr__

try:  # JAX's marker for the entry point of a transform: tracebacks are filtered below it
  from jax._src.traceback_util import api_boundary
except ImportError:  # another JAX layout: unfiltered tracebacks
  _F = tp.TypeVar('_F', bound=tp.Callable)

  def api_boundary(fun: _F) -> _F:
    return fun


# Argument kinds in a plan.
PLAIN, GRAPH, STATIC_ARG = 0, 1, 2
_PLAIN_TYPES = frozenset({int, float, bool, complex, np.ndarray, type(None)})


def _is_plain_fast(x) -> bool:
  t = type(x)
  return t in _PLAIN_TYPES or isinstance(x, jax.Array) and not isinstance(x, Variable)


def holds_graph(x) -> bool:
  """Whether ``x`` holds any Pytree, Variable or ``jax.Ref`` (so it needs the graph treatment)."""
  if _is_plain_fast(x):
    return False
  return find_first(x, is_graph_object) is not None


class CallKey:
  """The static part of a call: GraphDef of the graph arguments and where each argument sits.

  Hashes once; compared by identity first, so a cached plan costs nothing to look up in
  JAX's own cache.
  """

  __slots__ = ('graphdef', 'kinds', 'kw_names', 'group_sizes', 'statics', 'extra', '_hash')

  def __init__(self, graphdef: GraphDef, kinds: tuple, kw_names: tuple, group_sizes: tuple,
               statics: tuple, extra: tp.Any = None):
    self.graphdef = graphdef
    self.kinds = kinds
    self.kw_names = kw_names
    self.group_sizes = group_sizes
    self.statics = statics
    self.extra = extra
    self._hash = hash((graphdef, kinds, kw_names, group_sizes, statics, extra))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return self is other or (
        isinstance(other, CallKey) and self._hash == other._hash
        and self.graphdef == other.graphdef and self.kinds == other.kinds
        and self.kw_names == other.kw_names and self.group_sizes == other.group_sizes
        and self.statics == other.statics and self.extra == other.extra)


class Plan:
  """How one call's arguments map to leaves; reused while the graph arguments are unchanged.

  A plan never keeps the caller's objects alive: it refers to the argument objects and the
  Pytrees weakly, and when an argument object dies it drops its Variables too (``released``),
  so a model the user dropped is freed even though a transform saw it.
  """

  __slots__ = ('key', 'epoch', 'graph_objs', 'items', 'groups', 'kinds', 'positions', 'slots',
               '_node_refs', '__weakref__', 'watch')

  def __init__(self, key, epoch, graph_objs, items, groups, kinds, positions, nodes=()):
    self.key = key
    self.epoch = epoch
    self.items = items             # Variables and raw arrays of the graph args, in leaf order
    self.groups = groups           # per graph argument: (start, stop) into items
    self.kinds = kinds             # per argument position: PLAIN / GRAPH / STATIC_ARG
    self.positions = tuple(positions)  # per argument: its int index or keyword name
    self._node_refs = tuple(_weak(n) for n in nodes)
    self.watch = _NO_WATCH         # set by make_plan: the containers whose copies it compares
    # ((position, weak reference), ...) checked by identity; None: re-plan every call
    self.graph_objs = None if graph_objs is None else tuple(
        (pos, _weak(obj, self._release_callback())) for pos, obj in graph_objs)
    self.slots = self._slots()

  def _release_callback(self):
    plan_ref = _weakref.ref(self)

    def release(_):
      plan = plan_ref()
      if plan is not None:
        plan.release()
    return release

  def release(self) -> None:
    """Forget the objects: called when one of the argument objects died."""
    self.graph_objs = None
    self.items = []
    self.slots = ()
    self._node_refs = ()
    self.watch = _NO_WATCH

  @property
  def nodes(self) -> list:
    """The Pytrees and Variables of the graph args, in traversal order (REF indices)."""
    return [r() for r in self._node_refs]

  def _slots(self) -> tuple:
    """What split_inputs emits, precomputed: (items of a graph argument, all of them Variables?)
    or (None, position of a plain argument)."""
    slots = []
    group_iter = iter(self.groups)
    for pos, kind in zip(self.positions, self.kinds):
      if kind == GRAPH:
        a, b = next(group_iter)
        group = self.items[a:b]
        slots.append((group, all(isinstance(x, Variable) for x in group)))
      elif kind == PLAIN:
        slots.append((None, pos))
    return tuple(slots)

  def arguments(self) -> list:
    """``[(position, kind)]`` of every argument, in call order (positional, then sorted keywords)."""
    return list(zip(self.positions, self.kinds))

  def graph_positions(self) -> list:
    """The positions of the graph arguments, in the order of ``groups``."""
    return [pos for pos, kind in zip(self.positions, self.kinds) if kind == GRAPH]

  def leaves(self) -> list:
    return [x._value if isinstance(x, Variable) else x for x in self.items]

  def write_back(self, changed: tuple, values) -> None:
    """Assign the new values of leaves ``changed``: a Variable's value, or a raw array attribute
    of the caller's object (which keeps this plan valid: only the array changed)."""
    items = self.items
    raw = None
    for i, value in zip(changed, values):
      item = items[i]
      if isinstance(item, Variable):
        _set(item, '_value', value)
      else:
        raw = [] if raw is None else raw
        raw.append((i, value))
    if raw:
      self._write_raw(raw)

  def _write_raw(self, raw: list) -> None:
    parents = raw_leaf_parents(self.key.graphdef)
    valid = self.epoch == _settings.EPOCH[0] and self.watch.unchanged()
    nodes = self.nodes
    for i, value in raw:
      node_index, name = parents[i]
      parent = nodes[node_index]
      if isinstance(name, str):
        setattr(parent, name, value)
      else:
        parent[name] = value
      self.items[i] = value
    self.slots = self._slots()
    if valid:  # the attribute assignments bumped the epoch for every other cache, not this one
      self.epoch = _settings.EPOCH[0]
      self.watch.refresh()


class _Strong:
  """Stands in for a weak reference to an object that cannot be weakly referenced."""

  __slots__ = ('obj',)

  def __init__(self, obj):
    self.obj = obj

  def __call__(self):
    return self.obj


def _weak(obj, callback=None):
  try:
    return _weakref.ref(obj, callback)
  except TypeError:
    return _Strong(obj)


def refuse_bound_method(fun, transform: str) -> None:
  """NNX transforms take the object explicitly: a method bound to a Pytree hides it."""
  owner = getattr(fun, '__self__', None)
  if isinstance(owner, (Pytree, Variable)):
    name = getattr(fun, '__name__', 'method')
    raise ValueError(
        f'nnx.{transform} does not support bound methods ({type(owner).__name__}.{name} bound to '
        f'an object): the transform could not see or update the object\'s state. Use the '
        f'decorator form @nnx.{transform} on the method, or call '
        f'nnx.{transform}({type(owner).__name__}.{name})(instance, ...) with the unbound method.')


def _positions(args, kwargs):
  """Every argument with its position key: ints for positional, names for keyword (sorted)."""
  out = list(enumerate(args))
  out.extend((name, kwargs[name]) for name in sorted(kwargs))
  return out


def make_plan(args: tuple, kwargs: dict, *, graph: bool, static_positions: frozenset = frozenset(),
              context: str = 'tree-mode transform', extra: tp.Any = None) -> Plan:
  """Walk the arguments once: classify them and flatten the graph ones together."""
  entries = _positions(args, kwargs)
  kinds = []
  statics = []
  graph_args = ([None] * len(args), {})
  graph_objs = []
  for pos, value in entries:
    if pos in static_positions:
      kinds.append(STATIC_ARG)
      statics.append((pos, value))
    elif holds_graph(value):
      kinds.append(GRAPH)
      if isinstance(pos, int):
        graph_args[0][pos] = value
      else:
        graph_args[1][pos] = value
      graph_objs.append((pos, value))
    else:
      kinds.append(PLAIN)
  containers: list = []
  try:
    fl = flatten((tuple(graph_args[0]), graph_args[1]), graph=graph, context=context,
                 mark_seen=True, watch=containers)
  except AliasError as e:
    raise argument_alias_error(e, context) from None
  # group boundaries: leaves are in traversal order, positional args first, then sorted kwargs
  starts = {}  # (0, position) or (1, keyword) -> [first leaf, last leaf + 1]
  for i, path in enumerate(fl.paths):
    starts.setdefault(path[:2], [i, i])[1] = i + 1
  groups = []
  for pos, _ in graph_objs:
    k = (0, pos) if isinstance(pos, int) else (1, pos)
    groups.append(tuple(starts.get(k, (0, 0))))
  key = CallKey(fl.graphdef, tuple(kinds), tuple(sorted(kwargs)), tuple(b - a for a, b in groups),
                _hashable_statics(statics), extra)
  identity = tuple((pos, value) for pos, value in graph_objs if isinstance(value, (Pytree, Variable)))
  if len(identity) != len(graph_objs):
    identity = None  # a container holding objects: re-walk every call
  watch = _structure.Watch(containers)
  if identity is not None and watch.keeps_alive([obj for _, obj in identity]):
    identity = None  # a cycle back to an argument: a kept watch would keep it alive
  plan = Plan(key, _settings.EPOCH[0], identity, fl.leaves, groups, tuple(kinds),
              [pos for pos, _ in entries], fl.nodes)
  plan.watch = watch
  return plan


_NO_WATCH = _structure.Watch()


def leaf_occurrences(plan: Plan) -> list[tuple[int, tuple]]:
  """``(leaf index, path)`` of every place a leaf of the plan is reached: its first occurrence
  and, in graph mode, every shared reference to it. Paths are plan paths ``(0, i, ...)`` /
  ``(1, name, ...)``."""
  graphdef = plan.key.graphdef
  found = graphdef.memo.get('occurrences')
  if found is None:
    found = graphdef.memo['occurrences'] = _occurrences(graphdef.root)
  return found


def _occurrences(root) -> list[tuple[int, tuple]]:
  """``leaf_occurrences`` from the def alone: a reference to a shared Pytree counts every leaf
  under it again at the reference's path (one level: references inside it to Variables too)."""
  out = []
  leaf_of: dict = {}     # object number of a Variable / Ref -> its leaf index
  pytrees: dict = {}     # object number of a Pytree -> (its def, its first leaf index)
  count = 0              # leaves so far
  for path, d, index in numbered(root):
    tag = d[0]
    if tag == NODE:
      pytrees[index] = (d, count)
    elif tag == REF:
      if d[1] in leaf_of:
        out.append((leaf_of[d[1]], path))
      elif d[1] in pytrees:
        node_def, k = pytrees[d[1]]
        for sub, sd in iter_defs(node_def):
          if sd[0] == REF:
            if sd[1] in leaf_of:
              out.append((leaf_of[sd[1]], path + sub))
          elif sd[0] in (VAR, LEAF, ARRAYREF):
            out.append((k, path + sub))
            k += 1
    elif index is not None or tag == LEAF:  # a Variable, a raw Ref or a raw leaf
      if index is not None:
        leaf_of[index] = count
      out.append((count, path))
      count += 1
  return out


def object_prefix(spec, path: tuple, leaf) -> tuple[bool, tp.Any]:
  """Resolve a prefix shaped like an object, as ``nnx.prefix`` makes them: ``(True, value for
  the leaf at path)``, or ``(False, None)`` when ``spec`` is not such a prefix.

  Graph mode gives ``TreeState`` s (their function, or their State by path); tree mode the
  object's own shape with values where its Variables were (followed by attribute / item).
  """
  if isinstance(spec, TreeState):
    if spec.prefix_fn is not None:
      return True, spec.prefix_fn(path, leaf)
    node = spec.state
  elif isinstance(spec, Pytree):
    node = spec
  else:
    return False, None
  for key in path:
    if isinstance(node, Pytree) and isinstance(key, str) and not isinstance(node, dict):
      if key not in node.__dict__:
        break
      node = node.__dict__[key]
    elif isinstance(node, (dict, list, tuple, Pytree)):
      node = tp.cast(tp.Any, node)[key]  # a Pytree here is a container one (nnx.List, ...)
    else:
      break  # a value above the leaf: a prefix applies to everything below it
  return True, node


def resolve_leaf_specs(plan: Plan, spec_of: tp.Callable[[tp.Any], tp.Any],
                       leaf_spec: tp.Callable[[tp.Any, tuple, tp.Any], tp.Any],
                       what: str) -> list:
  """One spec per plan leaf (an axis, a sharding, ...) from per-argument prefixes.

  ``spec_of(position)`` is the user's prefix for an argument and ``leaf_spec(prefix, path
  inside the argument, leaf)`` resolves it for one leaf. A Variable reached from several
  places (graph mode) must resolve to the same spec everywhere: otherwise a ValueError
  ("Inconsistent aliasing detected") names each path with its spec.
  """
  specs: list = [None] * len(plan.items)
  first: dict = {}
  for i, path in leaf_occurrences(plan):
    spec = leaf_spec(spec_of(path[1]), path[2:], plan.items[i])
    if i not in first:
      first[i] = (path, spec)
      specs[i] = spec
    elif not _same_spec(spec, first[i][1]):
      p0, s0 = first[i]
      raise ValueError(
          'Inconsistent aliasing detected. The following nodes have different prefixes '
          f'({what}):\n\n  Node: {type(plan.items[i]).__name__}\n'
          f'  {argument_path(p0)}: {s0!r}\n  {argument_path(path)}: {spec!r}\n\n'
          f'A shared Variable must get the same {what} everywhere: make the prefixes agree, or '
          'pass separate Variables.')
  return specs


def refuse_shared_variables(plan: Plan, name: str) -> None:
  """NNX's "Duplicate ... found at paths" ValueError if a Variable of the plan is reached twice.

  The transforms that, without graph updates, check their inputs for aliasing (eval_shape,
  custom_vjp, make_jaxpr) refuse shared Variables even in graph mode.
  """
  first: dict = {}
  for i, path in leaf_occurrences(plan):
    if i not in first:
      first[i] = path
    elif isinstance(plan.items[i], Variable):
      raise ValueError(
          f'Duplicate {type(plan.items[i]).__name__} found at paths:\n\n'
          f'  - {argument_path(first[i])}\n  - {argument_path(path)}\n\n'
          f'nnx.{name} with graph_updates=False does not support Variable aliasing (duplicate '
          'inputs, or one Variable reached from two places). Pass separate Variables '
          f'(nnx.clone(...)), or pass graph=True, graph_updates=True to nnx.{name}.')


def input_specs(plan: Plan, spec_of: tp.Callable[[tp.Any], tp.Any],
                leaf_spec: tp.Callable[[tp.Any, tuple, tp.Any], tp.Any],
                what: str) -> tuple[list, list]:
  """``(one spec per dynamic input, one spec per plan leaf)``: what a JAX transform taking
  per-input specs (``in_shardings``, ``in_specs``, ``in_axes``) needs for this plan. A graph
  input's spec is the list of its leaves' specs; a plain input keeps its prefix."""
  leaf_specs = resolve_leaf_specs(plan, spec_of, leaf_spec, what) if GRAPH in plan.kinds else []
  dynamic = []
  groups = iter(plan.groups)
  for pos, kind in zip(plan.positions, plan.kinds):
    if kind == GRAPH:
      a, b = next(groups)
      dynamic.append(leaf_specs[a:b])
    elif kind == PLAIN:
      dynamic.append(spec_of(pos))
  return dynamic, leaf_specs


def _same_spec(a, b) -> bool:
  try:
    return a is b or bool(a == b)
  except Exception:
    return False


def argument_alias_error(e: AliasError, context: str) -> ValueError:
  """A tree-mode sharing error among a transform's arguments, with the paths as the user passed
  them (``.args[0].encoder.w``) and, for a shared object, the first Variable in it (as NNX)."""
  path, first, obj = e.path, e.first_path, e.obj
  inner = ()
  if isinstance(obj, Pytree):
    fl = flatten(obj, graph=True, context=context)
    found = next(((p, leaf) for p, leaf in zip(fl.paths, fl.leaves) if isinstance(leaf, Variable)),
                 None)
    if found is not None:
      inner, obj = found
  name = type(obj).__name__ if obj is not None else 'object'
  return ValueError(
      f'{e.args[0].splitlines()[0]}\n'
      f'Duplicate {name} found at paths:\n\n'
      f'  - {argument_path(first + inner)}\n  - {argument_path(path + inner)}\n\n'
      f'{context} (graph=False, or graph_updates=False) does not support Variable aliasing. '
      'Pass graph=True to the transform (or call nnx.set_graph_mode(True)) to allow sharing, '
      'or make the two references separate objects (e.g. with nnx.clone).')


def argument_path(path: tuple) -> str:
  """A plan leaf path ``(0, i, *rest)`` / ``(1, name, *rest)`` as the user sees it:
  ``.args[i].rest`` / ``.kwargs['name'].rest``."""
  head = f'.args[{path[1]}]' if path[0] == 0 else f'.kwargs[{path[1]!r}]'
  rest = format_path(path[2:])
  return head + ('' if rest == '<root>' else rest)


def raw_leaf_parents(graphdef: GraphDef) -> dict:
  """``{leaf index: (node index, attribute)}`` for raw array leaves held directly by a Pytree.

  Node indices number the objects in traversal order (the order of ``Plan.nodes`` and of the
  objects ``rebuild`` makes; see ``arbax.defs``), so the same entry finds the parent inside
  and outside.
  """
  found = graphdef.memo.get('raw_parents')
  if found is None:
    found = graphdef.memo['raw_parents'] = {
        i: info.parent for i, info in enumerate(leaf_defs(graphdef))
        if info.parent is not None and info.d[0] == LEAF}
  return found


def _hashable_statics(statics):
  try:
    hash(tuple(statics))
    return tuple(statics)
  except TypeError as e:
    raise ValueError(f'static arguments must be hashable: {e}') from None


def plan_still_valid(plan: Plan | None, args: tuple, kwargs: dict) -> tp.TypeGuard[Plan]:
  """The cheap per-call check that lets a steady loop reuse the last plan."""
  if plan is None or plan.graph_objs is None or plan.epoch != _settings.EPOCH[0]:
    return False
  kinds = plan.kinds
  if len(kinds) != len(args) + len(kwargs):
    return False
  if kwargs and tuple(sorted(kwargs)) != plan.key.kw_names:
    return False
  for pos, ref in plan.graph_objs:
    current = args[pos] if isinstance(pos, int) else kwargs[pos]
    if current is not ref():
      return False
  for i, kind in enumerate(kinds[:len(args)]):
    if kind == PLAIN and not _is_plain_fast(args[i]) and holds_graph(args[i]):
      return False
  for pos, cached in plan.key.statics:  # static arguments are part of the key: must be equal
    current = args[pos] if isinstance(pos, int) else kwargs[pos]
    if current is not cached and not _equal(current, cached):
      return False
  for name in plan.key.kw_names:
    v = kwargs[name]
    if not _is_plain_fast(v) and holds_graph(v) and not any(p == name for p, _ in plan.graph_objs):
      return False
  if not plan.watch.unchanged():  # a change made behind Pytree.__setattr__, or in a plain container
    return False
  if _structure.checking():
    _check_plan(plan, args, kwargs)
  return True


def _check_plan(plan: Plan, args: tuple, kwargs: dict) -> None:
  """Check mode: walk the graph arguments again, as make_plan did, and compare with the plan."""
  positional, named = [None] * len(args), {}
  for pos, kind in zip(plan.positions, plan.kinds):
    if kind == GRAPH:
      if isinstance(pos, int):
        positional[pos] = args[pos]
      else:
        named[pos] = kwargs[pos]
  fresh = flatten((tuple(positional), named), graph=plan.key.graphdef.graph, context='cache check')
  _structure.verify('a cached transform plan', plan.key.graphdef, plan.items, fresh.graphdef,
                    fresh.leaves, fresh.paths)


def _equal(a, b) -> bool:
  try:
    return type(a) is type(b) and bool(a == b)
  except Exception:  # e.g. arrays compared elementwise
    return False


def split_inputs(plan: Plan, args: tuple, kwargs: dict) -> list:
  """The dynamic inputs of the JAX call: one entry per non-static argument.

  Graph arguments become their list of leaf values; plain ones pass unchanged.
  """
  out = []
  for group, how in plan.slots:
    if group is None:
      out.append(args[how] if how.__class__ is int else kwargs[how])
    elif how:
      out.append([v._value for v in group])
    else:
      out.append([x._value if isinstance(x, Variable) else x for x in group])
  return out


class Inner:
  """One call of the user's function inside a JAX transform: the objects rebuilt around the
  traced leaves, and (``result``) what the call changed.

  ``args``/``kwargs`` are what to call the function with; ``nodes`` every rebuilt Pytree and
  Variable in traversal order (index i is the caller's ``plan.nodes[i]``).
  """

  __slots__ = ('key', 'args', 'kwargs', 'graph_args', 'in_leaves', 'inner_items', 'nodes')

  def __init__(self, key: CallKey, inputs: tp.Sequence):
    self.key = key
    in_leaves = []
    it = iter(inputs)
    plain = []
    for kind in key.kinds:
      if kind == GRAPH:
        in_leaves.extend(next(it))
      elif kind == PLAIN:
        plain.append(next(it))
    nodes: list = []
    self.graph_args = unflatten(key.graphdef, in_leaves, nodes=nodes)
    graph_args, graph_kwargs = self.graph_args
    # leaves are consumed in order; Variables appear in `nodes` in that same order
    var_iter = iter([n for n in nodes if isinstance(n, Variable)])
    self.inner_items = [next(var_iter) if is_var else None for is_var in _leaf_kinds(key.graphdef)]
    args = []
    kwargs = {}
    plain_it = iter(plain)
    statics = dict(key.statics)
    n_pos = len(key.kinds) - len(key.kw_names)
    for i, kind in enumerate(key.kinds):
      pos = i if i < n_pos else key.kw_names[i - n_pos]
      if kind == GRAPH:
        value = graph_args[pos] if isinstance(pos, int) else graph_kwargs[pos]
      elif kind == PLAIN:
        value = next(plain_it)
      else:
        value = statics[pos]
      if isinstance(pos, int):
        args.append(value)
      else:
        kwargs[pos] = value
    self.args, self.kwargs = tuple(args), kwargs
    self.in_leaves = in_leaves
    self.nodes = nodes

  def call(self, fun: tp.Callable):
    with collector_paused():
      return fun(*self.args, **self.kwargs)

  def updates(self, keep: tp.Container[int] = ()) -> tuple[tuple, list]:
    """Indices and new values of the leaves whose value changed (plus the Variables in ``keep``):
    Variables with a new value, and raw array attributes assigned a new array."""
    changed = []
    values = []
    in_leaves = self.in_leaves
    for i, var in enumerate(self.inner_items):
      if var is not None and (var._value is not in_leaves[i] or i in keep):
        changed.append(i)
        values.append(var._value)
    parents = raw_leaf_parents(self.key.graphdef)
    if parents:
      nodes = self.nodes
      for i, (node_index, name) in parents.items():
        now = nodes[node_index].__dict__.get(name, in_leaves[i])
        if now is not in_leaves[i] and isinstance(now, ARRAY_TYPES):
          changed.append(i)
          values.append(now)
      if len(changed) > 1:
        order = sorted(range(len(changed)), key=changed.__getitem__)
        changed = [changed[k] for k in order]
        values = [values[k] for k in order]
    return tuple(changed), values

  def restructured(self, out) -> 'Output | None':
    """If the call changed the arguments' structure: an Output that rebuilds it (and the output)
    onto the caller's objects after the call. None when the structure is as it came in."""
    after = flatten(self.graph_args, graph=True, context='graph updates')
    nodes = self.nodes
    if (after.graphdef == self.key.graphdef and len(after.nodes) == len(nodes)
        and all(a is b for a, b in zip(after.nodes, nodes))):
      return None
    index = {id(n): i for i, n in enumerate(nodes)}
    both = flatten((self.graph_args, out), graph=True, context='graph updates')
    identity = tuple(index.get(id(n), -1) for n in both.nodes)
    return Output(RESTRUCTURED, (RESTRUCTURED, both.graphdef, identity), [],
                  [_raw(x) for x in both.leaves])

  def result(self, out, *, graph: bool, graph_updates: bool = False,
             keep: tp.Container[int] = (), map_inputs: bool = True,
             name: str = 'transform') -> 'Output':
    """The Output of this call: value updates, structural updates (graph mode with graph
    updates) and the user's output ``out``.

    Without graph updates an output may not hold an input's Variable (NNX refuses that
    aliasing: the caller would get two objects for one Variable); with them, such outputs
    come back as the caller's own objects.
    """
    if graph and graph_updates:
      restructured = self.restructured(out)
      if restructured is not None:
        return restructured
    changed, values = self.updates(keep)
    if graph and graph_updates:
      out_def, out_leaves = flatten_output(out, graph=True,
                                           known=self.nodes if map_inputs else ())
    else:
      if map_inputs:
        self.check_output_aliases(out, graph, name)
      out_def, out_leaves = flatten_output(out, graph=graph)
    return Output(changed, out_def, values, out_leaves)

  def check_output_aliases(self, out, graph: bool, name: str) -> None:
    """Raise NNX's "Duplicate ... found at paths" error if ``out`` holds an input Variable."""
    if out is None or isinstance(out, ARRAY_TYPES) and not isinstance(out, Variable):
      return
    inputs = {id(v): i for i, v in enumerate(self.inner_items) if v is not None}
    if not inputs:
      return
    fl = flatten(out, graph=graph, context=f'tree-mode {name} output')
    for path, leaf in zip(fl.paths, fl.leaves):
      i = inputs.get(id(leaf))
      if i is not None:
        raise ValueError(
            f'Duplicate {type(leaf).__name__} found at paths:\n\n'
            f'  - {argument_path(self.key.graphdef.leaf_paths[i])}\n'
            f'  - .out{format_path(path) if path else ""}\n\n'
            f'nnx.{name} with graph_updates=False does not support Variable aliasing (duplicate '
            'inputs, duplicate outputs, or input Variables returned as outputs). Return new '
            'Variables (nnx.clone(...)), return values instead of Variables, or pass '
            f'graph=True, graph_updates=True to nnx.{name}.')


def rebuild(key: CallKey, inputs: tp.Sequence, *, nodes: list | None = None
            ) -> tuple[tuple, dict, list, list]:
  """Inside the transform: objects around the traced leaves, and the arguments to call with.

  Returns ``(args, kwargs, in_leaves, inner_items)`` where ``inner_items`` are the new
  Variables / raw leaves in leaf order, to compare against ``in_leaves`` afterwards.
  ``nodes``, if given, receives every rebuilt Pytree and Variable in traversal order.
  """
  inner = Inner(key, inputs)
  if nodes is not None:
    nodes.extend(inner.nodes)
  return inner.args, inner.kwargs, inner.in_leaves, inner.inner_items


def _leaf_kinds(graphdef: GraphDef) -> tuple:
  """For each leaf of ``graphdef``: whether it is a Variable (True) or a raw leaf (False)."""
  kinds = graphdef.memo.get('leaf_kinds')
  if kinds is None:
    kinds = graphdef.memo['leaf_kinds'] = tuple(info.is_var for info in leaf_defs(graphdef))
  return kinds


def collect_updates(in_leaves: list, inner_items: list, *, keep: tp.Container[int] = ()):
  """Indices and new values of the Variables whose value changed (plus those in ``keep``)."""
  changed = []
  values = []
  for i, (before, var) in enumerate(zip(in_leaves, inner_items)):
    if var is None:
      continue
    if var._value is not before or i in keep:
      changed.append(i)
      values.append(var._value)
  return tuple(changed), values


class Output:
  """What the inner function returns: updates and the user's output, as one pytree.

  Its static part (which Variables changed, the output's GraphDef) travels as
  pytree aux data, so JAX stores it with each compiled executable.
  """

  __slots__ = ('changed', 'out_def', 'values', 'out_leaves')

  def __init__(self, changed, out_def, values, out_leaves):
    self.changed = changed
    self.out_def = out_def
    self.values = values
    self.out_leaves = out_leaves


jax.tree_util.register_pytree_node(
    Output,
    lambda o: ((o.values, o.out_leaves), (o.changed, o.out_def)),
    lambda aux, children: Output(aux[0], aux[1], children[0], children[1]))


def flatten_output(out, *, graph: bool, known: tp.Sequence = ()) -> tuple[tp.Any, list]:
  """The output as (def, leaf values).

  Variables and Pytrees come back as new objects, except in graph mode those in ``known``
  (the rebuilt inputs), which come back as the caller's own objects.
  """
  if isinstance(out, jax.Array) and not isinstance(out, Variable):
    return LEAF_DEF, [out]
  if out is None:
    return (STATIC, None), []
  context = 'tree-mode transform output'
  if graph and known:
    fl = flatten(out, graph=True, context=context, known=known)
    if any(d[0] == REF and d[1] < len(known) for _, d in iter_defs(fl.graphdef.root)):
      # Some outputs are inputs: building needs the caller's objects seeded, in input order.
      return (WITH_INPUTS, fl.graphdef), [_raw(x) for x in fl.leaves]
  fl = flatten(out, graph=graph, context=context)  # refs numbered from 0: build needs no seed
  return fl.graphdef, [_raw(x) for x in fl.leaves]


def _raw(x):
  # A Variable leaves as its value; a Ref cannot leave a JAX transform: its value does, and
  # building the output outside makes a new Ref (or, for an input's Ref, keeps the caller's).
  if isinstance(x, Variable):
    return x._value
  return ArrayRefOutput(x[...]) if isinstance(x, jax.Ref) else x
WITH_INPUTS = 'with-inputs'  # marks an output def whose refs point into the inputs


def build_output(out_def, out_leaves, nodes: tp.Sequence = ()):
  """The user's output from what ``flatten_output`` made.

  ``nodes`` (the caller's objects, in input order) resolves refs to inputs; it is used only
  when the def was made with them.
  """
  if out_def is LEAF_DEF or out_def == LEAF_DEF:
    return out_leaves[0]
  if isinstance(out_def, tuple) and out_def[0] == STATIC:
    return out_def[1]
  if isinstance(out_def, tuple) and out_def[0] == WITH_INPUTS:
    return unflatten(out_def[1], out_leaves, nodes=list(nodes))
  return unflatten(out_def, out_leaves)


RESTRUCTURED = 'restructured'  # marks an Output whose def rebuilds the arguments' structure


def run(fun: tp.Callable, key: CallKey, inputs: tp.Sequence, *, graph: bool,
        graph_updates: bool = False, keep: tp.Container[int] = (),
        map_inputs: bool = True, hook: tp.Callable[[Output], Output] | None = None,
        name: str = 'transform') -> Output:
  """Inside a JAX transform: rebuild the arguments, call ``fun``, return its updates and output.

  The body of every transform whose JAX function maps inputs to one ``Output``
  (jit, remat, cond branches, eval_shape, checkify, ...). In graph mode an output that is
  one of the inputs comes back as the caller's object (``finish`` resolves it), unless
  ``map_inputs`` is False. ``hook`` may rewrite the Output before it leaves the trace (e.g.
  ``nnx.jit`` constrains updates and outputs to their shardings).
  """
  with collector_paused():
    inner = Inner(key, inputs)
    out = inner.call(fun)
    result = inner.result(out, graph=graph, graph_updates=graph_updates, keep=keep,
                          map_inputs=map_inputs, name=name)
    return result if hook is None else hook(result)


@contextlib.contextmanager
def collector_paused():
  """Pause Python's garbage collector while a transform's body is traced.

  A trace allocates tens of thousands of long-lived objects (tracers, equations, the
  user's new Modules); each time the allocation count crosses the collector's threshold
  it walks every object of the process, and a trace pays for several such walks. Paused,
  the garbage of the trace is collected once, after it. Nested bodies leave the
  outermost one to resume the collector.
  """
  if not gc.isenabled():
    yield
    return
  gc.disable()
  try:
    yield
  finally:
    gc.enable()


def output_leaf_paths(result: Output) -> list[tuple[bool, tuple]]:
  """For each of ``result.out_leaves``: ``(True, plan path)`` for a leaf of the arguments (a
  restructured call sends them back), ``(False, path in the user's output)`` otherwise."""
  out_def = result.out_def
  if result.changed is RESTRUCTURED:
    return [(p[0] == 0, p[1:]) for p in out_def[1].leaf_paths]
  if isinstance(out_def, tuple) and out_def and out_def[0] == WITH_INPUTS:
    out_def = out_def[1]
  paths = getattr(out_def, 'leaf_paths', None)
  if paths is None:  # a bare array (or nothing): the output itself
    return [(False, ())] * len(result.out_leaves)
  return [(False, p) for p in paths]


def finish(plan: Plan, result: Output):
  """After the JAX call returned: write the changed Variables back, build the user's output."""
  if result.changed is RESTRUCTURED:
    _, graphdef, identity = result.out_def
    reuse = [plan.nodes[j] if j >= 0 else None for j in identity]
    _, out = graphdef.build(result.out_leaves, reuse=reuse)
    _settings.bump_epoch()
    return out
  if result.changed:
    plan.write_back(result.changed, result.values)
  out_def = result.out_def
  if out_def.__class__ is tuple and out_def and out_def[0] == WITH_INPUTS:
    return unflatten(out_def[1], result.out_leaves, nodes=plan.nodes)
  return build_output(out_def, result.out_leaves)
