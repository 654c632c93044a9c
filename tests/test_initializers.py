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


# -- initial_value: how layers call initializers ----------------------------------------------
from arbax.nn.initializers import initial_value  # noqa: E402

FACTORIES = {
    'constant': lambda: nnx.initializers.constant(0.3),
    'uniform': lambda: nnx.initializers.uniform(0.5),
    'normal': lambda: nnx.initializers.normal(0.1),
    'truncated_normal': lambda: nnx.initializers.truncated_normal(0.2),
    'orthogonal': lambda: nnx.initializers.orthogonal(),
    'lecun_normal': lambda: nnx.initializers.lecun_normal(),
    'lecun_uniform': lambda: nnx.initializers.lecun_uniform(),
    'glorot_uniform': lambda: nnx.initializers.glorot_uniform(),
    'he_normal': lambda: nnx.initializers.he_normal(),
    'variance_scaling normal': lambda: nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
    'variance_scaling uniform': lambda: nnx.initializers.variance_scaling(2.0, 'fan_avg',
                                                                          'uniform'),
    'zeros': lambda: nnx.initializers.zeros,
    'ones': lambda: nnx.initializers.ones,
}
SHAPES = [(17, 5), (64, 256)]


def bits(x):
  return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_initial_value_is_bit_identical_to_calling_the_initializer(name, dtype):
  if name == 'orthogonal' and dtype != jnp.float32:
    pytest.skip('QR has no half-precision kernel on CPU')
  init = FACTORIES[name]()
  for seed in range(2):
    for shape in SHAPES:
      key = jax.random.key(seed)
      got = initial_value(init, key, shape, dtype)
      assert got.dtype == dtype and got.shape == shape
      np.testing.assert_array_equal(bits(got), bits(init(key, shape, dtype)), err_msg=str(shape))


_DEFAULT_FLAGS_CHECK = '''
import jax, numpy as np
import arbax as nnx
from arbax.nn.initializers import initial_value
bad = []
for name, init in {FACTORIES}.items():
  for seed in range(2):
    for shape in ([(3, 3, 4, 4)] if name == 'delta_orthogonal' else {SHAPES}):
      key = jax.random.key(seed)
      a, b = initial_value(init, key, shape, 'float32'), init(key, shape, 'float32')
      if not np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)):
        bad.append((name, seed, shape))
print(bad)
'''


@pytest.mark.slow  # ~30 s: a fresh process compiling with XLA's full pipeline
def test_initial_value_is_bit_identical_with_xla_default_optimizations():
  # The suite compiles with XLA's cheap pipeline (conftest.py); users compile with the full one,
  # whose algebraic rewrites are what could change bits once an initializer is jitted.
  import os
  import subprocess
  import sys
  # The factories initial_value jits (the others it calls as they are).
  factories = '{' + ', '.join(f'{n!r}: {src}' for n, src in [
      ('uniform', 'nnx.initializers.uniform(0.5)'),
      ('orthogonal', 'nnx.initializers.orthogonal()'),
      ('lecun_normal', 'nnx.initializers.lecun_normal()'),
      ('glorot_uniform', 'nnx.initializers.glorot_uniform()'),
      ('vs_uniform', "nnx.initializers.variance_scaling(2.0, 'fan_avg', 'uniform')"),
      ('delta_orthogonal', 'nnx.initializers.delta_orthogonal()'),
      ('constant', 'nnx.initializers.constant(0.3)')]) + '}'
  code = _DEFAULT_FLAGS_CHECK.replace('{FACTORIES}', factories).replace('{SHAPES}', repr(SHAPES))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == '[]', out.stdout


def test_constants_of_other_signs_or_types_do_not_share_a_jitted_initializer():
  key = jax.random.key(0)
  assert np.signbit(np.asarray(initial_value(nnx.initializers.constant(0.0), key, (2,),
                                             jnp.float32))).tolist() == [False, False]
  negative = initial_value(nnx.initializers.constant(-0.0), key, (2,), jnp.float32)
  assert np.signbit(np.asarray(negative)).tolist() == [True, True]
  ints = initial_value(nnx.initializers.constant(1), key, (2,), jnp.int32)
  assert ints.dtype == jnp.int32 and ints.tolist() == [1, 1]


def test_other_initializers_are_called_as_they_are_and_not_kept():
  import gc
  import weakref
  calls = []

  def mine(key, shape, dtype=jnp.float32):
    calls.append((shape, dtype))
    return jnp.full(shape, 2.0, dtype)

  value = initial_value(mine, KEY, (2, 2), jnp.float16)
  assert calls == [((2, 2), jnp.float16)] and value.dtype == jnp.float16
  ref = weakref.ref(mine)
  del mine
  gc.collect()
  assert ref() is None


def test_initial_value_takes_any_shape_an_initializer_takes():
  init = nnx.initializers.lecun_normal()
  for shape in [[3, 4], (np.int64(3), 4)]:  # not a tuple of ints: called as it is
    np.testing.assert_array_equal(initial_value(init, KEY, shape, jnp.float32),
                                  init(KEY, shape, jnp.float32))
