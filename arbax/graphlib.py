"""``nnx.graphlib``: the graph-mode switches and the graph API under NNX's module name.

    >>> import arbax as nnx
    >>> with nnx.graphlib.set_graph_mode(True):   # graph mode for this block only
    ...   pass

``set_graph_mode(flag)`` / ``set_graph_updates(flag)`` change the global
default when called, and restore the previous one when used as a ``with``
block. Every API taking ``graph=`` uses the default when passed ``None``.
"""
from arbax._settings import set_graph_mode, set_graph_updates
from arbax.graph import GraphDef
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,
                       find_duplicates, recursive_map, flatten, unflatten, variables)

__all__ = ['set_graph_mode', 'set_graph_updates', 'GraphDef', 'split', 'merge', 'state', 'update',
           'graphdef', 'clone', 'pop', 'iter_graph', 'find_duplicates', 'recursive_map', 'flatten',
           'unflatten', 'variables']
