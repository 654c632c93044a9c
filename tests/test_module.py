"""Module: sow, perturb, iter_modules / iter_children, set_attributes, train / eval, view, Sequential."""
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


# -- sow -----------------------------------------------------------------------
class Recorder(nnx.Module):
  def __call__(self, x):
    self.sow(nnx.Intermediate, 'seen', x)
    self.sow(nnx.Intermediate, 'total', x.sum(), reduce_fn=lambda a, b: a + b,
             init_fn=lambda: 0.0)
    return x


def test_sow_appends_to_a_tuple_by_default():
  r = Recorder()
  r(jnp.ones(2))
  r(jnp.full(2, 3.0))
  assert type(r.seen) is nnx.Intermediate
  seen = r.seen.get_value()
  assert isinstance(seen, tuple) and len(seen) == 2
  np.testing.assert_array_equal(seen[1], [3.0, 3.0])


def test_sow_with_reduce_and_init():
  r = Recorder()
  r(jnp.ones(2))
  r(jnp.full(2, 3.0))
  assert float(r.total[...]) == 2.0 + 6.0


def test_sow_returns_true_and_accepts_a_kind_name():
  class M(nnx.Module):
    pass
  m = M()
  assert m.sow('Custom', 'k', 1) is True
  m.sow('Custom', 'k', 2)
  assert type(m.k).__name__ == 'Custom' and m.k[...] == (1, 2)
  assert isinstance(m.k, nnx.Variable)


def test_sow_into_an_attribute_of_another_kind_is_a_value_error_naming_it():
  m = Leaf()
  with pytest.raises(ValueError, match="'w'.*Param.*Intermediate"):
    m.sow(nnx.Intermediate, 'w', 1)


def test_sown_values_are_state_of_their_kind():
  r = Recorder()
  r(jnp.ones(2))
  intermediates = nnx.state(r, nnx.Intermediate)
  assert set(intermediates) == {'seen', 'total'}


# -- perturb -------------------------------------------------------------------
class Perturbed(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))

  def __call__(self, x):
    h = self.perturb('h', x * self.w)
    return (h ** 2).sum()


def test_perturb_adds_a_zero_perturbation_variable():
  m = Perturbed()
  out = m(jnp.ones(2))
  assert type(m.h) is nnx.Perturbation
  np.testing.assert_array_equal(m.h[...], [0.0, 0.0])
  assert float(out) == 1.0 + 4.0


def test_perturbation_gradient_is_the_gradient_of_the_intermediate():
  m = Perturbed()
  x = jnp.array([3.0, 1.0])
  m(x)
  graphdef, params, perturbations = nnx.split(m, nnx.Param, nnx.Perturbation)

  def loss(perturbations):
    return nnx.merge(graphdef, params, perturbations)(x)

  grads = jax.grad(loss)(perturbations)
  h = x * jnp.array([1.0, 2.0])
  np.testing.assert_allclose(grads['h'][...], 2 * h)  # d/dh sum(h**2)


def test_perturb_custom_kind():
  class Custom(nnx.Perturbation):
    pass

  class M(nnx.Module):
    def __call__(self, x):
      return self.perturb('p', x, variable_type=Custom)
  m = M()
  np.testing.assert_array_equal(m(jnp.ones(2)), [1.0, 1.0])
  assert type(m.p) is Custom


# -- iteration -----------------------------------------------------------------
def test_iter_modules_children_first_in_sorted_key_order_with_containers():
  t = Tree()
  paths = [p for p, _ in nnx.iter_modules(t)]
  assert paths == [('a',), ('b',), ('blocks', 0), ('blocks', 1), ('blocks',), ('plain', 0),
                   ('table', 'c'), ('table',), ()]
  modules = dict(nnx.iter_modules(t))
  assert modules[()] is t and modules[('blocks', 1)] is t.blocks[1]
  assert modules[('plain', 0)] is t.plain[0] and modules[('table', 'c')] is t.table['c']
  assert [p for p, _ in t.iter_modules()] == paths


def test_iter_modules_visits_shared_modules_once():
  class Shared(nnx.Module):
    def __init__(self):
      self.x = Leaf()
      self.y = self.x
  assert [p for p, _ in nnx.iter_modules(Shared())] == [('x',), ()]


def test_iter_children_yields_direct_module_attributes_only():
  t = Tree()
  children = list(nnx.iter_children(t))
  assert [name for name, _ in children] == ['a', 'b', 'blocks', 'table']
  assert children[0][1] is t.a
  assert list(t.iter_children()) == children


