"""Rngs / RngStream: key derivation, streams, distributions, state, fork / split / broadcast / reseed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

kd = jax.random.key_data


def expected_key(seed, count):
  """The key a stream seeded with ``seed`` returns on its ``count``-th call (0-based)."""
  return jax.random.fold_in(jax.random.key(seed), count)


def same_key(a, b):
  return np.array_equal(kd(a), kd(b))


# -- key derivation ------------------------------------------------------------
def test_calls_fold_an_incremented_counter_into_the_stream_key():
  rngs = nnx.Rngs(0)
  k0, k1 = rngs(), rngs()
  assert jax.dtypes.issubdtype(k0.dtype, jax.dtypes.prng_key) and k0.shape == ()
  assert same_key(k0, expected_key(0, 0)) and same_key(k1, expected_key(0, 1))
  assert int(rngs.default.count[...]) == 2
  assert rngs.default.count[...].dtype == jnp.uint32


def test_named_streams_and_default_fallback():
  rngs = nnx.Rngs(0, params=1, dropout=2)
  assert same_key(rngs.params(), expected_key(1, 0))
  assert same_key(rngs.dropout(), expected_key(2, 0))
  assert same_key(rngs(), expected_key(0, 0))
  assert same_key(rngs.unknown_stream(), expected_key(0, 1))  # falls back to default
  assert same_key(rngs['other'](), expected_key(0, 2))
  assert int(rngs.params.count[...]) == 1 and int(rngs.default.count[...]) == 3


def test_same_seed_gives_same_keys():
  a, b = nnx.Rngs(0, params=3), nnx.Rngs(0, params=3)
  for _ in range(3):
    assert same_key(a.params(), b.params()) and same_key(a(), b())
  assert not same_key(nnx.Rngs(1)(), nnx.Rngs(0)())


def test_keys_and_raw_key_data_are_accepted_as_seeds():
  key = jax.random.key(5)
  assert same_key(nnx.Rngs(params=key).params(), jax.random.fold_in(key, 0))
  raw = jax.random.PRNGKey(5)
  assert same_key(nnx.Rngs(raw)(), jax.random.fold_in(key, 0))
  assert same_key(nnx.Rngs(np.int32(5))(), jax.random.fold_in(key, 0))


def test_dict_seed_and_stream_seed():
  rngs = nnx.Rngs({'params': 1, 'dropout': 2}, noise=3)
  assert list(rngs) == ['params', 'dropout', 'noise']
  source = nnx.Rngs(params=4)
  source.params()
  copy = nnx.Rngs(params=source.params)
  assert copy.params is not source.params
  assert same_key(copy.params.key[...], source.params.key[...])
  assert int(copy.params.count[...]) == 0  # a new stream: the count restarts


@pytest.mark.parametrize('bad', ['seed', 1.5, jnp.ones(3)])
def test_invalid_seed_is_a_value_error(bad):
  with pytest.raises(ValueError, match='Invalid rng seed'):
    nnx.Rngs(bad)


def test_missing_stream_without_default_errors_name_the_stream():
  rngs = nnx.Rngs(params=0)
  with pytest.raises(AttributeError, match="'dropout'.*params"):
    rngs.dropout()
  with pytest.raises(KeyError, match="'dropout'"):
    rngs['dropout']
  with pytest.raises(AttributeError, match="'default'"):
    rngs()


def test_mapping_protocol():
  rngs = nnx.Rngs(0, params=1)
  assert list(rngs) == ['params', 'default'] and len(rngs) == 2
  assert 'params' in rngs and 'dropout' not in rngs
  assert [name for name, _ in rngs.items()] == ['params', 'default']
  assert all(isinstance(s, nnx.RngStream) for _, s in rngs.items())


# -- random methods ------------------------------------------------------------
@pytest.mark.parametrize('name,args', [
    ('normal', ((2, 3),)), ('uniform', ((4,),)), ('bernoulli', (0.5, (3,))),
    ('categorical', (jnp.zeros(4),)), ('randint', ((3,), 0, 10)), ('permutation', (5,)),
    ('gumbel', ((2,),)), ('truncated_normal', (-1.0, 1.0, (2,))), ('bits', ((2,),)),
])
def test_every_distribution_is_a_method_drawing_the_next_key(name, args):
  rngs = nnx.Rngs(0)
  out = getattr(rngs, name)(*args)
  ref = getattr(jax.random, name)(expected_key(0, 0), *args)
  np.testing.assert_array_equal(out, ref)
  stream_out = getattr(rngs.default, name)(*args)
  np.testing.assert_array_equal(stream_out, getattr(jax.random, name)(expected_key(0, 1), *args))
  assert int(rngs.default.count[...]) == 2


def test_all_jax_random_distributions_are_available():
  rngs = nnx.Rngs(0)
  for name in ('ball', 'beta', 'binomial', 'cauchy', 'chisquare', 'choice', 'dirichlet',
               'exponential', 'gamma', 'geometric', 'laplace', 'logistic', 'lognormal', 'maxwell',
               'multivariate_normal', 'orthogonal', 'pareto', 'poisson', 'rademacher', 'rayleigh',
               't', 'triangular', 'wald', 'weibull_min'):
    assert callable(getattr(rngs, name)), name
  assert int(rngs.default.count[...]) == 0  # looking them up draws nothing


def test_distribution_method_uses_named_stream():
  rngs = nnx.Rngs(0, params=7)
  np.testing.assert_array_equal(rngs.params.normal((2,)),
                                jax.random.normal(expected_key(7, 0), (2,)))


def test_initializer_methods_are_keyless_initializers():
  rngs = nnx.Rngs(0)
  init = rngs.lecun_normal()
  assert int(rngs.default.count[...]) == 0
  w = init((3, 2))
  np.testing.assert_allclose(w, jax.nn.initializers.lecun_normal()(expected_key(0, 0), (3, 2)))
  np.testing.assert_allclose(rngs.glorot_uniform(in_axis=0)((2, 2)),
                             jax.nn.initializers.glorot_uniform(in_axis=0)(expected_key(0, 1),
                                                                            (2, 2)))


# -- state ---------------------------------------------------------------------
def test_streams_keys_and_counts_are_pytrees_and_variables():
  rngs = nnx.Rngs(0, params=1)
  assert isinstance(rngs, nnx.Pytree) and isinstance(rngs.params, nnx.Pytree)
  assert type(rngs.params.key) is nnx.RngKey and type(rngs.params.count) is nnx.RngCount
  assert isinstance(rngs.params.key, nnx.RngState) and rngs.params.key.tag == 'params'
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(rngs)]
  assert paths == ['.default.count.value', '.default.key.value', '.params.count.value',
                   '.params.key.value']


def test_state_and_filters_see_rng_state():
  rngs = nnx.Rngs(0, params=1)
  state = nnx.state(rngs, nnx.RngCount)
  assert set(state) == {'default', 'params'} and set(state['params']) == {'count'}
  assert set(nnx.state(rngs, 'params')) == {'params'}


def test_split_merge_round_trip_keeps_streams():
  rngs = nnx.Rngs(0, params=1)
  rngs.params()
  graphdef, state = nnx.split(rngs)
  back = nnx.merge(graphdef, state)
  assert same_key(back.params(), expected_key(1, 1))


def test_jax_jit_is_pure_for_rngs():
  rngs = nnx.Rngs(0)
  key = jax.jit(lambda r: r())(rngs)
  assert same_key(key, expected_key(0, 0))
  assert int(rngs.default.count[...]) == 0


def test_nnx_jit_propagates_count_updates():
  rngs = nnx.Rngs(0)

  @nnx.jit
  def draw(rngs):
    return rngs.normal((2,))

  a, b = draw(rngs), draw(rngs)
  np.testing.assert_array_equal(a, jax.random.normal(expected_key(0, 0), (2,)))
  np.testing.assert_array_equal(b, jax.random.normal(expected_key(0, 1), (2,)))
  assert int(rngs.default.count[...]) == 2


# -- fork / split / broadcast --------------------------------------------------
def test_fork_seeds_new_streams_from_fresh_keys():
  rngs = nnx.Rngs(0, params=1)
  forked = rngs.fork()
  assert type(forked) is nnx.Rngs and list(forked) == ['params', 'default']
  assert same_key(forked.params.key[...], expected_key(1, 0))
  assert int(forked.params.count[...]) == 0 and int(rngs.params.count[...]) == 1
  assert not same_key(forked.params(), rngs.params())


def test_stream_fork():
  stream = nnx.Rngs(params=1).params
  new = stream.fork()
  assert type(new) is nnx.RngStream and new.tag == 'params'
  assert same_key(new.key[...], expected_key(1, 0))


def test_split_gives_stacked_keys_and_counts():
  rngs = nnx.Rngs(0, params=1)
  split = rngs.split(4)
  assert split.params.key.shape == (4,) and split.params.count.shape == (4,)
  np.testing.assert_array_equal(kd(split.params.key[...]),
                                kd(jax.random.split(expected_key(1, 0), 4)))
  assert int(rngs.params.count[...]) == 1 and int(rngs.default.count[...]) == 1
  assert split.default.key.shape == (4,)
  assert rngs.split((2, 3)).params.key.shape == (2, 3)


def test_split_with_filter_mapping():
  rngs = nnx.Rngs(params=1, dropout=2, noise=3)
  split = rngs.split({'params': 5, 'dropout': None, ...: (2, 5)})
  assert split.params.key.shape == (5,) and split.dropout.key.shape == ()
  assert split.noise.key.shape == (2, 5) and split.noise.count.shape == (2, 5)
  assert same_key(split.dropout.key[...], jax.random.key(2))


def test_stream_filters_select_by_tag_path_type_and_negation():
  rngs = nnx.Rngs(params=1, dropout=2)
  assert rngs.split({nnx.Not('params'): 3}).params.key.shape == ()
  assert rngs.split({nnx.Not('params'): 3}).dropout.key.shape == (3,)
  assert rngs.split({nnx.PathContains('params'): 2}).params.key.shape == (2,)
  assert rngs.split({nnx.RngState: 2}).dropout.key.shape == (2,)
  assert rngs.split({nnx.RngCount: 2}).dropout.key.shape == ()  # keys are not counts


def test_stream_split_and_vmap_over_the_keys():
  stream = nnx.Rngs(params=0).params.split(3)
  keys = jax.vmap(lambda k, c: jax.random.fold_in(k, c))(stream.key[...], stream.count[...])
  assert keys.shape == (3,)
  assert len({tuple(np.asarray(kd(k)).tolist()) for k in keys}) == 3


def test_broadcast_repeats_one_fresh_key():
  rngs = nnx.Rngs(0)
  b = rngs.broadcast(3)
  assert b.default.key.shape == (3,) and b.default.count.shape == (3,)
  data = kd(b.default.key[...])
  assert np.array_equal(data[0], data[2]) and np.array_equal(data[0], kd(expected_key(0, 0)))
  assert nnx.Rngs(params=1, dropout=2).broadcast({'params': 2, ...: None}).dropout.key.shape == ()


def test_fork_with_split_is_deprecated_but_works():
  rngs = nnx.Rngs(0)
  with pytest.warns(DeprecationWarning, match='split'):
    out = rngs.fork(split=4)
  assert out.default.key.shape == (4,) and out.default.count.shape == (4,)


# -- reseed --------------------------------------------------------------------
class Model(nnx.Module):
  def __init__(self, rngs):
    self.rngs = rngs


def test_reseed_gives_the_first_key_of_the_new_seed_and_resets_counts():
  model = Model(nnx.Rngs(params=0, dropout=1))
  model.rngs.dropout()
  model.rngs.params()
  nnx.reseed(model, dropout=42)
  assert same_key(model.rngs.dropout.key[...], nnx.Rngs(dropout=42).dropout())
  assert int(model.rngs.dropout.count[...]) == 0
  assert int(model.rngs.params.count[...]) == 1  # untouched


def test_reseed_makes_draws_repeat():
  model = Model(nnx.Rngs(dropout=0))
  nnx.reseed(model, dropout=7)
  first = model.rngs.dropout.normal((3,))
  nnx.reseed(model, dropout=7)
  np.testing.assert_array_equal(model.rngs.dropout.normal((3,)), first)


def test_reseed_of_split_streams_needs_a_policy():
  model = Model(nnx.Rngs(0).split(3))
  with pytest.raises(ValueError, match=r"\.rngs\.default.*shape \(3,\).*match_shape"):
    nnx.reseed(model, default=5)
  nnx.reseed(model, default=5, policy='match_shape')
  assert model.rngs.default.key.shape == (3,) and model.rngs.default.count[...].tolist() == [0] * 3
  np.testing.assert_array_equal(kd(model.rngs.default.key[...]),
                                kd(jax.random.split(expected_key(5, 0), 3)))
  nnx.reseed(model, default=5, policy=lambda path, key, shape: jnp.broadcast_to(key, shape))
  data = kd(model.rngs.default.key[...])
  assert np.array_equal(data[0], data[1])
  with pytest.raises(ValueError, match='policy'):
    nnx.reseed(model, default=5, policy='bogus')


def test_reseed_in_tree_mode_walks_the_tree():
  model = Model(nnx.Rngs(dropout=0))
  nnx.reseed(model, graph=False, dropout=3)
  assert same_key(model.rngs.dropout.key[...], expected_key(3, 0))
  shared = nnx.Dict(a=model.rngs, b=model.rngs)
  with pytest.raises(ValueError):  # tree mode refuses the shared Rngs
    nnx.reseed(shared, graph=False, dropout=3)
  nnx.reseed(shared, graph=True, dropout=4)
  assert same_key(model.rngs.dropout.key[...], expected_key(4, 0))


# -- split_rngs ----------------------------------------------------------------
def test_split_rngs_context_restores_keys():
  rngs = nnx.Rngs(params=0)
  with nnx.split_rngs(rngs, splits=4) as backups:
    assert rngs.params.key.shape == (4,) and rngs.params.count.shape == (4,)
    assert [b[0] for b in backups] == [rngs.params]
  assert rngs.params.key.shape == () and same_key(rngs.params.key[...], jax.random.key(0))
  assert int(rngs.params.count[...]) == 1  # the split used one key of the stream


def test_split_rngs_in_place_splits_keys_from_a_fresh_key():
  rngs = nnx.Rngs(params=0, dropout=1)
  backups = nnx.split_rngs(rngs, splits=(2, 3), only='params')
  assert isinstance(backups, nnx.rnglib.SplitBackups) and len(backups) == 1
  assert rngs.params.key.shape == (2, 3) and rngs.params.count.shape == (2, 3)
  assert rngs.dropout.key.shape == ()
  np.testing.assert_array_equal(kd(rngs.params.key[...]),
                                kd(jax.random.split(expected_key(0, 0), (2, 3))))
  nnx.restore_rngs(backups)
  assert rngs.params.key.shape == ()


@pytest.mark.parametrize('graph,graph_updates', [(False, True), (False, False), (True, False)])
def test_split_rngs_without_graph_updates_returns_a_split_copy(graph, graph_updates):
  rngs = nnx.Rngs(params=0, dropout=1)
  key_var = rngs.params.key
  new = nnx.split_rngs(rngs, splits=5, graph=graph, graph_updates=graph_updates)
  assert type(new) is nnx.Rngs and new is not rngs
  assert new.params.key.shape == (5,) and new.dropout.key.shape == (5,)
  assert rngs.params.key is key_var and rngs.params.key.shape == ()
  assert int(rngs.params.count[...]) == 1  # the original gave the key that was split


def test_split_rngs_follows_the_graph_mode_setting():
  rngs = nnx.Rngs(params=0)
  with nnx.set_graph_mode(False):
    new = nnx.split_rngs(rngs, splits=2)
  assert new.params.key.shape == (2,) and rngs.params.key.shape == ()
  with nnx.set_graph_updates(False):
    assert nnx.split_rngs(rngs, splits=2).params.key.shape == (2,)
  assert rngs.params.key.shape == ()


def test_split_rngs_squeeze_keeps_the_key_shape():
  rngs = nnx.Rngs(params=0)
  with nnx.split_rngs(rngs, splits=1, squeeze=True):
    assert rngs.params.key.shape == () and rngs.params.count.shape == ()
    assert same_key(rngs.params.key[...], jax.random.split(expected_key(0, 0), 1)[0])
  with pytest.raises(ValueError, match='squeeze=True.*splits=1'):
    nnx.split_rngs(rngs, splits=2, squeeze=True)


def test_split_rngs_decorator_in_tree_mode_hands_copies_to_the_function():
  seen = []

  @nnx.split_rngs(splits=3, graph=False)
  def f(rngs, *, other):
    seen.append((rngs.params.key.shape, other.params.key.shape, rngs))
    return rngs

  rngs = nnx.Rngs(params=0)
  out = f(rngs, other=nnx.Rngs(params=1))
  assert seen[0][:2] == ((3,), (3,)) and out is not rngs and rngs.params.key.shape == ()


def test_split_rngs_decorator_splits_keyword_arguments_in_place_during_the_call():
  rngs = nnx.Rngs(params=0)

  @nnx.split_rngs(splits=2)
  def f(*, r):
    assert r is rngs
    return r.params.key.shape

  assert f(r=rngs) == (2,) and rngs.params.key.shape == ()


# -- fork_rngs -----------------------------------------------------------------
def test_fork_rngs_in_place_gives_each_stream_a_fresh_key_until_restored():
  rngs = nnx.Rngs(params=0, dropout=1)
  backups = nnx.fork_rngs(rngs)
  assert same_key(rngs.params.key[...], expected_key(0, 0))
  assert same_key(rngs.dropout.key[...], expected_key(1, 0))
  assert int(rngs.params.count[...]) == 0
  nnx.restore_rngs(backups)
  assert same_key(rngs.params.key[...], jax.random.key(0)) and int(rngs.params.count[...]) == 1


def test_fork_rngs_split_mapping_touches_only_matching_streams():
  rngs = nnx.Rngs(params=0, dropout=1, noise=2)
  with nnx.fork_rngs(rngs, split={'params': 3, 'noise': None}):
    assert rngs.params.key.shape == (3,)
    assert same_key(rngs.noise.key[...], expected_key(2, 0))  # forked, not split
    assert same_key(rngs.dropout.key[...], jax.random.key(1))  # untouched
  assert rngs.params.key.shape == ()


def test_fork_rngs_without_graph_updates_returns_a_forked_copy():
  rngs = nnx.Rngs(params=0)
  new = nnx.fork_rngs(rngs, split=2, graph=False)
  assert new.params.key.shape == (2,) and rngs.params.key.shape == ()
  new = nnx.fork_rngs(rngs, graph_updates=False)
  assert same_key(new.params.key[...], expected_key(0, 1))
  assert same_key(rngs.params.key[...], jax.random.key(0))


def test_fork_rngs_decorator_forks_for_the_call_only():
  @nnx.fork_rngs()
  def f(r):
    return r.params.key[...]

  rngs = nnx.Rngs(params=0)
  assert same_key(f(rngs), expected_key(0, 0))
  assert same_key(rngs.params.key[...], jax.random.key(0))


def test_split_rngs_decorator_splits_only_during_the_call():
  shapes = []

  @nnx.split_rngs(splits=2, only='params')
  def f(rngs):
    shapes.append((rngs.params.key.shape, rngs.dropout.key.shape))

  rngs = nnx.Rngs(params=0, dropout=1)
  f(rngs)
  assert shapes == [((2,), ())] and rngs.params.key.shape == ()


# -- repr ----------------------------------------------------------------------
def test_repr_matches_nnx():
  expected = """Rngs( # RngState: 2 (12 B)
  default=RngStream( # RngState: 2 (12 B)
    tag='default',
    key=RngKey( # 1 (8 B)
      value=Array((), dtype=key<fry>) overlaying:
      [0 0],
      tag='default'
    ),
    count=RngCount( # 1 (4 B)
      value=Array(0, dtype=uint32),
      tag='default'
    )
  )
)"""
  assert repr(nnx.Rngs(0)) == expected


def test_repr_of_several_streams_sums_state():
  text = repr(nnx.Rngs(0, params=1))
  assert text.splitlines()[0] == 'Rngs( # RngState: 4 (24 B)'
  assert text.index('params=RngStream') < text.index('default=RngStream')


# -- with_rngs / restore_rngs --
def test_with_rngs_split_and_fork_leave_original_shapes():
  r = nnx.Rngs(params=0, dropout=1)
  n = nnx.with_rngs(r, split={'params': 2}, fork='dropout', graph_updates=False)
  assert n is not r and n.params is not r.params
  assert n.params.key.shape == (2,) and r.params.key.shape == ()
  assert n.dropout.key.shape == () and int(n.dropout.count[...]) == 0
  # the originals gave one key each
  assert int(r.params.count[...]) == 1 and int(r.dropout.count[...]) == 1
  expected = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 2)
  np.testing.assert_array_equal(jax.random.key_data(n.params.key[...]), jax.random.key_data(expected))


def test_with_rngs_broadcast_only_and_modules():
  r = nnx.Rngs(params=0, dropout=1)
  b = nnx.with_rngs(r, broadcast=3, graph=False)
  assert b.params.key.shape == (3,)
  o = nnx.with_rngs(r, split=2, only='params', graph=False)
  assert o.params.key.shape == (2,) and o.dropout.key.shape == ()
  m = nnx.Dropout(0.1, rngs=nnx.Rngs(0))
  nm = nnx.with_rngs(m, split=4, graph_updates=False)
  assert type(nm) is nnx.Dropout and nm.rngs.key.shape == (4,) and m.rngs.key.shape == ()


def test_with_rngs_needs_a_mode_without_graph_updates():
  r = nnx.Rngs(params=0)
  with pytest.raises(NotImplementedError, match='graph_updates=False'):
    nnx.with_rngs(r, split=2)
  with pytest.raises(NotImplementedError, match='split_rngs'):
    nnx.with_rngs(split=2)  # the decorator form too
  with nnx.set_graph_mode(False):
    assert nnx.with_rngs(r, split=2).params.key.shape == (2,)


def test_with_rngs_decorator_hands_the_function_new_streams():
  @nnx.with_rngs(split=4, graph_updates=False)
  def f(r, *, s):
    return r.params.key.shape, s['dropout'].key.shape

  r = nnx.Rngs(params=0)
  assert f(r, s=nnx.Rngs(dropout=1)) == ((4,), (4,))
  assert r.params.key.shape == () and int(r.params.count[...]) == 1


def test_with_rngs_one_stream_two_specific_rules_is_an_error_naming_it():
  r = nnx.Rngs(params=0, dropout=1)
  with pytest.raises(ValueError, match=r"\.params matches multiple rules.*split.*fork"):
    nnx.with_rngs(r, split={'params': 4}, fork='params', graph=False)
  with pytest.raises(ValueError, match='broadcast'):
    nnx.with_rngs(r, broadcast={'dropout': 2}, fork=['dropout'], graph=False)
  # a catch-all rule gives way to a specific one: split beats broadcast beats fork
  n = nnx.with_rngs(r, split={'params': 4}, broadcast={...: 2}, fork=..., graph=False)
  assert n.params.key.shape == (4,) and n.dropout.key.shape == (2,)
  fresh = nnx.Rngs(params=0, dropout=1)
  n = nnx.with_rngs(fresh, split={'params': 4}, fork=nnx.Not('params'), graph=False)
  assert n.params.key.shape == (4,) and same_key(n.dropout.key[...], expected_key(1, 0))


def test_restore_rngs_undoes_in_place_split():
  r = nnx.Rngs(params=0)
  backups = nnx.split_rngs(r, splits=3)
  assert r.params.key.shape == (3,)
  nnx.restore_rngs(backups)
  assert r.params.key.shape == ()
  np.testing.assert_array_equal(jax.random.key_data(r.params.key[...]),
                                jax.random.key_data(jax.random.key(0)))
