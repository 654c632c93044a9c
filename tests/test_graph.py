"""graph.flatten / unflatten / GraphDef and the flatten cache."""
import pickle
import sys
import time
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax import caches, graph


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
    graph.flatten(Holder(p, p), graph=False, context='tree-mode jit')
  msg = str(e.value)
  assert '.items[1]' in msg and '.items[0]' in msg and 'tree-mode jit' in msg
  assert 'Tree mode (graph=False) does not support shared references' in msg  # NNX's sentence


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
  graph.flatten_cached(m)  # a first sight is walked, not cached
  fl1, entry = graph.flatten_cached(m)
  assert entry is not None and graph.flatten_cached(m)[0] is fl1
  m.items[0].w = nnx.Param(jnp.zeros(2))  # a new Variable: a structural change
  fl2, _ = graph.flatten_cached(m)
  assert fl2 is not fl1 and fl2.leaves[0] is m.items[0].w
  m.items[1].w.set_metadata(tag='t')
  assert graph.flatten_cached(m)[0].graphdef.root != fl2.graphdef.root
  assert graph.flatten_cached(m, graph=True)[0] is not graph.flatten_cached(m, graph=False)[0]


def test_flatten_cached_sees_list_mutations():
  m = Block()
  m.layers = nnx.List([Block()])
  assert len(nnx.state(m)['layers']) == 1
  m.layers.append(Block())
  assert len(nnx.state(m)['layers']) == 2
  del m.layers[0]
  assert len(nnx.state(m)['layers']) == 1


def test_plain_mutable_containers_are_cached_and_watched():
  m = Holder()
  m.xs = nnx.data([nnx.Param(1.0)])  # an untracked plain list
  graph.flatten_cached(m)
  fl, entry = graph.flatten_cached(m)
  assert type(m.xs) is list and entry is not None and graph.flatten_cached(m)[0] is fl
  m.xs.append(nnx.Param(2.0))  # in place: no epoch bump, the watch sees it
  assert set(nnx.state(m)['xs']) == {0, 1}


def test_tuple_roots_are_cached_by_their_members():
  a, b = Block(), Block()
  graph.flatten_cached((a, b))
  fl, entry = graph.flatten_cached((a, b))
  assert entry is not None and graph.flatten_cached((a, b))[0] is fl
  assert graph.flatten_cached((b, a))[0] is not fl


def test_cache_does_not_keep_objects_alive():
  import gc
  import weakref
  m = Block()
  graph.flatten_cached(m)
  assert graph.flatten_cached(m)[1] is not None
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


def test_graphdef_records_its_mode_and_context_annotations_in_equality_and_pickle():
  tree_def = graph.flatten(Block(), graph=False).graphdef
  graph_def = graph.flatten(Block(), graph=True).graphdef
  assert tree_def.graph is False and graph_def.graph is True and tree_def != graph_def
  annotated = graph_def.with_outer(((0, 5),))
  assert annotated != graph_def and annotated.root is graph_def.root
  assert graph_def.with_outer(None) is graph_def
  restored = pickle.loads(pickle.dumps(annotated))
  assert restored == annotated and restored.outer == ((0, 5),) and restored.num_leaves == 1


def test_build_with_reuse_updates_objects_in_place_and_creates_the_rest():
  old = Block(1.0)
  old_w = old.w
  new = Holder(Block(7.0), Block(8.0))
  fl = graph.flatten(new, graph=True)
  # nodes: Holder 0, Block 1, Param 2, Block 3, Param 4; reuse `old` for the first Block
  nodes = []
  out = fl.graphdef.build([jnp.full(2, 7.0), jnp.full(2, 8.0)], nodes=nodes,
                          reuse={1: old, 2: old_w}, adopt_class=False)
  assert out.items[0] is old and old.w is old_w and old_w[...].tolist() == [7.0, 7.0]
  assert out.items[1] is not new.items[1] and out.items[1].w[...].tolist() == [8.0, 8.0]
  assert nodes[1] is old and nodes[2] is old_w and len(nodes) == 5
  with pytest.raises(ValueError, match='Expected a node of type Block for index 1, but the outer '
                                       'object there is a Holder'):
    fl.graphdef.build([jnp.ones(2), jnp.ones(2)], reuse={1: Holder()}, adopt_class=False)
  adopted = Holder()
  fl.graphdef.build([jnp.ones(2), jnp.ones(2)], reuse={1: adopted})  # graph updates: adopt
  assert type(adopted) is Block and adopted.n == 3


