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


def test_the_nnx_module_names_exist():
  for name in ('graphlib', 'statelib', 'rnglib', 'variablelib', 'pytreelib', 'compat', 'helpers',
               'summary', 'traversals', 'ids', 'spmd', 'extract'):
    assert hasattr(nnx, name), name
