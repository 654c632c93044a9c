"""Variable: value access, array protocol, metadata, pytree behaviour, copies, var_defaults."""
import copy
import operator
import pickle
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

KINDS = [nnx.Variable, nnx.Param, nnx.BatchStat, nnx.Cache, nnx.Intermediate, nnx.Perturbation]


class Count(nnx.Variable):
  pass


# -- value access --------------------------------------------------------------
@pytest.mark.parametrize('kind', KINDS + [Count])
def test_every_kind_holds_a_value_and_is_a_variable(kind):
  v = kind(jnp.arange(3.0))
  assert isinstance(v, nnx.Variable) and type(v) is kind
  np.testing.assert_array_equal(v[...], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(v.value, [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(v.get_value(), [0.0, 1.0, 2.0])


@pytest.mark.parametrize('value', [3, 2.5, 'text', None, [1, 2], (1, 2), {'a': 1}])
def test_holds_any_value_and_ellipsis_reads_it_whole(value):
  v = nnx.Variable(value)
  assert v[...] == value and v.value == value and v.get_value() == value


def test_ellipsis_read_returns_the_stored_value_itself():
  x = jnp.arange(3.0)
  v = nnx.Param(x)
  assert v[...] is x and v.get_value() is x  # no copy, no indexing op
  k = jax.random.key(0)
  assert nnx.RngKey(k)[...] is k


def test_ellipsis_write_replaces_the_value_seen_by_every_holder():
  v = nnx.Param(jnp.zeros(3))
  holder = [v]
  v[...] = jnp.ones(3)
  np.testing.assert_array_equal(holder[0][...], np.ones(3))
  v[...] += 2
  np.testing.assert_array_equal(v[...], np.full(3, 3.0))


def test_index_read_and_write_on_arrays():
  v = nnx.Variable(jnp.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(v[1], [3.0, 4.0, 5.0])
  assert float(v[0, 2]) == 2.0
  v[1] = jnp.zeros(3)
  v[0, 0] = 10.0
  np.testing.assert_array_equal(v[...], [[10.0, 1.0, 2.0], [0.0, 0.0, 0.0]])


def test_index_write_on_numpy_and_lists_does_not_mutate_the_old_value():
  old = np.zeros(3)
  v = nnx.Variable(old)
  v[1] = 5.0
  np.testing.assert_array_equal(v[...], [0.0, 5.0, 0.0])
  np.testing.assert_array_equal(old, np.zeros(3))
  items = [1, 2, 3]
  w = nnx.Variable(items)
  w[0] = 9
  assert w[...] == [9, 2, 3] and items == [1, 2, 3]


def test_index_write_on_a_scalar_raises_type_error():
  v = nnx.Variable(3)
  with pytest.raises(TypeError, match='int'):
    v[0] = 1


def test_value_property_and_set_value():
  v = nnx.Param(jnp.zeros(2))
  v.value = jnp.ones(2)
  np.testing.assert_array_equal(v[...], np.ones(2))
  v.set_value(jnp.full(2, 4.0))
  np.testing.assert_array_equal(v.get_value(), np.full(2, 4.0))
  v.set_value(7.0, index=0)
  np.testing.assert_array_equal(v[...], [7.0, 4.0])
  assert float(v.get_value(index=1)) == 4.0


def test_assigning_a_variable_stores_its_value_not_the_box():
  a, b = nnx.Param(jnp.zeros(2)), nnx.Param(jnp.ones(2))
  a[...] = b
  assert not isinstance(a.get_value(), nnx.Variable)
  np.testing.assert_array_equal(a[...], np.ones(2))


def test_constructing_from_a_variable_unwraps_and_merges_metadata():
  inner = nnx.Param(jnp.ones(2), tag='x')
  outer = nnx.BatchStat(inner, other=1)
  assert not isinstance(outer.get_value(), nnx.Variable)
  assert outer.tag == 'x' and outer.other == 1


# -- array protocol ------------------------------------------------------------
BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
          operator.mod, operator.pow]
BITWISE = [operator.and_, operator.or_, operator.xor, operator.lshift, operator.rshift]
COMPARE = [operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne]


@pytest.mark.parametrize('op', BINARY + COMPARE)
def test_arithmetic_and_comparison_forward_and_reflected(op):
  x, y = jnp.array([1.0, 2.0, 5.0]), jnp.array([2.0, 2.0, 3.0])
  v = nnx.Variable(x)
  np.testing.assert_allclose(op(v, y), op(x, y))
  np.testing.assert_allclose(op(y, v), op(y, x))
  np.testing.assert_allclose(op(v, nnx.Variable(y)), op(x, y))


@pytest.mark.parametrize('op', BITWISE)
def test_bitwise_forward_and_reflected(op):
  x, y = jnp.array([1, 6, 12]), jnp.array([3, 1, 2])
  v = nnx.Variable(x)
  np.testing.assert_array_equal(op(v, y), op(x, y))
  np.testing.assert_array_equal(op(y, v), op(y, x))


@pytest.mark.parametrize('op,iop', [(operator.add, operator.iadd), (operator.sub, operator.isub),
                                    (operator.mul, operator.imul),
                                    (operator.truediv, operator.itruediv),
                                    (operator.floordiv, operator.ifloordiv),
                                    (operator.mod, operator.imod), (operator.pow, operator.ipow)])
def test_inplace_operators_update_the_same_variable(op, iop):
  x, y = jnp.array([4.0, 9.0]), jnp.array([2.0, 3.0])
  v = nnx.Param(x, tag='t')
  alias = v
  result = iop(v, y)
  assert result is alias and type(result) is nnx.Param and result.tag == 't'
  np.testing.assert_allclose(alias[...], op(x, y))


@pytest.mark.parametrize('op,iop', [(operator.and_, operator.iand), (operator.or_, operator.ior),
                                    (operator.xor, operator.ixor), (operator.lshift, operator.ilshift),
                                    (operator.rshift, operator.irshift)])
def test_inplace_bitwise_operators(op, iop):
  x, y = jnp.array([5, 12]), jnp.array([3, 2])
  v = nnx.Variable(x)
  assert iop(v, y) is v
  np.testing.assert_array_equal(v[...], op(x, y))


def test_matmul_forward_reflected_inplace_and_divmod():
  a, b = jnp.arange(6.0).reshape(2, 3), jnp.ones((3, 2))
  v = nnx.Variable(a)
  np.testing.assert_allclose(v @ b, a @ b)
  np.testing.assert_allclose(jnp.ones((4, 2)) @ v, jnp.ones((4, 2)) @ a)
  sq = nnx.Variable(jnp.eye(2) * 2)
  sq @= jnp.eye(2) * 3
  np.testing.assert_allclose(sq[...], jnp.eye(2) * 6)
  q, r = divmod(nnx.Variable(jnp.array(7)), 3)
  assert (int(q), int(r)) == (2, 1)
  q, r = divmod(7, nnx.Variable(jnp.array(3)))
  assert (int(q), int(r)) == (2, 1)


def test_unary_operators_and_conversions():
  x = jnp.array([-1.5, 2.0])
  v = nnx.Variable(x)
  np.testing.assert_array_equal(-v, -x)
  np.testing.assert_array_equal(+v, x)
  np.testing.assert_array_equal(abs(v), jnp.abs(x))
  np.testing.assert_array_equal(~nnx.Variable(jnp.array([0, 5])), ~jnp.array([0, 5]))
  s = nnx.Variable(jnp.array(3))
  assert bool(s) is True and not bool(nnx.Variable(jnp.array(0)))
  assert int(s) == 3 and float(s) == 3.0 and complex(s) == 3 + 0j
  assert ['a', 'b', 'c', 'd'][s] == 'd'
  assert round(nnx.Variable(2.567), 1) == 2.6


def test_len_iter_contains():
  v = nnx.Variable(jnp.arange(6).reshape(3, 2))
  assert len(v) == 3
  rows = list(v)
  assert len(rows) == 3 and rows[2].tolist() == [4, 5]
  assert 2 in nnx.Variable([1, 2, 3])


def test_array_attributes_are_forwarded():
  v = nnx.Param(jnp.ones((2, 5), jnp.float32))
  assert v.shape == (2, 5) and v.dtype == jnp.float32 and v.ndim == 2 and v.size == 10
  assert v.T.shape == (5, 2)


def test_array_methods_are_forwarded():
  x = jnp.arange(6.0).reshape(2, 3)
  v = nnx.Variable(x)
  assert float(v.sum()) == 15.0 and float(v.mean()) == 2.5
  assert float(v.max()) == 5.0 and float(v.min()) == 0.0
  np.testing.assert_array_equal(v.sum(axis=0), x.sum(axis=0))
  assert v.reshape(3, 2).shape == (3, 2) and v.reshape(-1).shape == (6,)
  assert v.astype(jnp.int32).dtype == jnp.int32
  assert v.transpose().shape == (3, 2)
  np.testing.assert_array_equal(v.at[0, 0].set(9.0)[0, 0], 9.0)
  np.testing.assert_array_equal(v[...], x)  # methods return new arrays, the Variable is unchanged


def test_jnp_functions_accept_variables():
  x = jnp.array([0.0, 1.0, 2.0])
  v = nnx.Param(x)
  np.testing.assert_allclose(jnp.exp(v), jnp.exp(x))
  np.testing.assert_allclose(jnp.dot(v, v), jnp.dot(x, x))
  np.testing.assert_allclose(jnp.stack([v, v]), jnp.stack([x, x]))
  np.testing.assert_allclose(jax.nn.relu(v - 1), jax.nn.relu(x - 1))


def test_jitted_functions_accept_variables_as_array_arguments():
  v = nnx.Param(jnp.arange(3.0))
  out = jax.jit(lambda a: a * 2)(jnp.asarray(v))
  np.testing.assert_allclose(out, [0.0, 2.0, 4.0])


def test_numpy_conversion():
  v = nnx.Variable(jnp.arange(4.0))
  arr = np.asarray(v)
  assert isinstance(arr, np.ndarray) and arr.tolist() == [0.0, 1.0, 2.0, 3.0]
  assert np.asarray(v, dtype=np.int64).dtype == np.int64
  assert np.sum(v) == 6.0


def test_unknown_attribute_error_names_the_attribute_and_the_kind():
  v = nnx.Param(jnp.ones(2))
  with pytest.raises(AttributeError, match="'Param'.*'nonexistent'"):
    v.nonexistent


def test_variables_hash_by_identity():
  a, b = nnx.Param(jnp.ones(2)), nnx.Param(jnp.ones(2))
  assert len({a, b, a}) == 2


# -- metadata ------------------------------------------------------------------
def test_any_keyword_is_metadata_readable_as_attribute():
  p = nnx.Param(jnp.ones((2, 3)), tag='a', sharding_names=('b', None), custom=[1, 2])
  assert p.tag == 'a' and p.sharding_names == ('b', None) and p.custom == [1, 2]
  assert p.get_metadata() == {'tag': 'a', 'sharding_names': ('b', None), 'custom': [1, 2],
                              'hijax': False, 'ref': False, 'eager_sharding': True}
  assert p.get_metadata('tag') == 'a'
  assert p.get_metadata('missing', None) is None
  with pytest.raises(KeyError):
    p.get_metadata('missing')


def test_every_variable_has_the_required_metadata_and_can_leave_it_out():
  p = nnx.Param(jnp.ones(2), tag='a')
  assert {k: p.get_metadata(k) for k in ('hijax', 'ref', 'eager_sharding')} == {
      'hijax': False, 'ref': False, 'eager_sharding': True}
  assert p.get_metadata(exclude_required=True) == {'tag': 'a'}
  assert nnx.Variable.required_metadata == {'hijax', 'ref', 'eager_sharding'}
  assert p.has_metadata('tag') and not p.has_metadata('lr')
  with pytest.raises(TypeError, match='without a name'):
    p.get_metadata(default=1)


def test_set_metadata_by_keywords_by_name_and_value_or_by_a_whole_dict():
  p = nnx.Param(jnp.ones(2), tag='a', keep=1)
  p.set_metadata(tag='b', new=2)
  assert p.get_metadata(exclude_required=True) == {'tag': 'b', 'keep': 1, 'new': 2}
  p.set_metadata('lr', 0.5)
  assert p.lr == 0.5 and p.tag == 'b'
  # a whole dict replaces the entries; the required ones stay when it leaves them out
  p.set_metadata({'only': 3})
  assert p.get_metadata() == {'only': 3, 'hijax': False, 'ref': False, 'eager_sharding': True}
  p.set_metadata({'x': 1, 'hijax': False, 'ref': False, 'eager_sharding': True})
  assert p.get_metadata(exclude_required=True) == {'x': 1}


@pytest.mark.parametrize('call', [
    lambda p: p.set_metadata({'a': 1}, b=2),
    lambda p: p.set_metadata('a', 1, 2),
    lambda p: p.set_metadata(),
])
def test_set_metadata_rejects_other_argument_forms(call):
  with pytest.raises(TypeError, match='set_metadata'):
    call(nnx.Param(1.0))


@pytest.mark.parametrize('call', [
    lambda p: p.set_metadata(hijax=True),
    lambda p: p.set_metadata('ref', True),
    lambda p: p.set_metadata({'eager_sharding': False}),
])
def test_required_metadata_is_fixed_at_creation(call):
  p = nnx.Param(1.0)
  with pytest.raises(ValueError, match='Cannot change `(hijax|ref|eager_sharding)`'):
    call(p)
  assert p.get_metadata() == {'hijax': False, 'ref': False, 'eager_sharding': True}
  with pytest.raises(ValueError, match='Cannot delete `ref`'):
    p.del_metadata('ref')


def test_set_metadata_records_a_partition_spec_in_each_form():
  spec = jax.sharding.PartitionSpec
  v = nnx.Variable(jnp.array(1.0))
  v.set_metadata(out_sharding=spec(None))
  assert v.out_sharding == spec(None)
  v.set_metadata('out_sharding', spec('x'))
  assert v.get_metadata('out_sharding') == spec('x')
  v.set_metadata({'out_sharding': spec('y')})
  assert v.get_metadata('out_sharding') == spec('y')


def test_setting_metadata_of_an_outer_variable_inside_jit_raises_trace_context_error():
  p = nnx.Param(jnp.zeros(2))

  @jax.jit
  def f(x):
    p.set_metadata(tag='inner')
    return x

  with pytest.raises(nnx.TraceContextError, match='Param'):
    f(1.0)
  assert not p.has_metadata('tag')


# -- eager sharding default -----------------------------------------------------
def test_use_eager_sharding_default_is_recorded_by_each_new_variable():
  assert nnx.using_eager_sharding() is True
  with nnx.use_eager_sharding(False):
    assert nnx.using_eager_sharding() is False
    off = nnx.Param(jnp.ones(2))
    assert nnx.Param(jnp.ones(2), eager_sharding=True).eager_sharding is True
  assert off.eager_sharding is False and nnx.Param(1.0).eager_sharding is True

  @nnx.use_eager_sharding(False)
  def make():
    return nnx.Param(1.0)

  assert nnx.using_eager_sharding() is True  # decorating does not change the default
  assert make().eager_sharding is False and nnx.Param(1.0).eager_sharding is True


def test_a_variable_made_without_eager_sharding_keeps_its_annotation_only():
  with nnx.use_eager_sharding(False):
    v = nnx.Param(jnp.ones((2, 2)), out_sharding=('a', 'b'))  # no mesh needed: not placed
  assert v.out_sharding == ('a', 'b') and v.eager_sharding is False
  w = v.copy(jnp.zeros((2, 2)))
  assert w.eager_sharding is False  # copies keep what their original was made with


def test_attribute_assignment_is_refused_and_points_to_set_metadata():
  p = nnx.Param(jnp.ones(2), tag='a')
  for name in ('tag', 'brand_new'):  # existing metadata and a new name alike, as in NNX
    with pytest.raises(AttributeError, match=rf"'{name}'.*set_metadata\({name}=value\)"):
      setattr(p, name, 'z')
  assert p.get_metadata() == {'tag': 'a', 'hijax': False, 'ref': False, 'eager_sharding': True}
  with pytest.raises(AttributeError, match=r"del_metadata\('tag'\)"):
    del p.tag
  p.set_metadata(tag='z')
  p.value = jnp.zeros(2)  # `value` stays assignable
  assert p.tag == 'z' and float(p.sum()) == 0.0
  p.del_metadata('tag')
  with pytest.raises(AttributeError):
    p.tag


def test_subclass_properties_with_setters_stay_assignable():
  class Scaled(nnx.Variable):
    @property
    def doubled(self):
      return self[...] * 2

    @doubled.setter
    def doubled(self, x):
      self[...] = x / 2

  v = Scaled(jnp.ones(()))
  v.doubled = 8.0
  assert float(v[...]) == 4.0
  with pytest.raises(AttributeError, match='set_metadata'):
    v.other = 1


def test_metadata_does_not_leak_between_variables():
  a = nnx.Param(jnp.ones(1), tag='a')
  b = nnx.Param(jnp.ones(1), tag='a')
  a.set_metadata(tag='changed')
  assert b.tag == 'a'


def test_copies_keep_kind_metadata_and_value():
  p = Count(jnp.arange(3), tag='t')
  for c in (p.copy(), copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
    assert type(c) is Count and c is not p and c.tag == 't'
    np.testing.assert_array_equal(c[...], [0, 1, 2])
  c = p.copy(tag='u')
  assert c.tag == 'u' and p.tag == 't'
  r = p.replace(jnp.zeros(3))
  assert type(r) is Count and r.tag == 't' and r[...].tolist() == [0, 0, 0]
  assert p[...].tolist() == [0, 1, 2]
  n = p.copy(jnp.ones(2), tag='n')  # copy takes a new value too, like replace
  assert type(n) is Count and n.tag == 'n' and n[...].tolist() == [1, 1]
  s = p.to_state()
  assert type(s) is Count and s is not p and s.tag == 't'


def test_from_metadata_builds_a_variable_from_value_and_full_metadata():
  p = nnx.Param(jnp.ones(2), tag='a')
  q = nnx.Param.from_metadata(jnp.zeros(2), p.get_metadata())
  assert type(q) is nnx.Param and q.get_metadata() == p.get_metadata()
  assert q[...].tolist() == [0, 0]


def test_copy_from_and_update_from_state_take_value_and_metadata():
  a, b = nnx.Param(jnp.zeros(2), tag='a'), nnx.Param(jnp.ones(2), tag='b')
  a.copy_from(b)
  assert a.tag == 'b' and a[...].tolist() == [1, 1] and a is not b
  with pytest.raises(ValueError, match='expected Param, got BatchStat'):
    a.copy_from(nnx.BatchStat(jnp.ones(2)))
  c = nnx.Param(jnp.zeros(2))
  c.update_from_state(nnx.Param(jnp.full(2, 3.0), tag='s'))
  assert c.tag == 's' and c[...].tolist() == [3, 3]


def test_copy_is_independent_of_the_original():
  p = nnx.Param(jnp.zeros(2))
  c = p.copy()
  c[...] = jnp.ones(2)
  np.testing.assert_array_equal(p[...], np.zeros(2))
  d = copy.deepcopy(nnx.Variable([1, 2]))
  d[0] = 5
  assert d[...] == [5, 2]


# -- type annotations, calls, item deletion ---------------------------------------
@pytest.mark.parametrize('kind', KINDS + [Count, nnx.RngKey])
def test_every_kind_can_be_subscripted_as_an_annotation(kind):
  alias = kind[jax.Array]
  assert tp.get_origin(alias) is kind and tp.get_args(alias) == (jax.Array,)
  v = kind(jnp.ones(2))
  assert isinstance(v, kind) and type(v) is kind  # the kind itself is unchanged

  def f(x: kind[jax.Array]) -> kind[jax.Array]:
    return x
  assert f(v) is v


def test_a_subclass_of_a_subscripted_kind_is_a_plain_kind():
  class Weight(nnx.Param[jax.Array]):
    pass
  assert Weight.__mro__[1] is nnx.Param
  w = Weight(jnp.ones(2), tag='w')
  q = jax.tree.map(lambda x: x * 2, w)  # a registered pytree node like any other kind
  assert type(q) is Weight and q.tag == 'w' and q[...].tolist() == [2, 2]


def test_calling_a_variable_calls_its_value():
  class Scale(tp.NamedTuple):
    factor: int

    def __call__(self, x):
      return self.factor * x

  v = nnx.Param(Scale(4))
  assert v(3) == 12
  assert nnx.Variable(lambda a, b=1: a + b)(1, b=5) == 6
  with pytest.raises(TypeError, match='not callable'):
    nnx.Param(jnp.ones(2))()


def test_deleting_an_item_removes_it_from_the_value():
  v = nnx.Variable({'a': 1, 'b': 2})
  del v['a']
  assert v[...] == {'b': 2}
  w = nnx.Variable([1, 2, 3])
  del w[0]
  assert w[...] == [2, 3]


def test_shape_and_var_type():
  v = nnx.BatchStat(jnp.ones((2, 3)))
  assert v.shape == (2, 3) and v.var_type is nnx.BatchStat and v.type is nnx.BatchStat


# -- pytree --------------------------------------------------------------------
def test_variable_is_a_pytree_node_with_one_child_named_value():
  p = nnx.Param(jnp.ones(2), tag='a')
  leaves_with_path = jax.tree.leaves_with_path(p)
  assert len(leaves_with_path) == 1
  path, leaf = leaves_with_path[0]
  assert jax.tree_util.keystr(path) == '.value'
  assert isinstance(leaf, jax.Array)


def test_tree_map_gives_same_kind_and_metadata():
  p = Count(jnp.array([1.0, 2.0]), tag='t', other=(1, 2))
  q = jax.tree.map(lambda x: x * 10, p)
  assert type(q) is Count and q is not p
  assert q.get_metadata() == p.get_metadata()
  np.testing.assert_array_equal(q[...], [10.0, 20.0])
  np.testing.assert_array_equal(p[...], [1.0, 2.0])


def test_treedef_includes_kind_and_metadata():
  s = jax.tree.structure
  assert s(nnx.Param(1.0, tag='a')) == s(nnx.Param(2.0, tag='a'))
  assert s(nnx.Param(1.0, tag='a')) != s(nnx.Param(1.0, tag='b'))
  assert s(nnx.Param(1.0)) != s(nnx.BatchStat(1.0))


def test_model_paths_end_in_value():
  class Model(nnx.Pytree):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(Model())]
  assert paths == ['.w.value']


def test_jit_over_a_variable_returns_a_variable_of_the_same_kind():
  p = nnx.Param(jnp.ones(2), tag='a')
  out = jax.jit(lambda v: jax.tree.map(lambda x: x + 1, v))(p)
  assert type(out) is nnx.Param and out.tag == 'a'
  np.testing.assert_array_equal(out[...], np.full(2, 2.0))


def test_writing_an_outer_variable_inside_jit_raises_trace_context_error():
  p = nnx.Param(jnp.zeros(2))

  @jax.jit
  def f(x):
    p[...] = x
    return x

  with pytest.raises(nnx.TraceContextError, match='Param'):
    f(jnp.ones(2))
  np.testing.assert_array_equal(p[...], np.zeros(2))


# -- var_defaults / hijax flag -------------------------------------------------
def test_hijax_and_ref_flags_are_accepted_and_recorded():
  assert nnx.Variable(1, hijax=False).hijax is False
  assert nnx.Variable(1).ref is False
  v = nnx.Variable(1, hijax=True)
  assert v.hijax is True and v.get_metadata('hijax') is True


def test_var_defaults_context_manager_sets_and_restores():
  assert nnx.var_defaults().hijax is False
  with nnx.var_defaults(hijax=True):
    assert nnx.var_defaults().hijax is True
    assert nnx.Param(jnp.ones(1)).hijax is True
    assert nnx.Param(jnp.ones(1), hijax=False).hijax is False
  assert nnx.Param(jnp.ones(1)).hijax is False
  assert nnx.var_defaults().hijax is False


def test_var_defaults_without_arguments_is_a_snapshot_mapping():
  snap = nnx.var_defaults()
  assert isinstance(snap, nnx.variablelib.VarDefaults)
  assert dict(snap) == {'hijax': False, 'ref': False}
  assert list(snap) == ['hijax', 'ref'] and len(snap) == 2 and 'ref' in snap
  assert snap['ref'] is snap.ref is False
  with pytest.raises(KeyError):
    snap['eager_sharding']
  with nnx.var_defaults(ref=True):
    inside = nnx.var_defaults()
  assert inside.ref is True and snap.ref is False  # each call is a frozen copy
  with pytest.raises(AttributeError):
    snap.ref = True


def test_var_defaults_nest_and_change_only_what_they_name():
  with nnx.var_defaults(hijax=True):
    with nnx.var_defaults(ref=True):
      assert dict(nnx.var_defaults()) == {'hijax': True, 'ref': True}
      with nnx.var_defaults(hijax=False):
        assert dict(nnx.var_defaults()) == {'hijax': False, 'ref': True}
      assert nnx.var_defaults().hijax is True
    assert dict(nnx.var_defaults()) == {'hijax': True, 'ref': False}
  assert dict(nnx.var_defaults()) == {'hijax': False, 'ref': False}


def test_var_defaults_as_a_decorator_applies_only_during_the_call():
  @nnx.var_defaults(ref=True)
  def make():
    return nnx.var_defaults(), nnx.Param(jnp.ones(1))

  assert nnx.var_defaults().ref is False  # decorating changed nothing
  seen, p = make()
  assert seen.ref is True and p.ref is True
  assert nnx.var_defaults().ref is False and nnx.Param(1.0).ref is False


def test_perturbation_is_a_kind_of_intermediate():
  class M(nnx.Module):
    def __init__(self):
      self.sown = nnx.Intermediate(jnp.ones(1))
      self.pert = nnx.Perturbation(jnp.zeros(1))
      self.w = nnx.Param(jnp.ones(1))

  assert issubclass(nnx.Perturbation, nnx.Intermediate)
  assert set(nnx.state(M(), nnx.Intermediate)) == {'sown', 'pert'}
  assert set(nnx.state(M(), nnx.Perturbation)) == {'pert'}


def test_the_value_type_variable_a_parametrizes_variable_subclasses():
  class EnvState(nnx.Variable[nnx.A]):
    pass

  assert isinstance(nnx.A, tp.TypeVar)
  s = EnvState(jnp.zeros(2))
  assert isinstance(s, nnx.Variable) and type(s) is EnvState
  leaves, treedef = jax.tree.flatten(s)  # a pytree like every kind
  assert type(jax.tree.unflatten(treedef, leaves)) is EnvState
  assert EnvState[jax.Array].__origin__ is EnvState


def test_variable_state_is_a_deprecated_alias_of_variable():
  with pytest.warns(DeprecationWarning, match='Variable'):
    alias = nnx.VariableState
  assert alias is nnx.Variable
  with pytest.raises(AttributeError, match='VariableStat'):
    nnx.VariableStat  # other unknown names still raise


def test_variable_metadata_bundles_a_value_with_hooks_and_metadata():
  meta = nnx.VariableMetadata(jnp.ones(2), metadata={'sharding': ('x',)})
  assert meta.on_set_value == () and meta.metadata == {'sharding': ('x',)}
  np.testing.assert_array_equal(meta.raw_value, np.ones(2))
  assert nnx.VariableMetadata(1).metadata is not nnx.VariableMetadata(2).metadata


def test_is_array_ref_tells_refs_from_arrays_concrete_or_traced():
  is_ref = nnx.variablelib.is_array_ref
  r = jax.new_ref(jnp.zeros(2))
  assert is_ref(r)
  assert not is_ref(jnp.zeros(2)) and not is_ref(np.zeros(2)) and not is_ref(1.0)
  assert not is_ref(nnx.Param(1.0, ref=True))  # a Variable is not itself a Ref ...
  assert is_ref(nnx.Param(1.0, ref=True).get_raw_value())  # ... it holds one
  seen = []
  jax.jit(lambda r, x: seen.append((is_ref(r), is_ref(x))))(r, jnp.ones(1))
  assert seen == [(True, False)]


# -- repr ----------------------------------------------------------------------
def test_repr_shows_count_bytes_value_and_metadata():
  text = repr(nnx.Param(jnp.ones((2, 5)), tag='k'))
  lines = text.splitlines()
  assert lines[0] == 'Param( # 10 (40 B)'
  assert lines[1] == '  value=Array([[1., 1., 1., 1., 1.],'  # in full at the top, as NNX
  assert lines[-2:] == ["  tag='k'", ')']


def test_repr_inside_a_model_abbreviates_arrays():
  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 5)))
  lines = repr(Model()).splitlines()
  assert lines[1:4] == ['  w=Param( # 10 (40 B)',
                        "    value=Array(shape=(2, 5), dtype=dtype('float32'))", '  )']


