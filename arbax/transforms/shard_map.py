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
from arbax.variables import Variable

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


def _call(f, mesh, in_specs, out_specs, axis_names, check_vma, graph, graph_updates, args):
  plan = prop.make_plan(args, {}, graph=graph, context='tree-mode shard_map')
  key = plan.key
  specs = _arg_specs(in_specs, len(args))
  dyn_specs, leaf_specs = prop.input_specs(plan, specs.__getitem__, _leaf_spec, 'specs')

  # jax.shard_map matches out_specs against the body's result only after the body ran, so the
  # spec lists are filled from inside the body, once the updates and output are known.
  update_specs: list = []
  output_specs: list = []
  static: dict = {}

  by_path = dict(zip(key.graphdef.leaf_paths, leaf_specs))
  # With graph updates the whole input state comes back, laid out by its in_specs (NNX).
  keep = frozenset(i for i, item in enumerate(plan.items) if isinstance(item, Variable)) \
      if graph and graph_updates else frozenset()

  def body(*inputs):
    result = prop.run(f, key, inputs, graph=graph, graph_updates=graph_updates, keep=keep,
                      name='shard_map')
    if result.changed is not prop.RESTRUCTURED:
      update_specs.extend(leaf_specs[i] for i in result.changed)
    where = prop.output_leaf_paths(result)
    outs = [(p, v) for (is_arg, p), v in zip(where, result.out_leaves) if not is_arg]
    resolved = iter(leaf_shardings(out_specs, [p for p, _ in outs], [v for _, v in outs],
                                   'nnx.shard_map out_specs'))
    output_specs.extend(by_path.get(p) if is_arg else next(resolved) for is_arg, p in where)
    static['changed'], static['out_def'] = result.changed, result.out_def
    return list(result.values), list(result.out_leaves)

  mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(dyn_specs),
                         out_specs=(update_specs, output_specs), axis_names=axis_names,
                         check_vma=check_vma)
  values, out_leaves = mapped(*prop.split_inputs(plan, args, {}))
  return prop.finish(plan, prop.Output(static['changed'], static['out_def'], values, out_leaves))


def _leaf_spec(spec, path: tuple, leaf):
  found, value = prop.object_prefix(spec, path, leaf)
  if found:
    return value
  return leaf_shardings(spec, [path], [leaf], 'nnx.shard_map in_specs')[0]


def shard_map(f: tp.Callable | type[_Missing] = _Missing, *, mesh, in_specs, out_specs,
              axis_names: tp.AbstractSet = frozenset(), check_vma: bool = True,
              graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.shard_map`` that takes Modules: ``f`` runs per device on its shard of every argument.

  ``in_specs`` has one entry per positional argument (or one for all);
  ``out_specs`` is a prefix of the output. Use as ``@nnx.shard_map(mesh=..., ...)``.
  For a Module the spec is one ``PartitionSpec`` for all its Variables, an
  ``nnx.StateSharding({filter: spec})`` or a tree shaped like ``nnx.state(module)``;
  Variable updates made per shard reach the caller's Module.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))
      ... def forward(model, x):
      ...   return model(x)
      >>> forward(model, jnp.ones((4, 2))).shape
      (4, 3)

  Args:
    f: the function (omit it to use ``nnx.shard_map(...)`` as a decorator).
    mesh: the device mesh.
    in_specs: one spec per positional argument, or one for all.
    out_specs: a prefix of the output's structure with specs.
    axis_names, check_vma: as ``jax.shard_map``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    The per-device function, called with the global arguments.
  """
  if f is not _Missing:
    prop.refuse_bound_method(f, 'shard_map')
  if f is _Missing:
    return lambda fun: shard_map(fun, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 axis_names=axis_names, check_vma=check_vma, graph=graph,
                                 graph_updates=graph_updates)
  graph = _settings.graph_mode(graph)
  graph_updates = _settings.graph_updates(graph_updates)

  @functools.wraps(f)
  def mapped(*args, **kwargs):
    if kwargs:
      raise TypeError(f'nnx.shard_map-ed {getattr(f, "__name__", "function")} takes positional '
                      f'arguments only (in_specs are positional); got keywords {sorted(kwargs)}.')
    return _call(f, mesh, in_specs, out_specs, frozenset(axis_names), check_vma, graph,
                 graph_updates, args)

  return mapped
