"""Optimizer: an optax transformation whose state lives in Variables.

    >>> import jax.numpy as jnp, optax, arbax as nnx
    >>> class Scale(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    >>> model = Scale()
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    >>> grads = nnx.State({'w': nnx.Param(jnp.array([1.0, 2.0]))})
    >>> _ = optimizer.update(model, grads)   # writes the new params into `model`
    >>> model.w[...].tolist(), int(optimizer.step[...])
    ([0.5, 0.0], 1)

Because the optax state is stored as Variables (``OptVariable`` where it is
shaped like a parameter, ``OptArray`` for other arrays, the ``step`` counter an
``OptState``), ``nnx.state((model, optimizer))``, ``nnx.jit`` and checkpoints
see it like any other state. ``tx.update`` always receives plain arrays: the
Variables are unwrapped on the way in and written in place on the way out.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arbax import api
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.pytree import Pytree, data
from arbax.state import State, flat_dict, from_flat_state
from arbax.variables import Param, Variable

__all__ = ['OptState', 'OptArray', 'OptVariable', 'Optimizer', 'ModelAndOptimizer', 'TrainState']


class OptState(Variable):
  """Any optimizer state; the ``step`` counter is one."""


class OptArray(OptState):
  """Optimizer state that is a plain array (Adam's ``count``, injected hyperparameters)."""


class OptVariable(OptState):
  """Optimizer state shaped like a parameter (Adam's ``mu``); keeps the parameter's metadata."""


_MISSING = object()
_NUMBERS = (jax.Array, np.ndarray, np.generic, int, float, complex)


def _is_var(x) -> bool:
  return isinstance(x, Variable)


def _plain_copies(state) -> State:
  """``state`` with each Variable replaced by a same-kind copy whose pytree child is the raw value.

  ``tx.init`` maps over these, so hijax Variables (whose child is a Cell) reach
  it as arrays too, and nothing it returns aliases the model's own Variables.
  """
  return from_flat_state({p: type(v)._from_parts(v._value, v._meta) if isinstance(v, Variable)
                          else v for p, v in flat_dict(state).items()})


def _to_opt_state(tree):
  """Wrap every array of an optax state in a new Variable (never one of the model's own)."""
  def wrap(x):
    if isinstance(x, Variable):  # shaped like a param: keep its metadata (sharding, hijax, ...)
      return OptVariable(x._value, **x._meta.items)
    if isinstance(x, _NUMBERS):
      return OptArray(x)
    return x
  return jax.tree_util.tree_map(wrap, tree, is_leaf=_is_var)


def _unwrap(tree):
  """The same pytree with every Variable replaced by its value."""
  return jax.tree_util.tree_map(lambda x: x._value if isinstance(x, Variable) else x, tree,
                                is_leaf=_is_var)


def _check_same_structure(old_values, new_values) -> None:
  old_def = jax.tree_util.tree_structure(old_values)
  new_def = jax.tree_util.tree_structure(new_values)
  if old_def != new_def:
    raise ValueError(f'tx.update changed the structure of the optimizer state, which '
                     f'nnx.Optimizer stores in place: it was {old_def}, tx.update returned '
                     f'{new_def}.')


def _assign(target, new_values) -> None:
  """Write ``new_values`` into the Variables of ``target``, a tree of the same structure."""
  targets = jax.tree_util.tree_leaves(target, is_leaf=_is_var)
  for var, value in zip(targets, jax.tree_util.tree_leaves(new_values)):
    if isinstance(var, Variable):
      var.set_value(value)


def _describe_wrt(wrt) -> str:
  return getattr(wrt, '__name__', None) or repr(wrt)


def _check_grads(grads, params_flat: dict, wrt) -> dict:
  """``{path: gradient array}`` for every param path; a ValueError names the first mismatch."""
  if isinstance(grads, Variable) or not isinstance(grads, dict):
    raise TypeError(f'Optimizer.update expects grads as a State (like nnx.state(model, '
                    f'{_describe_wrt(wrt)})), got {type(grads).__name__}.')
  grads_flat = flat_dict(grads)
  missing = [p for p in params_flat if p not in grads_flat]
  extra = [p for p in grads_flat if p not in params_flat]
  if missing or extra:
    sort = lambda ps: sorted(ps, key=lambda p: tuple(str(k) for k in p))  # noqa: E731
    if missing:
      path = sort(missing)[0]
      problem = 'has no gradient for the parameter'
    else:
      path = sort(extra)[0]
      problem = 'has a gradient for a path that is not a parameter:'
    raise ValueError(
        f'grads {problem} {format_path(path)}. grads must have the structure of '
        f'nnx.state(model, {_describe_wrt(wrt)}) (the optimizer\'s `wrt`); differentiate with '
        'respect to that same filter.')
  out = {}
  for path, param in params_flat.items():
    g = grads_flat[path]
    g = g._value if isinstance(g, Variable) else g
    p_shape = np.shape(param._value if isinstance(param, Variable) else param)
    if g is not None and np.shape(g) != p_shape:
      raise ValueError(f'The gradient at {format_path(path)} has shape {np.shape(g)} but the '
                       f'parameter has shape {p_shape}.')
    out[path] = g
  return out


class Optimizer(Pytree):
  """Holds an optax transformation, its state and a step counter; updates a model in place.

  ``wrt`` is the filter of the Variables it trains (usually ``nnx.Param``);
  ``graph=True`` lets the model share Variables between attributes.
  """

  def __init__(self, model, tx: optax.GradientTransformation, *, wrt: filterlib.Filter = _MISSING,
               graph: bool | None = None):
    if wrt is _MISSING:
      raise TypeError('nnx.Optimizer needs the `wrt` keyword argument: the filter of the Variables '
                      'it updates, e.g. nnx.Optimizer(model, tx, wrt=nnx.Param). To keep the model '
                      'inside the optimizer, use nnx.ModelAndOptimizer(model, tx).')
    self.graph = graph
    self.step = OptState(jnp.array(0, dtype=jnp.uint32))
    self.tx = tx
    params = _plain_copies(api.state(model, wrt, graph=graph))
    self.opt_state = data(_to_opt_state(tx.init(params)))
    self.wrt = wrt

  def update(self, model, grads=_MISSING, /, **kwargs):
    """Apply one step of ``tx`` with ``grads``; writes the new params into ``model``.

    ``kwargs`` reach ``tx.update`` (``value=``, ``grad=``, ``value_fn=`` for
    optax's line-search optimizers). Returns the updates ``tx`` computed.
    """
    if grads is _MISSING:
      raise TypeError('Optimizer.update(model, grads) takes the model and the gradients; '
                      'only one was passed. With nnx.ModelAndOptimizer call update(grads).')
    params = api.state(model, self.wrt, graph=self.graph)
    params_flat = flat_dict(params)
    grads_flat = _check_grads(grads, params_flat, self.wrt)
    param_values = from_flat_state({p: v._value if isinstance(v, Variable) else v
                                    for p, v in params_flat.items()})
    grad_values = from_flat_state(grads_flat)
    kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
    opt_values = _unwrap(self.opt_state)
    updates, new_opt_values = self.tx.update(grad_values, opt_values, param_values, **kwargs)
    _check_same_structure(opt_values, new_opt_values)  # before any write: all or nothing
    new_params = flat_dict(optax.apply_updates(param_values, updates))
    raw = {}
    for path, target in params_flat.items():
      if isinstance(target, Variable):
        target.set_value(new_params[path])
      else:
        raw[path] = new_params[path]
    if raw:
      api.update(model, from_flat_state(raw))
    _assign(self.opt_state, new_opt_values)
    self.step[...] += 1
    return updates


class ModelAndOptimizer(Optimizer):
  """An Optimizer that owns its model: ``update(grads)`` needs no model argument."""

  def __init__(self, model, tx: optax.GradientTransformation, *, wrt: filterlib.Filter = Param):
    super().__init__(model, tx, wrt=wrt)
    self.model = model

  def update(self, grads, /, **kwargs):
    return super().update(self.model, grads, **kwargs)


# -- TrainState: the functional alternative -----------------------------------
def _static_field(**kwargs):
  return dataclasses.field(metadata={'static': True}, **kwargs)


class TrainState:
  """An immutable train state: ``graphdef``, ``params``, ``opt_state``, ``step``, ``tx``.

  ``TrainState.create(graphdef, params=params, tx=tx)`` initializes the optax
  state; ``apply_gradients(grads)`` returns a new TrainState one step later.
  Subclasses are dataclasses too: add fields for more State (``batch_stats: nnx.State``).
  """

  graphdef: tp.Any = _static_field()
  params: tp.Any = None
  opt_state: tp.Any = None
  step: tp.Any = 0
  tx: tp.Any = _static_field(default=None)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    _make_dataclass(cls)

  @classmethod
  def create(cls, graphdef, *, params, tx: optax.GradientTransformation, step: int = 0,
             **kwargs):
    return cls(graphdef=graphdef, params=params, opt_state=tx.init(params),
               step=jnp.asarray(step), tx=tx, **kwargs)

  def apply_gradients(self, grads, **kwargs):
    """A new TrainState: ``params`` and ``opt_state`` after one ``tx`` step; ``step + 1``."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **kwargs)
    params = optax.apply_updates(self.params, updates)
    return self.replace(params=params, opt_state=opt_state, step=self.step + 1)

  def apply(self, state, *states):
    """``ts.apply('params', 'batch_stats')(x)``: call the merged model; strings name fields."""
    states = [getattr(self, s) if isinstance(s, str) else s for s in (state, *states)]
    return self.graphdef.apply(*states)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


def _make_dataclass(cls) -> None:
  """Turn ``cls`` into a frozen dataclass registered as a pytree (static fields in the treedef)."""
  dataclasses.dataclass(frozen=True, kw_only=True)(cls)
  fields = dataclasses.fields(cls)
  jax.tree_util.register_dataclass(
      cls, data_fields=[f.name for f in fields if not f.metadata.get('static')],
      meta_fields=[f.name for f in fields if f.metadata.get('static')])


_make_dataclass(TrainState)