def test_repr_of_scalar_shows_the_value_and_hides_default_flags():
  text = repr(nnx.Variable(jnp.array(3)))
  assert text.splitlines()[0] == 'Variable( # 1 (4 B)'
  assert 'value=Array(3, dtype=int32' in text and 'hijax' not in text
  assert 'hijax=True' in repr(nnx.Variable(jnp.ones(2), hijax=True))


# -- collection names <-> Variable types --
def test_variable_name_type_round_trip():
  assert nnx.variable_name_from_type(nnx.Param) == 'params'
  assert nnx.variable_type_from_name('batch_stats') is nnx.BatchStat
  class Unknown(nnx.Variable):
    pass
  with pytest.raises(ValueError, match='not registered'):
    nnx.variable_name_from_type(Unknown)
  assert nnx.variable_name_from_type(Unknown, allow_register=True) == 'Unknown'
  assert nnx.variable_type_from_name('Unknown') is Unknown
  with pytest.raises(ValueError, match='zzz_unknown'):
    nnx.variable_type_from_name('zzz_unknown')


def test_variable_type_from_name_creates_subclass_of_base():
  t = nnx.variable_type_from_name('yyy_stats', base=nnx.Param, allow_register=True)
  assert issubclass(t, nnx.Param) and t.__name__ == 'yyy_stats'
  assert nnx.variable_name_from_type(t) == 'yyy_stats'
  assert jax.tree.leaves(t(3)) == [3]


