"""TrainState: the functional training state of NNX (``nnx.helpers``), an immutable pytree.

    >>> import jax, jax.numpy as jnp, optax, arbax as nnx
    >>> graphdef, params = nnx.split(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    >>> state = nnx.TrainState.create(graphdef, params=params, tx=optax.sgd(0.1))
    >>> y, _ = state.apply('params')(jnp.ones((1, 2)))
    >>> grads = jax.tree.map(jnp.ones_like, state.params)
    >>> state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    >>> int(state.step), round(float(state.params['bias'][...][0]), 3)
    (1, -0.1)

It is the style of ``flax.training.train_state`` for models kept as a
``(graphdef, params)`` pair: ``apply_gradients`` returns a new state and never
touches the old one, so the whole state passes through ``jax.jit`` as an
argument. Subclasses add fields by annotating them::

    class TrainState(nnx.TrainState):
      batch_stats: nnx.State

    state = TrainState.create(graphdef, params=params, tx=tx, batch_stats=stats)
    y, (graphdef, new_state) = state.apply('params', 'batch_stats')(x)

This module also re-exports the containers NNX keeps in ``nnx.helpers``
(``Sequential``, ``List``, ``Dict``).
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp
import optax

from arbax.graph import GraphDef
from arbax.module import Module, Sequential
from arbax.pytree import Dict, List
from arbax.state import State

__all__ = ['TrainState', 'Sequential', 'List', 'Dict']

M = tp.TypeVar('M', bound=Module)
TS = tp.TypeVar('TS', bound='TrainState')

_STATIC = 'arbax_static'  # field metadata key: the field is part of the treedef, not a leaf


C = tp.TypeVar('C', bound=type)


# dataclass_transform: type checkers see the fields and the generated __init__.
@tp.dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def _as_pytree_dataclass(cls: C) -> C:
  """Make ``cls`` a frozen dataclass registered as a JAX pytree (static fields in the treedef)."""
  dataclasses.dataclass(frozen=True)(cls)
  fields = dataclasses.fields(cls)
  data = [f.name for f in fields if not f.metadata.get(_STATIC, False)]
  meta = [f.name for f in fields if f.metadata.get(_STATIC, False)]
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  return cls


@_as_pytree_dataclass
class TrainState(tp.Generic[M]):
  """A model's ``graphdef``, its ``params`` (a State), the optimizer ``tx`` and its state, and
  the ``step`` count, as one immutable pytree (``tx`` is static).

  Build it with ``TrainState.create``; ``replace(**fields)`` returns a copy with
  fields changed (dataclass fields are frozen).
  """

  graphdef: GraphDef[M]
  params: State
  opt_state: optax.OptState
  step: jax.Array
  tx: optax.GradientTransformation = dataclasses.field(metadata={_STATIC: True})

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    _as_pytree_dataclass(cls)  # a subclass's annotated fields become fields too

  @classmethod
  def create(cls: type[TS], graphdef: GraphDef[M], *, params: State,
             tx: optax.GradientTransformation, step: int = 0, **kwargs) -> TS:
    """A new state: ``opt_state`` is ``tx.init(params)``.

    Args:
      graphdef: the model's GraphDef (from ``nnx.split``).
      params: the State the optimizer updates.
      tx: the optax optimizer.
      step: the initial step count.
      **kwargs: the fields a subclass adds.
    Returns:
      The TrainState (of ``cls``).
    """
    return cls(graphdef=graphdef, params=params, opt_state=tx.init(params),
               step=jnp.asarray(step), tx=tx, **kwargs)

  def replace(self: TS, **changes) -> TS:
    """A copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)

  def apply(self, state: State | str, *states: State | str):
    """Call the model rebuilt from ``graphdef`` and the given States.

        y, (graphdef, new_state) = train_state.apply('params', 'batch_stats')(x)

    Args:
      state, *states: States, or names of fields of this TrainState that hold States.
    Returns:
      A function of the call's arguments returning ``(output, (graphdef, state))``,
      the state after the call (e.g. updated batch statistics).
    """
    resolved = []
    for s in (state, *states):
      if isinstance(s, str):
        value = getattr(self, s)
        if not isinstance(value, State):
          raise TypeError(f'Expected {type(self).__name__}.{s} to be a State, got '
                          f'{type(value)}: apply takes States or the names of State fields.')
        s = value
      resolved.append(s)
    return self.graphdef.apply(*resolved)

  def apply_gradients(self: TS, grads: State, **kwargs) -> TS:
    """One optimizer step: a new TrainState with updated ``params`` and ``opt_state`` and
    ``step + 1`` (plus any ``kwargs`` fields replaced); this one is unchanged."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(params=params, opt_state=opt_state, step=self.step + 1, **kwargs)

