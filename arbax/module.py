"""Module: a Pytree with the conveniences of a layer (sow, perturb, train/eval, iteration, views).

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Block(nnx.Module):
    ...   def __init__(self):
    ...     self.deterministic = False
    ...   def __call__(self, x):
    ...     self.sow(nnx.Intermediate, 'seen', x.sum())
    ...     return x
    >>> b = Block()
    >>> _, seen = nnx.capture(b, nnx.Intermediate)(jnp.ones(3))
    >>> seen['seen'][...]
    (Array(3., dtype=float32),)
    >>> b.eval(); b.deterministic
    True
"""
from __future__ import annotations

import enum
import functools
import inspect
import typing as tp
import warnings

import jax
import jax.numpy as jnp

from arbax import _settings, api, caches
from arbax import filters as filterlib
from arbax.pytree import Dict, List, Pytree, node_parts
from arbax.variables import Perturbation, Variable, variable_type_from_name


__all__ = ['Module', 'Sequential', 'iter_modules', 'iter_children', 'iter_module_children', 'view',
           'view_info', 'with_attributes', 'set_metadata', 'CAPTURES', 'M']

# While ``nnx.capture`` runs, each Module holds its capture Variables (one per kind, each a
# dict ``name -> value``) in this data attribute, so transforms carry them like any state.
CAPTURES = '__captures__'


_MISSING = object()


def _append(xs, x):
  return (*xs, x)


def _empty():
  return ()


def _kind(variable_type: type[Variable] | str) -> type[Variable]:
  if isinstance(variable_type, str):
    return variable_type_from_name(variable_type, allow_register=True)
  return variable_type


class _Outside(enum.Enum):
  CAPTURE = 0  # an enum member so that `is _NOT_CAPTURING` narrows for type checkers


_NOT_CAPTURING: tp.Final = _Outside.CAPTURE


def _capture_of(module: 'Module', kind: type[Variable]
                ) -> Variable | tp.Literal[_Outside.CAPTURE] | None:
  """The capture Variable of exactly ``kind`` on ``module``; None when a capture runs without
  that kind; ``_NOT_CAPTURING`` outside nnx.capture."""
  captures = module.__dict__.get(CAPTURES)
  if captures is None:
    return _NOT_CAPTURING
  return next((var for var in captures if type(var) is kind), None)


def _deprecated_outside_capture(what: str) -> None:
  warnings.warn(f'Module.{what}() outside nnx.capture(...) stores into a Module attribute, which '
                'is deprecated in NNX. Run the call under nnx.capture(fn, <Variable type>) to '
                'get the values back as a State.', DeprecationWarning, stacklevel=3)


