"""Normalization layers: rescale activations to zero mean / unit variance, then learn a scale and bias.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> norm = nnx.LayerNorm(4, rngs=nnx.Rngs(0))
    >>> y = norm(jnp.array([[1.0, 2.0, 3.0, 4.0]]))
    >>> round(float(y.mean()), 4), round(float(y.std()), 2)
    (0.0, 1.0)
    >>> bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    >>> _ = bn(jnp.ones((8, 4)))       # training: batch statistics, running averages updated
    >>> bn.eval()                      # now use_running_average=True
    >>> type(bn.mean).__name__
    'BatchStat'

Which axes are averaged is what distinguishes them: ``LayerNorm`` and
``RMSNorm`` the features of each example, ``BatchNorm`` every axis but the
features, ``GroupNorm`` groups of channels (plus spatial axes), and
``InstanceNorm`` the spatial axes of each channel. Statistics are computed in
at least float32. ``WeightNorm`` and ``SpectralNorm`` instead wrap another
layer and normalise its weights.
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from jax import lax

from arbax import filters as filterlib
from arbax.api import iter_graph
from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import canonicalize_dtype, promote_dtype as _promote_dtype, uncast_dtype
from arbax.pytree import data
from arbax.variables import BatchStat, Param, Variable

_EMPTY: tp.Mapping[str, tp.Any] = {}


def _axes(axes, ndim: int) -> tuple[int, ...]:
  """``axes`` (an int or a sequence, negatives allowed) as sorted, distinct, non-negative axes."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted({a % ndim for a in axes}))


def _abs_sq(x):
  return lax.square(lax.real(x)) + lax.square(lax.imag(x)) if jnp.iscomplexobj(x) else lax.square(x)


@tp.overload
def _compute_stats(x, axes, dtype=None, *, axis_name=None, axis_index_groups=None,
                   use_mean: tp.Literal[True] = True, use_fast_variance: bool = True, mask=None,
                   keepdims: bool = False) -> tuple[jax.Array, jax.Array]: ...
@tp.overload
def _compute_stats(x, axes, dtype=None, *, axis_name=None, axis_index_groups=None,
                   use_mean: bool, use_fast_variance: bool = True, mask=None,
                   keepdims: bool = False) -> tuple[jax.Array | None, jax.Array]: ...
def _compute_stats(x, axes, dtype=None, *, axis_name=None, axis_index_groups=None,
                   use_mean: bool = True, use_fast_variance: bool = True, mask=None,
                   keepdims: bool = False) -> tuple[jax.Array | None, jax.Array]:
  """Mean and (biased) variance of ``x`` over ``axes``, in at least float32.

      >>> import jax.numpy as jnp
      >>> mean, var = _compute_stats(jnp.array([[1.0, 3.0], [2.0, 6.0]]), (1,))
      >>> mean.tolist(), var.tolist()
      ([2.0, 4.0], [1.0, 4.0])

  Both are ``jnp.mean`` reductions (``where=mask``), so the numbers are the
  ones a plain ``x.mean(axes)`` gives; ``keepdims`` keeps the reduced axes
  (size 1), ready to broadcast against ``x``. ``use_fast_variance`` takes
  ``E[|x|^2] - |E[x]|^2`` (one pass, clipped at 0) instead of
  ``E[|x - E[x]|^2]``; ``use_mean=False`` gives no mean (``None``: nothing
  to subtract) and ``E[|x|^2]`` (RMSNorm). With ``axis_name`` each device's
  means are averaged (``pmean``) across that axis in one collective.
  """
  strong = isinstance(x, jax.Array) and not x.weak_type
  if dtype is None:
    dtype = x.dtype if strong else jnp.result_type(x)
  dtype = jnp.promote_types(dtype, jnp.float32)
  if not (strong and x.dtype == dtype):  # a cast to its own dtype would give x again
    x = jnp.asarray(x, dtype)

  def means(*values):
    local = [jnp.mean(v, axes, where=mask, keepdims=keepdims) for v in values]
    if axis_name is None:
      return local
    averaged = lax.pmean(jnp.stack(local), axis_name, axis_index_groups=axis_index_groups)
    return [averaged[i] for i in range(len(values))]

  if not use_mean:
    (var,) = means(_abs_sq(x))
    return None, var
  if use_fast_variance:
    mean, mean2 = means(x, _abs_sq(x))
    # Rounding can make the difference slightly negative; clip so rsqrt stays finite.
    return mean, jnp.maximum(0.0, mean2 - _abs_sq(mean))
  (mean,) = means(x)
  (var,) = means(_abs_sq(x - (mean if keepdims else jnp.expand_dims(mean, axes))))
  return mean, var


