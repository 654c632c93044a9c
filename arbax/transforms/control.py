"""Control flow and tracing utilities with state propagation: ``cond``, ``switch``,
``eval_shape``, ``checkify``, ``make_jaxpr`` and ``cached_partial``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Count(nnx.Variable): pass
    >>> class Gate(nnx.Module):
    ...   def __init__(self):
    ...     self.opened = Count(jnp.array(0))
    >>> def open_(g, x):
    ...   g.opened[...] += 1
    ...   return x
    >>> g = Gate()
    >>> y = nnx.cond(jnp.array(True), open_, lambda g, x: -x, g, jnp.ones(2))
    >>> int(g.opened[...])        # the update made in the branch reached `g`
    1
    >>> abstract = nnx.eval_shape(lambda: nnx.Param(jnp.zeros((2, 3))))
    >>> abstract.get_value().shape   # a ShapeDtypeStruct: nothing was computed
    (2, 3)

Branches must return outputs of the same structure; every Variable of the operands comes
back from both branches, so either may update any of them. With graph updates (the
default) both branches may also change the operands' structure, the same way.

Like JAX's own transforms, these reuse their traces: calling ``nnx.cond`` with the same
branch functions on operands of the same structure traces each branch once, and
``nnx.eval_shape`` of the same function traces it once per argument structure.
"""
from __future__ import annotations

import functools
import typing as tp
import weakref

import jax
import jax.numpy as jnp
from jax.experimental import checkify as checkify_lib

from arbax import _settings, abstract_init, caches
from arbax.api import merge, split
from arbax.graph import leaf_defs
from arbax.pytree import Pytree
from arbax.transforms import _propagate as prop
from arbax.variables import Variable

__all__ = ['cond', 'switch', 'eval_shape', 'checkify', 'make_jaxpr', 'cached_partial']


# -- per-function caches ------------------------------------------------------------------
# JAX caches the trace of a branch (lax.cond), a checkpointed or a jitted function by the
# function object. The functions handed to JAX are therefore made once per user function
# (and call structure) and kept while the user's function lives; they refer to it weakly.
_WRAPPERS: 'weakref.WeakKeyDictionary[tp.Callable, dict]' = caches.register(
    weakref.WeakKeyDictionary())


def _cached_wrapper(fun: tp.Callable, key: tp.Hashable, make: tp.Callable[[tp.Callable], tp.Any]):
  """``make(fun_ref)`` for ``fun`` and ``key``, made once while ``fun`` lives (every time for
  a function that cannot be weakly referenced)."""
  try:
    table = _WRAPPERS.get(fun)
    if table is None:
      table = _WRAPPERS[fun] = {}
  except TypeError:
    return make(lambda: fun)
  wrapper = table.get(key)
  if wrapper is None:
    wrapper = table[key] = make(weakref.ref(fun))
  return wrapper


def _named_like(wrapper, fun):
  """Copy the name (not ``__wrapped__``, which would keep ``fun`` alive) for JAX's messages."""
  for attr in ('__name__', '__qualname__', '__module__'):
    try:
      setattr(wrapper, attr, getattr(fun, attr))
    except (AttributeError, TypeError):
      pass
  return wrapper


class _LastPlan:
  """The last plan of one transform, reused while its graph arguments are unchanged."""

  def __init__(self, context: str):
    self.context = context
    self.plans: dict[bool, prop.Plan] = {}

  def get(self, args: tuple, kwargs: dict, graph: bool) -> prop.Plan:
    plan = self.plans.get(graph)
    if not prop.plan_still_valid(plan, args, kwargs):
      plan = prop.make_plan(args, kwargs, graph=graph, context=self.context)
      self.plans[graph] = plan
    return plan


# -- cond / switch --------------------------------------------------------------------------
def _variable_indices(key: prop.CallKey) -> frozenset:
  """Every Variable leaf: both branches of a cond must return the same updates."""
  found = key.graphdef.memo.get('variable_leaves')
  if found is None:
    found = key.graphdef.memo['variable_leaves'] = frozenset(
        i for i, info in enumerate(leaf_defs(key.graphdef)) if info.is_var)
  return found


def _scalars_to_arrays(out):
  # lax.cond returns arrays; a Python scalar left as is would be static and mismatch the
  # other branch's array output.
  return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x,
                      out, is_leaf=lambda x: isinstance(x, (Variable, Pytree)))


