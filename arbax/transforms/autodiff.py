"""Autodiff with state propagation: ``grad``, ``value_and_grad``, ``vjp``, ``jvp``,
``custom_vjp`` and ``remat``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Count(nnx.Variable): pass
    >>> class Scale(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.array(3.0))
    ...     self.calls = Count(jnp.array(0))
    ...   def __call__(self, x):
    ...     self.calls[...] += 1
    ...     return self.w * x
    >>> m = Scale()
    >>> grads = nnx.grad(lambda m, x: m(x) ** 2)(m, 2.0)   # d/dw (w x)^2 = 2 w x^2
    >>> float(grads['w'][...]), int(m.calls[...])
    (24.0, 1)

Two regimes, as in NNX:

* graph mode with graph updates (the default): a Module (any Pytree) argument is
  differentiated with respect to its ``nnx.Param`` Variables (``nnx.DiffState(argnum,
  filter)`` picks others) and its gradient is a State of them, paths as in
  ``nnx.state(model, nnx.Param)``. Variables and arrays held directly by argument
  containers (lists, dicts, States) are differentiated whole. Whatever the function
  changes, structure included (attributes added, Variables created), reaches the caller.
* tree mode (``graph=False``) or ``graph_updates=False``: ``jax.grad``'s rules: every array
  of a differentiated argument is differentiated, and the gradient has the argument's type
  (the gradient of a ``Linear`` is a ``Linear`` holding gradients). Only Variable values
  come out of the function.

A call that raises changes nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np

from arbax import _settings
from arbax import filters as filterlib
from arbax.defs import VAR, NODE, LEAF, REF, SEQ, MAP, JAXNODE, ARRAYREF, iter_defs
from arbax.graph import flatten, leaf_defs
from arbax.pytree import Pytree
from arbax.state import State, from_flat_state
from arbax.transforms import _propagate as prop
from arbax.variables import Param, Variable

__all__ = ['DiffState', 'grad', 'value_and_grad', 'vjp', 'jvp', 'custom_vjp', 'remat']

_SKIP = object()  # a leaf that is not differentiated


@dataclasses.dataclass(frozen=True)
class DiffState:
  """Differentiate argument ``argnum`` with respect to the Variables matching ``filter``.

  Pass it in ``argnums`` of ``nnx.grad`` / ``nnx.value_and_grad`` (or
  ``nondiff_argnums`` of ``nnx.custom_vjp``); graph mode with graph updates only.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Affine(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.array(3.0))
      ...     self.b = nnx.Param(jnp.array(1.0))
      >>> only_w = nnx.DiffState(0, nnx.PathContains('w'))
      >>> grads = nnx.grad(lambda m: m.w * 2.0 + m.b, argnums=only_w)(Affine())
      >>> list(grads), float(grads['w'][...])
      (['w'], 2.0)

  Args:
    argnum: the position of the argument.
    filter: the filter of its Variables to differentiate.
  """
  argnum: int
  filter: filterlib.Filter


def _tracking(graph: bool, graph_updates: bool) -> bool:
  """Whether a transform works in NNX's graph-updates regime (else ``jax``'s tree rules)."""
  return graph and graph_updates


# -- arguments ------------------------------------------------------------------
def _positional(fun, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Keyword arguments naming positional parameters become positional, as NNX resolves them
  (so ``argnums`` can reach them); keyword-only ones stay keywords."""
  if not kwargs:
    return args, kwargs
  try:
    bound = inspect.signature(fun).bind(*args, **kwargs)
  except (TypeError, ValueError):
    return args, kwargs  # the call itself will raise the user's error
  return bound.args, bound.kwargs


def _check_prefix(prefix, name: str, transform: str, graph: bool, graph_updates: bool) -> None:
  """NNX's checks of a prefix argument (``argnums``, ``nondiff_argnums``)."""
  leaves = jax.tree_util.tree_leaves(
      prefix, is_leaf=lambda x: isinstance(x, (Pytree, Variable, DiffState)))
  for leaf in leaves:
    if isinstance(leaf, Variable):
      raise ValueError(f'Found a {type(leaf).__name__} Variable in `{name}` for nnx.{transform}: '
                       'Variables are not prefixes. Pass argument positions (ints) or '
                       'nnx.DiffState(argnum, filter).')
    if isinstance(leaf, DiffState) and not (graph and graph_updates):
      raise ValueError(
          f'`{name}` cannot contain `DiffState` objects when `graph=False` or '
          f'`graph_updates=False` (got {leaf!r} for nnx.{transform}). Either remove the '
          f'DiffState and select the state yourself (nnx.split the model and differentiate the '
          f'part you want), pass graph=True, graph_updates=True to nnx.{transform}, or use '
          f'nnx.compat.{transform}(...).')
    if isinstance(leaf, Pytree) and graph:
      raise ValueError(
          f'Found a graph node of type {type(leaf).__name__} in `{name}` for nnx.{transform}. '
          'Graph nodes are not allowed as prefixes when graph=True: pass argument positions '
          f'(ints) or nnx.DiffState(argnum, filter), or pass graph=False to nnx.{transform}.')


def _argnum_specs(argnums) -> tuple[tuple, bool]:
  """``((argnum, filter), ...)`` and whether a single gradient (not a tuple) is returned."""
  single = isinstance(argnums, (int, DiffState))
  entries = (argnums,) if single else tuple(argnums)
  specs = []
  seen = set()
  for entry in entries:
    if isinstance(entry, DiffState):
      argnum, filter_ = entry.argnum, entry.filter
    elif isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
      argnum, filter_ = int(entry), Param
    else:
      raise TypeError(f'argnums must be ints or nnx.DiffState, got {entry!r}')
    if argnum in seen:
      raise ValueError(f'argnum {argnum} is repeated in argnums')
    seen.add(argnum)
    specs.append((argnum, filter_))
  return tuple(specs), single


