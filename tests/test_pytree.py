"""Pytree: attribute classification, tree behaviour, markers, misuse errors, dataclass, List, Dict,
structural changes (through the API or behind it), copies and trace ownership."""
import copy
import dataclasses
import functools
import pickle
import time

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
    self.items = nnx.List([nnx.Param(jnp.ones(1)), 2])
    self.pair = nnx.data((nnx.BatchStat(jnp.zeros(1)), None))
    self.table = nnx.Dict({'a': jnp.ones(1)})
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


def test_containers_are_kept_as_given():
  m = Mixed()
  assert isinstance(m.items, nnx.List) and isinstance(m.table, nnx.Dict)
  assert type(m.plain_list) is list and type(m.plain_dict) is dict
  assert type(m.pair) is tuple  # nnx.data keeps the value itself, only its class changes


class Empty(nnx.Pytree):
  pass


@pytest.mark.parametrize('value,where,found', [
    (lambda: [nnx.Param(jnp.ones(1))], r'self\.a\[0\]', 'Param'),
    (lambda: (1, jnp.ones(2)), r'self\.a\[1\]', 'ArrayImpl'),
    (lambda: {'w': {'k': nnx.Linear(1, 1, rngs=nnx.Rngs(0))}}, r"self\.a\['w'\]\['k'\]", 'Linear'),
    (lambda: [nnx.List([1])], r'self\.a\[0\]', 'List'),
    (lambda: nnx.State({'b': nnx.Param(1)}), r"self\.a\['b'\]", 'Param'),
])
def test_a_plain_container_holding_data_is_refused_naming_the_data_and_the_fix(value, where,
                                                                                 found):
  e = Empty()
  with pytest.raises(ValueError, match=rf"^Found data on value of type .* static attribute 'a' "
                                       rf".*the {found} at {where} is data.*nnx\.List.*nnx\.data"):
    e.a = value()
  assert 'a' not in vars(e)
  e.a = nnx.data(value())  # the fix: data, the container kept as it is
  assert nnx.pytree.attributes(e) == [('a', e.a, True)] and type(e.a) is type(value())


def test_a_list_of_layers_goes_in_an_nnx_list():
  class Stack(nnx.Module):
    def __init__(self, plain):
      layers = [nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(2)]
      self.layers = layers if plain else nnx.List(layers)

  with pytest.raises(ValueError, match=r"'layers'.*the Linear at self\.layers\[0\].*nnx\.List"):
    Stack(plain=True)
  assert keystrs(Stack(plain=False))[:2] == ['.layers[0].bias.value', '.layers[0].kernel.value']


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


def test_the_first_assignment_decides_and_the_class_sticks():
  p = Empty()
  p.x = jnp.ones(2)
  p.x = 'hello'  # data stays data, whatever it holds
  assert jax.tree.leaves(p) == ['hello']
  p.x = [1, jnp.ones(1)]  # even a plain list of data
  assert len(jax.tree.leaves(p)) == 2
  p.y = None
  with pytest.raises(ValueError, match=r"^Cannot assign data value of type .*Linear.* to static "
                                       r"attribute 'y' .*self\.y = nnx\.data"):
    p.y = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
  assert p.y is None
  with pytest.raises(ValueError, match=r"^Found data on value of type .*list.* static attribute 'y'"):
    p.y = [jnp.ones(1)]
  p.y = 7  # static values are fine


def test_a_static_attribute_set_to_data_in_init_is_refused():
  class P(nnx.Pytree):
    def __init__(self):
      self.bias = None
      self.bias = nnx.Param(jnp.zeros(2))

  with pytest.raises(ValueError, match=r"Cannot assign data value .*Param.* 'bias'"):
    P()


def test_markers_override_the_class_and_del_forgets_it():
  p = Empty()
  p.x = jnp.ones(2)
  p.x = nnx.static(3)  # data -> static, on purpose
  assert jax.tree.leaves(p) == []
  p.x = nnx.data(4)  # static -> data
  assert jax.tree.leaves(p) == [4]
  p.y = 'a'
  del p.y
  p.y = nnx.Param(jnp.ones(1))  # a fresh attribute again: data
  assert len(jax.tree.leaves(p)) == 2


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
    self.items = nnx.List([nnx.BatchStat(jnp.ones(1))])


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
  with pytest.raises(ValueError, match=r"^Found data in value of type .* annotated with nnx\.static.*"
                                       r"attribute 'table' of .*P'>': the ArrayImpl at "
                                       r"self\.table\['w'\]\[1\] is data.*nnx\.data"):
    P()