def _branch(fun: tp.Callable, key: prop.CallKey, graph: bool, graph_updates: bool, name: str):
  """The JAX branch for ``fun`` on operands of structure ``key`` (one per function and key)."""
  keep = _variable_indices(key)

  def make(fun_ref):
    def call_fun(*args, **kwargs):
      return _scalars_to_arrays(fun_ref()(*args, **kwargs))

    def branch(*inputs):
      return prop.run(call_fun, key, inputs, graph=graph, graph_updates=graph_updates,
                      keep=keep, name=name)
    return _named_like(branch, fun)
  return _cached_wrapper(fun, (key, graph, graph_updates, name), make)


_COND_PLANS = {'cond': _LastPlan('tree-mode cond'), 'switch': _LastPlan('tree-mode switch')}


def _branching(name: str, pick: tp.Callable, branches: tp.Sequence[tp.Callable], operands: tuple,
               graph: bool | None, graph_updates: bool | None):
  graph = _settings.graph_mode(graph)
  tracking = graph and _settings.graph_updates(graph_updates)
  plan = _COND_PLANS[name].get(operands, {}, graph)
  traced = [_branch(fun, plan.key, graph, tracking, name) for fun in branches]
  result = pick(traced, prop.split_inputs(plan, operands, {}))
  return prop.finish(plan, result)