class Module(Pytree):
  """Base class of layers and models: a Pytree with the conveniences of a layer.

  Assign Variables, sub-Modules and plain values as attributes in ``__init__``;
  the State API and the transforms find the Variables by walking the
  attributes. On top of ``Pytree`` a Module can record intermediates
  (``sow``, ``perturb``), switch between training and evaluation
  (``train``, ``eval``, ``set_attributes``) and make views (``view``).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class MLP(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.hidden = nnx.Linear(2, 8, rngs=rngs)
      ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
      ...     self.out = nnx.Linear(8, 1, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.out(self.dropout(nnx.relu(self.hidden(x))))
      >>> model = MLP(nnx.Rngs(0))
      >>> list(nnx.state(model, nnx.Param))       # the Variables, found by attribute
      ['hidden', 'out']
      >>> model.eval()                            # Dropout off: deterministic=True
      >>> model(jnp.ones((4, 2))).shape
      (4, 1)
  """

  def sow(self, variable_type: type[Variable] | str, name: str, value,
          reduce_fn: tp.Callable = _append, init_fn: tp.Callable = _empty) -> bool:
    """Record ``value`` under ``name`` (appended to a tuple by default).

    Under ``nnx.capture(fn, variable_type)`` the value goes to the State capture
    returns and ``True`` is returned; a kind that is not being captured is
    dropped (``False``). Outside capture it is stored in the ``variable_type``
    Variable ``self.<name>`` (deprecated, as in NNX).

        >>> import jax.numpy as jnp, arbax as nnx
        >>> class Probe(nnx.Module):
        ...   def __call__(self, x):
        ...     self.sow(nnx.Intermediate, 'total', x.sum())
        ...     self.sow(nnx.Intermediate, 'total', 2 * x.sum())
        ...     return x
        >>> _, found = nnx.capture(Probe(), nnx.Intermediate)(jnp.ones(3))
        >>> [float(v) for v in found['total'][...]]
        [3.0, 6.0]

    Args:
      variable_type: the Variable kind (``nnx.Intermediate``) or a registered name.
      name: where the value is recorded.
      value: what is recorded.
      reduce_fn: ``reduce_fn(previous, value)`` combines with what is there.
      init_fn: ``init_fn()`` gives ``previous`` for the first value.

    Returns:
      Whether the value was recorded.
    """
    kind = _kind(variable_type)
    store = _capture_of(self, kind)
    if store is None:
      return False
    if store is not _NOT_CAPTURING:
      store[name] = reduce_fn(store[name] if name in store else init_fn(), value)
      return True
    existing = getattr(self, name, _MISSING)
    if existing is _MISSING:
      setattr(self, name, kind(reduce_fn(init_fn(), value)))
    elif not isinstance(existing, Variable):
      raise ValueError(f"sow: expected '{name}' to be a Variable, got {type(existing).__name__} "
                       f'(attribute {name!r} of {type(self).__name__}). Sow under another name.')
    elif type(existing) is not kind:
      raise ValueError(f"sow: expected '{name}' to be of type '{kind.__name__}', got "
                       f"'{type(existing).__name__}' (attribute {name!r} of {type(self).__name__})."
                       ' Sow under another name, or with the same Variable type.')
    else:
      existing.set_value(reduce_fn(existing.get_value(), value))
    _deprecated_outside_capture('sow')
    return True

  def perturb(self, name: str, value, variable_type: type[Variable] | str = Perturbation):
    """``value`` plus a zero perturbation named ``name``, whose gradient is d loss / d ``value``.

    Run once under ``nnx.capture(fn, nnx.Perturbation)`` to create the
    perturbations, then pass them as ``init=`` to a capture inside ``nnx.grad``
    and differentiate with respect to them. Outside capture the perturbation is
    the Variable ``self.<name>`` (deprecated).

        >>> import jax.numpy as jnp, arbax as nnx
        >>> class Triple(nnx.Module):
        ...   def __call__(self, x):
        ...     return 3 * self.perturb('h', x)
        >>> model = Triple()
        >>> _, perturbations = nnx.capture(model, nnx.Perturbation)(jnp.ones(2))
        >>> def loss(model, perturbations, x):
        ...   return nnx.capture(model, nnx.Intermediate, init=perturbations)(x)[0].sum()
        >>> grads = nnx.grad(loss, argnums=1)(model, perturbations, jnp.ones(2))
        >>> grads['h'][...].tolist()                 # d loss / d h
        [3.0, 3.0]

    Args:
      name: the perturbation's name.
      value: the intermediate value (any pytree of arrays).
      variable_type: the Variable kind of the perturbation.

    Returns:
      ``value`` plus the perturbation (``value`` itself when the kind is not captured).
    """
    kind = _kind(variable_type)
    store = _capture_of(self, kind)
    if store is None:
      return value
    if store is not _NOT_CAPTURING:
      if name not in store:
        store[name] = jax.tree.map(jnp.zeros_like, value)
      return store[name] + value
    if hasattr(self, name):
      existing = getattr(self, name)
      if not isinstance(existing, kind):
        raise ValueError(f"perturb: expected '{name}' to be of type '{kind.__name__}', got "
                         f"'{type(existing).__name__}' (attribute {name!r} of "
                         f'{type(self).__name__}). Perturb under another name.')
      previous = existing.get_value()
    else:
      previous = jax.tree.map(jnp.zeros_like, value)
      setattr(self, name, kind(previous))
    _deprecated_outside_capture('perturb')
    return previous + value

  def iter_modules(self) -> tp.Iterator[tuple[tuple, 'Module']]:
    """Deprecated spelling of ``nnx.iter_modules(self)``."""
    warnings.warn("'module.iter_modules()' is deprecated; call nnx.iter_modules(module).",
                  DeprecationWarning, stacklevel=2)
    return iter_modules(self)

  def iter_children(self) -> tp.Iterator[tuple[tp.Any, tp.Any]]:
    """Deprecated spelling of ``nnx.iter_children(self)``."""
    warnings.warn("'module.iter_children()' is deprecated; call nnx.iter_children(module).",
                  DeprecationWarning, stacklevel=2)
    return iter_children(self)

  def set_attributes(self, *filters, raise_if_not_found: bool = True, graph: bool | None = None,
                     **attributes) -> None:
    """Set ``attributes`` on this Module and every sub-Module that already has them, in place.

        >>> import arbax as nnx
        >>> class Block(nnx.Module):
        ...   def __init__(self, rngs):
        ...     self.linear = nnx.Linear(2, 2, rngs=rngs)
        ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
        >>> block = Block(nnx.Rngs(0))
        >>> block.set_attributes(nnx.Dropout, rate=0.1)      # Dropouts only
        >>> block.dropout.rate
        0.1

    Args:
      *filters: only Modules matching one of them are changed (all when none).
      raise_if_not_found: raise a ValueError when no selected Module has one of
        ``attributes``.
      graph: graph mode (shared sub-Modules allowed) or tree mode; default: the
        current mode.
      **attributes: the names and values to set.
    """
    predicate = filterlib.to_predicate(filters) if filters else filterlib.Everything()
    missing = set(attributes)
    for path, module in iter_modules(self, graph=graph):
      if predicate(path, module):
        missing.difference_update(_set_existing(module, attributes))
    if missing and raise_if_not_found:
      raise ValueError(_not_found_message(missing, type(self).__name__))

  def train(self, **attributes) -> None:
    """Training behaviour, in place: Dropout active, BatchNorm uses batch statistics.

    Sets ``deterministic=False`` and ``use_running_average=False`` (and
    ``attributes``) wherever a sub-Module has them.

        >>> import arbax as nnx
        >>> model = nnx.Dropout(0.5, deterministic=True, rngs=nnx.Rngs(0))
        >>> model.train()
        >>> model.deterministic
        False

    Args:
      **attributes: more attributes to set where they exist.
    """
    self.set_attributes(deterministic=False, use_running_average=False, **attributes,
                        raise_if_not_found=False)

  def eval(self, **attributes) -> None:
    """Evaluation behaviour, in place: Dropout off, BatchNorm uses its running averages.

    Sets ``deterministic=True`` and ``use_running_average=True`` (and
    ``attributes``) wherever a sub-Module has them.

        >>> import arbax as nnx
        >>> model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model.use_running_average
        True

    Args:
      **attributes: more attributes to set where they exist.
    """
    self.set_attributes(deterministic=True, use_running_average=True, **attributes,
                        raise_if_not_found=False)

  def view(self, **kwargs) -> 'Module':
    """``nnx.view(self, **kwargs)``, ignoring keys no sub-Module's ``set_view`` accepts.

        >>> import arbax as nnx
        >>> model = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
        >>> model.view(deterministic=True, unknown_key=1).deterministic, model.deterministic
        (True, False)

    Args:
      **kwargs: the mode switches.

    Returns:
      A copy of this Module sharing its Variables.
    """
    return view(self, raise_if_not_found=False, **kwargs)