@pytest.mark.parametrize('value,tags', [
    (lambda: [nnx.data(1)], "{'data'}"),
    (lambda: {'a': (nnx.static(1), nnx.data(2))}, "{'data', 'static'}"),
    (lambda: nnx.data([nnx.static('x')]), "{'static'}"),
])
def test_markers_inside_containers_are_refused(value, tags):
  p = Empty()
  with pytest.raises(ValueError, match=rf"^Found unexpected tags {tags} on attribute 'Empty\.x'"
                                       r".*directly"):
    p.x = value()
  assert 'x' not in vars(p)


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


def test_dataclass_fields_follow_the_attribute_rules():
  @nnx.dataclass
  class Plain(nnx.Module):
    filters: list

  @dataclasses.dataclass
  class Annotated(nnx.Pytree):
    a: nnx.Data[int]
    b: nnx.Static[int]

  with pytest.raises(ValueError, match=r"^Found data on value of type .*list.* 'filters'"):
    Plain([nnx.Variable(1)])
  assert jax.tree.leaves(Plain([1, 2])) == []
  x = Annotated(1, 2)
  assert jax.tree.leaves(x) == [1]
  x.a = nnx.static(3)  # the annotation only decides the first assignment
  x.b = nnx.data(4)
  assert jax.tree.leaves(x) == [4]
  with pytest.raises(ValueError, match=r"^Found data on value of type .*list.* 'a'"):
    x.a = ['hi', jnp.ones(1)]


def test_pytree_false_classes_have_no_attribute_rules():
  class Free(nnx.Module, pytree=False):
    def __init__(self):
      self.layers = [nnx.Linear(1, 1, rngs=nnx.Rngs(0))]  # a plain list, kept as is
      self.x = None
      self.x = nnx.Param(jnp.ones(1))
      self.later = []
      self.later.append(nnx.Param(jnp.zeros(1)))

  f = Free()
  assert type(f.layers) is list
  assert set(nnx.state(f)) == {'layers', 'x', 'later'}


def test_dataclass_module_with_shared_variables():
  @nnx.dataclass
  class Foo(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  p = nnx.Param(jnp.array(1.0))
  foo = Foo(p, p)
  assert foo.a is foo.b and keystrs(foo) == ['.a.value', '.b.value']


# -- List ----------------------------------------------------------------------
def test_list_and_dict_items_follow_the_attribute_rules():
  with pytest.raises(ValueError, match=r"static attribute '1' .*the ArrayImpl at self\[1\]\[0\]"):
    nnx.List([1, [jnp.ones(1)]])
  xs = nnx.List([nnx.data([jnp.ones(1)]), nnx.List([jnp.ones(2)])])  # marked, or nested nnx.List
  assert len(jax.tree.leaves(xs)) == 2 and type(xs[0]) is list
  with pytest.raises(ValueError, match=r"static attribute 'a' .*self\.a\['b'\]"):
    nnx.Dict(a={'b': jnp.ones(1)})
  d = nnx.Dict(a=1)
  with pytest.raises(ValueError, match=r"^Cannot assign data value .* 'a'"):
    d['a'] = jnp.ones(1)


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
      self.layers = nnx.List([Inner(i) for i in range(3)])
      self.head = Inner(9)

  o = Outer()
  assert keystrs(o) == ['.head.w.value', '.layers[0].w.value', '.layers[1].w.value',
                        '.layers[2].w.value']
  out = jax.tree.map(lambda x: -x, o)
  assert [layer.k for layer in out.layers] == [0, 1, 2]
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
  class Obj(nnx.Object):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(2))

  o = Obj()
  assert isinstance(o, nnx.Pytree)
  assert jax.tree.leaves(o) == [o]


