"""Iteration transforms: ``vmap``, ``pmap``, ``scan``, ``fori_loop``, ``while_loop``.

Each wraps the JAX transform of the same name and carries the state of the
objects it is given: Variable updates made inside come back to the caller's
objects, on the axis they went in with. The classic "scan over layers": create
N layers at once, then apply them one after the other.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Layer(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.w = nnx.Param(rngs.normal((2, 2)))
    ...   def __call__(self, x):
    ...     return x @ self.w
    >>> @nnx.split_rngs(splits=3)
    ... @nnx.vmap(in_axes=(0,), out_axes=0)
    ... def create(rngs):
    ...   return Layer(rngs)
    >>> layers = create(nnx.Rngs(0))          # layers.w.shape == (3, 2, 2)
    >>> @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    ... def forward(x, layer):
    ...   return layer(x)
    >>> forward(jnp.ones((1, 2)), layers).shape
    (1, 2)

Axes of an argument are a *prefix* of it: an int (all its state mapped on that
axis), ``None`` (broadcast), ``nnx.Carry`` (scan's loop state), a tuple / list /
dict of those for containers, ``nnx.StateAxes({filter: axis, ...})`` (per kind of
state; graph mode with graph updates) or what ``nnx.prefix(obj, {...}, graph=...)``
returns (per Variable). In graph mode with graph updates (NNX's default)
structural changes made inside (new attributes, new Variables, replaced
submodules) reach the caller's objects; new Variables take the axis their
argument's prefix gives their path.

Called outside any JAX trace, ``vmap``, ``scan`` and the loops trace the function
once per structure of their arguments and reuse the compiled call (as
``nnx.jit`` does); under a trace they trace along with it. Nothing is written
back when the function raises.
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import re
import typing as tp
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from arbax import _settings, caches
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.extract import TreeState
from arbax.defs import REF, VAR, numbered
from arbax.graph import flatten, leaf_defs
from arbax.pytree import Pytree
from arbax.sharding import PARTITION_NAME, add_axis, remove_axis
from arbax.state import State, create_path_filters
from arbax.transforms import _propagate as prop
from arbax.variables import Variable, current_trace

__all__ = ['Carry', 'StateAxes', 'vmap', 'pmap', 'scan', 'fori_loop', 'while_loop']


class Carry:
  """Marker for ``scan``'s ``in_axes`` / ``out_axes``: this argument (and output) is the carry.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      ... def cumsum(total, x):
      ...   total = total + x
      ...   return total, total
      >>> cumsum(jnp.array(0.0), jnp.arange(4.0))
      (Array(6., dtype=float32), Array([0., 1., 3., 6.], dtype=float32))
  """


def _is_axis(x) -> bool:
  return x is None or x is Carry or (isinstance(x, int) and not isinstance(x, bool))


def _is_graph_node(x) -> bool:
  return isinstance(x, (Pytree, Variable))


class StateAxes(collections.abc.Mapping):
  """Per-kind axes for the state of an object: ``nnx.StateAxes({nnx.Param: 0, ...: None})``.

  Keys are filters, checked in order; a Variable takes the axis of the first
  filter it matches. Values are an int, ``None`` or ``nnx.Carry`` (scan only).
  A ``State`` of per-Variable axes works too: ``nnx.StateAxes(state)``. Only
  graph mode with graph updates takes StateAxes; elsewhere use ``nnx.prefix``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> axes = nnx.StateAxes({nnx.Param: None, ...: 0})   # params shared, the rest mapped
      >>> ys = nnx.vmap(lambda m, x: m(x), in_axes=(axes, 0))(model, jnp.ones((5, 2)))
      >>> ys.shape
      (5, 3)
  """

  def __init__(self, filter_axes, /):
    if isinstance(filter_axes, State):
      filter_axes = create_path_filters(filter_axes)
    pairs = tuple(filter_axes.items() if isinstance(filter_axes, collections.abc.Mapping)
                  else filter_axes)
    for f, axis in pairs:
      if not _is_axis(axis):
        raise TypeError(f'StateAxes values must be an int, None or nnx.Carry; got {axis!r} '
                        f'for filter {f!r}')
    self.filters = tuple(f for f, _ in pairs)
    self.axes = tuple(a for _, a in pairs)
    self._predicates = tuple(filterlib.to_predicate(f) for f in self.filters)

  def __getitem__(self, key):
    for f, axis in zip(self.filters, self.axes):
      if f == key:
        return axis
    raise KeyError(key)

  def __iter__(self):
    return iter(self.filters)

  def __len__(self):
    return len(self.filters)

  def __eq__(self, other):
    return isinstance(other, StateAxes) and (self.filters, self.axes) == (other.filters, other.axes)

  def __hash__(self):
    return hash((self.filters, self.axes))

  def __repr__(self):
    inner = ', '.join(f'{_filter_repr(f)}: {_filter_repr(a)}'
                      for f, a in zip(self.filters, self.axes))
    return f'StateAxes({{{inner}}})'

  def map_prefix(self, path: tuple, variable) -> tp.Any:
    """The axis of the Variable at ``path`` (relative to its object): the first matching
    filter's."""
    for predicate, axis in zip(self._predicates, self.axes):
      if predicate(path, variable):
        return axis
    raise ValueError(
        f'No axis found for path={path!r}, variable={variable!r}: no filter of {self!r} matches '
        'it. Add a filter for it, e.g. end the StateAxes with `...: None`.')


def _filter_repr(x) -> str:
  if x is Carry:
    return 'Carry'
  return x.__name__ if isinstance(x, type) else repr(x)


# -- prefixes: checking them, and reading the entry for one leaf --------------

def check_prefix(prefix, name: str, fn_name: str, graph: bool, graph_updates: bool) -> None:
  """Refuse what cannot be an axes prefix of ``nnx.<fn_name>`` in this mode, as NNX does.

  A Variable is never a prefix; ``StateAxes`` needs graph mode with graph
  updates; objects (a tree-mode ``nnx.prefix``) need tree mode; ``TreeState``s
  (a graph-mode ``nnx.prefix``) need graph mode without graph updates.

      >>> from arbax.transforms.iteration import check_prefix, StateAxes
      >>> check_prefix((0, None), 'in_axes', 'vmap', graph=True, graph_updates=True)
      >>> check_prefix(StateAxes({...: 0}), 'in_axes', 'vmap', graph=False, graph_updates=False)
      Traceback (most recent call last):
      ValueError: `in_axes` cannot contain `StateAxes` objects when ...
  """
  def is_leaf(x):
    return x is None or isinstance(x, (Variable, StateAxes, TreeState)) or (
        graph and isinstance(x, Pytree))

  for key_path, leaf in jax.tree_util.tree_flatten_with_path(prefix, is_leaf=is_leaf)[0]:
    where = f'`{name}{jax.tree_util.keystr(key_path)}`'
    if isinstance(leaf, Variable):
      raise ValueError(
          f'Found Variable of type {type(leaf).__name__} at {where} for nnx.{fn_name}. Variables '
          'prefixes are not supported: give one axis (an int or None) for the whole Variable '
          'instead of a Variable.')
    if isinstance(leaf, StateAxes) and not (graph and graph_updates):
      raise ValueError(
          f'`{name}` cannot contain `StateAxes` objects when `graph=False` or '
          f'`graph_updates=False` (found at {where} for nnx.{fn_name}). Build per-Variable axes '
          f'with nnx.prefix(obj, {{filter: axis, ...}}, graph=...), or pass graph=True, '
          f'graph_updates=True to nnx.{fn_name}.')
    if isinstance(leaf, Pytree):
      raise ValueError(
          f'Found graph node of type {type(leaf).__name__} at {where} for nnx.{fn_name}. Graph '
          'nodes are not allowed as prefixes when graph=True: make the prefix with '
          f'nnx.prefix(obj, ..., graph=True), or pass graph=False to nnx.{fn_name}.')
    if isinstance(leaf, TreeState) and (not graph or graph_updates):
      raise ValueError(
          f'Found `TreeState` object at {where} for nnx.{fn_name}. `TreeState` objects are only '
          'allowed as prefixes when `graph=True` and `graph_updates=False`: pass those to '
          f'nnx.{fn_name}, or make the prefix with nnx.prefix(obj, ..., graph=False) for tree '
          'mode, or use nnx.StateAxes with graph updates.')


