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
  """The kind of the Variables metrics keep their running totals in (filter them with it).

      >>> import arbax as nnx
      >>> sorted(nnx.state(nnx.metrics.Average(), nnx.metrics.MetricState))
      ['count', 'total']
  """


class Metric(Pytree):
  """Base class of metrics: running statistics kept in Variables, so they update inside ``nnx.jit``.

  Subclasses define ``__init__`` (creating ``MetricState`` Variables),
  ``update(**kwargs)`` (taking the keyword arguments it needs and ignoring the
  rest, so one call feeds a whole ``MultiMetric``), ``compute()`` and ``reset()``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Max(nnx.Metric):
      ...   def __init__(self):
      ...     self.max = nnx.metrics.MetricState(jnp.array(-jnp.inf))
      ...   def update(self, *, values, **_):
      ...     self.max[...] = jnp.maximum(self.max[...], values.max())
      ...   def compute(self):
      ...     return self.max[...]
      ...   def reset(self):
      ...     self.max[...] = jnp.array(-jnp.inf)
      >>> m = Max()
      >>> m.update(values=jnp.array([1.0, 5.0, 3.0]))
      >>> float(m.compute())
      5.0
  """

  def __init__(self):
    raise NotImplementedError('Must override `__init__()` method.')

  def update(self, **kwargs) -> None:
    """Add a batch: read the keyword arguments this metric needs, ignore the others.

    Args:
      **kwargs: the batch's values by name (``loss=``, ``logits=``, ``labels=``...).
    """
    raise NotImplementedError('Must override `update()` method.')

  def compute(self):
    """The metric's value over everything passed to ``update`` since the last ``reset``.

    Returns:
      The value (an array, or a structure of them).
    """
    raise NotImplementedError('Must override `compute()` method.')

  def reset(self) -> None:
    """Forget every batch: back to the state of a new metric, in place."""
    raise NotImplementedError('Must override `reset()` method.')

  def split(self, *filters):
    """``nnx.split(metric, *filters)``: its GraphDef and State(s).

    Args:
      *filters: as for ``nnx.split``.

    Returns:
      ``(graphdef, state, ...)``.
    """
    return api.split(self, *filters)


def _argument(kwargs: dict, argname: str):
  if argname not in kwargs:
    raise TypeError(f"Expected keyword argument '{argname}'")
  return jnp.asarray(kwargs[argname])


class Average(Metric):
  """The mean of every value passed as ``update(<argname>=values)``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> loss = nnx.metrics.Average('loss')
      >>> loss.update(loss=jnp.array([1.0, 2.0, 9.0]), mask=jnp.array([True, True, False]))
      >>> loss.update(loss=jnp.array(3.0))
      >>> float(loss.compute())                       # (1 + 2 + 3) / 3
      2.0

  ``update`` takes ``mask`` (broadcast against the values): the total adds
  ``values * mask`` and the count adds ``mask.sum()``, so a boolean mask leaves out
  the entries where it is False and a float mask weighs them. A mask needs array
  values: with a Python number it raises ValueError.

  Args:
    argname: the keyword argument of ``update`` holding the values.
  """

  def __init__(self, argname: str = 'values'):
    self.argname = argname
    self.total = MetricState(jnp.array(0, dtype=jnp.float32))
    self.count = MetricState(jnp.array(0, dtype=jnp.int32))

  def update(self, mask: jax.Array | None = None, **kwargs) -> None:
    """Add ``kwargs[argname]`` to the running total and count.

    Args:
      mask: where False, the values are left out (broadcast against them).
      **kwargs: must hold ``argname``, else a TypeError; the rest is ignored.
    """
    if self.argname not in kwargs:
      raise TypeError(f"Expected keyword argument '{self.argname}'")
    values = kwargs[self.argname]
    if isinstance(values, (int, float)):  # one Python number: one value
      if mask is not None:
        raise ValueError(f'If mask is provided, {self.argname} should be a jax array, got the '
                         f'Python {type(values).__name__} {values!r}: pass jnp.asarray(...) of '
                         'the values the mask selects from.')
      total, count = jnp.asarray(values), 1
    elif mask is None:
      values = jnp.asarray(values)
      total, count = values.sum(), values.size
    else:  # values * mask: a float mask weighs the values, and counts its own sum
      values = jnp.asarray(values)
      mask = jnp.asarray(mask)
      total = (values * mask.astype(values.dtype)).sum()
      count = mask.sum().astype(jnp.int32)
    self.total[...] += total.astype(jnp.float32)
    self.count[...] += count

  def compute(self) -> jax.Array:
    """The mean so far (NaN before the first value).

    Returns:
      A float32 scalar.
    """
    return self.total[...] / self.count[...]

  def reset(self) -> None:
    self.total[...] = jnp.zeros_like(self.total[...])
    self.count[...] = jnp.zeros_like(self.count[...])


