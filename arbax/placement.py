"""Where a new array goes: mesh axis names (or logical ones) as shardings, and placing values.

    >>> import jax, arbax as nnx
    >>> from arbax import placement
    >>> with nnx.logical_axis_rules([('embed', None), ('mlp', 'model')]):
    ...   placement.to_partition_spec(('embed', 'mlp'))
    P(None, 'model')

The lowest layer of sharding: it knows JAX's shardings and the logical axis rules in
effect, nothing of Variables or Modules. ``variables`` calls ``shard_new_value``
when a Variable with ``out_sharding`` metadata is created; ``sharding`` builds the
Variable-level API on top.
"""
from __future__ import annotations

import contextlib
import threading
import typing as tp

import jax
from jax.core import Tracer
from jax.experimental.layout import Format
from jax.sharding import NamedSharding, PartitionSpec

from arbax import _settings

__all__ = ['logical_axis_rules', 'to_partition_spec', 'shard_new_value', 'constrain']


# -- settings: eager sharding and logical axis rules (per thread) ------------
# (use_eager_sharding lives with the Variables, which record it as metadata.)
class _Local(threading.local):
  def __init__(self):
    self.rules: tuple = ()


_LOCAL = _Local()


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
  """``out_sharding`` metadata (names per axis, a PartitionSpec, NamedSharding or Format) as a PartitionSpec."""
  if isinstance(names, Format):
    names = names.sharding
  if isinstance(names, NamedSharding):
    names = names.spec
  elif names is None or isinstance(names, jax.sharding.Sharding):
    raise TypeError(f'out_sharding {names!r} names no mesh axes: give axis names, a '
                    'PartitionSpec, or a NamedSharding.')
  table = _rule_table(local_rules) if (_LOCAL.rules or local_rules) else {}
  return PartitionSpec(*(_map_axis(n, table) for n in names))


# -- placing new values --------------------------------------------------------
def shard_new_value(value, metadata: dict):
  """The Variable-creation hook (``out_sharding`` in the metadata): place ``value`` if eager."""
  names = metadata.get('out_sharding')
  eager = metadata.get('eager_sharding')
  if eager is None:
    eager = _settings.SETTINGS.eager_sharding
  if not names or not eager or not hasattr(value, 'shape'):
    return value
  sharding = _sharding_in_context(names, metadata.get('sharding_rules'), metadata.get('mesh'))
  if sharding is None:
    raise ValueError(
        f'A Variable with out_sharding={names!r} needs a mesh to be placed on: create it under '
        '`with jax.set_mesh(mesh):`, pass mesh= to nnx.with_partitioning, or turn eager sharding '
        'off with nnx.use_eager_sharding(False) to only record the annotation.')
  _check_axis_types(sharding)
  return constrain(value, sharding)


def _check_axis_types(sharding) -> None:
  """A new Variable is placed with ``reshard`` (Explicit axes) or a constraint (Auto): not both."""
  if isinstance(sharding, Format):
    sharding = sharding.sharding
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else jax.sharding.get_abstract_mesh()
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)) or mesh.empty:
    return
  types = set(mesh.axis_types)
  if jax.sharding.AxisType.Auto in types and jax.sharding.AxisType.Explicit in types:
    raise ValueError(f'Cannot place a new Variable on a mesh whose axes mix types '
                     f'{dict(zip(mesh.axis_names, mesh.axis_types))}: eager sharding needs all '
                     'axes Explicit or all Auto. Make the mesh uniform, or create the Variable '
                     'under nnx.use_eager_sharding(False) and place it yourself.')


def _sharding_in_context(names, local_rules, mesh):
  if isinstance(names, (NamedSharding, Format)):
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
  if not isinstance(value, Tracer):
    return jax.device_put(value, sharding)   # eager: a transfer, no program to compile
  if isinstance(sharding, Format):
    return jax.lax.with_sharding_constraint(value, sharding)
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.are_all_axes_explicit:
    return jax.sharding.reshard(value, sharding)
  return jax.lax.with_sharding_constraint(value, sharding)