# -- structural changes: every way one happens is seen ------------------------------
class Scaled(nnx.Module):
  def __init__(self, n_layers=1, scale=2.0):
    self.layers = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(n_layers)])
    self.scale = scale

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.scale * x


def _loss(m, x):
  return jnp.sum(m(x) ** 2)


MODES = pytest.mark.parametrize('mode', [False, True], ids=['tree', 'graph'])


@MODES
@pytest.mark.parametrize('empty', [lambda xs: xs.pop(), lambda xs: xs.__delitem__(slice(None)),
                                   lambda xs: xs.__setitem__(slice(None), []),
                                   lambda xs: xs.clear()], ids=['pop', 'del[:]', '[:]=[]', 'clear'])
def test_emptying_a_list_a_transform_saw_drops_the_layer_everywhere(empty, mode):
  m = Scaled(n_layers=1)
  step = nnx.jit(lambda m, x: m(x), graph=mode)
  x = jnp.ones(2)
  np.testing.assert_allclose(step(m, x), m(x), rtol=1e-6)
  assert set(nnx.state(m, graph=mode)['layers']) == {0}
  empty(m.layers)
  assert len(m.layers) == 0 and nnx.state(m, graph=mode) == {}
  np.testing.assert_allclose(step(m, x), 2.0 * x)  # no stale layer in the cached plan
  assert jax.tree.leaves(nnx.grad(_loss, graph=mode)(m, x)) == []


WRITES = {
    'object.__setattr__': lambda m, v: object.__setattr__(m, 'scale', v),
    '__dict__': lambda m, v: m.__dict__.__setitem__('scale', v),
    'vars().update': lambda m, v: vars(m).update(scale=v),
}


@MODES
@pytest.mark.parametrize('write', WRITES.values(), ids=WRITES.keys())
def test_writes_that_bypass_setattr_are_seen_by_plans_split_and_jax(write, mode):
  m = Scaled(scale=2.0)
  step = nnx.jit(lambda m, x: m(x), graph=mode)
  x = jnp.ones(2)
  np.testing.assert_allclose(step(m, x), m(x), rtol=1e-6)
  nnx.split(m, graph=mode)
  nnx.split(m, graph=mode)  # cached from the second sight on
  write(m, 3.0)
  np.testing.assert_allclose(step(m, x), m(x), rtol=1e-6)
  assert nnx.merge(*nnx.split(m, graph=mode)).scale == 3.0
  assert jax.tree.map(lambda a: a, m).scale == 3.0
  grads = nnx.grad(_loss, graph=mode)(m, x)
  expected = jax.grad(lambda w: jnp.sum((3.0 * (x @ w + m.layers[0].bias[...])) ** 2))(
      m.layers[0].kernel[...])
  kernel_grad = nnx.state(grads, graph=mode)['layers'][0]['kernel']  # a State or, tree mode, a Module
  np.testing.assert_allclose(nnx.as_pure(kernel_grad), expected, rtol=1e-5)


def test_attributes_added_or_deleted_through_dict_are_classified_like_setattr():
  m = Scaled()
  nnx.state(m)
  m.__dict__['extra'] = nnx.Param(jnp.ones(3))   # data, like `m.extra = ...`
  object.__setattr__(m, 'tag', 'hello')          # static
  assert nnx.state(m)['extra'] is m.extra
  assert nnx.merge(*nnx.split(m)).tag == 'hello'
  del m.__dict__['extra']
  assert 'extra' not in nnx.state(m)


class Pair(nnx.Pytree):
  """Two data attributes and no static one."""

  def __init__(self):
    self.a = nnx.Param(jnp.ones(1))
    self.b = nnx.Param(jnp.zeros(1))


def test_jax_flatten_sees_dict_edits_of_a_node_without_static_attributes():
  p = Pair()
  _, before = jax.tree.flatten(p)
  p.__dict__['c'] = nnx.Param(jnp.full(1, 2.0))  # added behind __setattr__'s back: data
  leaves, added = jax.tree.flatten(p)
  assert len(leaves) == 3 and added != before
  del p.__dict__['a']
  p.__dict__['tag'] = 'x'  # one removed, one added: the same number of attributes
  leaves, swapped = jax.tree.flatten(p)
  assert [float(x[0]) for x in leaves] == [0.0, 2.0] and swapped != added
  rebuilt = jax.tree.unflatten(swapped, leaves)
  assert rebuilt.tag == 'x' and 'a' not in vars(rebuilt)
  assert jax.tree.structure(rebuilt) == swapped