@dataclasses.dataclass(frozen=True)
class Statistics:
  """What ``Welford.compute`` returns: mean, standard error of the mean, standard deviation.

  Args:
    mean: the mean.
    standard_error_of_mean: ``standard_deviation / sqrt(count)``.
    standard_deviation: the population standard deviation.
  """
  mean: jax.Array
  standard_error_of_mean: jax.Array
  standard_deviation: jax.Array


jax.tree_util.register_dataclass(
    Statistics, data_fields=['mean', 'standard_error_of_mean', 'standard_deviation'],
    meta_fields=[])


class Welford(Metric):
  """Mean and spread of every value passed, merged batch by batch (Welford / Chan's update).

  The standard deviation is the population one (divides by the count).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> stats = nnx.metrics.Welford()
      >>> stats.update(values=jnp.array([1.0, 2.0]))
      >>> stats.update(values=jnp.array([3.0, 4.0]))
      >>> s = stats.compute()
      >>> float(s.mean), round(float(s.standard_deviation), 4)
      (2.5, 1.118)

  Args:
    argname: the keyword argument of ``update`` holding the values.
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
    """The statistics of every value so far.

    Returns:
      A ``Statistics`` (mean, standard error of the mean, standard deviation).
    """
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

      >>> import jax.numpy as jnp, arbax as nnx
      >>> accuracy = nnx.metrics.Accuracy()
      >>> accuracy.update(logits=jnp.array([[0.1, 0.9], [0.8, 0.2]]), labels=jnp.array([1, 1]))
      >>> float(accuracy.compute())
      0.5

  Args:
    threshold: None for multi-class, or the binary threshold.
    *args, **kwargs: passed to ``Average`` (``argname``).
  """

  def __init__(self, threshold: float | None = None, *args, **kwargs):
    self.threshold = threshold
    super().__init__(*args, **kwargs)

  def update(self, *, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
             **_) -> None:
    """Add a batch of predictions.

    Args:
      logits: the scores (multi-class: one more axis than ``labels``).
      labels: integer labels.
      mask: where False, the examples are left out.
    """
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

  ``update(**kwargs)`` passes every keyword argument to every metric (each
  takes what it needs); ``compute()`` returns ``{name: result}``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> metrics = nnx.MultiMetric(loss=nnx.metrics.Average('loss'),
      ...                           accuracy=nnx.metrics.Accuracy())
      >>> metrics.update(loss=jnp.array(2.0), logits=jnp.array([[0.0, 1.0]]), labels=jnp.array([1]))
      >>> {name: float(value) for name, value in metrics.compute().items()}
      {'loss': 2.0, 'accuracy': 1.0}

  Args:
    **metrics: the metrics by name (not ``update``, ``compute``, ``reset`` or ``split``).
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
    """Pass ``updates`` to every metric's ``update``.

    ``mask`` is either one mask for every metric or ``{metric name: mask}``; a metric
    whose mask is None (or missing from the dict) is called without ``mask``, so metrics
    whose ``update`` takes no mask work alongside masked ones.
    """
    mask = updates.pop('mask', None)
    for name, metric in self._metrics():
      own = mask.get(name) if isinstance(mask, dict) else mask
      metric.update(**updates) if own is None else metric.update(**updates, mask=own)

  def compute(self) -> dict[str, tp.Any]:
    """``{name: metric.compute()}`` for every metric.

    Returns:
      A dict in the order the metrics were given.
    """
    return {name: metric.compute() for name, metric in self._metrics()}

  def reset(self) -> None:
    for _, metric in self._metrics():
      metric.reset()