def _normalize_argnums(specs: tuple, n: int, argnums) -> dict:
  """``{position: filter}`` for this call's ``n`` positional arguments."""
  out = {}
  for argnum, filter_ in specs:
    if argnum >= n or argnum < -n:
      raise TypeError(f'differentiating with respect to argnums={argnums} requires at least '
                      f'{max(a for a, _ in specs) + 1} positional arguments to be passed by '
                      f'the caller, but got only {n} positional arguments.')
    out[argnum % n] = filter_
  return out


def _unwrap(x):
  return x._value if isinstance(x, Variable) else x


# -- which leaves are differentiated -------------------------------------------------------
def _arg_defs(graphdef) -> tuple:
  """The def of each positional argument of a plan's GraphDef (non-graph ones: static Nones)."""
  return graphdef.root.children[0].children


def _locate(d, path: tuple) -> tuple[bool, tuple]:
  """Whether the leaf at ``path`` under ``d`` sits inside a Pytree, and its path from the
  outermost such Pytree (the node a filter sees, as ``nnx.state(node, filter)`` does)."""
  for i, key in enumerate(path):
    tag = d.tag
    if tag == NODE:
      return True, path[i:]
    if tag == SEQ:
      d = d.children[key]
    else:  # MAP / JAXNODE
      d = d.children[d.keys.index(key)]
  return False, ()


class _Wrt:
  """How an argument is differentiated, as the aliasing check compares and shows it."""

  __slots__ = ('filter',)

  def __init__(self, filter_):
    self.filter = filter_

  def __eq__(self, other):
    return isinstance(other, _Wrt) and (self.filter is other.filter or self.filter == other.filter)

  def __hash__(self):
    return 0

  def __repr__(self):
    if self.filter is None:
      return 'not differentiated'
    if self.filter is ...:
      return 'differentiated'
    name = getattr(self.filter, '__name__', None) or repr(self.filter)
    return f'differentiated (filter {name})'


_NOT_WRT = _Wrt(None)


def _grad_rule(tracking: bool):
  """``choose(predicate, inside, relative path, leaf)`` of grad: the filter applies to the
  Variables of Pytrees in graph-updates mode; everything else is differentiated."""
  if tracking:
    return lambda pred, inside, rel, leaf: pred(rel, leaf) if inside else True
  return lambda pred, inside, rel, leaf: True


def _inexact(path, value) -> bool:
  value = _unwrap(value)
  try:
    return bool(jnp.issubdtype(jnp.result_type(value), jnp.inexact))
  except TypeError:
    return False


def _inexact_rule(pred, inside, rel, leaf) -> bool:
  return _inexact(rel, leaf)


class _Selection:
  """The differentiated leaves of one plan, and how JAX's inputs map to them.

  ``slots`` lists ``(input index, leaf index in that input or None)`` for each differentiated
  value, in argnums order; None stands for a whole plain argument. ``chosen[i]`` tells
  whether plan leaf ``i`` is differentiated.
  """

  def __init__(self, plan: prop.Plan, wrt: dict, choose: tp.Callable):
    self.plan = plan
    self.wrt = wrt
    input_of = {}
    for pos, kind in zip(plan.positions, plan.kinds):
      if kind != prop.STATIC_ARG:
        input_of[pos] = len(input_of)
    groups = dict(zip(plan.graph_positions(), plan.groups))
    self.chosen = self._choose(plan, wrt, choose) if groups else []
    self.slots: list = []
    self.per_arg: list = []  # per argnum: ('plain', slot) or ('graph', position, leaf slots)
    for pos in wrt:
      kind = plan.kinds[pos]
      if kind == prop.GRAPH:
        a, b = groups[pos]
        leaf_slots = []
        for i in range(a, b):
          leaf_slots.append(len(self.slots) if self.chosen[i] else None)
          if self.chosen[i]:
            self.slots.append((input_of[pos], i - a))
        self.per_arg.append(('graph', pos, leaf_slots))
      else:
        self.per_arg.append(('plain', len(self.slots)))
        self.slots.append((input_of[pos], None))

  @staticmethod
  def _choose(plan, wrt: dict, choose) -> list:
    """Per leaf, whether it is differentiated; a Variable reached from two arguments must be
    differentiated the same way from both ("Inconsistent aliasing" otherwise)."""
    flags = {pos: _Wrt(f) for pos, f in wrt.items()}
    prefixes = prop.resolve_leaf_specs(plan, lambda pos: flags.get(pos, _NOT_WRT),
                                       lambda prefix, path, leaf: prefix,
                                       'differentiation flags')
    defs = _arg_defs(plan.key.graphdef)
    predicates = {pos: filterlib.to_predicate(f) for pos, f in wrt.items()}
    chosen = []
    for i, path in enumerate(plan.key.graphdef.leaf_paths):
      if prefixes[i] is None or prefixes[i].filter is None or path[0] != 0:
        chosen.append(False)
        continue
      inside, rel = _locate(defs[path[1]], path[2:])
      chosen.append(bool(choose(predicates[path[1]], inside, rel, plan.items[i])))
    return chosen

  def take(self, inputs: list) -> list:
    return [inputs[j] if k is None else inputs[j][k] for j, k in self.slots]

  def put(self, inputs: list, values: tp.Sequence) -> list:
    out = [list(x) if isinstance(x, list) else x for x in inputs]
    for (j, k), value in zip(self.slots, values):
      if k is None:
        out[j] = value
      else:
        out[j][k] = value
    return out

  def as_states(self, values: tp.Sequence) -> list:
    """One gradient per argnum, graph-updates style: a State per Pytree, a Variable per
    Variable held by a container, containers mirrored, arrays for plain arguments."""
    defs = _arg_defs(self.plan.key.graphdef)
    out = []
    for entry in self.per_arg:
      if entry[0] == 'plain':
        out.append(values[entry[1]])
      else:
        leaves = iter([_SKIP if s is None else values[s] for s in entry[2]])
        out.append(_gradient_tree(defs[entry[1]], leaves))
    return out

  def as_arguments(self, values: tp.Sequence) -> list:
    """One gradient per argnum, tree style: shaped like the argument (a Module's gradient is a
    Module of its class holding gradients), shared Variables staying shared."""
    plan = self.plan
    leaves: list = [None] * len(plan.items)
    groups = dict(zip(plan.graph_positions(), plan.groups))
    for entry in self.per_arg:
      if entry[0] == 'graph':
        a, _ = groups[entry[1]]
        for k, s in enumerate(entry[2]):
          if s is not None:
            leaves[a + k] = values[s]
    built = None
    out = []
    for entry in self.per_arg:
      if entry[0] == 'plain':
        out.append(values[entry[1]])
      else:
        if built is None:
          built = plan.key.graphdef.build(leaves)[0]
        out.append(built[entry[1]])
    return out


