"""nnx.initializers: the jax.nn.initializers family plus NNX's zeros_init / ones_init."""
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

KEY = jax.random.key(0)


@pytest.mark.parametrize('name', [
    'constant', 'delta_orthogonal', 'glorot_normal', 'glorot_uniform', 'he_normal', 'he_uniform',
    'kaiming_normal', 'kaiming_uniform', 'lecun_normal', 'lecun_uniform', 'normal', 'ones',
    'orthogonal', 'truncated_normal', 'uniform', 'variance_scaling', 'xavier_normal',
    'xavier_uniform', 'zeros'])
def test_the_jax_family_is_available_under_its_names(name):
  assert getattr(nnx.initializers, name) is getattr(jax.nn.initializers, name)


def test_zeros_init_and_ones_init_are_factories():
  z = nnx.initializers.zeros_init()(KEY, (2, 3), jnp.bfloat16)
  o = nnx.initializers.ones_init()(KEY, (4,))
  assert z.shape == (2, 3) and z.dtype == jnp.bfloat16 and not np.any(np.asarray(z, np.float32))
  assert o.dtype == jnp.float32
  np.testing.assert_array_equal(o, np.ones(4))


def test_lecun_normal_has_variance_one_over_fan_in():
  w = nnx.initializers.lecun_normal()(KEY, (50, 400))
  assert abs(float(jnp.var(w)) - 1 / 50) < 0.002
  # Truncated at two standard deviations.
  assert float(jnp.max(jnp.abs(w))) <= 2 * np.sqrt(1 / 50) / 0.87962566 + 1e-6


def test_initializers_draw_the_same_numbers_for_the_same_key():
  init = nnx.initializers.glorot_uniform()
  np.testing.assert_array_equal(init(KEY, (3, 3)), init(KEY, (3, 3)))
  assert not np.array_equal(init(KEY, (3, 3)), init(jax.random.key(1), (3, 3)))


def test_rngs_stream_keys_work_as_initializer_keys():
  rngs = nnx.Rngs(params=0)
  w = nnx.initializers.he_normal()(rngs.params(), (4, 8), jnp.float16)
  assert w.shape == (4, 8) and w.dtype == jnp.float16


def test_initializer_type_alias_accepts_jax_protocol_and_plain_callables():
  # nnx.Initializer is the annotation for kernel_init= style arguments, reachable from both places.
  assert nnx.Initializer is nnx.initializers.Initializer
  members = tp.get_args(nnx.Initializer)
  assert jax.nn.initializers.Initializer in members
  assert tp.get_origin(members[1]) is tp.get_origin(tp.Callable[..., tp.Any])

  def my_init(key, shape, dtype=jnp.float32) -> jax.Array:
    return jnp.full(shape, 0.5, dtype)

  init: nnx.Initializer = my_init
  layer = nnx.Linear(2, 3, kernel_init=init, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.kernel[...], np.full((2, 3), 0.5, np.float32))
