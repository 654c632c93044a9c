"""Module: sow / perturb outside capture, iteration, set_attributes / train / eval, view and
view_info, with_attributes, set_metadata, Sequential."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx


class Leaf(nnx.Module):
  def __init__(self, scale=1.0):
    self.w = nnx.Param(jnp.full(2, scale))
    self.deterministic = False
    self.use_running_average = False

  def __call__(self, x):
    return x * self.w


class Tree(nnx.Module):
  def __init__(self):
    self.b = Leaf()
    self.blocks = nnx.List([Leaf(), Leaf()])
    self.a = Leaf()
    self.table = nnx.Dict(c=Leaf())
    self.plain = nnx.data([Leaf()])
    self.n = 1


@pytest.fixture
def quiet():
  """sow / perturb outside nnx.capture warn (deprecated, as in NNX); these tests mean it."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    yield


# -- sow / perturb outside capture ----------------------------------------------
class Recorder(nnx.Module):
  def __call__(self, x):
    self.sow(nnx.Intermediate, 'seen', x)
    self.sow(nnx.Intermediate, 'total', x.sum(), lambda a, b: a + b, lambda: 0.0)
    return x


def test_sow_outside_capture_stores_a_tuple_attribute_and_warns():
  r = Recorder()
  with pytest.warns(DeprecationWarning, match='nnx.capture'):
    r(jnp.ones(2))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    r(jnp.full(2, 3.0))
  assert type(r.seen) is nnx.Intermediate
  seen = r.seen.get_value()
  assert isinstance(seen, tuple) and len(seen) == 2
  np.testing.assert_array_equal(seen[1], [3.0, 3.0])
  assert float(r.total[...]) == 2.0 + 6.0  # reduce_fn / init_fn passed positionally


def test_sow_accepts_a_registered_collection_name(quiet):
  class M(nnx.Module):
    pass
  m = M()
  assert m.sow('intermediates', 'k', 1) is True  # Linen's name of nnx.Intermediate
  assert type(m.k) is nnx.Intermediate and m.k[...] == (1,)
  m.sow('my_kind', 'j', 2)  # unknown names become a Variable kind of that name
  assert type(m.j).__name__ == 'my_kind' and isinstance(m.j, nnx.Variable)
  m.sow('my_kind', 'j', 3)
  assert m.j[...] == (2, 3)


def test_sow_into_a_plain_attribute_is_a_value_error_naming_it(quiet):
  m = Leaf()
  m.count = 10
  with pytest.raises(ValueError, match="'count' to be a Variable, got int"):
    m.sow(nnx.Intermediate, 'count', 1)


def test_sow_into_a_variable_of_another_kind_is_a_value_error_naming_both(quiet):
  m = Leaf()
  with pytest.raises(ValueError, match="'w' to be of type 'Intermediate', got 'Param'"):
    m.sow(nnx.Intermediate, 'w', 1)


def test_sown_values_are_state_of_their_kind(quiet):
  r = Recorder()
  r(jnp.ones(2))
  assert set(nnx.state(r, nnx.Intermediate)) == {'seen', 'total'}


class Perturbed(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))

  def __call__(self, x):
    h = self.perturb('h', x * self.w)
    return (h ** 2).sum()


def test_perturb_outside_capture_adds_a_zero_perturbation_variable(quiet):
  m = Perturbed()
  out = m(jnp.ones(2))
  assert type(m.h) is nnx.Perturbation
  np.testing.assert_array_equal(m.h[...], [0.0, 0.0])
  assert float(out) == 1.0 + 4.0


def test_perturbation_gradient_is_the_gradient_of_the_intermediate(quiet):
  m = Perturbed()
  x = jnp.array([3.0, 1.0])
  m(x)
  graphdef, params, perturbations = nnx.split(m, nnx.Param, nnx.Perturbation)

  def loss(perturbations):
    return nnx.merge(graphdef, params, perturbations)(x)

  grads = jax.grad(loss)(perturbations)
  h = x * jnp.array([1.0, 2.0])
  np.testing.assert_allclose(grads['h'][...], 2 * h)  # d/dh sum(h**2)


def test_perturb_with_a_custom_kind_and_a_wrong_existing_attribute(quiet):
  class Custom(nnx.Perturbation):
    pass

  class M(nnx.Module):
    def __call__(self, x):
      return self.perturb('p', x, variable_type=Custom)
  m = M()
  np.testing.assert_array_equal(m(jnp.ones(2)), [1.0, 1.0])
  assert type(m.p) is Custom
  leaf = Leaf()
  with pytest.raises(ValueError, match="'w' to be of type 'Perturbation', got 'Param'"):
    leaf.perturb('w', jnp.ones(2))


