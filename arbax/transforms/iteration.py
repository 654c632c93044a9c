"""Iteration transforms: ``vmap``, ``pmap``, ``scan``, ``fori_loop``, ``while_loop``.

Each wraps the JAX transform of the same name and propagates Variable updates
made inside back to the caller's objects, with the right axes. The classic
"scan over layers": create N layers at once, then apply them one after the other.

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

Axes of a Module argument: an int (all its state mapped on that axis), ``None``
(broadcast: an update inside must be the same for every item, else JAX raises)
or ``nnx.StateAxes({filter: axis, ...})`` (per kind of state). ``nnx.Carry``
marks the loop state of ``scan``. Nothing is written back when the function raises.
"""
from __future__ import annotations

import collections.abc
import functools
import re
import typing as tp

import jax
import jax.numpy as jnp

from arbax import _settings
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.graph import LEAF_DEF, STATIC, flatten, unflatten
from arbax.transforms import _propagate as prop
from arbax.variables import Variable

__all__ = ['Carry', 'StateAxes', 'vmap', 'pmap', 'scan', 'fori_loop', 'while_loop']


class Carry:
  """Marker for ``scan``'s ``in_axes`` / ``out_axes``: this argument (and output) is the loop carry."""


def _is_axis(x) -> bool:
  return x is None or x is Carry or (isinstance(x, int) and not isinstance(x, bool))


class StateAxes(collections.abc.Mapping):
  """Per-kind axes for the state of a Module argument: ``nnx.StateAxes({nnx.Param: 0, ...: None})``.

  Keys are filters, checked in order; a Variable takes the axis of the first
  filter it matches. Values are an int, ``None`` or ``nnx.Carry`` (scan only).
  """

  def __init__(self, filter_axes, /):
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
    inner = ', '.join(f'{_filter_repr(f)}: {_filter_repr(a)}' for f, a in zip(self.filters, self.axes))
    return f'StateAxes({{{inner}}})'

  def axis_for(self, path: tuple, leaf) -> tp.Any:
    for predicate, axis in zip(self._predicates, self.axes):
      if predicate(path, leaf):
        return axis
    raise ValueError(
        f'No axis found for path={path!r}, variable={leaf!r}: no filter of {self!r} matches it. '
        'Add a filter for it, e.g. end the StateAxes with `...: None`.')


def _filter_repr(x) -> str:
  if x is Carry:
    return 'Carry'
  return x.__name__ if isinstance(x, type) else repr(x)


# -- matching axis prefixes against arguments and outputs ---------------------

def _child_spec(spec, key, where: str, path: tuple):
  if isinstance(spec, (tuple, list)) and isinstance(key, int) and 0 <= key < len(spec):
    return spec[key]
  if isinstance(spec, dict) and key in spec:
    return spec[key]
  raise ValueError(f'{where} {spec!r} is not a prefix of the value: nothing matches '
                   f'{format_path(path)}. Give one axis for the whole value or a container '
                   'of the same structure.')


def _axis_at(spec, path: tuple, leaf, where: str):
  """The axis of one leaf: follow ``path`` into the prefix ``spec`` until an axis or StateAxes."""
  depth = 0
  while not (_is_axis(spec) or isinstance(spec, StateAxes)):
    if depth == len(path):
      raise ValueError(f'{where} has a container {spec!r} where the value has a leaf at '
                       f'{format_path(path)}.')
    spec = _child_spec(spec, path[depth], where, path[:depth + 1])
    depth += 1
  if isinstance(spec, StateAxes):
    return spec.axis_for(path[depth:], leaf)
  return spec


def _plain_axes(spec, value, where: str) -> list:
  """Per-leaf axes of a value without Modules or Variables (``jax.tree.leaves`` order)."""
  leaves = jax.tree_util.tree_flatten_with_path(value)[0]
  out = []
  for kp, leaf in leaves:
    path = tuple(_key_of(k) for k in kp)
    if isinstance(spec, StateAxes):
      raise ValueError(f'{where} is a StateAxes but the argument holds no Module or Variable; '
                       'use an int or None for plain arrays.')
    out.append(_axis_at(spec, path, leaf, where))
  return out


