"""arbax.spmd: abstract models with shardings, and the axis bookkeeping of mapped Variables.

Eight-device checks of the same functions: tests/sharding_scripts/mesh_checks.py.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import arbax as nnx
from arbax import spmd

MESH1 = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
INIT = nnx.initializers.ones_init()


class TiedLinear(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(INIT, (None, 'model')))
    self.alias = self.linear.kernel


# -- get_abstract_model / as_abstract -------------------------------------------
def test_get_abstract_model_attaches_named_shardings_without_computing():
  graphdef, abstract = nnx.get_abstract_model(lambda: TiedLinear(nnx.Rngs(0)), MESH1)
  leaves = jax.tree.leaves(abstract)
  assert len(leaves) == 1  # graph mode (the default): the shared kernel appears once
  assert isinstance(leaves[0], jax.ShapeDtypeStruct) and leaves[0].shape == (4, 4)
  assert leaves[0].sharding == NamedSharding(MESH1, P(None, 'model'))
  model = nnx.merge(graphdef, abstract)
  assert model.alias is model.linear.kernel


def test_get_abstract_model_graph_argument_and_compat():
  with pytest.raises(ValueError, match=r'\.alias|\.linear\.kernel'):
    nnx.get_abstract_model(lambda: TiedLinear(nnx.Rngs(0)), MESH1, graph=False)
  with nnx.set_graph_mode(False):  # nnx.compat keeps graph mode whatever the context
    _, abstract = nnx.compat.get_abstract_model(lambda: TiedLinear(nnx.Rngs(0)), MESH1)
  assert len(jax.tree.leaves(abstract)) == 1


def test_get_abstract_model_replicates_unannotated_variables():
  _, abstract = nnx.get_abstract_model(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)), MESH1)
  assert abstract['bias'].get_value().sharding == NamedSharding(MESH1, P())


def test_as_abstract_needs_a_mesh_and_names_the_path():
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: nnx.Linear(
        2, 3, kernel_init=nnx.with_partitioning(INIT, (None, 'model')), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'\.kernel.*jax\.set_mesh'):
    nnx.as_abstract(abstract)
  with jax.set_mesh(MESH1):
    sharded = nnx.as_abstract(abstract)
  assert sharded.kernel.get_value().sharding.spec == P(None, 'model')
  assert sharded.bias.get_value().sharding is None  # no annotation: left alone
  assert isinstance(sharded.kernel, nnx.Param)
  assert nnx.abstract_with_sharding is nnx.as_abstract


def test_as_abstract_uses_each_variables_own_mesh():
  other = jax.make_mesh((1, 1), ('c', 'd'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  abstract = nnx.eval_shape(lambda: nnx.Linear(
      2, 3, kernel_metadata={'out_sharding': ('c', 'd'), 'mesh': other}, rngs=nnx.Rngs(0)))
  sharded = nnx.as_abstract(abstract)  # no set_mesh needed: the metadata names the mesh
  assert sharded.kernel.get_value().sharding == NamedSharding(other, P('c', 'd'))


def test_spmd_module_offers_nnx_names():
  for name in ('get_partition_spec', 'get_named_sharding', 'with_partitioning', 'PARTITION_NAME',
               'get_abstract_model', 'as_abstract', 'add_axis', 'remove_axis'):
    assert getattr(nnx.spmd, name) is getattr(spmd, name)
  assert nnx.spmd.get_partition_spec is nnx.get_partition_spec
  assert nnx.PARTITION_NAME == 'partition_name'


# -- add_axis / remove_axis ---------------------------------------------------------
def annotated(names=('din', 'dout'), **metadata):
  return nnx.Param(jnp.zeros((2, 3)), out_sharding=names, eager_sharding=False, **metadata)


def test_add_and_remove_axis_edit_out_sharding_and_named_metadata():
  v = annotated(nickname=('in', 'out'))
  change = {nnx.PARTITION_NAME: 'layers', 'nickname': 'nick'}
  spmd.add_axis({'w': v}, 0, change)
  assert v.out_sharding == ('layers', 'din', 'dout') and v.nickname == ('nick', 'in', 'out')
  spmd.remove_axis(v, 0, change)
  assert v.out_sharding == ('din', 'dout') and v.nickname == ('in', 'out')
  spmd.add_axis(v, 4, {nnx.PARTITION_NAME: 'z'})  # past the end: unnamed axes in between
  assert v.out_sharding == ('din', 'dout', None, None, 'z')


def test_remove_axis_with_another_name_is_a_value_error():
  v = annotated(('x', 'dout'))
  with pytest.raises(ValueError, match=r"'din' at index 0.*found 'x'"):
    spmd.remove_axis(v, 0, {nnx.PARTITION_NAME: 'din'})
  assert v.out_sharding == ('x', 'dout')


def test_axis_change_needs_the_partition_name():
  with pytest.raises(ValueError, match='partition_name'):
    spmd.add_axis(annotated(), 0, {'nickname': 'n'})


def test_variable_axis_hooks_run_from_metadata_and_overrides():
  calls = []

  class Tracked(nnx.Param):
    def add_axis(self, axis_index, axis_name):
      calls.append(('method add', axis_index, axis_name))
      super().add_axis(axis_index, axis_name)

  v = Tracked(jnp.zeros(3), on_add_axis=lambda var, i, n: calls.append(('hook add', i, n)),
              on_remove_axis=(lambda var, i, n: calls.append(('hook remove', i, n)),))
  spmd.add_axis(v, 1, {nnx.PARTITION_NAME: 'layers'})
  spmd.remove_axis(v, 1, {nnx.PARTITION_NAME: 'layers'})
  assert calls == [('method add', 1, 'layers'), ('hook add', 1, 'layers'),
                   ('hook remove', 1, 'layers')]
  assert v.get_metadata('out_sharding', None) is None  # no annotation: only the hooks run


def test_a_shared_variable_gains_the_axis_once():
  class Block(nnx.Module):
    def __init__(self):
      self.w = annotated(('d', 'e'))
      self.tied = self.w

  block = Block()
  spmd.add_axis(block, 0, {nnx.PARTITION_NAME: 'layers'})
  assert block.tied.out_sharding == ('layers', 'd', 'e')
