"""Sharding annotations on Variables, and how they become JAX shardings.

    >>> import jax, arbax as nnx
    >>> from jax.sharding import PartitionSpec as P
    >>> init = nnx.with_partitioning(nnx.initializers.ones_init(), (None, 'model'))
    >>> with nnx.use_eager_sharding(False):        # annotate only; no mesh needed
    ...   layer = nnx.Linear(2, 4, kernel_init=init, rngs=nnx.Rngs(0))
    >>> layer.kernel.out_sharding
    (None, 'model')
    >>> nnx.get_partition_spec(nnx.state(layer))['kernel'].get_value()
    P(None, 'model')

A Variable's ``out_sharding`` metadata names, per array axis, the mesh axis
(or logical axis, see ``logical_axis_rules``) it is split over. Everything
else is JAX's own SPMD machinery: ``get_named_sharding`` turns the annotations
into ``NamedSharding``s for ``nnx.jit(out_shardings=...)`` or
``jax.device_put``; with eager sharding on (the default, as in NNX) a Variable
created under ``jax.set_mesh(mesh)`` is placed on the mesh at once.

``StateSharding`` gives a sharding per filter (``{nnx.Param: s1, ...: s2}``);
``nnx.jit`` and ``nnx.shard_map`` accept it wherever a Module argument goes.
"""
from __future__ import annotations

import functools
import typing as tp

import jax
from jax.sharding import NamedSharding, PartitionSpec

from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.placement import (constrain, logical_axis_rules, shard_new_value,  # noqa: F401 (API)
                             to_partition_spec)
from arbax.state import State, create_path_filters
from arbax.variables import Variable, use_eager_sharding, using_eager_sharding  # noqa: F401

__all__ = ['PARTITION_NAME', 'with_partitioning', 'with_metadata', 'get_partition_spec',
           'get_named_sharding', 'use_eager_sharding', 'using_eager_sharding',
           'logical_axis_rules', 'StateSharding']

# The key of ``transform_metadata`` that names the axis vmap/scan add (kept for NNX code).
PARTITION_NAME = 'partition_name'


# -- annotating Variables -----------------------------------------------------
class _MetadataVariable(Variable):
  """What an initializer wrapped by ``with_metadata`` returns: a value plus metadata.

  ``Param(init(...))`` adopts the metadata (a Variable given a Variable keeps
  its metadata), so layers need not know about sharding.
  """


# Carriers are copies of this one: ``replace`` neither places the value on a mesh
# nor turns it into a hijax Variable (the Variable that adopts it does both).
_CARRIER = _MetadataVariable(None, hijax=False, ref=False)


def with_metadata(initializer: tp.Callable, **metadata) -> tp.Callable:
  """``initializer`` whose Variables get ``metadata``: ``nnx.with_metadata(init, out_sharding=...)``."""
  if not callable(initializer):
    raise TypeError(f'with_metadata expects an initializer function, got {initializer!r}')

  @functools.wraps(initializer)
  def init(*args, **kwargs):
    value = initializer(*args, **kwargs)
    if isinstance(value, Variable):  # nested wrappers: the outer metadata is added on top
      return _CARRIER.replace(value.get_value(), **{**value.get_metadata(), **metadata})
    return _CARRIER.replace(value, **metadata)

  return init


def with_partitioning(initializer: tp.Callable, sharding, mesh=None, **metadata) -> tp.Callable:
  """``initializer`` whose Variables are annotated ``out_sharding=sharding`` (one name per axis).

  ``nnx.Linear(2, 8, kernel_init=nnx.with_partitioning(init, (None, 'model')), ...)``
  """
  return with_metadata(initializer, out_sharding=sharding, mesh=mesh, **metadata)


# -- a mapped axis appears or disappears (vmap, scan, transform_metadata) ------
def _axis_change(transform_metadata: tp.Mapping) -> tuple[tp.Any, dict]:
  """``(axis name, other per-axis metadata)`` of a ``transform_metadata`` mapping."""
  if PARTITION_NAME not in transform_metadata:
    raise ValueError(f'transform_metadata needs the {PARTITION_NAME!r} key (nnx.PARTITION_NAME) '
                     f'naming the mapped axis; got {dict(transform_metadata)!r}.')
  others = {k: v for k, v in transform_metadata.items() if k != PARTITION_NAME}
  return transform_metadata[PARTITION_NAME], others


