"""nnx.EMA: moving averages checked against the recurrence written out in the test."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx


class Model(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]), tag='kernel')
    self.stat = nnx.BatchStat(jnp.array(4.0))

  def __call__(self, x):
    return x * self.w + self.stat


def test_update_follows_the_recurrence():
  model = Model()
  ema = nnx.EMA(model, decay=0.5)
  model.w[...] = jnp.array([3.0, 6.0])
  ema.update(model)
  # 0.5 * [1, 2] + 0.5 * [3, 6]
  np.testing.assert_allclose(ema.params['w'][...], [2.0, 4.0])
  model.w[...] = jnp.array([0.0, 0.0])
  ema.update(model)
  np.testing.assert_allclose(ema.params['w'][...], [1.0, 2.0])
  np.testing.assert_allclose(ema.params['stat'][...], 4.0)  # only=... follows every Variable


def test_params_are_copies_with_the_same_kind_and_metadata():
  model = Model()
  ema = nnx.EMA(model, decay=0.9)
  w = ema.params['w']
  assert type(w) is nnx.Param and w.tag == 'kernel' and w is not model.w
  model.w[...] = jnp.zeros(2)
  np.testing.assert_allclose(w[...], [1.0, 2.0])  # the model's writes do not reach the copy
  assert ema.decay == 0.9 and ema.filter is ...


def test_only_filter_and_state_input():
  model = Model()
  ema = nnx.EMA(model, 0.75, only=nnx.Param)
  assert set(ema.params) == {'w'}
  assert set(nnx.state(ema)['params']) == {'w'}
  model.w[...] = jnp.array([5.0, 10.0])
  model.stat[...] = 100.0
  ema.update(nnx.state(model))  # a State works too; non-matching Variables are ignored
  np.testing.assert_allclose(ema.params['w'][...], [2.0, 4.0])  # 0.75 * [1, 2] + 0.25 * [5, 10]
  ema2 = nnx.EMA(nnx.state(model, nnx.Param), 0.5)
  assert set(ema2.params) == {'w'}


def test_apply_to_shares_the_averages():
  model = Model()
  ema = nnx.EMA(model, 0.5, only=nnx.Param)
  averaged = ema.apply_to(model)
  assert averaged is not model and type(averaged) is Model
  assert averaged.w is ema.params['w'] and averaged.stat is model.stat
  model.w[...] = jnp.array([3.0, 4.0])
  ema.update(model)
  np.testing.assert_allclose(averaged(jnp.ones(2)), [2.0 + 4.0, 3.0 + 4.0])


def test_update_inside_nnx_jit_with_an_optimizer():
  model = Model()
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
  ema = nnx.EMA(model, 0.5, only=nnx.Param)

  @nnx.jit
  def step(model, optimizer, ema):
    optimizer.update(model, nnx.State({'w': jnp.array([1.0, 1.0])}))
    ema.update(model)

  step(model, optimizer, ema)  # w: [0, 1]; ema: [0.5, 1.5]
  step(model, optimizer, ema)  # w: [-1, 0]; ema: [-0.25, 0.75]
  np.testing.assert_allclose(model.w[...], [-1.0, 0.0])
  np.testing.assert_allclose(ema.params['w'][...], [-0.25, 0.75])


def test_update_under_jax_jit_with_state_and_update():
  model = Model()
  ema = nnx.EMA(model, 0.5)

  @jax.jit
  def step(model, ema):
    model.w[...] = model.w[...] * 3
    ema.update(model)
    return nnx.state(ema)

  nnx.update(ema, step(model, ema))
  np.testing.assert_allclose(ema.params['w'][...], [2.0, 4.0])
  np.testing.assert_allclose(model.w[...], [1.0, 2.0])  # jax.jit is pure: model not updated


class Tied(nnx.Module):
  def __init__(self):
    self.a = nnx.Param(jnp.array(2.0))
    self.b = self.a


def test_graph_mode_default_averages_a_shared_variable_once():
  model = Tied()
  ema = nnx.EMA(model, 0.5)
  assert ema.graph is None and set(ema.params) == {'a'}
  model.a[...] = 4.0
  ema.update(model)
  averaged = ema.apply_to(model)
  assert averaged.a is averaged.b and float(averaged.a[...]) == 3.0


@pytest.mark.parametrize('tree_mode', ['argument', 'context'])
def test_tree_mode_refuses_a_shared_variable(tree_mode):
  with pytest.raises(ValueError, match=r'\.a.*\.b|\.b.*\.a'):
    if tree_mode == 'argument':
      nnx.EMA(Tied(), 0.5, graph=False)
    else:
      with nnx.set_graph_mode(False):
        nnx.EMA(Tied(), 0.5)


def test_graph_none_follows_the_mode_at_each_call():
  model = Tied()
  ema = nnx.EMA(model, 0.5)                 # built in graph mode
  with nnx.set_graph_mode(False):           # updated in tree mode: the alias is refused
    with pytest.raises(ValueError, match=r'\.a.*\.b|\.b.*\.a'):
      ema.update(model)
  pinned = nnx.EMA(model, 0.5, graph=True)  # an explicit graph=True ignores the context
  with nnx.set_graph_mode(False):
    pinned.update(model)
  assert float(pinned.params['a'][...]) == 2.0


def test_integer_variables_keep_their_dtype():
  class Counted(nnx.Module):
    def __init__(self):
      self.n = nnx.BatchStat(jnp.array(3))

  model = Counted()
  ema = nnx.EMA(model, 0.5)
  model.n[...] = 5
  ema.update(model)
  assert ema.params['n'][...].dtype == jnp.int32 and int(ema.params['n'][...]) == 4


# -- errors -------------------------------------------------------------------
def test_non_variable_leaf_is_a_type_error():
  with pytest.raises(TypeError, match=r"\['a'\]|\.a"):
    nnx.EMA({'a': jnp.ones(2)}, 0.5)


def test_decay_out_of_range():
  with pytest.raises(ValueError, match='decay must be in \\[0, 1\\], got 1.5'):
    nnx.EMA(Model(), 1.5)


def test_update_with_another_structure_names_the_path():
  class Other(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(2))

  class Bigger(Model):
    def __init__(self):
      super().__init__()
      self.extra = nnx.Param(jnp.zeros(1))

  ema = nnx.EMA(Model(), 0.5)
  with pytest.raises(ValueError, match=r'nothing at \.stat'):
    ema.update(Other())
  with pytest.raises(ValueError, match=r'\.extra'):
    ema.update(Bigger())
  np.testing.assert_allclose(ema.params['w'][...], [1.0, 2.0])  # nothing written


def test_apply_to_another_structure_names_the_path():
  class Other(nnx.Module):
    def __init__(self):
      self.v = nnx.Param(jnp.zeros(2))

  ema = nnx.EMA(Model(), 0.5, only=nnx.Param)
  with pytest.raises(ValueError, match=r'nothing at \.w'):
    ema.apply_to(Other())

  class Bigger(Model):
    def __init__(self):
      super().__init__()
      self.extra = nnx.Param(jnp.zeros(1))

  with pytest.raises(ValueError, match=r'\.extra'):
    ema.apply_to(Bigger())
