"""nnx.traversals: nested mappings to {path: leaf} and back."""
import jax
import pytest

import arbax as nnx
from arbax import traversals

NESTED = {'a': 1, 'b': {'c': 2, 'd': {'e': 3}, 'empty': {}}}


def test_flatten_mapping_gives_tuple_paths_and_drops_empty_mappings():
  assert traversals.flatten_mapping(NESTED) == {('a',): 1, ('b', 'c'): 2, ('b', 'd', 'e'): 3}


def test_round_trip_keeps_empty_mappings_when_asked():
  flat = traversals.flatten_mapping(NESTED, keep_empty_nodes=True)
  assert flat[('b', 'empty')] is traversals.empty_node
  assert traversals.unflatten_mapping(flat) == NESTED
  assert traversals.flatten_mapping({}, keep_empty_nodes=True) == {}


def test_string_paths_with_a_separator():
  flat = traversals.flatten_mapping(NESTED, sep='/')
  assert flat == {'a': 1, 'b/c': 2, 'b/d/e': 3}
  assert traversals.unflatten_mapping(flat, sep='/') == {'a': 1, 'b': {'c': 2, 'd': {'e': 3}}}


def test_is_leaf_keeps_a_sub_mapping_whole():
  flat = traversals.flatten_mapping(NESTED, is_leaf=lambda path, m: path == ('b', 'd'))
  assert flat[('b', 'd')] == {'e': 3}


def test_flatten_to_sequence_and_unflatten_from_pairs():
  pairs = traversals.flatten_to_sequence(NESTED)
  assert pairs == [(('a',), 1), (('b', 'c'), 2), (('b', 'd', 'e'), 3)]
  assert traversals.unflatten_mapping(pairs) == {'a': 1, 'b': {'c': 2, 'd': {'e': 3}}}


def test_states_flatten_like_dicts():
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  assert set(traversals.flatten_mapping(state)) == {('bias',), ('kernel',)}


def test_empty_node_is_a_pytree_without_leaves():
  assert jax.tree.leaves({'x': traversals.empty_node}) == []
  assert jax.tree.map(lambda v: v, traversals.empty_node) is traversals.empty_node


def test_non_mappings_are_type_errors():
  with pytest.raises(TypeError, match='expected a Mapping, got list'):
    traversals.flatten_mapping([1, 2])
  with pytest.raises(TypeError, match='expected a Mapping or an iterable'):
    traversals.unflatten_mapping(3)
