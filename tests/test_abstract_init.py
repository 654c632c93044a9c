"""abstract_init: under nnx.eval_shape keys and initial values are traced once per kind, and the
abstract model is the one a full trace (or an eager build) gives."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import arbax as nnx
from arbax import abstract_init


class Mixed(nnx.Module):
  """Layers of many kinds, several of each shape, drawing from two streams."""

  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.a2 = nnx.Linear(3, 4, rngs=rngs)
    self.half = nnx.Linear(3, 4, param_dtype=jnp.bfloat16, rngs=rngs)
    self.conv = nnx.Conv(2, 5, (3, 3), rngs=rngs)
    self.general = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)
    self.einsum = nnx.Einsum('ab,bc->ac', (3, 4), (4,), rngs=rngs)
    if not jax.sharding.get_abstract_mesh().empty:  # placed on the mesh in context
      self.sharded = nnx.Linear(
          4, 4, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                  ('data', 'model')), rngs=rngs)
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.rngs = rngs


def build():
  return Mixed(nnx.Rngs(0, dropout=1))


def leaves(model) -> dict:
  return {path: v.get_value() for path, v in nnx.state(model).flat_state()}


def traced_in_full(f):
  """``nnx.eval_shape(f)`` with reuse turned off: every key and value traced."""
  saved = abstract_init.reuse
  abstract_init.reuse = lambda kind, fn, *args: fn(*args)
  try:
    return nnx.eval_shape(f)
  finally:
    abstract_init.reuse = saved


def test_eval_shape_gives_the_shapes_and_dtypes_of_an_eager_build():
  eager, abstract = leaves(build()), leaves(nnx.eval_shape(build))
  assert eager.keys() == abstract.keys()
  for path, value in eager.items():
    assert isinstance(abstract[path], jax.ShapeDtypeStruct), path
    assert (abstract[path].shape, abstract[path].dtype) == (value.shape, value.dtype), path


def test_eval_shape_is_the_same_as_tracing_every_value():
  assert leaves(nnx.eval_shape(build)) == leaves(traced_in_full(build))


def test_shardings_under_an_explicit_mesh_match_the_eager_build():
  mesh = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    eager, abstract = leaves(build()), leaves(nnx.eval_shape(build))
    full = leaves(traced_in_full(build))
  assert abstract == full  # ShapeDtypeStructs compare shape, dtype and sharding
  assert abstract[('sharded', 'kernel')].sharding.spec == jax.P('data', 'model')
  for path, value in eager.items():
    if abstract[path].sharding is not None:
      assert abstract[path].sharding.spec == jax.typeof(value).sharding.spec, path


def test_rng_counts_come_out_as_the_eager_build_leaves_them():
  rngs = nnx.Rngs(0, dropout=1)
  eager = Mixed(rngs)
  # As in NNX: a key each for kernel and bias (BatchNorm: scale and bias), Embed one, and
  # Dropout forks its stream from one dropout key.
  assert int(rngs.default.count[...]) == 15 and int(rngs.dropout.count[...]) == 1
  abstract = nnx.eval_shape(build)
  assert abstract.rngs.default.count[...] == jax.ShapeDtypeStruct((), jnp.uint32)
  assert abstract.rngs.default.key[...].dtype == eager.rngs.default.key[...].dtype


def test_an_rngs_argument_is_left_as_it_was_and_draws_on_from_its_count():
  rngs = nnx.Rngs(0)
  abstract = nnx.eval_shape(lambda r: nnx.Linear(2, 3, rngs=r), rngs)
  assert abstract.kernel.shape == (2, 3) and int(rngs.default.count[...]) == 0
  expected = jax.random.fold_in(jax.random.key(0), 0)
  np.testing.assert_array_equal(jax.random.key_data(rngs()), jax.random.key_data(expected))


def test_keys_and_values_are_traced_once_per_kind():
  calls = []

  def f():
    x, y = jnp.ones((2,)), jnp.ones((2,), jnp.int32)
    outs = [abstract_init.reuse('k', lambda a: calls.append(a.dtype) or a + 1, a)
            for a in (x, x, y, x, y)]
    return outs

  outs = nnx.eval_shape(f)
  assert calls == [jnp.float32, jnp.int32]
  assert [o.dtype for o in outs] == [jnp.float32] * 2 + [jnp.int32, jnp.float32, jnp.int32]


def test_outside_eval_shape_every_call_is_computed():
  calls = []
  for _ in range(3):
    abstract_init.reuse('k', lambda: calls.append(1))
  jax.eval_shape(lambda: abstract_init.reuse('k', lambda: calls.append(1)))
  assert len(calls) == 4


def test_a_transform_inside_eval_shape_computes_its_own_values():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def stacked(rngs):
    return nnx.Linear(2, 5, rngs=rngs)

  abstract = nnx.eval_shape(lambda: stacked(nnx.Rngs(0)))
  eager = stacked(nnx.Rngs(0))
  assert abstract.kernel.shape == eager.kernel.shape == (3, 2, 5)
  assert abstract.bias.shape == (3, 5)


def test_values_kept_for_reuse_are_dropped_when_eval_shape_returns():
  nnx.eval_shape(build)
  assert getattr(abstract_init._LOCAL, 'scope', None) is None


@pytest.mark.parametrize('make', [lambda r: nnx.Linear(8, 8, rngs=r),
                                  lambda r: nnx.Conv(2, 3, (3,), rngs=r),
                                  lambda r: nnx.Einsum('ab,bc->ac', (4, 4), (4,), rngs=r)])
def test_eager_layers_hold_the_plain_initializers_values(make):
  layer = make(nnx.Rngs(3))
  key = jax.random.key(3)
  kernel = nnx.initializers.lecun_normal()(jax.random.fold_in(key, 0), layer.kernel.shape)
  np.testing.assert_array_equal(layer.kernel[...], kernel)
  np.testing.assert_array_equal(layer.bias[...], np.zeros(layer.bias.shape, np.float32))
