"""Convolutions: ``Conv`` and ``ConvTranspose`` over 1, 2 or 3 spatial axes, channels last.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=nnx.Rngs(0))
    >>> conv.kernel.shape                      # (*kernel_size, in_features, out_features)
    (3, 3, 3, 8)
    >>> conv(jnp.ones((2, 5, 5, 3))).shape     # (batch, *spatial, features); SAME padding
    (2, 5, 5, 8)

Inputs are ``(*batch, *spatial, features)`` with any number of batch axes
(none included). ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``
(wrap around), ``'REFLECT'``, ``'CAUSAL'`` (1D: output ``t`` sees inputs
``<= t``), an int, or one int / ``(low, high)`` pair per spatial axis.
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from jax import lax

from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as _promote_dtype
from arbax.variables import Param

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

_EMPTY: tp.Mapping[str, tp.Any] = {}
_WRAPPING = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}


def _per_axis(x, n: int) -> tuple[int, ...]:
  """An int (or None, meaning 1) repeated per spatial axis, or a sequence of n ints."""
  if x is None:
    return (1,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def _canonical_padding(padding, n: int):
  """A padding string, or one ``(low, high)`` pair per spatial axis."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * n
  if isinstance(padding, tp.Sequence) and len(padding) == n:
    pairs = []
    for p in padding:
      if isinstance(p, int):
        pairs.append((p, p))
      elif isinstance(p, tp.Sequence) and len(p) == 2:
        pairs.append(tuple(p))
      else:
        break
    else:
      return pairs
  raise ValueError(f'Invalid padding format: {padding}, should be str, int, or a sequence of '
                   f'len {n} where each element is an int or pair of ints.')


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  # Channels last for inputs/outputs (N, *spatial, C) and kernels (*spatial, I, O).
  spatial = tuple(range(1, ndim - 1))
  io = (0, ndim - 1) + spatial
  kernel = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return lax.ConvDimensionNumbers(io, kernel, io)


def _to_one_batch_axis(inputs, n_spatial: int, name: str):
  """Reshape ``(*batch, *spatial, C)`` to ``(B, *spatial, C)``; returns it and the batch shape."""
  n_batch = inputs.ndim - n_spatial - 1
  if n_batch < 0:
    raise ValueError(f'{name}: inputs of shape {inputs.shape} have too few axes for a '
                     f'{n_spatial}D kernel; expected (*batch, {n_spatial} spatial axes, features).')
  batch_shape = inputs.shape[:n_batch]
  return jnp.reshape(inputs, (-1,) + inputs.shape[n_batch:]), batch_shape


def _check_mask(mask, kernel):
  if mask is not None and mask.shape != kernel.shape:
    raise ValueError('Mask needs to have the same shape as weights. '
                     f'Shapes are: {mask.shape}, {kernel.shape}')


def _dilated(kernel_size, dilation):
  return tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))


