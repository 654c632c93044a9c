"""to_tree / from_tree / NodeStates, prefix and TreeState, clear_non_graph_nodes."""
import dataclasses
import functools
import typing as tp

import jax
import jax.numpy as jnp
import pytest

import arbax as nnx


class Cell(nnx.Module):
  def __init__(self, w, s):
    self.w = nnx.Param(jnp.asarray(w))
    self.s = nnx.BatchStat(jnp.asarray(s))


class Net(nnx.Module):
  def __init__(self):
    self.cell = Cell(jnp.ones(3), jnp.zeros(3))
    self.norm = Cell(2.0, 0.0)


def test_to_tree_replaces_objects_by_node_states_and_from_tree_restores_sharing():
  cell = Cell(1.0, 2.0)
  pure = nnx.to_tree((cell, 'label', {'again': cell}))
  first, label, rest = pure
  assert label == 'label' and isinstance(first, nnx.NodeStates)
  assert type(first.graphdef.nodes[0]) is nnx.graphlib.NodeDef
  assert type(rest['again'].graphdef.nodes[0]) is nnx.graphlib.NodeRef
  assert len(nnx.to_flat_state(first.state)) == 2 and len(rest['again'].state) == 0
  assert len(jax.tree.leaves(pure)) == 3   # the two Variables' values and 'label'
  back = nnx.from_tree(pure)
  assert back[0] is back[2]['again'] and back[1] == 'label'


def test_to_tree_and_from_tree_update_the_outer_objects_through_jit():
  cell = Cell(1.0, 2.0)
  w = cell.w
  with nnx.update_context('tree'):
    pure = nnx.to_tree((cell, {'same': cell}), ctxtag='tree')

    @jax.jit
    def f(pure):
      c, d = nnx.from_tree(pure, ctxtag='tree', is_inner=True)
      assert c is d['same']
      c.w, c.s = c.s, c.w            # swap the two Variables between the attributes
      c.s[...] += 1
      return nnx.to_tree((c, d), ctxtag='tree')

    out = nnx.from_tree(f(pure), ctxtag='tree', is_inner=False)
  assert out[0] is cell and out[1]['same'] is cell
  assert cell.s is w and float(w[...]) == 2.0 and float(cell.w[...]) == 2.0


def test_to_tree_checks_that_shared_variables_get_one_prefix():
  cell = Cell(1.0, 2.0)
  nnx.to_tree((cell, cell), prefix=(0, 0))
  with pytest.raises(ValueError, match=r'Inconsistent aliasing(.|\n)*Param:\n  \[0\]\.w: 0\n  \[1\]\.w: 1'):
    nnx.to_tree((cell, cell), prefix=(0, 1))


def test_node_states_prefixes_work_as_jax_vmap_axes():
  @dataclasses.dataclass(frozen=True)
  class Axes:
    params: tp.Any
    stats: tp.Any

  cell = Cell(2.0, jnp.arange(4.0))
  axes = Axes(None, 0)

  def split_by_kind(ctx, path, prefix, obj):
    return nnx.NodeStates.from_split(*ctx.split(obj, nnx.Param, nnx.BatchStat))

  pure = nnx.to_tree((cell,), prefix=(axes,), split_fn=split_by_kind)
  in_axes = (nnx.NodeStates.from_prefixes((axes.params, axes.stats)),)

  @functools.partial(jax.vmap, in_axes=in_axes)
  def total(pure_cell):
    c = nnx.from_tree(pure_cell)
    return c.w[...] * c.s[...]

  assert total(pure[0]).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_clear_non_graph_nodes_keeps_only_objects_and_variables():
  cell, v = Cell(1.0, 2.0), nnx.Param(3.0)
  assert nnx.extract.clear_non_graph_nodes((cell, 1, jnp.ones(2), [v])) == (cell, None, None, [v])


def test_prefix_in_tree_mode_has_the_node_shape():
  net = Net()
  axes = nnx.prefix(net, {nnx.Param: 0, nnx.BatchStat: None}, graph=False)
  assert type(axes) is Net and axes.cell.w == 0 and axes.norm.s is None

  @functools.partial(jax.vmap, in_axes=(nnx.prefix(net.cell, {...: 0}, graph=False),))
  def mean(cell):
    return cell.w[...] + cell.s[...]

  assert mean(net.cell).shape == (3,)


def test_prefix_in_graph_mode_is_a_tree_state_of_each_object():
  net = Net()
  tied = (net, net.cell)
  axes_net, axes_cell = nnx.prefix(tied, lambda path, v: 'p' if path[-1] == 'w' else 's',
                                   graph=True)
  assert isinstance(axes_net, nnx.extract.TreeState)
  assert axes_net.state['cell']['w'] == 'p' and axes_net.state['norm']['s'] == 's'
  assert len(axes_cell.state) == 0          # net.cell was met inside net already
  assert type(axes_cell.graphdef.nodes[0]) is nnx.graphlib.NodeRef


def test_prefix_without_a_matching_filter_names_the_path():
  with pytest.raises(ValueError, match=r'No filter matched the BatchStat at \.cell\.s'):
    nnx.prefix(Net(), {nnx.Param: 0}, graph=False)