def test_jax_flatten_sees_a_static_value_replaced_behind_setattr():
  p = Pair()
  p.tag = 'x'
  _, before = jax.tree.flatten(p)
  object.__setattr__(p, 'tag', 'y')
  _, after = jax.tree.flatten(p)
  assert after != before
  assert jax.tree.map(lambda v: v, p).tag == 'y'


def test_rebuilt_nodes_flatten_to_an_equal_treedef():
  p = Pair()
  p.tag = ['x']
  q = jax.tree.map(lambda v: v + 1, p)
  assert jax.tree.structure(q) == jax.tree.structure(p)
  assert q.tag == ['x'] and q.tag is not p.tag  # a static list of its own
  q.tag.append('y')  # changed in place: the structure changes with it
  assert jax.tree.structure(q) != jax.tree.structure(p)


class Grown(nnx.Module):
  """Layers in a plain list marked data, empty when assigned and filled in place."""

  def __init__(self):
    self.layers = nnx.data([])
    self.layers.append(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    self.layers.append(nnx.Linear(3, 1, rngs=nnx.Rngs(1)))

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


@MODES
def test_a_data_list_empty_when_assigned_and_filled_later_holds_parameters(mode, tmp_path):
  m = Grown()
  assert type(m.layers) is list
  state = nnx.state(m, nnx.Param, graph=mode)
  assert sorted(map(str, dict(state.flat_state()))) == [
      "('layers', 0, 'bias')", "('layers', 0, 'kernel')",
      "('layers', 1, 'bias')", "('layers', 1, 'kernel')"]
  x = jnp.ones((4, 2))
  loss_and_grads = nnx.jit(nnx.value_and_grad(_loss, graph=mode), graph=mode)
  loss, grads = loss_and_grads(m, x)
  eager_loss, eager_grads = nnx.value_and_grad(_loss, graph=mode)(m, x)
  np.testing.assert_allclose(loss, eager_loss, rtol=1e-5)
  g = dict(nnx.state(grads, graph=mode).flat_state())
  assert len(g) == 4
  for path, leaf in dict(nnx.state(eager_grads, graph=mode).flat_state()).items():
    np.testing.assert_allclose(nnx.as_pure(g[path]), nnx.as_pure(leaf), rtol=1e-5)
  # the weights are state, not constants: an update reaches the next jitted call
  m.layers[1].kernel[...] = jnp.zeros((3, 1))
  assert float(loss_and_grads(m, x)[0]) == float(jnp.sum(m(x) ** 2))
  nnx.checkpoint.save(tmp_path / 'ckpt', m)
  other = Grown()
  nnx.checkpoint.restore(tmp_path / 'ckpt', other)
  np.testing.assert_array_equal(other.layers[1].kernel[...], np.zeros((3, 1)))
  np.testing.assert_array_equal(other.layers[0].kernel[...], m.layers[0].kernel[...])


def test_a_static_list_filled_in_init_is_refused_when_init_returns():
  class Filled(nnx.Module):
    def __init__(self):
      self.layers = []  # static: a plain list without data
      self.layers.append(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))

  class Child(Filled):
    def __init__(self):
      super().__init__()  # checked when the outermost __init__ returns, not here
      self.layers.pop()

  with pytest.raises(ValueError, match=r"^Found unexpected data on value of type .*list.* static "
                                       r"attribute 'layers' .*the Linear at self\.layers\[0\].*"
                                       r"nnx\.data.*nnx\.List"):
    Filled()
  assert Child().layers == []


def test_a_data_list_filled_after_a_transform_saw_it_reaches_the_transform():
  m = Scaled()
  m.extra = nnx.data([])
  step = nnx.jit(lambda m: sum(jnp.sum(p[...]) for p in m.extra))
  assert float(step(m)) == 0.0
  m.extra.append(nnx.Param(jnp.ones(2)))  # in place: nothing was told
  assert float(step(m)) == 2.0
  assert nnx.state(m)['extra'][0] is m.extra[0]
  m.extra[0][...] = jnp.full(2, 3.0)
  assert float(step(m)) == 6.0  # a leaf of the state, not a constant baked into the trace


