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
3. After the JAX call returned, ``Plan.write_back`` assigns only the changed
   Variables. Nothing is written when anything raised: a failed call leaves
   the caller's state as it was.
"""
from __future__ import annotations

import typing as tp

import jax
import numpy as np

from arbax import _settings
from arbax.graph import (GraphDef, LEAF_DEF, flatten, unflatten, iter_defs, STATIC, LEAF, REF,
                         VAR, ARRAY_TYPES)
from arbax.pytree import Pytree
from arbax.variables import Variable

_set = object.__setattr__

# Argument kinds in a plan.
PLAIN, GRAPH, STATIC_ARG = 0, 1, 2
_PLAIN_TYPES = frozenset({int, float, bool, complex, np.ndarray, type(None)})


def _is_plain_fast(x) -> bool:
  t = type(x)
  return t in _PLAIN_TYPES or isinstance(x, jax.Array) and not isinstance(x, Variable)


def holds_graph(x) -> bool:
  """Whether ``x`` holds any Pytree or Variable (so it needs the graph treatment)."""
  if isinstance(x, (Variable, Pytree)):
    return True
  if _is_plain_fast(x):
    return False
  if isinstance(x, (list, tuple)):
    return any(holds_graph(v) for v in x)
  if isinstance(x, dict):
    return any(holds_graph(v) for v in x.values())
  leaves = jax.tree_util.tree_leaves(x, is_leaf=lambda y: isinstance(y, (Variable, Pytree)))
  return any(isinstance(leaf, (Variable, Pytree)) for leaf in leaves)


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
  """How one call's arguments map to leaves; reused while the graph arguments are unchanged."""

  __slots__ = ('key', 'epoch', 'graph_objs', 'items', 'groups', 'kinds', 'slots', 'nodes')

  def __init__(self, key, epoch, graph_objs, items, groups, kinds, positions, nodes=()):
    self.key = key
    self.epoch = epoch
    self.graph_objs = graph_objs   # ((position, object), ...) checked by identity
    self.items = items             # Variables and raw arrays of the graph args, in leaf order
    self.groups = groups           # per graph argument: (start, stop) into items
    self.kinds = kinds             # per argument position: PLAIN / GRAPH / STATIC_ARG
    self.nodes = nodes             # the Pytrees and Variables of the graph args, traversal order
    # What split_inputs emits, precomputed: (items of a graph argument, all of them Variables?)
    # or (None, position of a plain argument).
    slots = []
    group_iter = iter(groups)
    for pos, kind in zip(positions, kinds):
      if kind == GRAPH:
        a, b = next(group_iter)
        group = items[a:b]
        slots.append((group, all(isinstance(x, Variable) for x in group)))
      elif kind == PLAIN:
        slots.append((None, pos))
    self.slots = tuple(slots)

  def leaves(self) -> list:
    return [x._value if isinstance(x, Variable) else x for x in self.items]

  def write_back(self, changed: tuple, values) -> None:
    items = self.items
    for i, value in zip(changed, values):
      _set(items[i], '_value', value)


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
  fl = flatten((tuple(graph_args[0]), graph_args[1]), graph=graph, context=context, mark_seen=True)
  # group boundaries: leaves are in traversal order, positional args first, then sorted kwargs
  starts = {}  # (0, position) or (1, keyword) -> [first leaf, last leaf + 1]
  for i, path in enumerate(fl.paths):
    starts.setdefault(path[:2], [i, i])[1] = i + 1
  groups = []
  for pos, value in graph_objs:
    k = (0, pos) if isinstance(pos, int) else (1, pos)
    groups.append(tuple(starts.get(k, (0, 0))))
  key = CallKey(fl.graphdef, tuple(kinds), tuple(sorted(kwargs)), tuple(b - a for a, b in groups),
                _hashable_statics(statics), extra)
  identity = tuple((pos, value) for pos, value in graph_objs if isinstance(value, (Pytree, Variable)))
  if len(identity) != len(graph_objs):
    identity = None  # a container holding objects: re-walk every call
  return Plan(key, _settings.EPOCH[0], identity, fl.leaves, groups, tuple(kinds),
              [pos for pos, _ in entries], fl.nodes)


