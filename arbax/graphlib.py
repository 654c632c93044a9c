"""``nnx.graphlib``: the graph-mode switches and the graph API under NNX's module name."""
from arbax._settings import set_graph_mode, set_graph_updates  # noqa: F401
from arbax.graph import GraphDef, flatten as flatten_graph, unflatten as unflatten_graph  # noqa: F401
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,  # noqa: F401
                       find_duplicates, recursive_map, flatten, unflatten, variables)
