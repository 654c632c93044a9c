"""The error types users catch.

Most misuse raises the builtin type NNX raises (``ValueError``, ``TypeError``);
the types here cover the cases that have no builtin equivalent.
"""


class ArbaxError(Exception):
  """Base class of arbax's own error types."""


class TraceContextError(ArbaxError):
  """A Variable was written from a JAX trace other than the one it belongs to.

  Example: a Variable created outside ``jax.jit`` is captured by closure and
  assigned inside it. Pass the object in as an argument (NNX transforms then
  propagate the update) or call ``nnx.clone`` inside to make trace-local copies.
  """


class ImmutableVariableError(ArbaxError):
  """A write to a Variable made immutable (``nnx.with_vars(model, mutable=False)``).

  Immutable hijax Variables are plain values for JAX (``jax.grad`` can
  differentiate them); write to the mutable original, or convert back with
  ``nnx.with_vars(..., mutable=True)``.
  """


class AliasError(ValueError):
  """Tree mode met the same Variable or object twice. A ValueError (as NNX raises) that also
  carries where: ``path`` and ``first_path`` (path tuples), and the shared ``obj``."""

  def __init__(self, message: str, *, obj=None, path=(), first_path=()):
    super().__init__(message)
    self.obj = obj
    self.path = path
    self.first_path = first_path


def format_path(path) -> str:
  """Render a path tuple the way users write it: ``('layers', 2, 'kernel')`` -> ``.layers[2].kernel``."""
  out = []
  for key in path:
    if isinstance(key, int):
      out.append(f'[{key}]')
    elif isinstance(key, str) and key.isidentifier():
      out.append(f'.{key}')
    else:
      out.append(f'[{key!r}]')
  return ''.join(out) or '<root>'
