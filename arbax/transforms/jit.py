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
from arbax.sharding import constrain, leaf_shardings
from arbax.transforms import _propagate as prop


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
    self._in_shardings = in_shardings
    self._out_shardings = out_shardings
    self._jit_kwargs = dict(keep_unused=keep_unused, device=device, backend=backend, inline=inline)
    self._jitted: dict = {}   # (donated input positions, shardings) -> jax.jit object
    self._plan = None
    self._last_jitted = None
    try:
      self._signature = inspect.signature(fun)
    except (TypeError, ValueError):
      self._signature = None

  # -- the traced function --
  def _inner(self, key: prop.CallKey, *inputs):
    return prop.run(self.fun, key, inputs, graph=self.graph, keep=key.extra or ())

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
    positions = prop._positions(args, kwargs)
    dyn = 0
    groups = iter(plan.groups)
    params = list(self._signature.parameters) if self._signature is not None else []
    for (pos, _), kind in zip(positions, plan.kinds):
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
    """A ``jax.jit`` for this plan: in_shardings per leaf; outputs and updates constrained inside."""
    dyn_shardings, leaf_specs = _input_shardings(self._in_shardings, plan, args, kwargs,
                                                 self.graph, self._static_positions(args, kwargs))
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

  def __call__(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    return prop.finish(plan, jitted(plan.key, *prop.split_inputs(plan, args, kwargs)))

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  def lower(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    return jitted.lower(plan.key, *prop.split_inputs(plan, args, kwargs))

  def trace(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    return jitted.trace(plan.key, *prop.split_inputs(plan, args, kwargs))

  def eval_shape(self, *args, **kwargs):
    plan, jitted = self._prepare(args, kwargs)
    result = jitted.eval_shape(plan.key, *prop.split_inputs(plan, args, kwargs))
    return prop.build_output(result.out_def, result.out_leaves, plan.nodes)


def jit(fun: tp.Callable | None = None, *, in_shardings=None, out_shardings=None,
        static_argnums=None, static_argnames=None, donate_argnums=None, donate_argnames=None,
        keep_unused: bool = False, device=None, backend=None, inline: bool = False,
        graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.jit`` with state propagation: Variable updates inside reach the caller's objects.

  Use as ``@nnx.jit``, ``@nnx.jit(graph=True)`` or ``nnx.jit(f, static_argnums=...)``.
  Tree mode (default) refuses shared Variables with a ValueError naming both
  paths; graph mode (``graph=True``) allows them and keeps them shared.
  """
  options = dict(in_shardings=in_shardings, out_shardings=out_shardings,
                 static_argnums=static_argnums, static_argnames=static_argnames,
                 donate_argnums=donate_argnums, donate_argnames=donate_argnames,
                 keep_unused=keep_unused, device=device, backend=backend, inline=inline,
                 graph=graph, graph_updates=graph_updates)
  if fun is None:
    return lambda f: jit(f, **options)
  self_obj = getattr(fun, '__self__', None)
  if isinstance(self_obj, Pytree):
    # a bound method: `self` becomes an argument so its state propagates
    wrapped = JitWrapped(fun.__func__, **_shift_static(options))
    return functools.partial(wrapped, self_obj)
  return JitWrapped(fun, **options)


def plan_paths(plan: prop.Plan, args: tuple, kwargs: dict, graph: bool) -> list:
  """Per graph argument of ``plan``: ``(first leaf index, paths of its leaves inside the argument)``."""
  positional: list = [None] * len(args)
  named: dict = {}
  for (pos, value), kind in zip(prop._positions(args, kwargs), plan.kinds):
    if kind == prop.GRAPH:
      if isinstance(pos, int):
        positional[pos] = value
      else:
        named[pos] = value
  # the same walk make_plan did, so leaves line up with plan.items
  fl = flatten((tuple(positional), named), graph=graph, context='sharding')
  return [(a, [p[2:] for p in fl.paths[a:b]]) for a, b in plan.groups]


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


def _input_shardings(in_shardings, plan: prop.Plan, args, kwargs, graph: bool, statics):
  """``jax.jit`` in_shardings for the dynamic inputs, and the sharding of every graph leaf."""
  specs = _user_specs(in_shardings, args, kwargs, statics)
  leaf_specs: list = [None] * len(plan.items)
  groups = iter(plan_paths(plan, args, kwargs, graph) if prop.GRAPH in plan.kinds else ())
  dyn = []
  for (pos, _), kind in zip(prop._positions(args, kwargs), plan.kinds):
    if kind == prop.STATIC_ARG:
      continue
    spec = specs.get(pos)
    if kind == prop.GRAPH:
      start, paths = next(groups)
      resolved = leaf_shardings(spec, paths, plan.items[start:start + len(paths)],
                                f'nnx.jit in_shardings[{pos}]')
      leaf_specs[start:start + len(paths)] = resolved
      dyn.append(resolved)
    else:
      dyn.append(spec)
  return dyn, leaf_specs


def _inner_sharded(self: JitWrapped, leaf_specs: tuple, key: prop.CallKey, *inputs):
  """``JitWrapped._inner`` plus sharding constraints on the updates and the output."""
  args, kwargs, in_leaves, inner_items = prop.rebuild(key, inputs)
  out = self.fun(*args, **kwargs)
  changed, values = prop.collect_updates(in_leaves, inner_items, keep=key.extra or ())
  # an updated Variable keeps the sharding its argument came in with
  values = [_constrained(v, leaf_specs[i]) for i, v in zip(changed, values)]
  out_def, out_leaves = prop.flatten_output(out, graph=self.graph)
  if self._out_shardings is not None:
    paths = getattr(out_def, 'leaf_paths', None) or [()] * len(out_leaves)
    specs = leaf_shardings(self._out_shardings, paths, out_leaves, 'nnx.jit out_shardings')
    out_leaves = [_constrained(v, s) for v, s in zip(out_leaves, specs)]
  return prop.Output(changed, out_def, values, out_leaves)


def _constrained(value, sharding):
  if sharding is None or not isinstance(value, jax.Array):
    return value
  return constrain(value, sharding)


def _shift_static(options: dict) -> dict:
  options = dict(options)
  for name in ('static_argnums', 'donate_argnums'):
    value = _as_tuple(options[name])
    options[name] = tuple(i + 1 if i >= 0 else i for i in value) or None
  return options