def _set_existing(module, attributes: dict) -> list[str]:
  """Set the ``attributes`` ``module`` already has; return their names."""
  found = [name for name in attributes if hasattr(module, name)]
  for name in found:
    setattr(module, name, attributes[name])
  return found


def _not_found_message(missing, where: str) -> str:
  return (f'Could not find at least one instance of the following attributes: {sorted(missing)} '
          f'in {where} or its sub-Modules. Check the names, or pass raise_if_not_found=False to '
          'set only the ones that exist.')


def is_module(x) -> bool:
  """Whether ``x`` counts as a Module when iterating (nnx.List / nnx.Dict do, as in NNX)."""
  return isinstance(x, (Module, List, Dict))


M = tp.TypeVar('M', bound=Module)  # ``nnx.M``: a Module type in annotations


# -- iteration -----------------------------------------------------------------
def iter_modules(module, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tuple, Module]]:
  """``(path, module)`` for every Module in ``module``, children first, itself last at ``()``.

      >>> import arbax as nnx
      >>> class Block(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 2, rngs=rngs)
      ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
      >>> [(path, type(m).__name__) for path, m in nnx.iter_modules(Block(nnx.Rngs(0)))]
      [(('dropout',), 'Dropout'), (('linear',), 'Linear'), ((), 'Block')]

  Args:
    module: the root (any Pytree or container of them).
    graph: graph mode visits a shared Module once; tree mode raises on sharing.

  Returns:
    An iterator of ``(path, module)`` in pytree (sorted key) order; ``nnx.List``
    and ``nnx.Dict`` count as Modules.
  """
  return ((path, x) for path, x in api.iter_graph(module, graph=graph) if is_module(x))


