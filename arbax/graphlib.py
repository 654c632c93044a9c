"""``nnx.graphlib``: the graph-mode switches and the graph API under NNX's module name.

    >>> import arbax as nnx
    >>> with nnx.graphlib.set_graph_mode(False):   # tree mode for this block only
    ...   pass

``set_graph_mode(flag)`` / ``set_graph_updates(flag)`` change the global
default when called, and restore the previous one when used as a ``with``
block. Every API taking ``graph=`` uses the default when passed ``None``.
The names below live in ``arbax.api`` (the State API), ``arbax.refmaps``
(shared index spaces), ``arbax.contexts`` (split/merge/update contexts) and
``arbax.nodedefs`` (the entries of ``GraphDef.nodes``).
"""
from arbax._settings import set_graph_mode, set_graph_updates
from arbax.graph import GraphDef
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,
                       find_duplicates, recursive_map, flatten, unflatten, variables, unpack,
                       PureState)
from arbax.contexts import (UpdateContext, update_context, current_update_context, SplitContext,
                            split_context, MergeContext, merge_context)
from arbax.nodedefs import NodeDef, NodeRef, VariableDef, TreeNodeDef
from arbax.refmaps import RefMap, IndexMap, NoUpdate, ArrayRefOutput
from arbax.state import FlatState, GraphState, State

__all__ = ['set_graph_mode', 'set_graph_updates', 'GraphDef', 'split', 'merge', 'state', 'update',
           'graphdef', 'clone', 'pop', 'iter_graph', 'find_duplicates', 'recursive_map', 'flatten',
           'unflatten', 'variables', 'unpack', 'PureState', 'UpdateContext', 'update_context',
           'current_update_context', 'SplitContext', 'split_context', 'MergeContext',
           'merge_context', 'NodeDef', 'NodeRef', 'VariableDef', 'TreeNodeDef', 'RefMap',
           'IndexMap', 'NoUpdate', 'ArrayRefOutput', 'FlatState', 'GraphState', 'State']
