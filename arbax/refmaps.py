"""One index space shared by several flattens: ``RefMap`` (object -> index) and ``IndexMap``
(index -> object), and the flatten / unflatten that read and extend them.

    >>> import arbax as nnx
    >>> m = nnx.Dict(w=nnx.Param(1.0))
    >>> refs = nnx.graphlib.RefMap()
    >>> g1, s1 = nnx.graphlib.flatten(m, ref_index=refs)
    >>> g2, s2 = nnx.graphlib.flatten(m, ref_index=refs)   # seen before: a ref, no state
    >>> type(g2.nodes[0]).__name__, len(s2), len(refs)
    ('NodeRef', 0, 2)
    >>> objs = nnx.graphlib.IndexMap()
    >>> a = nnx.graphlib.unflatten(g1, s1, index_ref=objs)
    >>> nnx.graphlib.unflatten(g2, s2, index_ref=objs) is a
    True

Graph objects (Pytrees and Variables) are numbered in the order the flattens
meet them, so unflattening the GraphDefs in the same order rebuilds the same
sharing across them. The *outer* maps carry identities across a transform
boundary: ``ref_outer_index`` (inner object -> index of the outer object it
stands for) annotates the GraphDef, and ``outer_index_outer_ref`` (outer index
-> outer object) makes unflatten update those outer objects in place instead
of creating new ones (see ``nnx.update_context``).
"""
from __future__ import annotations

import typing as tp

from arbax.graph import Flattened, GraphDef, flatten as graph_flatten


class IndexMap(dict):
  """``{index: object}``: the objects an unflatten created (or reused), by index."""

  @staticmethod
  def from_refmap(refmap: 'RefMap') -> 'IndexMap':
    return IndexMap((index, obj) for obj, index in refmap.items())


class RefMap(tp.MutableMapping):
  """``{object: index}`` keyed by identity (objects need not be hashable or comparable)."""

  def __init__(self, mapping: tp.Mapping | tp.Iterable[tuple[tp.Any, int]] | None = None, /):
    self._entries: dict[int, tuple[tp.Any, int]] = {}
    if mapping is not None:
      self.update(mapping)

  @staticmethod
  def from_indexmap(indexmap: tp.Mapping[int, tp.Any]) -> 'RefMap':
    return RefMap((obj, index) for index, obj in indexmap.items())

  def __getitem__(self, obj) -> int:
    return self._entries[id(obj)][1]

  def get(self, obj, default=None):
    entry = self._entries.get(id(obj))
    return default if entry is None else entry[1]

  def __setitem__(self, obj, index: int):
    self._entries[id(obj)] = (obj, index)

  def __delitem__(self, obj):
    del self._entries[id(obj)]

  def __contains__(self, obj) -> bool:
    return id(obj) in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def __iter__(self):
    return (obj for obj, _ in self._entries.values())

  def items(self):
    return list(self._entries.values())

  def __repr__(self):
    return f'RefMap({{{", ".join(f"{type(o).__name__}: {i}" for o, i in self._entries.values())}}})'


def _in_index_order(mapping: tp.Iterable[tuple[int, tp.Any]], what: str) -> list:
  """The objects of ``(index, object)`` pairs as a list, checking the indices are 0..n-1."""
  by_index = dict(mapping)
  objs = [by_index.get(i, by_index) for i in range(len(by_index))]
  if any(o is by_index for o in objs):
    raise ValueError(f'The {what} must hold the indices 0..{len(by_index) - 1} (as flatten and '
                     f'unflatten fill it); got {sorted(by_index)}.')
  return objs


def flatten_indexed(node, ref_index: RefMap | None, ref_outer_index: RefMap | None, *,
                    context: str = 'flatten') -> Flattened:
  """Graph-mode flatten continuing the index space of ``ref_index`` (and adding to it).

  Objects already in ``ref_index`` become refs to their index; new ones get the
  next indices. Objects in ``ref_outer_index`` are recorded in the GraphDef with
  their outer index.
  """
  known = [] if ref_index is None else _in_index_order(((i, o) for o, i in ref_index.items()),
                                                       'RefMap')
  fl = graph_flatten(node, graph=True, known=known, context=context)
  base = len(known)
  if ref_index is not None:
    for j, obj in enumerate(fl.nodes):
      ref_index[obj] = base + j
  outer = None
  if ref_outer_index is not None:
    outer = tuple((base + j, ref_outer_index[obj]) for j, obj in enumerate(fl.nodes)
                  if obj in ref_outer_index)
  graphdef = fl.graphdef.with_outer(outer, base)
  return Flattened(graphdef, fl.leaves, fl.paths, fl.nodes)


def unflatten_indexed(graphdef: GraphDef, leaves: tp.Sequence, index_ref: IndexMap | None,
                      outer_index_outer_ref: tp.Mapping[int, tp.Any] | None, *,
                      copy_variables: bool = False, recreate_variables: bool = True):
  """Build ``graphdef`` around ``leaves`` in the index space of ``index_ref`` (adding the new
  objects to it); objects with an outer index found in ``outer_index_outer_ref`` are the
  outer objects, updated in place."""
  nodes = [] if index_ref is None else _in_index_order(index_ref.items(), 'IndexMap')
  if len(nodes) != graphdef.base:
    raise ValueError(
        f'This GraphDef continues an index space of {graphdef.base} objects, but the IndexMap '
        f'holds {len(nodes)}. Unflatten the GraphDefs in the order they were flattened, with '
        'the same IndexMap (or merge them in one nnx.merge_context).')
  reuse = {}
  if outer_index_outer_ref and graphdef.outer:
    reuse = {i: outer_index_outer_ref[o] for i, o in graphdef.outer if o in outer_index_outer_ref}
  if reuse or not recreate_variables:
    out = graphdef.build_into(leaves, nodes, reuse, copy_variables=copy_variables,
                              recreate_variables=recreate_variables)
  else:
    out = graphdef.build(leaves, copy_variables=copy_variables, nodes=nodes)
  if index_ref is not None:
    index_ref.update((i, obj) for i, obj in enumerate(nodes[graphdef.base:], graphdef.base))
  return out


__all__ = ['RefMap', 'IndexMap', 'flatten_indexed', 'unflatten_indexed']