def _hashable_statics(statics):
  try:
    hash(tuple(statics))
    return tuple(statics)
  except TypeError as e:
    raise ValueError(f'static arguments must be hashable: {e}') from None


def plan_still_valid(plan: Plan | None, args: tuple, kwargs: dict) -> bool:
  """The cheap per-call check that lets a steady loop reuse the last plan."""
  if plan is None or plan.graph_objs is None or plan.epoch != _settings.EPOCH[0]:
    return False
  kinds = plan.kinds
  if len(kinds) != len(args) + len(kwargs):
    return False
  if kwargs and tuple(sorted(kwargs)) != plan.key.kw_names:
    return False
  for pos, obj in plan.graph_objs:
    current = args[pos] if isinstance(pos, int) else kwargs[pos]
    if current is not obj:
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
  return True


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


def rebuild(key: CallKey, inputs: tp.Sequence, *, nodes: list | None = None
            ) -> tuple[tuple, dict, list, list]:
  """Inside the transform: objects around the traced leaves, and the arguments to call with.

  Returns ``(args, kwargs, in_leaves, inner_items)`` where ``inner_items`` are the new
  Variables / raw leaves in leaf order, to compare against ``in_leaves`` afterwards.
  ``nodes``, if given, receives every rebuilt Pytree and Variable in traversal order.
  """
  in_leaves = []
  it = iter(inputs)
  plain = []
  for kind in key.kinds:
    if kind == GRAPH:
      in_leaves.extend(next(it))
    elif kind == PLAIN:
      plain.append(next(it))
  nodes = [] if nodes is None else nodes
  graph_args, graph_kwargs = unflatten(key.graphdef, in_leaves, nodes=nodes)
  inner_items = []
  # leaves are consumed in order; Variables appear in `nodes` in that same order
  var_iter = iter([n for n in nodes if isinstance(n, Variable)])
  for leaf_def_is_var in _leaf_kinds(key.graphdef):
    inner_items.append(next(var_iter) if leaf_def_is_var else None)
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
  return tuple(args), kwargs, in_leaves, inner_items


_LEAF_KINDS_CACHE: dict = {}


def _leaf_kinds(graphdef: GraphDef) -> tuple:
  """For each leaf of ``graphdef``: whether it is a Variable (True) or a raw array (False)."""
  cached = _LEAF_KINDS_CACHE.get(graphdef)
  if cached is not None:
    return cached
  kinds = tuple(d[0] == VAR for _, d in iter_defs(graphdef.root) if d[0] in (VAR, LEAF))
  _LEAF_KINDS_CACHE[graphdef] = kinds
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
  return x._value if isinstance(x, Variable) else x
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


def run(fun: tp.Callable, key: CallKey, inputs: tp.Sequence, *, graph: bool,
        keep: tp.Container[int] = (), map_inputs: bool = True) -> Output:
  """Inside a JAX transform: rebuild the arguments, call ``fun``, return its updates and output.

  The body of every transform whose JAX function maps inputs to one ``Output``
  (jit, remat, cond branches, eval_shape, checkify, ...). In graph mode an output that is
  one of the inputs comes back as the caller's object (``finish`` resolves it), unless
  ``map_inputs`` is False.
  """
  nodes: list = []
  args, kwargs, in_leaves, inner_items = rebuild(key, inputs, nodes=nodes)
  out = fun(*args, **kwargs)
  changed, values = collect_updates(in_leaves, inner_items, keep=keep)
  out_def, out_leaves = flatten_output(out, graph=graph, known=nodes if map_inputs else ())
  return Output(changed, out_def, values, out_leaves)


def finish(plan: Plan, result: Output):
  """After the JAX call returned: write the changed Variables back, build the user's output."""
  if result.changed:
    plan.write_back(result.changed, result.values)
  return build_output(result.out_def, result.out_leaves, plan.nodes)