def _feature_shape(x_shape, feature_axes) -> tuple[int, ...]:
  return tuple(d if i in feature_axes else 1 for i, d in enumerate(x_shape))


def _laid_out(a, shape: tuple[int, ...]):
  """``a`` reshaped to ``shape``, or ``a`` itself when broadcasting lines it up the same way
  (``shape`` is ``a``'s shape with leading size-1 axes): no reshape op is dispatched."""
  lead = len(shape) - a.ndim
  if lead < 0 or tuple(shape[lead:]) != a.shape or any(d != 1 for d in shape[:lead]):
    return jnp.reshape(a, shape)
  return a


def _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, *, epsilon, dtype):
  """``(x - mean) * (rsqrt(var + eps) * scale) + bias``, cast to the output dtype.

  ``mean`` / ``var`` lack the ``reduction_axes`` (or keep them with size 1;
  ``mean=None``: nothing is subtracted); ``scale`` / ``bias`` lie along
  ``feature_axes``. The output dtype is ``dtype``, else that of ``x``,
  ``scale`` and ``bias`` promoted together.
  """
  stats_shape = tuple(1 if i in reduction_axes else d for i, d in enumerate(x.shape))
  feature_shape = _feature_shape(x.shape, feature_axes)
  y = x if mean is None else x - _laid_out(mean, stats_shape)
  mul = lax.rsqrt(_laid_out(var, stats_shape) + epsilon)
  present = [x]
  if scale is not None:
    mul = mul * _laid_out(scale, feature_shape)
    present.append(scale)
  y = y * mul
  if bias is not None:
    y = y + _laid_out(bias, feature_shape)
    present.append(bias)
  if uncast_dtype(y, *present, dtype=dtype) is not None:
    return y  # already in the output dtype
  return jnp.asarray(y, canonicalize_dtype(*present, dtype=dtype))


def _param(init, rngs, shape, param_dtype, metadata):
  return Param(initializers.initial_value(init, rngs.params(), shape, param_dtype), **metadata)


def _scale_and_bias(shape, *, use_scale, use_bias, scale_init, bias_init, param_dtype,
                    rngs, scale_metadata, bias_metadata) -> tuple[Param | None, Param | None]:
  # Keys are drawn scale first, then bias.
  scale = _param(scale_init, rngs, shape, param_dtype, scale_metadata) if use_scale else None
  bias = _param(bias_init, rngs, shape, param_dtype, bias_metadata) if use_bias else None
  return scale, bias


def _value(v):
  return None if v is None else v[...]


