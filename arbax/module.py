"""Module: a Pytree with the conveniences of a layer (sow, perturb, train/eval, iteration).

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self):
    ...     self.deterministic = False
    ...   def __call__(self, x):
    ...     self.sow(nnx.Intermediate, 'seen', x.sum())
    ...     return x
    >>> b = Block(); _ = b(jnp.ones(3)); b.eval()
    >>> b.deterministic, b.seen[...]
    (True, (Array(3., dtype=float32),))
"""
from __future__ import annotations

import typing as tp

import jax.numpy as jnp

from arbax import filters as filterlib
from arbax.pytree import Dict, List, Pytree, node_parts
from arbax.variables import Intermediate, Perturbation, Variable


__all__ = ['Module', 'Sequential', 'iter_modules', 'iter_children', 'iter_module_children', 'view',
           'with_attributes', 'set_metadata']


def _append(xs, x):
  return (*xs, x)


def _empty():
  return ()


_NAMED_KINDS: dict[str, type[Variable]] = {}


def _kind_named(name: str) -> type[Variable]:
  """The Variable kind for ``sow('name', ...)``: one class per name, so repeated sows agree."""
  kind = _NAMED_KINDS.get(name)
  if kind is None:
    kind = _NAMED_KINDS[name] = type(name, (Variable,), {'__module__': __name__})
  return kind


class Module(Pytree):
  """Base class of layers and models."""

  def sow(self, variable_type: type[Variable] | str, name: str, value, *,
          reduce_fn: tp.Callable = _append, init_fn: tp.Callable = _empty) -> bool:
    """Record ``value`` in the ``variable_type`` Variable ``self.<name>`` (a tuple by default).

    ``reduce_fn(previous, value)`` combines; ``init_fn()`` gives the first previous value.
    """
    if isinstance(variable_type, str):
      variable_type = _kind_named(variable_type)
    existing = self.__dict__.get(name)
    if existing is None:
      setattr(self, name, variable_type(reduce_fn(init_fn(), value)))
    elif isinstance(existing, variable_type):
      existing.set_value(reduce_fn(existing.get_value(), value))
    else:
      raise ValueError(f'sow: attribute {name!r} of {type(self).__name__} holds a '
                       f'{type(existing).__name__}, not a {variable_type.__name__}. Pick another name.')
    return True

  def perturb(self, name: str, value, variable_type: type[Variable] = Perturbation):
    """Add a zero ``variable_type`` Variable ``self.<name>`` to ``value``.

    Its gradient is the gradient with respect to this intermediate ``value``.
    """
    if name not in self.__dict__:
      setattr(self, name, variable_type(jnp.zeros_like(value)))
    return value + self.__dict__[name].get_value()

  def iter_modules(self) -> tp.Iterator[tuple[tuple, 'Module']]:
    """``(path, module)`` for every Module under this one, children first, itself last at ``()``."""
    return iter_modules(self)

  def iter_children(self) -> tp.Iterator[tuple[tp.Any, 'Module']]:
    """``(name, module)`` for each Module held directly in an attribute."""
    return iter_children(self)

  def set_attributes(self, *filters, raise_if_not_found: bool = True, **attrs) -> None:
    """Set ``attrs`` on every sub-Module (matching ``filters``, if given) that already has them."""
    predicate = filterlib.to_predicate(list(filters)) if filters else None
    remaining = set(attrs)
    for path, module in self.iter_modules():
      if predicate is not None and not predicate(path, module):
        continue
      for name, value in attrs.items():
        if hasattr(module, name):
          setattr(module, name, value)
          remaining.discard(name)
    if remaining and raise_if_not_found:
      raise ValueError(f'set_attributes: no sub-Module of {type(self).__name__} has the '
                       f'attribute(s) {sorted(remaining)}. Pass raise_if_not_found=False to ignore.')

  def train(self, **attrs) -> None:
    """Training behaviour: Dropout active, BatchNorm uses batch statistics."""
    self.set_attributes(deterministic=False, use_running_average=False,
                        raise_if_not_found=False, **attrs)

  def eval(self, **attrs) -> None:
    """Evaluation behaviour: Dropout off, BatchNorm uses its running averages."""
    self.set_attributes(deterministic=True, use_running_average=True,
                        raise_if_not_found=False, **attrs)

  def view(self, **attrs) -> 'Module':
    """``nnx.view(self, **attrs)``: a copy sharing this Module's Variables, with ``attrs`` set."""
    return view(self, raise_if_not_found=False, **attrs)


