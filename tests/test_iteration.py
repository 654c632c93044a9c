"""nnx.vmap / pmap / scan / fori_loop / while_loop: values, state written back, structure
changes, axes prefixes, errors, and compiled-call caching."""
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


# -- vmap: values and state ------------------------------------------------------

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


def test_state_axes_from_a_state_of_axes_sets_each_created_variable():
  state = nnx.state(Layer(nnx.Rngs(0)))
  state['w'] = 1
  state['count'] = None
  axes = nnx.StateAxes(state)
  assert axes.map_prefix(('w',), None) == 1 and axes.map_prefix(('count',), None) is None
  made = nnx.vmap(lambda: Layer(nnx.Rngs(0)), out_axes=axes, axis_size=4)()
  assert made.w.shape == (2, 4, 2) and made.count.shape == ()


def test_state_axes_without_a_matching_filter_names_the_path():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"No axis found for path=\('count',\)"):
    nnx.vmap(lambda m: m.w[...], in_axes=(nnx.StateAxes({nnx.Param: 0}),))(layer)


def test_state_axes_on_a_plain_array_is_refused():
  with pytest.raises(ValueError, match=r'in_axes\[0\] is a StateAxes'):
    nnx.vmap(lambda x: x, in_axes=(nnx.StateAxes({...: 0}),))(jnp.ones(3))


def test_vmap_broadcast_state_updated_per_item_raises_names_it_and_changes_nothing():
  layer = Layer(nnx.Rngs(0))

  def write_item(m, x):
    m.count[...] = x.astype(jnp.int32)
    m.w[...] = m.w * 2
    return x

  w_before = np.asarray(layer.w[...])
  with pytest.raises(ValueError, match=r"args\[0\]\['count'\].*batched[\s\S]*broadcast"):
    nnx.vmap(write_item, in_axes=(None, 0))(layer, jnp.arange(3.))
  assert int(layer.count[...]) == 0
  np.testing.assert_array_equal(layer.w[...], w_before)


def test_vmap_failure_leaves_state_and_structure_untouched():
  layers = stacked_layers(3)

  def boom(m, x):
    m(x)
    m.extra = nnx.Param(x)
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.vmap(boom, in_axes=(0, None))(layers, jnp.ones(2))
  np.testing.assert_array_equal(layers.count[...], np.zeros(3))
  assert not hasattr(layers, 'extra')


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


def test_vmap_keeps_python_numbers_given_with_axis_none():
  # jax.vmap hands an unmapped Python int through as is: usable as a static count
  repeat = nnx.vmap(lambda x, n: sum(x for _ in range(n)), in_axes=(0, None))
  np.testing.assert_allclose(repeat(jnp.arange(3.), 2), [0., 2., 4.])
  np.testing.assert_allclose(repeat(jnp.arange(3.), 3), [0., 3., 6.])


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


# -- vmap: sharing and aliasing --------------------------------------------------

def test_vmap_tree_mode_refuses_shared_variables_naming_both_paths():
  p = nnx.Param(jnp.ones(3))
  with pytest.raises(ValueError, match='Duplicate Param') as info:
    nnx.vmap(lambda pair: pair.a * 2, graph=False)(Pair(p, p))
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


def test_shared_variable_given_two_axes_names_both_paths():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Inconsistent aliasing detected[\s\S]*Count[\s\S]*'
                                       r'\.args\[0\]\.count: 0[\s\S]*\.args\[1\]\.count: None'):
    nnx.vmap(lambda a, b: a.w[...], in_axes=(0, None))(layer, layer)


def test_shared_submodule_given_two_axes_names_the_variable_under_both_parents():
  shared = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'Inconsistent aliasing[\s\S]*\.args\[0\]\.a\.count: 0'
                                       r'[\s\S]*\.args\[1\]\.a\.count: 1'):
    nnx.vmap(lambda p, q: None, in_axes=(0, 1))(Pair(shared, 1), Pair(shared, 2))