def _grad_leaf(d, g):
  return d.cls._from_parts(g, d.meta) if d.tag == VAR else g


_LEAF_TAGS = (VAR, LEAF, ARRAYREF)


def _gradient_tree(d, leaves: tp.Iterator):
  """Mirror an argument's def around gradient leaves: containers stay containers, each Pytree
  becomes a State of its differentiated leaves, a shared reference an empty State."""
  tag = d[0]
  if tag in _LEAF_TAGS:
    g = next(leaves)
    return None if g is _SKIP else _grad_leaf(d, g)
  if tag == NODE:
    items = []
    for path, leaf_def in _leaf_defs(d):
      g = next(leaves)
      if g is not _SKIP:
        items.append((path, _grad_leaf(leaf_def, g)))
    return from_flat_state(items)
  if tag == REF:
    return State()
  if tag == SEQ:
    return d.cls(_gradient_tree(c, leaves) for c in d.children)
  if tag == MAP:
    pairs = [(k, _gradient_tree(c, leaves)) for k, c in d.entries()]
    if issubclass(d.cls, State):
      pairs = [(k, v) for k, v in pairs if v is not None]
    return d.cls(pairs)
  if tag == JAXNODE:
    return d.treedef.unflatten([_gradient_tree(c, leaves) for c in d.children])
  return None  # static values hold no leaves


def _leaf_defs(d) -> tp.Iterator[tuple]:
  """``(path, def)`` of every leaf under ``d``, in leaf order."""
  return ((path, sub) for path, sub in iter_defs(d) if sub.tag in _LEAF_TAGS)


def _split_aux(out, has_aux: bool):
  if not has_aux:
    return out, None
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError('with has_aux=True the function must return a pair (output, aux), '
                    f'got {type(out).__name__}')
  return out[0], out[1]


class _Plans:
  """The last plan of a wrapped function, reused while its graph arguments are unchanged."""

  def __init__(self, graph: bool, context: str, static_argnums: tuple = ()):
    self.graph = graph
    self.context = context
    self.static_argnums = static_argnums
    self.plan: prop.Plan | None = None

  def get(self, args: tuple, kwargs: dict) -> prop.Plan:
    plan = self.plan
    if not prop.plan_still_valid(plan, args, kwargs):
      statics = frozenset(i if i >= 0 else len(args) + i for i in self.static_argnums)
      plan = prop.make_plan(args, kwargs, graph=self.graph, static_positions=statics,
                            context=self.context)
      self.plan = plan
    return plan


# -- grad / value_and_grad ----------------------------------------------------------------
class _Grad:
  """A function wrapped by ``grad`` or ``value_and_grad``."""

  def __init__(self, fun, *, argnums, has_aux, holomorphic, allow_int, graph, graph_updates,
               with_value):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.argnums = argnums
    self.specs, self.single = _argnum_specs(argnums)
    self.has_aux = has_aux
    self.holomorphic = holomorphic
    self.allow_int = allow_int
    self.graph = graph
    self.tracking = _tracking(graph, graph_updates)
    self.with_value = with_value
    self._name = 'value_and_grad' if with_value else 'grad'
    self._plans = _Plans(graph, f'tree-mode {self._name}')
    self._selection: _Selection | None = None

  def _select(self, plan: prop.Plan, wrt: dict) -> _Selection:
    sel = self._selection
    if sel is None or sel.plan is not plan or sel.wrt != wrt:
      sel = self._selection = _Selection(plan, wrt, _grad_rule(self.tracking))
    return sel

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    args, kwargs = _positional(self.fun, args, kwargs)
    wrt = _normalize_argnums(self.specs, len(args), self.argnums)
    plan = self._plans.get(args, kwargs)
    sel = self._select(plan, wrt)
    inputs = prop.split_inputs(plan, args, kwargs)
    key, graph, tracking, has_aux, name = plan.key, self.graph, self.tracking, self.has_aux, \
        self._name

    def pure(diff_values):
      inner = prop.Inner(key, sel.put(inputs, diff_values))
      value, aux = _split_aux(inner.call(self.fun), has_aux)
      return _unwrap(value), inner.result(aux, graph=graph, graph_updates=tracking, name=name)

    (value, result), grads = jax.value_and_grad(
        pure, has_aux=True, holomorphic=self.holomorphic, allow_int=self.allow_int)(
            sel.take(inputs))
    aux = prop.finish(plan, result)
    grads = sel.as_states(grads) if tracking else sel.as_arguments(grads)
    grads = grads[0] if self.single else tuple(grads)
    if self.with_value:
      return ((value, aux), grads) if has_aux else (value, grads)
    return (grads, aux) if has_aux else grads

  def __get__(self, obj, objtype=None):
    return self if obj is None else functools.partial(self, obj)


