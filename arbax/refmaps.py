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

Graph objects (Pytrees, Variables and ``jax.Ref`` s, see ``arbax.defs``) are
numbered in the order the flattens meet them, so unflattening the GraphDefs in
the same order rebuilds the same sharing across them. The *outer* maps carry identities across a transform
boundary: ``ref_outer_index`` (inner object -> index of the outer object it
stands for) annotates the GraphDef, and ``outer_index_outer_ref`` (outer index
-> outer object) makes unflatten update those outer objects in place instead
of creating new ones (see ``nnx.update_context``).

A ``jax.Ref`` cannot leave a JAX transform, so a flatten with an outer map (the
split inside a transform) replaces each Ref by what crosses instead: ``NoUpdate``
for a Ref that came from outside (it was written in place), ``ArrayRefOutput``
(its value) for a new one; the unflatten outside keeps the outer Ref, or makes a
new Ref of that value.
"""
from __future__ import annotations

import typing as tp

import jax

from arbax.defs import ARRAYREF, NO_UPDATE, VAR, ArrayRefOutput, NoUpdate
from arbax.graph import Flattened, GraphDef, flatten as graph_flatten, leaf_defs
from arbax.variables import Variable


class IndexMap(dict):
  """``{index: object}``: the objects an unflatten created (or reused), by index."""

  @staticmethod
  def from_refmap(refmap: 'RefMap') -> 'IndexMap':
    return IndexMap((index, obj) for obj, index in refmap.items())


class RefMap(tp.MutableMapping):
  """``{object: index}`` keyed by identity (objects need not be hashable or comparable)."""

  def __init__(self, mapping: tp.Mapping | tp.Iterable[tuple[tp.Any, int]] | None = None, /):
    self._entries: dict[int, tuple[tp.Any, int]] = {}
    self.next_index = 0  # one past the highest index: numbers no object holds count too
    if mapping is not None:
      self.update(mapping)

  @staticmethod
  def from_indexmap(indexmap: tp.Mapping[int, tp.Any]) -> 'RefMap':
    return RefMap((obj, index) for index, obj in indexmap.items() if obj is not None)

  def __getitem__(self, obj) -> int:
    return self._entries[id(obj)][1]

  def get(self, obj, default=None):
    entry = self._entries.get(id(obj))
    return default if entry is None else entry[1]

  def __setitem__(self, obj, index: int):
    self._entries[id(obj)] = (obj, index)
    if index >= self.next_index:
      self.next_index = index + 1

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


def _in_index_order(mapping: tp.Iterable[tuple[int, tp.Any]], what: str, size: int = 0) -> list:
  """The objects of ``(index, object)`` pairs as a list by index (at least ``size`` long). A
  number no object holds (the Ref slot of a ref Variable holding no Ref) is None."""
  by_index = dict(mapping)
  if any(type(i) is not int or i < 0 for i in by_index):
    raise ValueError(f'The {what} must map objects to indices 0, 1, ... (as flatten and '
                     f'unflatten fill it); got {sorted(map(repr, by_index))}.')
  n = max(size, max(by_index, default=-1) + 1)
  return [by_index.get(i) for i in range(n)]


def flatten_indexed(node, ref_index: RefMap | None, ref_outer_index: RefMap | None, *,
                    context: str = 'flatten') -> Flattened:
  """Graph-mode flatten continuing the index space of ``ref_index`` (and adding to it).

  Objects already in ``ref_index`` become refs to their index; new ones get the
  next indices. Objects in ``ref_outer_index`` are recorded in the GraphDef with
  their outer index, and the Refs among the leaves become what may leave a
  transform (``NoUpdate`` / ``ArrayRefOutput``, see the module docstring).
  """
  known = [] if ref_index is None else _in_index_order(
      ((i, o) for o, i in ref_index.items()), 'RefMap', ref_index.next_index)
  fl = graph_flatten(node, graph=True, known=known, context=context)
  base = len(known)
  if ref_index is not None:
    for j, obj in enumerate(fl.nodes):
      if obj is not None:
        ref_index[obj] = base + j
    if ref_index.next_index < base + len(fl.nodes):
      ref_index.next_index = base + len(fl.nodes)
  if ref_outer_index is None:
    return Flattened(fl.graphdef.with_outer(None, base), fl.leaves, fl.paths, fl.nodes)
  outer = tuple((base + j, ref_outer_index[obj]) for j, obj in enumerate(fl.nodes)
                if obj is not None and obj in ref_outer_index)
  graphdef = fl.graphdef.with_outer(outer, base)
  leaves = _refs_leaving(graphdef, fl.leaves, ref_outer_index)
  return Flattened(graphdef, leaves, fl.paths, fl.nodes)


def _refs_leaving(graphdef: GraphDef, leaves: list, outer: RefMap) -> list:
  """``leaves`` with each Ref (raw, or held by a ref Variable) replaced by what may leave a
  transform: ``NoUpdate`` when it came from outside, else ``ArrayRefOutput`` of its value. A
  Variable is replaced by a new one holding that (the object it belongs to is not changed)."""
  out = None
  for i, info in enumerate(leaf_defs(graphdef)):
    tag = info.d[0]
    if tag == ARRAYREF:
      ref = leaves[i]
      if isinstance(ref, jax.Ref):
        out = out or list(leaves)
        out[i] = NO_UPDATE if ref in outer else ArrayRefOutput(ref[...])
    elif tag == VAR and info.d.ref_slot:
      var = leaves[i]
      raw = var.get_raw_value()
      if isinstance(raw, jax.Ref):
        out = out or list(leaves)
        out[i] = _holding(var, NO_UPDATE if var in outer or raw in outer
                          else ArrayRefOutput(raw[...]))
  return leaves if out is None else out


def _holding(var: Variable, marker) -> Variable:
  """A Variable of ``var``'s kind and metadata holding ``marker`` as its raw value."""
  new = type(var)._from_parts(NO_UPDATE, var._meta)  # NoUpdate holds no array: no store made
  if type(marker) is not NoUpdate:
    new.set_raw_value(marker)
  return new


def unflatten_indexed(graphdef: GraphDef, leaves: tp.Sequence, index_ref: IndexMap | None,
                      outer_index_outer_ref: tp.Mapping[int, tp.Any] | None, *,
                      copy_variables: bool = False, recreate_variables: bool = True):
  """Build ``graphdef`` around ``leaves`` in the index space of ``index_ref`` (adding the new
  objects to it); objects with an outer index found in ``outer_index_outer_ref`` are the
  outer objects, updated in place (an outer object of another type is a ValueError)."""
  nodes = [] if index_ref is None else _in_index_order(index_ref.items(), 'IndexMap')
  if len(nodes) != graphdef.base:
    raise ValueError(
        f'This GraphDef continues an index space of {graphdef.base} objects, but the IndexMap '
        f'holds {len(nodes)}. Unflatten the GraphDefs in the order they were flattened, with '
        'the same IndexMap (or merge them in one nnx.merge_context).')
  reuse = None
  if outer_index_outer_ref and graphdef.outer:
    reuse = {i: outer_index_outer_ref[o] for i, o in graphdef.outer if o in outer_index_outer_ref}
  out = graphdef.build(leaves, copy_variables=copy_variables, nodes=nodes, reuse=reuse or None,
                       recreate_variables=recreate_variables, adopt_class=False)
  if index_ref is not None:
    index_ref.update((i, obj) for i, obj in enumerate(nodes[graphdef.base:], graphdef.base))
  return out


__all__ = ['RefMap', 'IndexMap', 'flatten_indexed', 'unflatten_indexed', 'NoUpdate',
           'ArrayRefOutput']
