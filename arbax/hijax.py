"""Hijax Variables: Variables whose in-place updates JAX itself carries through transforms.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> v = nnx.Variable(jnp.array(1), hijax=True)
    >>> @jax.jit                     # plain jax.jit, no nnx.state / nnx.update
    ... def inc(v):
    ...   v[...] += 1
    >>> inc(v)
    >>> int(v[...])
    2
    >>> counts = nnx.Variable(jnp.zeros(3), hijax=True)
    >>> _ = jax.vmap(lambda c: c.__setitem__(..., c[...] + 1))(counts)  # mapped, in place
    >>> counts[...].tolist()
    [1.0, 1.0, 1.0]

Where they work. Passed to or captured by ``jax.jit``, ``jax.lax.cond``,
``jax.eval_shape`` and the NNX transforms; captured by ``jax.lax.scan`` /
``fori_loop`` / ``while_loop`` bodies; mapped by ``jax.vmap`` with an int axis
or ``None`` (see ``arbax.hijax_variable``); created inside any of them. What
JAX 0.10 cannot do with a mutable hijax value: return it from ``jax.jit`` or
``jax.lax.cond`` (``nnx.jit`` returns Variables), differentiate it, carry it
through a loop (or scan over it), use it inside ``jax.checkpoint``, or batch a
``jit`` / ``scan`` / ``cond`` that uses it inside ``jax.vmap``. For grad and
loop carries, make the Variables immutable: ``nnx.with_vars(model,
mutable=False)`` gives plain values with the same kinds and metadata, which
``jax.grad`` differentiates and loops carry.

The machinery lives below this module: ``arbax.cell`` (the mutable JAX type)
and ``arbax.hijax_variable`` (the Variable classes backed by it).
"""
from __future__ import annotations

import warnings

from arbax import filters as filterlib
from arbax.api import find_duplicates, recursive_map
from arbax.cell import CellGradError as HijaxGradError  # noqa: F401 (the error jax.grad raises)
from arbax.errors import format_path
from arbax.variables import Variable

__all__ = ['with_vars', 'vars_as']

_FLAGS = ('hijax', 'ref', 'mutable')
_FLAG_DEFAULTS = {'hijax': False, 'ref': False, 'mutable': True}


def _convert(v: Variable, changes: dict) -> Variable:
  return v.copy(**changes)  # a copy with other flags gets the class and store they ask for


def with_vars(node, /, *, hijax: bool | None = None, ref: bool | None = None,
              mutable: bool | None = None, only: filterlib.Filter = ...,
              allow_duplicates: bool = False):
  """A copy of ``node`` whose Variables (those matching ``only``) have the given flags.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> p = nnx.Param(jnp.array(3.0), hijax=True)
      >>> g = jax.grad(lambda p: p[...] ** 2)(nnx.with_vars(p, mutable=False))
      >>> float(g[...])
      6.0

  Variables already as asked are kept as they are (the same objects); the
  others are new Variables with the current values: converting to hijax or
  ref gives them new stores, so their updates do not reach the originals.

  Args:
    node: a Variable, a Module, a State or any pytree / graph of them.
    hijax: make Variables hijax (their updates carried by JAX transforms) or plain.
    ref: make Variables hold a ``jax.Ref`` (arrays and scalars only).
    mutable: ``False`` makes hijax/ref Variables immutable plain values, for
      ``jax.grad`` and loop carries; ``True`` makes them mutable again.
    only: a filter: only the Variables it matches are converted.
    allow_duplicates: a Variable reachable from two places is refused
      (converting would split it into two); pass ``True`` to accept that.

  Returns:
    The converted copy of ``node`` (shared structure is kept).
  """
  changes = {k: bool(v) for k, v in zip(_FLAGS, (hijax, ref, mutable)) if v is not None}
  predicate = filterlib.to_predicate(only)

  def selected(path, x) -> bool:
    return (isinstance(x, Variable)
            and any(x.get_metadata(k, _FLAG_DEFAULTS[k]) != want for k, want in changes.items())
            and predicate(path, x))

  if not allow_duplicates:
    _refuse_duplicates(node, selected)
  return recursive_map(lambda path, x: _convert(x, changes) if selected(path, x) else x, node)


def vars_as(node, /, *, hijax: bool | None = None, ref: bool | None = None,
            mutable: bool | None = None, only: filterlib.Filter = ...,
            allow_duplicates: bool = False):
  """Deprecated name of :func:`with_vars` (same arguments); warns, as NNX does."""
  warnings.warn('nnx.vars_as is deprecated: use nnx.with_vars (same arguments).',
                DeprecationWarning, stacklevel=2)
  return with_vars(node, hijax=hijax, ref=ref, mutable=mutable, only=only,
                   allow_duplicates=allow_duplicates)


def _refuse_duplicates(node, selected) -> None:
  groups = find_duplicates(node, only=selected)
  if groups:
    shown = ' and '.join(format_path(p) for p in groups[0])
    raise ValueError(f'Found duplicate at paths {shown}: with_vars would convert this Variable '
                     'into two independent copies. Pass allow_duplicates=True to accept that, '
                     'or convert it through one of its owners only (only=...).')
