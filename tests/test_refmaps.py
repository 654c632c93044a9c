"""RefMap / IndexMap and flatten / unflatten sharing one index space (nnx.graphlib.flatten)."""
import functools

import jax
import jax.numpy as jnp
import pytest

import arbax as nnx
from arbax.graphlib import IndexMap, RefMap


class Pair(nnx.Module):
  def __init__(self, a, b):
    self.a = a
    self.b = b


def test_refmap_keys_objects_by_identity():
  x, y = {'same': 1}, {'same': 1}   # equal but distinct, and unhashable
  refs = RefMap([(x, 0)])
  refs[y] = 1
  assert refs[x] == 0 and refs[y] == 1 and len(refs) == 2
  assert x in refs and {'same': 1} not in refs and refs.get({'same': 1}) is None
  assert list(refs) == [x, y] and [i for _, i in refs.items()] == [0, 1]
  del refs[x]
  assert x not in refs and len(refs) == 1


def test_refmap_and_indexmap_convert_into_each_other():
  a, b = nnx.Param(1.0), nnx.Param(2.0)
  index = IndexMap.from_refmap(RefMap([(a, 0), (b, 1)]))
  assert index == {0: a, 1: b}
  back = RefMap.from_indexmap(index)
  assert back[a] == 0 and back[b] == 1


def test_flattens_sharing_a_refmap_store_an_object_once():
  w = nnx.Param(jnp.ones(2))
  first, second = Pair(w, 1), Pair(w, 2)     # different objects holding one Variable
  refs = RefMap()
  g1, s1 = nnx.graphlib.flatten(first, ref_index=refs)
  g2, s2 = nnx.graphlib.flatten(second, ref_index=refs)
  assert len(s1) == 1 and len(s2) == 0       # second meets w again: a ref, no leaf
  assert len(refs) == 3 and refs[w] == 1 and refs[second] == 2
  assert [type(n).__name__ for n in g2.nodes] == ['NodeDef', 'NodeRef']
  assert g2.nodes[0].index == 2 and g2.nodes[1].index == 1

  objects = IndexMap()
  out1 = nnx.graphlib.unflatten(g1, s1, index_ref=objects)
  out2 = nnx.graphlib.unflatten(g2, s2, index_ref=objects)
  assert out1.a is out2.a is w and (out1.b, out2.b) == (1, 2)
  assert objects == {0: out1, 1: w, 2: out2}


def test_flattening_an_object_already_in_the_refmap_gives_a_ref_root():
  m = Pair(nnx.Param(1.0), 0)
  refs = RefMap()
  nnx.graphlib.flatten(m, ref_index=refs)
  graphdef, flat = nnx.graphlib.flatten(m, ref_index=refs, with_paths=False)
  assert graphdef.nodes == [nnx.graphlib.NodeRef(0)] and flat == []


def test_unflatten_out_of_order_names_the_fix():
  refs = RefMap()
  g1, s1 = nnx.graphlib.flatten(Pair(1, 2), ref_index=refs)
  g2, s2 = nnx.graphlib.flatten(Pair(3, 4), ref_index=refs)
  with pytest.raises(ValueError, match='in the order they were flattened'):
    nnx.graphlib.unflatten(g2, s2, index_ref=IndexMap())


def test_outer_indices_let_unflatten_update_the_outer_objects_in_place():
  """The protocol a transform runs: outer flatten, inner unflatten, change, inner flatten
  recording outer indices, outer unflatten updating the outer objects."""
  a, b = nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0))
  model = Pair(a, b)
  outer_refs = RefMap()
  graphdef, state = nnx.graphlib.flatten(model, ref_index=outer_refs)

  @functools.partial(jax.jit, static_argnums=0)
  def inner(graphdef, state):
    objects = IndexMap()
    m = nnx.graphlib.unflatten(graphdef, state, index_ref=objects)
    m.a, m.b = m.b, m.a                     # a structural change
    m.a[...] += 10
    m.label = 'swapped'                     # a new static attribute
    m.me = m                                # a cycle
    graphdef, state = nnx.graphlib.flatten(m, ref_index=RefMap(),
                                           ref_outer_index=RefMap.from_indexmap(objects))
    return graphdef, state

  graphdef, state = inner(graphdef, state)
  assert dict(graphdef.outer) == {0: 0, 1: 2, 2: 1}   # inner index -> outer index
  out = nnx.graphlib.unflatten(graphdef, state,
                               outer_index_outer_ref=IndexMap.from_refmap(outer_refs))
  assert out is model and model.a is b and model.b is a and model.me is model
  assert float(b[...]) == 12.0 and float(a[...]) == 1.0 and model.label == 'swapped'


def test_unflatten_without_recreating_variables_keeps_raw_values():
  graphdef, state = nnx.split(Pair(nnx.Param(1.0), nnx.BatchStat(2.0)))
  raw = nnx.to_pure_dict(jax.tree.map(lambda v: v * 0, state))
  out = nnx.graphlib.unflatten(graphdef, raw, recreate_variables=False)
  assert out.a == 0.0 and not isinstance(out.a, nnx.Variable)
  assert isinstance(nnx.graphlib.unflatten(graphdef, raw).a, nnx.Param)


def test_ref_index_needs_graph_mode():
  with pytest.raises(ValueError, match='graph mode'):
    nnx.graphlib.flatten(Pair(1, 2), ref_index=RefMap(), graph=False)