class BatchNorm(Module):
  """Normalise with statistics over the batch (every axis but ``axis``); keep running averages.

  In training (``use_running_average=False``) each call uses the batch mean
  and variance and updates the ``mean`` / ``var`` BatchStats:
  ``mean <- momentum * mean + (1 - momentum) * batch_mean``. In evaluation
  (``use_running_average=True``, set by ``model.eval()``) the stored averages
  are used and nothing changes. ``axis_name`` averages the batch statistics
  across the devices of a ``vmap`` / ``shard_map`` axis.
  """

  def __init__(self, num_features: int, *, use_running_average: bool | None = False,
               axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-5, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init=initializers.zeros_init(), scale_init=initializers.ones_init(),
               axis_name: str | None = None, axis_index_groups: tp.Any = None,
               use_fast_variance: bool = True, promote_dtype=_promote_dtype, rngs,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               scale_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    shape = (num_features,)
    # Running statistics stay float32 whatever the parameter dtype, so averages do not drift.
    self.mean = BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = BatchStat(jnp.ones(shape, jnp.float32))
    self.scale, self.bias = _scale_and_bias(
        shape, use_scale=use_scale, use_bias=use_bias, scale_init=scale_init,
        bias_init=bias_init, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = (use_running_average if use_running_average is not None
                           else self.use_running_average)
    if use_running_average is None:
      raise ValueError(
          'No `use_running_average` argument was provided to BatchNorm. Pass it to the '
          'constructor (nnx.BatchNorm(..., use_running_average=True/False)), to the call '
          '(bn(x, use_running_average=True/False)), or set it with model.train() / model.eval().')
    feature_axes = _axes(self.axis, x.ndim)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)),
        dtype=self.dtype)
    if not use_running_average:
      mean, var = _compute_stats(x, reduction_axes, self.dtype, axis_name=self.axis_name,
                                 axis_index_groups=self.axis_index_groups,
                                 use_fast_variance=self.use_fast_variance, mask=mask)
      # The running averages are bookkeeping, not part of the function being differentiated.
      m, shape = self.momentum, self.mean.shape
      self.mean[...] = lax.stop_gradient(m * self.mean[...] + (1 - m) * _laid_out(mean, shape))
      self.var[...] = lax.stop_gradient(m * self.var[...] + (1 - m) * _laid_out(var, shape))
    return _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes,
                      epsilon=self.epsilon, dtype=self.dtype)

  def set_view(self, use_running_average: bool | None = None) -> None:
    """What ``nnx.view`` switches on BatchNorm.

    Args:
      use_running_average: if True, normalize with the stored running averages;
        if False, with the batch statistics (and update the averages).
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class LayerNorm(Module):
  """Normalise each example over ``reduction_axes`` (the features by default).

  ``scale`` and ``bias`` have shape ``(num_features,)`` laid along
  ``feature_axes``. ``mask`` (same shape as ``x``) selects which entries count
  towards the statistics.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init=initializers.zeros_init(), scale_init=initializers.ones_init(),
               reduction_axes=-1, feature_axes=-1, axis_name: str | None = None,
               axis_index_groups: tp.Any = None, use_fast_variance: bool = True,
               promote_dtype=_promote_dtype, rngs,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               scale_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.scale, self.bias = _scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    reduction_axes = _axes(self.reduction_axes, x.ndim)
    mean, var = _compute_stats(x, reduction_axes, self.dtype, axis_name=self.axis_name,
                               axis_index_groups=self.axis_index_groups,
                               use_fast_variance=self.use_fast_variance, mask=mask,
                               keepdims=True)
    return _normalize(x, mean, var, scale, bias, reduction_axes,
                      _axes(self.feature_axes, x.ndim), epsilon=self.epsilon, dtype=self.dtype)


