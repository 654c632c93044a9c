"""Checkpoints of any object's State through Orbax, checked before anything is written.

    >>> import arbax as nnx, tempfile, os
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> nnx.checkpoint.save(path, model)
    >>> restored = nnx.checkpoint.restore(path, nnx.Linear(2, 3, rngs=nnx.Rngs(1)))  # in place

``save`` stores ``nnx.to_pure_dict(nnx.state(obj))``: plain nested dicts of
arrays, the format Orbax and every JAX user already read. ``restore`` reads the
checkpoint's metadata first and refuses (ValueError naming the first
differing path) when structure, shape or dtype differ from the target, so a
failed restore leaves the target untouched. Pass an abstract target
(``nnx.eval_shape(lambda: Model(...))``) to ``restore`` and it returns a new,
concrete object instead.
"""
from __future__ import annotations

import os
import typing as tp

import jax
import numpy as np

from arbax import api
from arbax.errors import format_path
from arbax.state import flat_dict, from_flat_state, restore_int_paths, to_pure_dict

__all__ = ['save', 'restore', 'load_pure_dict']


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer()


def save(path: str | os.PathLike, obj, *, force: bool = True) -> None:
  """Write the State of ``obj`` (a model, ``(model, optimizer)``, any pytree of objects) to ``path``."""
  path = os.path.abspath(os.fspath(path))
  pure = to_pure_dict(api.state(obj, graph=True))
  checkpointer = _checkpointer()
  checkpointer.save(path, _stringify_keys(pure), force=force)
  checkpointer.wait_until_finished()


def _stringify_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _stringify_keys(v) for k, v in tree.items()}
  return tree


def load_pure_dict(path: str | os.PathLike) -> dict:
  """The checkpoint as nested dicts of numpy-backed arrays (int keys restored)."""
  path = os.path.abspath(os.fspath(path))
  return restore_int_paths(_checkpointer().restore(path))


def _raw_metadata(path: str) -> dict:
  meta = _checkpointer().metadata(path)
  return dict(getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None) or meta)


def _metadata_tree(path: str) -> dict:
  return restore_int_paths(_raw_metadata(path))


# A Variable may hold a plain Python number; Orbax keeps those as Python numbers.
_PY_SCALARS = (bool, int, float, complex)


def _load_on_host(path: str) -> dict:
  """The checkpoint as numpy arrays (PRNG keys as their raw data) and Python numbers.

  Left to itself Orbax puts arrays on a device *committed* to it, and jitted
  functions see committed inputs as a new signature: every jitted step would
  compile again after a restore. ``jnp.asarray`` of host data is uncommitted,
  like the arrays of a freshly built model.
  """
  def like(m):
    if _is_python_number(m):
      return np.zeros((), m.dtype).item()
    return np.empty(m.shape, m.dtype)

  return restore_int_paths(_checkpointer().restore(path, jax.tree.map(like, _raw_metadata(path))))


def _is_python_number(metadata) -> bool:
  import orbax.checkpoint as ocp
  return isinstance(metadata, ocp.metadata.ScalarMetadata)


def _key_impl(key):
  if isinstance(key, jax.Array):
    return jax.random.key_impl(key)
  found = []  # an abstract key: its impl is read while tracing
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key)
  return found[0]