# -- iteration -----------------------------------------------------------------
@pytest.mark.parametrize('graph', [True, False])
def test_iter_modules_children_first_in_sorted_key_order_with_containers(graph):
  t = Tree()
  paths = [p for p, _ in nnx.iter_modules(t, graph=graph)]
  assert paths == [('a',), ('b',), ('blocks', 0), ('blocks', 1), ('blocks',), ('plain', 0),
                   ('table', 'c'), ('table',), ()]
  modules = dict(nnx.iter_modules(t))
  assert modules[()] is t and modules[('blocks', 1)] is t.blocks[1]
  assert modules[('plain', 0)] is t.plain[0] and modules[('table', 'c')] is t.table['c']


def test_iter_modules_looks_inside_plain_containers_of_data():
  class Holder(nnx.Module):
    def __init__(self):
      self.groups = nnx.data([{'x': Leaf()}, {'y': Leaf(), 'z': Leaf()}])
  assert [p for p, _ in nnx.iter_modules(Holder())] == [
      ('groups', 0, 'x'), ('groups', 1, 'y'), ('groups', 1, 'z'), ()]


def test_iter_modules_shared_module_once_in_graph_mode_error_in_tree_mode():
  class Shared(nnx.Module):
    def __init__(self):
      self.x = Leaf()
      self.y = self.x
  assert [p for p, _ in nnx.iter_modules(Shared(), graph=True)] == [('x',), ()]
  with pytest.raises(ValueError):
    list(nnx.iter_modules(Shared(), graph=False))


def test_iter_modules_method_is_deprecated_but_works():
  t = Tree()
  with pytest.warns(DeprecationWarning, match='nnx.iter_modules'):
    assert [p for p, _ in t.iter_modules()] == [p for p, _ in nnx.iter_modules(t)]


def test_rngs_are_not_modules():
  class M(nnx.Module):
    def __init__(self):
      self.rngs = nnx.Rngs(0)
      self.leaf = Leaf()
  assert [p for p, _ in nnx.iter_modules(M())] == [('leaf',), ()]


class Mixed(nnx.Module):
  def __init__(self):
    self.sub = Leaf()
    self.rngs = nnx.Rngs(0)
    self.scale = nnx.Param(jnp.ones(1))
    self.arr = jnp.ones(2)
    self.listed = nnx.data([Leaf()])
    self.n = 3


@pytest.mark.parametrize('graph', [True, False])
def test_iter_children_yields_every_direct_pytree_and_variable(graph):
  m = Mixed()
  children = list(nnx.iter_children(m, graph=graph))
  assert [k for k, _ in children] == ['rngs', 'scale', 'sub']  # no array, no plain list
  assert children[2][1] is m.sub and children[1][1] is m.scale
  assert [k for k, _ in nnx.iter_children(nnx.List([Leaf(), 5, Leaf()]), graph=graph)] == [0, 2]


@pytest.mark.parametrize('graph', [True, False])
def test_iter_module_children_skips_variables(graph):
  assert [k for k, _ in nnx.iter_module_children(Mixed(), graph=graph)] == ['rngs', 'sub']
  assert list(nnx.iter_module_children(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), graph=graph)) == []


def test_iter_children_of_a_leaf_is_a_value_error_saying_what_to_pass():
  with pytest.raises(ValueError, match='Expected a graph node, got int'):
    list(nnx.iter_children(3, graph=True))
  with pytest.raises(ValueError, match='Expected a pytree node, got ArrayImpl'):
    list(nnx.iter_children(jnp.ones(2), graph=False))


def test_iter_children_of_a_non_pytree_object_needs_graph_mode():
  class Opaque(nnx.Pytree, pytree=False):
    def __init__(self):
      self.leaf = Leaf()
  assert [k for k, _ in nnx.iter_children(Opaque(), graph=True)] == ['leaf']
  with pytest.raises(ValueError, match='pytree=False'):
    list(nnx.iter_children(Opaque(), graph=False))


# -- set_attributes / train / eval ---------------------------------------------
def test_set_attributes_sets_only_where_present():
  t = Tree()
  t.set_attributes(deterministic=True)
  assert all(m.deterministic for _, m in nnx.iter_modules(t) if isinstance(m, Leaf))
  assert not hasattr(t, 'deterministic')


