"""nnx.capture: sown and perturbed values come back as States, through transforms too."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.module import CAPTURES


class Scale(nnx.Module):
  def __init__(self, factor):
    self.w = nnx.Param(jnp.full(2, factor))

  def __call__(self, x):
    y = x * self.w
    self.sow(nnx.Intermediate, 'y', y)
    self.sow(nnx.BatchStat, 'total', y.sum(), lambda acc, v: acc + v, lambda: 0.0)
    return y


class Chain(nnx.Module):
  def __init__(self):
    self.layers = nnx.List([Scale(2.0), Scale(3.0)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    self.sow(nnx.Intermediate, 'out', x)
    return x

  def double(self, x):
    return self(x) * 2


@pytest.fixture(autouse=True)
def _sow_under_capture_does_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter('error', DeprecationWarning)
    yield


def test_capture_returns_the_output_and_a_state_by_module_path():
  model = Chain()
  out, found = nnx.capture(model, nnx.Intermediate)(jnp.ones(2))
  np.testing.assert_array_equal(out, [6.0, 6.0])
  assert isinstance(found, nnx.State)
  assert type(found['out']) is nnx.Intermediate
  np.testing.assert_array_equal(found['out'][0], [6.0, 6.0])
  np.testing.assert_array_equal(found['layers'][0]['y'][0], [2.0, 2.0])
  np.testing.assert_array_equal(found['layers'][1]['y'][0], [6.0, 6.0])


def test_several_kinds_give_one_state_each_and_no_kind_gives_the_output_only():
  model = Chain()
  out, inter, stats = nnx.capture(model, nnx.Intermediate, nnx.BatchStat)(jnp.ones(2))
  assert set(inter['layers'][0]) == {'y'} and set(stats['layers'][0]) == {'total'}
  assert float(stats['layers'][1]['total'][...]) == 12.0  # custom reduce / init
  np.testing.assert_array_equal(nnx.capture(model)(jnp.ones(2)), out)


def test_sow_returns_whether_its_kind_is_being_captured():
  results = []

  class Probe(nnx.Module):
    def __call__(self):
      results.append(self.sow(nnx.Intermediate, 'a', 1))
      results.append(self.sow(nnx.Cache, 'b', 2))

  _, found = nnx.capture(Probe(), nnx.Intermediate)()
  assert results == [True, False]
  assert set(found) == {'a'}


def test_nothing_is_left_on_the_modules_afterwards():
  model = Chain()
  nnx.capture(model, nnx.Intermediate)(jnp.ones(2))
  for _, m in nnx.iter_modules(model):
    assert CAPTURES not in vars(m) and not hasattr(m, 'y') and not hasattr(m, 'out')

  class Boom(nnx.Module):
    def __call__(self):
      self.sow(nnx.Intermediate, 'a', 1)
      raise RuntimeError('boom')

  boom = Boom()
  with pytest.raises(RuntimeError, match='boom'):
    nnx.capture(boom, nnx.Intermediate)()
  assert CAPTURES not in vars(boom)


def test_capture_of_a_bound_method_a_function_and_as_a_decorator():
  model = Chain()
  out, found = nnx.capture(model.double, nnx.Intermediate)(jnp.ones(2))
  np.testing.assert_array_equal(out, [12.0, 12.0])
  assert 'out' in found

  def run(m, x):
    return m(x) + 1
  out, found = nnx.capture(run, nnx.Intermediate)(model, jnp.ones(2))
  np.testing.assert_array_equal(out, [7.0, 7.0])
  assert 'layers' in found

  @nnx.capture(nnx.Intermediate, nnx.BatchStat)
  def decorated(m, x):
    return m(x)
  _, inter, stats = decorated(model, jnp.ones(2))
  assert 'out' in inter and 'total' in stats['layers'][0]
  assert decorated.__name__ == 'decorated'


def test_capture_of_a_function_without_arguments_is_a_type_error():
  with pytest.raises(TypeError, match='first argument'):
    nnx.capture(lambda: 1, nnx.Intermediate)()


def test_values_sown_inside_nnx_jit_come_back():
  class Jitted(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(3))

    @nnx.jit
    def __call__(self, x):
      self.sow(nnx.Intermediate, 'h', x * self.w)
      return x.sum()

  model = Jitted()
  out, found = nnx.capture(model, nnx.Intermediate)(jnp.arange(3.0))
  assert float(out) == 3.0
  np.testing.assert_array_equal(found['h'][0], [0.0, 1.0, 2.0])

  @nnx.jit
  def step(m, x):  # capture inside a transform
    return nnx.capture(m, nnx.Intermediate)(x)
  _, found = step(Chain(), jnp.ones(2))
  np.testing.assert_array_equal(found['out'][0], [6.0, 6.0])


class Squares(nnx.Module):
  def __init__(self):
    self.inner = Scale(2.0)

  def __call__(self, x):
    h = self.perturb('h', self.inner(x))
    return (h ** 2).sum()


def test_perturbations_give_the_gradient_of_an_intermediate():
  model = Squares()
  x = jnp.array([1.0, 3.0])
  _, perturbations = nnx.capture(model, nnx.Perturbation)(x)
  assert type(perturbations['h']) is nnx.Perturbation
  np.testing.assert_array_equal(perturbations['h'][...], [0.0, 0.0])

  def loss(model, perturbations):
    return nnx.capture(model, nnx.Intermediate, init=perturbations)(x)

  grad_fn = nnx.grad(loss, argnums=nnx.DiffState(1, nnx.Perturbation), has_aux=True)
  grads, sown = grad_fn(model, perturbations)
  h = 2.0 * x
  np.testing.assert_allclose(grads['h'][...], 2 * h)  # d sum(h**2) / dh
  np.testing.assert_allclose(sown['inner']['y'][0], h)
  assert 'h' not in sown  # the perturbations were an input, not a captured kind


def test_init_values_start_the_captured_dicts():
  model = Chain()
  _, first = nnx.capture(model, nnx.Intermediate)(jnp.ones(2))
  _, again = nnx.capture(model, nnx.Intermediate, init=first)(jnp.ones(2))
  assert len(again['out'][...]) == 2 and len(again['layers'][1]['y'][...]) == 2


def test_method_outputs_sow_each_public_method_and_call():
  model = Chain()
  out, found = nnx.capture(model.double, nnx.Intermediate,
                           method_outputs=nnx.Intermediate)(jnp.ones(2))
  np.testing.assert_array_equal(found['double'][0], out)
  np.testing.assert_array_equal(found['__call__'][0], out / 2)
  np.testing.assert_array_equal(found['layers'][0]['__call__'][0], [2.0, 2.0])
  # The classes are as they were afterwards.
  assert 'double' not in nnx.capture(model.double, nnx.Intermediate)(jnp.ones(2))[1]


def test_method_outputs_are_removed_even_when_the_call_fails():
  class Fails(nnx.Module):
    def run(self):
      raise RuntimeError('no')

  original = Fails.__dict__['run']
  with pytest.raises(RuntimeError):
    nnx.capture(Fails().run, nnx.Intermediate, method_outputs=nnx.Intermediate)()
  assert Fails.__dict__['run'] is original
