"""transform_metadata: keep sharding annotations in step with an axis a transform maps over.

A Variable stacked over layers has one more axis than each layer sees; its
``out_sharding`` names that axis too. ``nnx.vmap``/``nnx.scan`` drop the name
inside and put it back outside (their ``transform_metadata=`` argument).
``nnx.transform_metadata`` does only that bookkeeping, for code that maps by
other means (``jax.vmap`` over a split state, a custom kernel):

    >>> import jax.numpy as jnp, arbax as nnx
    >>> w = nnx.Param(jnp.ones((4, 2, 3)), out_sharding=('layers', 'din', 'dout'),
    ...               eager_sharding=False)
    >>> @nnx.transform_metadata(in_axes=0, partition='layers')
    ... def one_layer(w):
    ...   return w.out_sharding                    # what each layer sees
    >>> one_layer(w), w.out_sharding
    (('din', 'dout'), ('layers', 'din', 'dout'))

Only metadata changes; values keep every axis. Variables the function returns
get the axis added at ``out_axes``.
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import typing as tp

from arbax import _settings, api
from arbax.errors import format_path
from arbax.sharding import PARTITION_NAME, add_axis, remove_axis
from arbax.variables import Variable

__all__ = ['transform_metadata']

F = tp.TypeVar('F', bound=tp.Callable[..., tp.Any])


def _axis_for(axes, path: tuple, where: str):
  """The entry of the prefix tree ``axes`` (ints / None, in tuples, lists, dicts) at ``path``."""
  spec = axes
  for depth, key in enumerate(path):
    if spec is None or isinstance(spec, int):
      return spec
    if isinstance(spec, (tuple, list)) and isinstance(key, int) and key < len(spec):
      spec = spec[key]
    elif isinstance(spec, collections.abc.Mapping) and key in spec:
      spec = spec[key]
    else:
      what = 'arguments' if where == 'in_axes' else 'outputs'
      raise ValueError(f'transform_metadata: {where}={axes!r} is not a prefix of the {what}: '
                       f'it has no entry for '
                       f'{format_path(path[:depth + 1])}. Give an int or None per argument '
                       '(or per output), or one for all.')
  if spec is None or isinstance(spec, int):
    return spec
  raise ValueError(f'transform_metadata: {where}={axes!r} gives {spec!r} for the Variable at '
                   f'{format_path(path)}; expected an int axis or None.')


def _mapped_variables(tree, axes, where: str, graph: bool) -> list[tuple[tuple, Variable, int]]:
  """``(path, Variable, axis)`` for every Variable of ``tree`` that ``axes`` gives an int axis."""
  out = []
  for path, x in api.iter_graph(tree, graph=graph):
    if isinstance(x, Variable):
      axis = _axis_for(axes, path, where)
      if axis is not None:
        out.append((path, x, axis))
  return out


def _positional(f, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """Keyword arguments moved into position, so ``in_axes`` covers them as NNX's does."""
  if not kwargs:
    return args, kwargs
  try:
    bound = inspect.signature(f).bind(*args, **kwargs)
  except (TypeError, ValueError):
    return args, kwargs
  return bound.args, bound.kwargs


def _check_outputs_are_new(mapped_out, inputs: dict) -> None:
  for path, var, _ in mapped_out:
    if id(var) in inputs:
      raise ValueError(
          f'transform_metadata: the output at {format_path(path)} is the input Variable at '
          f'{format_path(inputs[id(var)])}; its mapped axis would be added twice. Return a new '
          'Variable (nnx.clone(...) or Variable.copy()) or return its value instead.')


@tp.overload
def transform_metadata(f: F, *, in_axes: tp.Any = 0, out_axes: tp.Any = 0,
                       partition: str | None, graph: bool | None = None) -> F: ...
@tp.overload
def transform_metadata(f: None = None, *, in_axes: tp.Any = 0, out_axes: tp.Any = 0,
                       partition: str | None, graph: bool | None = None
                       ) -> tp.Callable[[F], F]: ...
def transform_metadata(f: tp.Callable | None = None, *, in_axes: tp.Any = 0,
                       out_axes: tp.Any = 0, partition: str | None, graph: bool | None = None
                       ) -> tp.Any:
  """Remove the ``partition`` axis from the sharding metadata of inputs while ``f`` runs.

  Inside ``f`` each input Variable mapped by ``in_axes`` has the name at its
  axis removed from ``out_sharding``; afterwards it is inserted back, and
  inserted into the Variables ``f`` returns at ``out_axes``. Values are not
  touched. ``partition=None`` stands for an unnamed (replicated) axis.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> @nnx.transform_metadata(in_axes=0, out_axes=0, partition='layers')
      ... def new_layer_like(w):
      ...   return nnx.Param(jnp.zeros(w.shape), out_sharding=w.out_sharding,
      ...                    eager_sharding=False)
      >>> w = nnx.Param(jnp.ones((4, 2)), out_sharding=('layers', 'dout'), eager_sharding=False)
      >>> new_layer_like(w).out_sharding             # the axis name is added to outputs
      ('layers', 'dout')

  Args:
    f: the function; omit it to use ``transform_metadata(...)`` as a decorator.
    in_axes: an int for all arguments, or a prefix tree (tuple per argument,
      nested tuples / dicts) of ints and ``None`` (leave alone).
    out_axes: the same for the outputs.
    partition: the mesh / logical axis name of the mapped axis.
    graph: graph mode (shared Variables are moved once) or tree mode (sharing is
      an error); ``None`` takes the current ``nnx.set_graph_mode`` value.

  Returns:
    ``f`` wrapped. Its metadata changes on inputs are undone if ``f`` raises,
    and so are value writes.
  """
  if f is None:
    return functools.partial(transform_metadata, in_axes=in_axes, out_axes=out_axes,
                             partition=partition, graph=graph)
  graph = _settings.graph_mode(graph)
  change = {PARTITION_NAME: partition}

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    args, kwargs = _positional(f, args, kwargs)
    mapped_in = _mapped_variables(args, in_axes, 'in_axes', graph)
    saved = [(var, var.get_value(), var.get_metadata()) for _, var, _ in mapped_in]
    try:
      for _, var, axis in mapped_in:
        remove_axis(var, axis, change)
      out = f(*args, **kwargs)
      mapped_out = _mapped_variables(out, out_axes, 'out_axes', graph)
      _check_outputs_are_new(mapped_out, {id(var): path for path, var, _ in mapped_in})
    except BaseException:
      for var, value, metadata in saved:
        var.set_metadata(metadata)
        if var.get_value() is not value:
          var.set_value(value)
      raise
    for _, var, axis in mapped_in:
      add_axis(var, axis, change)
    for _, var, axis in mapped_out:
      add_axis(var, axis, change)
    return out

  return wrapper