def test_returning_an_input_with_another_axis_is_inconsistent_aliasing():
  layers = stacked_layers(2)
  with pytest.raises(ValueError, match=r'Inconsistent aliasing[\s\S]*\.args\[0\]\.count: 0'
                                       r'[\s\S]*\.out\.count: 1'):
    nnx.vmap(lambda m: m, in_axes=0, out_axes=1)(layers)


def test_returning_an_input_gives_back_the_callers_object_or_refuses_without_graph_updates():
  layers = stacked_layers(2)
  assert nnx.vmap(lambda m: m)(layers) is layers
  with pytest.raises(ValueError, match=r'Duplicate Count[\s\S]*\.args\[0\]\.count[\s\S]*'
                                       r'\.out\.count'):
    nnx.vmap(lambda m: m, graph_updates=False)(layers)


def test_returning_a_captured_variable_is_refused():
  outside = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match='Cannot extract graph node from different trace level'):
    nnx.vmap(lambda x: outside)(jnp.ones(2))
  with pytest.raises(ValueError, match=r'Cannot return captured Variable of type (Param|Count)'):
    nnx.vmap(lambda x: outside, graph_updates=False)(jnp.ones(2))


# -- vmap: prefixes ----------------------------------------------------------------

def test_prefixes_nnx_refuses_are_refused_when_decorating():
  with pytest.raises(ValueError, match='Variables prefixes are not supported'):
    nnx.vmap(lambda v: v, in_axes=(nnx.Variable(0),), graph=False)
  with pytest.raises(ValueError, match='cannot contain `StateAxes` objects'):
    nnx.vmap(lambda m: m, in_axes=nnx.StateAxes({...: 0}), graph=False)
  with pytest.raises(ValueError, match='cannot contain `StateAxes` objects'):
    nnx.scan(lambda m: m, in_axes=nnx.StateAxes({...: 0}), out_axes=0, graph_updates=False)
  with pytest.raises(ValueError, match='Graph nodes are not allowed as prefixes'):
    nnx.vmap(lambda m: m, in_axes=nnx.Dict(a=1), graph=True)
  axes = nnx.prefix(Layer(nnx.Rngs(0)), {...: 0}, graph=True)
  with pytest.raises(ValueError, match='`TreeState` objects are only allowed'):
    nnx.vmap(lambda m: m, in_axes=(axes,), graph=True, graph_updates=True)


@pytest.mark.parametrize('graph', [True, False])
def test_prefix_trees_give_per_variable_axes_in_and_out(graph):
  template = Layer(nnx.Rngs(0))
  axes = nnx.prefix(template, {nnx.Param: 0, ...: None}, graph=graph)

  @nnx.vmap(in_axes=(0,), out_axes=axes, graph=graph, graph_updates=False)
  def create(seed):
    return Layer(nnx.Rngs(seed))

  made = create(jnp.arange(3))
  assert made.w.shape == (3, 2, 2) and made.count.shape == ()

  @nnx.vmap(in_axes=(axes, None), graph=graph, graph_updates=False)
  def forward(m, x):
    return m(x)

  assert forward(made, jnp.ones(2)).shape == (3, 2)
  assert int(made.count[...]) == 1


def test_graph_mode_prefixes_made_together_describe_a_shared_object():
  layers = stacked_layers(3)
  a, b = nnx.prefix((layers, layers), {...: 0}, graph=True)

  @nnx.vmap(in_axes=(a, b, None), graph=True, graph_updates=False)
  def twice(m1, m2, x):
    assert m1 is m2
    return m1(x) + m2(x)

  assert twice(layers, layers, jnp.ones(2)).shape == (3, 2)
  np.testing.assert_array_equal(layers.count[...], [2, 2, 2])


# -- vmap: graph updates ---------------------------------------------------------

def test_variables_created_inside_take_the_axis_their_argument_gives_them():
  layers = stacked_layers(3)

  @nnx.vmap(in_axes=(nnx.StateAxes({nnx.Param: 0, ...: None}), 0))
  def add_state(m, x):
    m.scale = nnx.Param(x * 2)                 # a Param: mapped, comes back stacked
    m.total = Count(jnp.array(7))              # other state: broadcast, comes back whole

  add_state(layers, jnp.arange(3.))
  np.testing.assert_allclose(layers.scale[...], [0., 2., 4.])
  assert layers.total.shape == () and int(layers.total[...]) == 7


