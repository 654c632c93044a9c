"""LoRA: a trainable low-rank update ``x @ lora_a @ lora_b`` added to a (frozen) layer.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> layer = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
    >>> layer.lora.lora_a.shape, layer.lora.lora_b.shape
    ((3, 2), (2, 4))
    >>> layer(jnp.ones((1, 3))).shape        # Linear(x) + x @ a @ b; b starts at zero
    (1, 4)
    >>> list(nnx.state(layer, nnx.LoRAParam)['lora'])   # train only these
    ['lora_a', 'lora_b']

``LoRAParam`` is a ``Param`` subclass, so ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` fine-tunes the adapters alone while the filter
``nnx.Param`` still sees every parameter.
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp

from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as _promote_dtype
from arbax.nn.linear import Linear
from arbax.variables import Param, Variable

default_a_initializer = initializers.he_uniform()
default_b_initializer = initializers.zeros

_EMPTY: tp.Mapping[str, tp.Any] = {}


class LoRAParam(Param):
  """The kind of LoRA's ``lora_a`` / ``lora_b``: a Param that filters can single out."""


class LoRA(Module):
  """The low-rank update ``x @ lora_a @ lora_b`` (plus ``base_module(x)`` when given).

  Args:
    in_features, lora_rank, out_features: ``lora_a`` is ``(in, rank)``, ``lora_b`` ``(rank, out)``.
    base_module: a layer (or any callable) whose output the update is added to;
      call keyword arguments are passed on to it.
    dtype, param_dtype, promote_dtype: as in ``nnx.Linear``.
    a_initializer, b_initializer: ``lora_b`` starts at zero so the update starts at zero.
    lora_param_type: the Variable kind of the two matrices.
    a_metadata, b_metadata: extra metadata for them.
  """

  def __init__(self, in_features: int, lora_rank: int, out_features: int, *,
               base_module: tp.Callable | None = None, dtype=None, param_dtype=jnp.float32,
               a_initializer=default_a_initializer, b_initializer=default_b_initializer,
               lora_param_type: type[Variable] = LoRAParam, promote_dtype=_promote_dtype, rngs,
               a_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               b_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.lora_param_type = lora_param_type
    self.base_module = base_module
    self.promote_dtype = promote_dtype
    self.lora_a = lora_param_type(
        initializers.initial_value(a_initializer, rngs.params(), (in_features, lora_rank),
                                   param_dtype), **a_metadata)
    self.lora_b = lora_param_type(
        initializers.initial_value(b_initializer, rngs.params(), (lora_rank, out_features),
                                   param_dtype), **b_metadata)

  def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
    xc, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    out = xc @ a @ b
    if self.base_module is not None:
      if not callable(self.base_module):
        raise ValueError(f'`self.base_module` must be callable, got '
                         f'{type(self.base_module).__name__}.')
      out = out + self.base_module(x, **kwargs)
    return out


class LoRALinear(Linear):
  """An ``nnx.Linear`` with a ``lora`` adapter: ``Linear(x) + x @ lora_a @ lora_b``.

  Keyword arguments other than the ``lora_*`` / ``a_*`` / ``b_*`` ones go to ``nnx.Linear``.
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int,
               lora_dtype=None, lora_param_dtype=jnp.float32,
               a_initializer=default_a_initializer, b_initializer=default_b_initializer,
               lora_param_type: type[Variable] = LoRAParam, lora_promote_dtype=_promote_dtype,
               rngs, a_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               b_metadata: tp.Mapping[str, tp.Any] = _EMPTY, **kwargs):
    super().__init__(in_features, out_features, rngs=rngs, **kwargs)
    self.lora = LoRA(in_features, lora_rank, out_features, dtype=lora_dtype,
                     param_dtype=lora_param_dtype, a_initializer=a_initializer,
                     b_initializer=b_initializer, lora_param_type=lora_param_type,
                     promote_dtype=lora_promote_dtype, rngs=rngs, a_metadata=a_metadata,
                     b_metadata=b_metadata)

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    return super().__call__(x, out_sharding=out_sharding) + self.lora(x)


__all__ = ['LoRA', 'LoRALinear', 'LoRAParam']