def test_rngs_are_not_modules():
  class M(nnx.Module):
    def __init__(self):
      self.rngs = nnx.Rngs(0)
      self.leaf = Leaf()
  assert [p for p, _ in nnx.iter_modules(M())] == [('leaf',), ()]


# -- set_attributes / train / eval ---------------------------------------------
def test_set_attributes_sets_only_where_present():
  t = Tree()
  t.set_attributes(deterministic=True)
  assert all(m.deterministic for _, m in nnx.iter_modules(t) if isinstance(m, Leaf))
  assert not hasattr(t, 'deterministic')


def test_set_attributes_with_filter():
  t = Tree()
  t.set_attributes(nnx.PathContains('blocks'), deterministic=True)
  assert [t.blocks[0].deterministic, t.blocks[1].deterministic] == [True, True]
  assert [t.a.deterministic, t.b.deterministic, t.table['c'].deterministic] == [False] * 3


def test_set_attributes_unknown_name_is_a_value_error_naming_it():
  t = Tree()
  with pytest.raises(ValueError, match='missing_flag'):
    t.set_attributes(missing_flag=1)
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


# -- view ----------------------------------------------------------------------
def test_view_is_a_copy_sharing_variables_with_attributes_set():
  t = Tree()
  v = nnx.view(t, deterministic=True)
  assert v is not t and v.a is not t.a
  assert v.a.w is t.a.w and v.blocks[1].w is t.blocks[1].w
  assert v.a.deterministic and not t.a.deterministic
  v.a.w[...] = jnp.zeros(2)
  np.testing.assert_array_equal(t.a.w[...], [0.0, 0.0])


def test_view_with_only_filter_and_unknown_attribute():
  t = Tree()
  v = nnx.view(t, only=nnx.PathContains('a'), deterministic=True)
  assert v.a.deterministic and not v.b.deterministic
  with pytest.raises(ValueError, match='nope'):
    nnx.view(t, nope=1)
  assert nnx.view(t, nope=1, raise_if_not_found=False).a.deterministic is False


def test_module_view_method():
  t = Tree()
  v = t.view(use_running_average=True)
  assert v.a.use_running_average and not t.a.use_running_average


# -- Sequential ----------------------------------------------------------------
def test_sequential_applies_layers_in_order():
  seq = nnx.Sequential(Leaf(2.0), nnx.relu, lambda x: x - 1)
  x = jnp.array([1.0, -1.0])
  np.testing.assert_allclose(seq(x), jax.nn.relu(x * 2.0) - 1)
  assert isinstance(seq.layers, nnx.List) and len(seq.layers) == 3


def test_sequential_forwards_extra_arguments_to_the_first_layer():
  seq = nnx.Sequential(lambda x, y, scale=1: (x + y) * scale, lambda z: z + 1)
  assert seq(1, 2, scale=3) == 10


def test_empty_sequential_is_identity():
  x = jnp.ones(2)
  assert nnx.Sequential()(x) is x


def test_sequential_is_a_pytree_of_its_layers():
  seq = nnx.Sequential(Leaf(), nnx.relu, Leaf())
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(seq)]
  assert paths == ['.layers[0].w.value', '.layers[2].w.value']


# -- iter_module_children / with_attributes / set_metadata --
class _Blk(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    self.drop = nnx.Dropout(0.5)
    self.scale = nnx.Param(jnp.ones(1))


def test_iter_module_children_skips_variables():
  names = [(k, type(m).__name__) for k, m in nnx.iter_module_children(_Blk())]
  assert names == [('drop', 'Dropout'), ('lin', 'Linear')]
  assert list(nnx.iter_module_children(nnx.Linear(1, 1, rngs=nnx.Rngs(0)))) == []


def test_with_attributes_copies_and_shares_variables():
  b = _Blk()
  nb = nnx.with_attributes(b, deterministic=True)
  assert nb is not b and nb.drop.deterministic is True and b.drop.deterministic is False
  assert nb.lin.kernel is b.lin.kernel
  with pytest.raises(ValueError, match='foo'):
    nnx.with_attributes(b, foo=1)
  only = nnx.with_attributes(b, only=nnx.Linear, raise_if_not_found=False, deterministic=True)
  assert only.drop.deterministic is False


def test_set_metadata_in_place_with_filter():
  b = _Blk()
  nnx.set_metadata(b, only=nnx.Param, frozen=True)
  assert b.lin.kernel.get_metadata('frozen') is True and b.scale.get_metadata('frozen') is True
  nnx.set_metadata(b, tag='all')
  assert b.lin.bias.get_metadata('tag') == 'all'
  nnx.set_metadata(b, only=nnx.BatchStat, other=1)  # nothing matches: no error, no change
  assert b.lin.kernel.get_metadata('other', None) is None