def prefix_at(prefix, path: tuple, leaf, where: str = 'prefix'):
  """The entry of the prefix tree ``prefix`` that covers the leaf at ``path`` of its value.

  Follows ``path`` through tuples, lists and dicts until it meets an axis (an
  int, None or ``nnx.Carry``), a ``StateAxes`` (asked with the rest of the path)
  or what ``nnx.prefix`` made (a ``TreeState``, or an object holding values).

      >>> from arbax.transforms.iteration import prefix_at
      >>> prefix_at((None, {'w': 1}), (1, 'w'), None)
      1
  """
  spec, depth = prefix, 0
  while True:
    if _is_axis(spec):
      return spec
    if isinstance(spec, StateAxes):
      return spec.map_prefix(path[depth:], leaf)
    if isinstance(spec, (TreeState, Pytree)):  # an nnx.prefix tree: its value for this leaf
      _, value = prop.object_prefix(spec, path[depth:], leaf)
      if not _is_axis(value):
        raise ValueError(f'{where}: the prefix object gives {_short(value)} for the leaf at '
                         f'{format_path(path)}; expected an axis (an int or None).')
      return value
    if depth == len(path):
      raise ValueError(f'{where} has {_short(spec)} where the value has a leaf at '
                       f'{format_path(path)}; give an axis (an int or None) there.')
    spec = _child(spec, path[depth], where, path[:depth + 1])
    depth += 1


def _child(spec, key, where: str, path: tuple):
  if isinstance(spec, collections.abc.Mapping):
    if key in spec:
      return spec[key]
  elif isinstance(key, str):
    if not isinstance(spec, (str, bytes)) and hasattr(spec, key):
      return getattr(spec, key)
  elif isinstance(key, int) and isinstance(spec, (tuple, list)):
    try:
      return spec[key]
    except (IndexError, KeyError, TypeError):
      pass
  raise ValueError(f'{where} is not a prefix of the value: it has no entry for {format_path(path)} '
                   f'(it holds {_short(spec)} there). Give one axis for the whole value, or a '
                   'container shaped like it (nnx.prefix builds one for an object).')


def _short(x) -> str:
  text = repr(x)
  return text if len(text) <= 80 else f'a {type(x).__name__}'


def _label(pos) -> str:
  return f'in_axes[{pos}]' if isinstance(pos, int) else f'in_axes (keyword argument {pos!r})'


def _arg_specs(in_axes, n_args: int, name: str) -> list:
  """The prefix of each positional argument."""
  if isinstance(in_axes, list):
    in_axes = tuple(in_axes)
  if isinstance(in_axes, tuple):
    if len(in_axes) != n_args:
      raise ValueError(f'{name} in_axes must be an int, None, or a tuple of entries corresponding '
                       f'to the positional arguments passed to the function, but got '
                       f'len(in_axes)={len(in_axes)}, len(args)={n_args}')
    return list(in_axes)
  return [in_axes] * n_args


def _plain_axes(spec, value, where: str) -> list:
  """Per-leaf axes of a value without objects or Variables (``jax.tree.leaves`` order)."""
  if isinstance(spec, (StateAxes, TreeState)):
    raise ValueError(f'{where} is a {type(spec).__name__} but the argument holds no object or '
                     'Variable; use an int or None for plain arrays.')
  leaves = jax.tree_util.tree_flatten_with_path(value)[0]
  return [prefix_at(spec, tuple(_entry_key(k) for k in kp), leaf, where) for kp, leaf in leaves]


def _entry_key(entry):
  """A JAX key-path entry as the key graph paths use (index, dict key or attribute name)."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _render(path: tuple) -> str:
  """A path of ``flatten((graph args, out))`` as the user sees it: ``.args[0].w`` / ``.out[1]``."""
  if path[0] == 0:
    return prop.argument_path(path[1:])
  rest = path[1:]
  return '.out' + (format_path(rest) if rest else '')


# -- calling conventions shared by the wrappers --------------------------------

class _Signature:
  """Binds keyword arguments to positions (NNX applies ``in_axes`` by position)."""

  def __init__(self, fun):
    try:
      self.signature = inspect.signature(fun)
    except (TypeError, ValueError):
      self.signature = None

  def positional(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if not kwargs or self.signature is None:
      return args, kwargs
    try:
      bound = self.signature.bind(*args, **kwargs)
    except TypeError:
      return args, kwargs
    return tuple(bound.args), dict(bound.kwargs)


_EVAL_TRACE = current_trace()


def _outside_traces() -> bool:
  """Whether no JAX trace is running: then a compiled call can be cached per structure."""
  return current_trace() == _EVAL_TRACE


def _arrays_only(plan: prop.Plan, args: tuple, kwargs: dict, scalars: bool) -> bool:
  """Whether the plain arguments hold only arrays (``scalars``: or Python numbers), so that
  compiling the call does not turn a Python value the function sees into a tracer."""
  kinds = (jax.Array, np.ndarray) + ((int, float, complex, bool) if scalars else ())
  for pos, kind in plan.arguments():
    if kind != prop.PLAIN:
      continue
    value = args[pos] if isinstance(pos, int) else kwargs[pos]
    if isinstance(value, kinds):
      continue
    if not all(isinstance(x, kinds) for x in jax.tree_util.tree_leaves(value)):
      return False
  return True


def _refuse_captured(out, inner: prop.Inner, graph_updates: bool, name: str) -> None:
  """An output Variable made outside the function and not given to it (captured) cannot be
  mapped: NNX refuses it."""
  if out is None or isinstance(out, jax.Array) and not isinstance(out, Variable):
    return
  inputs = {id(n) for n in inner.nodes}
  now = current_trace()
  fl = flatten(out, graph=True, context=f'{name} output')
  for path, leaf in zip(fl.paths, fl.leaves):
    if isinstance(leaf, Variable) and id(leaf) not in inputs and leaf._trace is not now:
      where = '.out' + (format_path(path) if path else '')
      if graph_updates:
        raise ValueError(
            f'Cannot extract graph node from different trace level, got {leaf!r}: the '
            f'{type(leaf).__name__} at {where} was created outside nnx.{name} and not passed '
            'to it. Pass its object as an argument, or return a new Variable (nnx.clone(...)).')
      raise ValueError(
          f'Cannot return captured Variable of type {type(leaf).__name__} from nnx.{name}.\n'
          f'Found at path: {where}\nPass its object as an argument, or return a new Variable '
          '(nnx.clone(...)).')


def _reached_variables(fl) -> list[tuple[tuple, Variable]]:
  """``(path, Variable)`` for every place ``fl`` reaches a Variable: a shared Variable (or one
  inside a shared object) at each of its paths."""
  nodes = fl.nodes
  first: dict = {}
  found: list = []
  for path, d, index in numbered(fl.graphdef.root):
    tag = d.tag
    if index is not None:
      first[index] = path
      if tag == VAR:
        found.append((path, nodes[index]))
    elif tag == REF:
      obj = nodes[d.index]
      if isinstance(obj, Variable):
        found.append((path, obj))
        continue
      base = first.get(d.index)
      if base is None or not isinstance(obj, Pytree):  # a Ref: no Variables below it
        continue
      n = len(base)
      if path[:n] != base:  # a cycle reaches its own ancestor: nothing new below
        found.extend([(path + p[n:], v) for p, v in found if p[:n] == base])
  return found


def _axes_of_variables(fl, axis_at: tp.Callable[[tuple, tp.Any], tp.Any]) -> dict:
  """``{id(Variable): axis}`` over every place ``fl`` reaches each Variable; a Variable given
  two different axes raises NNX's "Inconsistent aliasing detected" naming both places."""
  seen: dict = {}
  for path, var in _reached_variables(fl):
    axis = axis_at(path, var)
    first = seen.get(id(var))
    if first is None:
      seen[id(var)] = (path, axis)
    elif first[1] != axis:
      raise ValueError(
          'Inconsistent aliasing detected. The following nodes have different prefixes '
          f'(axes):\n\n  Node: {type(var).__name__}\n'
          f'  {_render(first[0])}: {first[1]!r}\n  {_render(path)}: {axis!r}\n\n'
          'A shared Variable must get one axis everywhere: make the prefixes agree, or pass '
          'separate Variables.')
  return {key: axis for key, (_, axis) in seen.items()}


