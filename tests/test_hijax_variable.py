"""HijaxVariable and ref Variables: the Variable classes whose value lives in a Cell or a jax.Ref."""
import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.cell import Cell, NoTypeStateError
from arbax.errors import ImmutableVariableError
from arbax.hijax_variable import HijaxVariable


# -- what each flag builds --------------------------------------------------------
@pytest.mark.parametrize('hijax', [False, True])
@pytest.mark.parametrize('ref', [False, True])
def test_flags_choose_the_class_and_the_store(hijax, ref):
  v = nnx.Param(jnp.array(1.0), hijax=hijax, ref=ref)
  assert isinstance(v, nnx.Param) and v.type is nnx.Param and type(v).__name__ == 'Param'
  assert (v.hijax, v.ref) == (hijax, ref)
  assert isinstance(v, nnx.variablelib.HijaxVariable) == hijax
  raw = v.get_raw_value()
  assert isinstance(raw, jax.Ref) == ref
  assert isinstance(raw, Cell) == (hijax and not ref)
  assert float(v[...]) == 1.0


def test_ref_holds_scalars_but_not_containers():
  r = nnx.Variable(3, ref=True)
  assert isinstance(r.get_raw_value(), jax.Ref) and int(r[...]) == 3
  with pytest.raises(TypeError, match='hijax=True'):
    nnx.Variable({'a': 1}, ref=True)


@pytest.mark.parametrize('hijax', [False, True])
@pytest.mark.parametrize('ref', [False, True])
def test_copy_with_other_flags_converts(hijax, ref):
  v = nnx.Variable(jnp.array(1.0), hijax=not hijax, tag='t')
  c = v.copy(hijax=hijax, ref=ref)
  assert (c.hijax, c.ref, c.tag) == (hijax, ref, 't')
  assert isinstance(c, HijaxVariable) == hijax
  assert isinstance(c.get_raw_value(), jax.Ref) == ref


def test_copies_own_their_store():
  v = nnx.Param(jnp.zeros(2), hijax=True)
  for other in (v.copy(), v.replace(jnp.ones(2)), copy.deepcopy(v),
                pickle.loads(pickle.dumps(v)), nnx.Param.from_metadata(v[...], v.get_metadata())):
    assert other.hijax and isinstance(other, nnx.Param)
    assert other.get_raw_value() is not v.get_raw_value()
    other[...] += 5
  np.testing.assert_allclose(v[...], [0.0, 0.0])


def test_tree_map_keeps_variables_hijax():
  v = nnx.BatchStat(jnp.arange(3.0), hijax=True)
  doubled = jax.tree.map(lambda x: x * 2, v)
  assert doubled.hijax and type(doubled) is type(v)
  np.testing.assert_allclose(doubled[...], [0.0, 2.0, 4.0])


# -- immutable (mutable=False) hijax Variables ------------------------------------------
def test_immutable_variable_is_a_plain_value_that_refuses_writes():
  v = nnx.Param(jnp.array(3.0), hijax=True, mutable=False)
  assert v.hijax and isinstance(v, HijaxVariable)
  assert not isinstance(v.get_raw_value(), Cell)
  with pytest.raises(ImmutableVariableError, match=r'mutable=True'):
    v[...] = 1.0
  g = jax.grad(lambda v: v[...] ** 2)(v)
  assert isinstance(g, nnx.Param) and float(g[...]) == 6.0


def test_immutable_variable_is_a_loop_carry():
  v = nnx.Variable(jnp.array(1.0), hijax=True, mutable=False)
  out, _ = jax.lax.scan(lambda v, _: (v.replace(v[...] * 2), None), v, None, length=4)
  assert out.hijax and float(out[...]) == 16.0
  out = jax.lax.fori_loop(0, 3, lambda i, v: v.replace(v[...] + 1), v)
  assert float(out[...]) == 4.0


def test_mutable_hijax_variable_as_loop_carry_names_the_alternatives():
  v = nnx.Variable(jnp.array(1.0), hijax=True)
  with pytest.raises(NoTypeStateError, match=r'mutable=False.*nnx.scan'):
    jax.lax.fori_loop(0, 2, lambda i, v: (v.__setitem__(..., v[...] * 2), v)[1], v)


