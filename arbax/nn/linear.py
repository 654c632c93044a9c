"""Linear layers: ``Linear``, ``LinearGeneral``, ``Einsum`` and the learnable-slope ``PReLU``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer.bias.shape      # Params named as NNX names them
    ((3, 4), (4,))
    >>> layer(jnp.ones((2, 3))).shape             # y = x @ kernel + bias
    (2, 4)

Parameters are drawn from the ``params`` stream of ``rngs`` (any Rngs falls
back to its ``default`` stream), in the order kernel, then bias, and stored in
``param_dtype``. ``dtype`` is the computation dtype: ``None`` promotes inputs
and parameters together (see ``arbax.nn.dtypes.promote_dtype``).
"""
from __future__ import annotations

import functools
import math
import string
import typing as tp

import jax
import jax.numpy as jnp
from jax import lax

from arbax import caches
from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as _promote_dtype
from arbax.variables import Param, Variable

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()

_EMPTY: tp.Mapping[str, tp.Any] = {}


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, tp.Sequence) else (x,)


def _dot_general_call(fn, lhs, rhs, dimension_numbers, *, precision, preferred_element_type,
                      out_sharding):
  # Optional keywords only when set, so a custom dot_general need not accept them.
  kwargs = {}
  if preferred_element_type is not None:
    kwargs['preferred_element_type'] = preferred_element_type
  if out_sharding is not None:
    kwargs['out_sharding'] = out_sharding
  return fn(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def _add_bias(y, bias, shape: tuple[int, ...]):
  """``y + bias`` with ``bias`` laid out as ``shape`` (its axes with size-1 axes between).

  When ``shape`` only adds leading size-1 axes, broadcasting does the same and
  no reshape is dispatched.
  """
  lead = len(shape) - bias.ndim
  if lead < 0 or shape[lead:] != bias.shape or any(d != 1 for d in shape[:lead]):
    bias = jnp.reshape(bias, shape)
  return y + bias


def _init_reshaped(init, key, flat_shape, shape, dtype):
  """``init`` called on ``flat_shape``, its value reshaped to ``shape``.

  An initializer wrapped by ``nnx.with_partitioning`` returns a Variable
  carrying metadata; the metadata is kept and only the value is reshaped.
  """
  value = initializers.initial_value(init, key, flat_shape, dtype)
  if flat_shape == shape:
    return value
  if isinstance(value, Variable):
    return value.replace(jnp.reshape(value.get_value(), shape))
  return jnp.reshape(value, shape)


class Linear(Module):
  """``y = x @ kernel + bias`` over the last axis of ``x``.

  Args:
    in_features: size of the last input axis.
    out_features: size of the last output axis.
    use_bias: whether to add a ``bias`` Param (``None`` when off).
    dtype: computation dtype (``None``: promote inputs and params).
    param_dtype: dtype the Params are stored in.
    precision: ``jax.lax.Precision`` for the matmul.
    kernel_init, bias_init: initializers, called ``init(key, shape, param_dtype)``.
    dot_general: the contraction (``jax.lax.dot_general`` by default).
    promote_dtype: ``fn((x, kernel, bias), dtype=dtype) -> (x, kernel, bias)``.
    preferred_element_type: accumulation dtype passed to ``dot_general``.
    rngs: where initialisation keys come from (the ``params`` stream).
    kernel_metadata, bias_metadata: extra metadata for the Params (e.g. sharding names).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, precision=None,
               kernel_init=default_kernel_init, bias_init=default_bias_init,
               dot_general=lax.dot_general, promote_dtype=_promote_dtype,
               preferred_element_type=None, rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.kernel = Param(initializers.initial_value(kernel_init, rngs.params(),
                                                    (in_features, out_features), param_dtype),
                        **kernel_metadata)
    self.bias = (Param(initializers.initial_value(bias_init, rngs.params(), (out_features,),
                                                  param_dtype), **bias_metadata)
                 if use_bias else None)
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.dot_general = dot_general
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    if (self.dot_general is lax.dot_general and self.precision is None
        and self.preferred_element_type is None and out_sharding is None and inputs.ndim):
      # The same contraction through jnp.matmul, a jitted function: one C++ dispatch
      # eagerly, and its trace and derivatives are cached per shape under a transform.
      y = jnp.matmul(inputs, kernel)
    else:
      y = _dot_general_call(self.dot_general, inputs, kernel,
                            (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision,
                            preferred_element_type=self.preferred_element_type,
                            out_sharding=out_sharding)
    # bias (out_features,) broadcasts along the last axis: no reshape needed.
    return y if bias is None else y + bias


class LinearGeneral(Module):
  """A linear map over several input axes to several output axes, optionally batched.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> layer = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
      >>> layer.kernel.shape, layer(jnp.ones((5, 2, 3))).shape
      ((2, 3, 4), (5, 4))

  ``axis`` names the contracted input axes (sizes ``in_features``); the output
  ends with ``out_features``. ``batch_axis={0: n}`` gives each of the ``n``
  items of leading input axis 0 its own kernel (batch axes must be the
  leading axes ``0, 1, ...``); batch axes come first in the output.
  """

  def __init__(self, in_features, out_features, *, axis: int | tp.Sequence[int] = -1,
               batch_axis=_EMPTY,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               kernel_init=default_kernel_init, bias_init=default_bias_init,
               precision=None, promote_dtype=_promote_dtype, dot_general=None,
               dot_general_cls=None, preferred_element_type=None, rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.in_features = _tuple(in_features)
    self.out_features = _tuple(out_features)
    self.axis = _tuple(axis)
    if len(self.axis) != len(self.in_features):
      raise ValueError(f'LinearGeneral: axis={self.axis} names {len(self.axis)} axes but '
                       f'in_features={self.in_features} gives {len(self.in_features)} sizes; '
                       'pass one size per contracted axis.')
    self.batch_axis = dict(batch_axis)
    batch_dims = tuple(sorted(self.batch_axis))
    if batch_dims != tuple(range(len(batch_dims))):
      raise ValueError(f'LinearGeneral: batch_axis dims {batch_dims} must be consecutive leading '
                       'dimensions starting from 0, e.g. batch_axis={0: n}.')
    batch_shape = tuple(self.batch_axis[d] for d in batch_dims)
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.dot_general = dot_general
    self.dot_general_cls = dot_general_cls
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    n_batch, n_in = math.prod(batch_shape), math.prod(self.in_features)
    n_out = math.prod(self.out_features)
    # The kernel is drawn as one (batch * fan_in, fan_out) matrix, so variance scaling sees
    # every input axis (batch ones included) as fan-in, then gets one axis per feature.
    kernel_shape = batch_shape + self.in_features + self.out_features
    self.kernel = Param(_init_reshaped(kernel_init, rngs.params(), (n_batch * n_in, n_out),
                                       kernel_shape, param_dtype), **kernel_metadata)
    if use_bias:
      bias_shape = batch_shape + self.out_features
      self.bias = Param(_init_reshaped(bias_init, rngs.params(), (n_batch * n_out,),
                                       bias_shape, param_dtype), **bias_metadata)
    else:
      self.bias = None

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    ndim = inputs.ndim
    n_batch = len(self.batch_axis)
    axis = tuple(a % ndim for a in self.axis)
    batch_dims = tuple(range(n_batch))
    if set(axis) & set(batch_dims):
      raise ValueError(f'LinearGeneral: contracted axes {self.axis} overlap the batch axes '
                       f'{batch_dims}; an axis cannot be both.')
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    kernel_in = tuple(range(n_batch, n_batch + len(axis)))
    # A dot_general_cls (a factory, e.g. for quantized matmuls) wins over a dot_general.
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    else:
      dot_general = self.dot_general if self.dot_general is not None else lax.dot_general
    y = _dot_general_call(dot_general, inputs, kernel,
                          ((axis, kernel_in), (batch_dims, batch_dims)),
                          precision=self.precision,
                          preferred_element_type=self.preferred_element_type,
                          out_sharding=out_sharding)
    if bias is not None:
      # Output layout: batch axes, the free input axes, then the feature axes.
      n_free = ndim - n_batch - len(axis)
      y = _add_bias(y, bias, bias.shape[:n_batch] + (1,) * n_free + bias.shape[n_batch:])
    return y


def _check_einsum_str(einsum_str: str) -> str:
  einsum_str = einsum_str.replace(' ', '')
  if '->' not in einsum_str:
    raise ValueError(f'Einsum: einsum_str {einsum_str!r} must be explicit, with "->" before '
                     'the output, e.g. "bti,id->btd".')
  commas = einsum_str.count(',')
  if commas != 1:
    raise ValueError('`einsum_str` equation must have exactly two operands and therefore, '
                     f'exactly one comma character, instead of {commas}: {einsum_str!r}.')
  return einsum_str


def _expand_ellipses(einsum_str: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """Spell out each ``...`` with letters the equation does not use, right-aligned as numpy does.

      >>> _expand_ellipses('d...ab,bc...->ad...c', 5, 4)
      ('dABab', 'bcAB', 'adABc')
  """
  operands, out = einsum_str.split('->')
  lhs, rhs = operands.split(',')
  if '...' not in einsum_str:
    return lhs, rhs, out
  spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in einsum_str]
  n_lhs = lhs_ndim - (len(lhs) - 3) if '...' in lhs else 0
  n_rhs = rhs_ndim - (len(rhs) - 3) if '...' in rhs else 0
  fill = ''.join(spare[:max(n_lhs, n_rhs)])
  # A shorter ellipsis lines up with the trailing letters of the longer one.
  return (lhs.replace('...', fill[len(fill) - n_lhs:]),
          rhs.replace('...', fill[len(fill) - n_rhs:]),
          out.replace('...', fill))


@caches.register
@functools.lru_cache(maxsize=256)
def _bias_broadcast_shape(einsum_str: str, input_ndim: int, kernel_shape) -> tuple[int, ...]:
  """Where the bias sits in the output: output axes that come from the kernel keep their size."""
  _, kernel_letters, out = _expand_ellipses(einsum_str, input_ndim, len(kernel_shape))
  sizes = dict(zip(kernel_letters, kernel_shape))
  return tuple(sizes.get(c, 1) for c in out)


class Einsum(Module):
  """``y = einsum(einsum_str, x, kernel) + bias`` with a learned ``kernel`` of ``kernel_shape``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> layer = nnx.Einsum('bti,ihd->bthd', (3, 4, 5), (4, 5), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 6, 3))).shape
      (2, 6, 4, 5)

  The bias (when ``bias_shape`` is given) is laid over the output axes whose
  letters come from the kernel operand. ``einsum_str`` may also be passed per call.
  """

  def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, dtype=None,
               param_dtype=jnp.float32, precision=None, kernel_init=default_kernel_init,
               bias_init=default_bias_init, promote_dtype=_promote_dtype,
               einsum_op=jnp.einsum, preferred_element_type=None, rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    einsum_str = _check_einsum_str(einsum_str)
    # Shapes may be given as a bare int (``bias_shape=5``), as initializers accept.
    self.kernel = Param(initializers.initial_value(kernel_init, rngs.params(), _tuple(kernel_shape),
                                                    param_dtype),
                        **kernel_metadata)
    self.bias = (Param(initializers.initial_value(bias_init, rngs.params(), _tuple(bias_shape),
                                                  param_dtype),
                       **bias_metadata)
                 if bias_shape is not None else None)
    self.einsum_str = einsum_str
    self.kernel_shape = kernel_shape
    self.bias_shape = bias_shape
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.einsum_op = einsum_op
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding=None) -> jax.Array:
    einsum_str = _check_einsum_str(einsum_str if einsum_str is not None else self.einsum_str)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    # Optional keywords only when set, so a custom einsum_op need not accept them.
    kwargs: dict[str, tp.Any] = {'precision': self.precision}
    if self.preferred_element_type is not None:
      kwargs['preferred_element_type'] = self.preferred_element_type
    if out_sharding is not None:
      kwargs['out_sharding'] = out_sharding
    y = self.einsum_op(einsum_str, inputs, kernel, **kwargs)
    if bias is not None:
      y = _add_bias(y, bias, _bias_broadcast_shape(einsum_str, inputs.ndim, kernel.shape))
    return y


class PReLU(Module):
  """Parametric ReLU: ``x`` where ``x >= 0``, else ``negative_slope * x`` with a learned scalar slope.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> nnx.PReLU(0.5)(jnp.array([-2.0, 3.0])).tolist()
      [-1.0, 3.0]

  With ``dtype=None`` the output keeps the input's dtype (the slope is cast to
  it); a ``dtype`` casts both input and slope with ``promote_dtype``.
  """

  def __init__(self, negative_slope_init: float = 0.01, *, dtype=None,
               param_dtype=jnp.float32, promote_dtype=_promote_dtype,
               negative_slope_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.negative_slope = Param(jnp.asarray(negative_slope_init, dtype=param_dtype),
                                **negative_slope_metadata)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, inputs: jax.Array) -> jax.Array:
    slope = self.negative_slope[...]
    if self.dtype is not None:
      inputs, slope = self.promote_dtype((inputs, slope), dtype=self.dtype)
    else:
      # Without a dtype the output keeps the input's dtype: the slope follows the input.
      slope = jnp.asarray(slope, inputs.dtype)
    return jnp.where(inputs >= 0, inputs, slope * inputs)


__all__ = ['Linear', 'LinearGeneral', 'Einsum', 'PReLU']