def test_a_static_list_filled_after_init_stays_static_and_check_pytree_finds_it():
  m = Scaled()
  m.extra = []
  m.extra.append(nnx.Param(jnp.ones(2)))  # as in NNX: not data, not in the state
  assert 'extra' not in nnx.state(m)
  with pytest.raises(ValueError, match=r"static attribute 'extra'.*nnx\.data"):
    nnx.check_pytree(m)


def test_a_declared_static_attribute_getting_data_is_an_error_naming_it():
  class Cfg(nnx.Module):
    options: nnx.Static[list]

    def __init__(self, fill):
      self.options = []
      if fill:
        self.options.append(nnx.Param(jnp.ones(1)))

  with pytest.raises(ValueError, match=r"^Found unexpected data .* static attribute 'options'.*"
                                       r"nnx.Data"):
    Cfg(fill=True)
  c = Cfg(fill=False)
  assert jax.tree.leaves(c) == []


class Encoder(nnx.Module, pytree=False):
  def __init__(self):
    self.layers = [nnx.Linear(2, 2, rngs=nnx.Rngs(0))]
    self.head = nnx.Linear(2, 1, rngs=nnx.Rngs(1))
    self.depth = 1

  def __call__(self, x):
    return self.head(self.layers[0](x))


class Top(nnx.Module):
  def __init__(self):
    self.enc = Encoder()
    self.count = nnx.BatchStat(jnp.array(0))


def test_pytree_false_modules_are_graph_nodes_in_graph_mode(tmp_path):
  t = Top()
  state = nnx.state(t, nnx.Param)
  assert set(state['enc']) == {'layers', 'head'} and state['enc']['head']['kernel'] is t.enc.head.kernel
  x = jnp.ones((3, 2))

  @nnx.jit
  def train_step(t, x):
    loss, grads = nnx.value_and_grad(lambda t: jnp.sum(t.enc(x) ** 2))(t)
    t.count[...] += 1
    return loss, grads

  loss, grads = train_step(t, x)
  np.testing.assert_allclose(loss, jnp.sum(t.enc(x) ** 2), rtol=1e-5)
  eager = jax.grad(lambda k: jnp.sum((t.enc.layers[0](x) @ k + t.enc.head.bias[...]) ** 2))(
      t.enc.head.kernel[...])
  np.testing.assert_allclose(grads['enc']['head']['kernel'][...], eager, rtol=1e-5)
  assert int(t.count[...]) == 1
  copy_ = nnx.merge(*nnx.split(t))
  assert type(copy_.enc) is Encoder and copy_.enc.depth == 1
  nnx.checkpoint.save(tmp_path / 'ckpt', t)
  other = Top()
  nnx.checkpoint.restore(tmp_path / 'ckpt', other)
  np.testing.assert_array_equal(other.enc.layers[0].kernel[...], t.enc.layers[0].kernel[...])
  assert int(other.count[...]) == 1


def test_pytree_false_modules_are_refused_in_tree_mode_naming_the_path():
  with pytest.raises(ValueError, match=r"'Encoder' instance that has pytree=False. Found at path: "
                                       r"\.enc.*graph=True"):
    nnx.state(Top(), graph=False)


def test_copy_copy_is_shallow_and_independent():
  m = Scaled()
  nnx.state(m)
  c = copy.copy(m)
  assert c.layers is m.layers and c.scale == m.scale  # shallow: the same children
  c.layers = None  # still data (no leaves), on the copy only
  c.extra = nnx.Param(jnp.ones(1))
  del c.scale
  m.scale = 5.0  # any attribute set on the original after editing the copy
  assert set(nnx.state(m)['layers'][0]) == {'kernel', 'bias'} and set(nnx.state(c)) == {'extra'}
  assert nnx.merge(*nnx.split(m)).scale == 5.0 and not hasattr(nnx.merge(*nnx.split(c)), 'scale')