def test_set_attributes_with_filters():
  t = Tree()
  t.set_attributes(nnx.PathContains('blocks'), deterministic=True)
  assert [t.blocks[0].deterministic, t.blocks[1].deterministic] == [True, True]
  assert [t.a.deterministic, t.b.deterministic, t.table['c'].deterministic] == [False] * 3
  t.set_attributes(nnx.PathContains('a'), nnx.PathContains('b'), use_running_average=True)
  assert t.a.use_running_average and t.b.use_running_average
  assert not t.table['c'].use_running_average


def test_set_attributes_unknown_name_is_a_value_error_listing_them():
  t = Tree()
  with pytest.raises(ValueError, match=r"following attributes: \['missing', 'other'\].*"
                                       r'raise_if_not_found=False'):
    t.set_attributes(deterministic=True, other=2, missing=1)
  t.set_attributes(missing_flag=1, raise_if_not_found=False)
  assert not hasattr(t.a, 'missing_flag')


def test_eval_and_train_toggle_flags():
  t = Tree()
  t.eval()
  assert t.a.deterministic and t.blocks[1].use_running_average and t.plain[0].deterministic
  t.train()
  assert not t.a.deterministic and not t.table['c'].use_running_average


def test_eval_accepts_extra_attributes():
  t = Tree()
  t.eval(n=5)
  assert t.n == 5 and t.a.deterministic


# -- view / view_info ------------------------------------------------------------
class Switch(nnx.Module):
  """A layer with a mode switch, as Dropout has."""

  def __init__(self):
    self.w = nnx.Param(jnp.ones(2))
    self.mode = 'train'

  def set_view(self, mode: str | None = None, scale: float = 1.0):
    """Switches for nnx.view.

    Args:
      mode: 'train' or 'eval'.
      scale: unused here; documented
        over two lines.

    Returns:
      Nothing.
    """
    if mode is not None:
      self.mode = mode


class Net(nnx.Module):
  def __init__(self):
    self.first = Switch()
    self.rest = nnx.List([Switch(), Leaf()])


@pytest.mark.parametrize('graph', [True, False])
def test_view_calls_set_view_on_a_copy_sharing_variables(graph):
  net = Net()
  v = nnx.view(net, mode='eval', graph=graph)
  assert v is not net and v.first is not net.first
  assert v.first.mode == 'eval' and v.rest[0].mode == 'eval'
  assert net.first.mode == 'train' and net.rest[0].mode == 'train'
  assert v.first.w is net.first.w and v.rest[1].w is net.rest[1].w
  v.first.w[...] = jnp.zeros(2)
  np.testing.assert_array_equal(net.first.w[...], [0.0, 0.0])


def test_view_ignores_plain_attributes_and_names_unused_keys():
  net = Net()
  # Leaf has a `deterministic` attribute but no set_view: view does not touch it.
  with pytest.raises(ValueError, match=r"Unused keys found in nnx.view: \['deterministic'\]"):
    nnx.view(net, mode='eval', deterministic=True)
  v = nnx.view(net, mode='eval', deterministic=True, raise_if_not_found=False)
  assert v.rest[1].deterministic is False and v.first.mode == 'eval'


def test_view_only_filter_selects_modules():
  net = Net()
  v = nnx.view(net, only=nnx.PathContains('first'), mode='eval')
  assert v.first.mode == 'eval' and v.rest[0].mode == 'train'


def test_view_passes_everything_to_a_set_view_taking_kwargs():
  seen = {}

  class Open(nnx.Module):
    def set_view(self, **kwargs):
      seen.update(kwargs)

  nnx.view(Open(), anything=1, other=2)  # no unused keys: **kwargs takes them all
  assert seen == {'anything': 1, 'other': 2}


def test_view_with_the_library_layers():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)
  b = Block(nnx.Rngs(0))
  v = nnx.view(b, deterministic=True, use_running_average=True)
  assert v.drop.deterministic is True and v.bn.use_running_average is True
  assert b.drop.deterministic is False and b.bn.use_running_average is False


def test_module_view_method_ignores_unknown_keys():
  net = Net()
  v = net.view(mode='eval', nope=1)
  assert v.first.mode == 'eval' and net.first.mode == 'train'