def _inserted(names: tuple, index: int, name) -> tuple:
  out = list(names)
  out.extend([None] * (index - len(out)))  # a short annotation: unnamed axes before it
  out.insert(index, name)
  return tuple(out)


def _removed(names: tuple, index: int, name, key: str) -> tuple:
  names = tuple(names)
  if index >= len(names) or names[index] != name:
    found = names[index] if index < len(names) else '<no axis>'
    raise ValueError(f'Cannot remove the mapped axis {name!r} at index {index} of the {key} '
                     f'metadata {names!r}: found {found!r} there. The transform\'s partition '
                     'name must match the name the Variable\'s annotation gives that axis.')
  return names[:index] + names[index + 1:]


def _variables_in(tree) -> list:
  """The Variables of a pytree, each once (a shared Variable gains or loses its axis once)."""
  unique = {id(x): x for x in jax.tree.leaves(tree, is_leaf=_is_variable) if isinstance(x, Variable)}
  return list(unique.values())


def add_axis(tree, index: int, transform_metadata: tp.Mapping):
  """Record that the Variables of ``tree`` gained a mapped axis at ``index`` (vmap/scan outputs).

  In each Variable's ``out_sharding`` the axis name
  (``transform_metadata[PARTITION_NAME]``) is inserted, and so are the values
  of the other keys of ``transform_metadata`` into the tuple metadata of the
  same name; then the Variable's ``add_axis`` hook runs. Returns ``tree``,
  changed in place.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> v = nnx.Param(jnp.ones((3, 4)), out_sharding=('din', 'dout'), eager_sharding=False)
      >>> nnx.spmd.add_axis(v, 0, {nnx.PARTITION_NAME: 'layers'}).out_sharding
      ('layers', 'din', 'dout')
  """
  name, others = _axis_change(transform_metadata)
  for variable in _variables_in(tree):
    updates = {}
    if variable.get_metadata('out_sharding', None):
      updates['out_sharding'] = _inserted(variable.get_metadata('out_sharding'), index, name)
    for key, value in others.items():
      names = variable.get_metadata(key, None)
      if names and isinstance(names, tuple):
        updates[key] = _inserted(names, index, value)
    if updates:
      variable.set_metadata(**updates)
    variable.add_axis(index, name)
  return tree


def remove_axis(tree, index: int, transform_metadata: tp.Mapping):
  """Undo ``add_axis``: the Variables of ``tree`` are mapped over axis ``index`` (inside vmap/scan).

  The name removed must be the partition name (or the given value for the
  other keys); a ValueError says which name was there. Returns ``tree``.
  """
  name, others = _axis_change(transform_metadata)
  for variable in _variables_in(tree):
    updates = {}
    if variable.get_metadata('out_sharding', None):
      updates['out_sharding'] = _removed(variable.get_metadata('out_sharding'), index, name,
                                         'out_sharding')
    for key, value in others.items():
      names = variable.get_metadata(key, None)
      if names and isinstance(names, tuple):
        updates[key] = _removed(names, index, value, key)
    if updates:
      variable.set_metadata(**updates)
    variable.remove_axis(index, name)
  return tree


# -- reading the annotations --------------------------------------------------
def variable_spec(v: Variable):
  """The PartitionSpec a Variable asks for: from ``out_sharding``, ``P()`` for unannotated arrays."""
  meta = v._meta.items
  # 'sharding_names' is the older NNX key; it is read here but never placed eagerly
  names = meta.get('out_sharding') or meta.get('sharding_names')
  if names:
    return to_partition_spec(names, v._meta.items.get('sharding_rules'))
  return PartitionSpec() if hasattr(v._value, 'shape') else None


def _is_variable(x) -> bool:
  return isinstance(x, Variable)


def get_partition_spec(tree):
  """``tree`` with every Variable's value replaced by its PartitionSpec (``P()`` for bare arrays).

  Applies the current ``logical_axis_rules``. Works on Modules, States and pytrees.
  """
  def spec(x):
    if isinstance(x, Variable):
      return x.replace(variable_spec(x))
    return PartitionSpec() if hasattr(x, 'shape') else None
  return jax.tree.map(spec, tree, is_leaf=_is_variable)


