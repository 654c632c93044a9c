"""Attention: scaled dot-product attention, masks, and ``MultiHeadAttention``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> layer = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 5, 8))                        # [batch, length, features]
    >>> layer(x, mask=nnx.make_causal_mask(x[..., 0])).shape
    (1, 5, 8)

Arrays follow NNX's layout: queries, keys and values are ``[batch..., length,
heads, depth]``, attention weights and masks ``[batch..., heads, q_length,
kv_length]``. A mask keeps the positions where it is non-zero.

For autoregressive decoding, build the layer with ``decode=True``, call
``init_cache((batch, max_length, features))`` and feed one token at a time; the
keys and values seen so far live in ``Cache`` Variables (``cached_key``,
``cached_value``, ``cache_index``).
"""
from __future__ import annotations

import types
import typing as tp

import jax
import jax.numpy as jnp
from jax import lax

from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as default_promote_dtype
from arbax.nn.linear import LinearGeneral
from arbax.nn.normalization import LayerNorm
from arbax.pytree import data
from arbax.rngs import Rngs
from arbax.variables import Cache, Intermediate

Array = jax.Array

default_kernel_init = initializers.lecun_normal()
_NO_METADATA = types.MappingProxyType({})


# -- validation ---------------------------------------------------------------
def _check_qkv(names: str, *arrays) -> None:
  ranks = [a.ndim for a in arrays]
  if len(set(ranks)) != 1:
    raise ValueError(f'{names} must have the same rank, got ranks {tuple(ranks)}. '
                     'Each is [batch..., length, heads, depth].')
  if ranks[0] < 3:
    raise ValueError(f'{names} must be at least 3-D ([length, heads, depth]), got rank {ranks[0]}.')
  if len({a.shape[:-3] for a in arrays}) != 1:
    shapes = ', '.join(str(a.shape) for a in arrays)
    raise ValueError(f'{names} batch dims must match, but got shapes {shapes}.')


def _check_heads(q_heads: int, kv_heads: int) -> int:
  # Grouped-query attention: each key/value head serves q_heads // kv_heads query heads.
  if q_heads % kv_heads:
    raise ValueError(f'Query heads ({q_heads}) must be a multiple of key/value heads '
                     f'({kv_heads}) for grouped-query attention.')
  return q_heads // kv_heads


# -- masks --------------------------------------------------------------------
def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: tp.Callable[..., tp.Any] = jnp.multiply,
                        extra_batch_dims: int = 0, dtype=jnp.float32) -> Array:
  """``[batch..., 1, q_len, kv_len]`` mask from ``pairwise_fn(query_input[..., q], key_input[..., k])``.

  With the default ``multiply``, padding tokens (0) in either input mask their pairs.
  """
  mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
  mask = jnp.expand_dims(mask, -3)  # the heads axis, broadcast over every head
  mask = mask.reshape((1,) * extra_batch_dims + mask.shape)
  return mask.astype(dtype)


def make_causal_mask(x: Array, extra_batch_dims: int = 0, dtype=jnp.float32) -> Array:
  """``[batch..., 1, len, len]`` mask letting position ``i`` attend to positions ``<= i`` of ``x``."""
  positions = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(positions, positions, jnp.greater_equal,
                             extra_batch_dims=extra_batch_dims, dtype=dtype)