@prop.api_boundary
def cond(pred, true_fun: tp.Callable, false_fun: tp.Callable, *operands,
         graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.lax.cond`` with state propagation: ``(true_fun if pred else false_fun)(*operands)``.

  Both branches are traced; the one ``pred`` picks runs, and the updates it
  makes to the operands' Variables reach the caller.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.n = nnx.BatchStat(jnp.array(0))
      >>> def count(c, x):
      ...   c.n[...] += 1
      ...   return x
      >>> c = Counter()
      >>> y = nnx.cond(jnp.array(True), count, lambda c, x: -x, c, jnp.ones(2))
      >>> y.tolist(), int(c.n[...])
      ([1.0, 1.0], 1)

  Args:
    pred: a boolean scalar (traced or not).
    true_fun, false_fun: functions of the operands returning outputs of the same structure.
    *operands: Modules, Variables, arrays.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``. With
      graph updates, structural changes made by the branch taken reach the operands (both
      branches must make the same ones); without, only Variable values do, and an output may
      not be one of the operands' Variables.

  Returns:
    The output of the branch taken.
  """
  return _branching('cond', lambda fs, inputs: jax.lax.cond(pred, fs[0], fs[1], *inputs),
                    (true_fun, false_fun), operands, graph, graph_updates)


@prop.api_boundary
def switch(index, branches: tp.Sequence[tp.Callable], *operands, graph: bool | None = None,
           graph_updates: bool | None = None):
  """``jax.lax.switch`` with state propagation: ``branches[index](*operands)``, index clamped.

  Same rules as ``cond`` for the branches, operands, ``graph`` and ``graph_updates``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.n = nnx.BatchStat(jnp.array(0))
      >>> def add(k):
      ...   def branch(c):
      ...     c.n[...] += k
      ...   return branch
      >>> c = Counter()
      >>> nnx.switch(1, [add(1), add(10), add(100)], c)
      >>> nnx.switch(7, [add(1), add(10), add(100)], c)     # clamped to the last branch
      >>> int(c.n[...])
      110

  Args:
    index: an integer scalar (traced or not); out-of-range values are clamped.
    branches: functions of the operands returning outputs of the same structure.
    *operands: Modules, Variables, arrays.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    The output of the branch taken.
  """
  return _branching('switch', lambda fs, inputs: jax.lax.switch(index, fs, *inputs),
                    tuple(branches), operands, graph, graph_updates)


# -- eval_shape -----------------------------------------------------------------------------
def _abstract_evaluator(f: tp.Callable, graph: bool, tracking: bool):
  """A ``jax.jit`` of ``f`` on rebuilt arguments, made once per function: its ``eval_shape``
  reuses JAX's trace for an argument structure seen before."""
  def make(fun_ref):
    def evaluate(key, *inputs):
      # Outputs are new abstract objects: nothing of the call reaches the arguments. Without
      # graph updates NNX refuses outputs that are input Variables (map_inputs checks them).
      # Only shapes come out, so keys and initial values are traced once per kind.
      with abstract_init.abstract_init():
        result = prop.run(fun_ref(), key, inputs, graph=graph, graph_updates=False,
                          map_inputs=not tracking, name='eval_shape')
      return _Shapes.of(result)
    return jax.jit(_named_like(evaluate, f), static_argnums=0)
  return _cached_wrapper(f, ('eval_shape', graph, tracking), make)


class _Shapes:
  """eval_shape's output leaves, each distinct traced value once.

  Under ``abstract_init`` the layers of a model share their traced initial values (one
  per kind), so 5,000 Variables may hold a handful of distinct tracers: JAX then makes
  a handful of ShapeDtypeStructs and result paths instead of 5,000.
  """

  __slots__ = ('out_def', 'distinct', 'where')

  def __init__(self, out_def, distinct: list, where: tuple):
    self.out_def, self.distinct, self.where = out_def, distinct, where

  @classmethod
  def of(cls, result: prop.Output) -> '_Shapes':
    first: dict = {}
    distinct: list = []
    where = []
    for leaf in result.out_leaves:
      i = first.setdefault(id(leaf), len(distinct))
      if i == len(distinct):
        distinct.append(leaf)
      where.append(i)
    return cls(result.out_def, distinct, tuple(where))

  @property
  def out_leaves(self) -> list:
    distinct = self.distinct
    return [distinct[i] for i in self.where]


jax.tree_util.register_pytree_node(
    _Shapes, lambda s: (s.distinct, (s.out_def, s.where)),
    lambda aux, distinct: _Shapes(aux[0], list(distinct), aux[1]))


_EVAL_SHAPE_PLANS = _LastPlan('tree-mode eval_shape')


@prop.api_boundary
def eval_shape(f: tp.Callable, *args, graph: bool | None = None,
               graph_updates: bool | None = None, **kwargs):
  """The output of ``f(*args, **kwargs)`` without computing it: arrays become ShapeDtypeStructs.

  Modules in the output come back whole, their Variables holding
  ``jax.ShapeDtypeStruct``, so building an abstract model costs nothing. The
  arguments are left unchanged, whatever ``f`` does to them. Without graph
  updates (``graph_updates=False`` or tree mode), as NNX, a Variable may not be
  passed twice (or be shared inside an argument) nor returned.

      >>> import arbax as nnx
      >>> abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> abstract.kernel[...]
      ShapeDtypeStruct(shape=(2, 3), dtype=float32)

  Args:
    f: the function (not a bound method of a Module: pass the Module as an argument).
    *args, **kwargs: its arguments; arrays may be ``jax.ShapeDtypeStruct``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    ``f``'s output with every array replaced by a ``jax.ShapeDtypeStruct``.
  """
  prop.refuse_bound_method(f, 'eval_shape')
  graph = _settings.graph_mode(graph)
  tracking = graph and _settings.graph_updates(graph_updates)
  plan = _EVAL_SHAPE_PLANS.get(args, kwargs, graph)
  if graph and not tracking:
    prop.refuse_shared_variables(plan, 'eval_shape')
  evaluator = _abstract_evaluator(f, graph, tracking)
  result = evaluator.eval_shape(plan.key, *prop.split_inputs(plan, args, kwargs))
  return prop.build_output(result.out_def, result.out_leaves)


# -- checkify -------------------------------------------------------------------------------
def checkify(f: tp.Callable, errors: frozenset = checkify_lib.user_checks,
             graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.experimental.checkify.checkify`` with state propagation.

  The result returns ``(error, output)``; updates made by ``f`` (structural
  ones too, with graph updates) reach the caller's objects whether or not a
  check failed (call ``error.throw()`` to raise).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> from jax.experimental import checkify
      >>> model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> def forward(model, x):
      ...   checkify.check(jnp.all(x > 0), 'x must be positive')
      ...   return model(x)
      >>> error, y = nnx.checkify(forward)(model, -jnp.ones((1, 2)))
      >>> error.get()
      'x must be positive (`check` failed)'

  Args:
    f: the function (not a bound method of a Module).
    errors: the kinds of checks to enable, as ``checkify.checkify``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    The checked function, returning ``(error, output)``.
  """
  prop.refuse_bound_method(f, 'checkify')
  graph = _settings.graph_mode(graph)
  tracking = graph and _settings.graph_updates(graph_updates)
  plans = _LastPlan('tree-mode checkify')

  @functools.wraps(f)
  def checked(*args, **kwargs):
    plan = plans.get(args, kwargs, graph)
    key = plan.key
    fun = checkify_lib.checkify(
        lambda *inputs: prop.run(f, key, inputs, graph=graph, graph_updates=tracking,
                                 name='checkify'),
        errors=errors)
    error, result = fun(*prop.split_inputs(plan, args, kwargs))
    return error, prop.finish(plan, result)

  return checked


# -- make_jaxpr -----------------------------------------------------------------------------
def make_jaxpr(f: tp.Callable | None = None, *, graph: bool | None = None,
               graph_updates: bool | None = None, static_argnums: int | tp.Sequence[int] = ()):
  """``jax.make_jaxpr`` for functions of Modules: the ClosedJaxpr of ``f`` on these arguments.

  Its inputs are the leaves of the arguments in order, its outputs the leaves
  of ``f``'s result; updates made by ``f`` are traced but not applied. As NNX,
  graph updates are not supported (pass ``graph_updates=False``), and a
  Variable may be neither passed twice nor returned.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> jaxpr = nnx.make_jaxpr(lambda m, x: m(x), graph_updates=False)(model, jnp.ones((1, 2)))
      >>> len(jaxpr.jaxpr.invars), len(jaxpr.jaxpr.outvars)     # bias, kernel, x -> y
      (3, 1)

  Args:
    f: the function; without it, a decorator.
    graph: graph mode; None uses ``nnx.set_graph_mode``.
    graph_updates: must be False (a ValueError otherwise).
    static_argnums: arguments that are static (not traced).

  Returns:
    A function of ``f``'s arguments returning the ClosedJaxpr.
  """
  if f is None:
    return lambda fun: make_jaxpr(fun, graph=graph, graph_updates=graph_updates,
                                  static_argnums=static_argnums)
  if _settings.graph_updates(graph_updates):
    raise ValueError('nnx.make_jaxpr does not support graph_updates=True. Pass '
                     'graph_updates=False (Variable values are traced, not written back).')
  prop.refuse_bound_method(f, 'make_jaxpr')
  graph = _settings.graph_mode(graph)
  statics = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

  @functools.wraps(f)
  def trace(*args, **kwargs):
    positions = frozenset(i if i >= 0 else len(args) + i for i in statics)
    plan = prop.make_plan(args, kwargs, graph=graph, static_positions=positions,
                          context='tree-mode make_jaxpr')
    if graph:
      prop.refuse_shared_variables(plan, 'make_jaxpr')
    key = plan.key
    outputs = lambda *inputs: prop.run(f, key, inputs, graph=graph,  # noqa: E731
                                       name='make_jaxpr').out_leaves
    return jax.make_jaxpr(outputs)(*prop.split_inputs(plan, args, kwargs))

  return trace


class cached_partial:
  """``f`` with its first arguments fixed: ``step = nnx.cached_partial(train_step, model, opt)``.

  The fixed objects are split once and merged into new objects that share their
  Variables (as NNX does): updates to Variable values reach the originals, each
  call passes the same cached objects (so a transform's plan is reused without
  any walk), and later structural changes to the originals are not seen — make
  a new cached_partial after changing them.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.n = nnx.BatchStat(jnp.array(0))
      >>> @nnx.jit
      ... def step(c, k):
      ...   c.n[...] += k
      >>> c = Counter()
      >>> cached_step = nnx.cached_partial(step, c)
      >>> cached_step(2); cached_step(3)
      >>> int(c.n[...])
      5

  As in NNX it is a graph-mode API: with ``graph=False`` or
  ``graph_updates=False`` it raises a ValueError (``nnx.jit_partial`` is the
  tree-mode counterpart).

  Args:
    f: the function (usually an ``nnx.jit`` one).
    *cached_args: its first positional arguments.
    graph / graph_updates: must be True (the defaults).
  """

  def __init__(self, f: tp.Callable, *cached_args, graph: bool | None = None,
               graph_updates: bool | None = None):
    if not (_settings.graph_mode(graph) and _settings.graph_updates(graph_updates)):
      raise ValueError('cached_partial is a graph-mode-only API and requires graph_updates=True '
                       '(got graph=False or graph_updates=False). Use nnx.jit_partial(f, '
                       '*args) for tree mode, or pass graph=True, graph_updates=True.')
    functools.update_wrapper(self, f)
    self.f = f
    self.cached_args = merge(*split(cached_args, graph=True)) if cached_args else ()

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    return self.f(*self.cached_args, *args, **kwargs)
