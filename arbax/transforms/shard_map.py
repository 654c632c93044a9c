"""``nnx.shard_map``: ``jax.shard_map`` over functions of Modules, with state propagation.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))
    ... def apply(model, x):          # runs once per device, on its slice of x
    ...   return model(x)
    >>> apply(model, jnp.ones((4, 2))).shape
    (4, 3)

A Module argument's spec is one PartitionSpec for all its Variables, an
``nnx.StateSharding`` (a spec per filter: ``{nnx.Param: P(None, 'model'), ...: P()}``)
or a tree shaped like ``nnx.state(arg)``. A Variable assigned inside comes
back with the spec it went in with, so the update reaches the caller's object.
"""
from __future__ import annotations

import functools
import typing as tp

import jax

from arbax import _settings
from arbax.sharding import leaf_shardings, StateSharding  # noqa: F401  (re-exported name)
from arbax.transforms import _propagate as prop
from arbax.transforms.jit import plan_paths

__all__ = ['shard_map']


class _Missing:
  pass


def _arg_specs(in_specs, n_args: int) -> tuple:
  if isinstance(in_specs, (tuple, list)) and not isinstance(in_specs, jax.sharding.PartitionSpec):
    if len(in_specs) != n_args:
      raise ValueError(f'nnx.shard_map: in_specs has {len(in_specs)} entries but the function was '
                       f'called with {n_args} positional arguments; give one spec per argument.')
    return tuple(in_specs)
  return (in_specs,) * n_args


def _call(f, mesh, in_specs, out_specs, axis_names, check_vma, graph, args):
  plan = prop.make_plan(args, {}, graph=graph, context='tree-mode shard_map')
  key = plan.key
  specs = _arg_specs(in_specs, len(args))
  groups = plan_paths(plan, args, {}, graph)
  leaf_specs = [None] * len(plan.items)
  dyn_specs = []
  group_it = iter(groups)
  for i, kind in enumerate(plan.kinds):
    if kind == prop.GRAPH:
      start, paths = next(group_it)
      leaves = plan.items[start:start + len(paths)]
      resolved = leaf_shardings(specs[i], paths, leaves, f'nnx.shard_map in_specs[{i}]')
      leaf_specs[start:start + len(paths)] = resolved
      dyn_specs.append(list(resolved))
    else:
      dyn_specs.append(specs[i])

  # jax.shard_map matches out_specs against the body's result only after the body ran, so the
  # spec lists are filled from inside the body, once the updates and output are known.
  update_specs: list = []
  output_specs: list = []
  static: dict = {}

  def body(*inputs):
    result = prop.run(f, key, inputs, graph=graph)
    update_specs.extend(leaf_specs[i] for i in result.changed)
    paths = _output_paths(result.out_def, len(result.out_leaves))
    output_specs.extend(leaf_shardings(out_specs, paths, result.out_leaves, 'nnx.shard_map out_specs'))
    static['changed'], static['out_def'] = result.changed, result.out_def
    return list(result.values), list(result.out_leaves)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(dyn_specs),
                         out_specs=(update_specs, output_specs), axis_names=axis_names,
                         check_vma=check_vma)
  values, out_leaves = mapped(*prop.split_inputs(plan, args, {}))
  return prop.finish(plan, prop.Output(static['changed'], static['out_def'], values, out_leaves))


def _output_paths(out_def, n: int) -> list:
  leaf_paths = getattr(out_def, 'leaf_paths', None)
  if leaf_paths is None:   # a bare array (or nothing): the output itself
    return [()] * n
  return list(leaf_paths)


def shard_map(f: tp.Callable | type[_Missing] = _Missing, *, mesh, in_specs, out_specs,
              axis_names: tp.AbstractSet = frozenset(), check_vma: bool = True,
              graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.shard_map`` that takes Modules: ``f`` runs per device on its shard of every argument.

  ``in_specs`` has one entry per positional argument (or one for all);
  ``out_specs`` is a prefix of the output. Use as ``@nnx.shard_map(mesh=..., ...)``.
  """
  if f is _Missing:
    return lambda fun: shard_map(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 axis_names=axis_names, check_vma=check_vma, graph=graph,
                                 graph_updates=graph_updates)
  graph = _settings.graph_mode(graph)

  @functools.wraps(f)
  def mapped(*args, **kwargs):
    if kwargs:
      raise TypeError(f'nnx.shard_map-ed {getattr(f, "__name__", "function")} takes positional '
                      f'arguments only (in_specs are positional); got keywords {sorted(kwargs)}.')
    return _call(f, mesh, in_specs, out_specs, frozenset(axis_names), check_vma, graph, args)

  return mapped
