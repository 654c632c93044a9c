"""Dropout: zero a random fraction ``rate`` of the inputs in training, rescaling the rest.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> drop = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    >>> y = drop(jnp.ones((2, 4)))
    >>> sorted(set(y.ravel().tolist()))          # kept entries are scaled by 1 / (1 - rate)
    [0.0, 2.0]
    >>> drop.eval()                               # deterministic: the identity
    >>> drop(jnp.ones(3)).tolist()
    [1.0, 1.0, 1.0]

Keys come from the ``dropout`` stream (``rng_collection``) of the Rngs given
at construction, which Dropout forks into a stream of its own, or from a
``rngs=`` Rngs, RngStream or raw key passed to the call. An input sharded over
explicit mesh axes gets a mask with the same sharding (see examples/sharded_layers.py).
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from arbax.module import Module
from arbax.rngs import Rngs, RngStream


def _sharding_of(x) -> NamedSharding | None:
  """``x``'s explicit sharding (over explicit mesh axes), or ``None`` when it has none."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if isinstance(sharding, NamedSharding) and any(s is not None for s in sharding.spec):
    return sharding
  return None


def _stream(rngs: Rngs, name: str) -> RngStream:
  # The named stream, else the default one; KeyError naming the streams when neither exists.
  return rngs[name]


class Dropout(Module):
  """Randomly zero inputs with probability ``rate``; the identity when ``deterministic``.

  Args:
    rate: probability of dropping each element.
    broadcast_dims: axes along which the same mask is shared (e.g. ``(1,)``
      drops whole time steps of a ``(batch, time, features)`` input).
    deterministic: ``True`` disables dropout (``model.eval()`` sets it); ``None``
      requires it to be given per call.
    rng_collection: the Rngs stream keys are drawn from.
    rngs: an Rngs or RngStream to fork a private stream from, or ``None`` to
      pass ``rngs=`` on every call.
  """

  def __init__(self, rate: float, *, broadcast_dims: tp.Sequence[int] = (),
               deterministic: bool | None = False, rng_collection: str = 'dropout',
               rngs: Rngs | RngStream | None = None):
    self.rate = rate
    self.broadcast_dims = tuple(broadcast_dims)
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    if isinstance(rngs, Rngs):
      self.rngs = _stream(rngs, rng_collection).fork()
    elif isinstance(rngs, RngStream):
      self.rngs = rngs.fork()
    elif rngs is None:
      self.rngs = None
    else:
      raise TypeError(f'rngs must be a Rngs, RngStream or None, but got {type(rngs)}.')

  def _key(self, rngs) -> jax.Array:
    if rngs is None:
      rngs = self.rngs
    if rngs is None:
      raise ValueError('`deterministic` is False, but no `rngs` argument was provided to '
                       'Dropout. Pass rngs=nnx.Rngs(dropout=seed) to the constructor or the '
                       'call, or set deterministic=True.')
    if isinstance(rngs, Rngs):
      return _stream(rngs, self.rng_collection)()
    if isinstance(rngs, RngStream):
      return rngs()
    if isinstance(rngs, jax.Array):
      return rngs
    raise TypeError(f'rngs must be a Rngs, RngStream or jax.Array, but got {type(rngs)}.')

  def __call__(self, inputs, *, deterministic: bool | None = None,
               rngs: Rngs | RngStream | jax.Array | None = None) -> jax.Array:
    deterministic = deterministic if deterministic is not None else self.deterministic
    if deterministic is None:
      raise ValueError('No `deterministic` argument was provided to Dropout. Pass it to the '
                       'constructor (nnx.Dropout(..., deterministic=True/False)), to the call '
                       '(dropout(x, deterministic=True/False)), or use model.train() / '
                       'model.eval().')
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    key = self._key(rngs)
    keep_prob = 1.0 - self.rate
    broadcast_axes = self._broadcast_axes(inputs.ndim)
    # Broadcast axes get size 1 in the mask, so one draw covers the whole axis.
    shape = tuple(1 if i in broadcast_axes else d for i, d in enumerate(inputs.shape))
    sharding = _sharding_of(inputs)
    if sharding is None:
      keep = jnp.broadcast_to(jax.random.bernoulli(key, keep_prob, shape), inputs.shape)
    else:
      # Under explicit sharding the mask must be laid out like the input for the select.
      spec = tuple(sharding.spec) + (None,) * (inputs.ndim - len(sharding.spec))
      mask_spec = P(*(None if i in broadcast_axes else s for i, s in enumerate(spec)))
      keep = jax.random.bernoulli(key, keep_prob, shape,
                                  out_sharding=sharding.update(spec=mask_spec))
      keep = jnp.broadcast_to(keep, inputs.shape, out_sharding=sharding)
    scaled = inputs / keep_prob
    return lax.select(keep, scaled, jnp.zeros_like(scaled))

  def _broadcast_axes(self, ndim: int) -> set[int]:
    return {d % ndim for d in self.broadcast_dims}

  def set_view(self, deterministic: bool | None = None) -> None:
    """What ``nnx.view`` switches on Dropout.

    Args:
      deterministic: if True, Dropout is the identity; if False, it masks.
    """
    if deterministic is not None:
      self.deterministic = deterministic


__all__ = ['Dropout']
