"""The NNX-shaped entries of ``GraphDef.nodes``: one per object of the flattened graph.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    >>> graphdef, _ = nnx.split(Foo())
    >>> [type(n).__name__ for n in graphdef.nodes]
    ['NodeDef', 'VariableDef']
    >>> graphdef.nodes[1].index
    1

A GraphDef stores its structure as nested tuples (fast to hash and compare);
``graphdef.nodes`` is a view of it computed on first access:

* ``NodeDef``: an object or container, in traversal order. Objects (Pytrees)
  have an ``index``; plain containers (list, dict, ...) have ``index=None``.
* ``VariableDef``: a Variable, its kind (``type``), ``index`` and metadata.
* ``NodeRef``: a later reference to the object with that ``index`` (graph mode).
* ``ArrayRefDef``: a raw ``jax.Ref``, numbered like an object; a VariableDef of a
  ``ref=True`` Variable carries one for its Ref (numbered right after it).
* ``TreeNodeDef``: a tree-mode GraphDef starts with one, describing the whole
  tree as a JAX treedef plus ``path_index`` (each leaf path, sorted, with the
  leaf's position in the treedef); the Variables follow as VariableDefs.

``outer_index`` is the index of the same object outside a transform, set when
the GraphDef was made inside an update context (see ``nnx.update_context``).
"""
from __future__ import annotations

import dataclasses
import types
import typing as tp


@dataclasses.dataclass(frozen=True)
class NodeDef:
  """An object or container: its type, index (None for containers) and attribute count."""
  type: type
  index: int | None
  outer_index: int | None
  num_attributes: int
  metadata: tp.Any = None

  __class_getitem__ = classmethod(types.GenericAlias)


@dataclasses.dataclass(frozen=True)
class NodeRef:
  """A reference to an object already described at ``index`` (a shared object or a cycle)."""
  index: int

  __class_getitem__ = classmethod(types.GenericAlias)


@dataclasses.dataclass(frozen=True)
class ArrayRefDef:
  """A ``jax.Ref``: its index and outer index (a raw Ref, or the Ref of a ``ref=True`` Variable)."""
  index: int
  outer_index: int | None = None

  __class_getitem__ = classmethod(types.GenericAlias)


@dataclasses.dataclass(frozen=True)
class VariableDef:
  """A Variable: its kind, index, outer index, metadata (a mapping) and, for a ``ref=True``
  Variable, the ``ArrayRefDef`` of its Ref."""
  type: type
  index: int
  outer_index: int | None
  metadata: tp.Mapping
  array_refdef: ArrayRefDef | None = None

  __class_getitem__ = classmethod(types.GenericAlias)


@dataclasses.dataclass(frozen=True)
class TreeNodeDef:
  """The root of a tree-mode GraphDef: the object's type, its JAX treedef and, for each leaf
  path in sorted order, the position of that leaf in the treedef."""
  type: type
  treedef: tp.Any
  path_index: tuple

  __class_getitem__ = classmethod(types.GenericAlias)


__all__ = ['NodeDef', 'NodeRef', 'VariableDef', 'TreeNodeDef', 'ArrayRefDef']
