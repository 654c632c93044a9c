"""nnx.capture: run a function and get back what its Modules ``sow`` and ``perturb``, as States.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Double(nnx.Module):
    ...   def __call__(self, x):
    ...     y = 2 * x
    ...     self.sow(nnx.Intermediate, 'y', y)
    ...     return y
    >>> out, found = nnx.capture(Double(), nnx.Intermediate)(jnp.ones(2))
    >>> found['y'][0].tolist()
    [2.0, 2.0]

How it works: for the duration of the call every Module under the root holds,
in the data attribute ``module.CAPTURES``, one Variable per captured kind whose
value is a dict ``name -> value``. ``sow`` and ``perturb`` write there, and
because those Variables are ordinary state, ``nnx.jit`` / ``nnx.vmap`` /
``nnx.scan`` / ``nnx.grad`` inside the call carry them in and out like any
other Variable. Afterwards they are read into States and removed.

Gradients of intermediates: ``capture(model, nnx.Perturbation)`` creates zero
perturbations; passing them as ``init=`` to a capture inside ``nnx.grad`` and
differentiating with respect to them gives d loss / d intermediate::

    _, perturbations = nnx.capture(model, nnx.Perturbation)(x)
    def loss(model, perturbations, x):
      return nnx.capture(model, nnx.Intermediate, init=perturbations)(x)
    (grads, d_intermediates), sown = nnx.grad(loss, argnums=(0, 1), has_aux=True)(
        model, perturbations, x)
"""
from __future__ import annotations

import functools
import inspect
import types
import typing as tp

from arbax.module import CAPTURES, iter_modules
from arbax.pytree import Pytree, data
from arbax.state import State, from_flat_state
from arbax.variables import Variable

__all__ = ['capture']


def capture(fn: tp.Callable | type[Variable], *var_types: type[Variable],
            init: tp.Mapping | None = None, method_outputs: type[Variable] | None = None):
  """Wrap ``fn`` so it also returns the values its Modules sow / perturb, one State per kind.

  ``fn`` may be a Module (its ``__call__`` runs), a bound method of a Module, or
  a function whose first argument holds the Modules (a Module, or a container of
  them). ``nnx.capture(nnx.Intermediate)`` (kinds only) returns a decorator.
  The Modules are left as they were after the call.

      >>> import arbax as nnx
      >>> class Double(nnx.Module):
      ...   def __call__(self, x):
      ...     self.sow(nnx.Intermediate, 'y', 2 * x)
      ...     return 2 * x
      >>> out, found = nnx.capture(Double(), nnx.Intermediate)(1.0)
      >>> out, found['y'][...]
      (2.0, (2.0,))
      >>> @nnx.capture(nnx.Intermediate, method_outputs=nnx.Intermediate)
      ... def run(model, x):
      ...   return model(x)
      >>> sorted(run(Double(), 3.0)[1])          # __call__'s output is sown too
      ['__call__', 'y']

  Args:
    fn: what to run.
    *var_types: the Variable kinds to return (``nnx.Intermediate``, ``nnx.Perturbation``, ...).
    init: a State as returned by an earlier capture; its values start the
      captured dicts (perturbations to differentiate with respect to).
    method_outputs: a Variable kind; each public method (and ``__call__``) of
      the Modules' own classes then sows its output under the method's name.

  Returns:
    A function returning ``out`` when no kind is given, ``(out, state)`` for one
    kind and ``(out, state_1, ..., state_n)`` for several.
  """
  if isinstance(fn, type) and issubclass(fn, Variable):
    kinds = (fn, *var_types)
    return lambda actual: capture(actual, *kinds, init=init, method_outputs=method_outputs)
  owner = _owner(fn)

  def captured(*args, **kwargs):
    root = owner if owner is not None else _first_argument(fn, args)
    _install(root, var_types, _seeds_by_module(init))
    patched = _sow_method_outputs(root, method_outputs) if method_outputs is not None else []
    try:
      out = _current(fn, patched)(*args, **kwargs)
      states = _collect(root, var_types)
    finally:
      _restore(patched)
      _uninstall(root)
    return out if not var_types else (out, *states)

  if inspect.isfunction(fn) or inspect.ismethod(fn):
    captured = functools.wraps(fn)(captured)
  return captured


