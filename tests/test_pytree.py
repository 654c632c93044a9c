"""Pytree: attribute classification, tree behaviour, markers, misuse errors, dataclass, List, Dict."""
import functools
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx


def keystrs(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(tree)]


class Mixed(nnx.Pytree):
  def __init__(self):
    self.n = 3
    self.name = 'x'
    self.fn = jnp.sin
    self.dt = jnp.float32
    self.np_scalar = np.float32(2.0)
    self.nothing = None
    self.w = nnx.Param(jnp.ones(2))
    self.arr = jnp.zeros(3)
    self.np_arr = np.ones(2)
    self.items = [nnx.Param(jnp.ones(1)), 2]
    self.pair = (nnx.BatchStat(jnp.zeros(1)), None)
    self.table = {'a': jnp.ones(1)}
    self.plain_list = [1, 2]
    self.plain_dict = {'k': 'v'}


# -- classification ------------------------------------------------------------
def test_attributes_are_classified_when_set():
  kinds = {k: is_data for k, _, is_data in nnx.pytree.attributes(Mixed())}
  assert kinds == {'n': False, 'name': False, 'fn': False, 'dt': False, 'np_scalar': False,
                   'nothing': False, 'w': True, 'arr': True, 'np_arr': True, 'items': True,
                   'pair': True, 'table': True, 'plain_list': False, 'plain_dict': False}


def test_leaves_and_paths_cover_exactly_the_data():
  assert keystrs(Mixed()) == ['.arr', '.items[0].value', '.np_arr', '.pair[0].value',
                              '.table.a', '.w.value']


def test_lists_and_dicts_holding_data_become_nnx_containers():
  m = Mixed()
  assert isinstance(m.items, nnx.List) and isinstance(m.table, nnx.Dict)
  assert type(m.plain_list) is list and type(m.plain_dict) is dict
  assert type(m.pair) is tuple