class RMSNorm(Module):
  """``x / sqrt(mean(x**2) + eps) * scale``: LayerNorm without centring or bias."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, use_scale: bool = True,
               scale_init=initializers.ones_init(), reduction_axes=-1, feature_axes=-1,
               axis_name: str | None = None, axis_index_groups: tp.Any = None,
               use_fast_variance: bool = True, promote_dtype=_promote_dtype, rngs,
               scale_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.scale = (_param(scale_init, rngs, (num_features,), param_dtype, scale_metadata)
                  if use_scale else None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, mask=None):
    x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
    reduction_axes = _axes(self.reduction_axes, x.ndim)
    mean, var = _compute_stats(x, reduction_axes, self.dtype, axis_name=self.axis_name,
                               axis_index_groups=self.axis_index_groups, use_mean=False,
                               mask=mask, keepdims=True)
    return _normalize(x, mean, var, scale, None, reduction_axes,
                      _axes(self.feature_axes, x.ndim), epsilon=self.epsilon, dtype=self.dtype)


class GroupNorm(Module):
  """Split the channels into groups and normalise each group (with the spatial axes) per example.

  Give ``num_groups`` (default 32) or ``group_size`` with ``num_groups=None``.
  Axis 0 is the batch axis; ``reduction_axes`` defaults to every axis between it
  and the channels.
  """

  def __init__(self, num_features: int, num_groups: int | None = 32,
               group_size: int | None = None, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init=initializers.zeros_init(), scale_init=initializers.ones_init(),
               reduction_axes=None, axis_name: str | None = None,
               axis_index_groups: tp.Any = None, use_fast_variance: bool = True,
               promote_dtype=_promote_dtype, rngs,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               scale_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    if num_groups is not None and group_size is None:
      if num_groups <= 0 or num_features % num_groups != 0:
        raise ValueError(f'Number of groups ({num_groups}) does not divide the number of '
                         f'channels ({num_features}).')
      group_size = num_features // num_groups
    elif group_size is not None and num_groups is None:
      if group_size <= 0 or num_features % group_size != 0:
        raise ValueError(f'Number of features ({num_features}) is not multiple of the group '
                         f'size ({group_size}).')
      num_groups = num_features // group_size
    else:
      raise ValueError('Either `num_groups` or `group_size` should be specified. If '
                       '`group_size` is to be specified, pass `num_groups=None` as argument to '
                       'override the default `num_groups` value of 32.')
    # Attributes in NNX's order (the repr lists them so); channels are num_groups * group_size.
    self.feature_axis = -1
    self.num_groups = num_groups
    self.group_size = group_size
    self.scale, self.bias = _scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    channels = x.shape[-1]
    if channels != self.num_groups * self.group_size:
      raise ValueError(f'GroupNorm: input has {channels} channels (last axis) but the layer was '
                       f'built for {self.num_groups * self.group_size} ({self.num_groups} groups '
                       f'of {self.group_size}); pass num_features={channels} or reshape the input.')
    grouped = x.shape[:-1] + (self.num_groups, self.group_size)
    if self.reduction_axes is None:
      axes = tuple(range(1, x.ndim - 1))
    else:
      axes = tuple(a for a in _axes(self.reduction_axes, x.ndim) if a != x.ndim - 1)
    # Axes of the grouped view: the chosen ones plus the within-group channel axis.
    axes = axes + (x.ndim,)
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    xg = jnp.reshape(x, grouped)
    # The mask need only broadcast against x: split just its channel axis.
    maskg = (None if mask is None
             else jnp.reshape(mask, mask.shape[:-1] + (self.num_groups, self.group_size)))
    mean, var = _compute_stats(xg, axes, self.dtype, axis_name=self.axis_name,
                               axis_index_groups=self.axis_index_groups,
                               use_fast_variance=self.use_fast_variance, mask=maskg)
    # The statistics end with the group axis: give each channel its group's value.
    mean = jnp.repeat(mean, self.group_size, axis=-1)
    var = jnp.repeat(var, self.group_size, axis=-1)
    return _normalize(x, mean, var, scale, bias, axes[:-1], (x.ndim - 1,),
                      epsilon=self.epsilon, dtype=self.dtype)


class InstanceNorm(Module):
  """Normalise each channel of each example over its spatial axes (all but axis 0 and ``feature_axes``)."""

  def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, use_bias: bool = True, use_scale: bool = True,
               bias_init=initializers.zeros_init(), scale_init=initializers.ones_init(),
               feature_axes=-1, axis_name: str | None = None, axis_index_groups: tp.Any = None,
               use_fast_variance: bool = True, promote_dtype=_promote_dtype, rngs,
               bias_metadata: tp.Mapping[str, tp.Any] = _EMPTY,
               scale_metadata: tp.Mapping[str, tp.Any] = _EMPTY):
    self.scale, self.bias = _scale_and_bias(
        (num_features,), use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        rngs=rngs, scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask=None):
    feature_axes = _axes(self.feature_axes, x.ndim)
    if 0 in feature_axes:
      raise ValueError(f'InstanceNorm: feature_axes={self.feature_axes} include axis 0, which is '
                       'the batch axis; give the channel axes only, e.g. feature_axes=-1.')
    reduction_axes = tuple(i for i in range(1, x.ndim) if i not in feature_axes)
    x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)),
                                        dtype=self.dtype)
    mean, var = _compute_stats(x, reduction_axes, self.dtype, axis_name=self.axis_name,
                               axis_index_groups=self.axis_index_groups,
                               use_fast_variance=self.use_fast_variance, mask=mask,
                               keepdims=True)
    return _normalize(x, mean, var, scale, bias, reduction_axes, feature_axes,
                      epsilon=self.epsilon, dtype=self.dtype)


# -- weight normalisation wrappers ---------------------------------------------
def _selected_variables(layer, variable_filter) -> list[tuple[tuple, Variable]]:
  predicate = filterlib.to_predicate(variable_filter)
  return [(path, v) for path, v in iter_graph(layer)
          if isinstance(v, Variable) and predicate(path, v)]


class WeightNorm(Module):
  """Reparametrise a layer's weights as ``scale * w / ||w||`` (norms over the non-feature axes).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> layer = nnx.WeightNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> layer(jnp.ones((2, 3))).shape
      (2, 5)
      >>> layer.scales[('kernel',)].shape        # one scale per output feature
      (5,)

  ``variable_filter`` picks the weights (the ``kernel`` by default);
  ``scales`` maps each one's path to its scale Param (``None`` with
  ``use_scale=False``); ``feature_axes=None`` normalises the whole weight.
  """

  def __init__(self, layer_instance: Module, *, feature_axes=-1, use_scale: bool = True,
               scale_init=initializers.ones_init(), epsilon: float = 1e-12, dtype=None,
               param_dtype=jnp.float32,
               variable_filter: filterlib.Filter = filterlib.PathContains('kernel', exact=True),
               promote_dtype=_promote_dtype, rngs):
    self.layer_instance = layer_instance
    self.feature_axes = feature_axes
    self.use_scale = use_scale
    self.scale_init = scale_init
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = variable_filter
    self.promote_dtype = promote_dtype
    if use_scale:
      scales = {}
      for path, v in _selected_variables(layer_instance, variable_filter):
        shape = tuple(v.shape[a] for a in self._feature_axes(v.ndim))
        scales[path] = Param(initializers.initial_value(scale_init, rngs.params(), shape, param_dtype))
      self.scales = data(scales)  # a plain dict keyed by path, data (as in NNX)
    else:
      self.scales = None

  def _feature_axes(self, ndim: int) -> tuple[int, ...]:
    return () if self.feature_axes is None else _axes(self.feature_axes, ndim)

  def _normalized(self, path, w):
    feature_axes = self._feature_axes(w.ndim)
    reduce = tuple(i for i in range(w.ndim) if i not in feature_axes)
    # In the weight's own dtype, as NNX: the result is cast once, at the end.
    w_bar = w * lax.rsqrt(jnp.sum(_abs_sq(w), reduce, keepdims=True) + self.epsilon)
    if self.scales is None:
      return jnp.asarray(w_bar, canonicalize_dtype(w, dtype=self.dtype))
    scale = jnp.reshape(self.scales[path][...], _feature_shape(w.shape, feature_axes))
    return jnp.asarray(w_bar * scale, canonicalize_dtype(w, scale, dtype=self.dtype))

  def __call__(self, x, *args, **kwargs):
    """Normalise the selected weights of ``layer_instance`` in place, then call it.

    As in NNX the layer keeps the normalised weights afterwards; gradients with
    respect to the weights flow through the normalisation.
    """
    for path, v in _selected_variables(self.layer_instance, self.variable_filter):
      v.set_value(self._normalized(path, v.get_value()))
    layer = tp.cast(tp.Callable, self.layer_instance)  # any callable Module
    return layer(x, *args, **kwargs)


def _l2_normalize(x, epsilon):
  return x * lax.rsqrt(jnp.sum(_abs_sq(x)) + epsilon)


class SpectralNorm(Module):
  """Divide a layer's weights by their largest singular value, estimated by power iteration.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> layer = nnx.SpectralNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> layer(jnp.ones((2, 3))).shape
      (2, 5)
      >>> sorted(layer.batch_stats)          # the 1D bias is left alone
      [('kernel', 'sigma'), ('kernel', 'u')]

  Every Param with two or more dimensions is normalised (higher-rank ones are
  viewed as ``(-1, last_dim)`` matrices unless ``error_on_non_matrix``). The
  power-iteration vector ``u`` and the estimate ``sigma`` are BatchStats in
  ``batch_stats``, keyed ``(*path, 'u')`` / ``(*path, 'sigma')``; they are
  updated on each call unless ``update_stats=False`` (``model.eval()``).
  """

  def __init__(self, layer_instance: Module, *, n_steps: int = 1, epsilon: float = 1e-12,
               dtype=None, param_dtype=jnp.float32, error_on_non_matrix: bool = False,
               update_stats: bool = True, rngs):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    self.use_running_average = not update_stats
    u_init = initializers.normal(0.01)
    stats = {}
    for path, v in _selected_variables(layer_instance, Param):
      if not self._is_normalized(path, v.ndim):
        continue
      stats[(*path, 'u')] = BatchStat(
          initializers.initial_value(u_init, rngs.params(), (1, v.shape[-1]), param_dtype))
      stats[(*path, 'sigma')] = BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = data(stats)  # a plain dict keyed by path, data (as in NNX)

  def _is_normalized(self, path, ndim: int) -> bool:
    if ndim <= 1 or self.n_steps < 1:
      return False
    if ndim > 2 and self.error_on_non_matrix:
      raise ValueError(f'Layer instance parameter is {ndim}D but error_on_non_matrix is True '
                       f'(parameter at {"/".join(map(str, path))}).')
    return True

  def _normalized(self, path, w, update_stats: bool):
    matrix = jnp.reshape(w, (-1, w.shape[-1]))
    u_stat = self.batch_stats[(*path, 'u')]
    u = u_stat[...]
    for _ in range(self.n_steps):
      v = _l2_normalize(u @ matrix.T, self.epsilon)
      u = _l2_normalize(v @ matrix, self.epsilon)
    # The iteration only estimates directions: no gradient flows through u and v.
    u, v = lax.stop_gradient(u), lax.stop_gradient(v)
    sigma = (v @ matrix @ u.T)[0, 0]
    normalized = jnp.reshape(matrix / jnp.where(sigma != 0, sigma, 1), w.shape)
    if update_stats:
      u_stat[...] = u
      self.batch_stats[(*path, 'sigma')][...] = sigma
    return jnp.asarray(normalized, canonicalize_dtype(matrix, u, v, sigma, dtype=self.dtype))

  def __call__(self, x, update_stats: bool | None = None):
    """Divide the matrices of ``layer_instance`` by their estimated top singular value in
    place (as NNX: the layer keeps the normalised weights), then call it."""
    update = (not self.use_running_average) if update_stats is None else update_stats
    for path, v in _selected_variables(self.layer_instance, Param):
      if (*path, 'u') in self.batch_stats:
        v[...] = self._normalized(path, v.get_value(), update)
    layer = tp.cast(tp.Callable, self.layer_instance)  # any callable Module
    return layer(x)


__all__ = ['BatchNorm', 'LayerNorm', 'RMSNorm', 'GroupNorm', 'InstanceNorm', 'WeightNorm',
           'SpectralNorm']