def test_build_continues_an_index_space_and_keeps_raw_values_on_request():
  blk = Block()
  fl = graph.flatten([blk, blk], graph=True, known=[blk])  # blk is object 0 of an earlier split
  assert fl.graphdef.root.children[0].index == 0
  out = fl.graphdef.build([], nodes=[blk])
  assert out[0] is blk and out[1] is blk
  raw = graph.flatten(Block(), graph=True).graphdef.build([jnp.zeros(2)], recreate_variables=False)
  assert type(raw.w) is not nnx.Param and raw.w.tolist() == [0.0, 0.0]


def test_built_objects_own_their_static_lists_and_belong_to_the_current_trace():
  class Tagged(nnx.Module):
    def __init__(self):
      self.tags = ['a']
      self.w = nnx.Param(jnp.ones(1))

  fl = graph.flatten(Tagged())
  a = graph.unflatten(fl.graphdef, fl.leaves)
  b = graph.unflatten(fl.graphdef, fl.leaves)
  a.tags.append('b')
  assert b.tags == ['a'] and fl.graphdef == graph.flatten(Tagged()).graphdef

  @jax.jit
  def inside(x):
    built = graph.unflatten(fl.graphdef, [x])
    built.w = nnx.Param(x + 1)  # built in this trace: may be written here
    return built.w[...]

  assert inside(jnp.ones(1)).tolist() == [2.0]
  outside = graph.unflatten(fl.graphdef, fl.leaves)
  with pytest.raises(nnx.errors.TraceContextError):
    jax.jit(lambda x: setattr(outside, 'w', nnx.Param(x)))(jnp.ones(1))


# -- what flattening sees: writes behind setattr, containers changed in place, deep chains --
def test_flatten_follows_writes_that_bypass_setattr():
  b = Block()
  fl = graph.flatten(b)
  object.__setattr__(b, 'n', 4)          # a static value: the GraphDef changes
  b.__dict__['extra'] = nnx.Param(2.0)   # a new attribute: classified as setattr would
  again = graph.flatten(b)
  assert again.graphdef != fl.graphdef and again.paths == [('extra',), ('w',)]
  assert graph.unflatten(again.graphdef, again.leaves).n == 4
  vars(b).pop('extra')
  assert graph.flatten(b).paths == [('w',)]


def test_a_static_list_changed_in_place_changes_the_graphdef():
  b = Block()
  b.sizes = [1, 2]
  before = graph.flatten(b).graphdef
  b.sizes.append(3)
  after = graph.flatten(b).graphdef
  assert after != before  # so jax.jit retraces instead of reusing a program built for [1, 2]
  rebuilt = graph.unflatten(after, [b.w])
  assert rebuilt.sizes == [1, 2, 3] and rebuilt.sizes is not b.sizes


def test_flatten_cached_sees_in_place_changes_of_containers_it_walked_into():
  import collections
  m = Holder(nnx.State({'a': nnx.Param(1.0)}), {0: nnx.Param(2.0)},
             collections.OrderedDict(a=nnx.Param(3.0)), (nnx.Param(4.0), []))
  graph.flatten_cached(m)
  fl, entry = graph.flatten_cached(m)
  assert entry is not None and graph.flatten_cached(m)[0] is fl
  edits = [lambda: m.items[0].__setitem__('b', nnx.Param(5.0)),
           lambda: m.items[1].__setitem__(1, nnx.Param(6.0)),
           lambda: m.items[2].move_to_end('a', last=False) or m.items[2].__setitem__('b', 1),
           lambda: m.items[3][1].append(nnx.Param(7.0))]
  for edit in edits:
    before = graph.flatten_cached(m)[0]
    edit()
    after = graph.flatten_cached(m)[0]
    assert after is not before and after.paths == graph.flatten(m).paths