def _check_reduce_axes(reduce_axes):
  if reduce_axes:
    raise NotImplementedError('reduce_axes is not supported (JAX removed it); reduce explicitly '
                              'inside the function instead.')


def _make_grad(f, with_value: bool, name: str, argnums, has_aux, holomorphic, allow_int,
               reduce_axes, graph, graph_updates):
  _check_reduce_axes(reduce_axes)
  graph = _settings.graph_mode(graph)
  graph_updates = _settings.graph_updates(graph_updates)
  _check_prefix(argnums, 'argnums', name, graph, graph_updates)
  options = dict(argnums=argnums, has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int,
                 graph=graph, graph_updates=graph_updates, with_value=with_value)

  def wrap(fun):
    prop.refuse_bound_method(fun, name)
    return _Grad(fun, **options)
  return wrap if f is None else wrap(f)


def grad(f=None, *, argnums: int | DiffState | tp.Sequence[int | DiffState] = 0,
         has_aux: bool = False, holomorphic: bool = False, allow_int: bool = False,
         reduce_axes: tp.Sequence = (), graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.grad`` for functions of Modules, with state propagation (see the module docstring).

  In graph mode with graph updates (the default) a Module argument is
  differentiated with respect to its ``nnx.Param`` Variables and its gradient
  is a State of them; updates the function makes to the Module (counters,
  batch statistics, new attributes) reach the caller.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> loss = lambda model, x: model(x).sum()
      >>> grads = nnx.grad(loss)(model, jnp.ones((3, 2)))
      >>> list(grads), grads['kernel'][...].tolist()
      (['bias', 'kernel'], [[3.0], [3.0]])

  Args:
    f: the function; its result (or the first of the pair, with ``has_aux``) a scalar.
    argnums: the positional argument(s) to differentiate: ints, or ``nnx.DiffState(argnum,
      filter)`` to pick a Module's Variables (graph mode with graph updates only).
    has_aux: ``f`` returns ``(value, aux)``; ``aux`` is returned with the gradients.
    holomorphic, allow_int: as ``jax.grad``.
    reduce_axes: must be empty (JAX removed it).
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A function returning the gradient of argument ``argnums`` (a tuple of them for a
    sequence), and ``(grads, aux)`` with ``has_aux``. A Module's gradient is a State of its
    differentiated Variables in graph mode with graph updates, else a Module of its class.
    Without ``f``, a decorator.
  """
  return _make_grad(f, False, 'grad', argnums, has_aux, holomorphic, allow_int, reduce_axes,
                    graph, graph_updates)


def value_and_grad(f=None, *, argnums: int | DiffState | tp.Sequence[int | DiffState] = 0,
                   has_aux: bool = False, holomorphic: bool = False, allow_int: bool = False,
                   reduce_axes: tp.Sequence = (), graph: bool | None = None,
                   graph_updates: bool | None = None):
  """Like ``grad`` but the function also returns the value: ``(value, grads)``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> loss, g = nnx.value_and_grad(lambda x: jnp.sum(x ** 2))(jnp.array([1.0, 2.0]))
      >>> float(loss), g.tolist()
      (5.0, [2.0, 4.0])

  Args:
    f: the function; its result (or the first of the pair, with ``has_aux``) a scalar.
    argnums: ints or ``nnx.DiffState``, as for ``grad``.
    has_aux: ``f`` returns ``(value, aux)``.
    holomorphic, allow_int: as ``jax.grad``.
    reduce_axes: must be empty (JAX removed it).
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A function returning ``(value, grads)``, or ``((value, aux), grads)`` with
    ``has_aux``; without ``f``, a decorator.
  """
  return _make_grad(f, True, 'value_and_grad', argnums, has_aux, holomorphic, allow_int,
                    reduce_axes, graph, graph_updates)


# -- vjp / jvp --------------------------------------------------------------------------
def _traced(fun, primals, graph: bool, tracking: bool, choose, name: str):
  """The plan, selection, inputs and the pure function of the differentiated primals.

  The pure function returns ``(output leaves, Output)`` where the ``Output`` carries the
  updates, the output's treedef and the aux.
  """
  plan = prop.make_plan(primals, {}, graph=graph, context=f'tree-mode {name}')
  sel = _Selection(plan, {i: ... for i in range(len(primals))}, choose)
  inputs = prop.split_inputs(plan, primals, {})

  def pure(has_aux, diff_values):
    inner = prop.Inner(plan.key, sel.put(inputs, diff_values))
    out, aux = _split_aux(inner.call(fun), has_aux)
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    result = inner.result(aux, graph=graph, graph_updates=tracking, name=name)
    return out_leaves, (out_tree, result)

  return plan, sel, inputs, pure


def vjp(f=None, *primals, has_aux: bool = False, reduce_axes: tp.Sequence = (),
        graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.vjp`` with state propagation: ``out, vjp_fn = nnx.vjp(f, model, x)``.

  ``vjp_fn(cotangent)`` returns one cotangent per primal: in graph mode with
  graph updates a State of a Module's floating-point Variables (NNX refuses vjp
  there); in tree mode or with ``graph_updates=False``, as NNX, shaped like the
  primal (a Module for a Module).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> model.kernel[...] = jnp.full((1, 1), 3.0)
      >>> out, vjp_fn = nnx.vjp(lambda m, x: m(x), model, jnp.ones((1, 1)))
      >>> model_ct, x_ct = vjp_fn(jnp.ones((1, 1)))
      >>> model_ct['kernel'][...].tolist(), x_ct.tolist()
      ([[1.0]], [[3.0]])

  Args:
    f: the function.
    *primals: its positional arguments. Without them (or without ``f``) the
      call returns a partial to call with the rest.
    has_aux: ``f`` returns ``(out, aux)``.
    reduce_axes: must be empty (JAX removed it).
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    ``(out, vjp_fn)``, or ``(out, vjp_fn, aux)`` with ``has_aux``.
  """
  _check_reduce_axes(reduce_axes)
  if f is None or not primals:  # `nnx.vjp(f)(*primals)` and `nnx.vjp(has_aux=True)(f, *primals)`
    head = () if f is None else (f,)
    if f is not None:
      prop.refuse_bound_method(f, 'vjp')
    return functools.partial(vjp, *head, has_aux=has_aux, graph=graph,
                             graph_updates=graph_updates)
  prop.refuse_bound_method(f, 'vjp')
  graph = _settings.graph_mode(graph)
  tracking = _tracking(graph, _settings.graph_updates(graph_updates))
  choose = _inexact_rule if tracking else (lambda pred, inside, rel, leaf: True)
  plan, sel, inputs, pure = _traced(f, primals, graph, tracking, choose, 'vjp')
  out_leaves, jax_vjp_fn, (out_tree, result) = jax.vjp(
      functools.partial(pure, has_aux), sel.take(inputs), has_aux=True)
  aux = prop.finish(plan, result)

  def vjp_fn(cotangent):
    (cts,) = jax_vjp_fn(jax.tree_util.tree_leaves(cotangent))
    return tuple(sel.as_states(cts) if tracking else sel.as_arguments(cts))

  out = jax.tree_util.tree_unflatten(out_tree, out_leaves)
  return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def _tangent_values(sel: _Selection, tangents: tuple) -> list:
  """The tangent of each differentiated leaf; Module/State tangents are matched by path."""
  plan = sel.plan
  groups = dict(zip(plan.graph_positions(), plan.groups))
  by_arg: dict = {}
  out = []
  for j, k in sel.slots:
    if k is None:
      out.append(tangents[j])
      continue
    if j not in by_arg:
      by_arg[j] = _paths_to_values(tangents[j])
    a, _ = groups[j]
    path = plan.key.graphdef.leaf_paths[a + k][2:]
    primal = _unwrap(plan.items[a + k])
    t = by_arg[j].get(path)
    out.append(jnp.zeros_like(primal) if t is None else t)
  return out


def _paths_to_values(tree) -> dict:
  if tree is None:
    return {}
  fl = flatten(tree, graph=True)
  return {path: _unwrap(leaf) for path, leaf in zip(fl.paths, fl.leaves)}


def jvp(f=None, primals: tuple | None = None, tangents: tuple | None = None, *,
        has_aux: bool = False, graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.jvp`` with state propagation: ``out, t_out = nnx.jvp(f, (model, x), (t_model, t_x))``.

  The tangent of a Module or State primal is a Module or State whose Variables
  are matched by path; floating-point Variables it leaves out get zero
  tangent, integer ones are constants.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> model.kernel[...] = jnp.full((1, 1), 3.0)
      >>> x = jnp.full((1, 1), 2.0)
      >>> t_model = nnx.State({'kernel': jnp.ones((1, 1))})       # d kernel = 1
      >>> out, t_out = nnx.jvp(lambda m, x: m(x), (model, x), (t_model, jnp.zeros((1, 1))))
      >>> out.tolist(), t_out.tolist()
      ([[6.0]], [[2.0]])

  Args:
    f: the function.
    primals: a tuple of its positional arguments.
    tangents: one tangent per primal.
    has_aux: ``f`` returns ``(out, aux)``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    ``(out, out_tangent)``, or ``(out, out_tangent, aux)`` with ``has_aux``;
    without ``f`` or ``primals``, a partial to call with the rest.
  """
  if f is not None:
    prop.refuse_bound_method(f, 'jvp')
  if f is None or primals is None:  # `nnx.jvp(f)(primals, tangents)` and `nnx.jvp(has_aux=True)`
    head = () if f is None else (f,)
    return functools.partial(jvp, *head, has_aux=has_aux, graph=graph,
                             graph_updates=graph_updates)
  if tangents is None:
    raise TypeError('jvp: pass the tangents, one per primal')
  primals, tangents = tuple(primals), tuple(tangents)
  if len(primals) != len(tangents):
    raise TypeError(f'jvp: {len(primals)} primals but {len(tangents)} tangents; pass one tangent '
                    'per primal')
  graph = _settings.graph_mode(graph)
  tracking = _tracking(graph, _settings.graph_updates(graph_updates))
  plan, sel, inputs, pure = _traced(f, primals, graph, tracking, _inexact_rule, 'jvp')
  out_leaves, tangent_leaves, (out_tree, result) = jax.jvp(
      functools.partial(pure, has_aux), (sel.take(inputs),),
      (_tangent_values(sel, tangents),), has_aux=True)
  aux = prop.finish(plan, result)
  out = jax.tree_util.tree_unflatten(out_tree, out_leaves)
  tangent_out = jax.tree_util.tree_unflatten(out_tree, tangent_leaves)
  return (out, tangent_out, aux) if has_aux else (out, tangent_out)


# -- custom_vjp -------------------------------------------------------------------------
def _zero_cotangent(x):
  x = np.shape(x), jnp.result_type(x)
  if jnp.issubdtype(x[1], jnp.inexact):
    return jnp.zeros(x[0], x[1])
  return np.zeros(x[0], dtype=jax.dtypes.float0)


def _leaf_cotangent(ct, primal):
  if ct is None or not _inexact((), primal):
    return _zero_cotangent(primal)
  return ct


def _scalar_to_array(x):
  return jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x


def _is_array_tree(x) -> bool:
  leaves = jax.tree_util.tree_leaves(x)
  return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray, np.generic))
                              for leaf in leaves)


def _accepts(fun, name: str) -> bool:
  try:
    params = inspect.signature(fun).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _VjpCall:
  """The static side of one custom_vjp call (JAX passes it through as a nondiff argument)."""

  __slots__ = ('key', 'positions', 'diff', 'keep')

  def __init__(self, key, positions, diff, keep):
    self.key = key
    self.positions = positions  # positional arguments that get a cotangent, in order
    self.diff = diff            # per plan leaf: whether it accepts a cotangent
    self.keep = keep            # leaves that always come out (graph updates: every state leaf)


class CustomVjp:
  """A function with a custom backward pass: ``f.defvjp(fwd, bwd)``.

  ``fwd(*args)`` returns ``(out, residuals)`` (residuals may hold Modules). Then, as NNX:

  * graph mode with graph updates: ``bwd(*nondiff_args, residuals, (inputs_g, out_g))``,
    ``inputs_g`` holding, per differentiated argument, the cotangent of its state after the
    call (a State for a Module, None for an array). ``bwd`` returns one cotangent per
    differentiated argument: an array for an array, a State (any subset of the
    differentiated Variables; missing ones count as zero) for a Module.
  * tree mode or ``graph_updates=False``: ``bwd(*nondiff_args, residuals, out_g)``, plus
    ``updates_g=`` (the cotangents of the Variables ``f`` updated, None elsewhere, shaped
    like the arguments) if ``bwd`` takes it. Cotangents are shaped like the arguments (a
    Module for a Module, e.g. an ``nnx.clone`` holding the gradients).
  """

  def __init__(self, fun, *, nondiff_argnums: tuple, graph: bool, graph_updates: bool):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = graph
    self.tracking = _tracking(graph, graph_updates)
    self.nondiff = tuple(sorted(i for i in nondiff_argnums if isinstance(i, int)))
    self.diff_filters: dict = {}
    seen = set()
    for entry in nondiff_argnums:
      index = entry.argnum if isinstance(entry, DiffState) else entry
      if index in seen:
        raise ValueError(f'argnum {index} is repeated in nondiff_argnums')
      seen.add(index)
      if isinstance(entry, DiffState):
        self.diff_filters[index] = entry.filter
    self.fwd = None
    self.bwd = None
    self._signature = inspect.signature(fun)
    self._last: tuple | None = None  # (plan, _VjpCall)
    self._jax_fn = jax.custom_vjp(self._primal, nondiff_argnums=(0,))
    self._jax_fn.defvjp(self._fwd, self._bwd)

  def defvjp(self, fwd: tp.Callable, bwd: tp.Callable, symbolic_zeros: bool = False):
    """Set the forward and backward rules (before the function is differentiated).

    Args:
      fwd: ``fwd(*args) -> (out, residuals)``.
      bwd: the backward rule; its arguments and result depend on the mode (see the class).
      symbolic_zeros: not supported (NotImplementedError).
    """
    if symbolic_zeros:
      raise NotImplementedError('symbolic_zeros=True is not supported by nnx.custom_vjp')
    self.fwd, self.bwd = fwd, bwd

  # -- inside JAX's custom_vjp --
  def _result(self, inner: prop.Inner, out, call: _VjpCall) -> prop.Output:
    return inner.result(out, graph=self.graph, graph_updates=self.tracking, keep=call.keep,
                        name='custom_vjp')

  def _primal(self, call: _VjpCall, *inputs):
    inner = prop.Inner(call.key, inputs)
    return self._result(inner, inner.call(self.fun), call)

  def _fwd(self, call: _VjpCall, *inputs):
    if self.fwd is None:
      raise TypeError(f'{self.fun.__name__}: call defvjp(fwd, bwd) before differentiating it')
    inner = prop.Inner(call.key, inputs)
    pair = inner.call(self.fwd)
    if not (isinstance(pair, tuple) and len(pair) == 2):
      raise TypeError('custom_vjp fwd must return a pair (output, residuals), got '
                      f'{type(pair).__name__}')
    out, residuals = pair
    result = self._result(inner, out, call)
    res_def, res_leaves = prop.flatten_output(residuals, graph=self.graph)
    return result, (prop.Output((), res_def, [], res_leaves), list(inputs))

  def _bwd(self, call: _VjpCall, saved, g: prop.Output):
    res_out, inputs = saved
    residuals = prop.build_output(res_out.out_def, res_out.out_leaves)
    args = prop.Inner(call.key, inputs).args  # fresh objects: bwd may not change the primals
    nondiff = [args[i] for i in self.nondiff]
    bwd = self.bwd
    assert bwd is not None  # _fwd, which runs first, refused a missing defvjp
    if self.tracking:
      cts = bwd(*nondiff, residuals, self._graph_cotangents(call, g))
    else:
      extra = {'updates_g': self._updates_g(call, g)} if _accepts(bwd, 'updates_g') else {}
      cts = bwd(*nondiff, residuals, prop.build_output(g.out_def, g.out_leaves), **extra)
    if not isinstance(cts, (tuple, list)) or len(cts) != len(call.positions):
      is_seq = isinstance(cts, (tuple, list))
      got = f'a tuple of length {len(cts)}' if is_seq else type(cts).__name__
      raise TypeError(f'custom_vjp bwd must return a tuple with one cotangent per '
                      f'differentiated argument (positions {list(call.positions)}), got {got}')
    return tuple(self._input_cotangents(call, inputs, dict(zip(call.positions, cts))))

  def _graph_cotangents(self, call: _VjpCall, g: prop.Output) -> tuple:
    """``(inputs_g, out_g)`` in graph-updates mode: States mirroring the arguments' state after
    the call, and the output's cotangent."""
    if g.changed is prop.RESTRUCTURED:
      root = g.out_def[1].root                 # ((positional, keywords), output)
      args_def, out_def = root.children
      leaves = iter(g.out_leaves)
      positional, keywords = args_def.children
      per_arg = [_gradient_tree(d, leaves) for d in positional.children]
      _gradient_tree(keywords, leaves)         # keyword arguments: not passed to bwd
      out_g = _gradient_tree(out_def, leaves)
    else:
      by_index = dict(zip(g.changed, g.values))
      leaves = iter([by_index.get(i) for i in range(len(call.key.graphdef.leaf_paths))])
      per_arg = [_gradient_tree(d, leaves) for d in _arg_defs(call.key.graphdef)]
      out_g = _output_tree(g.out_def, g.out_leaves)
    kinds = call.key.kinds
    inputs_g = tuple(per_arg[p] if kinds[p] == prop.GRAPH else None for p in call.positions)
    return inputs_g, out_g

  def _updates_g(self, call: _VjpCall, g: prop.Output) -> tuple:
    """Tree mode's ``updates_g``: the arguments' shape, the updated Variables holding their
    cotangents, None everywhere else."""
    graphdef = call.key.graphdef
    layout = leaf_defs(graphdef)
    leaves: list = [None] * len(layout)
    for i, ct in zip(g.changed, g.values):
      leaves[i] = _grad_leaf(layout[i].d, ct)
    args, _ = graphdef.build(leaves, recreate_variables=False)
    kinds = call.key.kinds
    return tuple(args[p] if kinds[p] == prop.GRAPH else None for p in range(len(args)))

  def _input_cotangents(self, call: _VjpCall, inputs, cts: dict) -> tp.Iterator:
    key = call.key
    dyn = [pos for pos, kind in zip(_key_positions(key), key.kinds) if kind != prop.STATIC_ARG]
    groups = iter(_group_bounds(key))
    for pos, value in zip(dyn, inputs):
      if key.kinds[pos] != prop.GRAPH:
        ct = cts.get(pos)
        yield jax.tree.map(_zero_cotangent, value) if ct is None else ct
        continue
      a, b = next(groups)
      by_path = _paths_to_values(cts.get(pos))
      paths = key.graphdef.leaf_paths[a:b]
      yield [_leaf_cotangent(by_path.get(path[2:]), leaf) if call.diff[a + k]
             else _zero_cotangent(leaf) for k, (path, leaf) in enumerate(zip(paths, value))]

  # -- the call --
  def _call_info(self, plan: prop.Plan, args: tuple) -> _VjpCall:
    last = self._last
    if last is not None and last[0] is plan:
      return last[1]
    n = len(args)
    nondiff = set(self.nondiff)
    positions = tuple(p for p in range(n) if p not in nondiff)
    if self.tracking:
      for p in self.nondiff:
        if p < n and plan.kinds[p] == prop.GRAPH:
          raise TypeError(
              f'nnx.custom_vjp: nondiff_argnums holds {p}, but argument {p} is a graph node '
              f'({type(args[p]).__name__}): an int in nondiff_argnums cannot mark a graph node '
              f'with graph updates. Use nnx.DiffState({p}, filter) to choose its differentiated '
              'state, or pass graph_updates=False.')
    wrt = {p: self.diff_filters.get(p, ...) for p in positions if plan.kinds[p] == prop.GRAPH}
    rule = _grad_rule(True) if self.tracking else (lambda pred, inside, rel, leaf: True)
    diff = _Selection(plan, wrt, rule).chosen if wrt else [False] * len(plan.items)
    keep = frozenset()
    if self.tracking:  # every leaf of the differentiated arguments comes out (NNX's args_out)
      groups = dict(zip(plan.graph_positions(), plan.groups))
      keep = frozenset(i for p in wrt for i in range(*groups[p]))
    call = _VjpCall(plan.key, positions, tuple(diff), keep)
    self._last = (plan, call)
    return call

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    if kwargs:
      bound = self._signature.bind(*args, **kwargs)
      if bound.kwargs:
        raise TypeError(f'custom_vjp: keyword-only arguments {list(bound.kwargs)} are not '
                        'supported; pass them positionally')
      args = bound.args
    statics = frozenset(i for i in self.nondiff
                        if i < len(args) and not prop.holds_graph(args[i])
                        and not _is_array_tree(args[i]))
    last = self._last
    if last is not None and prop.plan_still_valid(last[0], args, {}):
      plan, call = last
    else:
      plan = prop.make_plan(args, {}, graph=self.graph, static_positions=statics,
                            context='tree-mode custom_vjp')
      if self.graph and not self.tracking:
        prop.refuse_shared_variables(plan, 'custom_vjp')
      call = self._call_info(plan, args)
    # Python scalars become arrays: the eager fwd sees raw inputs, and a scalar result
    # computed from them would otherwise be taken for a constant of the output.
    inputs = [x if kind == prop.GRAPH else jax.tree.map(_scalar_to_array, x)
              for x, kind in zip(prop.split_inputs(plan, args, {}),
                                 [k for k in plan.kinds if k != prop.STATIC_ARG])]
    result = self._jax_fn(call, *inputs)
    return prop.finish(plan, result)


def _key_positions(key: prop.CallKey) -> list:
  """The argument positions of a CallKey, in its order (positional, then sorted keywords)."""
  n_pos = len(key.kinds) - len(key.kw_names)
  return list(range(n_pos)) + list(key.kw_names)


def _group_bounds(key: prop.CallKey) -> list[tuple[int, int]]:
  bounds, start = [], 0
  for size in key.group_sizes:
    bounds.append((start, start + size))
    start += size
  return bounds


def _output_tree(out_def, out_leaves):
  """The graph-updates cotangent of a custom_vjp output: arrays as arrays, Pytrees as States."""
  if isinstance(out_def, tuple) and out_def and out_def[0] == prop.WITH_INPUTS:
    out_def = out_def[1]
  root = getattr(out_def, 'root', out_def)
  return _gradient_tree(root, iter(out_leaves))


def custom_vjp(fun=None, *, nondiff_argnums: tuple = (), graph: bool | None = None,
               graph_updates: bool | None = None):
  """``jax.custom_vjp`` with state propagation; define the rules with ``f.defvjp(fwd, bwd)``.

  ``nondiff_argnums`` holds ints (arguments that get no cotangent and are passed
  to ``bwd`` first, like ``jax.custom_vjp``) and, in graph mode with graph
  updates, ``nnx.DiffState(argnum, filter)`` to differentiate a Module argument
  only with respect to part of its state. See ``CustomVjp`` for what ``bwd``
  receives and returns in each mode.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Scale(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.array(3.0))
      >>> @nnx.custom_vjp
      ... def scale(m, x):
      ...   return m.w[...] * x
      >>> def fwd(m, x):
      ...   return scale(m, x), (m.w[...], x)
      >>> def bwd(residuals, g):
      ...   (m_g, x_g), out_g = g        # graph updates: the inputs' and the output's cotangents
      ...   w, x = residuals
      ...   return nnx.State({'w': out_g * x}), out_g * w
      >>> scale.defvjp(fwd, bwd)
      >>> grads = nnx.grad(scale)(Scale(), jnp.array(2.0))
      >>> float(grads['w'][...])
      2.0

  Args:
    fun: the primal function; without it, a decorator.
    nondiff_argnums: ints and ``nnx.DiffState``, as above.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A ``CustomVjp``: call it like ``fun``, after ``defvjp``.
  """
  graph = _settings.graph_mode(graph)
  graph_updates = _settings.graph_updates(graph_updates)
  _check_prefix(nondiff_argnums, 'nondiff_argnums', 'custom_vjp', graph, graph_updates)

  def wrap(f):
    prop.refuse_bound_method(f, 'custom_vjp')
    return CustomVjp(f, nondiff_argnums=tuple(nondiff_argnums), graph=graph,
                     graph_updates=graph_updates)
  return wrap if fun is None else wrap(fun)


# -- remat ------------------------------------------------------------------------------
class _Remat:
  """A function whose activations are recomputed on the backward pass (``jax.checkpoint``)."""

  def __init__(self, fun, *, prevent_cse: bool, static_argnums, policy, graph: bool,
               graph_updates: bool):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = graph
    self.graph_updates = graph_updates
    statics = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    self._plans = _Plans(graph, 'tree-mode remat', statics)
    # One checkpointed function for the wrapper's life: JAX caches its trace per call key.
    self._checkpointed = jax.checkpoint(self._inner, prevent_cse=prevent_cse, policy=policy,
                                        static_argnums=(0,))

  def _inner(self, key, *inputs):
    return prop.run(self.fun, key, inputs, graph=self.graph, graph_updates=self.graph_updates,
                    name='remat')

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    plan = self._plans.get(args, kwargs)
    result = self._checkpointed(plan.key, *prop.split_inputs(plan, args, kwargs))
    return prop.finish(plan, result)

  def __get__(self, obj, objtype=None):
    return self if obj is None else functools.partial(self, obj)


def remat(f=None, *, prevent_cse: bool = True, static_argnums: int | tuple[int, ...] = (),
          policy: tp.Callable[..., bool] | None = None, graph: bool | None = None,
          graph_updates: bool | None = None):
  """``jax.checkpoint`` with state propagation: activations are recomputed for the gradient.

  Saves memory in the backward pass at the cost of a second forward pass;
  values are unchanged.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> block = nnx.remat(lambda m, x: jnp.tanh(m(x)))
      >>> grads = nnx.grad(lambda m, x: block(m, x).sum())(model, jnp.ones((1, 2)))
      >>> grads['kernel'].shape
      (2, 2)

  Args:
    f: the function (or method: ``@nnx.remat`` on ``__call__``); without it, a decorator.
    prevent_cse, static_argnums, policy: as ``jax.checkpoint``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``; with
      graph updates, structural changes made inside reach the caller's objects.

  Returns:
    The wrapped function; repeated calls with the same structure reuse JAX's trace.
  """
  options: dict[str, tp.Any] = dict(
      prevent_cse=prevent_cse, static_argnums=static_argnums, policy=policy,
      graph=_settings.graph_mode(graph), graph_updates=_settings.graph_updates(graph_updates))

  def wrap(fun):
    prop.refuse_bound_method(fun, 'remat')
    return _Remat(fun, **options)
  return wrap if f is None else wrap(f)
