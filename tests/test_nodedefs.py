"""GraphDef.nodes: NNX's list of node definitions, as a view of arbax's GraphDef."""
import typing as tp

import jax
import jax.numpy as jnp

import arbax as nnx
from arbax.nodedefs import NodeDef, NodeRef, TreeNodeDef, VariableDef


class Cell(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones(2), tag='weights')
    self.steps = 4


class Twin(nnx.Module):
  def __init__(self):
    self.left = Cell()
    self.right = self.left          # the same object twice
    self.extra = nnx.data((nnx.BatchStat(jnp.zeros(1)),))   # a plain container


def test_graph_mode_lists_objects_variables_containers_and_refs_in_traversal_order():
  graphdef, _ = nnx.split(Twin(), graph=True)
  kinds = [(type(n).__name__, getattr(n, 'index', None)) for n in graphdef.nodes]
  # attributes in sorted order: extra (a tuple holding a BatchStat), left (a Cell), right (a ref)
  assert kinds == [('NodeDef', 0), ('NodeDef', None), ('VariableDef', 1), ('NodeDef', 2),
                   ('VariableDef', 3), ('NodeRef', 2)]
  root, lst, stat, cell, w, ref = graphdef.nodes
  assert root.type is Twin and root.num_attributes == 3 and root.outer_index is None
  assert lst.type is tuple and lst.num_attributes == 1
  assert stat.type is nnx.BatchStat and cell.type is Cell
  assert w.type is nnx.Param and w.metadata['tag'] == 'weights'


def test_a_bare_variable_is_a_variable_def_in_graph_mode_and_a_tree_node_def_in_tree_mode():
  v = nnx.Param(jnp.array(3.0))
  graphdef, state = nnx.split(v, graph=True)
  assert state is v and type(graphdef.nodes[0]) is VariableDef
  graphdef, state = nnx.split(v, graph=False)
  assert state is v and type(graphdef.nodes[0]) is TreeNodeDef
  assert type(graphdef.nodes[1]) is VariableDef and graphdef.nodes[1].index == 0


def test_tree_mode_root_describes_the_whole_tree_with_sorted_paths():
  Pt = tp.NamedTuple('Pt', [('y', tp.Any), ('x', tp.Any)])
  tree = {'b': Pt(nnx.Param(1.0), jnp.zeros(1)), 'a': [nnx.BatchStat(2.0)]}
  graphdef, _ = nnx.split(tree, graph=False)
  head, *variables = graphdef.nodes
  assert type(head) is TreeNodeDef and head.type is dict
  paths = [p for p, _ in head.path_index]
  assert paths == [('a', 0), ('b', 'x'), ('b', 'y')]
  # the second entry is each leaf's position in the treedef: the namedtuple keeps y before x
  assert [i for _, i in head.path_index] == [0, 2, 1]
  assert head.treedef == jax.tree.structure(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert [(v.type, v.index) for v in variables] == [(nnx.BatchStat, 0), (nnx.Param, 2)]


def test_nodes_is_computed_once_and_is_a_fresh_list_each_time():
  graphdef = nnx.graphdef(Cell())
  first = graphdef.nodes
  first.clear()
  assert len(graphdef.nodes) == 2 and graphdef.nodes[0] == graphdef.nodes[0]


def test_graphdef_and_pure_state_can_be_subscripted_in_annotations():
  def step(pure: nnx.PureState[Cell], graphdef: nnx.GraphDef[Cell]) -> nnx.graphlib.GraphDef[Cell]:
    return graphdef
  assert tp.get_type_hints(step)['graphdef'].__origin__ is nnx.GraphDef
  assert NodeDef[Cell] is not None and NodeRef[Cell] is not None