class Conv(Module):
  """A convolution ``y = conv(x, kernel) + bias``, channels last.

  Args:
    in_features, out_features: input and output channels.
    kernel_size: an int (one spatial axis) or one size per spatial axis.
    strides: an int or one per spatial axis (``None``: 1).
    padding: see the module docstring.
    input_dilation, kernel_dilation: dilation of the input (a transposed-conv
      style stride) and of the kernel (atrous convolution).
    feature_group_count: split channels into this many groups convolved
      separately (``in_features`` for a depthwise convolution).
    mask: an array of the kernel's shape multiplied into the kernel.
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
    promote_dtype, preferred_element_type, rngs, kernel_metadata, bias_metadata:
      as in ``nnx.Linear``.
    conv_general_dilated: the convolution primitive (``jax.lax.conv_general_dilated``).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size,
               strides=1, *, padding='SAME', input_dilation=1, kernel_dilation=1,
               feature_group_count: int = 1, use_bias: bool = True, mask=None, dtype=None,
               param_dtype=jnp.float32, precision=None, kernel_init=default_kernel_init,
               bias_init=default_bias_init, conv_general_dilated=lax.conv_general_dilated,
               promote_dtype=_promote_dtype, preferred_element_type=None, rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.kernel_shape = kernel_size + (in_features // feature_group_count, out_features)
    self.kernel = Param(initializers.initial_value(kernel_init, rngs.params(), self.kernel_shape,
                                                    param_dtype),
                        **kernel_metadata)
    self.bias = (Param(initializers.initial_value(bias_init, rngs.params(), (out_features,),
                                                  param_dtype), **bias_metadata)
                 if use_bias else None)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = strides
    self.padding = padding
    self.input_dilation = input_dilation
    self.kernel_dilation = kernel_dilation
    self.feature_group_count = feature_group_count
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.conv_general_dilated = conv_general_dilated
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    n = len(self.kernel_size)
    inputs, batch_shape = _to_one_batch_axis(inputs, n, 'Conv')
    strides = _per_axis(self.strides, n)
    input_dilation = _per_axis(self.input_dilation, n)
    kernel_dilation = _per_axis(self.kernel_dilation, n)
    padding = _canonical_padding(self.padding, n)
    if isinstance(padding, str) and padding == 'CAUSAL':
      if n != 1:
        raise ValueError('Causal padding is only implemented for 1D convolutions '
                         f'(this Conv has kernel_size={self.kernel_size}).')
      size = _dilated(self.kernel_size, kernel_dilation)[0]
      inputs = jnp.pad(inputs, [(0, 0), (size - 1, 0), (0, 0)])
      padding = 'VALID'
    elif isinstance(padding, str) and padding in _WRAPPING:
      # Pad as SAME would, but with wrapped / mirrored values, then convolve VALID.
      sizes = _dilated(self.kernel_size, kernel_dilation)
      pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in sizes] + [(0, 0)]
      inputs = jnp.pad(inputs, pads, mode=_WRAPPING[padding])
      padding = 'VALID'
    kernel = self.kernel[...]
    _check_mask(self.mask, kernel)
    if self.mask is not None:
      kernel = kernel * self.mask
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kwargs = dict(lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
                  dimension_numbers=_dimension_numbers(inputs.ndim),
                  feature_group_count=self.feature_group_count, precision=self.precision,
                  preferred_element_type=self.preferred_element_type)
    if out_sharding is not None:
      kwargs['out_sharding'] = out_sharding
    y = self.conv_general_dilated(inputs, kernel, strides, padding, **kwargs)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return jnp.reshape(y, batch_shape + y.shape[1:])


def _fold_circular(y, sizes, flipped: bool):
  """Wrap a VALID transposed conv around each spatial axis onto ``sizes`` (sum overlapping ends)."""
  for axis, size in enumerate(sizes, start=1):
    length = y.shape[axis]
    # Centre the periodic window: output 0 is index (length - size) // 2 of the full result,
    # rounded the other way when the kernel is flipped (transpose_kernel) so it stays mirrored.
    offset = (length - size + flipped) // 2
    left = (-offset) % size
    total = -(-(left + length) // size) * size
    pads = [(0, 0)] * y.ndim
    pads[axis] = (left, total - left - length)
    y = jnp.pad(y, pads)
    y = jnp.reshape(y, y.shape[:axis] + (total // size, size) + y.shape[axis + 1:])
    y = jnp.sum(y, axis=axis)
  return y


class ConvTranspose(Module):
  """A transposed convolution (the gradient of ``Conv`` with respect to its input), channels last.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> up = nnx.ConvTranspose(3, 4, (3,), strides=2, rngs=nnx.Rngs(0))
      >>> up(jnp.ones((1, 5, 3))).shape           # SAME: spatial size * stride
      (1, 10, 4)

  The kernel is ``(*kernel_size, in_features, out_features)`` (or
  ``(*kernel_size, out_features, in_features)`` with ``transpose_kernel=True``,
  the layout of the ``Conv`` whose gradient this is). ``'CIRCULAR'`` padding
  wraps the full result around so the output is ``spatial * stride``.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, strides=None, *,
               padding='SAME', kernel_dilation=None, use_bias: bool = True, mask=None,
               dtype=None, param_dtype=jnp.float32, precision=None,
               kernel_init=default_kernel_init, bias_init=default_bias_init,
               transpose_kernel: bool = False, promote_dtype=_promote_dtype,
               preferred_element_type=None, rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    channels = (out_features, in_features) if transpose_kernel else (in_features, out_features)
    # Attributes in NNX's order (the repr lists them so): configuration, then the Params.
    self.kernel_size = kernel_size
    self.in_features = in_features
    self.out_features = out_features
    self.strides = strides
    self.padding = padding
    self.kernel_dilation = kernel_dilation
    self.use_bias = use_bias
    self.mask = mask
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.transpose_kernel = transpose_kernel
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.kernel_shape = kernel_size + channels
    self.kernel = Param(initializers.initial_value(kernel_init, rngs.params(), self.kernel_shape,
                                                    param_dtype),
                        **kernel_metadata)
    self.bias = (Param(initializers.initial_value(bias_init, rngs.params(), (out_features,),
                                                  param_dtype), **bias_metadata)
                 if use_bias else None)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    n = len(self.kernel_size)
    inputs, batch_shape = _to_one_batch_axis(inputs, n, 'ConvTranspose')
    strides = _per_axis(self.strides, n)
    kernel_dilation = _per_axis(self.kernel_dilation, n)
    padding = _canonical_padding(self.padding, n)
    if isinstance(padding, str) and padding not in ('SAME', 'VALID', 'CIRCULAR'):
      # RuntimeError, as NNX (which passes the string on to lax) raises.
      raise RuntimeError(f'ConvTranspose: unrecognized padding {padding!r}; expected \'SAME\', '
                         "'VALID', 'CIRCULAR', an int or (low, high) pairs.")
    kernel = self.kernel[...]
    _check_mask(self.mask, kernel)
    if self.mask is not None:
      kernel = kernel * self.mask
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    y = lax.conv_transpose(inputs, kernel, strides,
                           'VALID' if padding == 'CIRCULAR' else padding,
                           rhs_dilation=kernel_dilation,
                           dimension_numbers=_dimension_numbers(inputs.ndim),
                           transpose_kernel=self.transpose_kernel, precision=self.precision,
                           preferred_element_type=self.preferred_element_type)
    if padding == 'CIRCULAR':
      sizes = tuple(s * st for s, st in zip(inputs.shape[1:-1], strides))
      y = _fold_circular(y, sizes, self.transpose_kernel)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return jnp.reshape(y, batch_shape + y.shape[1:])


__all__ = ['Conv', 'ConvTranspose']