def test_tree_map_returns_new_object_of_same_class_with_static_attributes():
  m = Mixed()
  out = jax.tree.map(lambda x: x + 1, m)
  assert type(out) is Mixed and out is not m
  assert (out.n, out.name, out.fn, out.dt, out.plain_list) == (3, 'x', jnp.sin, jnp.float32, [1, 2])
  np.testing.assert_array_equal(out.w[...], [2.0, 2.0])
  np.testing.assert_array_equal(out.arr, [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(m.w[...], [1.0, 1.0])  # the original is untouched
  assert type(out.w) is nnx.Param and type(out.pair[0]) is nnx.BatchStat


def test_equal_structures_have_equal_treedefs_and_hit_the_jit_cache():
  assert jax.tree.structure(Mixed()) == jax.tree.structure(Mixed())
  traces = []

  @jax.jit
  def f(m):
    traces.append(1)
    return m.w[...] * m.n

  f(Mixed())
  f(Mixed())
  assert len(traces) == 1
  other = Mixed()
  other.n = 4  # static change: a new treedef, a new trace
  np.testing.assert_array_equal(f(other), [4.0, 4.0])
  assert len(traces) == 2


def test_treedef_changes_when_structure_changes():
  m = Mixed()
  before = jax.tree.structure(m)
  m.extra = nnx.Param(jnp.ones(1))
  assert jax.tree.structure(m) != before
  del m.extra
  assert jax.tree.structure(m) == before


def test_reassignment_reclassifies():
  class P(nnx.Pytree):
    def __init__(self):
      self.x = None
      self.x = jnp.ones(2)
  p = P()
  assert len(jax.tree.leaves(p)) == 1
  p.x = 5
  assert jax.tree.leaves(p) == []


def test_unflatten_does_not_call_init():
  calls = []

  class P(nnx.Pytree):
    def __init__(self):
      calls.append(1)
      self.w = nnx.Param(jnp.ones(1))

  p = P()
  leaves, treedef = jax.tree.flatten(p)
  q = jax.tree.unflatten(treedef, leaves)
  assert calls == [1] and type(q) is P


class Picklable(nnx.Pytree):
  def __init__(self):
    self.n = 3
    self.w = nnx.Param(jnp.arange(2.0), tag='t')
    self.items = [nnx.BatchStat(jnp.ones(1))]


def test_pickle_round_trip():
  m = pickle.loads(pickle.dumps(Picklable()))
  assert keystrs(m) == ['.items[0].value', '.w.value'] and m.n == 3 and m.w.tag == 't'
  np.testing.assert_array_equal(m.w[...], [0.0, 1.0])
  assert jax.tree.structure(m) == jax.tree.structure(Picklable())


# -- markers -------------------------------------------------------------------
def test_data_and_static_markers_force_the_class():
  class P(nnx.Pytree):
    def __init__(self):
      self.count = nnx.data(3)
      self.shape = nnx.static((1, 2))
      self.cfg = nnx.static({'a': 1})
  p = P()
  assert jax.tree.leaves(p) == [3]
  assert p.shape == (1, 2) and p.cfg == {'a': 1}
  assert jax.tree.map(lambda x: x * 2, p).count == 6


def test_array_on_a_static_marked_attribute_is_an_error_naming_it():
  class P(nnx.Pytree):
    def __init__(self):
      self.table = nnx.static({'w': [1, jnp.ones(2)]})
  with pytest.raises(ValueError, match=r"\['w'\]\[1\].*static attribute 'table' of P.*nnx\.data"):
    P()


def test_variable_on_a_static_annotated_attribute_is_an_error():
  class P(nnx.Pytree):
    w: int = nnx.static()

    def __init__(self):
      self.w = nnx.Param(jnp.ones(1))
  with pytest.raises(ValueError, match="'w'"):
    P()


@pytest.mark.parametrize('make_value,where', [
    (lambda p: {p}, 'element'),
    (lambda p: functools.partial(print, p), r'\.args\[0\]'),
    (lambda p: functools.partial(print, key=p), r"\.keywords\['key'\]"),
    (lambda p: type('Holder', (), {})().__setattr__('inner', p) or None, None),
])
def test_variables_hidden_in_opaque_static_values_are_an_error(make_value, where):
  if where is None:  # a plain object holding a Variable
    holder = type('Holder', (), {})()
    holder.inner = nnx.Param(jnp.ones(1))
    value, where = holder, r'\.inner'
  else:
    value = make_value(nnx.Param(jnp.ones(1)))

  class P(nnx.Pytree):
    def __init__(self):
      self.hidden = value
  with pytest.raises(ValueError, match=rf"'hidden' of P.*{where}.*lost"):
    P()


def test_bound_method_of_another_pytree_is_an_error_but_of_self_is_fine():
  class Inner(nnx.Pytree):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(1))

    def get(self):
      return self.w[...]

  class Outer(nnx.Pytree):
    def __init__(self, borrow):
      self.inner = Inner()
      self.fn = self.inner.get if borrow else self.helper

    def helper(self):
      return 1

  assert Outer(False).fn() == 1
  with pytest.raises(ValueError, match=r"'fn' of Outer.*__self__.*Inner"):
    Outer(True)


def test_static_marker_allows_freezing_opaque_values_on_purpose():
  class P(nnx.Pytree):
    def __init__(self):
      self.frozen = nnx.static(functools.partial(print, 1))
  assert jax.tree.leaves(P()) == []


def test_plain_python_config_objects_stay_static():
  class Config:
    def __init__(self):
      self.size = 3

  class P(nnx.Pytree):
    def __init__(self):
      self.cfg = Config()
  p = P()
  assert jax.tree.leaves(p) == [] and p.cfg.size == 3


def test_pytree_false_opts_out_of_registration():
  class Opaque(nnx.Pytree, pytree=False):
    def __init__(self):
      self.x = jnp.ones(2)
  o = Opaque()
  assert jax.tree.leaves(o) == [o]


# -- dataclass -----------------------------------------------------------------
def test_dataclass_fields_by_annotation_and_markers():
  @nnx.dataclass
  class Point(nnx.Pytree):
    w: nnx.Param
    arr: jax.Array
    n: int
    forced: int = nnx.data(default=1)
    label: tuple = nnx.static(default=('a',))

  p = Point(nnx.Param(jnp.ones(2)), jnp.zeros(1), 3)
  assert keystrs(p) == ['.arr', '.forced', '.w.value']
  assert p.n == 3 and p.label == ('a',)
  q = jax.tree.map(lambda x: x + 1, p)
  assert type(q) is Point and q.forced == 2 and q.n == 3


def test_dataclass_static_field_rejects_arrays():
  @nnx.dataclass
  class P(nnx.Pytree):
    a: int = nnx.static()

  with pytest.raises(ValueError, match="'a'"):
    P(jnp.ones(1))


def test_dataclass_module_with_shared_variables():
  @nnx.dataclass
  class Foo(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  p = nnx.Param(jnp.array(1.0))
  foo = Foo(p, p)
  assert foo.a is foo.b and keystrs(foo) == ['.a.value', '.b.value']


# -- List ----------------------------------------------------------------------
def test_list_behaves_like_a_list():
  lst = nnx.List([1, nnx.Param(jnp.ones(1))])
  assert len(lst) == 2 and lst[0] == 1 and isinstance(lst[-1], nnx.Param)
  lst.append(nnx.Param(jnp.zeros(1)))
  lst.insert(0, 'head')
  assert len(lst) == 4 and lst[0] == 'head'
  assert lst.pop(0) == 'head' and len(lst) == 3
  lst[0] = 7
  assert list(lst)[0] == 7 and lst[:1] == [7]
  del lst[0]
  assert len(lst) == 2 and all(isinstance(x, nnx.Param) for x in lst)
  lst.extend([3])
  assert lst[2] == 3 and 3 in lst and lst.index(3) == 2
  with pytest.raises(IndexError):
    lst[10]


def test_list_paths_use_indices_and_skip_static_items():
  lst = nnx.List([1, nnx.Param(jnp.ones(1)), jnp.zeros(1)])
  assert keystrs(lst) == ['[1].value', '[2]']
  out = jax.tree.map(lambda x: x + 1, lst)
  assert type(out) is nnx.List and out[0] == 1 and float(out[2][0]) == 1.0


def test_list_mutation_changes_treedef():
  lst = nnx.List([nnx.Param(jnp.ones(1))])
  before = jax.tree.structure(lst)
  lst.append(nnx.Param(jnp.ones(1)))
  assert jax.tree.structure(lst) != before


# -- Dict ----------------------------------------------------------------------
def test_dict_behaves_like_a_dict_and_reads_as_attributes():
  d = nnx.Dict(a=nnx.Param(jnp.ones(1)), b=3)
  assert d['b'] == 3 and d.b == 3 and isinstance(d.a, nnx.Param)
  assert set(d) == {'a', 'b'} and len(d) == 2 and 'a' in d
  assert d.get('zz', 9) == 9
  d['c'] = jnp.zeros(2)
  d.update(e=4)
  assert sorted(d.keys()) == ['a', 'b', 'c', 'e']
  assert d.pop('e') == 4 and 'e' not in d
  del d['c']
  with pytest.raises(KeyError):
    d['c']
  with pytest.raises(KeyError):
    del d['c']
  with pytest.raises(AttributeError, match="'missing'"):
    d.missing


def test_dict_paths_are_attribute_keys_like_nnx():
  d = nnx.Dict({'a': nnx.Param(jnp.ones(1)), 'b': 3, 'c': jnp.zeros(1)})
  assert keystrs(d) == ['.a.value', '.c']
  out = jax.tree.map(lambda x: x * 0, d)
  assert type(out) is nnx.Dict and out['b'] == 3


# -- nested --------------------------------------------------------------------
def test_nested_pytrees_flatten_and_rebuild():
  class Inner(nnx.Pytree):
    def __init__(self, k):
      self.k = k
      self.w = nnx.Param(jnp.full(2, float(k)))

  class Outer(nnx.Pytree):
    def __init__(self):
      self.layers = [Inner(i) for i in range(3)]
      self.head = Inner(9)

  o = Outer()
  assert keystrs(o) == ['.head.w.value', '.layers[0].w.value', '.layers[1].w.value',
                        '.layers[2].w.value']
  out = jax.tree.map(lambda x: -x, o)
  assert [l.k for l in out.layers] == [0, 1, 2]
  np.testing.assert_array_equal(out.layers[2].w[...], [-2.0, -2.0])


def test_repr_shows_per_kind_counts_and_bytes():
  class P(nnx.Pytree):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 5)))
      self.s = nnx.BatchStat(jnp.zeros(2))
      self.n = 3

  text = repr(P())
  assert text.splitlines()[0] == 'P( # BatchStat: 2 (8 B), Param: 10 (40 B), Total: 12 (48 B)' or \
      text.splitlines()[0] == 'P( # Param: 10 (40 B), BatchStat: 2 (8 B), Total: 12 (48 B)'
  assert '  n=3' in text and 'w=Param( # 10 (40 B)' in text