def _is_graph_node(x) -> bool:
  return isinstance(x, (Pytree, Variable))


def _direct_children(node, graph: bool, what: str) -> list[tuple[tp.Any, tp.Any]]:
  """``[(key, child)]`` one level below ``node``, in pytree order."""
  if isinstance(node, Pytree) and not type(node)._arbax_pytree:
    if graph:
      keys, _ = node_parts(node)
      return [(k, node.__dict__[k]) for k in keys]
    raise ValueError(f"Cannot use '{what}' with graph=False on a '{type(node).__name__}' instance "
                     'that has pytree=False: it is not a JAX pytree. Pass graph=True.')
  if isinstance(node, Variable):
    raise ValueError(f'Expected a node with children, got a {type(node).__name__}: Variables '
                     f'are leaves. Pass the Module that holds it to {what}.')
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
  if len(flat) == 1 and flat[0][1] is node:
    mode = 'graph' if graph else 'pytree'
    raise ValueError(f'Expected a {mode} node, got {type(node).__name__}: it has no children. '
                     f'Pass a Module, an nnx.List / nnx.Dict or a container of them to {what}.')
  return [(_key_name(path[0]), child) for path, child in flat]


def _key_name(entry):
  for attr in ('name', 'key', 'idx'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def iter_children(node, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tp.Any, tp.Any]]:
  """``(key, child)`` for each Module, Pytree or Variable held directly by ``node``.

  Arrays, static values and plain containers are skipped; nothing deeper is visited.

      >>> import arbax as nnx
      >>> [key for key, _ in nnx.iter_children(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))]
      ['bias', 'kernel']

  Args:
    node: a Module, Pytree or container.
    graph: graph or tree mode (default: the current mode).

  Returns:
    An iterator of ``(key, child)`` in pytree order.
  """
  graph = _settings.graph_mode(graph)
  for key, child in _direct_children(node, graph, 'iter_children'):
    if _is_graph_node(child):
      yield key, child


def iter_module_children(node, /, *, graph: bool | None = None) -> tp.Iterator[tuple[tp.Any, tp.Any]]:
  """``(key, child)`` for each Pytree (Module, nnx.List, Rngs, ...) held directly by ``node``.

  Unlike ``iter_children`` it skips Variables.

      >>> import arbax as nnx
      >>> class Block(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(2, 2, rngs=rngs)
      ...     self.scale = nnx.Param(1.0)
      >>> [key for key, _ in nnx.iter_module_children(Block(nnx.Rngs(0)))]
      ['linear']

  Args:
    node: a Module, Pytree or container.
    graph: graph or tree mode (default: the current mode).

  Returns:
    An iterator of ``(key, child)`` in pytree order.
  """
  graph = _settings.graph_mode(graph)
  for key, child in _direct_children(node, graph, 'iter_module_children'):
    if isinstance(child, Pytree):
      yield key, child


# -- views ---------------------------------------------------------------------
def with_attributes(node, /, *, only: tp.Any = ..., raise_if_not_found: bool = True,
                    graph: bool | None = None, **attributes):
  """A copy of ``node`` sharing its Variables, with ``attributes`` set where Modules have them.

  ``node`` itself is unchanged; training through the copy trains ``node``.

      >>> import arbax as nnx
      >>> model = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
      >>> eval_model = nnx.with_attributes(model, deterministic=True)
      >>> eval_model.deterministic, model.deterministic
      (True, False)

  Args:
    node: the object to copy.
    only: a filter selecting the Modules to change (all by default).
    raise_if_not_found: raise a ValueError when no selected Module has one of ``attributes``.
    graph: graph or tree mode (default: the current mode).
    **attributes: the names and values to set.

  Returns:
    The copy.
  """
  predicate = filterlib.to_predicate(only)
  missing = set(attributes)

  def set_on(path, x):
    if is_module(x) and predicate(path, x):
      missing.difference_update(_set_existing(x, attributes))
    return x

  out = api.recursive_map(set_on, node, graph=graph)
  if missing and raise_if_not_found:
    raise ValueError(_not_found_message(missing, type(node).__name__))
  return out