def _partition(transform_metadata) -> dict | None:
  """The ``{nnx.PARTITION_NAME: name}`` change vmap/scan apply to Variable metadata, if any."""
  if transform_metadata and PARTITION_NAME in transform_metadata:
    return dict(transform_metadata)
  return None


def _remove_mapped_axes(inner: prop.Inner, leaf_axes: tp.Sequence, change: dict | None) -> None:
  """Inside the transform the input Variables lose the mapped axis from their metadata."""
  if change is None:
    return
  for var, axis in zip(inner.inner_items, leaf_axes):
    if var is not None and isinstance(axis, int) and axis is not Carry:
      remove_axis(var, axis, change)


def _add_mapped_axes(variables: tp.Iterable[tuple[Variable, tp.Any]], change: dict | None) -> None:
  if change is None:
    return
  for var, axis in variables:
    if isinstance(axis, int) and not isinstance(axis, bool):
      add_axis(var, axis, change)


# -- vmap / pmap ---------------------------------------------------------------

_OUT_AXES_ERROR = re.compile(r'out_axes\[<flat index (\d)>\]\[(\d+)\]')


def _keyed(path: tuple) -> str:
  """A path of ``flatten((graph args, out))`` with quoted keys, as JAX writes key paths:
  ``args[0]['count']`` / ``out[1]``."""
  if path[0] == 0:
    head = f'args[{path[2]}]' if path[1] == 0 else f'kwargs[{path[2]!r}]'
    rest = path[3:]
  else:
    head, rest = 'out', path[1:]
  return head + ''.join(f'[{k!r}]' for k in rest)


def _explain_out_axes(e: ValueError, info: dict, name: str):
  """JAX's "got axis spec None but output was batched" names our internal tree: name the
  user's path (the Variable or output) instead, and say the fix."""
  m = _OUT_AXES_ERROR.search(str(e))
  if m is None or 'paths' not in info:
    return e
  part, k = int(m.group(1)), int(m.group(2))
  paths = info['paths'][part]
  if k >= len(paths):
    return e
  path = paths[k]
  if path[0] == 0:
    what = f'the Variable {_keyed(path)}'
    fix = ('It is broadcast (axis None) but was updated with a value that differs across the '
           'mapped axis. Give it an axis (an int, or nnx.StateAxes for that kind of state), or '
           'make the update the same for every item (e.g. reduce it with jax.lax.pmean over '
           'axis_name).')
  else:
    what = f'the output {_keyed(path)}'
    fix = 'It has out_axes None but is different for every item: give it an axis.'
  return ValueError(f'{str(e).replace(m.group(0), what)}. {fix}')


class _MapCall(tp.NamedTuple):
  """What the traced function of one call structure needs (never the caller's objects)."""
  key: prop.CallKey
  leaf_axes: tuple       # per plan leaf: its in axis
  specs: tuple           # per positional argument: its prefix
  in_specs: list         # per dynamic input: what jax.vmap / jax.pmap take


class _Mapped:
  """Shared by vmap and pmap: leaves in with their axes, updates and outputs out with theirs."""

  name = ''
  __call__: tp.Callable[..., tp.Any]  # each subclass defines it

  def __init__(self, fun, *, in_axes, out_axes, graph, graph_updates, transform_metadata):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = _settings.graph_mode(graph)
    self.graph_updates = _settings.graph_updates(graph_updates)
    check_prefix(in_axes, 'in_axes', self.name, self.graph, self.graph_updates)
    check_prefix(out_axes, 'out_axes', self.name, self.graph, self.graph_updates)
    self.in_axes = in_axes
    self.out_axes = out_axes
    self.transform_metadata = transform_metadata
    self._change = _partition(transform_metadata)
    self._signature = _Signature(fun)
    self._last = None       # (plan, _MapCall) reused while the arguments are the same objects
    self._compiled: dict = {}  # (CallKey, leaf axes) -> (compiled callable, info)
    self._last_entry = None    # (_MapCall, its compiled entry): the steady loop's lookup

  def _bind(self, args, kwargs):
    if self.graph and self.graph_updates:
      return self._signature.positional(args, kwargs)
    return args, kwargs

  def _prepare(self, args, kwargs, static_positions=frozenset()):
    last = self._last
    if last is not None and prop.plan_still_valid(last[0], args, kwargs):
      return last
    plan = prop.make_plan(args, kwargs, graph=self.graph, static_positions=static_positions,
                          context=f'tree-mode {self.name}')
    specs = tuple(_arg_specs(self.in_axes, len(args), self.name))
    spec_of = lambda pos: specs[pos] if isinstance(pos, int) else 0  # noqa: E731
    in_specs, leaf_axes = prop.input_specs(
        plan, spec_of, lambda p, path, leaf: prefix_at(p, path, leaf, 'in_axes'), 'axes')
    for pos, kind in plan.arguments():
      if kind == prop.PLAIN:
        _plain_axes(spec_of(pos), args[pos] if isinstance(pos, int) else kwargs[pos],
                    _label(pos))
    self._last = (plan, _MapCall(plan.key, tuple(leaf_axes), specs, in_specs))
    return self._last

  def _body(self, call: _MapCall, holder: prop.Output, info: dict):
    """The function JAX maps: rebuild, call, and fill ``holder`` with the axes of what it
    returns (JAX reads out_axes after tracing)."""
    def body(*inputs):
      inner = prop.Inner(call.key, inputs)
      _remove_mapped_axes(inner, call.leaf_axes, self._change)
      out = inner.call(self.fun)
      mapped = _MappedOutput(self, call, inner, out)
      _add_mapped_axes(mapped.variables(), self._change)
      result = inner.result(out, graph=self.graph, graph_updates=self.graph_updates,
                            name=self.name)
      holder.changed, holder.out_def = result.changed, result.out_def
      holder.values, holder.out_leaves, paths = mapped.axes_for(result)
      info['paths'] = paths
      return result
    return body

  def _transform(self, body, call: _MapCall, holder, plan: prop.Plan, cached: bool, inputs):
    raise NotImplementedError

  def _callable(self, plan, call: _MapCall, args, kwargs, inputs):
    """The mapped function for this call structure: cached (compiled) outside traces."""
    cacheable = self._cacheable(plan, args, kwargs)
    if cacheable:
      last = self._last_entry
      if last is not None and last[0] is call:
        return last[1]
      entry = self._compiled.get((call.key, call.leaf_axes))
      if entry is not None:
        self._last_entry = (call, entry)
        return entry
    holder, info = prop.Output((), None, None, None), {}
    mapped = self._transform(self._body(call, holder, info), call, holder, plan, cacheable,
                             inputs)
    entry = (mapped, info)
    if cacheable:
      self._compiled[(call.key, call.leaf_axes)] = entry
      self._last_entry = (call, entry)
    return entry

  def _cacheable(self, plan, args, kwargs) -> bool:
    raise NotImplementedError

  def _run(self, args, kwargs, static_positions=frozenset()):
    plan, call = self._prepare(args, kwargs, static_positions)
    inputs = prop.split_inputs(plan, args, kwargs)
    mapped, info = self._callable(plan, call, args, kwargs, inputs)
    try:
      result = mapped(*inputs)
    except ValueError as e:
      explained = _explain_out_axes(e, info, self.name)
      if explained is e:
        raise
      raise explained from None
    return prop.finish(plan, result)

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