def test_copy_deepcopy_is_independent_all_the_way_down():
  m = Scaled()
  nnx.state(m)
  d = copy.deepcopy(m)
  assert d.layers[0].kernel is not m.layers[0].kernel
  np.testing.assert_array_equal(d.layers[0].kernel[...], m.layers[0].kernel[...])
  d.layers.append(nnx.Linear(2, 2, rngs=nnx.Rngs(5)))
  m.scale = 4.0
  assert len(m.layers) == 1 and set(nnx.state(m)['layers']) == {0}
  assert set(nnx.state(d)['layers']) == {0, 1}


class WithStats(nnx.Module):
  def __init__(self):
    self.stats = nnx.data(nnx.State({'a': nnx.BatchStat(jnp.ones(2))}))


def test_a_state_attribute_edited_in_place_is_in_state_split_and_checkpoints(tmp_path):
  m = WithStats()
  assert set(nnx.state(m)['stats']) == {'a'}
  nnx.checkpoint.save(tmp_path / 'first', m)
  m.stats['b'] = nnx.BatchStat(jnp.zeros(2))
  assert set(nnx.state(m)['stats']) == {'a', 'b'}
  graphdef, state = nnx.split(m)
  assert set(state['stats']) == {'a', 'b'} and nnx.merge(graphdef, state).stats['b'] is m.stats['b']
  assert float(nnx.jit(lambda m: jnp.sum(m.stats['a'][...]) + jnp.sum(m.stats['b'][...]))(m)) == 2.0
  nnx.checkpoint.save(tmp_path / 'second', m)
  assert set(nnx.checkpoint.load_pure_dict(tmp_path / 'second')['stats']) == {'a', 'b'}


class Doubler(Scaled):
  def __call__(self, x):
    return 2 * super().__call__(x)


def test_assigning_class_changes_the_class_and_the_structure():
  m = Scaled()
  x = jnp.ones(2)
  step = nnx.jit(lambda m, x: m(x))
  before = step(m, x)
  m.__class__ = Doubler
  assert type(m) is Doubler and '__class__' not in vars(m)
  assert type(nnx.merge(*nnx.split(m))) is Doubler
  np.testing.assert_allclose(step(m, x), 2 * before, rtol=1e-6)


# -- trace ownership -------------------------------------------------------------
def test_assigning_to_a_pytree_from_a_trace_it_does_not_belong_to_raises():
  m = Scaled()
  with pytest.raises(nnx.errors.TraceContextError, match=r"Cannot mutate 'Scaled' from different "
                                                        r"trace level: attribute 'bias'"):
    jax.jit(lambda x: setattr(m, 'bias', nnx.Param(x)))(jnp.ones(2))
  with pytest.raises(nnx.errors.TraceContextError, match="attribute 'scale'"):
    jax.jit(lambda x: setattr(m, 'scale', 3.0))(jnp.ones(2))
  with pytest.raises(nnx.errors.TraceContextError, match="'layers'"):
    jax.jit(lambda x: delattr(m, 'layers'))(jnp.ones(2))
  with pytest.raises(nnx.errors.TraceContextError, match="'List'"):
    jax.jit(lambda x: m.layers.append(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))(jnp.ones(2))
  assert not hasattr(m, 'bias') and len(m.layers) == 1 and m.scale == 2.0  # unharmed
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, jnp.ones(2)), m(jnp.ones(2)), rtol=1e-6)


def test_objects_may_be_mutated_in_the_trace_that_made_or_rebuilt_them():
  @jax.jit
  def inside(x):
    m = Scaled()  # created in this trace: belongs to it
    m.bias = nnx.Param(x)
    return m.bias[...] * m.scale

  np.testing.assert_allclose(inside(jnp.ones(2)), [2.0, 2.0])

  @nnx.jit
  def grow(m, x):
    m.scale = 3.0  # the transform's rebuilt copy: allowed, the change comes back out
    return m(x)

  m = Scaled()
  grow(m, jnp.ones(2))
  assert m.scale == 3.0

  @jax.jit
  def through_jax(m, x):  # jax.jit rebuilds the Pytree argument inside its trace
    m.scale = 4.0
    return m(x)

  through_jax(m, jnp.ones(2))
  assert m.scale == 3.0