@caches.register
@functools.lru_cache(maxsize=1024)
def _view_params(cls: type) -> tuple[bool, frozenset]:
  """(takes ``**kwargs``, the names it takes) of ``cls.set_view``; read once per class."""
  params = inspect.signature(cls.set_view).parameters.values()
  any_key = any(p.kind is p.VAR_KEYWORD for p in params)
  names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
  return any_key, names - {'self'}


_N = tp.TypeVar('_N')


def _has_set_view(x) -> bool:
  return isinstance(x, Pytree) and callable(getattr(type(x), 'set_view', None))


def view(node: _N, /, *, only: tp.Any = ..., raise_if_not_found: bool = True,
         graph: bool | None = None, **kwargs) -> _N:
  """A copy of ``node`` sharing its Variables, switched by each Module's ``set_view`` method.

  Every selected Module whose class defines ``set_view(self, <keys>...)`` is
  called with the ``kwargs`` it accepts (all of them if it takes ``**kwargs``);
  ``nnx.view_info(node)`` lists the keys. ``node`` itself is unchanged.

      >>> import arbax as nnx
      >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5))
      >>> eval_model = nnx.view(model, deterministic=True)
      >>> eval_model.layers[1].deterministic, model.layers[1].deterministic
      (True, False)
      >>> eval_model.layers[0].kernel is model.layers[0].kernel
      True

  Args:
    node: the object to copy.
    only: a filter selecting the Modules (all by default).
    raise_if_not_found: raise a ValueError naming keys no ``set_view`` accepts.
    graph: graph or tree mode (default: the current mode).
    **kwargs: the mode switches.

  Returns:
    The copy.
  """
  predicate = filterlib.to_predicate(only)
  unused = set(kwargs)

  def switch(path, x):
    if _has_set_view(x) and predicate(path, x):
      any_key, names = _view_params(type(x))
      if any_key:
        x.set_view(**kwargs)
        unused.clear()
      else:
        x.set_view(**{k: v for k, v in kwargs.items() if k in names})
        unused.difference_update(names)
    return x

  out = api.recursive_map(switch, node, graph=graph)
  if unused and raise_if_not_found:
    raise ValueError(f'Unused keys found in nnx.view: {sorted(unused)}. No selected Module of '
                     f'{type(node).__name__} has a set_view method that accepts them; '
                     'nnx.view_info(node) lists the keys each Module accepts.')
  return tp.cast(_N, out)  # recursive_map rebuilds node's own structure


def view_info(node, /, *, only: tp.Any = ..., graph: bool | None = None) -> str:
  """What ``nnx.view`` can switch in ``node``.

  For each Module class with a ``set_view`` method (sorted by name): its keys
  with their types, defaults and documentation.

      >>> import arbax as nnx
      >>> class Noisy(nnx.Module):
      ...   def __init__(self):
      ...     self.noise = True
      ...   def set_view(self, noise: bool = True):
      ...     '''Switch the noise on or off.
      ...
      ...     Args:
      ...       noise: add noise to the input.
      ...     '''
      ...     self.noise = noise
      >>> print(nnx.view_info(Noisy()))
      Noisy:
        noise: bool = True
          add noise to the input.

  Args:
    node: the object to describe.
    only: a filter selecting the Modules (all by default).
    graph: graph or tree mode (default: the current mode).

  Returns:
    The description; an empty string when no selected Module has ``set_view``.
  """
  predicate = filterlib.to_predicate(only)
  classes = {type(x) for path, x in api.iter_graph(node, graph=graph)
             if _has_set_view(x) and predicate(path, x)}
  lines: list[str] = []
  for cls in sorted(classes, key=lambda c: c.__qualname__):
    lines.append(f'{cls.__qualname__}:')
    docs = _documented_args(inspect.getdoc(cls.set_view) or '')
    for p in inspect.signature(cls.set_view).parameters.values():
      if p.name == 'self' or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      lines.append('  ' + _describe_param(p))
      lines.extend(docs.get(p.name, ()))
  return '\n'.join(lines)