class _MappedOutput:
  """The axes of what one traced call of a vmap/pmap returns, checked for consistency.

  Every Variable reached by the arguments (after the call) or the output gets one
  axis: its argument's prefix or ``out_axes`` at its path; a Variable reached
  with two different axes is NNX's "Inconsistent aliasing detected" error.
  """

  def __init__(self, wrapped: _Mapped, call: _MapCall, inner: prop.Inner, out):
    self.wrapped, self.call, self.inner, self.out = wrapped, call, inner, out
    if not (wrapped.graph and wrapped.graph_updates):
      inner.check_output_aliases(out, wrapped.graph, wrapped.name)
    _refuse_captured(out, inner, wrapped.graph and wrapped.graph_updates, wrapped.name)
    self.full = flatten((inner.graph_args, out), graph=wrapped.graph,
                        context=f'tree-mode {wrapped.name} output')
    self.variable_axes = _axes_of_variables(self.full, self.axis_at)

  def axis_at(self, path: tuple, leaf):
    """The axis for the leaf at ``path`` of ``(graph args, out)``."""
    if path[0] == 0:  # (0, 0, position, ...) or (0, 1, keyword, ...)
      pos = path[2]
      spec = self.call.specs[pos] if isinstance(pos, int) else 0
      return prefix_at(spec, path[3:], leaf, _label(pos))
    return prefix_at(self.wrapped.out_axes, path[1:], leaf, 'out_axes')

  def variables(self):
    """``(Variable, axis)`` of every Variable after the call, each once."""
    seen = set()
    for leaf in self.full.leaves:
      if isinstance(leaf, Variable) and id(leaf) not in seen:
        seen.add(id(leaf))
        yield leaf, self.variable_axes[id(leaf)]

  def _leaf_axis(self, path, leaf):
    if isinstance(leaf, Variable):
      return self.variable_axes[id(leaf)]
    return self.axis_at(path, leaf)

  def axes_for(self, result: prop.Output) -> tuple[list, list, tuple]:
    """(axes of ``result.values``, axes of ``result.out_leaves``, their paths for errors)."""
    if result.changed is prop.RESTRUCTURED:
      axes = [self._leaf_axis(p, x) for p, x in zip(self.full.paths, self.full.leaves)]
      return [], axes, ([], list(self.full.paths))
    leaf_paths = self.call.key.graphdef.leaf_paths
    values = [self.call.leaf_axes[i] for i in result.changed]
    value_paths = [(0,) + leaf_paths[i] for i in result.changed]
    wrapped = self.wrapped
    known = self.inner.nodes if wrapped.graph and wrapped.graph_updates else ()
    out_fl = flatten(self.out, graph=wrapped.graph, known=known,
                     context=f'tree-mode {wrapped.name} output')
    out_axes = [self.variable_axes[id(x)] if isinstance(x, Variable)
                else prefix_at(wrapped.out_axes, p, x, 'out_axes')
                for p, x in zip(out_fl.paths, out_fl.leaves)]
    return values, out_axes, (value_paths, [(1,) + p for p in out_fl.paths])


class VmapWrapped(_Mapped):
  """A function mapped with ``nnx.vmap``; call it like the original."""

  name = 'vmap'

  def __init__(self, fun, *, in_axes=0, out_axes=0, axis_name=None, axis_size=None,
               spmd_axis_name=None, transform_metadata=None, graph=None, graph_updates=None):
    super().__init__(fun, in_axes=in_axes, out_axes=out_axes, graph=graph,
                     graph_updates=graph_updates, transform_metadata=transform_metadata)
    self.axis_name = axis_name
    self.axis_size = axis_size
    self.spmd_axis_name = spmd_axis_name

  def _transform(self, body, call, holder, plan, cached, inputs):
    mapped = jax.vmap(body, in_axes=tuple(call.in_specs), out_axes=holder,
                      axis_name=self.axis_name, axis_size=self.axis_size,
                      spmd_axis_name=self.spmd_axis_name)
    return jax.jit(mapped) if cached else mapped

  def _cacheable(self, plan, args, kwargs) -> bool:
    # jax.vmap passes a Python number with axis None through as is; compiling would not
    return _outside_traces() and _arrays_only(plan, args, kwargs, scalars=False)

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    args, kwargs = self._bind(args, kwargs)
    return self._run(args, kwargs)


def vmap(f=None, *, in_axes: tp.Any = 0, out_axes: tp.Any = 0, axis_name=None, axis_size=None,
         spmd_axis_name=None, transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.vmap`` for functions of objects: their state is mapped and updates come back.

  Args:
    f: the function (omit it to use ``nnx.vmap(...)`` as a decorator).
    in_axes: an int, None, or a tuple with one prefix per positional argument (an
      int, None, ``nnx.StateAxes``, an ``nnx.prefix`` tree, or a container of those).
      Keyword arguments are bound to their positions in graph mode with graph
      updates, else mapped on axis 0 as in ``jax.vmap``.
    out_axes: the same, for the output. New Variables created inside an argument
      take that argument's prefix.
    axis_name, axis_size, spmd_axis_name: as ``jax.vmap``.
    transform_metadata: ``{nnx.PARTITION_NAME: name}`` removes the mapped axis from
      the ``out_sharding`` metadata of Variables inside and inserts it outside.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A ``VmapWrapped`` callable.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> m = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(m, jnp.ones((5, 2))).shape
      (5, 3)
  """
  options = dict(in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size,
                 spmd_axis_name=spmd_axis_name, transform_metadata=transform_metadata,
                 graph=graph, graph_updates=graph_updates)
  if f is None:
    return lambda fun: vmap(fun, **options)
  prop.refuse_bound_method(f, 'vmap')
  return VmapWrapped(f, **options)


class PmapWrapped(_Mapped):
  """A function mapped over devices with ``nnx.pmap``; call it like the original."""

  name = 'pmap'

  def __init__(self, fun, *, axis_name=None, in_axes=0, out_axes=0, static_broadcasted_argnums=(),
               devices=None, backend=None, axis_size=None, donate_argnums=(),
               transform_metadata=None, graph=None, graph_updates=None):
    super().__init__(fun, in_axes=in_axes, out_axes=out_axes, graph=graph,
                     graph_updates=graph_updates, transform_metadata=transform_metadata)
    as_tuple = lambda x: (x,) if isinstance(x, int) else tuple(x)  # noqa: E731
    self.static_argnums = frozenset(as_tuple(static_broadcasted_argnums))
    self.donate_argnums = frozenset(as_tuple(donate_argnums))
    self.pmap_kwargs: dict[str, tp.Any] = dict(axis_name=axis_name, devices=devices,
                                               backend=backend, axis_size=axis_size)

  def _donated(self, plan: prop.Plan) -> tuple:
    """Indices among the dynamic inputs of the donated positional arguments."""
    dynamic = [pos for pos, kind in plan.arguments() if kind != prop.STATIC_ARG]
    return tuple(i for i, pos in enumerate(dynamic) if pos in self.donate_argnums)

  def _transform(self, body, call, holder, plan, cached, inputs):
    # jax.pmap reads out_axes before tracing: find them with an abstract vmap trace first
    jax.eval_shape(jax.vmap(body, in_axes=tuple(call.in_specs), out_axes=holder,
                            axis_name=self.pmap_kwargs['axis_name'],
                            axis_size=self.pmap_kwargs['axis_size']), *inputs)
    out_axes = prop.Output(holder.changed, holder.out_def, holder.values, holder.out_leaves)
    return jax.pmap(body, in_axes=tuple(call.in_specs), out_axes=out_axes,
                    donate_argnums=self._donated(plan), **self.pmap_kwargs)

  def _cacheable(self, plan, args, kwargs) -> bool:
    return True  # jax.pmap compiles once per input shapes itself

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    args, kwargs = self._bind(args, kwargs)
    n = len(args)
    statics = frozenset(i if i >= 0 else n + i for i in self.static_argnums)
    return self._run(args, kwargs, statics)


def pmap(f=None, *, axis_name=None, in_axes: tp.Any = 0, out_axes: tp.Any = 0,
         static_broadcasted_argnums=(), devices=None, backend=None, axis_size=None,
         donate_argnums=(), transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.pmap`` for functions of objects; axes work as in ``nnx.vmap``.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> n = jax.local_device_count()
      >>> nnx.pmap(lambda m, x: m(x), in_axes=(None, 0))(model, jnp.ones((n, 4, 2))).shape[1:]
      (4, 3)

  Args:
    f: the function (omit it to use ``nnx.pmap(...)`` as a decorator).
    axis_name, static_broadcasted_argnums, devices, backend, axis_size, donate_argnums:
      as ``jax.pmap``.
    in_axes / out_axes / transform_metadata / graph / graph_updates: as ``nnx.vmap``.

  Returns:
    A ``PmapWrapped`` callable.
  """
  options = dict(axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
                 static_broadcasted_argnums=static_broadcasted_argnums, devices=devices,
                 backend=backend, axis_size=axis_size, donate_argnums=donate_argnums,
                 transform_metadata=transform_metadata, graph=graph, graph_updates=graph_updates)
  if f is None:
    return lambda fun: pmap(fun, **options)
  prop.refuse_bound_method(f, 'pmap')
  return PmapWrapped(f, **options)


# -- scan ----------------------------------------------------------------------

_CarryAt = tp.Literal['all'] | int | None  # where the carry is: all of it, an argument, or none


def _carry_position(axes, name: str) -> _CarryAt:
  """Where ``Carry`` is in ``axes``: ``'all'`` (axes is Carry), an argument index, or None."""
  if axes is Carry:
    return 'all'
  found = []
  is_leaf = lambda x: x is None or x is Carry or isinstance(x, (StateAxes, TreeState))  # noqa: E731
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_leaf)[0]:
    if leaf is not Carry:
      continue
    if len(key_path) != 1 or not isinstance(axes, (tuple, list)):  # never 0: axes is not Carry
      raise ValueError('Carry must be a top-level argument, it cannot be nested. Found Carry '
                       f'inside {name} at path {jax.tree_util.keystr(key_path)}')
    found.append(key_path[0].idx)
  if len(found) > 1:
    raise ValueError(f'Found multiple Carry definitions in {name}: at {name}[{found[0]}] and '
                     f'{name}[{found[1]}]. Only one argument (and one output) is the carry.')
  return found[0] if found else None


