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

import contextlib
import functools
import threading
import typing as tp

import jax
from jax.sharding import NamedSharding, PartitionSpec

from arbax import api, filters as filterlib
from arbax.errors import format_path
from arbax.variables import Variable

__all__ = ['PARTITION_NAME', 'with_partitioning', 'with_metadata', 'get_partition_spec',
           'get_named_sharding', 'get_abstract_model', 'as_abstract', 'abstract_with_sharding',
           'use_eager_sharding', 'using_eager_sharding', 'logical_axis_rules', 'StateSharding']

# The key of ``transform_metadata`` that names the axis vmap/scan add (kept for NNX code).
PARTITION_NAME = 'partition_name'


# -- settings: eager sharding and logical axis rules (per thread) ------------
class _Local(threading.local):
  def __init__(self):
    self.eager = True
    self.rules: tuple = ()


_LOCAL = _Local()


class use_eager_sharding(contextlib.AbstractContextManager):
  """Whether new Variables with ``out_sharding`` are placed on the mesh when created.

  ``nnx.use_eager_sharding(False)`` changes the default for the program;
  ``with nnx.use_eager_sharding(False): ...`` for a block only.
  """

  def __init__(self, value: bool, /):
    self._previous = _LOCAL.eager
    _LOCAL.eager = bool(value)

  def __exit__(self, *exc):
    _LOCAL.eager = self._previous
    return False


def using_eager_sharding() -> bool:
  """The current default of ``use_eager_sharding``."""
  return _LOCAL.eager


@contextlib.contextmanager
def logical_axis_rules(rules: tp.Sequence[tuple[str, str | tuple[str, ...] | None]]):
  """Map logical axis names to mesh axes inside the block: ``[('embed', None), ('mlp', 'model')]``.

  Annotations may then name what an axis *is* (``('embed', 'mlp')``) and the
  rules decide how it is split; names without a rule are used as mesh axes.
  """
  previous = _LOCAL.rules
  _LOCAL.rules = tuple((name, target) for name, target in rules)
  try:
    yield
  finally:
    _LOCAL.rules = previous


def _rule_table(local_rules) -> dict:
  """Context rules merged with a Variable's own ``sharding_rules``; a conflict is an error."""
  table: dict = {}
  for name, target in _LOCAL.rules:
    table.setdefault(name, target)  # the first rule naming an axis wins, as in NNX/linen
  own: dict = {}
  for name, target in local_rules or ():
    own.setdefault(name, target)
  for name, target in own.items():
    if name in table and table[name] != target:
      raise ValueError(f'Inconsistent logical axis annotations for {name!r}: {table[name]!r} in '
                       f'nnx.logical_axis_rules vs {target!r} in the sharding_rules metadata.')
    table[name] = target
  return table


def _map_axis(entry, table: dict):
  if isinstance(entry, tuple):  # an axis split over several mesh axes: map each
    mapped = tuple(_map_axis(e, table) for e in entry)
    flat = tuple(m for part in mapped for m in (part if isinstance(part, tuple) else (part,))
                 if m is not None)
    return flat or None
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return entry
  return table.get(entry, entry)


def to_partition_spec(names, local_rules=()) -> PartitionSpec:
  """``out_sharding`` metadata (names per axis, a PartitionSpec or NamedSharding) as a PartitionSpec."""
  if isinstance(names, NamedSharding):
    names = names.spec
  table = _rule_table(local_rules) if (_LOCAL.rules or local_rules) else {}
  return PartitionSpec(*(_map_axis(n, table) for n in names))


# -- annotating Variables -----------------------------------------------------
def shard_new_value(value, metadata: dict):
  """The Variable-creation hook (``out_sharding`` in the metadata): place ``value`` if eager."""
  names = metadata.get('out_sharding')
  eager = metadata.get('eager_sharding')
  if not names or not (_LOCAL.eager if eager is None else eager) or not hasattr(value, 'shape'):
    return value
  sharding = _sharding_in_context(names, metadata.get('sharding_rules'), metadata.get('mesh'))
  if sharding is None:
    raise ValueError(
        f'A Variable with out_sharding={names!r} needs a mesh to be placed on: create it under '
        '`with jax.set_mesh(mesh):`, pass mesh= to nnx.with_partitioning, or turn eager sharding '
        'off with nnx.use_eager_sharding(False) to only record the annotation.')
  return constrain(value, sharding)


