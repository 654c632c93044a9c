"""Metrics: running statistics kept in Variables, so they update inside ``nnx.jit``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> metrics = nnx.MultiMetric(loss=nnx.metrics.Average('loss'),
    ...                           accuracy=nnx.metrics.Accuracy())
    >>> metrics.update(loss=jnp.array([1.0, 3.0]),
    ...                logits=jnp.array([[0.2, 0.8], [0.9, 0.1]]), labels=jnp.array([1, 1]))
    >>> {k: float(v) for k, v in metrics.compute().items()}
    {'loss': 2.0, 'accuracy': 0.5}
    >>> metrics.reset()

Every metric has ``update(**kwargs)`` (it picks the keyword arguments it
needs and ignores the rest, so one call feeds a whole ``MultiMetric``),
``compute()`` and ``reset()``. Like NNX, only ``Metric`` and ``MultiMetric``
are top-level names; the others are ``nnx.metrics.<Name>``.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax
import jax.numpy as jnp

from arbax import api
from arbax.pytree import Pytree, attributes
from arbax.variables import Variable

__all__ = ['Metric', 'MultiMetric']


class MetricState(Variable):
  """The kind of the Variables metrics keep their running totals in."""


class Metric(Pytree):
  """Base class of metrics; subclasses define ``__init__``, ``update``, ``compute``, ``reset``."""

  def __init__(self):
    raise NotImplementedError('Must override `__init__()` method.')

  def update(self, **kwargs) -> None:
    raise NotImplementedError('Must override `update()` method.')

  def compute(self):
    raise NotImplementedError('Must override `compute()` method.')

  def reset(self) -> None:
    raise NotImplementedError('Must override `reset()` method.')

  def split(self, *filters):
    """``nnx.split(metric, *filters)``: its GraphDef and State(s)."""
    return api.split(self, *filters)


def _argument(kwargs: dict, argname: str):
  if argname not in kwargs:
    raise TypeError(f"Expected keyword argument '{argname}'")
  return jnp.asarray(kwargs[argname])


class Average(Metric):
  """The mean of every value passed as ``update(<argname>=values)`` (default ``values``).

  ``mask`` (broadcast against the values) leaves out the entries where it is False.
  """

  def __init__(self, argname: str = 'values'):
    self.argname = argname
    self.total = MetricState(jnp.array(0, dtype=jnp.float32))
    self.count = MetricState(jnp.array(0, dtype=jnp.int32))

  def update(self, mask: jax.Array | None = None, **kwargs) -> None:
    values = _argument(kwargs, self.argname)
    if mask is None:
      total, count = values.sum(), values.size
    else:
      mask = jnp.broadcast_to(jnp.asarray(mask), values.shape)
      total, count = jnp.where(mask, values, 0).sum(), mask.sum(dtype=jnp.int32)
    self.total[...] += total.astype(jnp.float32)
    self.count[...] += count

  def compute(self) -> jax.Array:
    return self.total[...] / self.count[...]

  def reset(self) -> None:
    self.total[...] = jnp.zeros_like(self.total[...])
    self.count[...] = jnp.zeros_like(self.count[...])


@dataclasses.dataclass(frozen=True)
class Statistics:
  """What ``Welford.compute`` returns: mean, standard error of the mean, standard deviation."""
  mean: jax.Array
  standard_error_of_mean: jax.Array
  standard_deviation: jax.Array


jax.tree_util.register_dataclass(
    Statistics, data_fields=['mean', 'standard_error_of_mean', 'standard_deviation'],
    meta_fields=[])


class Welford(Metric):
  """Mean and spread of every value passed, merged batch by batch (Welford/Chan's update).

  The standard deviation is the population one (divides by the count).
  """

  def __init__(self, argname: str = 'values'):
    self.argname = argname
    self.count = MetricState(jnp.array(0, dtype=jnp.int32))
    self.mean = MetricState(jnp.array(0, dtype=jnp.float32))
    self.m2 = MetricState(jnp.array(0, dtype=jnp.float32))

  def update(self, **kwargs) -> None:
    values = _argument(kwargs, self.argname).astype(jnp.float32).ravel()
    if values.size == 0:
      return
    n_b = values.size
    mean_b = values.mean()
    m2_b = ((values - mean_b) ** 2).sum()
    count = self.count[...]
    total = count + n_b
    delta = mean_b - self.mean[...]
    # Chan et al.: combine two (count, mean, m2) summaries without revisiting the data
    self.mean[...] = self.mean[...] + delta * (n_b / total)
    self.m2[...] = self.m2[...] + m2_b + delta ** 2 * (count * (n_b / total))
    self.count[...] = total

  def compute(self) -> Statistics:
    count = self.count[...]
    std = jnp.sqrt(self.m2[...] / count)
    return Statistics(mean=self.mean[...], standard_error_of_mean=std / jnp.sqrt(count),
                      standard_deviation=std)

  def reset(self) -> None:
    for v in (self.count, self.mean, self.m2):
      v[...] = jnp.zeros_like(v[...])


class Accuracy(Average):
  """The fraction of correct predictions, from ``update(logits=..., labels=...)``.

  Multi-class (default): the prediction is ``argmax(logits, -1)`` and
  ``logits.ndim == labels.ndim + 1``. Binary (``threshold=t``): the prediction
  is ``logits > t`` and logits and labels have the same rank.
  """

  def __init__(self, threshold: float | None = None, *args, **kwargs):
    self.threshold = threshold
    super().__init__(*args, **kwargs)

  def update(self, *, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
             **_) -> None:
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if self.threshold is None:
      if logits.ndim != labels.ndim + 1:
        raise ValueError(f'For multi-class classification, expected logits.ndim==labels.ndim+1, '
                         f'got {logits.ndim} and {labels.ndim}')
      predictions = logits.argmax(axis=-1)
    else:
      if logits.ndim != labels.ndim:
        raise ValueError(f'For binary classification, expected logits.ndim==labels.ndim, '
                         f'got {logits.ndim} and {labels.ndim}')
      predictions = logits > self.threshold
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'Expected labels.dtype==jnp.int32, got {labels.dtype}')
    if predictions.shape != labels.shape:
      # TypeError, like the failed broadcast NNX reports for this mistake
      raise TypeError(f'Accuracy: predictions have shape {predictions.shape} but labels have '
                      f'shape {labels.shape}')
    super().update(**{self.argname: predictions == labels}, mask=mask)


_METHODS = ('update', 'compute', 'reset', 'split')


class MultiMetric(Metric):
  """Several named metrics updated together: ``nnx.MultiMetric(loss=Average('loss'), ...)``.

  ``update(**kwargs)`` passes every keyword argument to every metric;
  ``compute()`` returns ``{name: result}``.
  """

  def __init__(self, **metrics: Metric):
    for name, metric in metrics.items():
      if name in _METHODS:
        raise ValueError(f'MultiMetric: the name {name!r} would hide the method of the same '
                         'name; pick another name for this metric.')
      if not isinstance(metric, Metric):
        raise TypeError(f'MultiMetric: {name!r} must be a Metric, got {type(metric).__name__}.')
      setattr(self, name, metric)

  def _metrics(self) -> list[tuple[str, Metric]]:
    return [(k, v) for k, v, _ in attributes(self) if isinstance(v, Metric)]

  def update(self, **updates) -> None:
    for _, metric in self._metrics():
      metric.update(**updates)

  def compute(self) -> dict[str, tp.Any]:
    return {name: metric.compute() for name, metric in self._metrics()}

  def reset(self) -> None:
    for _, metric in self._metrics():
      metric.reset()