def _check_scan_out_axes(out_axes) -> None:
  """Outputs are stacked (an int axis) or the carry; never broadcast."""
  is_leaf = lambda x: x is None or isinstance(x, StateAxes)  # noqa: E731
  for key_path, x in jax.tree_util.tree_flatten_with_path(out_axes, is_leaf=is_leaf)[0]:
    where = f'out_axes{jax.tree_util.keystr(key_path)}'
    if x is None:
      raise ValueError(f'Cannot broadcast output state. Got out_axes=None at: {where}. Outputs '
                       'of nnx.scan are stacked (an int axis) or are the carry (nnx.Carry).')
    if isinstance(x, StateAxes):
      for f, axis in zip(x.filters, x.axes):
        if axis is None or axis is Carry:
          what = 'carry' if axis is Carry else 'broadcast'
          raise ValueError(f'Cannot {what} output state. Got StateAxes({{{_filter_repr(f)}: '
                           f'{_filter_repr(axis)}}}) at: {where}')


def _front(x, axis):
  return x if axis == 0 else jnp.moveaxis(x, axis, 0)


def _back(x, axis):
  return x if axis == 0 else jnp.moveaxis(x, 0, axis)


def _value_at(obj, path: tuple[tp.Any, ...]):
  """The element of the container ``obj`` at a graph path (indices, keys, attribute names)."""
  for key in path:
    if isinstance(obj, collections.abc.Mapping) or (
        isinstance(key, int) and isinstance(obj, (tuple, list))):
      obj = obj[key]
    else:
      obj = getattr(obj, tp.cast(str, key))  # an attribute name
  return obj


def _with_leaves(obj, replacements: dict):
  """``obj`` (a container of objects and arrays) with the arrays at ``replacements``' paths
  replaced; objects stay the same objects."""
  if not replacements:
    return obj
  def pick(key_path, x):
    return replacements.get(tuple(_entry_key(k) for k in key_path), x)
  return jax.tree_util.tree_map_with_path(pick, obj, is_leaf=_is_graph_node)


class _ScanCall(tp.NamedTuple):
  """The static layout of one scan call structure (never the caller's objects)."""
  key: prop.CallKey
  leaf_axes: tuple   # per plan leaf: Carry, an int or None
  roles: tuple       # per plan leaf: 'carry' | 'xs' | 'const'
  writable: tuple    # per plan leaf: a Variable, or an array attribute of an object
  specs: tuple       # per positional argument: its prefix
  carry_pos: tp.Any  # the carry argument's index, or None
  container: tuple   # plan leaves of a graph carry argument held by containers, not objects


def _writable_leaves(graphdef) -> tuple:
  raw = prop.raw_leaf_parents(graphdef)
  return tuple(info.is_var or i in raw for i, info in enumerate(leaf_defs(graphdef)))


class _ScanYs:
  """What one scan step stacks: changed state and the user's output, with static layout."""

  __slots__ = ('layout', 'values', 'out_leaves')

  def __init__(self, layout, values, out_leaves):
    self.layout, self.values, self.out_leaves = layout, values, out_leaves


jax.tree_util.register_pytree_node(
    _ScanYs, lambda y: ((y.values, y.out_leaves), y.layout),
    lambda layout, children: _ScanYs(layout, *children))


class _ScanResult:
  """What the compiled scan returns: the Output to finish, and the carry's own leaves."""

  __slots__ = ('result', 'carry', 'carry_def')

  def __init__(self, result, carry, carry_def):
    self.result, self.carry, self.carry_def = result, carry, carry_def


jax.tree_util.register_pytree_node(
    _ScanResult, lambda r: ((r.result, r.carry), r.carry_def),
    lambda carry_def, children: _ScanResult(children[0], children[1], carry_def))