def _sharding_in_context(names, local_rules, mesh):
  if isinstance(names, NamedSharding):
    return names
  spec = to_partition_spec(names, local_rules)
  if mesh is not None:
    return NamedSharding(mesh, spec)
  # a bare spec: the mesh of `jax.set_mesh` resolves it, eagerly or inside a trace
  return None if jax.sharding.get_abstract_mesh().empty else spec


def constrain(value, sharding):
  """Place ``value`` on ``sharding`` (a Sharding, or a PartitionSpec under ``jax.set_mesh``).

  Works eagerly and inside traces; meshes with Explicit axes need ``reshard``.
  """
  if not isinstance(value, jax.core.Tracer):
    return jax.device_put(value, sharding)   # eager: a transfer, no program to compile
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.are_all_axes_explicit:
    return jax.sharding.reshard(value, sharding)
  return jax.lax.with_sharding_constraint(value, sharding)


class _MetadataVariable(Variable):
  """What an initializer wrapped by ``with_metadata`` returns: a value plus metadata.

  ``Param(init(...))`` adopts the metadata (a Variable given a Variable keeps
  its metadata), so layers need not know about sharding.
  """


def with_metadata(initializer: tp.Callable, **metadata) -> tp.Callable:
  """``initializer`` whose Variables get ``metadata``: ``nnx.with_metadata(init, out_sharding=...)``."""
  if not callable(initializer):
    raise TypeError(f'with_metadata expects an initializer function, got {initializer!r}')

  @functools.wraps(initializer)
  def init(*args, **kwargs):
    value = initializer(*args, **kwargs)
    if isinstance(value, Variable):  # nested wrappers: the outer metadata is added on top
      metadata_all = {**value._meta.items, **metadata}
      value = value._value
    else:
      metadata_all = dict(metadata)
    from arbax.variables import _make_meta
    return _MetadataVariable._from_parts(value, _make_meta(metadata_all))

  return init


def with_partitioning(initializer: tp.Callable, sharding, mesh=None, **metadata) -> tp.Callable:
  """``initializer`` whose Variables are annotated ``out_sharding=sharding`` (one name per axis).

  ``nnx.Linear(2, 8, kernel_init=nnx.with_partitioning(init, (None, 'model')), ...)``
  """
  return with_metadata(initializer, out_sharding=sharding, mesh=mesh, **metadata)


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


def get_abstract_model(init_fn: tp.Callable, mesh: jax.sharding.Mesh, *, graph: bool | None = None):
  """``(graphdef, abstract_state)`` of ``init_fn()``: ShapeDtypeStructs carrying their NamedSharding.

  Nothing is computed; restore a checkpoint into it or pass
  ``nnx.get_named_sharding`` to ``nnx.jit(out_shardings=...)``.
  """
  from arbax.transforms.control import eval_shape
  with jax.set_mesh(mesh):
    abstract = eval_shape(init_fn, graph=graph)
    graphdef, state = api.split(abstract, graph=graph)
    shardings = get_named_sharding(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, shardings)
  return graphdef, state


def as_abstract(tree, graph: bool | None = None):
  """Attach to each abstract Variable with ``out_sharding`` the NamedSharding it asks for.

  The mesh is the Variable's ``mesh`` metadata or the one of ``jax.set_mesh``;
  a Variable whose ShapeDtypeStruct already has a sharding is left alone.
  """
  def attach(path, x):
    if not isinstance(x, Variable):
      return x
    value = x._value
    meta = x._meta.items
    if (not isinstance(value, jax.ShapeDtypeStruct) or getattr(value, 'sharding', None) is not None
        or not meta.get('out_sharding')):
      return x
    mesh = meta.get('mesh') or jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError(f'as_abstract: the Variable at {format_path(path)} has out_sharding='
                       f'{meta["out_sharding"]!r} but no mesh: call it under jax.set_mesh(mesh).')
    sharding = NamedSharding(mesh, variable_spec(x))
    return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
  return api.recursive_map(attach, tree, graph=graph)


abstract_with_sharding = as_abstract


# -- shardings per filter, and their resolution onto flattened leaves -------
class StateSharding:
  """A sharding per filter for a Module's state: ``nnx.StateSharding({nnx.Param: s, ...: P()})``.

  Each Variable takes the sharding of the first filter it matches; give ``...``
  last to cover the rest. Accepted by ``nnx.jit`` and ``nnx.shard_map``.
  """

  def __init__(self, filter_sharding, /):
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