def get_named_sharding(tree, mesh: jax.sharding.Mesh):
  """Like ``get_partition_spec``, with ``NamedSharding(mesh, spec)`` for each spec."""
  specs = get_partition_spec(tree)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


# -- shardings per filter, and their resolution onto flattened leaves -------
class StateSharding:
  """A sharding per filter for a Module's state: ``nnx.StateSharding({nnx.Param: s, ...: P()})``.

  Each Variable takes the sharding of the first filter it matches; give ``...``
  last to cover the rest. Accepted by ``nnx.jit`` and ``nnx.shard_map``.
  """

  def __init__(self, filter_sharding, /):
    if isinstance(filter_sharding, State):  # per-leaf shardings by path
      filter_sharding = create_path_filters(filter_sharding)
    items = filter_sharding.items() if isinstance(filter_sharding, tp.Mapping) else filter_sharding
    self.filters = []
    self.shardings = []
    for f, s in items:
      self.filters.append(f)
      self.shardings.append(s)
    self.filters = tuple(self.filters)
    self.shardings = tuple(self.shardings)
    self.predicates = filterlib.filters_to_predicates(self.filters)

  def __repr__(self):
    pairs = ', '.join(f'{f!r}: {s!r}' for f, s in zip(self.filters, self.shardings))
    return f'StateSharding({{{pairs}}})'

  def sharding_of(self, path: tuple, leaf, where: str):
    for predicate, s in zip(self.predicates, self.shardings):
      if predicate(path, leaf):
        return s
    raise ValueError(f'{where}: no filter of {self!r} matches {format_path(path)} '
                     f'({type(leaf).__name__}). Add a catch-all `...: sharding` entry last.')


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, (jax.sharding.Sharding, PartitionSpec, StateSharding))


def _lookup(tree, path: tuple, where: str):
  """The entry of a sharding tree (State / nested dict, a prefix allowed) for ``path``."""
  node = tree
  for i, key in enumerate(path):
    if isinstance(node, Variable):
      break
    if isinstance(node, tp.Mapping):
      if key in node:
        node = node[key]
        continue
      raise ValueError(f'{where}: the sharding tree has no entry for {format_path(path)} (it stops '
                       f'at {format_path(path[:i])}, which has {sorted(map(str, node))}). Build it '
                       'from nnx.state(arg), e.g. nnx.get_named_sharding(nnx.state(arg), mesh).')
    if isinstance(node, (list, tuple)) and not isinstance(node, PartitionSpec) \
        and isinstance(key, int) and key < len(node):
      node = node[key]
      continue
    if _is_spec_leaf(node):
      break
    raise ValueError(f'{where}: the sharding tree has {type(node).__name__} at '
                     f'{format_path(path[:i])}; expected a sharding or a mapping.')
  if isinstance(node, Variable):
    node = node._value
  return node


def leaf_shardings(spec, paths: tp.Sequence[tuple], leaves: tp.Sequence, where: str) -> list:
  """One sharding (or None) per leaf of a flattened argument, from the user's ``spec``.

  ``spec`` is a Sharding / PartitionSpec / None for the whole argument, a
  ``StateSharding``, or a tree shaped like ``nnx.state(arg)`` (a State,
  nested dicts, its leaves shardings or Variables holding them).
  """
  if spec is None or isinstance(spec, (jax.sharding.Sharding, PartitionSpec)):
    return [spec] * len(leaves)
  out = []
  for path, leaf in zip(paths, leaves):
    s = spec.sharding_of(path, leaf, where) if isinstance(spec, StateSharding) \
        else _lookup(spec, path, where)
    if isinstance(s, StateSharding):
      s = s.sharding_of(path, leaf, where)
    if not (s is None or isinstance(s, (jax.sharding.Sharding, PartitionSpec))):
      raise ValueError(f'{where}: the sharding for {format_path(path)} is {s!r} '
                       f'({type(s).__name__}); expected a jax Sharding, a PartitionSpec or None.')
    out.append(s)
  return out
