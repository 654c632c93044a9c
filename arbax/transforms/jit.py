"""``nnx.jit``: ``jax.jit`` with automatic state propagation.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Counter(nnx.Module):
    ...   def __init__(self):
    ...     self.n = nnx.BatchStat(jnp.array(0))
    >>> @nnx.jit
    ... def bump(c, k):
    ...   c.n[...] += k
    >>> c = Counter(); bump(c, 2); bump(c, 3)
    >>> int(c.n[...])
    5

The per-call path (a cached Plan, one list comprehension to gather leaves,
``jax.jit``'s C++ dispatch, assignments for the Variables that changed) is the
whole Python cost; see ``_propagate`` for the mechanism.
"""
from __future__ import annotations

import functools
import inspect
import typing as tp

import jax
from jax.sharding import PartitionSpec

from arbax import _settings
from arbax.graph import flatten
from arbax.pytree import Pytree
from arbax.sharding import StateSharding, constrain, leaf_shardings
from arbax.transforms import _propagate as prop
from arbax.transforms.inflight import UNDECIDED
from arbax.variables import Variable


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  if isinstance(x, (int, str)):
    return (x,)
  return tuple(x)


class JitWrapped:
  """A function compiled with ``nnx.jit``; call it like the original."""

  def __init__(self, fun: tp.Callable, *, in_shardings=None, out_shardings=None,
               static_argnums=None, static_argnames=None, donate_argnums=None,
               donate_argnames=None, keep_unused: bool = False, device=None, backend=None,
               inline: bool = False, graph: bool | None = None, graph_updates: bool | None = None):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = _settings.graph_mode(graph)
    self.graph_updates = _settings.graph_updates(graph_updates)
    self._static_argnums = frozenset(_as_tuple(static_argnums))
    self._static_argnames = frozenset(_as_tuple(static_argnames))
    self._donate_argnums = frozenset(_as_tuple(donate_argnums))
    self._donate_argnames = frozenset(_as_tuple(donate_argnames))
    _check_sharding_prefix(in_shardings, 'in_shardings', self.graph)
    _check_sharding_prefix(out_shardings, 'out_shardings', self.graph)
    self._in_shardings = in_shardings
    self._out_shardings = out_shardings
    self._jit_kwargs: dict[str, tp.Any] = dict(keep_unused=keep_unused, device=device,
                                               backend=backend, inline=inline)
    self._jitted: dict = {}   # (donated input positions, shardings) -> jax.jit object
    self._plan: prop.Plan | None = None
    self._last_jitted: tp.Any = None  # the jax.jit object for self._plan
    self._inflight = UNDECIDED  # bounds calls queued ahead on several CPU devices (inflight.py)
    try:
      self._signature = inspect.signature(fun)
    except (TypeError, ValueError):
      self._signature = None

  # -- the traced function --
  def _inner(self, key: prop.CallKey, *inputs):
    return prop.run(self.fun, key, inputs, graph=self.graph, graph_updates=self.graph_updates,
                    keep=key.extra or (), name='jit')

  def _static_positions(self, args, kwargs) -> frozenset:
    positions = set()
    n = len(args)
    for i in self._static_argnums:
      positions.add(i if i >= 0 else n + i)
    for name in self._static_argnames:
      if name in kwargs:
        positions.add(name)
      elif self._signature is not None:
        params = list(self._signature.parameters)
        if name in params and params.index(name) < n:
          positions.add(params.index(name))
    if self._signature is not None and self._static_argnums:
      params = list(self._signature.parameters)
      for i in self._static_argnums:
        if i < len(params) and params[i] in kwargs:
          positions.add(params[i])
    return frozenset(positions)

  def _donated_inputs(self, plan: prop.Plan, args, kwargs) -> tuple[tuple, tuple]:
    """Input positions (after the key) that are donated, and the Variable leaves they hold."""
    if not (self._donate_argnums or self._donate_argnames):
      return (), ()
    donated = set()
    keep = []
    dyn = 0
    groups = iter(plan.groups)
    params = list(self._signature.parameters) if self._signature is not None else []
    for pos, kind in plan.arguments():
      if kind == prop.STATIC_ARG:
        continue
      is_donated = (pos in self._donate_argnums or pos in self._donate_argnames
                    or (isinstance(pos, int) and pos < len(params) and params[pos] in self._donate_argnames))
      if kind == prop.GRAPH:
        a, b = next(groups)
        if is_donated:
          keep.extend(range(a, b))
      if is_donated:
        donated.add(dyn + 1)
      dyn += 1
    return tuple(sorted(donated)), tuple(keep)

  def _get_jitted(self, donated: tuple):
    jitted = self._jitted.get(donated)
    if jitted is None:
      jitted = jax.jit(self._inner, static_argnums=(0,), donate_argnums=donated,
                       **self._jit_kwargs)
      self._jitted[donated] = jitted
    return jitted

  # -- shardings: mapped onto the leaf lists the inner function takes --
  def _has_shardings(self) -> bool:
    return self._in_shardings is not None or self._out_shardings is not None

  def _get_sharded_jitted(self, plan: prop.Plan, donated: tuple, args, kwargs):
    """A ``jax.jit`` for this plan: in_shardings per leaf; outputs and updates constrained inside.

    With graph updates, Variables given an input sharding always come back, so the caller's
    arrays take it (``nnx.jit(f, in_shardings=...)(model)`` reshards the model, as in NNX).
    """
    dyn_shardings, leaf_specs = _input_shardings(self._in_shardings, plan, args, kwargs,
                                                 self._static_positions(args, kwargs))
    resharded = {i for i, spec in enumerate(leaf_specs)
                 if spec is not None and isinstance(plan.items[i], Variable)
                 and self.graph and self.graph_updates}
    if resharded:
      key = plan.key
      plan.key = prop.CallKey(key.graphdef, key.kinds, key.kw_names, key.group_sizes,
                              key.statics, frozenset(resharded | set(key.extra or ())))
    cache_key = (donated, plan.key, tuple(leaf_specs))
    jitted = self._jitted.get(cache_key)
    if jitted is None:
      inner = functools.partial(_inner_sharded, self, tuple(leaf_specs))
      jitted = jax.jit(inner, static_argnums=(0,), donate_argnums=donated,
                       in_shardings=tuple(dyn_shardings), **self._jit_kwargs)
      self._jitted[cache_key] = jitted
    return jitted

  def _prepare(self, args, kwargs):
    plan = self._plan
    if not prop.plan_still_valid(plan, args, kwargs):
      statics = self._static_positions(args, kwargs)
      plan = prop.make_plan(args, kwargs, graph=self.graph, static_positions=statics,
                            context='tree-mode jit')
      donated, keep = self._donated_inputs(plan, args, kwargs)
      if keep:
        plan.key = prop.CallKey(plan.key.graphdef, plan.key.kinds, plan.key.kw_names,
                                plan.key.group_sizes, plan.key.statics, frozenset(keep))
      if self._has_shardings():
        self._last_jitted = self._get_sharded_jitted(plan, donated, args, kwargs)
      else:
        self._last_jitted = self._get_jitted(donated)
      self._plan = plan
    return plan, self._last_jitted

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    result = jitted(plan.key, *prop.split_inputs(plan, args, kwargs))
    if self._inflight is not None:
      self._inflight = self._inflight.after_call(result)
    return prop.finish(plan, result)

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  def lower(self, *args, **kwargs) -> 'Lowered':
    """``jax.jit(...).lower`` for these arguments; ``.compile()`` gives a function of the same
    arguments that propagates state like this one."""
    plan, jitted = self._prepare(args, kwargs)
    return Lowered(self, plan.key, jitted.lower(plan.key, *prop.split_inputs(plan, args, kwargs)))

  def trace(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    return jitted.trace(plan.key, *prop.split_inputs(plan, args, kwargs))

  def eval_shape(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    result = jitted.eval_shape(plan.key, *prop.split_inputs(plan, args, kwargs))
    if result.changed is prop.RESTRUCTURED:
      return prop.build_output(result.out_def[1], result.out_leaves)[1]
    return prop.build_output(result.out_def, result.out_leaves, plan.nodes)


class Lowered:
  """A lowered ``nnx.jit`` call: JAX's ``Lowered`` (``as_text``, ``cost_analysis``, ...) whose
  ``compile()`` keeps state propagation."""

  def __init__(self, wrapped: JitWrapped, key: prop.CallKey, lowered):
    self._wrapped, self._key, self._lowered = wrapped, key, lowered

  def compile(self, *args, **kwargs) -> 'Compiled':
    return Compiled(self._wrapped, self._key, self._lowered.compile(*args, **kwargs))

  def __getattr__(self, name):
    return getattr(self._lowered, name)


class Compiled:
  """A compiled ``nnx.jit`` call: takes the original arguments, propagates their state; other
  attributes are JAX's ``Compiled`` (``as_text``, ``cost_analysis``, ...)."""

  def __init__(self, wrapped: JitWrapped, key: prop.CallKey, compiled):
    self._wrapped, self._key, self._compiled = wrapped, key, compiled

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    plan, _ = self._wrapped._prepare(args, kwargs)
    if plan.key != self._key:
      raise TypeError('This compiled nnx.jit function was lowered for arguments of another '
                      f'structure: lowered for {self._key.graphdef}, called with '
                      f'{plan.key.graphdef}. Lower it again for these arguments.')
    return prop.finish(plan, self._compiled(*prop.split_inputs(plan, args, kwargs)))

  def __getattr__(self, name):
    return getattr(self._compiled, name)


def jit(fun: tp.Callable | None = None, *, in_shardings=None, out_shardings=None,
        static_argnums=None, static_argnames=None, donate_argnums=None, donate_argnames=None,
        keep_unused: bool = False, device=None, backend=None, inline: bool = False,
        graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.jit`` with state propagation: Variable updates inside reach the caller's objects.

  Use as ``@nnx.jit``, ``@nnx.jit(graph=False)`` or ``nnx.jit(f, static_argnums=...)``.

  Graph mode with graph updates (NNX's default): shared Variables and Modules stay shared,
  structural changes made inside (attributes added, replaced or deleted, ``nnx.List`` edits,
  new Variables) reach the caller's objects, and an output that is an input comes back as
  the caller's object. ``graph_updates=False`` carries Variable values only; tree mode
  (``graph=False``) also refuses shared Variables with a ValueError naming both paths.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.count = nnx.BatchStat(jnp.array(0))
      >>> @nnx.jit
      ... def step(counter, x):
      ...   counter.count[...] += 1
      ...   return x * 2
      >>> counter = Counter()
      >>> step(counter, jnp.ones(2)), int(counter.count[...])
      (Array([2., 2.], dtype=float32), 1)

  Args:
    fun: the function; its arguments may hold Modules, Variables, States and arrays.
    in_shardings / out_shardings: as ``jax.jit``; for an object, one sharding, an
      ``nnx.StateSharding`` or a tree shaped like ``nnx.state(argument)``.
    static_argnums, static_argnames, donate_argnums, donate_argnames, keep_unused, device,
      backend, inline: as ``jax.jit``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A ``JitWrapped`` callable (with ``lower``, ``trace``, ``eval_shape``).
  """
  options: dict[str, tp.Any] = dict(
      in_shardings=in_shardings, out_shardings=out_shardings,
      static_argnums=static_argnums, static_argnames=static_argnames,
      donate_argnums=donate_argnums, donate_argnames=donate_argnames,
      keep_unused=keep_unused, device=device, backend=backend, inline=inline,
      graph=graph, graph_updates=graph_updates)
  if fun is None:
    return lambda f: jit(f, **options)
  prop.refuse_bound_method(fun, 'jit')
  return JitWrapped(fun, **options)


def jit_partial(fun: tp.Callable, *partial_args, in_shardings=None, out_shardings=None,
                static_argnums=None, static_argnames=None, donate_argnums=None,
                donate_argnames=None, keep_unused: bool = False, device=None, backend=None,
                inline: bool = False, graph: bool | None = None,
                graph_updates: bool | None = None) -> 'JitPartial':
  """``nnx.jit(fun)`` with its first arguments bound: ``step = nnx.jit_partial(train_step,
  model, optimizer)`` then ``step(x, y)``.

  The bound objects are checked once here (tree mode refuses shared Variables with a
  ValueError naming both paths); each call reuses their cached flattening, so only their
  current values are gathered, and updates reach them as with ``nnx.jit``. ``in_shardings``,
  when a tuple, has an entry per argument, bound ones first.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> forward = nnx.jit_partial(lambda m, x: m(x), model)
      >>> forward(jnp.ones((3, 2))).shape
      (3, 1)

  Args:
    fun: the function; its first ``len(partial_args)`` parameters receive ``partial_args``.
    *partial_args: the objects (or any values) to bind.
    **options: as ``nnx.jit``.

  Returns:
    A callable taking the remaining arguments, with ``lower`` like ``nnx.jit``.
  """
  graph_mode = _settings.graph_mode(graph)
  if not graph_mode:
    flatten(partial_args, graph=False, context='tree-mode jit_partial')  # refuses aliases now
  wrapped = JitWrapped(fun, in_shardings=in_shardings, out_shardings=out_shardings,
                       static_argnums=static_argnums, static_argnames=static_argnames,
                       donate_argnums=donate_argnums, donate_argnames=donate_argnames,
                       keep_unused=keep_unused, device=device, backend=backend, inline=inline,
                       graph=graph_mode, graph_updates=graph_updates)
  return JitPartial(wrapped, partial_args)


class JitPartial:
  """What ``nnx.jit_partial`` returns: the jitted function with its first arguments bound."""

  def __init__(self, wrapped: JitWrapped, partial_args: tuple):
    functools.update_wrapper(self, wrapped.fun)
    self.jitted = wrapped
    self.partial_args = partial_args

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    return self.jitted(*self.partial_args, *args, **kwargs)

  def lower(self, *args, **kwargs) -> 'PartialLowered':
    return PartialLowered(self.jitted.lower(*self.partial_args, *args, **kwargs),
                          self.partial_args)


class PartialLowered:
  """A lowered ``jit_partial`` call; ``compile()`` takes the remaining arguments only."""

  def __init__(self, lowered: Lowered, partial_args: tuple):
    self._lowered, self._partial_args = lowered, partial_args

  def compile(self, *args, **kwargs):
    compiled = self._lowered.compile(*args, **kwargs)
    return functools.partial(compiled, *self._partial_args)

  def __getattr__(self, name):
    return getattr(self._lowered, name)


def _check_sharding_prefix(shardings, name: str, graph: bool) -> None:
  """Shardings are prefixes of the arguments. In graph mode an object (Module, nnx.Dict, ...)
  cannot be one (NNX refuses it); tree mode takes the object-shaped trees ``nnx.prefix`` makes
  but not per-filter mappings (``StateSharding``)."""
  leaves = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, (Pytree, Variable, StateSharding)))
  for leaf in leaves:
    if isinstance(leaf, Pytree) and graph:
      raise ValueError(f'nnx.jit {name}: Graph nodes are not allowed as prefixes, got a '
                       f'{type(leaf).__name__}. Pass shardings: one per argument, a '
                       'StateSharding, a tree shaped like nnx.state(argument), or '
                       'nnx.prefix(argument, {filter: sharding}).')
    if isinstance(leaf, StateSharding) and not graph:
      raise ValueError(f'nnx.jit {name}: in tree mode (graph=False) shardings cannot contain '
                       '`StateSharding` objects; give a tree of shardings shaped like '
                       'nnx.state(argument) (or nnx.prefix(argument, {filter: sharding}, '
                       'graph=False)), or use graph=True.')


def _user_specs(in_shardings, args: tuple, kwargs: dict, statics: frozenset) -> dict:
  """The user's in_shardings per argument position (positional only, like jax.jit)."""
  if in_shardings is None:
    return {}
  if not isinstance(in_shardings, (tuple, list)) or isinstance(in_shardings, PartitionSpec):
    return {i: in_shardings for i in range(len(args)) if i not in statics}
  dynamic = [i for i in range(len(args)) if i not in statics]
  if len(in_shardings) == len(args):
    return {i: in_shardings[i] for i in dynamic}
  if len(in_shardings) == len(dynamic):
    return dict(zip(dynamic, in_shardings))
  raise ValueError(f'nnx.jit: in_shardings has {len(in_shardings)} entries, but the function was '
                   f'called with {len(args)} positional arguments ({len(dynamic)} not static). '
                   'Give one entry per positional argument.')


def _input_shardings(in_shardings, plan: prop.Plan, args, kwargs, statics):
  """``jax.jit`` in_shardings for the dynamic inputs, and the sharding of every graph leaf."""
  specs = _user_specs(in_shardings, args, kwargs, statics)
  return prop.input_specs(plan, specs.get, _leaf_sharding, 'shardings')


def _leaf_sharding(spec, path: tuple, leaf, where: str = 'nnx.jit in_shardings'):
  """The sharding of one leaf from a prefix: tuples / lists are followed by position down to an
  object-shaped prefix (``nnx.prefix``) or a sharding tree that ``leaf_shardings`` reads."""
  while True:
    found, value = prop.object_prefix(spec, path, leaf)
    if found:
      return value
    if (type(spec) in (tuple, list) and path and isinstance(path[0], int)
        and path[0] < len(spec)):
      spec, path = spec[path[0]], path[1:]
      continue
    return leaf_shardings(spec, [path], [leaf], where)[0]


def _inner_sharded(self: JitWrapped, leaf_specs: tuple, key: prop.CallKey, *inputs):
  """``JitWrapped._inner`` plus sharding constraints on the updates and the output."""
  by_path = dict(zip(key.graphdef.leaf_paths, leaf_specs))
  return prop.run(self.fun, key, inputs, graph=self.graph, graph_updates=self.graph_updates,
                  keep=key.extra or (), name='jit',
                  hook=functools.partial(_constrain_output, self, leaf_specs, by_path))


def _constrain_output(self: JitWrapped, leaf_specs: tuple, by_path: dict,
                      result: prop.Output) -> prop.Output:
  """Updated Variables keep the sharding their argument came in with; outputs take
  ``out_shardings``."""
  values = result.values
  if result.changed is not prop.RESTRUCTURED:
    values = [_constrained(v, leaf_specs[i]) for i, v in zip(result.changed, values)]
  where = prop.output_leaf_paths(result)
  outs = [(p, v) for (is_arg, p), v in zip(where, result.out_leaves) if not is_arg]
  out_specs = iter([None] * len(outs) if self._out_shardings is None else [
      _leaf_sharding(self._out_shardings, p, v, 'nnx.jit out_shardings') for p, v in outs])
  out_leaves = [_constrained(v, by_path.get(p) if is_arg else next(out_specs))
                for (is_arg, p), v in zip(where, result.out_leaves)]
  return prop.Output(result.changed, result.out_def, values, out_leaves)


def _constrained(value, sharding):
  if sharding is None or not isinstance(value, jax.Array):
    return value
  return constrain(value, sharding)
