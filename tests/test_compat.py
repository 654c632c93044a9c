"""nnx.compat: graph-mode defaults that hold under nnx.set_graph_mode(False)."""
import inspect

import jax.numpy as jnp
import pytest

import arbax as nnx


class Tied(nnx.Module):
  def __init__(self):
    self.a = nnx.Param(jnp.array([1.0, 2.0]))
    self.b = self.a

  def __call__(self, x):
    return jnp.sum(self.a * x) + jnp.sum(self.b)


def test_split_state_and_clone_keep_graph_mode_in_tree_mode():
  model = Tied()
  with nnx.set_graph_mode(False):
    with pytest.raises(ValueError):
      nnx.split(model)
    graphdef, state = nnx.compat.split(model)
    assert list(state) == ['a']
    assert list(nnx.compat.state(model)) == ['a']
    copy = nnx.compat.clone(model)
  assert copy.a is copy.b and copy.a is not model.a


def test_transforms_default_to_graph_updates():
  model = Tied()
  with nnx.set_graph_mode(False):
    grads = nnx.compat.grad(lambda m: m(jnp.ones(2)))(model)
    assert list(grads) == ['a']
    assert grads['a'][...].tolist() == [2.0, 2.0]  # both uses of the shared Param

    @nnx.compat.jit
    def bump(m):
      m.a[...] += 1

    bump(model)
  assert model.a[...].tolist() == [2.0, 3.0] and model.a is model.b


def test_explicit_arguments_still_win():
  with pytest.raises(ValueError):
    nnx.compat.split(Tied(), graph=False)


def test_every_function_defaults_graph_where_it_takes_one():
  for name in nnx.compat.__all__:
    fn = getattr(nnx.compat, name)
    params = inspect.signature(fn).parameters
    for flag in ('graph', 'graph_updates'):
      if flag in params:
        assert params[flag].default is True, (name, flag)
