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

When every operand already is a JAX array of the target dtype (the usual case:
float32 inputs, float32 parameters) the operands are returned as they are,
with no op dispatched: casting them would give the same arrays.
"""
from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np

from arbax.variables import Variable

# The floating dtypes layers compute in; an array of one of these needs no cast to itself.
_INEXACT = frozenset(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64,
                                           jnp.complex64, jnp.complex128))


def _as_array(x):
  if isinstance(x, Variable):
    x = x.get_value()
  return x


def uncast_dtype(*values, dtype=None, inexact: bool = True):
  """The dtype ``promote_dtype`` would give ``values`` if it needs to cast none of them, else ``None``.

  That is when each value (``None`` entries aside) is a JAX array or tracer, not
  weakly typed, all share one dtype, it is ``dtype`` when one is given, and it is
  a float or complex dtype when ``inexact``.

      >>> import jax.numpy as jnp
      >>> uncast_dtype(jnp.ones(2), None, jnp.zeros(3))
      dtype('float32')
      >>> uncast_dtype(jnp.ones(2), jnp.ones(2, jnp.bfloat16)) is None
      True
      >>> uncast_dtype(jnp.ones(2), dtype=jnp.bfloat16) is None
      True

  Args:
    *values: arrays or ``None``.
    dtype: the dtype asked for (``None``: whatever they share).
    inexact: whether the dtype must be a float or complex dtype.

  Returns:
    The common dtype, or ``None`` when a cast is needed.
  """
  shared = None
  for v in values:
    if v is None:
      continue
    if not isinstance(v, jax.Array) or v.weak_type:
      return None
    if shared is None:
      shared = v.dtype
    elif v.dtype != shared:
      return None
  if shared is None or (dtype is not None and shared != dtype):
    return None
  if inexact and shared not in _INEXACT:
    return None
  return shared


def canonicalize_dtype(*args, dtype=None, inexact: bool = True):
  """The dtype ``args`` compute in: ``dtype`` if given, else their promoted type (float if ``inexact``)."""
  if dtype is None:
    # Arrays go to result_type as they are (their weak types count); other values
    # (Python scalars, lists) become arrays first.
    present = [a if hasattr(a, 'dtype') else jnp.asarray(a)
               for a in map(_as_array, args) if a is not None]
    dtype = jnp.result_type(*present)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(jnp.float32, dtype)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f'dtype must be a float or complex dtype when inexact=True, got {dtype}.')
  return dtype


SeqT = tp.TypeVar('SeqT', bound=tp.Sequence[tp.Any])


def promote_dtype(args: SeqT, /, *, dtype=None, inexact: bool = True) -> SeqT:
  """Cast every array in the sequence ``args`` to one dtype; ``None`` entries stay ``None``."""
  values = [_as_array(a) for a in args]
  if uncast_dtype(*values, dtype=dtype, inexact=inexact) is not None:
    cast = values  # already what the cast would give
  else:
    target = canonicalize_dtype(*values, dtype=dtype, inexact=inexact)
    cast = [None if a is None else jnp.asarray(a, target) for a in values]
  out = type(args)(cast) if isinstance(args, (tuple, list)) else cast
  return tp.cast(SeqT, out)  # the container type given, which a checker cannot follow


__all__: list[str] = []
