"""Abstract construction: under ``nnx.eval_shape`` keys and initial values are computed once per shape.

``nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0)))`` traces the constructor only
to learn the shape and dtype of every Variable; the values are never seen. So
while it traces, an RngStream and a JAX initializer (``nnx.initializers.*``)
compute their result once per kind of result (same initializer, shape, dtype,
key type) and hand that same traced value out again for every later call of
the same kind, instead of tracing their ops again for each layer. The abstract
model comes out the same: every Variable gets the shape, dtype and sharding
that computing it would have given.

    >>> import jax, jax.numpy as jnp
    >>> with abstract_init():                      # entered by nnx.eval_shape
    ...   pass
    >>> reuse('demo', lambda: 1)                   # outside it: always computed
    1

The reuse applies only on the trace ``nnx.eval_shape`` runs the function on:
inside a transform nested in it (``nnx.vmap`` building stacked layers, say)
values are computed as usual.
"""
from __future__ import annotations

import contextlib
import threading
import typing as tp

import jax

from arbax.variables import current_trace

__all__ = ['abstract_init', 'reuse']

_MISSING = object()
_LOCAL = threading.local()  # each thread traces on its own


class _Scope:
  __slots__ = ('trace', 'values')

  def __init__(self, trace):
    self.trace = trace
    self.values: dict = {}  # (kind, mesh, argument types) -> value


@contextlib.contextmanager
def abstract_init():
  """Reuse keys and initial values on the trace running now, until the block ends.

  ``nnx.eval_shape`` enters it inside the trace of the function it evaluates;
  the values kept are dropped when the block ends.
  """
  previous = getattr(_LOCAL, 'scope', None)
  _LOCAL.scope = _Scope(current_trace())
  try:
    yield
  finally:
    _LOCAL.scope = previous


def reuse(kind: tp.Hashable, fn: tp.Callable[..., tp.Any], *args):
  """``fn(*args)``, or under ``abstract_init`` the value it gave for the same kind of call before.

  The kind of a call is ``kind`` with the abstract value (shape, dtype,
  sharding) of each argument and the mesh in context: all that decides the
  shape, dtype and sharding of the result of a pure ``fn``.

      >>> import jax.numpy as jnp
      >>> int(reuse('double', lambda x: 2 * x, jnp.ones(())))   # outside abstract_init
      2

  Args:
    kind: what determines ``fn``'s result besides its arguments' types, e.g.
      ``('init', initializer, shape, dtype)``. ``fn`` must have no effect
      beyond its result.
    fn: computes the value.
    *args: ``fn``'s arguments (arrays).

  Returns:
    The value.
  """
  scope = getattr(_LOCAL, 'scope', None)
  if scope is None or scope.trace is not current_trace():
    return fn(*args)
  kind = (kind, jax.sharding.get_abstract_mesh(), *(jax.typeof(a) for a in args))
  value = scope.values.get(kind, _MISSING)
  if value is _MISSING:
    value = scope.values[kind] = fn(*args)
  return value