def test_register_variable_name_decorator_and_overwrite():
  @nnx.register_variable_name('qq_coll')
  class Q(nnx.Variable):
    pass
  assert nnx.variable_type_from_name('qq_coll') is Q
  class R(nnx.Variable):
    pass
  with pytest.raises(ValueError, match='qq_coll'):
    nnx.register_variable_name('qq_coll', R)
  assert nnx.register_variable_name('qq_coll', R, overwrite=True) is R
  assert nnx.variable_type_from_name('qq_coll') is R


def test_ellipsis_assignment_keeps_shape_and_dtype_like_nnx():
  v = nnx.Param(jnp.ones(2))
  v[...] = 3
  np.testing.assert_array_equal(v[...], [3.0, 3.0])
  assert v[...].dtype == jnp.float32
  same = jnp.full((2,), 4.0)
  v[...] = same
  assert v[...] is same          # an array of the same shape and dtype is taken as it is
  with pytest.raises(ValueError):
    v[...] = jnp.ones(5)         # a shape change needs `v.value = ...`
  v.value = jnp.ones(5)
  assert v.shape == (5,)


def test_a_subclass_get_value_is_seen_by_item_and_value_reads():
  class Shifted(nnx.Param):
    def get_value(self, **kwargs):
      return super().get_value(**kwargs) + 3

  v = Shifted(jnp.arange(3))
  assert v[...].tolist() == [3, 4, 5] and int(v[1]) == 4 and v.value.tolist() == [3, 4, 5]
  assert v.get_raw_value().tolist() == [0, 1, 2]  # the stored value is untouched
  assert nnx.Param(jnp.arange(3))[...].tolist() == [0, 1, 2]
