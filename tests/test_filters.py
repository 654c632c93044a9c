"""The filter language: each form of filter selects what NNX selects."""
import jax.numpy as jnp
import pytest

import arbax as nnx
from arbax import filters as F

p = nnx.Param(jnp.ones(1))
tagged = nnx.BatchStat(jnp.ones(1), tag='enc')
raw = jnp.ones(1)


def sel(filter, items):
  pred = F.to_predicate(filter)
  return [name for name, path, value in items if pred(path, value)]


ITEMS = [('p', ('enc', 'w'), p), ('tagged', ('b',), tagged), ('raw', ('x', 0), raw)]


def test_type_filter_matches_instances_and_subclasses():
  class MyParam(nnx.Param):
    pass
  assert sel(nnx.Param, ITEMS) == ['p']
  assert sel(nnx.Variable, ITEMS) == ['p', 'tagged']
  assert F.to_predicate(nnx.Param)((), MyParam(1.0))
  assert not F.to_predicate(nnx.Param)((), nnx.Param)  # the class itself is not a Param


def test_string_filter_matches_the_tag_not_the_path():
  assert sel('enc', ITEMS) == ['tagged']
  assert F.to_predicate('enc') == nnx.WithTag('enc')


def test_everything_and_nothing_literals():
  assert sel(..., ITEMS) == sel(True, ITEMS) == ['p', 'tagged', 'raw']
  assert sel(None, ITEMS) == sel(False, ITEMS) == []
  assert F.to_predicate(...) == nnx.Everything() and F.to_predicate(None) == nnx.Nothing()


def test_list_and_tuple_mean_any_of():
  assert sel([nnx.Param, 'enc'], ITEMS) == ['p', 'tagged']
  assert sel((nnx.BatchStat,), ITEMS) == ['tagged']
  assert repr(F.to_predicate([nnx.Param, 'enc'])) == "Any(OfType(Param), WithTag('enc'))"


def test_predicate_function_is_used_as_is():
  def f(path, value):
    return path[0] == 'x'
  assert F.to_predicate(f) is f
  assert sel(f, ITEMS) == ['raw']


def test_combinators():
  assert sel(nnx.All(nnx.Variable, nnx.PathContains('b')), ITEMS) == ['tagged']
  assert sel(nnx.Any(nnx.Param, nnx.PathContains(0)), ITEMS) == ['p', 'raw']
  assert sel(nnx.Not(nnx.Param), ITEMS) == ['tagged', 'raw']
  assert sel(nnx.All(), ITEMS) == ['p', 'tagged', 'raw'] and sel(nnx.Any(), ITEMS) == []
  assert sel(nnx.OfType(nnx.BatchStat), ITEMS) == ['tagged']
  assert sel(nnx.WithTag('enc'), ITEMS) == ['tagged']


def test_path_contains_exact_and_substring():
  assert sel(nnx.PathContains('enc'), ITEMS) == ['p']
  assert sel(nnx.PathContains('n', exact=False), ITEMS) == ['p']
  assert repr(nnx.PathContains('a')) == "PathContains('a', exact=True)"


def test_filters_compare_and_hash_by_value():
  assert nnx.Any(nnx.Param, 'a') == nnx.Any(nnx.Param, 'a')
  assert nnx.Not(nnx.Param) == nnx.Not(nnx.Param) and nnx.Not(nnx.Param) != nnx.Not(nnx.Cache)
  assert len({nnx.Everything(), nnx.Everything(), nnx.Nothing()}) == 2
  assert hash(nnx.All(nnx.Param)) == hash(nnx.All(nnx.Param))


def test_ellipsis_must_be_the_last_filter():
  assert F.filters_to_predicates((nnx.Param, ...))[1] == nnx.Everything()
  with pytest.raises(ValueError, match='index 0'):
    F.filters_to_predicates((..., nnx.Param))


def test_invalid_filter_raises_value_error_naming_it():
  with pytest.raises(ValueError, match='3'):
    F.to_predicate(3)


def test_structural_filters_are_those_that_ignore_values():
  assert F.is_structural(F.to_predicate([nnx.Param, 'enc', nnx.PathContains('a')]))
  assert F.is_structural(nnx.Not(nnx.All(nnx.Everything(), nnx.Nothing())))
  assert not F.is_structural(lambda path, v: True)
  assert not F.is_structural(nnx.OfType(nnx.Param), raw_leaves=True)
  assert not F.is_structural(nnx.Any(nnx.Param, lambda path, v: True))


def test_filters_select_in_split_first_match_wins():
  class M(nnx.Module):
    def __init__(self):
      self.enc = nnx.Param(jnp.ones(1), tag='enc')
      self.dec = nnx.Param(jnp.ones(1))
  _, first, second = nnx.split(M(), 'enc', nnx.Param)
  assert list(first) == ['enc'] and list(second) == ['dec']


def test_a_catch_all_filter_must_come_last():
  with pytest.raises(ValueError, match=r'`\.\.\.` or `True` can only be used as the last filters, '
                                       r'got Ellipsis at index 0'):
    nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), ..., nnx.Param)
