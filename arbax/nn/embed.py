"""Embed: a learned lookup table from integer ids to vectors, and its transpose ``attend``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> embed = nnx.Embed(num_embeddings=10, features=4, rngs=nnx.Rngs(0))
    >>> embed.embedding.shape
    (10, 4)
    >>> embed(jnp.array([[1, 2, 3]])).shape        # one row per id
    (1, 3, 4)
    >>> embed.attend(jnp.ones((2, 4))).shape       # a score per vocabulary entry (tied output layer)
    (2, 10)

Ids outside ``[0, num_embeddings)`` give NaN rows, as ``jnp.take`` fills them,
except with a single embedding, whose row is broadcast to every id.
With ``out_sharding=`` the lookup runs under ``jax.sharding.auto_axes``, so
ids and table may be sharded over different explicit mesh axes.
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


def _take_rows(embedding: jax.Array, ids: jax.Array) -> jax.Array:
  return jnp.take(embedding, ids, axis=0)


class Embed(Module):
  """An ``embedding`` Param of shape ``(num_embeddings, features)``.

  Args:
    num_embeddings: vocabulary size, the number of rows.
    features: size of each embedding vector.
    dtype: dtype of the looked-up vectors and of ``attend``'s scores (default:
      the embedding's dtype).
    param_dtype: dtype the ``embedding`` Param is stored in.
    embedding_init: initializer for the table, called ``init(key, shape, param_dtype)``.
    promote_dtype: ``fn(arrays, dtype=dtype, inexact=...) -> arrays``.
    rngs: where the initialisation key comes from (the ``params`` stream).
    embedding_metadata: extra metadata for the Param (e.g. sharding names).
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype=None,
               param_dtype=jnp.float32, embedding_init=default_embed_init,
               promote_dtype=_promote_dtype, rngs,
               embedding_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.embedding = Param(initializers.initial_value(embedding_init, rngs.params(),
                                                       (num_embeddings, features), param_dtype),
                           **embedding_metadata)
    self.num_embeddings = num_embeddings
    self.features = features
    self.dtype = dtype if dtype is not None else self.embedding.dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError('Input type must be an integer or unsigned integer; '
                       f'Embed got {inputs.dtype}. Pass token ids, e.g. x.astype(jnp.int32).')
    (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    if self.num_embeddings == 1:
      return jnp.broadcast_to(embedding, inputs.shape + (self.features,))
    if out_sharding is None:
      return jnp.take(embedding, inputs, axis=0)
    # A gather cannot infer its output sharding when ids and table are sharded over
    # different axes; auto_axes lets the compiler place it, then lays out the result.
    # auto_axes is unannotated in JAX: pyright takes its result for the decorator form too.
    take = jax.sharding.auto_axes(_take_rows, out_sharding=out_sharding)
    return take(embedding, inputs)  # pyright: ignore[reportCallIssue]

  def attend(self, query: jax.Array, out_sharding=None) -> jax.Array:
    """``query @ embedding.T``: the similarity of each query vector to every embedding."""
    query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
    kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
    return jnp.dot(query, embedding.T, **kwargs)


__all__ = ['Embed']
