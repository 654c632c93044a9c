"""State and FlatState: nesting, flat views, filtering and pure-dict round trips."""
import importlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.state import build_state, compile_builder, compile_getter, skeleton


def make():
  return nnx.State({
      'layers': {0: {'w': nnx.Param(jnp.ones(2)), 'b': nnx.BatchStat(jnp.zeros(1))},
                 1: {'w': nnx.Param(jnp.full(2, 2.0))}},
      'c': nnx.Variable(jnp.array(1.0)),
  })


def test_attribute_access_reads_and_writes_keys():
  s = make()
  assert s.c is s['c']
  s.d = nnx.Param(jnp.zeros(1))
  assert 'd' in s
  with pytest.raises(AttributeError, match='zzz'):
    s.zzz
  del s.d
  assert 'd' not in s


def test_flat_state_is_sorted_by_path_and_round_trips():
  s = make()
  fs = s.flat_state()
  assert isinstance(fs, nnx.FlatState)
  assert fs.paths == (('c',), ('layers', 0, 'b'), ('layers', 0, 'w'), ('layers', 1, 'w'))
  assert fs.leaves[0] is s['c'] and len(fs) == 4 and fs[1][0] == ('layers', 0, 'b')
  back = nnx.from_flat_state(fs)
  assert back['layers'][1]['w'] is s['layers'][1]['w']
  assert nnx.State.from_flat_path(fs)['c'] is s['c']
  assert fs.to_nested_state()['layers'][0]['b'] is s['layers'][0]['b']
  assert nnx.to_flat_state(s).paths == fs.paths


def test_from_flat_state_accepts_a_dict():
  s = nnx.from_flat_state({('a', 'b'): 1, ('c',): 2})
  assert s == {'a': {'b': 1}, 'c': 2} and isinstance(s['a'], nnx.State)


def test_to_pure_dict_unwraps_variables():
  pure = make().to_pure_dict()
  assert type(pure) is dict and type(pure['layers'][0]) is dict
  np.testing.assert_array_equal(pure['layers'][1]['w'], [2.0, 2.0])
  assert nnx.to_pure_dict(make())['c'] == 1.0


def test_replace_by_pure_dict_replaces_entries_without_touching_the_old_variables():
  s = make()
  old = s['layers'][0]['w']
  s.replace_by_pure_dict({'layers': {'0': {'w': jnp.zeros(2)}}, 'c': jnp.array(5.0)})
  new = s['layers'][0]['w']
  assert new is not old and type(new) is nnx.Param
  np.testing.assert_array_equal(new[...], [0.0, 0.0])
  np.testing.assert_array_equal(old[...], [1.0, 1.0])
  assert float(s['c'][...]) == 5.0
  nnx.replace_by_pure_dict(s, {'c': 7.0}, lambda old, v: v * 2)
  assert s['c'] == 14.0


def test_replace_by_pure_dict_names_the_missing_path():
  with pytest.raises(ValueError, match=r'\.layers\[3\]\.w'):
    make().replace_by_pure_dict({'layers': {3: {'w': 1}}})


def test_restore_int_paths():
  assert nnx.restore_int_paths({'layers': {'0': {'w': 1}}, '12': 2, 'a1': 3}) == {
      'layers': {0: {'w': 1}}, 12: 2, 'a1': 3}


def test_filter_split_and_merge_state():
  s = make()
  params = s.filter(nnx.Param)
  assert set(params['layers']) == {0, 1} and 'c' not in params
  params2, stats = nnx.filter_state(s, nnx.Param, nnx.BatchStat)
  assert list(stats['layers'][0]) == ['b']
  p, rest = nnx.split_state(s, nnx.Param, ...)
  merged = nnx.merge_state(p, rest)
  assert merged.flat_state().paths == s.flat_state().paths
  assert (p | rest)['c'] is s['c']
  assert s.merge(p)['layers'][0]['w'] is s['layers'][0]['w']


def test_split_state_names_an_unmatched_path():
  with pytest.raises(ValueError, match=r'\.c'):
    make().split(nnx.Param, nnx.BatchStat)


def test_merge_state_later_states_win():
  a = nnx.State({'x': 1, 'y': 2})
  b = nnx.State({'y': 3})
  assert nnx.merge_state(a, b) == {'x': 1, 'y': 3}


def test_difference_removes_paths_of_the_other_state():
  s = make()
  rest = s - s.filter(nnx.Param)
  assert rest.flat_state().paths == (('c',), ('layers', 0, 'b'))


def test_map_state_gets_path_and_leaf():
  out = nnx.map_state(lambda path, v: path, make())
  assert out['layers'][0]['b'] == ('layers', 0, 'b')
  assert make().map(lambda path, v: 0)['c'] == 0


def test_state_is_a_pytree_whose_leaves_are_variables():
  s = make()
  doubled = jax.tree.map(lambda x: x * 2, s)
  assert isinstance(doubled, nnx.State) and type(doubled['layers'][0]['b']) is nnx.BatchStat
  np.testing.assert_array_equal(doubled['layers'][1]['w'][...], [4.0, 4.0])
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s)]
  assert paths[0] == "['c'].value" and paths[-1] == "['layers'][1]['w'].value"


