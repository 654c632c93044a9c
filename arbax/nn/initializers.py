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
import typing as tp

import jax
from jax.nn.initializers import (constant, delta_orthogonal, glorot_normal,  # noqa: F401
                                 glorot_uniform, he_normal, he_uniform, kaiming_normal,
                                 kaiming_uniform, lecun_normal, lecun_uniform, normal, ones,
                                 orthogonal, truncated_normal, uniform, variance_scaling,
                                 xavier_normal, xavier_uniform, zeros)

#: The type of an initializer: JAX's ``Initializer`` protocol or any callable
#: ``init(key, shape, dtype)``; annotate your own ``kernel_init=`` arguments with it.
Initializer = tp.Union[jax.nn.initializers.Initializer, tp.Callable[..., tp.Any]]
DtypeLikeInexact = tp.Any


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