def test_replaced_submodule_and_list_edits_reach_the_caller():
  holder = Pair(stacked_layers(2), nnx.List([]))
  old = holder.a

  @nnx.vmap
  def rewire(h):
    h.b.append(h.a)
    h.a = Layer(nnx.Rngs(1))

  rewire(holder)
  assert holder.b[0] is old and holder.a is not old
  assert holder.a.w.shape == (2, 2, 2)


def test_without_graph_updates_only_values_come_back():
  layers = stacked_layers(2)

  @nnx.vmap(in_axes=(0, None), graph_updates=False)
  def step(m, x):
    m.extra = nnx.Param(x)
    return m(x)

  step(layers, jnp.ones(2))
  assert not hasattr(layers, 'extra')
  np.testing.assert_array_equal(layers.count[...], [1, 1])


def test_vmapped_init_builds_stacked_module_with_keywords_bound_to_positions():
  axes = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})

  class Stack(nnx.Module):
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(axes, axes))
    def __init__(self, rngs):
      self.layer = Layer(rngs)
      self.steps = Count(jnp.array(0))

  stack = Stack(rngs=nnx.Rngs(0))
  assert stack.layer.w.shape == (4, 2, 2) and stack.steps.shape == ()
  assert not np.allclose(stack.layer.w[0], stack.layer.w[1])


def test_transform_metadata_hides_the_mapped_axis_inside_and_adds_it_outside():
  seen = []

  @nnx.vmap(in_axes=(None,), out_axes=0, axis_size=3,
            transform_metadata={nnx.PARTITION_NAME: 'stack'})
  def create(rngs):
    w = nnx.Param(jnp.ones((2, 5)), out_sharding=('din', 'dout'), eager_sharding=False)
    seen.append(w.out_sharding)
    return Pair(w, None)

  made = create(nnx.Rngs(0))
  assert made.a.shape == (3, 2, 5) and made.a.out_sharding == ('stack', 'din', 'dout')

  @nnx.vmap(in_axes=(0,), transform_metadata={nnx.PARTITION_NAME: 'stack'})
  def read(m):
    seen.append(m.a.out_sharding)

  read(made)
  assert seen == [('din', 'dout'), ('din', 'dout')]
  assert made.a.out_sharding == ('stack', 'din', 'dout')


def test_bound_methods_are_refused():
  layer = Layer(nnx.Rngs(0))
  for transform in (nnx.vmap, nnx.pmap, nnx.scan):
    with pytest.raises(ValueError, match='does not support bound methods'):
      transform(layer.__call__)


# -- vmap: compiled once per structure ----------------------------------------------

def test_vmap_traces_once_per_structure_and_follows_outer_traces():
  traces = []

  @nnx.vmap(in_axes=(0, None))
  def forward(m, x):
    traces.append(1)
    return m(x)

  layers = stacked_layers(3)
  for _ in range(3):
    forward(layers, jnp.ones(2))
  assert len(traces) == 1
  np.testing.assert_array_equal(layers.count[...], [3, 3, 3])
  forward(stacked_layers(2), jnp.ones(2))     # another structure: traced again
  assert len(traces) == 2

  @nnx.jit
  def outer(m, x):
    return forward(m, x * 2)

  np.testing.assert_allclose(outer(layers, jnp.ones(2)), forward(layers, jnp.ones(2) * 2))
  np.testing.assert_array_equal(layers.count[...], [5, 5, 5])


# -- pmap ----------------------------------------------------------------------

def test_pmap_single_device_propagates_state():
  layer = Layer(nnx.Rngs(0))
  w = np.asarray(layer.w[...])
  f = nnx.pmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='d')
  y = f(layer, jnp.ones((1, 2)))
  np.testing.assert_allclose(y, np.ones((1, 2)) @ w, rtol=1e-6)
  assert int(layer.count[...]) == 1
  f(layer, jnp.ones((1, 2)))
  assert int(layer.count[...]) == 2