class ScanWrapped:
  """A function run with ``nnx.scan``; call it like the original."""

  def __init__(self, fun, *, length=None, reverse=False, unroll=1, _split_transpose=False,
               in_axes=(Carry, 0), out_axes=(Carry, 0), transform_metadata=None, graph=None,
               graph_updates=None):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = _settings.graph_mode(graph)
    self.graph_updates = _settings.graph_updates(graph_updates)
    check_prefix(out_axes, 'out_axes', 'scan', self.graph, self.graph_updates)
    check_prefix(in_axes, 'in_axes', 'scan', self.graph, self.graph_updates)
    _check_scan_out_axes(out_axes)
    self.in_carry: _CarryAt = _carry_position(in_axes, 'in_axes')
    self.out_carry: _CarryAt = _carry_position(out_axes, 'out_axes')
    if (self.in_carry is None) != (self.out_carry is None):
      raise ValueError('If one of in_axes or out_axes has Carry, the other must also have Carry. '
                       f'Got in_axes={in_axes!r}, out_axes={out_axes!r}')
    self.in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    self.out_axes = tuple(out_axes) if isinstance(out_axes, list) else out_axes
    self.scan_options: dict[str, tp.Any] = dict(length=length, reverse=reverse, unroll=unroll,
                                                _split_transpose=_split_transpose)
    self.transform_metadata = transform_metadata
    self._change = _partition(transform_metadata)
    self._signature = _Signature(fun)
    self._last = None          # (plan, _ScanCall) reused while the arguments are the same objects
    self._compiled: dict = {}  # (CallKey, leaf axes) -> compiled scan
    self._last_entry = None    # (_ScanCall, compiled scan): the steady loop's lookup

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # -- before the loop: every leaf gets a role --
  def _specs(self, n_args: int) -> tuple:
    if self.in_axes is Carry:
      if n_args != 1:
        raise ValueError('When in_axes=Carry, the function must take exactly one argument, '
                         f'got {n_args} arguments. Use a tuple such as (nnx.Carry, 0).')
      return (Carry,)
    return tuple(_arg_specs(self.in_axes, n_args, 'scan'))

  def _prepare(self, args):
    last = self._last
    if last is not None and prop.plan_still_valid(last[0], args, {}):
      return last
    specs = self._specs(len(args))
    plan = prop.make_plan(args, {}, graph=self.graph, context='tree-mode scan')
    leaf_axes = tuple(prop.resolve_leaf_specs(
        plan, specs.__getitem__, lambda p, path, leaf: prefix_at(p, path, leaf, 'in_axes'),
        'axes'))
    writable = _writable_leaves(plan.key.graphdef)
    carry_broadcast = not (self.graph and self.graph_updates)
    roles = tuple(
        'carry' if axis is Carry or (axis is None and carry_broadcast and isinstance(x, Variable))
        else 'const' if axis is None else 'xs'
        for axis, x in zip(leaf_axes, plan.items))
    carry_pos = None if self.in_carry is None else 0 if self.in_carry == 'all' else self.in_carry
    container = ()
    if carry_pos is not None and plan.kinds[carry_pos] == prop.GRAPH:
      a, b = plan.groups[plan.graph_positions().index(carry_pos)]
      container = tuple(i for i in range(a, b) if not writable[i])
    self._last = (plan, _ScanCall(plan.key, leaf_axes, roles, writable, specs, carry_pos,
                                  container))
    return self._last

  @prop.api_boundary
  def __call__(self, *args, **kwargs):
    args, kwargs = self._signature.positional(args, kwargs)
    if kwargs:
      raise TypeError(f'nnx.scan passes arguments by position (in_axes has one entry per '
                      f'argument); got keyword arguments {sorted(kwargs)} that are not parameters '
                      'of the function.')
    plan, call = self._prepare(args)
    run = self._compiled_for(plan, call, args)
    if run is None:
      run = functools.partial(self._run, call)
    res = run(*prop.split_inputs(plan, args, {}))
    ys = prop.finish(plan, res.result)
    if call.carry_pos is None:
      return ys
    if res.carry_def is not None:  # a plain carry
      carry = res.carry_def.unflatten(res.carry)
    else:
      paths = call.key.graphdef.leaf_paths
      carry = _with_leaves(args[call.carry_pos],
                           {paths[i][2:]: v for i, v in zip(call.container, res.carry)})
    if self.out_carry == 'all':
      return carry
    out = list(ys)
    out[tp.cast(int, self.out_carry)] = carry  # not None: carry_pos is set, so out_carry is too
    return tuple(out)

  def _compiled_for(self, plan: prop.Plan, call: _ScanCall, args):
    """The compiled scan for this call structure, outside traces (None under a trace)."""
    if not (_outside_traces() and _arrays_only(plan, args, {}, scalars=True)):
      return None
    last = self._last_entry
    if last is not None and last[0] is call:
      return last[1]
    key = (call.key, call.leaf_axes)
    run = self._compiled.get(key)
    if run is None:
      run = self._compiled[key] = jax.jit(functools.partial(self._run, call))
    self._last_entry = (call, run)
    return run

  # -- the traced function: lax.scan over the leaves --
  def _run(self, call: _ScanCall, *inputs) -> _ScanResult:
    in_leaves, plain = [], {}
    it = iter(inputs)
    for pos, kind in enumerate(call.key.kinds):
      if kind == prop.GRAPH:
        in_leaves.extend(next(it))
      elif kind == prop.PLAIN:
        plain[pos] = next(it)
    carry0, xs0 = [], []
    slots = []  # per plan leaf: where its value comes from in each step
    for i, leaf in enumerate(in_leaves):
      role = call.roles[i]
      if role == 'carry':
        slots.append((0, len(carry0)))
        carry0.append(leaf)
      elif role == 'xs':
        slots.append((1, len(xs0)))
        xs0.append(_front(leaf, call.leaf_axes[i]))
      else:
        slots.append((2, leaf))
    n_state = len(carry0)
    plain_slots = {}
    carry_def = None
    for pos, value in plain.items():
      flat, treedef = jax.tree_util.tree_flatten(value)
      if pos == call.carry_pos:
        axes = [Carry] * len(flat)
        carry_def = treedef
      else:
        axes = _plain_axes(call.specs[pos], value, _label(pos))
      arg_slots = []
      for x, axis in zip(flat, axes):
        if axis is Carry:
          arg_slots.append((0, len(carry0)))
          carry0.append(x)
        elif axis is None:
          arg_slots.append((2, x))
        else:
          arg_slots.append((1, len(xs0)))
          xs0.append(_front(x, axis))
      plain_slots[pos] = (treedef, arg_slots)

    step = _ScanStep(self, call, slots, plain_slots, n_state)
    carry_f, ys = jax.lax.scan(step, carry0, xs0, **self.scan_options)
    result = step.finish(in_leaves, carry_f, ys)
    if call.carry_pos is None:
      return _ScanResult(result, [], None)
    if carry_def is not None:
      return _ScanResult(result, carry_f[n_state:], carry_def)
    carry_index = {i: k for k, i in enumerate(i for i, r in enumerate(call.roles) if r == 'carry')}
    return _ScanResult(result, [carry_f[carry_index[i]] for i in call.container], None)