def test_the_cache_keeps_no_entry_that_would_keep_a_cycle_alive():
  import gc
  import weakref
  parent = Block()
  parent.child = Block()
  parent.child.parent = parent  # a reference cycle through the child's attributes
  graph.flatten_cached(parent, graph=True)
  assert graph.flatten_cached(parent, graph=True)[1] is None
  ref = weakref.ref(parent)
  del parent
  gc.collect()
  assert ref() is None


class Chain(nnx.Module):
  def __init__(self, inner=None, mode=False):
    self.inner = inner
    self.w = nnx.Param(jnp.ones(1))
    self.deterministic = mode


def _chain(depth: int):
  node = Chain()
  for _ in range(depth):
    node = Chain(node)
  return node


def test_a_chain_of_a_thousand_nested_modules_splits_walks_and_switches_modes():
  node = _chain(1000)
  graphdef, state = nnx.split(node)
  assert len(graphdef.leaf_paths) == 1001 and graphdef.leaf_paths[-1] == ('w',)
  assert len(graphdef.leaf_paths[0]) == 1001 and repr(graphdef).startswith('GraphDef(Chain(inner=')
  rebuilt = nnx.merge(graphdef, state)
  assert rebuilt.inner.inner.w is node.inner.inner.w
  assert sum(1 for _ in nnx.iter_graph(node)) > 3000
  assert sum(1 for _ in nnx.iter_modules(node)) == 1001
  node.eval()
  deepest = node
  while deepest.inner is not None:
    deepest = deepest.inner
  assert deepest.deterministic is True
  node.set_attributes(deterministic=False)
  assert deepest.deterministic is False
  assert nnx.clone(node).inner.inner.w is not node.inner.inner.w


def test_graphdefs_of_two_separately_built_deep_chains_compare_equal():
  limit = sys.getrecursionlimit()
  first, second = nnx.graphdef(_chain(1500)), nnx.graphdef(_chain(1500))
  assert first is not second and first.root is not second.root
  assert first == second and hash(first) == hash(second)
  other = _chain(1500)
  other.inner.inner.deterministic = True  # one static attribute differs, deep inside
  assert nnx.graphdef(other) != first
  assert sys.getrecursionlimit() == limit


def test_jit_carries_updates_through_a_chain_of_a_thousand_modules():
  node = _chain(1000)
  deepest = node
  while deepest.inner is not None:
    deepest = deepest.inner

  @nnx.jit
  def step(chain):
    inner = chain
    while inner.inner is not None:
      inner = inner.inner
    inner.w[...] += 1.0

  step(node)
  step(node)  # the second call compares the cached structure with the new one
  assert float(deepest.w[0]) == 3.0 and float(node.w[0]) == 1.0


def test_a_deep_chain_builds_in_time_linear_in_its_depth():
  # Each level of a chain used to hash everything below it when its compiled builder was
  # looked up: 4,000 levels took seconds. Only the short sub-structures are shared now.
  shared = next(c for c in caches.registered() if 'compiled GraphDef builders' in repr(c))
  caches.clear_caches()
  node = _chain(4000)
  start = time.perf_counter()
  copy = nnx.clone(node)
  assert time.perf_counter() - start < 5.0
  assert copy.inner.inner.w is not node.inner.inner.w
  assert len(shared) < 200  # the short sub-chains (<= 32 levels) and the root, not 4,000 entries


def test_flatten_of_an_absurdly_deep_chain_raises_a_clear_error():
  node = None
  for _ in range(100_000):
    node = [node]
  with pytest.raises(RecursionError, match=r'tree-mode split: the object is nested too deeply.*'
                                           r'nnx\.List'):
    graph.flatten(node)


def test_watch_compares_every_kind_of_container_with_its_copy():
  from arbax import _structure
  d, lst, static = {'a': 1}, [1], [[1]]
  box = Opt(jnp.ones(1), 0)  # a NamedTuple: compared one level deep, like any pytree node
  w = _structure.Watch([d, lst, (static, _structure.snapshot(static)), box, d])
  assert len(w) == 4 and w.unchanged()
  for change, undo in [(lambda: d.update(a=2), lambda: d.update(a=1)),
                       (lambda: lst.append(2), lambda: lst.pop()),
                       (lambda: static[0].append(2), lambda: static[0].pop())]:
    change()
    assert not w.unchanged()
    undo()
    assert w.unchanged()
  d['a'] = 2
  w.refresh()
  assert w.unchanged()


