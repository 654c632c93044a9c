"""nnx.shard_map on 8 simulated CPU devices (checks in sharding_scripts/mesh_checks.py, own process)."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import arbax as nnx
from tests.sharding_scripts.run_checks import run_group

CHECKS = ['shard_map_data_parallel_apply', 'shard_map_tensor_parallel_with_state_sharding',
          'shard_map_updates_reach_caller_with_their_spec',
          'shard_map_batchnorm_axis_name_matches_global_batch', 'shard_map_inside_jit_train_step',
          'shard_map_wrong_arity_names_counts']


@pytest.fixture(scope='module')
def results():
  return run_group('shard_map')


def test_every_check_ran(results):
  assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize('name', CHECKS)
def test_mesh_check(results, name):
  assert results[name] == 'ok', results[name]


# -- one device: runs in this process ----------------------------------------
MESH1 = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def test_module_update_and_output_on_one_device():
  class Acc(nnx.Module):
    def __init__(self):
      self.total = nnx.BatchStat(jnp.zeros(()))

  acc = Acc()

  @nnx.shard_map(mesh=MESH1, in_specs=(P(), P('data')), out_specs=(P(), P('data')))
  def f(acc, x):
    acc.total[...] += jax.lax.psum(x.sum(), 'data')
    return acc, x * 2

  new, y = f(acc, jnp.arange(4.0))
  assert float(acc.total[...]) == 6.0
  assert new is acc  # graph updates (the default): an input returned is the caller's object
  assert y.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_unmatched_state_sharding_names_the_path():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  f = nnx.shard_map(lambda m: None, mesh=MESH1,
                    in_specs=(nnx.StateSharding({nnx.PathContains('kernel'): P()}),), out_specs=P())
  with pytest.raises(ValueError, match=r'\.bias'):
    f(model)


def test_keyword_arguments_are_refused():
  f = nnx.shard_map(lambda x: x, mesh=MESH1, in_specs=P(), out_specs=P())
  with pytest.raises(TypeError, match='x'):
    f(x=jnp.ones(2))
