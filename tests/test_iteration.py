"""nnx.vmap / pmap / scan / fori_loop / while_loop: values, state written back, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx


class Count(nnx.Variable):
  pass


class Layer(nnx.Module):
  """y = x @ w, counting its calls."""

  def __init__(self, rngs, din=2, dout=2):
    self.w = nnx.Param(rngs.normal((din, dout)))
    self.count = Count(jnp.array(0))

  def __call__(self, x):
    self.count[...] += 1
    return x @ self.w


class Pair(nnx.Module):
  def __init__(self, a, b):
    self.a = a
    self.b = b


def stacked_layers(n, seed=0):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Layer(rngs)
  return create(nnx.Rngs(seed))


# -- vmap ----------------------------------------------------------------------

def test_vmap_values_match_jax_vmap_and_broadcast_update_is_written_back():
  layer = Layer(nnx.Rngs(0))
  w = np.asarray(layer.w[...])
  x = jnp.arange(10.).reshape(5, 2)
  y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(layer, x)
  np.testing.assert_allclose(y, jax.vmap(lambda x: x @ w)(x), rtol=1e-6)
  assert int(layer.count[...]) == 1  # same update for every item: stays unbatched


def test_vmap_mapped_state_comes_back_on_its_axis():
  layer = Layer(nnx.Rngs(0))
  layer.w = nnx.Param(jnp.arange(12.).reshape(2, 3, 2))   # batch axis 1
  layer.count = Count(jnp.zeros((2, 3), jnp.int32))
  x = jnp.ones(2)
  y = nnx.vmap(lambda m, x: m(x), in_axes=(1, None))(layer, x)
  expected = jax.vmap(lambda w: x @ w, in_axes=1)(layer.w[...])
  np.testing.assert_allclose(y, expected)
  np.testing.assert_array_equal(layer.count[...], np.ones((2, 3)))


def test_vmap_state_axes_per_kind():
  layer = Layer(nnx.Rngs(0))
  layer.w = nnx.Param(jnp.arange(12.).reshape(3, 2, 2))
  axes = nnx.StateAxes({nnx.Param: 0, Count: None})
  y = nnx.vmap(lambda m, x: m(x), in_axes=(axes, None))(layer, jnp.ones(2))
  np.testing.assert_allclose(y, jnp.ones(2) @ layer.w[...])
  assert y.shape == (3, 2) and int(layer.count[...]) == 1
  assert axes[Count] is None and list(axes) == [nnx.Param, Count]


def test_state_axes_without_a_matching_filter_names_the_path():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"No axis found for path=\('count',\)"):
    nnx.vmap(lambda m: m.w[...], in_axes=(nnx.StateAxes({nnx.Param: 0}),))(layer)


def test_state_axes_on_a_plain_array_is_refused():
  with pytest.raises(ValueError, match=r'in_axes\[0\] is a StateAxes'):
    nnx.vmap(lambda x: x, in_axes=(nnx.StateAxes({...: 0}),))(jnp.ones(3))


def test_vmap_broadcast_state_updated_per_item_raises_and_changes_nothing():
  layer = Layer(nnx.Rngs(0))

  def write_item(m, x):
    m.count[...] = x.astype(jnp.int32)
    m.w[...] = m.w * 2
    return x

  w_before = np.asarray(layer.w[...])
  with pytest.raises(ValueError, match=r'args\[0\]\.count is broadcast'):
    nnx.vmap(write_item, in_axes=(None, 0))(layer, jnp.arange(3.))
  assert int(layer.count[...]) == 0
  np.testing.assert_array_equal(layer.w[...], w_before)


def test_vmap_failure_leaves_state_untouched():
  layers = stacked_layers(3)

  def boom(m, x):
    m(x)
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.vmap(boom, in_axes=(0, None))(layers, jnp.ones(2))
  np.testing.assert_array_equal(layers.count[...], np.zeros(3))


def test_vmap_tree_mode_refuses_shared_variables_naming_both_paths():
  p = nnx.Param(jnp.ones(3))
  with pytest.raises(ValueError) as info:
    nnx.vmap(lambda pair: pair.a * 2)(Pair(p, p))
  assert '[0][0].a' in str(info.value) and '[0][0].b' in str(info.value)


def test_vmap_graph_mode_keeps_sharing_and_writes_back_once():
  p = nnx.Param(jnp.arange(3.))
  pair = Pair(p, p)

  @nnx.vmap(graph=True)
  def bump(pair):
    assert pair.a is pair.b
    pair.a[...] += 1
    return pair.b[...] * 10

  np.testing.assert_allclose(bump(pair), [10., 20., 30.])
  assert pair.a is pair.b
  np.testing.assert_allclose(p[...], [1., 2., 3.])


def test_vmap_graph_mode_inconsistent_axes_for_shared_module():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Inconsistent aliasing.*args\[1\]\.'):
    nnx.vmap(lambda a, b: a.w[...], in_axes=(0, None), graph=True)(layer, layer)


def test_vmap_axis_name_axis_size_and_out_axes():
  x = jnp.arange(4.)
  np.testing.assert_allclose(nnx.vmap(lambda x: jax.lax.psum(x, 'i'), axis_name='i')(x), [6.] * 4)
  made = nnx.vmap(lambda: Layer(nnx.Rngs(0)), in_axes=(), axis_size=3)()
  assert made.w.shape == (3, 2, 2) and made.count.shape == (3,)
  y = nnx.vmap(lambda x: (x * 2, x.sum()), in_axes=0, out_axes=(1, 0))(jnp.ones((4, 2)))
  assert y[0].shape == (2, 4) and y[1].shape == (4,)


def test_vmap_out_axes_state_axes_on_created_module():
  made = nnx.vmap(lambda x: Layer(nnx.Rngs(0)), out_axes=nnx.StateAxes({nnx.Param: 1, ...: 0}))(
      jnp.ones(3))
  assert made.w.shape == (2, 3, 2) and made.count.shape == (3,)


def test_vmap_in_axes_length_must_match_arguments():
  with pytest.raises(ValueError, match=r'len\(in_axes\)=2, len\(args\)=1'):
    nnx.vmap(lambda x: x, in_axes=(0, 0))(jnp.ones(3))


def test_vmap_as_method_decorator():
  class Ensemble(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(3.))

    @nnx.vmap(in_axes=(0, None))
    def __call__(self, x):
      return self.w * x

  np.testing.assert_allclose(Ensemble()(2.), [0., 2., 4.])


def test_split_rngs_gives_each_item_its_own_keys_and_advances_the_stream():
  rngs = nnx.Rngs(0)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Layer(rngs)

  first = create(rngs)
  assert rngs.default.key.shape == () and int(rngs.default.count[...]) == 1
  w = np.asarray(first.w[...])
  assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
  # item i drew from fold_in(split(fold_in(key, 0), 3)[i], 0)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 3)
  expected = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (2, 2)))(keys)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  second = create(rngs)
  assert not np.allclose(second.w[...], w)


# -- scan ----------------------------------------------------------------------

def test_scan_plain_values_match_lax_scan():
  def step(c, x):
    return c * 2 + x, c - x

  xs = jnp.arange(5.)
  got = nnx.scan(step)(jnp.array(1.), xs)
  want = jax.lax.scan(step, jnp.array(1.), xs)
  np.testing.assert_allclose(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1])
  got_rev = nnx.scan(step, reverse=True, unroll=2)(jnp.array(1.), xs)
  want_rev = jax.lax.scan(step, jnp.array(1.), xs, reverse=True)
  np.testing.assert_allclose(got_rev[1], want_rev[1])


def test_scan_over_layers_equals_a_python_loop():
  layers = stacked_layers(3)
  x = jnp.array([[1., -2.]])

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, layer):
    return jnp.tanh(layer(x))

  y = forward(x, layers)
  ref = x
  for w in np.asarray(layers.w[...]):
    ref = np.tanh(ref @ w)
  np.testing.assert_allclose(y, ref, rtol=1e-5)
  np.testing.assert_array_equal(layers.count[...], [1, 1, 1])  # scanned updates come back stacked


def test_scan_as_method_over_stacked_self():
  class Stack(nnx.Module):
    def __init__(self, n):
      self.w = nnx.Param(jnp.arange(1., n + 1.))
      self.calls = Count(jnp.zeros(n, jnp.int32))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def __call__(self, x):
      self.calls[...] += 1
      return x * self.w

  s = Stack(3)
  np.testing.assert_allclose(s(jnp.array(2.)), 2. * 1 * 2 * 3)
  np.testing.assert_array_equal(s.calls[...], [1, 1, 1])


def test_scan_broadcast_state_updates_accumulate():
  layer = Layer(nnx.Rngs(0))
  w = np.asarray(layer.w[...])

  @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
  def step(c, m, x):
    return c + x, m(jnp.full(2, x))

  total, ys = step(jnp.array(0.), layer, jnp.arange(4.))
  assert float(total) == 6. and int(layer.count[...]) == 4
  np.testing.assert_allclose(ys, np.arange(4.)[:, None] * w.sum(0), rtol=1e-6)


def test_scan_module_carry_is_written_back():
  layer = Layer(nnx.Rngs(0))
  w0 = np.asarray(layer.w[...])

  def step(m, x):
    m.w[...] = m.w + x
    return m, m.w.sum()

  out, sums = nnx.scan(step)(layer, jnp.arange(3.))
  assert isinstance(out, Layer) and out is not layer
  np.testing.assert_allclose(layer.w[...], w0 + 3., rtol=1e-6)
  np.testing.assert_allclose(out.w[...], layer.w[...])
  np.testing.assert_allclose(np.diff(sums), [4., 8.], rtol=1e-5)  # sum grows by 4*x each step


def test_scan_state_axes_can_carry_one_kind_of_state():
  layers = stacked_layers(3)
  axes = nnx.StateAxes({nnx.Param: 0, Count: nnx.Carry})
  layers.count = Count(jnp.array(0))

  @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry)
  def forward(m, x):
    return m(x)

  forward(layers, jnp.ones((1, 2)))
  assert int(layers.count[...]) == 3


def test_scan_axis_and_length_options():
  xs = jnp.arange(6.).reshape(2, 3)
  c, ys = nnx.scan(lambda c, x: (c + x, x * 2), in_axes=(nnx.Carry, 1), out_axes=(nnx.Carry, 1))(
      jnp.zeros(2), xs)
  np.testing.assert_allclose(c, xs.sum(1))
  np.testing.assert_allclose(ys, xs * 2)
  counted = nnx.scan(lambda c: c + 1, in_axes=nnx.Carry, out_axes=nnx.Carry, length=4)(jnp.array(0))
  assert int(counted) == 4
  only_ys = nnx.scan(lambda x: x * 3, in_axes=0, out_axes=0)(jnp.arange(3.))
  np.testing.assert_allclose(only_ys, [0., 3., 6.])


def test_scan_axes_errors():
  with pytest.raises(ValueError, match='multiple Carry'):
    nnx.scan(lambda a, b: (a, b), in_axes=(nnx.Carry, nnx.Carry))(1., 2.)
  with pytest.raises(ValueError, match='the other must also have Carry'):
    nnx.scan(lambda c, x: c, in_axes=(nnx.Carry, 0), out_axes=0)(jnp.array(0.), jnp.ones(3))
  with pytest.raises(ValueError, match=r'Cannot broadcast output state.*out_axes\[1\]'):
    nnx.scan(lambda c, x: (c, x), out_axes=(nnx.Carry, None))
  with pytest.raises(TypeError, match='keyword arguments'):
    nnx.scan(lambda c, x: (c, x))(jnp.array(0.), x=jnp.ones(3))


def test_scan_failure_and_bad_carry_leave_state_untouched():
  layers = stacked_layers(2)
  w = np.asarray(layers.w[...])

  def boom(x, m):
    m(x)
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError):
    nnx.scan(boom, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(jnp.ones(2), layers)
  with pytest.raises(TypeError):  # carry changes shape
    nnx.scan(lambda x, m: m(x)[None], in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        jnp.ones(2), layers)
  np.testing.assert_array_equal(layers.count[...], [0, 0])
  np.testing.assert_array_equal(layers.w[...], w)


# -- fori_loop / while_loop / pmap --------------------------------------------

def test_fori_loop_propagates_state_and_returns_new_objects():
  layer = Layer(nnx.Rngs(0))
  layer.w[...] = jnp.eye(2) * 2

  def body(i, val):
    m, x = val
    return m, m(x) + i

  m_out, y = nnx.fori_loop(0, 3, body, (layer, jnp.ones(2)))
  ref = np.ones(2)
  for i in range(3):
    ref = ref * 2 + i
  np.testing.assert_allclose(y, ref)
  assert int(layer.count[...]) == 3 and m_out is not layer and int(m_out.count[...]) == 3
  assert int(nnx.fori_loop(0, 4, lambda i, c: c + i, 0)) == 6  # plain values: jax.lax.fori_loop


def test_fori_loop_structure_change_is_an_error_and_changes_nothing():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match='same structure'):
    nnx.fori_loop(0, 2, lambda i, v: (v[0](v[1]), v[0]), (layer, jnp.ones(2)))
  assert int(layer.count[...]) == 0


def test_while_loop_propagates_state():
  layer = Layer(nnx.Rngs(0))
  layer.w[...] = jnp.eye(2) * 2
  _, x = nnx.while_loop(lambda v: v[1][0] < 20, lambda v: (v[0], v[0](v[1])),
                        (layer, jnp.ones(2)))
  np.testing.assert_allclose(x, [32., 32.])
  assert int(layer.count[...]) == 5


def test_pmap_single_device_propagates_state():
  layer = Layer(nnx.Rngs(0))
  w = np.asarray(layer.w[...])
  f = nnx.pmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='d')
  y = f(layer, jnp.ones((1, 2)))
  np.testing.assert_allclose(y, np.ones((1, 2)) @ w, rtol=1e-6)
  assert int(layer.count[...]) == 1
  f(layer, jnp.ones((1, 2)))
  assert int(layer.count[...]) == 2
