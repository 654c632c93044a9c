"""Initializers: ``init(key, shape, dtype) -> array`` functions that give parameters their first values.

    >>> import jax, arbax as nnx
    >>> init = nnx.initializers.lecun_normal()   # a factory returns the init function
    >>> init(jax.random.key(0), (3, 4)).shape
    (3, 4)
    >>> nnx.initializers.zeros_init()(jax.random.key(0), (2,)).tolist()
    [0.0, 0.0]

The ``jax.nn.initializers`` family is re-exported unchanged so that keys give
the same numbers as in plain JAX. NNX adds ``zeros_init()`` / ``ones_init()``,
factories for symmetry with the others (``zeros`` and ``ones`` are already
init functions themselves, not factories).
"""
import functools
import typing as tp

import jax
import numpy as np
from jax.nn.initializers import (constant, delta_orthogonal, glorot_normal,  # noqa: F401
                                 glorot_uniform, he_normal, he_uniform, kaiming_normal,
                                 kaiming_uniform, lecun_normal, lecun_uniform, normal, ones,
                                 orthogonal, truncated_normal, uniform, variance_scaling,
                                 xavier_normal, xavier_uniform, zeros)

from arbax import abstract_init, caches

#: The type of an initializer: JAX's ``Initializer`` protocol or any callable
#: ``init(key, shape, dtype)``; annotate your own ``kernel_init=`` arguments with it.
Initializer = tp.Union[jax.nn.initializers.Initializer, tp.Callable[..., tp.Any]]
DtypeLikeInexact = tp.Any


# -- how layers call initializers -----------------------------------------------------------
# JAX's initializers are pure functions of (key, shape, dtype) and of the arguments their
# factory closed over, so equal ones can share one jitted function per shape and dtype.
_JAX_MODULES = frozenset({zeros.__module__, lecun_normal().__module__})
# Factories whose jitted value is bit-identical to their op-by-op one. Not those sampling
# a normal distribution and then scaling it (``normal``, ``variance_scaling(...,
# 'normal')``): compiled together, XLA folds the sampler's sqrt(2) into the scale, which
# changes the last bits of some values; nor ``truncated_normal``, whose jitted value
# differs in the last bit under XLA's cheap pipeline (--xla_backend_optimization_level=0).
# tests/test_initializers.py pins this list under both pipelines.
_EXACT_WHEN_JITTED = frozenset({'constant', 'uniform', 'orthogonal', 'delta_orthogonal',
                                'variance_scaling'})
_JITTED = caches.bounded('jitted initializers', maxsize=4096)  # by (initializer, shape, dtype)
_CONFIGS = caches.bounded('initializer configs', maxsize=1024)  # id(init) -> (init, config)


def _stand_in(value) -> tuple:
  # Equal values of other types (1 and 1.0) and zeros of other signs (0.0 == -0.0) must not
  # share a jitted initializer, so the type and, for floats, the repr are part of the key.
  exact = repr(value) if isinstance(value, (float, complex, np.inexact)) else None
  return type(value), value, exact


def _config(init) -> tuple | None:
  """A hashable stand-in for a JAX initializer: its code and the values it closes over.

  ``None`` for any other callable (a user's initializer, ``nnx.with_partitioning``'s
  wrapper, ...), which layers call as it is. Remembered per JAX initializer
  object: layers pass the same few (``default_kernel_init``) again and again.
  """
  entry = _CONFIGS.get(id(init))
  if entry is not None and entry[0] is init:  # the entry keeps init alive: its id is its own
    return entry[1]
  config = _compute_config(init)
  if config is not None:  # only JAX's own, whose closures hold a few small constants
    _CONFIGS[id(init)] = (init, config)
  return config


def _compute_config(init) -> tuple | None:
  if getattr(init, '__module__', None) not in _JAX_MODULES:
    return None
  try:
    cells = tuple(_stand_in(c.cell_contents) for c in init.__closure__ or ())
    config = (init.__code__, init.__defaults__, cells)
    hash(config)
  except (AttributeError, TypeError, ValueError):  # no code, an empty cell, an array argument
    return None
  return config


def _exact_when_jitted(init) -> bool:
  factory = init.__qualname__.split('.')[0]
  if factory in ('zeros', 'ones'):
    return True
  if factory == 'variance_scaling':
    free = dict(zip(init.__code__.co_freevars, (c.cell_contents for c in init.__closure__)))
    return free.get('distribution') != 'normal'
  return factory in _EXACT_WHEN_JITTED


def _jitted(config, init, shape, dtype):
  """``key -> init(key, shape, dtype)`` jitted, made once per (initializer, shape, dtype)."""
  fn = _JITTED.get((config, shape, dtype))
  if fn is None:
    if not _exact_when_jitted(init):
      fn = functools.partial(_call, init, shape, dtype)
    else:
      fn = jax.jit(functools.partial(_call, init, shape, dtype))
    _JITTED[(config, shape, dtype)] = fn
  return fn


def _call(init, shape, dtype, key):
  return init(key, shape, dtype)


def initial_value(init: Initializer, key, shape, dtype):
  """``init(key, shape, dtype)``: how layers draw a parameter's first value.

  The value is always the one ``init`` gives. For JAX's initializers (every
  ``nnx.initializers`` one) it is computed by one jitted function per
  (initializer, shape, dtype) where that gives the same bits (one dispatch
  instead of several), and under ``nnx.eval_shape`` once per (initializer,
  shape, dtype), the shape being all that is needed there.

      >>> import jax, arbax as nnx
      >>> init = nnx.initializers.lecun_normal()
      >>> key = jax.random.key(0)
      >>> bool((initial_value(init, key, (3, 4), 'float32') == init(key, (3, 4), 'float32')).all())
      True

  Args:
    init: the initializer.
    key: the PRNG key.
    shape: the value's shape.
    dtype: the value's dtype.

  Returns:
    The value.
  """
  config = _config(init)
  if config is None or type(shape) is not tuple or not all(type(d) is int for d in shape):
    return init(key, shape, dtype)
  try:
    compute = _jitted(config, init, shape, dtype)
  except TypeError:  # an unhashable dtype
    return init(key, shape, dtype)
  return abstract_init.reuse(('init', config, shape, dtype), compute, key)


def zeros_init() -> Initializer:
  """The ``zeros`` initializer, returned by a factory like the others."""
  return zeros


def ones_init() -> Initializer:
  """The ``ones`` initializer, returned by a factory like the others."""
  return ones


__all__ = ['Initializer', 'DtypeLikeInexact', 'constant', 'delta_orthogonal', 'glorot_normal',
           'glorot_uniform', 'he_normal', 'he_uniform', 'kaiming_normal', 'kaiming_uniform',
           'lecun_normal', 'lecun_uniform', 'normal', 'ones', 'ones_init', 'orthogonal',
           'truncated_normal', 'uniform', 'variance_scaling', 'xavier_normal', 'xavier_uniform',
           'zeros', 'zeros_init']