# -- containers at scale --------------------------------------------------------------
def test_list_length_and_indexing_take_constant_time():
  big = nnx.List([nnx.Param(jnp.zeros(())) for _ in range(10_000)])
  start = time.perf_counter()
  for i in range(1000):
    assert big[i * 7] is big[i * 7 - 10_000]
    len(big)
  assert time.perf_counter() - start < 0.1  # was ~0.5 s: each access counted the items
  big.append(1)
  assert len(big) == 10_001 and big.pop() == 1 and len(big) == 10_000


def test_list_mutators_match_python_lists():
  ref = [0, 1, 2, 3]
  lst = nnx.List(ref)
  for op in (lambda xs: xs.insert(1, 9), lambda xs: xs.remove(2), lambda xs: xs.reverse(),
             lambda xs: xs.__delitem__(0), lambda xs: xs.__iadd__([7, 8]), lambda xs: xs.pop(1),
             lambda xs: xs.__setitem__(slice(0, 2), [5]), lambda xs: xs.extend(xs)):
    op(ref)
    op(lst)
    assert list(lst) == ref and len(lst) == len(ref)
  assert lst.count(7) == ref.count(7) and list(reversed(lst)) == ref[::-1]
  lst.clear()
  assert len(lst) == 0
  with pytest.raises(IndexError):
    lst.pop()


# -- the epoch: one place decides when caches are invalidated ---------------------------
EDITS = {
    'setattr': lambda m: setattr(m, 'scale', 7.0),
    'delattr': lambda m: delattr(m, 'scale'),
    'class': lambda m: setattr(m, '__class__', Doubler),
    'List.append': lambda m: m.layers.append(1),
    'List.pop': lambda m: m.layers.pop(),
    'List[:] = []': lambda m: m.layers.__setitem__(slice(None), []),
    'List[0] =': lambda m: m.layers.__setitem__(0, 1),
    'List.insert': lambda m: m.layers.insert(0, 1),
    'Dict[k] =': lambda m: m.table.__setitem__('k', 1),
    'del Dict[k]': lambda m: m.table.__delitem__('a'),
    'Dict.clear': lambda m: m.table.clear(),
}


@pytest.mark.parametrize('edit', EDITS.values(), ids=EDITS.keys())
def test_every_structural_edit_of_a_seen_object_bumps_the_epoch_and_only_then(edit):
  from arbax import _settings

  def make():
    m = Scaled()
    m.table = nnx.Dict(a=nnx.Param(jnp.ones(1)))
    return m

  fresh = make()
  before = _settings.EPOCH[0]
  edit(fresh)  # never flattened by a cache: nothing depends on it
  assert _settings.EPOCH[0] == before
  seen = make()
  nnx.state(seen)
  nnx.state(seen)  # a repeated walk is cached: its objects are now seen
  before = _settings.EPOCH[0]
  edit(seen)
  assert _settings.EPOCH[0] > before


def test_objects_built_alike_share_one_structure_description():
  a, b = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(2, 3, rngs=nnx.Rngs(1))
  (_, aux_a), (_, aux_b) = jax.tree.flatten(a)[1].node_data(), jax.tree.flatten(b)[1].node_data()
  assert aux_a is aux_b  # a model of thousands of equal layers keeps one
  assert jax.tree.flatten(nnx.Linear(2, 4, rngs=nnx.Rngs(0)))[1].node_data()[1] is not aux_a


@pytest.mark.parametrize('first, second', [(0.0, -0.0), (1, True), (1, 1.0), (len, abs)])
def test_static_values_that_are_equal_but_not_interchangeable_are_kept_apart(first, second):
  class Holder(nnx.Module):
    def __init__(self, tag):
      self.tag = tag
      self.w = nnx.Param(jnp.ones(1))

  x, y = Holder(first), Holder(second)
  nnx.split(x)  # x's structure is described first; y's must not borrow it
  rebuilt = nnx.merge(*nnx.split(y))
  assert type(rebuilt.tag) is type(second) and repr(rebuilt.tag) == repr(second)