def _describe_param(p: inspect.Parameter) -> str:
  text = p.name
  if p.annotation is not p.empty:
    ann = p.annotation
    text += ': ' + (ann.__name__ if isinstance(ann, type) else str(ann))
  if p.default is not p.empty:
    text += f' = {p.default!r}'
  return text


def _documented_args(doc: str) -> dict[str, list[str]]:
  """``{name: description lines, indented by 4}`` from the ``Args:`` section of a Google-style
  docstring."""
  lines = doc.splitlines()
  start = next((i for i, line in enumerate(lines) if line.strip() == 'Args:'), None)
  if start is None:
    return {}
  base = len(lines[start]) - len(lines[start].lstrip())
  out: dict[str, list[str]] = {}
  entry_indent = None
  current: list[str] = []
  for line in lines[start + 1:]:
    if not line.strip():
      continue
    indent = len(line) - len(line.lstrip())
    if indent <= base:
      break  # the next section (Returns:, ...)
    if entry_indent is None:
      entry_indent = indent
    if indent == entry_indent and ':' in line:
      name, _, text = line.strip().partition(':')
      current = out[name.split(' ')[0]] = ['    ' + text.strip()]
    else:
      current.append('    ' + line.strip())
  return out


def set_metadata(node, /, *, only: tp.Any = Variable, **metadata) -> None:
  """Set ``metadata`` on every Variable in ``node`` that matches ``only``, in place.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> nnx.set_metadata(model, only=nnx.Param, frozen=True)
      >>> model.kernel.frozen, model.bias.frozen
      (True, True)

  Args:
    node: an object, or any pytree of objects (walked in graph mode).
    only: a filter selecting the Variables (all Variables by default).
    **metadata: the entries to set (``hijax``, ``ref``, ``eager_sharding`` are
      fixed at creation: changing them is a ValueError).
  """
  predicate = filterlib.to_predicate(only)
  for path, obj in list(api.iter_graph(node, graph=True)):
    if isinstance(obj, Variable) and predicate(path, obj):
      obj.set_metadata(**metadata)


# -- Sequential ----------------------------------------------------------------
@caches.register
@functools.lru_cache(maxsize=256)
def _signature_takes(fn_type_or_fn, name: str) -> bool:
  try:
    params = inspect.signature(fn_type_or_fn).parameters.values()
  except (TypeError, ValueError):  # builtins without a signature
    return False
  return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             for p in params)


def takes_keyword(fn: tp.Callable, name: str) -> bool:
  """Whether ``fn`` has a parameter ``name`` that can be passed by keyword (not ``**kwargs``)."""
  if isinstance(fn, Module):  # one answer per class, read once
    return _signature_takes(type(fn).__call__, name)
  try:
    return _signature_takes(fn, name)
  except TypeError:  # unhashable callable
    return _signature_takes.__wrapped__(fn, name)


class Sequential(Module):
  """Calls its layers in order, each on the previous output.

  The first layer gets the call's arguments; a tuple output becomes the next
  layer's positional arguments and a dict output its keyword arguments.
  ``rngs=`` is passed to every layer whose signature has an ``rngs`` parameter.
  With no layers, the call returns its input.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(2, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 1, rngs=rngs))
      >>> model(jnp.ones((3, 2))).shape
      (3, 1)

  Args:
    *fns: the layers: Modules or functions (kept in ``.layers``, an ``nnx.List``).
  """

  def __init__(self, *fns: tp.Callable):
    self.layers = List(fns)

  def __call__(self, *args, rngs=None, **kwargs):
    if len(self.layers) == 0:
      return args[0] if len(args) == 1 else args if args else kwargs if kwargs else None
    out = None
    for i, f in enumerate(self.layers):
      if not callable(f):
        raise TypeError(f'Sequential.layers[{i}] is not callable: {f!r}. Every layer must be a '
                        'Module or a function.')
      if i > 0:
        args, kwargs = ((out, {}) if isinstance(out, tuple) else ((), dict(out))
                        if isinstance(out, dict) else ((out,), {}))
      if rngs is not None and takes_keyword(f, 'rngs'):
        kwargs['rngs'] = rngs
      out = f(*args, **kwargs)
    return out