def _owner(fn) -> Pytree | None:
  if isinstance(fn, Pytree):
    return fn
  owner = getattr(fn, '__self__', None) if inspect.ismethod(fn) else None
  return owner if isinstance(owner, Pytree) else None


def _first_argument(fn, args):
  if not args:
    raise TypeError(f'nnx.capture({getattr(fn, "__name__", fn)!r}) was called without arguments: '
                    'a wrapped function takes the Module (or a container of Modules) to capture '
                    'from as its first argument. Capture a Module or a bound method instead '
                    '(nnx.capture(model, ...)).')
  return args[0]


def _seeds_by_module(init) -> dict[tuple, dict[str, Variable]]:
  """``{module path: {name: Variable}}`` from a captured State (the Variables are its leaves)."""
  seeds: dict[tuple, dict[str, Variable]] = {}

  def walk(level, path):
    for key, value in level.items():
      if isinstance(value, Variable):
        seeds.setdefault(path, {})[key] = value
      elif isinstance(value, tp.Mapping):
        walk(value, (*path, key))

  if init:
    walk(init, ())
  return seeds


def _install(root, kinds, seeds) -> None:
  for path, module in iter_modules(root, graph=True):
    values: dict[type, dict] = {kind: {} for kind in kinds}
    for name, var in seeds.get(path, {}).items():
      values.setdefault(type(var), {})[name] = var.get_value()
    setattr(module, CAPTURES, data(tuple(kind(found) for kind, found in values.items())))


def _uninstall(root) -> None:
  for _, module in iter_modules(root, graph=True):
    if CAPTURES in module.__dict__:
      delattr(module, CAPTURES)


def _collect(root, kinds) -> list[State]:
  """One State per kind: ``module path + (name,) -> kind(value)``."""
  flat: dict[type, list] = {kind: [] for kind in kinds}
  for path, module in iter_modules(root, graph=True):
    for var in module.__dict__.get(CAPTURES, ()):
      if type(var) in flat:
        flat[type(var)].extend(((*path, name), type(var)(value))
                               for name, value in var.get_value().items())
  return [from_flat_state(flat[kind]) for kind in kinds]


def _sow_method_outputs(root, kind: type[Variable]) -> list[tuple[type, str, tp.Any]]:
  """Make the public methods and ``__call__`` defined by each Module class under ``root`` sow
  their output as ``kind``; return what to put back. Inherited methods are left alone (the
  class that defines them is patched if one of its instances is present)."""
  patched = []
  for cls in {type(m) for _, m in iter_modules(root, graph=True)}:
    for name, method in list(vars(cls).items()):
      if (name == '__call__' or not name.startswith('_')) and _plain_method(method):
        patched.append((cls, name, method))
        setattr(cls, name, _sowing(method, name, kind))
  return patched


def _plain_method(method) -> bool:
  if isinstance(method, (type, staticmethod, classmethod, property)):
    return False
  return callable(method) and not getattr(method, '_arbax_sows_output', False)


def _sowing(method, name: str, kind: type[Variable]):
  def sow_output(self, *args, **kwargs):
    out = method(self, *args, **kwargs)
    self.sow(kind, name, out)
    return out
  wrapped: tp.Any = functools.wraps(method)(sow_output)  # Any: it gains a marker attribute
  wrapped._arbax_sows_output = True
  return wrapped


def _current(fn, patched):
  """``fn``, or for a bound method whose function was just patched, the patched one (a bound
  method holds its function, so it would not see the patch)."""
  func = getattr(fn, '__func__', None)
  for cls, name, method in patched:
    if method is func and isinstance(fn.__self__, cls):
      return types.MethodType(vars(cls)[name], fn.__self__)
  return fn


def _restore(patched) -> None:
  for cls, name, method in reversed(patched):
    setattr(cls, name, method)