def test_a_data_attribute_is_a_leaf_whatever_its_value():
  class Counter(nnx.Pytree):
    def __init__(self):
      self.count = nnx.data(0)             # data: a leaf, as JAX sees it too
      self.name = 'c'                      # static
      self.items = nnx.data([1, jnp.ones(1)])  # inside a container, graph mode keeps 1 static

  c = Counter()
  assert jax.tree.leaves(c)[0] == 0
  fl = graph.flatten(c, graph=True)
  assert fl.paths == [('count',), ('items', 1)] and fl.leaves[0] == 0
  state = nnx.state(c)
  assert state['count'] == 0 and 'name' not in state
  rebuilt = graph.unflatten(fl.graphdef, [5, jnp.zeros(1)])
  assert rebuilt.count == 5 and rebuilt.items[0] == 1 and rebuilt.name == 'c'


def test_jax_refs_are_leaves_shared_like_objects_and_tree_mode_refuses_sharing_one():
  ref = jax.new_ref(jnp.array(1.0))
  fl = graph.flatten([ref, ref], graph=True)
  assert fl.paths == [(0,)] and fl.leaves == [ref] and fl.nodes == [ref]  # stored once
  out = graph.unflatten(fl.graphdef, fl.leaves)
  assert out[0] is out[1] is ref
  with pytest.raises(ValueError, match=r'Ref at \[1\] was already seen at \[0\]'):
    nnx.split([ref, ref], graph=False)


def test_tree_mode_makes_every_jax_leaf_in_a_container_a_leaf_graph_mode_keeps_plain_values_static():
  def fn(x):
    return x
  tree = {'z': [nnx.Param(jnp.array(1)), jnp.array(2)],
          'a': (nnx.Param(jnp.array(3)), 4, 'hi', None, fn, int)}
  fl = graph.flatten(tree, graph=False)
  # as jax.tree.leaves sees it: None is an empty node, a str, a function or a class a leaf
  assert fl.paths == [('a', 0), ('a', 1), ('a', 2), ('a', 4), ('a', 5), ('z', 0), ('z', 1)]
  assert fl.leaves[1:5] == [4, 'hi', fn, int]
  back = graph.unflatten(fl.graphdef, fl.leaves)
  assert back['a'][1:] == (4, 'hi', None, fn, int) and back['a'][0] is tree['a'][0]
  fl = graph.flatten(tree, graph=True)
  assert fl.paths == [('a', 0), ('z', 0), ('z', 1)]   # graph mode: plain values are structure
  assert graph.unflatten(fl.graphdef, fl.leaves)['a'][1:] == (4, 'hi', None, fn, int)


def test_tree_mode_leaves_of_a_data_container_are_state_static_attributes_are_not():
  class Box(nnx.Module):
    def __init__(self):
      self.pair = nnx.data((nnx.Param(jnp.array(3.0)), 4))
      self.size = 5                    # a static attribute: structure in both modes

  box = Box()
  assert graph.flatten(box, graph=False).paths == [('pair', 0), ('pair', 1)]
  assert graph.flatten(box, graph=True).paths == [('pair', 0)]
  fl = graph.flatten(box, graph=False)
  rebuilt = graph.unflatten(fl.graphdef, [nnx.Param(jnp.array(1.0)), 7])
  assert rebuilt.pair[1] == 7 and rebuilt.size == 5 and float(rebuilt.pair[0][...]) == 1.0


def test_a_first_flatten_is_not_cached_and_a_repeated_one_is():
  # A one-off nnx.state (a checkpoint, a summary) leaves nothing behind; a loop reuses the walk.
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  key = ((id(model),), True)
  nnx.state(model)
  assert key not in graph._CACHE
  nnx.state(model)
  assert key in graph._CACHE
  assert nnx.state(model)['kernel'] is model.kernel