def test_pmap_creates_modules_with_state_axes():
  axes = nnx.StateAxes({nnx.Param: 0, ...: None})
  made = nnx.pmap(lambda x: Layer(nnx.Rngs(0)), out_axes=axes)(jnp.ones(1))
  assert made.w.shape == (1, 2, 2) and made.count.shape == ()


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


def test_scan_broadcast_state_is_the_same_every_step_with_graph_updates():
  layer = Layer(nnx.Rngs(0))
  w = np.asarray(layer.w[...])

  @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0))
  def step(c, m, x):
    return c + m.count[...], m(jnp.full(2, x))

  total, ys = step(jnp.array(0), layer, jnp.arange(4.))
  # every step saw count == 0, and the broadcast update was dropped (as NNX)
  assert int(total) == 0 and int(layer.count[...]) == 0
  np.testing.assert_allclose(ys, np.arange(4.)[:, None] * w.sum(0), rtol=1e-6)


def test_scan_broadcast_state_accumulates_without_graph_updates():
  layer = Layer(nnx.Rngs(0))

  @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=(nnx.Carry, 0), graph_updates=False)
  def step(c, m, x):
    return c + m.count[...], m(jnp.full(2, x))

  total, _ = step(jnp.array(0), layer, jnp.arange(4.))
  assert int(total) == 0 + 1 + 2 + 3 and int(layer.count[...]) == 4


@pytest.mark.parametrize('graph_updates', [True, False])
def test_scan_carry_comes_back_as_the_callers_object(graph_updates):
  layer = Layer(nnx.Rngs(0))
  w0 = np.asarray(layer.w[...])

  def step(m, x):
    m.w[...] = m.w + x
    return m, m.w.sum()

  out, sums = nnx.scan(step, graph_updates=graph_updates)(layer, jnp.arange(3.))
  assert out is layer
  np.testing.assert_allclose(layer.w[...], w0 + 3., rtol=1e-6)
  np.testing.assert_allclose(np.diff(sums), [4., 8.], rtol=1e-5)  # sum grows by 4*x each step


@pytest.mark.parametrize('graph_updates, message', [
    (True, 'Carry references must be the same between iterations'),
    (False, 'scan Variable identity must be preserved across iterations')])
def test_scan_carry_must_keep_its_objects(graph_updates, message):
  count = Count(jnp.array(0))

  @nnx.scan(graph_updates=graph_updates)
  def step(c, x):
    return Count(c[...] + 1), x

  with pytest.raises(ValueError, match=message):
    step(count, jnp.arange(3))
  assert int(count[...]) == 0


def test_scan_mixed_carry_of_object_and_array():
  count = Count(jnp.array(0))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(carry, x):
    c, total = carry
    c[...] += 1
    return (c, total + x), total

  (c, total), ys = step((count, jnp.array(0.)), jnp.arange(4.))
  assert c is count and int(count[...]) == 4 and float(total) == 6.
  np.testing.assert_allclose(ys, [0., 0., 1., 3.])


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
  c, ys = nnx.scan(lambda c, x: (c + x, x * 2), in_axes=(nnx.Carry, 1), out_axes=(nnx.Carry, -1))(
      jnp.zeros(2), xs)
  np.testing.assert_allclose(c, xs.sum(1))
  np.testing.assert_allclose(ys, xs * 2)
  counted = nnx.scan(lambda c: c + 1, in_axes=nnx.Carry, out_axes=nnx.Carry, length=4)(jnp.array(0))
  assert int(counted) == 4
  only_ys = nnx.scan(lambda x: x * 3, in_axes=0, out_axes=0)(jnp.arange(3.))
  np.testing.assert_allclose(only_ys, [0., 3., 6.])


def test_scan_keyword_arguments_are_bound_to_their_positions():
  step = nnx.scan(lambda c, x: (c + x, c))
  c, _ = step(jnp.array(0.), x=jnp.arange(3.))
  assert float(c) == 3.


