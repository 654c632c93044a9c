"""dtype helpers shared by the layers: one computation dtype for inputs and parameters.

    >>> import jax.numpy as jnp
    >>> from arbax.nn.dtypes import promote_dtype
    >>> x, w, b = promote_dtype((jnp.ones(2, jnp.int32), jnp.ones(2, jnp.bfloat16), None))
    >>> x.dtype, w.dtype, b
    (dtype(bfloat16), dtype(bfloat16), None)

A layer built with ``dtype=None`` computes in the dtype its inputs and
parameters promote to; ``dtype=jnp.bfloat16`` casts all of them first. This
is the default ``promote_dtype=`` argument of every layer, so a custom one
(say, one that keeps parameters in float32) can be swapped in.
"""
from __future__ import annotations

import typing as tp

import jax.numpy as jnp

from arbax.variables import Variable


def _as_array(x):
  if isinstance(x, Variable):
    x = x.get_value()
  return x


def canonicalize_dtype(*args, dtype=None, inexact: bool = True):
  """The dtype ``args`` compute in: ``dtype`` if given, else their promoted type (float if ``inexact``)."""
  if dtype is None:
    present = [jnp.asarray(_as_array(a)) for a in args if a is not None]
    dtype = jnp.result_type(*present)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f'dtype must be a float or complex dtype when inexact=True, got {dtype}.')
  return dtype


T = tp.TypeVar('T')


def promote_dtype(args: T, /, *, dtype=None, inexact: bool = True) -> T:
  """Cast every array in the sequence ``args`` to one dtype; ``None`` entries stay ``None``."""
  target = canonicalize_dtype(*args, dtype=dtype, inexact=inexact)
  cast = [None if a is None else jnp.asarray(_as_array(a), target) for a in args]
  return type(args)(cast) if isinstance(args, (tuple, list)) else cast


__all__: list[str] = []
