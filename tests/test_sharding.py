"""arbax.sharding and the sharding part of nnx.jit (abstract models: test_spmd.py).

Checks that need 8 devices (data/tensor parallel, remeshed checkpoints) run in
their own process: tests/sharding_scripts/mesh_checks.py.
"""
import jax
import jax.numpy as jnp
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec as P

import arbax as nnx
from tests.sharding_scripts.run_checks import run_group

CHECKS = ['eager_sharding_places_params_under_set_mesh', 'jit_out_shardings_creates_model_sharded',
          'jit_out_shardings_state_sharding_and_single', 'data_parallel_train_matches_unsharded',
          'tensor_parallel_train_matches_unsharded',
          'jit_in_shardings_state_tree_reshards_plain_and_module',
          'jit_missing_path_in_sharding_tree_names_it',
          'abstract_model_and_as_abstract_carry_shardings', 'logical_rules_map_to_mesh_axes',
          'with_sharding_constraint_inside_model', 'checkpoint_restores_onto_another_mesh',
          'optimizer_sharding_splits_the_moments_not_the_params']


@pytest.fixture(scope='module')
def results():
  return run_group('sharding')


def test_every_check_ran(results):
  assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize('name', CHECKS)
def test_mesh_check(results, name):
  assert results[name] == 'ok', results[name]