def test_scan_axes_errors():
  with pytest.raises(ValueError, match='multiple Carry'):
    nnx.scan(lambda a, b: (a, b), in_axes=(nnx.Carry, nnx.Carry))
  with pytest.raises(ValueError, match='the other must also have Carry'):
    nnx.scan(lambda c, x: c, in_axes=(nnx.Carry, 0), out_axes=0)
  with pytest.raises(ValueError, match=r'Cannot broadcast output state.*out_axes\[1\]'):
    nnx.scan(lambda c, x: (c, x), out_axes=(nnx.Carry, None))
  with pytest.raises(ValueError, match='Cannot carry output state'):
    nnx.scan(lambda c, x: (c, x), out_axes=(nnx.Carry, nnx.StateAxes({...: nnx.Carry})))
  with pytest.raises(ValueError, match='cannot be nested'):
    nnx.scan(lambda c, x: (c, x), in_axes=((nnx.Carry, 0), 0))
  with pytest.raises(ValueError, match='When in_axes=Carry, the function must take exactly one'):
    nnx.scan(lambda c, x: c, in_axes=nnx.Carry, out_axes=nnx.Carry)(jnp.array(0.), 1.)


def test_scan_shared_variable_given_two_roles_is_inconsistent_aliasing():
  v = nnx.Param(jnp.zeros(3))
  with pytest.raises(ValueError, match='Inconsistent aliasing'):
    nnx.scan(lambda c, x: (c, x[...]), graph_updates=False)(v, v)


def test_scan_returning_an_input_variable_without_graph_updates_is_refused():
  v = nnx.Param(jnp.arange(5))
  with pytest.raises(ValueError, match='does not support Variable aliasing'):
    nnx.scan(lambda v: v, in_axes=0, out_axes=0, graph_updates=False)(v)


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


def test_state_created_inside_a_scan_comes_back_stacked():
  layers = stacked_layers(3)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def forward(m, x):
    y = m(x)
    m.activations = nnx.Intermediate(y)
    return y

  forward(layers, jnp.ones((1, 2)))
  assert layers.activations.shape == (3, 1, 2)


