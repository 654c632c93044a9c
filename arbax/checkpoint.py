"""Checkpoints of any object's State through Orbax, checked before anything is written.

    >>> import arbax as nnx, tempfile, os
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> nnx.checkpoint.save(path, model)
    >>> nnx.checkpoint.restore(path, nnx.Linear(2, 3, rngs=nnx.Rngs(1)))   # in place

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


def _metadata_tree(path: str) -> dict:
  meta = _checkpointer().metadata(path)
  tree = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None) or meta
  return restore_int_paths(dict(tree))


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
    want_shape, want_dtype = tuple(np.shape(value)), np.dtype(value.dtype)
    got = saved_flat[p]
    got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
    if got_shape != want_shape:
      raise ValueError(f'restore: {format_path(p)} has shape {got_shape} in the checkpoint but '
                       f'{want_shape} in the target. Build the target with the saved configuration.')
    if got_dtype != want_dtype:
      raise ValueError(f'restore: {format_path(p)} has dtype {got_dtype} in the checkpoint but '
                       f'{want_dtype} in the target. Build the target with param_dtype={got_dtype}.')


def _is_abstract(state) -> bool:
  leaves = [v.get_value() if hasattr(v, 'get_value') else v for v in flat_dict(state).values()]
  return any(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)


def restore(path: str | os.PathLike, target):
  """Load ``path`` into ``target``: in place for a concrete target; a new object for an abstract one.

  Returns the restored object (``target`` itself when it was concrete).
  """
  path = os.path.abspath(os.fspath(path))
  graphdef, target_state = api.split(target, graph=True)
  _check_compatible(_metadata_tree(path), target_state)
  pure = load_pure_dict(path)
  values = {p: jax.numpy.asarray(v) for p, v in flat_dict(pure).items()}
  if _is_abstract(target_state):
    fresh = {p: (leaf.replace(values[p]) if hasattr(leaf, 'replace') else values[p])
             for p, leaf in flat_dict(target_state).items()}
    return api.merge(graphdef, from_flat_state(fresh))
  api.update(target, from_flat_state(values))
  return target