def _key_of(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _arg_specs(in_axes, n_args: int, name: str) -> list:
  if isinstance(in_axes, list):
    in_axes = tuple(in_axes)
  if isinstance(in_axes, tuple):
    if len(in_axes) != n_args:
      raise ValueError(f'{name} in_axes must be an int, None, or a tuple of entries corresponding '
                       f'to the positional arguments passed to the function, but got '
                       f'len(in_axes)={len(in_axes)}, len(args)={n_args}')
    return list(in_axes)
  return [in_axes] * n_args


def _label(pos) -> str:
  return f'in_axes[{pos}]' if isinstance(pos, int) else f'keyword argument {pos!r}'


def _leaf_label(path: tuple) -> str:
  """A plan leaf path ``(0, i, *rest)`` / ``(1, name, *rest)`` as the user sees it."""
  where = f'args[{path[1]}]' if path[0] == 0 else f'kwargs[{path[1]!r}]'
  return where + format_path(path[2:]).replace('<root>', '')


def _graph_leaf_axes(plan: prop.Plan, group: tuple, spec, pos) -> list:
  paths = plan.key.graphdef.leaf_paths
  a, b = group
  return [_axis_at(spec, paths[i][2:], plan.items[i], _label(pos)) for i in range(a, b)]


def _check_shared_axes(args, kwargs, plan: prop.Plan, specs: dict) -> None:
  """Graph mode: a Variable reachable from several places must get the same axis everywhere."""
  seen: dict = {}
  for pos, value in prop._positions(args, kwargs):
    if pos not in specs or not prop.holds_graph(value):
      continue
    fl = flatten(value, graph=True)
    for path, leaf in zip(fl.paths, fl.leaves):
      if not isinstance(leaf, Variable):
        continue
      axis = _axis_at(specs[pos], path, leaf, _label(pos))
      where = _leaf_label((0 if isinstance(pos, int) else 1, pos, *path))
      first = seen.setdefault(id(leaf), (axis, where))
      if first[0] != axis:
        raise ValueError(
            f'Inconsistent aliasing: the Variable at {where} has axis {axis!r} but the same '
            f'Variable at {first[1]} has axis {first[0]!r}. Give shared Variables one axis.')


class _InputAxes(tp.NamedTuple):
  specs: list       # per dynamic input: the JAX axis spec (a per-leaf list for graph args)
  leaf_axes: list   # per plan leaf: its axis


def _input_axes(plan: prop.Plan, args, kwargs, arg_specs: list, kw_spec, graph: bool) -> _InputAxes:
  leaf_axes = [None] * len(plan.items)
  specs = []
  by_pos = {}
  groups = iter(plan.groups)
  for (pos, value), kind in zip(prop._positions(args, kwargs), plan.kinds):
    if kind == prop.STATIC_ARG:
      continue
    spec = arg_specs[pos] if isinstance(pos, int) else kw_spec
    by_pos[pos] = spec
    if kind == prop.GRAPH:
      group = next(groups)
      axes = _graph_leaf_axes(plan, group, spec, pos)
      leaf_axes[group[0]:group[1]] = axes
      specs.append(axes)
    else:
      _plain_axes(spec, value, _label(pos))  # validates: no StateAxes on plain values
      specs.append(spec)
  if graph:
    _check_shared_axes(args, kwargs, plan, by_pos)
  return _InputAxes(specs, leaf_axes)


def _flatten_out(out, spec, graph: bool, name: str):
  """The output as ``(def, leaf values, leaf axes, leaf paths)``; Variables leave as values."""
  if out is None:
    return (STATIC, None), [], [], []
  if isinstance(out, jax.Array) and not isinstance(out, Variable):
    return LEAF_DEF, [out], [_axis_at(spec, (), out, 'out_axes')], [()]
  fl = flatten(out, graph=graph, context=f'tree-mode {name} output')
  values = [x._value if isinstance(x, Variable) else x for x in fl.leaves]
  axes = [_axis_at(spec, p, x, 'out_axes') for p, x in zip(fl.paths, fl.leaves)]
  return fl.graphdef, values, axes, fl.paths


# -- vmap / pmap ---------------------------------------------------------------

_OUT_AXES_ERROR = re.compile(r'out_axes\[<flat index (\d)>\]\[(\d+)\]')


def _explain_out_axes(e: ValueError, info: dict, plan: prop.Plan, name: str):
  """JAX's "axis spec None but output was batched" names our internal tree: name the user's path."""
  m = _OUT_AXES_ERROR.search(str(e))
  if m is None or 'changed' not in info:
    return e
  part, k = int(m.group(1)), int(m.group(2))
  if part == 0:
    where = _leaf_label(plan.key.graphdef.leaf_paths[info['changed'][k]])
    return ValueError(
        f'nnx.{name}: the Variable at {where} is broadcast (axis None) but was updated with a '
        f'value that differs across the mapped axis. Give it an axis (an int, or nnx.StateAxes '
        f'for that kind of state), or make the update the same for every item (e.g. reduce it '
        f'with jax.lax.pmean over axis_name). JAX said: {e}')
  return ValueError(f'nnx.{name}: the output at {format_path(info["out_paths"][k])} has out_axes '
                    f'None but is different for every item; give it an axis. JAX said: {e}')


class _Mapped:
  """Shared by vmap and pmap: leaves in with their axes, updates out with the same axes."""

  name = ''

  def __init__(self, fun, *, in_axes, out_axes, graph, graph_updates, transform_metadata):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.in_axes = in_axes
    self.out_axes = out_axes
    self.graph = _settings.graph_mode(graph)
    self.graph_updates = _settings.graph_updates(graph_updates)
    self.transform_metadata = transform_metadata
    self._cache = None  # (plan, input axes) reused while the arguments are the same objects

  def _prepare(self, args, kwargs, static_positions=frozenset()):
    cache = self._cache
    if cache is not None and prop.plan_still_valid(cache[0], args, kwargs):
      return cache
    plan = prop.make_plan(args, kwargs, graph=self.graph, static_positions=static_positions,
                          context=f'tree-mode {self.name}')
    specs = _arg_specs(self.in_axes, len(args), self.name)
    axes = _input_axes(plan, args, kwargs, specs, 0, self.graph)
    self._cache = (plan, axes)
    return self._cache

  def _inner(self, plan: prop.Plan, leaf_axes: list, holder: prop.Output, info: dict):
    def inner(*inputs):
      args, kwargs, in_leaves, inner_items = prop.rebuild(plan.key, inputs)
      out = self.fun(*args, **kwargs)
      changed, values = prop.collect_updates(in_leaves, inner_items)
      out_def, out_values, out_axes, out_paths = _flatten_out(out, self.out_axes, self.graph,
                                                              self.name)
      # JAX reads out_axes after tracing: fill the holder it was given with the real axes
      holder.changed, holder.out_def = changed, out_def
      holder.values = [leaf_axes[i] for i in changed]
      holder.out_leaves = out_axes
      info.update(changed=changed, out_paths=out_paths)
      return prop.Output(changed, out_def, values, out_values)
    return inner

  def _transform(self, inner, in_specs, holder):
    raise NotImplementedError

  def _run(self, args, kwargs, static_positions=frozenset()):
    plan, axes = self._prepare(args, kwargs, static_positions)
    holder = prop.Output((), None, None, None)
    info: dict = {}
    mapped = self._transform(self._inner(plan, axes.leaf_axes, holder, info), axes.specs, holder)
    try:
      result = mapped(*prop.split_inputs(plan, args, kwargs))
    except ValueError as e:
      explained = _explain_out_axes(e, info, plan, self.name)
      if explained is e:
        raise
      raise explained from None
    return prop.finish(plan, result)

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)


