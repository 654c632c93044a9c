"""graph.flatten / unflatten / GraphDef and the flatten cache."""
import pickle
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax import graph


class Block(nnx.Module):
  def __init__(self, k=1.0):
    self.w = nnx.Param(jnp.full(2, k))
    self.n = 3


class Holder(nnx.Module):
  def __init__(self, *items):
    self.items = nnx.data(items)


class Opt(tp.NamedTuple):
  mu: tp.Any
  count: tp.Any


def test_flatten_leaves_and_paths_are_in_pytree_order():
  m = nnx.Dict(z=Block(1.0), a=Block(2.0))
  fl = graph.flatten(m)
  assert fl.paths == [('a', 'w'), ('z', 'w')]
  assert fl.leaves[0] is m['a'].w
  assert [type(x).__name__ for x in fl.nodes] == ['Dict', 'Block', 'Param', 'Block', 'Param']
  assert len(fl.graphdef.leaf_paths) == 2


def test_unflatten_rebuilds_static_attributes_containers_and_jax_nodes():
  m = Holder(Block(2.0), (nnx.Param(1.0), 'tag'), {'k': jnp.zeros(1)}, Opt(jnp.ones(1), 4))
  fl = graph.flatten(m)
  out = graph.unflatten(fl.graphdef, fl.leaves)
  blk, tup, d, opt = out.items
  assert type(blk) is Block and blk.n == 3 and blk.w is m.items[0].w
  assert tup[1] == 'tag' and tup[0] is m.items[1][0]
  assert type(d) is dict and d['k'] is m.items[2]['k']
  assert type(opt) is Opt and opt.count == 4 and opt.mu is m.items[3].mu


def test_unflatten_keeps_attribute_order_and_allows_new_attributes():
  b = Block()
  out = graph.unflatten(*graph.flatten(b)[:2])
  assert [k for k in vars(out) if not str(k).startswith('_arbax')] == ['w', 'n']
  out.extra = nnx.Param(1.0)  # the rebuilt object is a normal, mutable Pytree
  assert graph.flatten(out).paths == [('extra',), ('w',)]


def test_unflatten_wraps_raw_values_in_the_recorded_variable_kind():
  fl = graph.flatten(Block())
  out = graph.unflatten(fl.graphdef, [jnp.zeros(2)])
  assert type(out.w) is nnx.Param
  np.testing.assert_array_equal(out.w[...], [0.0, 0.0])
  copied = graph.unflatten(fl.graphdef, fl.leaves, copy_variables=True)
  assert copied.w is not fl.leaves[0]


def test_unflatten_wrong_number_of_leaves():
  fl = graph.flatten(Holder(Block(), Block()))
  with pytest.raises(ValueError, match='fewer'):
    graph.unflatten(fl.graphdef, fl.leaves[:1])
  with pytest.raises(ValueError, match='more'):
    graph.unflatten(fl.graphdef, fl.leaves + [jnp.ones(1)])


def test_unflatten_fills_nodes_in_flatten_order_for_refs():
  blk = Block()
  fl = graph.flatten(Holder(blk, blk), graph=True)
  nodes = []
  out = graph.unflatten(fl.graphdef, fl.leaves, nodes=nodes)
  assert out.items[0] is out.items[1]
  assert [type(x).__name__ for x in nodes] == [type(x).__name__ for x in fl.nodes]


def test_unflatten_calls_the_after_unflatten_hook():
  calls = []

  class Hooked(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(1.0)

    def _arbax_after_unflatten(self):
      calls.append(self)

  fl = graph.flatten(Hooked())
  out = graph.unflatten(fl.graphdef, fl.leaves)
  assert calls == [out]
  nnx.merge(*nnx.split(out))
  assert len(calls) == 2


def test_tree_mode_alias_error_names_both_paths_and_the_context():
  p = nnx.Param(1.0)
  with pytest.raises(ValueError) as e:
    graph.flatten(Holder(p, p), context='tree-mode jit')
  msg = str(e.value)
  assert '.items[1]' in msg and '.items[0]' in msg and 'tree-mode jit' in msg


def test_graphdef_equality_hash_repr_and_pickle():
  a, b = graph.flatten(Block()).graphdef, graph.flatten(Block(5.0)).graphdef
  assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
  c = Block()
  c.n = 4
  assert graph.flatten(c).graphdef != a
  d = Block()
  d.w.set_metadata(tag='x')
  assert graph.flatten(d).graphdef != a
  assert repr(a) == 'GraphDef(Block(w=Param), num_leaves=1)'
  restored = pickle.loads(pickle.dumps(a))
  assert restored == a and graph.unflatten(restored, [jnp.ones(2)]).n == 3


def test_graphdef_is_a_valid_static_argument_of_jit():
  g, s = nnx.split(Block())

  @jax.jit
  def f(s):
    return nnx.merge(g, s).w[...] * 2

  np.testing.assert_array_equal(f(s), [2.0, 2.0])


def test_flatten_cached_reuses_until_the_structure_changes():
  m = Holder(Block(), Block())
  fl1, entry = graph.flatten_cached(m)
  assert entry is not None and graph.flatten_cached(m)[0] is fl1
  m.items[0].w = nnx.Param(jnp.zeros(2))  # a new Variable: a structural change
  fl2, _ = graph.flatten_cached(m)
  assert fl2 is not fl1 and fl2.leaves[0] is m.items[0].w
  m.items[1].w.set_metadata(tag='t')
  assert graph.flatten_cached(m)[0].graphdef.root != fl2.graphdef.root
  assert graph.flatten_cached(m, graph=True)[0] is not graph.flatten_cached(m)[0]


def test_flatten_cached_sees_list_mutations():
  m = Block()
  m.layers = nnx.List([Block()])
  assert len(nnx.state(m)['layers']) == 1
  m.layers.append(Block())
  assert len(nnx.state(m)['layers']) == 2
  del m.layers[0]
  assert len(nnx.state(m)['layers']) == 1


def test_plain_mutable_containers_are_never_cached():
  m = Holder()
  m.xs = nnx.data([nnx.Param(1.0)])  # an untracked plain list
  assert type(m.xs) is list and graph.flatten_cached(m)[1] is None
  m.xs.append(nnx.Param(2.0))
  assert set(nnx.state(m)['xs']) == {0, 1}


def test_tuple_roots_are_cached_by_their_members():
  a, b = Block(), Block()
  fl, entry = graph.flatten_cached((a, b))
  assert entry is not None and graph.flatten_cached((a, b))[0] is fl
  assert graph.flatten_cached((b, a))[0] is not fl


def test_cache_does_not_keep_objects_alive():
  import gc
  import weakref
  m = Block()
  graph.flatten_cached(m)
  ref = weakref.ref(m)
  del m
  gc.collect()
  assert ref() is None


def test_merge_fast_path_falls_back_when_the_state_does_not_fit():
  g, s = nnx.split(Holder(Block(), Block()))
  s['items'][0]['w'] = {'nested': 1}  # a branch where a leaf belongs
  assert g.build_from_state(s) is graph.NO_FIT
  s['items'][0]['w'] = nnx.Param(jnp.ones(2))
  assert g.build_from_state(s) is not graph.NO_FIT


def test_graphdef_passes_through_jax_jit_as_static_structure():
  class Box(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(3.0))

  graphdef, state = nnx.split(Box())
  assert jax.tree.leaves(graphdef) == []

  @jax.jit
  def double(pair):
    g, s = pair
    box = nnx.merge(g, s)
    return box.w[...] * 2

  np.testing.assert_allclose(double((graphdef, state)), [0.0, 2.0, 4.0])
