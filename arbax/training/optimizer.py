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


import jax
import jax.numpy as jnp
import numpy as np
import optax

from arbax import api
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.pytree import Pytree, data
from arbax.state import GraphState, State, flat_dict, from_flat_state, graph_state_parts
from arbax.variables import Param, Variable

__all__ = ['OptState', 'OptArray', 'OptVariable', 'Optimizer', 'ModelAndOptimizer']


class OptState(Variable):
  """Any optimizer state; the ``step`` counter is one. The filter for all of an Optimizer's state.

      >>> import optax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> list(nnx.state(optimizer, nnx.OptState))
      ['step']
  """


class OptArray(OptState):
  """Optimizer state that is a plain array (Adam's ``count``, injected hyperparameters).

      >>> import optax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
      >>> type(optimizer.opt_state[0].count).__name__        # Adam's step count
      'OptArray'
  """


class OptVariable(OptState):
  """Optimizer state shaped like a parameter (Adam's ``mu``); keeps the parameter's metadata.

  A parameter's ``optimizer_sharding`` metadata becomes its moments'
  ``out_sharding``, so the moments may be sharded differently (ZeRO-style).

      >>> import optax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
      >>> mu = optimizer.opt_state[0].mu
      >>> type(mu['kernel']).__name__, mu['kernel'].shape
      ('OptVariable', (2, 3))
  """


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


def _opt_metadata(param_metadata: dict) -> dict:
  """The metadata of a parameter's optimizer state: ``optimizer_sharding`` replaces ``out_sharding``.

  Lets the moments be split differently from the parameter (ZeRO-style), e.g.
  ``nnx.Linear(..., kernel_metadata={'optimizer_sharding': ('data', None)})``.
  """
  metadata = dict(param_metadata)
  if 'optimizer_sharding' in metadata:
    metadata['out_sharding'] = metadata.pop('optimizer_sharding')
  return metadata


def _to_opt_state(tree):
  """Wrap every array of an optax state in a new Variable (never one of the model's own)."""
  def wrap(x):
    if isinstance(x, Variable):  # shaped like a param: keep its metadata (sharding, hijax, ...)
      # the constructor places the value on the mesh when the metadata asks for it
      return OptVariable(x.get_value(), **_opt_metadata(x.get_metadata()))
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


def _grads_flat(grads, wrt, graph) -> dict:
  """``{path: gradient}`` of the part of ``grads`` that ``wrt`` selects.

  ``grads`` is a State (``nnx.grad``), a plain dict, or a Module-shaped tree
  (``jax.grad`` over a Module). Gradient Variables outside ``wrt`` are dropped,
  as NNX does, so ``nnx.grad``'s default (every Param) can train a LoRA-only
  optimizer; raw arrays carry no kind and are all kept.
  """
  if isinstance(grads, GraphState):  # nnx.unpack-style gradients: the State inside
    grads = graph_state_parts(grads)[1]
  if isinstance(grads, Pytree):
    grads = api.state(grads, wrt, graph=graph)
  elif isinstance(grads, Variable) or not isinstance(grads, dict):
    raise TypeError(f'Optimizer.update expects grads as a State (like nnx.state(model, '
                    f'{_describe_wrt(wrt)})) or a Module-shaped tree, got {type(grads).__name__}.')
  selected = filterlib.to_predicate(wrt)
  return {p: g for p, g in flat_dict(grads).items()
          if not isinstance(g, Variable) or selected(p, g)}


def _check_grads(grads_flat: dict, params_flat: dict, wrt) -> dict:
  """``{path: gradient array}`` for every param path; a ValueError names the first mismatch."""
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

  The optax state is stored as Variables (``OptVariable``, ``OptArray``,
  ``OptState``), so ``nnx.jit`` and checkpoints carry it like any other state.
  The model is not kept: pass it to ``update``.

      >>> import jax.numpy as jnp, optax, arbax as nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...   loss = lambda model: ((model(x) - y) ** 2).mean()
      ...   grads = nnx.grad(loss)(model)
      ...   optimizer.update(model, grads)      # in place, inside jit too
      >>> train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
      >>> int(optimizer.step[...])
      1

  Args:
    model: the model whose ``wrt`` Variables are trained (only read here).
    tx: any optax transformation.
    wrt: the filter of the Variables it trains (usually ``nnx.Param``); ``update``
      takes the same part of the gradients and ignores the rest. Required.
    graph: graph mode (the model may share Variables) or tree mode (sharing is an
      error); ``None`` follows ``nnx.set_graph_mode`` at each call.
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

  def __getattr__(self, name):
    # only reached for missing attributes: explain the most common one
    if name == 'model':
      raise AttributeError(f'{type(self).__name__} does not hold the model: pass it to '
                           'update(model, grads), or use nnx.ModelAndOptimizer(model, tx), '
                           'whose .model is the model.')
    raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

  def update(self, model, grads=_MISSING, /, **kwargs):
    """Apply one step of ``tx`` with ``grads``: the new params are written into ``model``.

    The step counter increments and the optax state is updated in place. A
    gradient missing for a parameter (or given for a non-parameter), a shape
    mismatch, or a ``tx`` that changes the structure of its state is a
    ValueError naming the culprit, raised before anything is written.

        >>> import jax.numpy as jnp, optax, arbax as nnx
        >>> model = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
        >>> model.kernel[...] = jnp.ones((1, 1))
        >>> optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
        >>> grads = nnx.State({'kernel': nnx.Param(jnp.full((1, 1), 2.0))})
        >>> _ = optimizer.update(model, grads)
        >>> model.kernel[...].tolist()                  # 1 - 0.5 * 2
        [[0.0]]

    Args:
      model: the model the optimizer was made for.
      grads: the gradients: a State shaped like ``nnx.state(model, wrt)`` (what
        ``nnx.grad`` returns), a nested dict, or a Module-shaped tree.
      **kwargs: passed to ``tx.update`` (``value=``, ``grad=``, ``value_fn=`` for
        optax's line-search optimizers).

    Returns:
      The updates ``tx`` computed (a State of arrays).
    """
    if grads is _MISSING:
      raise TypeError('Optimizer.update(model, grads) takes the model and the gradients; '
                      'only one was passed. With nnx.ModelAndOptimizer call update(grads).')
    params = api.state(model, self.wrt, graph=self.graph)
    params_flat = flat_dict(params)
    grads_flat = _check_grads(_grads_flat(grads, self.wrt, self.graph), params_flat, self.wrt)
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
  """An Optimizer that owns its model (``.model``): ``update(grads)`` needs no model argument.

      >>> import jax.numpy as jnp, optax, arbax as nnx
      >>> state = nnx.ModelAndOptimizer(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), optax.sgd(0.1))
      >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(state.model)
      >>> _ = state.update(grads)
      >>> int(state.step[...])
      1

  Args:
    model: the model, kept as ``.model``.
    tx: any optax transformation.
    wrt: the filter of the Variables it trains (``nnx.Param`` by default).
  """

  def __init__(self, model, tx: optax.GradientTransformation, *, wrt: filterlib.Filter = Param):
    super().__init__(model, tx, wrt=wrt)
    self.model = model

  def update(self, grads, /, **kwargs):
    """``Optimizer.update(self.model, grads, **kwargs)``: one step on the owned model.

    Args:
      grads: the gradients, as for ``Optimizer.update``.
      **kwargs: passed to ``tx.update``.

    Returns:
      The updates ``tx`` computed.
    """
    return super().update(self.model, grads, **kwargs)
