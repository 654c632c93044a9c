"""arbax: the NNX programming model for JAX. ``import arbax as nnx``.

This module only re-exports; each name lives in the file named in the README.
"""
from arbax import checkpoint, errors, filters, graphlib  # noqa: F401
from arbax._settings import set_graph_mode, set_graph_updates  # noqa: F401
from arbax.variables import (Variable, Param, BatchStat, Cache, Intermediate, Perturbation,  # noqa: F401
                             VarMeta, var_defaults)
from arbax.pytree import Pytree, List, Dict, data, static, dataclass  # noqa: F401
from arbax.module import Module, Sequential, iter_modules, iter_children, view  # noqa: F401
from arbax.state import (State, FlatState, to_flat_state, from_flat_state, to_pure_dict,  # noqa: F401
                         replace_by_pure_dict, filter_state, split_state, merge_state, map_state,
                         restore_int_paths)
from arbax.filters import (All, Any, Not, Everything, Nothing, OfType, PathContains,  # noqa: F401
                           WithTag)
from arbax.graph import GraphDef  # noqa: F401
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,  # noqa: F401
                       variables, find_duplicates, recursive_map, flatten, unflatten)
from arbax.rngs import (Rngs, RngStream, RngState, RngKey, RngCount, split_rngs, reseed,  # noqa: F401
                        fork_rngs)
from arbax.display import display, tabulate  # noqa: F401
from arbax.errors import TraceContextError  # noqa: F401
from arbax.transforms import *  # noqa: F401,F403
from arbax.transforms import jit, JitWrapped  # noqa: F401
from arbax.nn import *  # noqa: F401,F403
from arbax.nn import initializers  # noqa: F401
from arbax.training import *  # noqa: F401,F403
from arbax.training import metrics  # noqa: F401
from arbax.hijax import *  # noqa: F401,F403
from arbax.sharding import *  # noqa: F401,F403
from arbax.transforms.shard_map import *  # noqa: F401,F403