def combine_masks(*masks: Array | None, dtype=jnp.float32) -> Array | None:
  """Logical AND of the given masks (``None`` entries are skipped); ``None`` if there are none."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  ranks = tuple(m.ndim for m in present)
  if len(set(ranks)) != 1:
    raise ValueError(f'masks must have the same rank, got ranks {ranks}.')
  combined = present[0]
  for m in present[1:]:
    combined = jnp.logical_and(combined, m)
  return combined.astype(dtype)


def _with_causal(mask: Array | None, is_causal: bool, q_len: int, kv_len: int):
  if not is_causal:
    return mask
  causal = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))
  return causal if mask is None else jnp.logical_and(mask, causal)


# -- the explicit computation -------------------------------------------------
def _logits(query: Array, key: Array, precision) -> Array:
  """``q.k / sqrt(depth)`` as ``[batch..., q_heads, q_len, kv_len]``, grouping query heads over kv heads."""
  *batch, q_len, q_heads, depth = query.shape
  kv_heads = key.shape[-2]
  groups = _check_heads(q_heads, kv_heads)
  query = query / jnp.sqrt(depth).astype(query.dtype)
  grouped = query.reshape(*batch, q_len, kv_heads, groups, depth)
  logits = jnp.einsum('...qhgd,...khd->...hgqk', grouped, key, precision=precision)
  return logits.reshape(*batch, q_heads, q_len, key.shape[-3])


def _weighted_values(weights: Array, value: Array, precision) -> Array:
  """``sum_k weights[..., h, q, k] * value[..., k, h // groups, :]`` as ``[batch..., q_len, q_heads, depth]``."""
  *batch, q_heads, q_len, kv_len = weights.shape
  kv_heads = value.shape[-2]
  groups = _check_heads(q_heads, kv_heads)
  grouped = weights.reshape(*batch, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum('...hgqk,...khd->...qhgd', grouped, value, precision=precision)
  return out.reshape(*batch, q_len, q_heads, value.shape[-1])


def _dropout(weights: Array, rng, rate: float, broadcast: bool) -> Array:
  if rng is None:
    raise ValueError(f'Attention dropout (dropout_rate={rate}) needs a key: pass dropout_rng=, '
                     'or deterministic=True to turn dropout off.')
  keep_prob = 1.0 - rate
  # broadcast_dropout drops the same (q, k) pairs in every batch element and head.
  shape = (1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast else weights.shape
  keep = jax.random.bernoulli(rng, keep_prob, shape)
  return weights * (keep.astype(weights.dtype) / jnp.asarray(keep_prob, weights.dtype))


def dot_product_attention_weights(query: Array, key: Array, bias: Array | None = None,
                                  mask: Array | None = None, broadcast_dropout: bool = True,
                                  dropout_rng: Array | None = None, dropout_rate: float = 0.0,
                                  deterministic: bool = False, dtype=None, precision=None,
                                  module: Module | None = None,
                                  promote_dtype: tp.Callable = default_promote_dtype,
                                  is_causal: bool = False) -> Array:
  """``softmax(q.k / sqrt(depth) + bias)`` (masked) as ``[batch..., heads, q_length, kv_length]``.

  ``module`` given: the weights (before dropout) are sown into its
  ``nnx.Intermediate`` attribute ``attention_weights``.
  """
  query, key = promote_dtype((query, key), dtype=dtype)
  dtype = query.dtype
  _check_qkv('q, k', query, key)
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f'q, k depths must match, got {query.shape[-1]} and {key.shape[-1]}.')
  logits = _logits(query, key, precision)
  if bias is not None:
    logits = logits + bias
  mask = _with_causal(mask, is_causal, query.shape[-3], key.shape[-3])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(dtype).min)
  weights = jax.nn.softmax(logits).astype(dtype)
  if module is not None:
    module.sow(Intermediate, 'attention_weights', weights)
  if not deterministic and dropout_rate > 0.0:
    weights = _dropout(weights, dropout_rng, dropout_rate, broadcast_dropout)
  return weights


# -- the fused path -----------------------------------------------------------
def _as_4d(x: Array | None, batch: tuple) -> Array | None:
  """A mask or bias ``[batch..., heads, q, kv]`` (broadcastable) as ``[prod(batch), heads, q, kv]``."""
  if x is None:
    return None
  rank = len(batch) + 3
  if x.ndim > rank:
    raise ValueError(f'mask/bias of shape {x.shape} has more dimensions than the attention '
                     f'weights [batch..., heads, q_length, kv_length] (rank {rank}).')
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  x = jnp.broadcast_to(x, batch + x.shape[len(batch):])
  return x.reshape((-1,) + x.shape[len(batch):])


def _fused_attention(query, key, value, bias, mask, is_causal):
  """``jax.nn.dot_product_attention`` (fused kernels on GPU) for any number of batch dims."""
  batch = query.shape[:-3]
  flat = [x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value)]
  mask = _as_4d(mask, batch)
  out = jax.nn.dot_product_attention(*flat, bias=_as_4d(bias, batch),
                                     mask=None if mask is None else mask.astype(bool),
                                     is_causal=is_causal)
  return out.reshape(batch + out.shape[1:])


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                          mask: Array | None = None, broadcast_dropout: bool = True,
                          dropout_rng: Array | None = None, dropout_rate: float = 0.0,
                          deterministic: bool = False, dtype=None, precision=None,
                          module: Module | None = None,
                          promote_dtype: tp.Callable = default_promote_dtype,
                          is_causal: bool = False) -> Array:
  """Attention output ``[batch..., q_length, heads, v_depth]``: the weights applied to ``value``.

  Without active dropout, sown weights, an explicit ``precision`` or a value
  depth unlike the query depth, this is ``jax.nn.dot_product_attention``
  (fused kernels where the backend has them); otherwise the weights are
  computed explicitly.
  """
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  _check_qkv('q, k, v', query, key, value)
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f'k, v lengths must match, got {key.shape[-3]} and {value.shape[-3]}.')
  dropout_active = not deterministic and dropout_rate > 0.0
  same_depth = value.shape[-1] == query.shape[-1]  # the fused kernel needs it
  if module is None and not dropout_active and precision is None and same_depth:
    _check_heads(query.shape[-2], key.shape[-2])
    return _fused_attention(query, key, value, bias, mask, is_causal)
  weights = dot_product_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      query.dtype, precision, module, promote_dtype, is_causal)
  return _weighted_values(weights, value, precision)