# -- one device: runs in this process ----------------------------------------
MESH1 = jax.make_mesh((1,), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
INIT = nnx.initializers.ones_init()


def test_with_partitioning_records_out_sharding_and_keeps_values():
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(2, 3, kernel_init=nnx.with_partitioning(INIT, (None, 'model')),
                       rngs=nnx.Rngs(0))
  assert type(layer.kernel) is nnx.Param
  assert layer.kernel.get_metadata() == {'out_sharding': (None, 'model'), 'mesh': None,
                                         'hijax': False, 'ref': False, 'eager_sharding': False}
  assert layer.kernel[...].tolist() == [[1.0] * 3] * 2


def test_with_metadata_adds_any_metadata():
  init = nnx.with_metadata(INIT, tag='w', out_sharding=('model',))
  with nnx.use_eager_sharding(False):
    p = nnx.Param(init(jax.random.key(0), (4,)))
  assert p.tag == 'w' and p.out_sharding == ('model',)


def test_eager_sharding_without_mesh_is_a_value_error():
  init = nnx.with_partitioning(INIT, (None, 'model'))
  assert nnx.using_eager_sharding()
  with pytest.raises(ValueError, match='out_sharding'):
    nnx.Linear(2, 3, kernel_init=init, rngs=nnx.Rngs(0))


def test_eager_sharding_places_on_mesh_metadata_or_context():
  init = nnx.with_partitioning(INIT, (None, 'model'), mesh=MESH1)
  layer = nnx.Linear(2, 3, kernel_init=init, rngs=nnx.Rngs(0))
  assert layer.kernel[...].sharding == NamedSharding(MESH1, P(None, 'model'))
  with jax.set_mesh(MESH1):
    p = nnx.Param(jnp.ones((2, 2)), out_sharding=('model', None))
  assert p[...].sharding == NamedSharding(MESH1, P('model', None))


def test_use_eager_sharding_is_scoped():
  with nnx.use_eager_sharding(False):
    assert not nnx.using_eager_sharding()
  assert nnx.using_eager_sharding()


def test_get_partition_spec_of_state_and_pytree():
  with nnx.use_eager_sharding(False):
    layer = nnx.Linear(2, 3, kernel_init=nnx.with_partitioning(INIT, (None, 'model')),
                       rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert specs['kernel'].get_value() == P(None, 'model')
  assert specs['bias'].get_value() == P()
  assert isinstance(specs['kernel'], nnx.Param)
  assert nnx.get_partition_spec({'a': jnp.ones(2), 'b': 1}) == {'a': P(), 'b': None}
  named = nnx.get_named_sharding(nnx.state(layer), MESH1)
  assert named['kernel'].get_value() == NamedSharding(MESH1, P(None, 'model'))


def test_logical_axis_rules_context_and_local_rules():
  with nnx.use_eager_sharding(False):
    p = nnx.Param(jnp.ones((2, 3)), out_sharding=('embed', 'mlp'))
    q = nnx.Param(jnp.ones((2, 3)), out_sharding=('embed', 'mlp'), sharding_rules=[('embed', 'data')])
  spec = lambda v: nnx.get_partition_spec(v).get_value()  # noqa: E731
  assert spec(p) == P('embed', 'mlp')   # no rules: names are mesh axes
  with nnx.logical_axis_rules([('embed', None), ('mlp', 'model')]):
    assert spec(p) == P(None, 'model')
  assert spec(q) == P('data', 'mlp')
  with nnx.logical_axis_rules([('embed', 'model')]):
    with pytest.raises(ValueError, match='embed'):
      spec(q)


def test_out_sharding_may_be_a_format_with_a_layout():
  named = NamedSharding(MESH1, P('model', None))
  fmt = Format(Layout(major_to_minor=(1, 0)), named)
  v = nnx.Variable(jnp.ones((2, 2)), out_sharding=fmt)
  assert v[...].sharding == named
  assert nnx.get_partition_spec(v).get_value() == P('model', None)


def test_eager_sharding_refuses_a_mesh_mixing_auto_and_explicit_axes():
  types = jax.sharding.AxisType
  mixed = jax.make_mesh((1, 1), ('row', 'col'), axis_types=(types.Auto, types.Explicit))
  with pytest.raises(ValueError, match='mix'):
    nnx.Variable(jnp.ones((2, 2)), out_sharding=('row', 'col'), mesh=mixed)
  with nnx.use_eager_sharding(False):  # annotating only is fine
    v = nnx.Variable(jnp.ones((2, 2)), out_sharding=('row', 'col'), mesh=mixed)
  assert v.out_sharding == ('row', 'col')
  explicit = jax.make_mesh((1, 1), ('row', 'col'), axis_types=(types.Explicit,) * 2)
  v = nnx.Variable(jnp.ones((2, 2)), out_sharding=('row', 'col'), mesh=explicit)
  assert v[...].sharding.spec == P('row', 'col') and v[...].sharding.mesh == explicit


def test_with_metadata_carrier_is_adopted_by_hijax_params():
  init = nnx.with_partitioning(INIT, ('model',), mesh=MESH1)
  with nnx.var_defaults(hijax=True):
    p = nnx.Param(init(jax.random.key(0), (2,)))
  assert p.hijax and p.out_sharding == ('model',)
  assert p[...].sharding == NamedSharding(MESH1, P('model'))


def test_state_sharding_first_matching_filter_wins():
  from arbax.sharding import leaf_shardings
  s = nnx.StateSharding({nnx.PathContains('kernel'): 'k', nnx.Param: 'p', ...: 'rest'})
  assert s.sharding_of(('kernel',), nnx.Param(1), 'x') == 'k'
  assert s.sharding_of(('bias',), nnx.Param(1), 'x') == 'p'
  assert s.sharding_of(('n',), nnx.BatchStat(1), 'x') == 'rest'
  with pytest.raises(ValueError, match='expected a jax Sharding'):
    leaf_shardings(s, [('kernel',)], [nnx.Param(1)], 'here')


def test_jit_in_shardings_count_must_match():
  f = nnx.jit(lambda a, b: a, in_shardings=(None, None, None))
  with pytest.raises(ValueError, match='3 entries'):
    f(jnp.ones(2), jnp.ones(2))


def test_jit_with_shardings_propagates_updates_like_plain_jit():
  layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  whole = NamedSharding(MESH1, P())

  @nnx.jit(in_shardings=(nnx.StateSharding({...: whole}), whole), out_shardings=whole)
  def step(m, x):
    m.bias[...] = m.bias[...] + 1
    return m(x)

  y = step(layer, jnp.ones((1, 2)))
  assert layer.bias[...].tolist() == [1.0, 1.0, 1.0]
  assert jnp.allclose(y, jnp.ones((1, 2)) @ layer.kernel[...] + 1)
  assert y.sharding == whole and layer.bias[...].sharding == whole
