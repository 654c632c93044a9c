"""Dropout: masks, scaling, keys and streams, train/eval, jit, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import AxisType, PartitionSpec as P, reshard

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_broadcast, check_scan_over_layers

X = jnp.ones((8, 16))


def expected_output(key, rate, x, mask_shape=None):
  keep = jax.random.bernoulli(key, 1 - rate, mask_shape or x.shape)
  return jnp.where(keep, x / (1 - rate), 0.0)


def test_dropout_zeroes_about_rate_of_the_inputs_and_rescales_the_rest():
  drop = nnx.Dropout(0.25, rngs=nnx.Rngs(0))
  y = drop(jnp.ones((64, 64)))
  values = set(np.unique(np.asarray(y)).tolist())
  assert values == {0.0, float(np.float32(1 / 0.75))}
  assert abs(float((y == 0).mean()) - 0.25) < 0.03


def test_dropout_keys_come_from_a_forked_dropout_stream():
  rngs = nnx.Rngs(0)
  drop = nnx.Dropout(0.5, rngs=rngs)
  assert int(rngs.default.count[...]) == 1                 # one key taken to fork
  forked = jax.random.fold_in(jax.random.key(0), 0)        # that key seeds Dropout's stream
  y1, y2 = drop(X), drop(X)
  np.testing.assert_array_equal(y1, expected_output(jax.random.fold_in(forked, 0), 0.5, X))
  np.testing.assert_array_equal(y2, expected_output(jax.random.fold_in(forked, 1), 0.5, X))
  assert int(drop.rngs.count[...]) == 2


def test_dropout_uses_the_dropout_stream_over_the_default():
  a = nnx.Dropout(0.5, rngs=nnx.Rngs(0, dropout=7))
  b = nnx.Dropout(0.5, rngs=nnx.Rngs(7))
  np.testing.assert_array_equal(a(X), b(X))
  with pytest.raises(KeyError, match='dropout'):
    nnx.Dropout(0.5, rngs=nnx.Rngs(params=0))


def test_rngs_passed_to_the_call():
  drop = nnx.Dropout(0.5)
  assert drop.rngs is None
  rngs = nnx.Rngs(dropout=3)
  y = drop(X, rngs=rngs)
  np.testing.assert_array_equal(
      y, expected_output(jax.random.fold_in(jax.random.key(3), 0), 0.5, X))
  assert int(rngs.dropout.count[...]) == 1
  key = jax.random.key(5)
  np.testing.assert_array_equal(drop(X, rngs=key), expected_output(key, 0.5, X))
  stream = nnx.Rngs(dropout=3).dropout
  np.testing.assert_array_equal(drop(X, rngs=stream), y)


def test_missing_rngs_and_bad_rngs_are_errors():
  with pytest.raises(ValueError, match='rngs'):
    nnx.Dropout(0.5)(X)
  with pytest.raises(TypeError, match='rngs'):
    nnx.Dropout(0.5)(X, rngs=3)
  with pytest.raises(TypeError, match='rngs'):
    nnx.Dropout(0.5, rngs=jax.random.key(0))


def test_deterministic_is_the_identity():
  drop = nnx.Dropout(0.5, deterministic=True)
  assert drop(X) is X
  assert nnx.Dropout(0.5, rngs=nnx.Rngs(0))(X, deterministic=True) is X
  assert nnx.Dropout(0.0, rngs=nnx.Rngs(0))(X) is X


def test_rate_one_drops_everything():
  np.testing.assert_array_equal(nnx.Dropout(1.0, rngs=nnx.Rngs(0))(X), np.zeros(X.shape))


def test_undecided_mode_is_an_error():
  with pytest.raises(ValueError, match='deterministic'):
    nnx.Dropout(0.5, deterministic=None, rngs=nnx.Rngs(0))(X)


def test_broadcast_dims_share_the_mask():
  drop = nnx.Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(0))
  y = np.asarray(drop(X))
  assert (y == y[0]).all()
  assert 0 < (y[0] == 0).sum() < 16


def test_train_and_eval_switch_nested_dropout():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(16, 16, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.linear(x))

  model = Model(nnx.Rngs(0))
  model.eval()
  assert model.drop.deterministic is True
  np.testing.assert_allclose(model(X), model.linear(X))
  model.train()
  assert model.drop.deterministic is False
  assert (np.asarray(model(X)) == 0).any()


def test_jit_advances_the_stream_of_the_caller():
  drop = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  f = nnx.jit(lambda m, x: m(x))
  y1, y2 = f(drop, X), f(drop, X)
  assert int(drop.rngs.count[...]) == 2
  assert not np.array_equal(y1, y2)
  fresh = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(y1, fresh(X))


def test_gradient_is_the_scaled_mask():
  key = jax.random.key(1)
  g = jax.grad(lambda x: nnx.Dropout(0.5)(x, rngs=key).sum())(X)
  np.testing.assert_array_equal(g, expected_output(key, 0.5, X))


def test_dtype_is_kept():
  assert nnx.Dropout(0.3, rngs=nnx.Rngs(0))(X.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize('spec', [P('X', None), P('X', 'Y'), P(None, 'Y')])
@pytest.mark.parametrize('broadcast_dims', [(), (0,), (1,)])
def test_dropout_of_an_explicitly_sharded_input_keeps_its_sharding(spec, broadcast_dims):
  # One device suffices: under Explicit axes the sharding is part of each array's type, and
  # the mask must carry the input's for the select (broadcast axes: spread to it afterwards).
  mesh = jax.make_mesh((1, 1), ('X', 'Y'), axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = jnp.arange(32.0).reshape(4, 8) + 1
  with jax.set_mesh(mesh):
    xs = reshard(x, spec)
    drop = nnx.Dropout(0.5, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(0))
    y = drop(xs)
    y_jit = nnx.jit(lambda d, x: d(x))(drop, xs)
    assert jax.typeof(y).sharding.spec == jax.typeof(xs).sharding.spec
    assert jax.typeof(y_jit).sharding.spec == jax.typeof(xs).sharding.spec
  # The same numbers as without a mesh: the sharding changes the layout, not the mask.
  unsharded = nnx.Dropout(0.5, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(y, unsharded(x))
  np.testing.assert_array_equal(y_jit, unsharded(x))


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------


def test_dropout_ensemble_under_vmap_and_stack_under_scan():
  x = jnp.ones((2, 6))
  layers = check_ensemble(lambda rngs: nnx.Dropout(0.5, rngs=rngs), x, n=2)
  np.testing.assert_array_equal(layers.rngs.count[...], [1, 1])  # each member drew one key
  masks = nnx.vmap(lambda m, x: m(x) == 0, in_axes=(0, None))(layers, x)
  assert not np.array_equal(masks[0], masks[1])  # members got different keys
  stack = check_scan_over_layers(lambda rngs: nnx.Dropout(0.5, rngs=rngs), x, n=3)
  np.testing.assert_array_equal(stack.rngs.count[...], [1, 1, 1])


def test_dropout_broadcast_under_scan_draws_a_new_key_each_step():
  dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
  check_scan_broadcast(dropout, jnp.ones((3, 8)))  # same masks as three calls in a loop
  assert int(dropout.rngs.count[...]) == 3