# -- the layer ----------------------------------------------------------------
def _first_set(*values, what: str):
  for v in values:
    if v is not None:
      return v
  raise ValueError(f'No `{what}` argument was provided to MultiHeadAttention: pass '
                   f'{what}=... to __call__ or to the constructor.')


class MultiHeadAttention(Module):
  """Multi-head dot-product attention with input and output projections.

  ``query``, ``key`` and ``value`` project ``in_features`` to ``(heads,
  head_dim)`` (``nnx.LinearGeneral``); ``out`` projects the heads back to
  ``out_features``. ``num_kv_heads < num_heads`` gives grouped-query
  attention; ``normalize_qk`` adds LayerNorms (``query_ln``, ``key_ln``) on
  the projected queries and keys.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *, dtype=None, param_dtype=jnp.float32,
               broadcast_dropout: bool = True, dropout_rate: float = 0.0,
               deterministic: bool | None = None, precision=None,
               kernel_init=default_kernel_init, out_kernel_init=None,
               bias_init=initializers.zeros_init(), out_bias_init=None, use_bias: bool = True,
               attention_fn: tp.Callable[..., Array] = dot_product_attention,
               decode: bool | None = None, normalize_qk: bool = False,
               qkv_promote_dtype: tp.Callable = default_promote_dtype,
               out_promote_dtype: tp.Callable = default_promote_dtype,
               ln_promote_dtype: tp.Callable = default_promote_dtype,
               qkv_dot_general=None, out_dot_general=None, qkv_dot_general_cls=None,
               out_dot_general_cls=None, rngs, keep_rngs: bool = True,
               kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               out_kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               out_bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               query_ln_scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               key_ln_scale_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = in_features if qkv_features is None else qkv_features
    self.out_features = in_features if out_features is None else out_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads ({self.num_heads}) must be divisible by num_kv_heads '
                       f'({self.num_kv_heads}).')
    if self.qkv_features % self.num_heads:
      raise ValueError(f'qkv_features ({self.qkv_features}) must be divisible by num_heads '
                       f'({self.num_heads}).')
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.precision = precision
    self.use_bias = use_bias
    self.attention_fn = attention_fn
    self.decode = decode
    self.normalize_qk = normalize_qk
    self.qkv_promote_dtype = qkv_promote_dtype
    self.out_promote_dtype = out_promote_dtype
    self.ln_promote_dtype = ln_promote_dtype
    self.qkv_dot_general = qkv_dot_general
    self.out_dot_general = out_dot_general
    self.qkv_dot_general_cls = qkv_dot_general_cls
    self.out_dot_general_cls = out_dot_general_cls
    self.head_dim = self.qkv_features // self.num_heads

    def projection(features, heads):
      return LinearGeneral(features, (heads, self.head_dim), dtype=dtype,
                           param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                           use_bias=use_bias, precision=precision,
                           promote_dtype=qkv_promote_dtype, dot_general=qkv_dot_general,
                           dot_general_cls=qkv_dot_general_cls, rngs=rngs,
                           kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)

    self.query = projection(in_features, self.num_heads)
    self.key = projection(self.in_kv_features, self.num_kv_heads)
    self.value = projection(self.in_kv_features, self.num_kv_heads)
    if normalize_qk:
      # Normalised queries and keys keep the logits bounded (stabler at high learning rates).
      self.query_ln = LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                                rngs=rngs, scale_metadata=query_ln_scale_metadata)
      self.key_ln = LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, promote_dtype=ln_promote_dtype,
                              rngs=rngs, scale_metadata=key_ln_scale_metadata)
    else:
      self.query_ln = data(None)
      self.key_ln = data(None)
    self.out = LinearGeneral((self.num_heads, self.head_dim), self.out_features, axis=(-2, -1),
                             kernel_init=out_kernel_init or kernel_init,
                             bias_init=out_bias_init or bias_init, use_bias=use_bias,
                             dtype=dtype, param_dtype=param_dtype, precision=precision,
                             promote_dtype=out_promote_dtype, dot_general=out_dot_general,
                             dot_general_cls=out_dot_general_cls, rngs=rngs,
                             kernel_metadata=out_kernel_metadata or kernel_metadata,
                             bias_metadata=out_bias_metadata or bias_metadata)
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
    self.cached_key = data(None)
    self.cached_value = data(None)
    self.cache_index = data(None)

  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, mask: Array | None = None,
               deterministic: bool | None = None, rngs=None, sow_weights: bool = False,
               decode: bool | None = None, is_causal: bool = False, out_sharding=None,
               qkv_sharding=None) -> Array:
    """Attend from ``inputs_q`` to ``inputs_k``/``inputs_v`` (both default to ``inputs_q``).

    Inputs are ``[batch..., length, features]``; ``mask`` is
    ``[batch..., heads, q_length, kv_length]`` (broadcastable).
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError('`inputs_k` cannot be None when `inputs_v` is given. To use one array '
                         'for both, pass it as `inputs_k` and leave `inputs_v` as None.')
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f'Incompatible input dimension: inputs_q has {inputs_q.shape[-1]} '
                       f'features but the layer expects in_features={self.in_features}.')
    query = self.query(inputs_q, out_sharding=qkv_sharding)
    key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      assert self.query_ln is not None and self.key_ln is not None  # built with normalize_qk
      query, key = self.query_ln(query), self.key_ln(key)
    if _first_set(decode, self.decode, what='decode'):
      key, value, mask = self._extend_cache(key, value, mask)
    dropout_rng, deterministic = self._dropout_key(deterministic, rngs)
    x = self.attention_fn(query, key, value, mask=mask, dropout_rng=dropout_rng,
                          dropout_rate=self.dropout_rate,
                          broadcast_dropout=self.broadcast_dropout, deterministic=deterministic,
                          dtype=self.dtype, precision=self.precision,
                          module=self if sow_weights else None, is_causal=is_causal)
    return self.out(x, out_sharding=out_sharding)

  def _dropout_key(self, deterministic, rngs):
    if self.dropout_rate <= 0.0:
      return None, True
    deterministic = _first_set(deterministic, self.deterministic, what='deterministic')
    if deterministic:
      return None, True
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, Rngs):
      rngs = rngs.dropout
    if rngs is None:
      raise ValueError("'rngs' must be provided to MultiHeadAttention.__call__ when the layer "
                       'was built with keep_rngs=False and dropout is active.')
    return rngs(), False

  def _extend_cache(self, key, value, mask):
    """Write this step's key/value at ``cache_index`` and attend over the filled prefix."""
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError('Autoregressive cache not initialized: call '
                       '``init_cache(input_shape)`` on the MultiHeadAttention first.')
    *batch, max_length, kv_heads, depth = self.cached_key.shape
    expected = (*batch, 1, kv_heads, depth)
    if key.shape != expected:
      raise ValueError(f'Autoregressive cache shape error: decoding feeds one token at a time, '
                       f'expected key shape {expected} but got {key.shape}.')
    index = self.cache_index[...]
    axis = len(batch)
    key = lax.dynamic_update_slice_in_dim(self.cached_key[...], key.astype(self.cached_key.dtype),
                                          index, axis)
    value = lax.dynamic_update_slice_in_dim(self.cached_value[...],
                                            value.astype(self.cached_value.dtype), index, axis)
    self.cached_key[...] = key
    self.cached_value[...] = value
    self.cache_index[...] = index + 1
    filled = jnp.broadcast_to(jnp.arange(max_length) <= index, (*batch, 1, 1, max_length))
    return key, value, combine_masks(mask, filled)

  def init_cache(self, input_shape: tp.Sequence[int], dtype=jnp.float32) -> None:
    """Zeroed ``Cache`` Variables for decoding inputs of ``input_shape`` = ``(batch..., max_length, features)``."""
    shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
    self.cached_key = Cache(jnp.zeros(shape, dtype))
    self.cached_value = Cache(jnp.zeros(shape, dtype))
    self.cache_index = Cache(jnp.array(0, dtype=jnp.int32))

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | tp.Sequence[int] | None = None,
               max_length: int | None = None) -> None:
    """Switch modes; with ``decode`` plus ``batch_size`` and ``max_length``, also create the cache if missing."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is None:
      return
    self.decode = decode
    if self.cached_key is None and batch_size is not None and max_length is not None:
      batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
      dtype = jnp.float32 if self.dtype is None else self.dtype
      self.init_cache((*batch, max_length, self.in_features), dtype)


# As in NNX, dot_product_attention_weights is reached through this module, not the top level.
__all__ = ['MultiHeadAttention', 'dot_product_attention', 'make_attention_mask',
           'make_causal_mask', 'combine_masks']