class VmapWrapped(_Mapped):
  name = 'vmap'

  def __init__(self, fun, *, in_axes=0, out_axes=0, axis_name=None, axis_size=None,
               spmd_axis_name=None, transform_metadata=None, graph=None, graph_updates=None):
    super().__init__(fun, in_axes=in_axes, out_axes=out_axes, graph=graph,
                     graph_updates=graph_updates, transform_metadata=transform_metadata)
    self.axis_name = axis_name
    self.axis_size = axis_size
    self.spmd_axis_name = spmd_axis_name

  def _transform(self, inner, in_specs, holder):
    return jax.vmap(inner, in_axes=tuple(in_specs), out_axes=holder, axis_name=self.axis_name,
                    axis_size=self.axis_size, spmd_axis_name=self.spmd_axis_name)

  def __call__(self, *args, **kwargs):
    return self._run(args, kwargs)


def vmap(f=None, *, in_axes: tp.Any = 0, out_axes: tp.Any = 0, axis_name=None, axis_size=None,
         spmd_axis_name=None, transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.vmap`` with state propagation.

  A Module argument's axis is an int, ``None`` (broadcast) or ``nnx.StateAxes``;
  updates come back on the axis they went in with. Keyword arguments are
  mapped on axis 0, like ``jax.vmap``.
  """
  options = dict(in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size,
                 spmd_axis_name=spmd_axis_name, transform_metadata=transform_metadata,
                 graph=graph, graph_updates=graph_updates)
  if f is None:
    return lambda fun: vmap(fun, **options)
  return VmapWrapped(f, **options)


class PmapWrapped(_Mapped):
  name = 'pmap'

  def __init__(self, fun, *, axis_name=None, in_axes=0, out_axes=0, static_broadcasted_argnums=(),
               devices=None, backend=None, axis_size=None, donate_argnums=(),
               transform_metadata=None, graph=None, graph_updates=None):
    super().__init__(fun, in_axes=in_axes, out_axes=out_axes, graph=graph,
                     graph_updates=graph_updates, transform_metadata=transform_metadata)
    as_tuple = lambda x: (x,) if isinstance(x, int) else tuple(x)
    self.static_argnums = frozenset(as_tuple(static_broadcasted_argnums))
    self.donate_argnums = frozenset(as_tuple(donate_argnums))
    self.pmap_kwargs = dict(axis_name=axis_name, devices=devices, backend=backend,
                            axis_size=axis_size)
    self._compiled: dict = {}  # plan key -> (pmapped function, out-axes holder)

  def _donated(self, args, kwargs, plan) -> tuple:
    positions = [pos for (pos, _), kind in zip(prop._positions(args, kwargs), plan.kinds)
                 if kind != prop.STATIC_ARG]
    return tuple(i for i, pos in enumerate(positions) if pos in self.donate_argnums)

  def __call__(self, *args, **kwargs):
    n = len(args)
    statics = frozenset(i if i >= 0 else n + i for i in self.static_argnums)
    plan, axes = self._prepare(args, kwargs, statics)
    entry = self._compiled.get(plan.key)
    if entry is None:
      entry = self._compiled[plan.key] = self._compile(plan, axes, args, kwargs)
    pmapped, info, unmapped = entry
    try:
      result = pmapped(*prop.split_inputs(plan, args, kwargs))
    except ValueError as e:
      explained = _explain_out_axes(e, info, plan, self.name)
      if explained is e:
        raise
      raise explained from None
    values = [v[0] if k in unmapped[0] else v for k, v in enumerate(result.values)]
    out_leaves = [v[0] if k in unmapped[1] else v for k, v in enumerate(result.out_leaves)]
    return prop.finish(plan, prop.Output(result.changed, result.out_def, values, out_leaves))

  def _compile(self, plan, axes, args, kwargs):
    """``jax.pmap`` needs its out_axes up front: find them with an abstract vmap trace first."""
    holder = prop.Output((), None, None, None)
    info: dict = {}
    inputs = prop.split_inputs(plan, args, kwargs)
    jax.eval_shape(jax.vmap(self._inner(plan, axes.leaf_axes, holder, info),
                            in_axes=tuple(axes.specs), out_axes=holder,
                            axis_name=self.pmap_kwargs['axis_name'],
                            axis_size=self.pmap_kwargs['axis_size']), *inputs)
    # pmap has no None out_axes: such outputs come back on axis 0 and we keep one copy
    unmapped = (frozenset(k for k, a in enumerate(holder.values) if a is None),
                frozenset(k for k, a in enumerate(holder.out_leaves) if a is None))
    pmap_axes = prop.Output(holder.changed, holder.out_def,
                            [0 if a is None else a for a in holder.values],
                            [0 if a is None else a for a in holder.out_leaves])
    pmapped = jax.pmap(self._inner(plan, axes.leaf_axes, prop.Output((), None, None, None), {}),
                       in_axes=tuple(axes.specs), out_axes=pmap_axes,
                       donate_argnums=self._donated(args, kwargs, plan), **self.pmap_kwargs)
    return pmapped, info, unmapped


def pmap(f=None, *, axis_name=None, in_axes: tp.Any = 0, out_axes: tp.Any = 0,
         static_broadcasted_argnums=(), devices=None, backend=None, axis_size=None,
         donate_argnums=(), transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.pmap`` with state propagation; axes work as in ``nnx.vmap``."""
  options = dict(axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
                 static_broadcasted_argnums=static_broadcasted_argnums, devices=devices,
                 backend=backend, axis_size=axis_size, donate_argnums=donate_argnums,
                 transform_metadata=transform_metadata, graph=graph, graph_updates=graph_updates)
  if f is None:
    return lambda fun: pmap(fun, **options)
  return PmapWrapped(f, **options)


# -- scan ----------------------------------------------------------------------

def _carry_position(axes, name: str):
  """Index of ``Carry`` in ``axes`` (``'all'`` when axes is Carry itself), or None."""
  if axes is Carry:
    return 'all'
  if isinstance(axes, (tuple, list)):
    found = [i for i, a in enumerate(axes) if a is Carry]
    if len(found) > 1:
      raise ValueError(f'Found multiple Carry definitions in {name}')
    return found[0] if found else None
  return None


def _check_scan_out_axes(out_axes, path=()):
  """Outputs can be scanned (int) or the carry; never broadcast (None)."""
  where = 'out_axes' + ''.join(f'[{k!r}]' for k in path)
  if out_axes is None:
    raise ValueError(f'Cannot broadcast output state. Got out_axes=None at: {where}')
  if isinstance(out_axes, StateAxes):
    for axis in out_axes.axes:
      if axis is None or axis is Carry:
        raise ValueError(f'Cannot {"carry" if axis is Carry else "broadcast"} output state. '
                         f'Got {out_axes!r} at: {where}')
  elif isinstance(out_axes, (tuple, list)):
    for i, a in enumerate(out_axes):
      if a is not Carry or path:
        _check_scan_out_axes(a, path + (i,))
  elif isinstance(out_axes, dict):
    for k, a in out_axes.items():
      _check_scan_out_axes(a, path + (k,))


class _ScanSlot(tp.NamedTuple):
  """Where one input leaf goes in ``lax.scan``: 'carry', 'state' (carried Variable), 'xs', 'const'."""
  role: str
  index: int
  axis: tp.Any


class ScanWrapped:
  """A function run with ``nnx.scan``; call it like the original."""

  def __init__(self, fun, *, length=None, reverse=False, unroll=1, in_axes=(Carry, 0),
               out_axes=(Carry, 0), transform_metadata=None, graph=None, graph_updates=None):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.length = length
    self.reverse = reverse
    self.unroll = unroll
    self.in_axes = in_axes
    self.out_axes = out_axes
    self.graph = _settings.graph_mode(graph)
    self.graph_updates = _settings.graph_updates(graph_updates)
    self.transform_metadata = transform_metadata
    self.out_carry = _carry_position(out_axes, 'out_axes')
    _check_scan_out_axes(out_axes)

  def __get__(self, obj, objtype=None):
    if obj is None:
      return self
    return functools.partial(self, obj)

  # -- before the loop: every input leaf gets a role --
  def _specs(self, n_args: int) -> tuple[list, tp.Any]:
    if self.in_axes is Carry:
      if n_args != 1:
        raise ValueError(f'in_axes=nnx.Carry needs exactly one argument, got {n_args}; '
                         'use a tuple such as (nnx.Carry, 0)')
      specs = [Carry]
    else:
      specs = _arg_specs(self.in_axes, n_args, 'scan')
    carry = _carry_position(specs, 'in_axes')
    if (carry is None) != (self.out_carry is None):
      raise ValueError('If one of in_axes or out_axes has Carry, the other must also have Carry. '
                       f'Got in_axes={self.in_axes!r}, out_axes={self.out_axes!r}')
    return specs, carry

  def _slots(self, plan, args, specs, carry_pos):
    """Per dynamic input: its slots (one per leaf) and, for plain inputs, its treedef."""
    carry, state, xs, consts = [], [], [], []
    buckets = {'carry': carry, 'state': state, 'xs': xs, 'const': consts}
    per_input = []
    groups = iter(plan.groups)

    def place(leaf, axis, is_var, whole_carry):
      if whole_carry:
        role = 'carry'
      elif axis is None or axis is Carry:
        # raw arrays cannot be written back: only Variables are carried as state
        role = 'state' if is_var else 'const'
      else:
        role = 'xs'
        leaf = leaf if axis == 0 else jnp.moveaxis(leaf, axis, 0)
      buckets[role].append(leaf)
      return _ScanSlot(role, len(buckets[role]) - 1, axis)

    leaves = plan.leaves()
    for pos, kind in enumerate(plan.kinds):
      if kind == prop.GRAPH:
        a, b = next(groups)
        axes = _graph_leaf_axes(plan, (a, b), specs[pos], pos)
        slots = [place(leaves[i], axes[i - a], isinstance(plan.items[i], Variable),
                       pos == carry_pos) for i in range(a, b)]
        per_input.append((slots, None))
      else:
        flat, treedef = jax.tree_util.tree_flatten(args[pos])
        axes = _plain_axes(specs[pos], args[pos], _label(pos))
        slots = [place(x, ax, False, pos == carry_pos) for x, ax in zip(flat, axes)]
        per_input.append((slots, treedef))
    return per_input, carry, state, xs, consts

  # -- the loop body --
  def _split_output(self, out):
    """(carry part, scanned part, its out_axes) of the user's output."""
    c = self.out_carry
    if c == 'all':
      return out, None, None
    if c is None:
      return None, out, self.out_axes
    if not isinstance(out, tuple) or len(out) != len(self.out_axes):
      raise ValueError(f'nnx.scan: out_axes={self.out_axes!r} expects the function to return a '
                       f'tuple of {len(self.out_axes)}, got {type(out).__name__}')
    rest = out[:c] + out[c + 1:]
    rest_axes = tuple(self.out_axes[:c]) + tuple(self.out_axes[c + 1:])
    return out[c], rest, rest_axes

  def __call__(self, *args, **kwargs):
    if kwargs:
      raise TypeError(f'nnx.scan does not take keyword arguments (got {sorted(kwargs)}); pass '
                      'them positionally with an entry in in_axes.')
    specs, carry_pos = self._specs(len(args))
    plan = prop.make_plan(args, {}, graph=self.graph, context='tree-mode scan')
    per_input, carry0, state0, xs0, consts = self._slots(plan, args, specs, carry_pos)
    carry_def = None
    if carry_pos is not None and plan.kinds[carry_pos] == prop.GRAPH:
      carry_def = flatten(args[carry_pos], graph=self.graph, context='tree-mode scan').graphdef
      if len(carry_def.leaf_paths) != len(carry0):
        raise ValueError('nnx.scan (graph mode): the Carry argument shares Variables with other '
                         'arguments; pass each shared Variable in one place only.')
    state_items = [i for i, it in enumerate(plan.items) if _slot_of(per_input, plan, i).role == 'state']
    xs_var_items = {_slot_of(per_input, plan, i).index: i for i, it in enumerate(plan.items)
                    if isinstance(it, Variable) and _slot_of(per_input, plan, i).role == 'xs'}

    def body(loop, x):
      carry_leaves, state_leaves = loop
      inputs = []
      for (slots, treedef) in per_input:
        vals = [(carry_leaves, state_leaves, x, consts)[_ROLES[s.role]][s.index] for s in slots]
        inputs.append(vals if treedef is None else treedef.unflatten(vals))
      a, kw, in_leaves, inner_items = prop.rebuild(plan.key, inputs)
      out = self.fun(*a, **kw)
      carry_out, ys, ys_axes = self._split_output(out)
      new_carry = self._carry_leaves(carry_out, carry_pos, carry_def, per_input, carry_leaves)
      new_state = [inner_items[i]._value for i in state_items]
      changed = tuple(k for k, i in xs_var_items.items() if inner_items[i]._value is not in_leaves[i])
      values = [inner_items[xs_var_items[k]]._value for k in changed]
      ys_def, ys_values, axes, _ = _flatten_out(ys, ys_axes if ys_axes is not None else 0,
                                                self.graph, 'scan')
      return (new_carry, new_state), prop.Output(changed, (ys_def, tuple(axes)), values, ys_values)

    (carry_f, state_f), ys = jax.lax.scan(body, (carry0, state0), xs0, length=self.length,
                                          reverse=self.reverse, unroll=self.unroll)
    self._write_back(plan, per_input, carry_pos, carry_f, state_f, state_items, ys, xs_var_items)
    return self._result(plan, args, per_input, carry_pos, carry_def, carry_f, ys)

  def _carry_leaves(self, carry_out, carry_pos, carry_def, per_input, carry_in):
    if carry_pos is None:
      return []
    if carry_def is not None:
      fl = flatten(carry_out, graph=self.graph, context='tree-mode scan carry')
      if fl.graphdef != carry_def:
        raise ValueError(f'nnx.scan: the carry returned has structure {fl.graphdef} but the '
                         f'carry passed in has {carry_def}; return the same kind of object.')
      return [x._value if isinstance(x, Variable) else x for x in fl.leaves]
    flat, treedef = jax.tree_util.tree_flatten(carry_out)
    if treedef != per_input[carry_pos][1]:
      raise TypeError(f'nnx.scan: the carry returned has structure {treedef} but the carry passed '
                      f'in has {per_input[carry_pos][1]}.')
    return flat

  def _write_back(self, plan, per_input, carry_pos, carry_f, state_f, state_items, ys, xs_vars):
    changed, values = [], []
    for i, value in zip(state_items, state_f):
      changed.append(i)
      values.append(value)
    if carry_pos is not None and plan.kinds[carry_pos] == prop.GRAPH:
      a, b = plan.groups[_graph_index(plan, carry_pos)]
      for i, value in zip(range(a, b), carry_f):
        if isinstance(plan.items[i], Variable):
          changed.append(i)
          values.append(value)
    for k, value in zip(ys.changed, ys.values):
      i = xs_vars[k]
      axis = _slot_of(per_input, plan, i).axis
      changed.append(i)
      values.append(value if axis == 0 else jnp.moveaxis(value, 0, axis))
    plan.write_back(changed, values)

  def _result(self, plan, args, per_input, carry_pos, carry_def, carry_f, ys):
    ys_def, axes = ys.out_def
    ys_leaves = [y if ax == 0 else jnp.moveaxis(y, 0, ax) for y, ax in zip(ys.out_leaves, axes)]
    ys_value = prop.build_output(ys_def, ys_leaves)
    if carry_pos is None:
      return ys_value
    if carry_def is not None:
      carry_value = unflatten(carry_def, carry_f)
    else:
      carry_value = per_input[carry_pos][1].unflatten(carry_f)
    c = self.out_carry
    if c == 'all':
      return carry_value
    out = list(ys_value)
    out.insert(c, carry_value)
    return tuple(out)


_ROLES = {'carry': 0, 'state': 1, 'xs': 2, 'const': 3}


def _graph_index(plan: prop.Plan, pos: int) -> int:
  """Which graph group the argument at ``pos`` is."""
  return sum(1 for k in plan.kinds[:pos] if k == prop.GRAPH)


def _slot_of(per_input, plan: prop.Plan, item: int) -> _ScanSlot:
  """The slot of plan leaf ``item`` (graph inputs list their slots in leaf order)."""
  graph_inputs = [slots for slots, treedef in per_input if treedef is None]
  for (a, b), slots in zip(plan.groups, graph_inputs):
    if a <= item < b:
      return slots[item - a]
  raise AssertionError(item)


def scan(f=None, *, length: int | None = None, reverse: bool = False, unroll: int | bool = 1,
         _split_transpose: bool = False, in_axes: tp.Any = (Carry, 0),
         out_axes: tp.Any = (Carry, 0), transform_metadata=None, graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.lax.scan`` with state propagation, arguments chosen by ``in_axes``.

  ``nnx.Carry`` marks the carried argument (and where the carry sits in the
  output), an int an argument scanned along that axis, ``None`` one passed
  whole to every step. Variables of scanned Modules get their updates back
  stacked; broadcast Variables are carried, so their updates accumulate.
  """
  options = dict(length=length, reverse=reverse, unroll=unroll, in_axes=in_axes,
                 out_axes=out_axes, transform_metadata=transform_metadata, graph=graph,
                 graph_updates=graph_updates)
  if f is None:
    return lambda fun: scan(fun, **options)
  return ScanWrapped(f, **options)


# -- fori_loop / while_loop ---------------------------------------------------

class _LoopState:
  """The loop value as leaves; rebuilt as fresh objects inside each step."""

  def __init__(self, init_val, graph: bool, name: str):
    self.name = name
    self.graph = graph
    fl = flatten(init_val, graph=graph, context=f'tree-mode {name}')
    self.graphdef = fl.graphdef
    self.items = fl.leaves

  def init(self) -> list:
    return [x._value if isinstance(x, Variable) else x for x in self.items]

  def value(self, leaves):
    return unflatten(self.graphdef, leaves)

  def leaves_of(self, out) -> list:
    fl = flatten(out, graph=self.graph, context=f'tree-mode {self.name}')
    if fl.graphdef != self.graphdef:
      raise ValueError(f'nnx.{self.name}: body_fun returned {fl.graphdef} but the loop value is '
                       f'{self.graphdef}; it must return the same structure it was given.')
    return [x._value if isinstance(x, Variable) else x for x in fl.leaves]

  def finish(self, leaves):
    for item, value in zip(self.items, leaves):
      if isinstance(item, Variable):
        object.__setattr__(item, '_value', value)
    return unflatten(self.graphdef, leaves)


def fori_loop(lower, upper, body_fun, init_val, *, unroll: int | bool | None = None,
              graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.lax.fori_loop`` where ``init_val`` may hold Modules: their final state reaches the caller."""
  if not prop.holds_graph(init_val):
    return jax.lax.fori_loop(lower, upper, body_fun, init_val, unroll=unroll)
  loop = _LoopState(init_val, _settings.graph_mode(graph), 'fori_loop')
  final = jax.lax.fori_loop(lower, upper,
                            lambda i, leaves: loop.leaves_of(body_fun(i, loop.value(leaves))),
                            loop.init(), unroll=unroll)
  return loop.finish(final)


def while_loop(cond_fun, body_fun, init_val, *, graph: bool | None = None,
               graph_updates: bool | None = None):
  """``jax.lax.while_loop`` where ``init_val`` may hold Modules: their final state reaches the caller."""
  if not prop.holds_graph(init_val):
    return jax.lax.while_loop(cond_fun, body_fun, init_val)
  loop = _LoopState(init_val, _settings.graph_mode(graph), 'while_loop')
  final = jax.lax.while_loop(lambda leaves: cond_fun(loop.value(leaves)),
                             lambda leaves: loop.leaves_of(body_fun(loop.value(leaves))),
                             loop.init())
  return loop.finish(final)
