"""nnx.split / merge / state / update / clone / pop and the traversals, against independent checks.

The Hypothesis properties build random model trees (nested Modules, nnx.List,
nnx.Dict, several Variable kinds with metadata, shared references in graph
mode) and compare objects with ``describe`` below, a walk written here that
does not use the API under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import arbax as nnx


class Count(nnx.Variable):
  pass


class Block(nnx.Module):
  def __init__(self, k=1.0):
    self.w = nnx.Param(jnp.full(2, k))
    self.b = nnx.BatchStat(jnp.zeros(1))
    self.n = 3


class Model(nnx.Module):
  def __init__(self):
    self.layers = nnx.List([Block(1.0), Block(2.0)])
    self.c = Count(jnp.array(0))
    self.arr = jnp.arange(3.0)


class Pair(nnx.Module):
  def __init__(self, a, b):
    self.a = a
    self.b = b


def flat(state):
  """``{path: leaf}`` of a nested State, written independently of arbax.state."""
  out = {}

  def go(node, path):
    for k, v in node.items():
      if isinstance(v, dict):
        go(v, path + (k,))
      else:
        out[path + (k,)] = v
  go(state, ())
  return out


# -- split / merge / state ----------------------------------------------------


def test_split_returns_the_objects_own_variables_grouped_by_first_matching_filter():
  m = Model()
  graphdef, params, counts, rest = nnx.split(m, nnx.Param, Count, ...)
  assert isinstance(graphdef, nnx.GraphDef)
  assert flat(params) == {('layers', 0, 'w'): m.layers[0].w, ('layers', 1, 'w'): m.layers[1].w}
  assert flat(counts) == {('c',): m.c}
  assert set(flat(rest)) == {('arr',), ('layers', 0, 'b'), ('layers', 1, 'b')}
  assert flat(rest)[('layers', 1, 'b')] is m.layers[1].b
  assert flat(rest)[('arr',)] is m.arr


def test_state_keys_are_attribute_names_and_list_indices_in_sorted_order():
  s = nnx.state(Model())
  assert list(s) == ['arr', 'c', 'layers']
  assert list(s['layers']) == [0, 1] and list(s['layers'][0]) == ['b', 'w']
  assert isinstance(s, nnx.State) and isinstance(s['layers'], nnx.State)


def test_split_without_filters_gives_one_state():
  out = nnx.split(Model())
  assert len(out) == 2 and len(flat(out[1])) == 6


def test_split_rejects_a_leaf_no_filter_matches_naming_its_path():
  with pytest.raises(ValueError, match=r'\.c\b.*Param|\.c\b'):
    nnx.split(Model(), nnx.Param, nnx.BatchStat, jax.Array)


def test_split_names_the_first_unmatched_path():
  with pytest.raises(ValueError) as e:
    nnx.split(Model(), nnx.Param, jax.Array)
  assert '.c' in str(e.value) and '...' in str(e.value)


def test_state_leaves_out_unmatched_and_returns_a_tuple_for_several_filters():
  m = Model()
  assert set(flat(nnx.state(m, Count))) == {('c',)}
  params, stats = nnx.state(m, nnx.Param, nnx.BatchStat)
  assert len(flat(params)) == 2 and len(flat(stats)) == 2


def test_ellipsis_before_the_last_filter_is_rejected():
  with pytest.raises(ValueError, match='last'):
    nnx.split(Model(), ..., nnx.Param)
  with pytest.raises(ValueError, match='last'):
    nnx.state(Model(), ..., nnx.Param)


def test_merge_shares_variables_by_default_and_copies_with_copy_true():
  m = Model()
  g, params, rest = nnx.split(m, nnx.Param, ...)
  m2 = nnx.merge(g, params, rest)
  assert m2 is not m and m2.layers[0] is not m.layers[0]
  assert m2.layers[0].w is m.layers[0].w and m2.c is m.c
  assert m2.layers[1].n == 3 and type(m2.layers) is nnx.List
  m3 = nnx.merge(g, params, rest, copy=True)
  assert m3.layers[0].w is not m.layers[0].w
  np.testing.assert_array_equal(m3.layers[1].w[...], [2.0, 2.0])


def test_merge_accepts_raw_values_and_makes_variables_of_the_recorded_kind():
  m = Model()
  g, s = nnx.split(m)
  doubled = jax.tree.map(lambda x: x * 2, s)
  m2 = nnx.merge(g, doubled)
  assert type(m2.layers[0].w) is nnx.Param
  np.testing.assert_array_equal(m2.layers[1].w[...], [4.0, 4.0])
  pure = s.to_pure_dict()
  m3 = nnx.merge(g, pure)
  assert type(m3.c) is Count and type(m3.layers[0].b) is nnx.BatchStat


def test_merge_keeps_variable_metadata():
  class Tagged(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(2), tag='enc', sharding=('a', None))
  g, s = nnx.split(Tagged())
  m2 = nnx.merge(g, jax.tree.map(lambda x: x + 1, s))
  assert m2.w.tag == 'enc' and m2.w.sharding == ('a', None)


def test_merge_errors_name_the_missing_or_extra_path():
  g, params, rest = nnx.split(Model(), nnx.Param, ...)
  with pytest.raises(ValueError, match=r'\.c|\.arr|\.layers\[0\]\.b'):
    nnx.merge(g, params)
  extra = nnx.State({'zz': nnx.Param(1.0)})
  with pytest.raises(ValueError, match=r'\.zz'):
    nnx.merge(g, params, rest, extra)
  with pytest.raises(ValueError, match='State'):
    nnx.merge(g, 3)


def test_merge_after_a_state_entry_was_replaced_uses_the_new_entry():
  m = Model()
  g, s = nnx.split(m)
  new_w = nnx.Param(jnp.zeros(2))
  s['layers'][0]['w'] = new_w
  assert nnx.merge(g, s).layers[0].w is new_w


def test_graphdef_of_equal_structures_are_equal_and_hash_alike():
  a, b = nnx.graphdef(Model()), nnx.graphdef(Model())
  assert a == b and hash(a) == hash(b)
  other = Model()
  other.layers[0].n = 4
  assert nnx.graphdef(other) != a


def test_state_of_a_tuple_of_objects_and_update_with_the_same_structure():
  a, b = Block(1.0), Block(2.0)
  s = nnx.state((a, b))
  assert set(flat(s)) == {(0, 'b'), (0, 'w'), (1, 'b'), (1, 'w')}
  new = jax.tree.map(lambda x: x + 10, s)
  nnx.update((a, b), new)
  np.testing.assert_array_equal(b.w[...], [12.0, 12.0])
  np.testing.assert_array_equal(a.b[...], [10.0])


def test_variables_matches_state():
  m = Model()
  assert set(flat(nnx.variables(m))) == set(flat(nnx.state(m)))
  assert flat(nnx.variables(m, Count)) == {('c',): m.c}


# -- update -------------------------------------------------------------------


def test_update_writes_values_into_the_existing_variables():
  m = Model()
  w = m.layers[0].w
  holder = Pair(w, nnx.Param(0.0))  # another holder of the same Variable sees the write
  nnx.update(m, nnx.State({'layers': {0: {'w': nnx.Param(jnp.full(2, 7.0))}}}))
  assert m.layers[0].w is w
  np.testing.assert_array_equal(holder.a[...], [7.0, 7.0])


def test_update_accepts_raw_values_partial_states_and_several_states():
  m = Model()
  nnx.update(m, {'c': jnp.array(5)}, {'arr': jnp.zeros(3)})
  assert int(m.c[...]) == 5 and type(m.c) is Count
  np.testing.assert_array_equal(m.arr, np.zeros(3))


def test_update_keeps_the_variable_kind_when_given_another_kind():
  m = Model()
  nnx.update(m, {'c': nnx.Param(jnp.array(9))})
  assert type(m.c) is Count and int(m.c[...]) == 9


def test_update_returned_state_from_jax_jit():
  m = Model()

  @jax.jit
  def step(m):
    m.c[...] += 1
    return nnx.state(m, Count)

  nnx.update(m, step(m))
  nnx.update(m, step(m))
  assert int(m.c[...]) == 2


def test_pop_then_update_restores_the_attributes():
  m = Model()
  stats = nnx.pop(m, nnx.BatchStat)
  assert set(flat(stats)) == {('layers', 0, 'b'), ('layers', 1, 'b')}
  assert not hasattr(m.layers[0], 'b')
  assert set(flat(nnx.state(m))) == {('arr',), ('c',), ('layers', 0, 'w'), ('layers', 1, 'w')}
  nnx.update(m, stats)
  assert m.layers[1].b is flat(stats)[('layers', 1, 'b')]


def test_update_rejects_unknown_paths_whose_parent_cannot_hold_them():
  with pytest.raises(ValueError, match=r'\.layers\[5\]\.x'):
    nnx.update(Model(), {'layers': {5: {'x': nnx.Param(1.0)}}})
  with pytest.raises(ValueError, match='State'):
    nnx.update(Model(), 3)


def test_update_inside_jit_on_an_outer_object_raises_trace_error_naming_the_path():
  m = Model()

  @jax.jit
  def f(x):
    nnx.update(m, {'c': x})
    return x

  with pytest.raises(nnx.TraceContextError, match=r'\.c.*nnx\.clone'):
    f(jnp.array(1))
  assert int(m.c[...]) == 0


def test_clone_inside_a_transform_gives_writable_variables():
  m = Model()

  def loss(x):
    c = nnx.clone(m)
    c.layers[0].w[...] = x * c.layers[0].w[...]
    return c.layers[0].w[...].sum()

  assert float(jax.grad(loss)(3.0)) == 2.0
  np.testing.assert_array_equal(m.layers[0].w[...], [1.0, 1.0])


# -- clone / pop --------------------------------------------------------------


def test_clone_copies_structure_and_variables_but_not_arrays_by_default():
  m = Model()
  c = nnx.clone(m)
  assert c.layers[0] is not m.layers[0] and c.layers[0].w is not m.layers[0].w
  assert c.arr is m.arr
  np.testing.assert_array_equal(c.layers[1].w[...], m.layers[1].w[...])
  assert nnx.clone(m, arrays=True).arr is not m.arr
  assert nnx.clone(m, variables=False).c is m.c


def test_clone_in_graph_mode_keeps_sharing():
  p = nnx.Param(jnp.ones(2))
  c = nnx.clone(Pair(p, p), graph=True)
  assert c.a is c.b and c.a is not p


def test_pop_reaches_into_a_chain_of_a_thousand_modules():
  class Link(nnx.Module):
    def __init__(self, inner=None):
      self.inner = inner
      self.seen = nnx.Intermediate(jnp.ones(1))

  node = None
  for _ in range(1001):
    node = Link(node)
  popped = nnx.pop(node, nnx.Intermediate)
  level = popped
  for _ in range(1000):
    assert set(level) == {'inner', 'seen'}
    level = level['inner']
  assert set(level) == {'seen'} and isinstance(level['seen'], nnx.Intermediate)
  deepest = node
  while deepest.inner is not None:
    assert not hasattr(deepest, 'seen')
    deepest = deepest.inner
  assert not hasattr(deepest, 'seen')


def test_pop_needs_a_filter_and_returns_one_state_per_filter():
  with pytest.raises(ValueError, match='at least one filter'):
    nnx.pop(Model())
  m = Model()
  stats, params = nnx.pop(m, nnx.BatchStat, nnx.Param)
  assert len(flat(stats)) == 2 and len(flat(params)) == 2
  assert set(flat(nnx.state(m))) == {('arr',), ('c',)}
  assert flat(nnx.pop(Model(), nnx.Cache)) == {}


# -- tree mode vs graph mode ----------------------------------------------------


def test_tree_mode_alias_error_names_both_paths():
  p = nnx.Param(jnp.ones(1))
  for fn in (nnx.split, nnx.state, nnx.graphdef):
    with pytest.raises(ValueError) as e:
      fn(Pair(p, p), graph=False)
    assert '.a' in str(e.value) and '.b' in str(e.value) and 'graph=True' in str(e.value)
  blk = Block()
  with pytest.raises(ValueError, match=r'\.b.*\.a'):
    nnx.split(Pair(blk, blk), graph=False)


def test_graph_mode_stores_shared_variables_once_and_merge_shares_them():
  p = nnx.Param(jnp.ones(1))
  g, s = nnx.split(Pair(p, p), graph=True)
  assert flat(s) == {('a',): p}
  m2 = nnx.merge(g, s)
  assert m2.a is m2.b is p
  m3 = nnx.merge(g, s, copy=True)
  assert m3.a is m3.b and m3.a is not p


def test_graph_mode_shares_submodules():
  blk = Block()
  g, s = nnx.split(Pair(blk, blk), graph=True)
  m2 = nnx.merge(g, jax.tree.map(lambda x: x + 1, s))
  assert m2.a is m2.b and m2.a is not blk
  np.testing.assert_array_equal(m2.b.w[...], [2.0, 2.0])


def test_graph_mode_rebuilds_reference_cycles_tree_mode_refuses_them():
  a, b = Block(1.0), Block(2.0)
  a.other, b.other = b, a
  with pytest.raises(ValueError, match=r'\.other\.other'):
    nnx.split(a, graph=False)
  g, s = nnx.split(a, graph=True)
  m = nnx.merge(g, s)
  assert m.other.other is m and m.other is not m
  np.testing.assert_array_equal(m.other.w[...], [2.0, 2.0])


def test_set_graph_mode_changes_the_default_globally_and_as_a_context_manager():
  p = nnx.Param(jnp.ones(1))
  pair = Pair(p, p)
  assert len(flat(nnx.state(pair))) == 1  # NNX's default: graph mode, sharing allowed
  with nnx.graphlib.set_graph_mode(False):
    with pytest.raises(ValueError):
      nnx.state(pair)
    assert len(flat(nnx.state(pair, graph=True))) == 1  # the argument wins over the default
  assert nnx.merge(*nnx.split(pair)).a is p
  nnx.graphlib.set_graph_mode(False)
  try:
    with pytest.raises(ValueError):
      nnx.state(pair)
  finally:
    nnx.graphlib.set_graph_mode(True)
  assert nnx.merge(*nnx.split(pair)).a is p


def test_set_graph_updates_is_a_scoped_setting():
  from arbax import _settings
  assert _settings.SETTINGS.graph_updates is True  # NNX's default
  with nnx.graphlib.set_graph_updates(False):
    assert _settings.SETTINGS.graph_updates is False
  assert _settings.SETTINGS.graph_updates is True


# -- traversals ---------------------------------------------------------------


def test_iter_graph_yields_children_before_parents_in_pytree_order():
  m = Model()
  got = [(p, type(x).__name__) for p, x in nnx.iter_graph(m, graph=False)]
  assert got == [(('arr',), 'ArrayImpl'), (('c',), 'Count'),
                 (('layers', 0, 'b'), 'BatchStat'), (('layers', 0, 'w'), 'Param'),
                 (('layers', 0), 'Block'), (('layers', 1, 'b'), 'BatchStat'),
                 (('layers', 1, 'w'), 'Param'), (('layers', 1), 'Block'),
                 (('layers',), 'List'), ((), 'Model')]


def test_iter_graph_graph_mode_visits_shared_objects_once_and_shows_static_attributes():
  blk = Block()
  got = [p for p, _ in nnx.iter_graph(Pair(blk, blk), graph=True)]
  assert got == [('a', 'b'), ('a', 'n'), ('a', 'w'), ('a',), ()]
  with pytest.raises(ValueError, match=r'\.b.*\.a'):
    list(nnx.iter_graph(Pair(blk, blk), graph=False))


def test_iter_graph_includes_containers_and_their_items():
  class T(nnx.Module):
    def __init__(self):
      self.t = nnx.data((nnx.Param(1.0), 3))
  got = [(p, x) for p, x in nnx.iter_graph(T())]
  assert [p for p, _ in got] == [('t', 0), ('t', 1), ('t',), ()]
  assert got[1][1] == 3


def test_find_duplicates_groups_paths_of_shared_objects():
  p = nnx.Param(1.0)
  blk = Block()
  m = Pair(Pair(p, blk), Pair(p, blk))
  assert nnx.find_duplicates(m) == [[('a', 'a'), ('b', 'a')], [('a', 'b'), ('b', 'b')]]
  assert nnx.find_duplicates(m, only=nnx.Param) == [[('a', 'a'), ('b', 'a')]]
  assert nnx.find_duplicates(Model()) == []


def test_recursive_map_rebuilds_bottom_up_without_touching_the_original():
  m = Model()
  seen = []

  def f(path, x):
    seen.append(path)
    if isinstance(x, nnx.Param):
      return nnx.BatchStat(x.get_value() * 0)
    return x

  out = nnx.recursive_map(f, m)
  assert out is not m and type(out.layers[0].w) is nnx.BatchStat
  assert type(m.layers[0].w) is nnx.Param
  assert out.c is m.c  # returned unchanged: the same Variable
  assert seen.index(('layers', 0, 'w')) < seen.index(('layers', 0)) < seen.index(())


def test_recursive_map_graph_mode_maps_shared_objects_once():
  p = nnx.Param(1.0)
  calls = []

  def f(path, x):
    calls.append(path)
    return nnx.Param(5.0) if isinstance(x, nnx.Param) else x

  out = nnx.recursive_map(f, Pair(p, p), graph=True)
  assert out.a is out.b and float(out.a[...]) == 5.0
  assert calls.count(('a',)) == 1 and ('b',) not in calls


def test_recursive_map_refuses_cycles_with_the_path():
  a = Block()
  a.me = a
  with pytest.raises(ValueError, match=r'\.me'):
    nnx.recursive_map(lambda p, x: x, a, graph=True)


# -- flatten / unflatten --------------------------------------------------------


def test_flatten_and_unflatten_round_trip():
  m = Model()
  g, fs = nnx.flatten(m)
  assert fs.paths[0] == ('arr',) and fs.leaves[1] is m.c
  m2 = nnx.unflatten(g, fs)
  assert m2.layers[0].w is m.layers[0].w
  g2, leaves = nnx.flatten(m, with_paths=False)
  assert nnx.unflatten(g2, leaves).c is m.c
  assert nnx.unflatten(g2, [(p, v) for p, v in fs]).c is m.c
  with pytest.raises(ValueError, match='leaves'):
    nnx.unflatten(g, leaves[:-1])


def test_graphdef_apply_calls_the_merged_object():
  class Lin(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.full((2,), 3.0))

    def __call__(self, x):
      return x * self.w

  g, s = nnx.split(Lin())
  y, (g2, s2) = g.apply(s)(jnp.ones(2))
  np.testing.assert_array_equal(y, [3.0, 3.0])
  assert g2 == g and set(flat(s2)) == {('w',)}


def test_graphlib_exposes_the_api_under_nnx_names():
  for name in ('split', 'merge', 'state', 'update', 'graphdef', 'clone', 'pop', 'iter_graph',
               'find_duplicates', 'recursive_map', 'flatten', 'unflatten', 'variables'):
    assert getattr(nnx.graphlib, name) is getattr(nnx, name)


# -- Hypothesis properties over random model trees ------------------------------

KINDS = (nnx.Param, nnx.BatchStat, nnx.Cache, Count)
TAGS = (None, 'enc', 'dec')


NAMES = ('a', 'b', 'c', 'w', 'x')


def decode(data: bytes, shared: bool):
  """A small model spec from bytes: Hypothesis draws one byte string, which is fast to generate
  and shrinks well. Missing bytes read as 0, which ends the tree with Variables."""
  stream = iter(data)

  def take(n):
    return next(stream, 0) % n

  def node(depth):
    kind = take(5 if shared else 4)
    if depth >= 3 or kind == 0:
      return ('var', take(len(KINDS)), take(7) - 3, TAGS[take(len(TAGS))], take(3) + 1)
    if kind == 4:
      return ('ref', take(64))
    if kind == 1:
      return ('module', {NAMES[take(len(NAMES))]: node(depth + 1) for _ in range(take(4))})
    if kind == 2:
      return ('list', [node(depth + 1) for _ in range(take(4))])
    return ('dict', {NAMES[take(len(NAMES))]: node(depth + 1) for _ in range(take(3) + 1)})

  return ('module', {NAMES[take(len(NAMES))]: node(1) for _ in range(take(4) + 1)})


def tree_specs(shared: bool):
  return st.binary(max_size=48).map(lambda data: decode(data, shared))


class Node(nnx.Module):
  pass


def build(spec, made):
  """Objects from a spec; 'ref' reuses an object made earlier (graph-mode sharing)."""
  kind = spec[0]
  if kind == 'ref':
    return made[spec[1] % len(made)] if made else nnx.Param(np.zeros(1))
  if kind == 'var':
    _, k, value, tag, size = spec
    meta = {} if tag is None else {'tag': tag}
    v = KINDS[k](np.full((size,), float(value), np.float32), **meta)
    made.append(v)
    return v
  if kind == 'module':
    obj = Node()
    made.append(obj)
    for name, child in spec[1].items():
      setattr(obj, name, nnx.data(build(child, made)))
    return obj
  if kind == 'list':
    obj = nnx.List([build(c, made) for c in spec[1]])
    made.append(obj)
    return obj
  obj = nnx.Dict({k: build(c, made) for k, c in spec[1].items()})
  made.append(obj)
  return obj


def describe(obj, ids=None):
  """Structure, kinds, metadata, values and sharing pattern (first-seen order) of ``obj``."""
  ids = {} if ids is None else ids
  if isinstance(obj, (nnx.Variable, nnx.Pytree)):
    if id(obj) in ids:
      return ('ref', ids[id(obj)])
    ids[id(obj)] = len(ids)
  if isinstance(obj, nnx.Variable):
    return (type(obj).__name__, obj.get_metadata(), np.asarray(obj.get_value()).tolist())
  if isinstance(obj, nnx.List):
    return ('List', [describe(x, ids) for x in obj])
  if isinstance(obj, nnx.Dict):
    return ('Dict', [(k, describe(obj[k], ids)) for k in sorted(obj)])
  if isinstance(obj, nnx.Pytree):
    attrs = sorted(k for k in vars(obj) if not str(k).startswith('_arbax'))
    return (type(obj).__name__, [(k, describe(getattr(obj, k), ids)) for k in attrs])
  return ('other', repr(obj))


def variables_of(obj):
  out, stack, seen = [], [obj], set()
  while stack:
    x = stack.pop()
    if id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, nnx.Variable):
      out.append(x)
    elif isinstance(x, nnx.List):
      stack.extend(x)
    elif isinstance(x, nnx.Dict):
      stack.extend(x.values())
    elif isinstance(x, nnx.Pytree):
      stack.extend(v for k, v in vars(x).items() if not str(k).startswith('_arbax'))
  return out


FILTER_SETS = [(), (nnx.Param, ...), (nnx.BatchStat, nnx.Param, ...), ('enc', ...),
               (nnx.Not(nnx.Param), ...), (nnx.PathContains('a'), nnx.Any(Count, 'dec'), ...),
               (lambda path, v: len(path) > 2, ...)]


@settings(max_examples=500, deadline=None)
@given(spec=tree_specs(shared=False), filters=st.sampled_from(FILTER_SETS))
def test_property_tree_mode_merge_of_split_reproduces_the_model(spec, filters):
  m = build(spec, [])
  before = describe(m)
  g, *states = nnx.split(m, *filters)
  assert len(states) == max(1, len(filters))
  m2 = nnx.merge(g, *states)
  assert describe(m2) == before
  assert {id(v) for v in variables_of(m2)} == {id(v) for v in variables_of(m)}
  m3 = nnx.merge(g, *states, copy=True)
  assert describe(m3) == before
  assert not {id(v) for v in variables_of(m3)} & {id(v) for v in variables_of(m)}


@settings(max_examples=500, deadline=None)
@given(spec=tree_specs(shared=True), filters=st.sampled_from(FILTER_SETS))
def test_property_graph_mode_merge_of_split_reproduces_values_and_sharing(spec, filters):
  m = build(spec, [])
  before = describe(m)
  g, *states = nnx.split(m, *filters, graph=True)
  assert describe(nnx.merge(g, *states)) == before
  assert describe(nnx.merge(g, *jax.tree.map(lambda x: x, states))) == before
  assert describe(nnx.merge(g, *states, copy=True)) == before


@settings(max_examples=500, deadline=None)
@given(spec=tree_specs(shared=True), graph=st.booleans())
def test_property_update_with_own_state_changes_nothing(spec, graph):
  m = build(spec, [])
  if not graph and nnx.find_duplicates(m):
    graph = True  # tree mode refuses shared references (tested above)
  before = describe(m)
  vars_before = [id(v) for v in variables_of(m)]
  nnx.update(m, nnx.state(m, graph=graph))
  assert describe(m) == before
  nnx.update(m, jax.tree.map(lambda x: x, nnx.state(m, graph=graph)))
  assert describe(m) == before
  assert [id(v) for v in variables_of(m)] == vars_before


@settings(max_examples=500, deadline=None)
@given(spec=tree_specs(shared=False), filters=st.sampled_from(FILTER_SETS[1:]))
def test_property_update_writes_the_values_of_a_filtered_state(spec, filters):
  m = build(spec, [])
  target = nnx.clone(m)
  changed = jax.tree.map(lambda x: x + 1, nnx.state(m, filters[0]))
  nnx.update(m, changed)
  expected = {path: np.asarray(v.get_value()) for path, v in flat(changed).items()}
  full = flat(nnx.state(m))
  for path, v in flat(nnx.state(target)).items():
    want = expected.get(path, np.asarray(v.get_value()))
    np.testing.assert_array_equal(np.asarray(full[path].get_value()), want)


# -- call / as_pure / pure / map --
class _Counter(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.full((2,), 2.0))
    self.count = nnx.Variable(jnp.array(0))

  def bump(self):
    self.count[...] += 1

  def __call__(self, x):
    self.bump()
    return x * self.w[...]


def test_call_returns_output_and_updated_state_under_jit():
  graphdef, st = nnx.split(_Counter())

  @jax.jit
  def fwd(x, st):
    y, (_, st) = nnx.call((graphdef, st))(x)
    return y, st

  y, st = fwd(jnp.ones(2), st)
  y, st = fwd(jnp.ones(2), st)
  np.testing.assert_allclose(y, [2.0, 2.0])
  assert int(nnx.merge(graphdef, st).count[...]) == 2
  _, pair2 = nnx.call(nnx.split({'a': _Counter(), 'b': _Counter()}))['b'].bump()
  nodes = nnx.merge(*pair2)
  assert int(nodes['a'].count[...]) == 0 and int(nodes['b'].count[...]) == 1


def test_as_pure_and_deprecated_pure():
  st = nnx.state(_Counter())
  pure = nnx.as_pure(st)
  assert isinstance(pure, nnx.State) and not isinstance(pure['w'], nnx.Variable)
  np.testing.assert_allclose(pure['w'], [2.0, 2.0])
  assert nnx.as_pure({'a': nnx.Param(1), 'b': 2}) == {'a': 1, 'b': 2}
  with pytest.warns(DeprecationWarning, match='as_pure'):
    nnx.pure(st)


def test_map_builds_new_node():
  m = _Counter()
  nm = nnx.map(lambda path, v: v.replace(jnp.zeros_like(v[...])) if path == ('w',) else v, m)
  assert nm is not m and type(nm) is _Counter
  np.testing.assert_allclose(nm.w[...], [0.0, 0.0])
  np.testing.assert_allclose(m.w[...], [2.0, 2.0])


# -- bare leaves, merge / update edge cases --------------------------------------


@pytest.mark.parametrize('graph', [True, False])
def test_split_of_a_bare_leaf_returns_the_leaf_and_merge_returns_it_back(graph):
  for leaf in (nnx.Param(jnp.ones(2)), jnp.arange(3), 7, 'tag'):
    graphdef, state = nnx.split(leaf, graph=graph)
    assert state is leaf and nnx.merge(graphdef, state) is leaf


@pytest.mark.parametrize('graph', [True, False])
def test_a_bare_variable_split_by_filters_sits_in_its_group_and_updates(graph):
  v = nnx.Param(jnp.array(1.0))
  graphdef, stats, params, rest = nnx.split(v, nnx.BatchStat, nnx.Param, ..., graph=graph)
  assert params is v and stats == {} and rest == {} and isinstance(stats, nnx.State)
  assert nnx.merge(graphdef, stats, params, rest) is v
  nnx.update(v, stats, jnp.array(5.0), rest)
  assert float(v[...]) == 5.0
  nnx.update(v, nnx.Param(jnp.array(6.0)))
  assert float(v[...]) == 6.0
  with pytest.raises(ValueError, match='exactly one non-empty'):
    nnx.update(v, jnp.array(1.0), jnp.array(2.0))


def test_merge_without_a_state_or_graphdef_raises_type_error():
  graphdef, _ = nnx.split(Block())
  with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'state'"):
    nnx.merge(graphdef)
  with pytest.raises(TypeError, match='GraphDef'):
    nnx.merge({'w': 1.0}, {})


def test_merge_accepts_a_flat_state_or_the_leaf_list_of_flatten():
  m = Model()
  graphdef, flat_state = nnx.graphlib.flatten(m)
  assert nnx.merge(graphdef, flat_state).c is m.c
  graphdef, leaves = nnx.graphlib.flatten(m, with_paths=False)
  assert nnx.merge(graphdef, leaves).layers[1].w is m.layers[1].w


def test_update_of_plain_containers_replaces_values_and_adds_keys():
  node = {'a': {'static': 1, 'p': nnx.Param(jnp.array(2.0))}, 'items': [nnx.Param(1.0)]}
  p = node['a']['p']
  nnx.update(node, {'a': {'static': 4, 'p': jnp.array(10.0), 'new': 5}, 'items': {1: 'added'}})
  assert node['a']['static'] == 4 and node['a']['new'] == 5 and node['items'][1] == 'added'
  assert node['a']['p'] is p and float(p[...]) == 10.0
  with pytest.raises(ValueError, match=r'\.t\[0\].*tuple'):
    nnx.update({'t': (1, 2)}, {'t': {0: 5}})


def test_unflatten_with_the_wrong_number_of_leaves_says_so():
  graphdef, _ = nnx.split(Model())
  with pytest.raises(ValueError, match='Incorrect number of leaves'):
    nnx.graphlib.unflatten(graphdef, nnx.State({}))
  with pytest.raises(ValueError, match='Incorrect number of leaves'):
    nnx.graphlib.unflatten(graphdef, [1, 2])


# -- unpack / GraphState -----------------------------------------------------------


def test_unpack_bundles_the_graphdef_with_each_state_and_merge_takes_them():
  m = Model()
  whole = nnx.unpack(m)
  assert isinstance(whole, nnx.GraphState) and whole._graphdef == nnx.graphdef(m)
  assert whole['c'] is m.c and whole.layers[0]['w'] is m.layers[0].w
  params, rest = nnx.unpack(m, nnx.Param, ...)
  assert params._graphdef == rest._graphdef
  m2 = nnx.merge(params, rest)
  assert type(m2) is Model and m2.layers[1].w is m.layers[1].w


def test_merge_of_graph_states_checks_their_graphdefs_and_types():
  a, b = nnx.unpack(Model()), nnx.unpack(Block())
  with pytest.raises(ValueError, match='GraphDef must be the same'):
    nnx.merge(a, b)
  with pytest.raises(ValueError, match='Expected GraphState'):
    nnx.merge(a, nnx.state(Model()))


def test_a_graph_state_is_a_pytree_with_the_paths_of_its_state_and_updates_a_model():
  m = Model()
  packed, _ = nnx.unpack(m, nnx.Param, ...)
  keys = [p for p, _ in jax.tree_util.tree_flatten_with_path(packed)[0]]
  assert keys == [p for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(m, nnx.Param))[0]]
  zeros = jax.tree.map(jnp.zeros_like, packed)
  assert isinstance(zeros, nnx.GraphState) and zeros._graphdef is packed._graphdef
  nnx.update(m, zeros)
  assert float(m.layers[1].w[...].sum()) == 0.0


def test_grad_through_merge_of_graph_states_returns_a_graph_state():
  m = Model()
  params, rest = nnx.unpack(m, nnx.Param, ...)
  grads = nnx.grad(lambda p, r: nnx.merge(p, r).layers[1].w[...].sum(), graph=False)(params, rest)
  assert isinstance(grads, nnx.GraphState)
  assert grads['layers'][1]['w'][...].tolist() == [1.0, 1.0]


# -- tree-mode flatten order and traversal errors ----------------------------------


def test_tree_mode_flatten_sorts_leaves_by_path_and_unflatten_puts_them_back():
  import collections
  Point = collections.namedtuple('Point', ['y', 'x'])
  pt = Point(nnx.Param(1.0), nnx.Param(2.0))
  graphdef, flat_state = nnx.graphlib.flatten(pt, graph=False)
  assert flat_state.paths == (('x',), ('y',)) and flat_state.leaves[0] is pt.x
  _, leaves = nnx.graphlib.flatten(pt, graph=False, with_paths=False)
  assert leaves[0] is pt.x
  for state in (flat_state, leaves):
    back = nnx.graphlib.unflatten(graphdef, state)
    assert type(back) is Point and back.y is pt.y and back.x is pt.x
  graphdef, flat_state = nnx.graphlib.flatten(pt, graph=True)   # graph mode: traversal order
  assert flat_state.paths == (('y',), ('x',))


@pytest.mark.parametrize('walk', ['iter_graph', 'recursive_map'])
def test_tree_mode_traversals_refuse_shared_variables_and_cycles_naming_both_paths(walk):
  run = (lambda n: list(nnx.iter_graph(n, graph=False))) if walk == 'iter_graph' else (
      lambda n: nnx.recursive_map(lambda p, x: x, n, graph=False))
  p = nnx.Param(1.0)
  with pytest.raises(ValueError, match=r'Param found at paths:\s+- \.a\s+- \.b'):
    run(Pair(p, p))
  ring = nnx.List([1])
  ring.append(nnx.List([2, ring]))
  with pytest.raises(ValueError, match=r'List found at paths:\s+- <root>\s+- \[1\]\[1\]'):
    run(ring)


def test_tree_mode_iter_graph_visits_a_shared_object_without_variables_twice():
  leaf_box = Pair(1, 2)
  paths = [p for p, x in nnx.iter_graph(Pair(leaf_box, leaf_box), graph=False) if x is leaf_box]
  assert paths == [('a',), ('b',)]


@pytest.mark.parametrize('walk', ['iter_graph', 'recursive_map'])
def test_tree_mode_traversals_refuse_objects_declared_pytree_false(walk):
  class Opaque(nnx.Pytree, pytree=False):
    pass

  node = nnx.List([Opaque()])
  with pytest.raises(ValueError, match=rf"'{walk}' with graph=False.*pytree=False.*\[0\]"):
    if walk == 'iter_graph':
      list(nnx.iter_graph(node, graph=False))
    else:
      nnx.recursive_map(lambda p, x: x, node, graph=False)
  assert [p for p, _ in nnx.iter_graph(node, graph=True)] == [(0,), ()]


def test_map_can_leave_raw_values_unwrapped():
  out = nnx.map(lambda path, v: 0, Block(), recreate_variables=False)
  assert out.w == 0 and out.b == 0 and not isinstance(out.w, nnx.Variable)
  assert isinstance(nnx.map(lambda path, v: 0, Block()).w, nnx.Param)


@pytest.mark.parametrize('recreate', [True, False])
def test_map_keeps_the_variables_f_returns_as_they_are(recreate):
  block = Block()
  out = nnx.map(lambda path, v: v, block, recreate_variables=recreate)
  assert out is not block
  assert out.w is block.w and out.b is block.b  # the very Variables, not copies


def test_map_of_a_bare_variable_maps_it_as_the_leaf_at_the_empty_path():
  v = nnx.Param(jnp.ones(2), tag='t')
  paths = []

  def double(path, x):
    paths.append(path)
    return x * 2

  out = nnx.map(double, v)
  assert paths == [()]
  assert type(out) is nnx.Param and out.tag == 't' and out is not v  # raw result re-wrapped
  np.testing.assert_array_equal(out[...], [2.0, 2.0])
  np.testing.assert_array_equal(v[...], [1.0, 1.0])
  assert nnx.map(lambda path, x: x, v) is v
  raw = nnx.map(double, v, recreate_variables=False)
  assert not isinstance(raw, nnx.Variable)
  np.testing.assert_array_equal(raw, [2.0, 2.0])


def test_tree_mode_state_holds_plain_values_of_data_containers_and_round_trips_them():
  class Tagged(nnx.Module):
    def __init__(self):
      self.parts = nnx.data([nnx.Param(jnp.array(3.0)), 4, 'tag'])
      self.n = 5

  model = Tagged()
  graphdef, state = nnx.split(model, graph=False)
  assert state['parts'][1] == 4 and state['parts'][2] == 'tag' and 'n' not in state
  assert 'parts' in nnx.state(model, graph=False) and nnx.state(model, graph=True)['parts'].keys() == {0}
  _, params, rest = nnx.split(model, nnx.Param, ..., graph=False)
  assert set(params['parts']) == {0} and dict(rest['parts']) == {1: 4, 2: 'tag'}
  state['parts'][1] = 8
  back = nnx.merge(graphdef, state)
  assert back.parts[1:] == [8, 'tag'] and back.n == 5 and float(back.parts[0][...]) == 3.0
  nnx.update(model, state)
  assert model.parts[1] == 8
  graphdef, state = nnx.split(model, graph=True)   # graph mode: the int and str are structure
  assert set(state['parts']) == {0} and nnx.merge(graphdef, state).parts[1:] == [8, 'tag']
