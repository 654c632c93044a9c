"""Embed: a learned lookup table from integer ids to vectors, and its transpose ``attend``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> embed = nnx.Embed(num_embeddings=10, features=4, rngs=nnx.Rngs(0))
    >>> embed.embedding.shape
    (10, 4)
    >>> embed(jnp.array([[1, 2, 3]])).shape        # one row per id
    (1, 3, 4)
    >>> embed.attend(jnp.ones((2, 4))).shape       # a score per vocabulary entry (tied output layer)
    (2, 10)

Ids outside ``[0, num_embeddings)`` give NaN rows, as ``jnp.take`` fills them.
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp

from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as _promote_dtype
from arbax.variables import Param

default_embed_init = initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)

_EMPTY: tp.Mapping[str, tp.Any] = {}


class Embed(Module):
  """An ``embedding`` Param of shape ``(num_embeddings, features)``.

  ``dtype`` (default: ``param_dtype``) is the dtype of the looked-up vectors
  and of ``attend``'s scores.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype=None,
               param_dtype=jnp.float32, embedding_init=default_embed_init,
               promote_dtype=_promote_dtype, rngs,
               embedding_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.embedding = Param(embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
                           **embedding_metadata)
    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = dtype if dtype is not None else param_dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError('Input type must be an integer or unsigned integer; '
                       f'Embed got {inputs.dtype}. Pass token ids, e.g. x.astype(jnp.int32).')
    (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    y = jnp.take(embedding, inputs, axis=0)
    return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    """``query @ embedding.T``: the similarity of each query vector to every embedding."""
    query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
    kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
    return jnp.dot(query, embedding.T, **kwargs)


__all__ = ['Embed']
