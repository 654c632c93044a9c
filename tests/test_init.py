"""The package namespace: NNX's names, and tracebacks without arbax's internal frames."""
import traceback

import jax.numpy as jnp
import pytest

import arbax as nnx


def test_an_error_inside_a_transform_shows_the_users_frame_not_arbax_internals():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  @nnx.jit
  def broken(m, x):
    return m(x) @ jnp.ones((7, 7))  # shapes do not match

  with pytest.raises(TypeError) as info:
    broken(model, jnp.ones((1, 2)))
  frames = [f.filename for f in traceback.extract_tb(info.value.__traceback__)]
  assert any(f.endswith('test_init.py') for f in frames)
  assert not any('/arbax/transforms/' in f for f in frames), frames


@pytest.mark.parametrize('call', [
    lambda f, m, x: nnx.grad(f)(m, x),
    lambda f, m, x: nnx.value_and_grad(f)(m, x),
    lambda f, m, x: nnx.vmap(f, in_axes=(None, 0))(m, x),
    lambda f, m, x: nnx.remat(f)(m, x),
    lambda f, m, x: nnx.scan(lambda c, xi: (c, f(c, xi)), in_axes=(nnx.Carry, 0))(m, x),
    lambda f, m, x: nnx.cond(True, f, f, m, x),
    lambda f, m, x: nnx.eval_shape(f, m, x),
], ids=['grad', 'value_and_grad', 'vmap', 'remat', 'scan', 'cond', 'eval_shape'])
def test_every_transform_hides_its_internal_frames(call):
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  def broken(m, x):
    raise ValueError('raised by the user')

  with pytest.raises(ValueError, match='raised by the user') as info:
    call(broken, model, jnp.ones((4, 2)))
  frames = [f.filename for f in traceback.extract_tb(info.value.__traceback__)]
  assert not any('/arbax/' in f for f in frames), frames


def test_the_nnx_module_names_exist():
  for name in ('graphlib', 'statelib', 'rnglib', 'variablelib', 'pytreelib', 'compat', 'helpers',
               'summary', 'traversals', 'ids', 'spmd', 'extract'):
    assert hasattr(nnx, name), name
