"""EMA: an exponential moving average of a model's Variables.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Scale(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.zeros(2))
    >>> model = Scale()
    >>> ema = nnx.EMA(model, decay=0.75, only=nnx.Param)
    >>> model.w[...] = jnp.ones(2)
    >>> ema.update(model)                  # average <- 0.75 * average + 0.25 * current
    >>> ema.params['w'][...].tolist()
    [0.25, 0.25]
    >>> averaged = ema.apply_to(model)     # a model that reads the averages
    >>> averaged.w is ema.params['w']
    True

``ema.params`` holds copies of the selected Variables (same kinds, same
metadata), so it lives in ``nnx.state(ema)`` and is updated in place, inside
``nnx.jit`` too.
"""
from __future__ import annotations

import typing as tp

import jax.numpy as jnp

from arbax import api
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.pytree import Pytree, data
from arbax.state import flat_dict, from_flat_state
from arbax.variables import Variable

__all__ = ['EMA']


def _tracked(obj, only, graph) -> dict:
  """``{path: Variable}`` of what an EMA follows in ``obj`` (a model or a State)."""
  flat = flat_dict(api.state(obj, only, graph=graph))
  for path, leaf in flat.items():
    if not isinstance(leaf, Variable):
      raise TypeError(f'EMA only averages Variables, but found a {type(leaf).__name__} at '
                      f'{format_path(path)}. Wrap it in a Variable or choose what to average '
                      'with the `only` filter.')
  return flat


class EMA(Pytree):
  """Exponential moving average of the Variables of ``params`` that match ``only``.

  ``ema.params`` holds copies of the selected Variables (same kinds, same
  metadata), so the averages are state of the EMA: ``nnx.state(ema)`` and
  ``nnx.jit`` see them, and ``update`` changes them in place.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> model.kernel[...] = jnp.zeros((1, 1))
      >>> ema = nnx.EMA(model, decay=0.5, only=nnx.Param)
      >>> model.kernel[...] = jnp.ones((1, 1))
      >>> ema.update(model)                             # 0.5 * 0 + 0.5 * 1
      >>> ema.apply_to(model).kernel[...].tolist()
      [[0.5]]

  Args:
    params: the model (or a State) whose Variables are averaged.
    decay: the weight of the old average, in [0, 1].
    only: a filter selecting the Variables to average (all by default).
    graph: graph mode (shared Variables averaged once) or tree mode (sharing is
      an error); ``None`` follows ``nnx.set_graph_mode`` at each call.
  """

  def __init__(self, params: tp.Any, decay: float, *, only: filterlib.Filter = ...,
               graph: bool | None = None):
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
      raise ValueError(f'EMA decay must be in [0, 1], got {decay}.')
    self.graph = graph
    self.decay = decay
    self.filter = only
    copies = {p: v.copy() for p, v in _tracked(params, only, graph).items()}
    self.params = data(from_flat_state(copies))

  def update(self, updates: tp.Any) -> None:
    """Move the averages toward ``updates``: ``average = decay * average + (1 - decay) * current``.

    Args:
      updates: the model (or State) the EMA was made from, with the current values.
        Paths missing or extra compared with the averages are a ValueError.
    """
    current = _tracked(updates, self.filter, self.graph)
    averages = flat_dict(self.params)
    for path in averages:
      if path not in current:
        raise ValueError(f'EMA.update: the new values have nothing at {format_path(path)}, '
                         'which this EMA averages. Pass the model (or State) it was made from.')
    for path in current:
      if path not in averages:
        raise ValueError(f'EMA.update: the new values have a Variable at {format_path(path)} '
                         'that this EMA does not average. Pass the same model (or State) it was '
                         'made from.')
    decay = self.decay
    for path, average in averages.items():
      old = average[...]
      new = decay * old + (1 - decay) * current[path][...]
      average[...] = jnp.asarray(new).astype(jnp.result_type(old))

  def apply_to(self, model):
    """A model like ``model`` whose averaged Variables are this EMA's (shared, not copied).

    The rest of the model's Variables are its own, so evaluating the result
    uses the averages without changing ``model``; later ``update`` calls show
    in it.

    Args:
      model: the model the EMA was made from.

    Returns:
      A new model object of ``model``'s structure.
    """
    graphdef, state = api.split(model, graph=self.graph)
    flat = flat_dict(state)
    averages = flat_dict(self.params)
    for path in averages:
      if path not in flat:
        raise ValueError(f'EMA.apply_to: the model has nothing at {format_path(path)}, which '
                         'this EMA averages. Pass the model it was made from.')
    tracked = filterlib.to_predicate(self.filter)
    for path, leaf in flat.items():
      if path not in averages and tracked(path, leaf):
        raise ValueError(f'EMA.apply_to: the model has a Variable at {format_path(path)} that '
                         'this EMA does not average. Pass the model it was made from.')
    flat.update(averages)
    return api.merge(graphdef, from_flat_state(flat))