def test_view_info_lists_each_class_with_its_documented_keys():
  info = nnx.view_info(Net())
  assert info == ('Switch:\n'
                  "  mode: str | None = None\n"
                  "    'train' or 'eval'.\n"
                  '  scale: float = 1.0\n'
                  '    unused here; documented\n'
                  '    over two lines.')
  assert nnx.view_info(Net(), only=Leaf) == ''


def test_view_info_of_an_undocumented_set_view_shows_the_signature():
  class Bare(nnx.Module):
    def set_view(self, flag: bool = False, *, level=2, **kwargs):
      pass
  # Classes are named by their qualified name, as NNX does.
  assert nnx.view_info(Bare()) == f'{Bare.__qualname__}:\n  flag: bool = False\n  level = 2'


# -- with_attributes / set_metadata ------------------------------------------------
class _Blk(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    self.drop = nnx.Dropout(0.5)
    self.scale = nnx.Param(jnp.ones(1))


@pytest.mark.parametrize('graph', [True, False])
def test_with_attributes_copies_and_shares_variables(graph):
  b = _Blk()
  nb = nnx.with_attributes(b, deterministic=True, graph=graph)
  assert nb is not b and nb.drop.deterministic is True and b.drop.deterministic is False
  assert nb.lin.kernel is b.lin.kernel
  with pytest.raises(ValueError, match=r"following attributes: \['foo'\]"):
    nnx.with_attributes(b, foo=1, graph=graph)
  only = nnx.with_attributes(b, only=nnx.Linear, raise_if_not_found=False, deterministic=True,
                             graph=graph)
  assert only.drop.deterministic is False


def test_set_metadata_in_place_with_filter():
  b = _Blk()
  nnx.set_metadata(b, only=nnx.Param, frozen=True)
  assert b.lin.kernel.get_metadata('frozen') is True and b.scale.get_metadata('frozen') is True
  nnx.set_metadata(b, tag='all')
  assert b.lin.bias.get_metadata('tag') == 'all'
  nnx.set_metadata(b, only=nnx.BatchStat, other=1)  # nothing matches: no error, no change
  assert b.lin.kernel.get_metadata('other', None) is None


# -- Sequential ----------------------------------------------------------------
def test_sequential_applies_layers_in_order():
  seq = nnx.Sequential(Leaf(2.0), nnx.relu, lambda x: x - 1)
  x = jnp.array([1.0, -1.0])
  np.testing.assert_allclose(seq(x), jax.nn.relu(x * 2.0) - 1)
  assert isinstance(seq.layers, nnx.List) and len(seq.layers) == 3


def test_sequential_keyword_arguments_go_to_the_first_layer():
  seq = nnx.Sequential(lambda x, y, scale=1: (x + y) * scale, lambda z: z + 1)
  assert seq(1, 2, scale=3) == 10


def test_sequential_unpacks_tuple_and_dict_outputs():
  seq = nnx.Sequential(lambda a, b: (a + b, a - b),        # tuple -> positional arguments
                       lambda s, d: {'s': s, 'd': d},      # dict -> keyword arguments
                       lambda d, s: s * 10 + d)
  assert seq(3, 1) == 42


def test_sequential_passes_rngs_to_the_layers_that_take_it():
  got = []

  def takes(x, *, rngs):
    got.append(rngs)
    return x

  def takes_kwargs(x, **kwargs):  # **kwargs is not an `rngs` parameter: nothing passed
    assert 'rngs' not in kwargs
    return x

  rngs = nnx.Rngs(dropout=1)
  seq = nnx.Sequential(takes, takes_kwargs, nnx.Dropout(0.5), takes)
  out = seq(jnp.ones(1000), rngs=rngs)
  assert got == [rngs, rngs]
  assert 300 < int((out == 0).sum()) < 700  # Dropout drew from the Rngs passed to the call
  assert nnx.Sequential(lambda x: x + 1)(1, rngs=rngs) == 2  # layers without it: not passed


def test_empty_sequential_returns_its_inputs():
  x = jnp.ones(2)
  seq = nnx.Sequential()
  assert seq(x) is x and seq(1, 2) == (1, 2) and seq(a=1) == {'a': 1} and seq() is None


def test_sequential_non_callable_layer_is_a_type_error_naming_its_index():
  with pytest.raises(TypeError, match=r'layers\[1\] is not callable: 3'):
    nnx.Sequential(lambda x: x, 3)(1)


def test_sequential_is_a_pytree_of_its_layers():
  seq = nnx.Sequential(Leaf(), nnx.relu, Leaf())
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(seq)]
  assert paths == ['.layers[0].w.value', '.layers[2].w.value']