# -- jax.vmap maps a hijax Variable as one unit ---------------------------------------
def test_vmap_writes_each_example_slice_of_the_callers_variable():
  v = nnx.Variable(jnp.arange(3.0), hijax=True)

  def f(v, x):
    v[...] = v[...] * x
    return v[...] + 1

  out = jax.vmap(f)(v, jnp.array([10.0, 20.0, 30.0]))
  np.testing.assert_allclose(v[...], [0.0, 20.0, 60.0])
  np.testing.assert_allclose(out, [1.0, 21.0, 61.0])


def test_vmap_along_another_axis_and_nested():
  v = nnx.Variable(jnp.zeros((2, 3)), hijax=True)
  jax.vmap(lambda v, x: v.__setitem__(..., v[...] + x), in_axes=(1, 0))(v, jnp.arange(3.0))
  np.testing.assert_allclose(v[...], [[0.0, 1.0, 2.0]] * 2)
  jax.vmap(jax.vmap(lambda v: v.__setitem__(..., v[...] * 2)))(v)
  np.testing.assert_allclose(v[...], [[0.0, 2.0, 4.0]] * 2)


def test_vmap_under_jit_and_a_shared_write():
  v = nnx.Variable(jnp.ones(3), hijax=True)

  @jax.jit
  def f(v):
    jax.vmap(lambda v: v.__setitem__(..., 7.0))(v)  # one value for every example

  f(v)
  np.testing.assert_allclose(v[...], [7.0, 7.0, 7.0])


def test_vmap_of_a_pytree_valued_variable_may_add_entries():
  v = nnx.Variable({'a': jnp.zeros(3)}, hijax=True)

  def f(v):
    v['a'] = v['a'] + 1
    v['twice'] = v['a'] * 2

  jax.vmap(f, axis_size=3)(v)  # a dict has no shape: JAX needs the size
  np.testing.assert_allclose(v['twice'], [2.0, 2.0, 2.0])


def test_variables_created_inside_vmap_come_out_stacked():
  @jax.vmap
  def make(key):
    with nnx.var_defaults(hijax=True):
      return nnx.Linear(2, 3, rngs=nnx.Rngs(key))

  ensemble = make(jax.random.split(jax.random.key(0), 4))
  assert ensemble.kernel.hijax and ensemble.kernel.shape == (4, 2, 3)
  assert ensemble.bias.shape == (4, 3)  # created from the same zeros, yet one bias per example
  y = jax.vmap(lambda m, x: m(x), in_axes=(0, None))(ensemble, jnp.ones((5, 2)))
  assert y.shape == (4, 5, 3)


def test_a_variable_created_inside_vmap_from_a_constant_is_per_example():
  def counter(x):
    v = nnx.Variable(jnp.zeros(2), hijax=True)
    v[...] += x  # a per-example write into a Variable made from a shared value
    return v

  out = jax.vmap(counter)(jnp.arange(3.0))
  assert out.hijax and out.shape == (3, 2)
  np.testing.assert_allclose(out[...], [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
  with pytest.raises(ValueError, match='out_axes=None.*created inside vmap is per-example'):
    jax.vmap(lambda x: nnx.Variable(jnp.zeros(2), hijax=True), out_axes=None)(jnp.arange(3.0))


def test_vmap_returning_a_mapped_variable_unmapped_is_an_error():
  v = nnx.Variable(jnp.arange(3.0), hijax=True)
  with pytest.raises(ValueError, match='out_axes=None'):
    jax.vmap(lambda v: v, out_axes=None)(v)
  same = jax.vmap(lambda v: v)(v)
  assert same.get_raw_value() is v.get_raw_value()


def test_nested_transform_inside_vmap_is_refused_with_the_alternatives():
  v = nnx.Variable(jnp.arange(3.0), hijax=True)
  inc = jax.jit(lambda v: v.__setitem__(..., v[...] + 1))
  with pytest.raises(NoTypeStateError, match='ref=True'):
    jax.vmap(inc)(v)
  r = nnx.Variable(jnp.arange(3.0), ref=True)  # JAX batches Refs natively
  jax.vmap(inc)(r)
  np.testing.assert_allclose(r[...], [1.0, 2.0, 3.0])