class _ScanStep:
  """The body ``lax.scan`` runs: rebuild the objects around one step's leaves, call the function,
  and return the carry and what to stack (the layout of which is static)."""

  def __init__(self, wrapped: ScanWrapped, call: _ScanCall, slots, plain_slots, n_state):
    self.wrapped, self.call = wrapped, call
    self.slots, self.plain_slots, self.n_state = slots, plain_slots, n_state
    self.carry_roles = [i for i, r in enumerate(call.roles) if r == 'carry']

  def __call__(self, carry, xs):
    def pick(slot):
      where, k = slot
      return carry[k] if where == 0 else xs[k] if where == 1 else k

    call, wrapped = self.call, self.wrapped
    leaves = [pick(s) for s in self.slots]
    inputs, start = [], 0
    sizes = iter(call.key.group_sizes)
    for pos, kind in enumerate(call.key.kinds):
      if kind == prop.GRAPH:
        size = next(sizes)
        inputs.append(leaves[start:start + size])
        start += size
      elif kind == prop.PLAIN:
        treedef, arg_slots = self.plain_slots[pos]
        inputs.append(treedef.unflatten([pick(s) for s in arg_slots]))
    inner = prop.Inner(call.key, inputs)
    _remove_mapped_axes(inner, call.leaf_axes, wrapped._change)
    out = inner.call(wrapped.fun)
    carry_out, ys, ys_axes = self._split(out)
    self._check_carry(inner, carry_out)
    _add_mapped_axes(((v, a) for v, a in zip(inner.inner_items, call.leaf_axes)
                      if v is not None), wrapped._change)
    if not (wrapped.graph and wrapped.graph_updates):
      inner.check_output_aliases(ys, wrapped.graph, 'scan')
    _refuse_captured(ys, inner, wrapped.graph and wrapped.graph_updates, 'scan')

    current = self._current(inner, carry_out)
    new_carry = [current[i] for i in self.carry_roles]
    if call.carry_pos is not None and call.key.kinds[call.carry_pos] == prop.PLAIN:
      new_carry.extend(jax.tree_util.tree_leaves(carry_out))
    graph_args = self._args_after(inner, carry_out)
    if wrapped.graph and wrapped.graph_updates and _structure_changed(call.key, inner, graph_args):
      return new_carry, self._restructured(inner, graph_args, ys, ys_axes, current)
    changed = tuple(i for i, r in enumerate(call.roles)
                    if r == 'xs' and call.writable[i] and current[i] is not inner.in_leaves[i])
    known = inner.nodes if wrapped.graph and wrapped.graph_updates else ()
    out_fl = flatten(ys, graph=wrapped.graph, known=known, context='tree-mode scan output')
    axes = tuple(prefix_at(ys_axes, p, x, 'out_axes') for p, x in zip(out_fl.paths, out_fl.leaves))
    _add_mapped_axes(((x, a) for x, a in zip(out_fl.leaves, axes) if isinstance(x, Variable)),
                     wrapped._change)
    out_def, out_leaves = prop.flatten_output(ys, graph=wrapped.graph, known=known)
    layout = ('values', changed, out_def, axes)
    return new_carry, _ScanYs(layout, [current[i] for i in changed], out_leaves)

  def _split(self, out):
    """(carry, stacked part with None where the carry was, that part's out_axes)."""
    c, out_axes = self.wrapped.out_carry, self.wrapped.out_axes
    if c == 'all':
      return out, None, None
    if c is None:
      return None, out, out_axes
    if not isinstance(out, tuple) or len(out) != len(out_axes):
      raise ValueError(f'nnx.scan: out_axes={out_axes!r} expects the function to return a tuple '
                       f'of {len(out_axes)}, got {type(out).__name__}'
                       f'{f" of {len(out)}" if isinstance(out, tuple) else ""}.')
    return out[c], out[:c] + (None,) + out[c + 1:], out_axes

  def _check_carry(self, inner: prop.Inner, carry_out) -> None:
    """The carry returned holds the same objects as the carry given (NNX's loop rule)."""
    pos = self.call.carry_pos
    if pos is None:
      return
    given = inner.args[pos]
    a, a_def = jax.tree_util.tree_flatten(given, is_leaf=_is_graph_node)
    b, b_def = jax.tree_util.tree_flatten(carry_out, is_leaf=_is_graph_node)
    if a_def != b_def:
      raise TypeError(f'nnx.scan: the carry returned has structure {b_def} but the carry passed '
                      f'in has {a_def}; return the same structure.')
    for k, (x, y) in enumerate(zip(a, b)):
      if (_is_graph_node(x) or _is_graph_node(y)) and x is not y:
        if self.wrapped.graph and self.wrapped.graph_updates:
          raise ValueError(
              'Carry references must be the same between iterations. The carry returned holds '
              f'a different {type(y).__name__} (leaf {k}) than the one passed in: update the '
              'carried object in place and return it, instead of creating a new one.')
        raise ValueError(
            'scan Variable identity must be preserved across iterations: the carry returned '
            f'holds a different {type(y).__name__} (leaf {k}) than the one passed in. Update '
            'the carried object in place and return it.')

  def _current(self, inner: prop.Inner, carry_out) -> list:
    """Every plan leaf's value after the call: Variables', array attributes', carry arrays'."""
    values = list(inner.in_leaves)
    for i, var in enumerate(inner.inner_items):
      if var is not None:
        values[i] = var._value
    nodes = inner.nodes
    for i, (node_index, name) in prop.raw_leaf_parents(self.call.key.graphdef).items():
      now = nodes[node_index].__dict__.get(name, values[i])
      if isinstance(now, jax.Array):
        values[i] = now
    paths = self.call.key.graphdef.leaf_paths
    for i in self.call.container:
      values[i] = _value_at(carry_out, paths[i][2:])
    return values

  def _args_after(self, inner: prop.Inner, carry_out):
    """The rebuilt graph arguments with the carry argument replaced by the returned carry."""
    pos = self.call.carry_pos
    graph_args, graph_kwargs = inner.graph_args
    if pos is None or self.call.key.kinds[pos] != prop.GRAPH:
      return graph_args, graph_kwargs
    return graph_args[:pos] + (carry_out,) + graph_args[pos + 1:], graph_kwargs

  def _restructured(self, inner, graph_args, ys, ys_axes, current) -> _ScanYs:
    """The step changed the objects' structure: send back every leaf of the new structure,
    stacked or from the carry or the inputs (static layout, same for every step)."""
    call, change = self.call, self.wrapped._change
    full = flatten((graph_args, ys), graph=True, context='scan output')
    index = {id(n): i for i, n in enumerate(inner.nodes)}
    identity = tuple(index.get(id(n), -1) for n in full.nodes)
    by_var = {id(v): i for i, v in enumerate(inner.inner_items) if v is not None}
    by_path = {p: i for i, p in enumerate(call.key.graphdef.leaf_paths)}
    carry_slot = {i: k for k, i in enumerate(self.carry_roles)}
    sources, stacked, new_vars = [], [], []
    for path, leaf in zip(full.paths, full.leaves):
      i = by_var.get(id(leaf)) if isinstance(leaf, Variable) else by_path.get(path[1:])
      if path[0] == 1:
        axis = prefix_at(ys_axes, path[1:], leaf, 'out_axes')
      elif i is None or isinstance(leaf, Variable) != (inner.inner_items[i] is not None):
        i = None
        axis = prefix_at(call.specs[path[2]], path[3:], leaf, _label(path[2]))
        if not isinstance(axis, int) or axis is Carry:
          raise ValueError(
              f'nnx.scan: the {type(leaf).__name__} at {_render(path)} was created inside the '
              f'scan with axis {_filter_repr(axis)}; new state can only be stacked (an int axis '
              'for its path in in_axes): create it before the scan to carry or broadcast it.')
      else:
        role = call.roles[i]
        if role == 'carry':
          sources.append(('carry', carry_slot[i]))
          continue
        if role == 'const' or current[i] is inner.in_leaves[i]:
          sources.append(('in', i))
          continue
        axis, leaf = call.leaf_axes[i], current[i]
      if isinstance(leaf, Variable):
        new_vars.append((leaf, axis))
      sources.append(('ys', len(stacked), axis))
      stacked.append(leaf)
    _add_mapped_axes(new_vars, change)
    full = flatten((graph_args, ys), graph=True, context='scan output')  # with metadata restored
    layout = ('restructured', full.graphdef, identity, tuple(sources))
    return _ScanYs(layout, [], [x._value if isinstance(x, Variable) else x for x in stacked])

  def finish(self, in_leaves, carry_f, ys: _ScanYs) -> prop.Output:
    """After the loop: the Output ``prop.finish`` writes back (axes moved to their places)."""
    layout = ys.layout
    if layout[0] == 'restructured':
      _, graphdef, identity, sources = layout
      leaves = []
      for source in sources:
        if source[0] == 'carry':
          leaves.append(carry_f[source[1]])
        elif source[0] == 'in':
          leaves.append(in_leaves[source[1]])
        else:
          leaves.append(_back(ys.out_leaves[source[1]], source[2]))
      return prop.Output(prop.RESTRUCTURED, (prop.RESTRUCTURED, graphdef, identity), [], leaves)
    _, changed, out_def, axes = layout
    call = self.call
    written = [(i, carry_f[k]) for k, i in enumerate(self.carry_roles) if call.writable[i]]
    values = [v for _, v in written]
    values += [_back(v, call.leaf_axes[i]) for i, v in zip(changed, ys.values)]
    out_leaves = [_back(y, a) for y, a in zip(ys.out_leaves, axes)]
    return prop.Output(tuple(i for i, _ in written) + changed, out_def, values, out_leaves)


def _structure_changed(key: prop.CallKey, inner: prop.Inner, graph_args) -> bool:
  after = flatten(graph_args, graph=True, context='graph updates')
  nodes = inner.nodes
  return not (after.graphdef == key.graphdef and len(after.nodes) == len(nodes)
              and all(a is b for a, b in zip(after.nodes, nodes)))