# -- Data / Static annotations, is_data / has_data, register_data_type, check_pytree, Object --
def test_data_and_static_annotations_classify_attributes():
  class A(nnx.Pytree):
    x: nnx.Data[int]
    y: nnx.Static[str]

    def __init__(self):
      self.x, self.y, self.z = 1, 'hi', 3

  assert jax.tree.leaves(A()) == [1]

  @nnx.dataclass
  class B(nnx.Pytree):
    a: nnx.Data[int]
    b: int

  assert jax.tree.leaves(B(5, 6)) == [5]


def test_static_annotation_rejects_arrays():
  class A(nnx.Pytree):
    y: nnx.Static[jax.Array]

    def __init__(self):
      self.y = jnp.ones(2)

  with pytest.raises(ValueError, match="'y'"):
    A()


def test_is_data_and_has_data():
  assert nnx.is_data(jnp.zeros(1)) and nnx.is_data(nnx.Param(1)) and nnx.is_data(nnx.Rngs(0))
  assert not nnx.is_data('hi') and not nnx.is_data(42)
  assert not nnx.is_data([jnp.ones(1)])  # containers are not data themselves
  a, p = jnp.ones(1), nnx.Param(2)
  found = nnx.has_data([1, a, {'k': p}])
  assert len(found) == 2 and found[0] is a and found[1] is p
  assert nnx.has_data((1, 'a')) == []
  lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  assert nnx.has_data({'m': lin}) == [lin]  # a Pytree counts as one value


def test_register_data_type_makes_values_leaves():
  import dataclasses

  @nnx.register_data_type
  @dataclasses.dataclass(frozen=True)
  class Tag:
    v: int

  class Holder(nnx.Pytree):
    def __init__(self):
      self.a = Tag(1)
      self.b = 'static'

  assert nnx.is_data(Tag(3))
  assert jax.tree.leaves(Holder()) == [Tag(1)]


def test_check_pytree_finds_data_hidden_by_in_place_mutation():
  class Cfg(nnx.Pytree):
    def __init__(self):
      self.cfg = {'n': 1}

  c = Cfg()
  assert nnx.check_pytree(c) is None
  c.cfg['w'] = jnp.ones(1)  # mutation assignment checks cannot see
  with pytest.raises(ValueError, match="'cfg'"):
    nnx.check_pytree(c)
  with pytest.raises(TypeError, match='Expected a Pytree'):
    nnx.check_pytree([1])


def test_object_subclasses_are_single_leaves():
  class O(nnx.Object):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))

  o = O()
  assert isinstance(o, nnx.Pytree)
  assert jax.tree.leaves(o) == [o]
