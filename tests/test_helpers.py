"""helpers: TrainState, an immutable (graphdef, params, optimizer) pytree, and nnx.helpers names."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx


class Net(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 2, rngs=rngs)
    self.bn = nnx.BatchNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.linear(x))


def _train_state(tx=None):
  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  return nnx.TrainState.create(graphdef, params=params, tx=tx or optax.sgd(0.5)), stats


def test_create_initializes_the_optimizer_and_the_step():
  state, _ = _train_state(optax.adam(1e-3))
  assert int(state.step) == 0 and isinstance(state.step, jax.Array)
  assert isinstance(state.params, nnx.State)
  mu = state.opt_state[0].mu  # adam's moments mirror the params
  assert jax.tree.structure(mu) == jax.tree.structure(state.params)
  assert nnx.TrainState.create(state.graphdef, params=state.params, tx=optax.sgd(1.0),
                               step=7).step == 7


def test_apply_gradients_returns_a_new_state_and_leaves_the_old_one():
  state, _ = _train_state()
  grads = jax.tree.map(jnp.ones_like, state.params)
  new = state.apply_gradients(grads=grads)
  assert int(new.step) == 1 and int(state.step) == 0
  np.testing.assert_allclose(new.params['linear']['bias'][...], [-0.5, -0.5])
  np.testing.assert_allclose(state.params['linear']['bias'][...], [0.0, 0.0])
  assert new.tx is state.tx and new.graphdef is state.graphdef


def test_it_is_a_pytree_with_the_optimizer_static_so_it_passes_through_jit():
  state, _ = _train_state()
  grads = jax.tree.map(jnp.ones_like, state.params)
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)  # tx and graphdef hold no leaves
  step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  out = step(step(state, grads), grads)
  assert type(out) is nnx.TrainState and int(out.step) == 2
  np.testing.assert_allclose(out.params['linear']['bias'][...], [-1.0, -1.0])


def test_apply_calls_the_model_and_returns_the_updated_state():
  state, stats = _train_state()
  x = jnp.arange(6.0).reshape(2, 3)
  mean_before = np.array(stats['bn']['mean'][...])
  y, (graphdef, after) = state.apply(state.params, stats)(x)
  assert y.shape == (2, 2) and graphdef == state.graphdef
  # BatchNorm ran in training mode: the returned state has new running means
  assert not np.allclose(after['bn']['mean'][...], mean_before)


def test_apply_takes_field_names_of_a_subclass_with_extra_fields():
  class StatsState(nnx.TrainState):
    batch_stats: nnx.State

  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
  state = StatsState.create(graphdef, params=params, tx=optax.sgd(0.1), batch_stats=stats)
  assert [f.name for f in dataclasses.fields(state)][-1] == 'batch_stats'
  y, _ = state.apply('params', 'batch_stats')(jnp.ones((1, 3)))
  assert y.shape == (1, 2)
  moved = jax.jit(lambda s: s)(state)  # the new field is a pytree field too
  assert type(moved) is StatsState and set(moved.batch_stats['bn']) == {'mean', 'var'}
  with pytest.raises(TypeError, match=r'StatsState\.step to be a State'):
    state.apply('step')


def test_fields_are_frozen_and_replace_makes_a_copy():
  state, _ = _train_state()
  with pytest.raises(dataclasses.FrozenInstanceError):
    state.step = 3
  later = state.replace(step=jnp.asarray(9))
  assert int(later.step) == 9 and int(state.step) == 0


def test_helpers_module_holds_nnx_names():
  assert nnx.helpers.TrainState is nnx.TrainState
  assert nnx.helpers.Sequential is nnx.Sequential
  assert nnx.helpers.List is nnx.List and nnx.helpers.Dict is nnx.Dict


def test_nnx_object_is_the_pytree_module_under_its_other_nnx_name():
  import arbax.object as object_module
  assert object_module is nnx.object is nnx.pytreelib
  assert nnx.object.Pytree is nnx.Pytree and nnx.object.Object is nnx.Object