def scan(f=None, *, length: int | None = None, reverse: bool = False, unroll: int | bool = 1,
         _split_transpose: bool = False, in_axes: tp.Any = (Carry, 0),
         out_axes: tp.Any = (Carry, 0), transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.lax.scan`` for functions of objects, the role of each argument set by ``in_axes``.

  ``nnx.Carry`` marks the carried argument (and where the carry sits in the
  output), an int an argument scanned along that axis, ``None`` one passed whole
  to every step; ``nnx.StateAxes`` / ``nnx.prefix`` trees set them per Variable.
  Scanned Variables get their updates back stacked, carried ones their final
  value. Broadcast Variables: in graph mode with graph updates every step sees the
  value they came in with and updates to them are dropped (as NNX); otherwise
  they are carried, so their updates accumulate. The carry returned must hold the
  same objects as the carry given, and comes back as the caller's objects.

  Args:
    f: the step function (omit it to use ``nnx.scan(...)`` as a decorator).
    length, reverse, unroll, _split_transpose: as ``jax.lax.scan``.
    in_axes: ``nnx.Carry``, an int, None, or a tuple with one prefix per argument.
    out_axes: the same for the output; never None (outputs are stacked).
    transform_metadata: ``{nnx.PARTITION_NAME: name}``, as ``nnx.vmap``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    A ``ScanWrapped`` callable.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> nnx.scan(lambda c, x: (c + x, c))(jnp.array(0.), jnp.arange(4.))[0]
      Array(6., dtype=float32)
  """
  options: dict[str, tp.Any] = dict(
      length=length, reverse=reverse, unroll=unroll, _split_transpose=_split_transpose,
      in_axes=in_axes, out_axes=out_axes, transform_metadata=transform_metadata,
      graph=graph, graph_updates=graph_updates)
  if f is None:
    return lambda fun: scan(fun, **options)
  prop.refuse_bound_method(f, 'scan')
  return ScanWrapped(f, **options)


# -- fori_loop / while_loop ---------------------------------------------------

class _LoopCall(tp.NamedTuple):
  """The static layout of a loop value: its pytree structure and where its objects sit."""
  key: prop.CallKey
  treedef: tp.Any
  node_positions: tuple  # indices among the pytree leaves that are objects / Variables


class _Loop:
  """The loop value as (leaves of its objects, its other leaves); objects rebuilt each step.

  Objects must come back as the same objects with the same structure; their
  final state is written to the caller's objects, which the loop returns.
  """

  def __init__(self, call: _LoopCall, graph: bool, name: str):
    self.call, self.graph, self.name = call, graph, name

  def value(self, state) -> tuple[prop.Inner, tp.Any]:
    node_leaves, plain = state
    inputs, start = [], 0
    for size in self.call.key.group_sizes:
      inputs.append(node_leaves[start:start + size])
      start += size
    inner = prop.Inner(self.call.key, inputs)
    return inner, _merge_leaves(self.call, list(inner.args), plain)

  def leaves_of(self, inner: prop.Inner, out):
    call = self.call
    leaves, treedef = jax.tree_util.tree_flatten(out, is_leaf=_is_graph_node)
    if treedef != call.treedef:
      raise ValueError(f'nnx.{self.name}: body_fun must return the same structure it was given: '
                       f'got {treedef}, expected {call.treedef}.')
    positions = set(call.node_positions)
    for k, x in enumerate(leaves):
      given = inner.args[call.node_positions.index(k)] if k in positions else None
      if (k in positions or _is_graph_node(x)) and x is not given:
        raise ValueError(
            f'nnx.{self.name}: body_fun returned a different {type(x).__name__} at leaf {k} of '
            'the loop value than the one it was given. The loop value must keep the same '
            'objects (references): update them in place and return them.')
    after = flatten(inner.graph_args, graph=self.graph, context=f'tree-mode {self.name}')
    if not (after.graphdef == call.key.graphdef and len(after.nodes) == len(inner.nodes)
            and all(a is b for a, b in zip(after.nodes, inner.nodes))):
      raise ValueError(
          f'nnx.{self.name}: body_fun changed the structure of an object of the loop value '
          '(an attribute added, removed or replaced by a new object); a loop can only change '
          'values. Create the state before the loop.')
    plain = [x for k, x in enumerate(leaves) if k not in positions]
    return [x._value if isinstance(x, Variable) else x for x in after.leaves], plain


def _merge_leaves(call: _LoopCall, nodes: list, plain) -> tp.Any:
  leaves, it_nodes, it_plain = [], iter(nodes), iter(plain)
  positions = set(call.node_positions)
  for k in range(call.treedef.num_leaves):
    leaves.append(next(it_nodes) if k in positions else next(it_plain))
  return call.treedef.unflatten(leaves)


def _loop_parts(init_val, graph: bool, name: str):
  """(plan of the objects of ``init_val``, its layout, its other leaves)."""
  leaves, treedef = jax.tree_util.tree_flatten(init_val, is_leaf=_is_graph_node)
  positions = tuple(k for k, x in enumerate(leaves) if _is_graph_node(x))
  nodes = tuple(leaves[k] for k in positions)
  plan = prop.make_plan(nodes, {}, graph=graph, context=f'tree-mode {name}')
  plain = [x for k, x in enumerate(leaves) if k not in set(positions)]
  return plan, _LoopCall(plan.key, treedef, positions), nodes, plain


# Compiled loops, per body function (and condition): they live as long as the functions do.
# Keyed weakly by the user's functions: an entry lives as long as its function.
_FORI_LOOPS: weakref.WeakKeyDictionary = caches.register(weakref.WeakKeyDictionary())
_WHILE_LOOPS: weakref.WeakKeyDictionary = caches.register(weakref.WeakKeyDictionary())


def _cached_loop(table: weakref.WeakKeyDictionary, functions: tuple, key, make: tp.Callable):
  """``make(functions)`` compiled, cached per ``functions`` (held weakly) and ``key``;
  uncached when the functions cannot be referenced weakly or a trace is running."""
  if not _outside_traces():
    return make(functions)
  try:
    for fun in functions[:-1]:
      table = table.setdefault(fun, weakref.WeakKeyDictionary())
    per_key = table.setdefault(functions[-1], {})
  except TypeError:
    return make(functions)
  run = per_key.get(key)
  if run is None:
    refs = tuple(weakref.ref(f) for f in functions)
    # the compiled function holds its functions weakly, so the cache never keeps them alive
    run = per_key[key] = jax.jit(lambda *a: make(tuple(r() for r in refs))(*a))
  return run


def _finish_loop(plan: prop.Plan, call: _LoopCall, nodes: tuple, final):
  node_leaves, plain = final
  plan.write_back(tuple(range(len(node_leaves))), node_leaves)
  return _merge_leaves(call, list(nodes), plain)


@prop.api_boundary
def fori_loop(lower, upper, body_fun, init_val, *, unroll: int | bool | None = None,
              graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.lax.fori_loop`` where ``init_val`` may hold objects: their final state reaches the
  caller's objects, which are returned.

  ``body_fun(i, value)`` must return the same objects it was given, with the
  same structure (only values change). Python scalars in ``init_val`` become
  arrays, as in JAX.

  Args:
    lower, upper: the loop bounds (Python ints give a fixed trip count).
    body_fun: ``(i, value) -> value``.
    init_val: the loop value: objects, arrays, containers of them.
    unroll: as ``jax.lax.fori_loop``.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    The final loop value.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> count = nnx.Variable(jnp.array(0))
      >>> def body(i, c):
      ...   c[...] += i
      ...   return c
      >>> nnx.fori_loop(0, 4, body, count) is count, int(count[...])
      (True, 6)
  """
  if not prop.holds_graph(init_val):
    return jax.lax.fori_loop(lower, upper, body_fun, init_val, unroll=unroll)
  graph = _settings.graph_mode(graph)
  plan, call, nodes, plain = _loop_parts(init_val, graph, 'fori_loop')

  def make(functions):
    loop = _Loop(call, graph, 'fori_loop')
    (body,) = functions

    def step(i, state):
      inner, value = loop.value(state)
      return loop.leaves_of(inner, body(i, value))
    return lambda lo, hi, state: jax.lax.fori_loop(lo, hi, step, state, unroll=unroll)

  state = (plan.leaves(), plain)
  static_bounds = all(isinstance(b, int) and not isinstance(b, bool) for b in (lower, upper))
  if static_bounds and _arrays_only_leaves(plain):
    run = _cached_loop(_FORI_LOOPS, (body_fun,), (lower, upper, unroll, graph, call),
                       lambda fs: lambda state: make(fs)(lower, upper, state))
    final = run(state)
  else:
    final = make((body_fun,))(lower, upper, state)
  return _finish_loop(plan, call, nodes, final)


@prop.api_boundary
def while_loop(cond_fun, body_fun, init_val, *, graph: bool | None = None,
               graph_updates: bool | None = None):
  """``jax.lax.while_loop`` where ``init_val`` may hold objects: their final state reaches
  the caller's objects, which are returned.

  ``body_fun(value)`` must return the same objects it was given, with the same
  structure (only values change); ``cond_fun(value)`` reads them.

  Args:
    cond_fun: ``value -> bool scalar``.
    body_fun: ``value -> value``.
    init_val: the loop value: objects, arrays, containers of them.
    graph / graph_updates: override ``nnx.set_graph_mode`` / ``nnx.set_graph_updates``.

  Returns:
    The final loop value.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> count = nnx.Variable(jnp.array(1))
      >>> def double(c):
      ...   c[...] *= 2
      ...   return c
      >>> int(nnx.while_loop(lambda c: c[...] < 10, double, count)[...])
      16
  """
  if not prop.holds_graph(init_val):
    return jax.lax.while_loop(cond_fun, body_fun, init_val)
  graph = _settings.graph_mode(graph)
  plan, call, nodes, plain = _loop_parts(init_val, graph, 'while_loop')

  def make(functions):
    loop = _Loop(call, graph, 'while_loop')
    cond, body = functions

    def test(state):
      return cond(loop.value(state)[1])

    def step(state):
      inner, value = loop.value(state)
      return loop.leaves_of(inner, body(value))
    return lambda state: jax.lax.while_loop(test, step, state)

  state = (plan.leaves(), plain)
  if _arrays_only_leaves(plain):
    final = _cached_loop(_WHILE_LOOPS, (cond_fun, body_fun), (graph, call), make)(state)
  else:
    final = make((cond_fun, body_fun))(state)
  return _finish_loop(plan, call, nodes, final)


def _arrays_only_leaves(leaves) -> bool:
  return all(isinstance(x, (jax.Array, np.ndarray, int, float, complex, bool)) for x in leaves)