def _is_module(x) -> bool:
  # nnx.List and nnx.Dict count as Modules when iterating, as in NNX.
  return isinstance(x, (Module, List, Dict))


def _children(node):
  """``(path_suffix, child)`` for the Pytrees under ``node``, in pytree (sorted key) order.

  Plain lists, tuples and dicts held as data are looked into, so their items
  get paths like ``('blocks', 0)``.
  """
  if not isinstance(node, Pytree):
    return
  keys, _ = node_parts(node)
  d = node.__dict__
  for key in keys:
    value = d[key]
    if isinstance(value, Pytree):
      yield (key,), value
    elif isinstance(value, (list, tuple)):
      for i, item in enumerate(value):
        if isinstance(item, Pytree):
          yield (key, i), item
    elif isinstance(value, dict):
      for k, item in value.items():
        if isinstance(item, Pytree):
          yield (key, k), item


def iter_modules(module) -> tp.Iterator[tuple[tuple, Module]]:
  """``(path, module)`` for every Module in ``module`` (itself last, at path ``()``).

  Each Module appears once, at its first path; children come before parents.
  """
  seen: set = set()

  def visit(node, path):
    if id(node) in seen:
      return
    seen.add(id(node))
    for suffix, child in _children(node):
      yield from visit(child, path + suffix)
    if _is_module(node):
      yield path, node

  return visit(module, ())


def iter_children(module) -> tp.Iterator[tuple[tp.Any, Module]]:
  """``(name, child)`` for each Module held directly in an attribute of ``module``."""
  for suffix, child in _children(module):
    if len(suffix) == 1 and _is_module(child):
      yield suffix[0], child


def iter_module_children(node, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tp.Any, Module]]:
  """``(name, module)`` for each Module (or nnx.List / nnx.Dict) held directly in an
  attribute of ``node``; Variables and other leaves are skipped."""
  return iter_children(node)


def with_attributes(node, /, *, only: tp.Any = ..., raise_if_not_found: bool = True,
                    graph: bool | None = None, **attributes):
  """A copy of ``node`` sharing its Variables, with ``attributes`` set on the selected
  Modules; ``node`` itself is unchanged.

      eval_model = nnx.with_attributes(model, deterministic=True)
  """
  return view(node, only=only, raise_if_not_found=raise_if_not_found, graph=graph, **attributes)


def set_metadata(node, /, *, only: tp.Any = Variable, **metadata) -> None:
  """Set ``metadata`` on every Variable in ``node`` that matches ``only``, in place.

      nnx.set_metadata(model, only=nnx.Param, differentiable=False)
  """
  from arbax.api import iter_graph
  predicate = filterlib.to_predicate(only)
  for path, obj in list(iter_graph(node, graph=True)):
    if isinstance(obj, Variable) and predicate(path, obj):
      obj.set_metadata(**metadata)


def view(node, /, *, only: tp.Any = ..., raise_if_not_found: bool = True, graph: bool | None = None,
         **attrs):
  """A copy of ``node`` that shares its Variables, with ``attrs`` set on the Modules that have them.

      eval_model = nnx.view(model, deterministic=True)   # model itself is unchanged

  ``only`` (a filter) limits which Modules are changed. Raises ValueError when
  no Module has one of ``attrs`` (unless ``raise_if_not_found=False``).
  """
  from arbax.api import merge, split
  graphdef, state = split(node, graph=True)
  copy = merge(graphdef, state)
  filters = () if only is ... else (only,)
  copy.set_attributes(*filters, raise_if_not_found=raise_if_not_found, **attrs)
  return copy


class Sequential(Module):
  """Calls its layers in order: ``nnx.Sequential(nnx.Linear(2, 4, rngs=rngs), nnx.relu)``."""

  def __init__(self, *fns: tp.Callable):
    self.layers = List(fns)

  def __call__(self, *args, rngs=None, **kwargs):
    out = args
    for i, f in enumerate(self.layers):
      out = f(*out, **kwargs) if i == 0 else f(out)
      if i == 0:
        kwargs = {}
    return out if self.layers else (args[0] if len(args) == 1 else args)
