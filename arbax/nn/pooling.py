"""Pooling: reduce each window of the spatial axes to one value (``max_pool``, ``avg_pool``, ...).

    >>> import jax.numpy as jnp, arbax as nnx
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)          # (batch, height, width, features)
    >>> nnx.max_pool(x, (2, 2), strides=(2, 2))[0, :, :, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
    >>> nnx.avg_pool(x, (2, 2), strides=(2, 2)).shape
    (1, 2, 2, 1)

Inputs are ``(*batch, *spatial, features)``: the window slides over the axes
between the batch axes and the last one, never mixing features or examples.
``padding`` is ``'SAME'``, ``'VALID'`` or one ``(low, high)`` pair per window axis.
These are plain functions, not Modules: pooling has no parameters.
"""
from __future__ import annotations

import math
import typing as tp

import jax.numpy as jnp
from jax import lax
import numpy as np


def _check_args(inputs, window_shape, strides, padding):
  if not isinstance(window_shape, tp.Sequence):
    raise TypeError(f'window_shape must be a tuple with one size per spatial axis, got '
                    f'{window_shape!r}; e.g. window_shape=({window_shape}, {window_shape}).')
  n = len(window_shape)
  strides = (1,) * n if strides is None else tuple(strides)
  if len(strides) != n:
    raise AssertionError(f'len({tuple(window_shape)}) must equal len({strides}): give one '
                         'stride per window axis.')
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
    if len(padding) != n:
      raise AssertionError(f'padding {padding} must specify pads for same number of dims as '
                           f'window_shape {tuple(window_shape)}.')
  if inputs.ndim < n + 1:
    raise ValueError(f'inputs of shape {inputs.shape} have too few axes for a {n}D window; '
                     f'expected (*batch, {n} spatial axes, features).')
  return tuple(window_shape), strides, padding


def pool(inputs, init, reduce_fn, window_shape, strides, padding):
  """Reduce every window with ``reduce_fn`` (a ``lax`` binary op) starting from ``init``.

  ``strides=None`` means 1 on every axis.
  """
  window_shape, strides, padding = _check_args(inputs, window_shape, strides, padding)
  n = len(window_shape)
  batch_shape = inputs.shape[:inputs.ndim - n - 1]
  x = jnp.reshape(inputs, (-1,) + inputs.shape[len(batch_shape):])
  # Batch and feature axes get a window of 1 and no padding: they are never mixed.
  dims = (1,) + window_shape + (1,)
  steps = (1,) + strides + (1,)
  if not isinstance(padding, str):
    padding = ((0, 0),) + padding + ((0, 0),)
  y = lax.reduce_window(x, init, reduce_fn, dims, steps, padding)
  return jnp.reshape(y, batch_shape + y.shape[1:])


def _lowest(dtype):
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).min
  if jnp.issubdtype(dtype, jnp.bool_):
    return False
  return -jnp.inf


def _highest(dtype):
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).max
  if jnp.issubdtype(dtype, jnp.bool_):
    return True
  return jnp.inf


def max_pool(inputs, window_shape, strides=None, padding='VALID'):
  """The largest value in each window (padding never wins)."""
  return pool(inputs, np.array(_lowest(inputs.dtype), inputs.dtype), lax.max, window_shape,
              strides, padding)


def min_pool(inputs, window_shape, strides=None, padding='VALID'):
  """The smallest value in each window (padding never wins)."""
  return pool(inputs, np.array(_highest(inputs.dtype), inputs.dtype), lax.min, window_shape,
              strides, padding)


def avg_pool(inputs, window_shape, strides=None, padding='VALID',
             count_include_pad: bool = True):
  """The mean of each window.

  With ``count_include_pad=False`` a window overlapping the padding averages
  only its real elements; by default padded zeros count towards the mean.
  """
  total = pool(inputs, np.array(0, inputs.dtype), lax.add, window_shape, strides, padding)
  if count_include_pad:
    return total / math.prod(window_shape)
  ones = jnp.ones(inputs.shape[-len(window_shape) - 1:-1] + (1,), inputs.dtype)
  counts = pool(ones, np.array(0, inputs.dtype), lax.add, window_shape, strides, padding)
  return total / counts


__all__ = ['pool', 'max_pool', 'min_pool', 'avg_pool']
