"""SPMD helpers that build models: abstract (shape-only) models that carry their shardings.

``arbax.sharding`` reads and writes annotations on single Variables; this
module sits above the transforms and combines the two: ``nnx.eval_shape`` a
constructor, then attach the ``NamedSharding`` each Variable asks for.

    >>> import jax, arbax as nnx
    >>> mesh = jax.make_mesh((1,), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
    >>> init = nnx.with_partitioning(nnx.initializers.ones_init(), (None, 'model'))
    >>> graphdef, abstract = nnx.get_abstract_model(
    ...     lambda: nnx.Linear(2, 4, kernel_init=init, rngs=nnx.Rngs(0)), mesh)
    >>> abstract['kernel'].get_value().sharding.spec
    P(None, 'model')

Restore a checkpoint into ``abstract``, or give its shardings to
``nnx.jit(out_shardings=...)`` to create the model already sharded.
``nnx.spmd`` also re-exports the annotation helpers, as NNX's module does.
"""
from __future__ import annotations

import typing as tp

import jax
from jax.sharding import NamedSharding

from arbax import api
from arbax.errors import format_path
from arbax.sharding import (PARTITION_NAME, add_axis, get_named_sharding,  # noqa: F401 (re-exported)
                            get_partition_spec, remove_axis, variable_spec, with_metadata,
                            with_partitioning)
from arbax.transforms.control import eval_shape
from arbax.variables import Variable

__all__ = ['get_abstract_model', 'as_abstract', 'abstract_with_sharding']


def get_abstract_model(init_fn: tp.Callable, mesh: jax.sharding.Mesh, *, graph: bool | None = None):
  """``(graphdef, abstract_state)`` of ``init_fn()``: ShapeDtypeStructs carrying their NamedSharding.

  Nothing is computed. Variables without ``out_sharding`` get a replicated
  ``NamedSharding(mesh, P())``.

  Args:
    init_fn: builds the model, called with no arguments under ``jax.set_mesh(mesh)``.
    mesh: the mesh the shardings refer to.
    graph: graph mode (shared Variables appear once) or tree mode; ``None``
      takes the current ``nnx.set_graph_mode`` value.

  Returns:
    The GraphDef and a State of Variables holding ``jax.ShapeDtypeStruct``s.
  """
  with jax.set_mesh(mesh):
    abstract = eval_shape(init_fn, graph=graph)
    graphdef, state = api.split(abstract, graph=graph)
    shardings = get_named_sharding(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, shardings)
  return graphdef, state


def as_abstract(tree, graph: bool | None = None):
  """Attach to each abstract Variable with ``out_sharding`` the NamedSharding it asks for.

  The mesh is the Variable's ``mesh`` metadata or the one of ``jax.set_mesh``;
  a Variable whose ShapeDtypeStruct already has a sharding is left alone.

  Args:
    tree: a model (or State) from ``nnx.eval_shape``.
    graph: graph or tree mode for the traversal; ``None`` takes the current mode.

  Returns:
    ``tree`` rebuilt with sharded ShapeDtypeStructs in the annotated Variables.
  """
  def attach(path, x):
    if not isinstance(x, Variable):
      return x
    value = x.get_value()
    if (not isinstance(value, jax.ShapeDtypeStruct) or getattr(value, 'sharding', None) is not None
        or not x.get_metadata('out_sharding', None)):
      return x
    mesh = x.get_metadata('mesh', None) or jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError(f'as_abstract: the Variable at {format_path(path)} has out_sharding='
                       f'{x.get_metadata("out_sharding")!r} but no mesh: call it under '
                       'jax.set_mesh(mesh) or give the Variable mesh= metadata.')
    sharding = NamedSharding(mesh, variable_spec(x))
    return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
  return api.recursive_map(attach, tree, graph=graph)


abstract_with_sharding = as_abstract