def test_state_passes_through_jit():
  out = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s))(make())
  assert float(out['c'][...]) == 2.0 and type(out['c']) is nnx.Variable


def test_repr_shows_the_kinds():
  r = repr(make())
  assert r.startswith('State(') and 'Param' in r and 'BatchStat' in r


def test_flat_state_filter_and_split():
  fs = make().flat_state()
  params = fs.filter(nnx.Param)
  assert params.paths == (('layers', 0, 'w'), ('layers', 1, 'w'))
  with pytest.raises(ValueError, match=r'\.c'):
    fs.split(nnx.Param)


def test_skeleton_builder_and_getter_round_trip():
  s = make()
  paths = [p for p, _ in nnx.to_flat_state(s)]
  skel = skeleton(paths)
  leaves = [v for _, v in nnx.to_flat_state(s)]
  built = compile_builder(skel)(iter(leaves))
  assert built == s and build_state(skel, iter(leaves)) == s
  out = []
  assert compile_getter(skel)(s, out) and out == leaves
  s['layers'][0]['extra'] = 1
  assert not compile_getter(skel)(s, [])
  del s['layers'][0]['extra']
  s['c'] = {'nested': 1}
  assert not compile_getter(skel)(s, [])


def test_graph_state_reads_and_writes_through_to_its_state():
  s = make()
  gs = nnx.GraphState('a graphdef', s)
  assert gs['c'] is s['c'] and gs.layers is s['layers'] and 'c' in gs and len(gs) == 2
  gs.extra = 1
  gs['more'] = 2
  assert s['extra'] == 1 and s['more'] == 2 and list(gs) == list(s)
  del gs['more']
  assert 'more' not in s
  with pytest.raises(ValueError, match='expects a State'):
    nnx.GraphState('g', {'a': 1})
  again = pickle.loads(pickle.dumps(gs))
  assert again._graphdef == 'a graphdef' and list(again) == list(gs)


def test_graph_state_maps_like_its_state_and_keeps_the_graphdef_static():
  gs = nnx.GraphState('g', make())
  doubled = jax.tree.map(lambda x: x * 2, gs)
  assert type(doubled) is nnx.GraphState and doubled._graphdef == 'g'
  assert float(doubled['c'][...]) == 2.0
  assert jax.tree.structure(gs) == jax.tree.structure(doubled)


def test_flat_state_is_a_pytree_of_its_values_and_merges_sorted():
  fs = make().flat_state()
  through = jax.jit(lambda f: jax.tree.map(lambda x: x + 1, f))(fs)
  assert isinstance(through, nnx.FlatState) and through.paths == fs.paths
  a, b = fs[:2], fs[2:]
  assert nnx.FlatState.merge(b, a).paths == fs.paths


def test_equal_levels_of_a_state_share_one_builder_and_one_skeleton_level():
  # A model of many equal layers must not hold one compiled builder per layer.
  statelib = importlib.import_module('arbax.state')
  paths = [(i, k) for i in range(100) for k in ('bias', 'kernel')]
  skel = statelib.skeleton(paths)
  assert all(level is skel[0][1] for _, level in skel)
  build = statelib.compile_builder(skel)
  assert len({id(statelib.compile_builder(level)) for _, level in skel}) == 1
  built = build(iter(range(200)))
  assert built[3]['kernel'] == 7 and built[99]['bias'] == 198


def test_nested_dicts_read_and_write_as_states_by_attribute():
  state = nnx.State({'a': nnx.Param(jnp.array(1)), 'b': {'c': nnx.Param(jnp.array(2))}})
  assert isinstance(state['b'], nnx.State) and state.b.c[...] == 2
  state.b.c[...] = 4
  state.b.d = nnx.Param(jnp.array(5))
  assert state['b']['c'][...] == 4 and state['b']['d'][...] == 5
  state['e'] = {'f': 1}  # a plain dict stored later reads as a State too, writes included
  state.e.g = 2
  assert state['e'] == {'f': 1, 'g': 2}
  with pytest.raises(AttributeError, match="'missing'"):
    state.missing


def test_diff_keeps_the_paths_the_other_state_lacks():
  a = nnx.State({'w': nnx.Param(1.0), 'n': {'k': nnx.BatchStat(2.0), 'j': 3}})
  b = nnx.State({'w': nnx.Param(0.0), 'n': {'j': 0}})
  assert nnx.statelib.diff(a, b).to_pure_dict() == {'n': {'k': 2.0}}
  assert (a - b).to_pure_dict() == {'n': {'k': 2.0}}
  assert nnx.statelib.diff(a, nnx.State({})) is a
  assert nnx.statelib.diff(b, b) == nnx.State({})


def test_filters_that_leave_a_remainder_name_it():
  model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Non-exhaustive filters, got a non-empty remainder: '
                                       r'the BatchStat at \.mean'):
    nnx.split(model, nnx.Param)