def _as_target_value(loaded, target_value):
  """A loaded leaf as a value of the target's kind: Python number, array or typed PRNG key."""
  if isinstance(loaded, _PY_SCALARS):
    return loaded if isinstance(target_value, _PY_SCALARS) else jax.numpy.asarray(
        loaded, target_value.dtype)
  data = jax.numpy.asarray(loaded)
  wants_key = (not isinstance(target_value, _PY_SCALARS)
               and jax.dtypes.issubdtype(target_value.dtype, jax.dtypes.prng_key))
  if wants_key and not jax.dtypes.issubdtype(data.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(data, impl=_key_impl(target_value))
  return data


_KINDS = {'b': np.bool_, 'i': np.integer, 'u': np.integer, 'f': np.floating,
          'c': np.complexfloating}


def _dtype_fits(got: np.dtype, value, want: np.dtype, saved_python_number: bool) -> bool:
  # A Python number's dtype is only its kind: a counter saved as 0 may be int32 after training.
  if isinstance(value, _PY_SCALARS) or saved_python_number:
    return np.issubdtype(got, _KINDS.get(want.kind, np.number)) and np.issubdtype(
        want, _KINDS.get(got.kind, np.number))
  return got == want


def _stored_shape_dtype(value) -> tuple[tuple, np.dtype]:
  if isinstance(value, _PY_SCALARS):
    return (), np.dtype(type(value))
  # Orbax writes a typed PRNG key (an Rngs stream's key) as its raw key data, so
  # the metadata describes that data, not the key<impl> dtype.
  if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
    value = jax.eval_shape(jax.random.key_data, value)
  return tuple(np.shape(value)), np.dtype(value.dtype)


def _check_compatible(saved: dict, target_state) -> None:
  saved_flat = flat_dict(saved)
  target_flat = {p: v for p, v in flat_dict(target_state).items()}
  for p in target_flat:
    if p not in saved_flat:
      raise ValueError(f'restore: the checkpoint has nothing at {format_path(p)}, which the target '
                       'has. It was saved from a model of another structure.')
  for p in saved_flat:
    if p not in target_flat:
      raise ValueError(f'restore: the checkpoint has {format_path(p)}, which the target lacks. '
                       'It was saved from a model of another structure.')
  for p, leaf in target_flat.items():
    value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf
    want_shape, want_dtype = _stored_shape_dtype(value)
    got = saved_flat[p]
    got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
    if got_shape != want_shape:
      raise ValueError(f'restore: {format_path(p)} has shape {got_shape} in the checkpoint but '
                       f'{want_shape} in the target. Build the target with the saved configuration.')
    if not _dtype_fits(got_dtype, value, want_dtype, _is_python_number(got)):
      raise ValueError(f'restore: {format_path(p)} has dtype {got_dtype} in the checkpoint but '
                       f'{want_dtype} in the target. Build the target with param_dtype={got_dtype}.')


def _is_abstract(state) -> bool:
  leaves = [v.get_value() if hasattr(v, 'get_value') else v for v in flat_dict(state).values()]
  return any(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)


def _placements(target_state, shardings) -> dict:
  """Per path of the target: the sharding to restore onto (None: default device)."""
  from jax.sharding import NamedSharding
  from arbax.sharding import leaf_shardings
  flat = flat_dict(target_state)
  if shardings is not None:
    placed = leaf_shardings(shardings, list(flat), list(flat.values()), 'restore shardings')
    return dict(zip(flat, placed))
  out = {}
  for p, leaf in flat.items():
    value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf
    sharding = getattr(value, 'sharding', None)
    out[p] = sharding if isinstance(sharding, NamedSharding) else None
  return out


def _load_sharded(path: str, target_state, shardings) -> dict:
  """The checkpoint as nested dicts; Orbax reads each array straight onto its sharding."""
  placements = _placements(target_state, shardings)
  if all(s is None for s in placements.values()):
    return _load_on_host(path)
  saved = flat_dict(_metadata_tree(path))
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = from_flat_state({
      p: jax.ShapeDtypeStruct(tuple(saved[p].shape), saved[p].dtype, sharding=s or fallback)
      for p, s in placements.items()})
  tree = _stringify_keys(to_pure_dict(abstract))
  return restore_int_paths(_checkpointer().restore(path, tree))


def restore(path: str | os.PathLike, target, *, shardings=None):
  """Load ``path`` into ``target``: in place for a concrete target; a new object for an abstract one.

  Returns the restored object (``target`` itself when it was concrete). Arrays
  land on ``shardings`` (one sharding, an ``nnx.StateSharding`` or a tree shaped
  like the target's State) or else on the sharding the target's arrays or
  ShapeDtypeStructs carry (``nnx.get_abstract_model``), whatever mesh saved them.
  """
  path = os.path.abspath(os.fspath(path))
  graphdef, target_state = api.split(target, graph=True)
  _check_compatible(_metadata_tree(path), target_state)
  pure = _load_sharded(path, target_state, shardings)
  loaded = flat_dict(pure)
  values = {p: _as_target_value(loaded[p], leaf.get_value() if hasattr(leaf, 'get_value') else leaf)
            for p, leaf in flat_dict(target_state).items()}
  if _is_abstract(target_state):
    fresh = {p: (leaf.replace(values[p]) if hasattr(leaf, 'replace') else values[p])
             for p, leaf in flat_dict(target_state).items()}
    return api.merge(graphdef, from_flat_state(fresh))
  api.update(target, from_flat_state(values))
  return target