def test_state_created_inside_a_scan_cannot_be_broadcast():
  layers = stacked_layers(2)

  @nnx.scan(in_axes=(nnx.StateAxes({nnx.Param: 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
  def forward(m, x):
    m.note = Count(jnp.array(1))
    return m(x)

  with pytest.raises(ValueError, match=r'Count at \.args\[0\]\.note was created inside the scan'):
    forward(layers, jnp.ones((1, 2)))
  assert not hasattr(layers, 'note')


@pytest.mark.parametrize('graph', [True, False])
def test_scan_with_per_variable_prefix_without_graph_updates(graph):
  layers = stacked_layers(3)
  layers.count = Count(jnp.array(0))
  axes = nnx.prefix(layers, {nnx.Param: 0, ...: None}, graph=graph)

  @nnx.scan(in_axes=(axes, nnx.Carry), out_axes=nnx.Carry, graph=graph, graph_updates=False)
  def forward(m, x):
    return m(x)

  assert forward(layers, jnp.ones((1, 2))).shape == (1, 2)
  assert int(layers.count[...]) == 3  # broadcast Variables are carried without graph updates


def test_scan_transform_metadata_removes_the_scanned_axis_inside():
  seen = []

  class Stack(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3, 2, 2)), out_sharding=('layers', 'din', 'dout'),
                         eager_sharding=False)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def __call__(self, x):
      seen.append(self.w.out_sharding)
      return x @ self.w

  s = Stack()
  s(jnp.ones((1, 2)))
  assert seen == [('din', 'dout')] and s.w.out_sharding == ('layers', 'din', 'dout')


def test_scan_traces_once_per_structure():
  traces = []

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, layer):
    traces.append(1)
    return layer(x)

  layers = stacked_layers(4)
  for _ in range(3):
    forward(jnp.ones((1, 2)), layers)
  assert len(traces) == 1
  np.testing.assert_array_equal(layers.count[...], [3, 3, 3, 3])
  y = nnx.jit(lambda x, m: forward(x, m))(jnp.ones((1, 2)), layers)  # traced along inside jit
  np.testing.assert_allclose(y, forward(jnp.ones((1, 2)), layers), rtol=1e-6)


# -- fori_loop / while_loop --------------------------------------------------------

def test_fori_loop_propagates_state_and_returns_the_callers_objects():
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
  assert m_out is layer and int(layer.count[...]) == 3
  assert int(nnx.fori_loop(0, 4, lambda i, c: c + i, 0)) == 6  # plain values: jax.lax.fori_loop


def test_fori_loop_with_shared_objects_in_the_loop_value():
  layer = Layer(nnx.Rngs(0))
  pair = Pair(layer, layer)

  def body(i, val):
    p, q = val
    p.a.count[...] += 1
    return p, q

  p, q = nnx.fori_loop(0, 3, body, (pair, layer))
  assert p is pair and q is layer and pair.a is pair.b
  assert int(layer.count[...]) == 3


@pytest.mark.parametrize('body', [
    lambda i, v: (v[0](v[1]), v[0]),                                # swaps object and array
    lambda i, v: (Layer(nnx.Rngs(1)), v[1]),                        # a new object
    lambda i, v: (setattr(v[0], 'w', nnx.Param(v[0].w[...])), v)[1],  # a replaced Variable
])
def test_fori_loop_body_must_keep_objects_and_structure(body):
  layer = Layer(nnx.Rngs(0))
  w = layer.w
  with pytest.raises(ValueError):
    nnx.fori_loop(0, 2, body, (layer, jnp.ones(2)))
  assert layer.w is w and int(layer.count[...]) == 0


def test_while_loop_propagates_state_and_python_numbers_become_arrays():
  layer = Layer(nnx.Rngs(0))
  layer.w[...] = jnp.eye(2) * 2
  m, x, left = nnx.while_loop(lambda v: v[2] > 0, lambda v: (v[0], v[0](v[1]), v[2] - 1.0),
                              (layer, jnp.ones(2), 3.0))
  np.testing.assert_allclose(x, [8., 8.])
  assert m is layer and int(layer.count[...]) == 3 and float(left) == 0.


def test_loops_in_tree_mode_refuse_shared_objects():
  layer = Layer(nnx.Rngs(0))
  with pytest.raises(ValueError, match='Duplicate'):
    nnx.fori_loop(0, 2, lambda i, v: v, (layer, layer), graph=False)


def test_loops_trace_their_body_once_and_work_inside_jit():
  traces = []

  def body(i, m):
    traces.append(1)
    m.count[...] += 1
    return m

  layer = Layer(nnx.Rngs(0))
  for _ in range(3):
    nnx.fori_loop(0, 2, body, layer)
  assert len(traces) == 1 and int(layer.count[...]) == 6
  nnx.jit(lambda m: nnx.fori_loop(0, 2, body, m))(layer)
  assert int(layer.count[...]) == 8

  def cond(m):
    return m.count[...] < 10

  nnx.while_loop(cond, lambda m: body(0, m), layer)
  nnx.while_loop(cond, lambda m: body(0, m), layer)   # a new body function: traced again
  assert int(layer.count[...]) == 10


# -- outside jit: a repeated call compiles nothing ---------------------------------

def test_scan_and_vmap_called_outside_jit_compile_once_per_structure(compilations):
  layers = stacked_layers(3)
  x = jnp.ones(2)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def through(x, layer):
    return jnp.tanh(layer(x))

  forward = nnx.vmap(lambda m, x: m(x), in_axes=(0, None))
  through(x, layers), forward(layers, x)  # first calls compile
  with compilations() as compiled:
    for _ in range(3):
      y = through(x, layers)
      forward(layers, x)
  assert compiled == []
  np.testing.assert_array_equal(layers.count[...], [8, 8, 8])  # 4 scans + 4 vmaps
  assert y.shape == (2,)
