"""arbax: the NNX programming model for JAX. ``import arbax as nnx``.

This module only re-exports; each name lives in the file named in the README.
"""
from arbax import checkpoint, errors, filters, graphlib  # noqa: F401
from arbax._settings import set_graph_mode, set_graph_updates  # noqa: F401
from arbax.variables import (Variable, Param, BatchStat, Cache, Intermediate, Perturbation,  # noqa: F401
                             VarMeta, var_defaults, register_variable_name,
                             variable_name_from_type, variable_type_from_name)
from arbax.pytree import (Pytree, List, Dict, data, static, dataclass, Data, Static,  # noqa: F401
                          Object, is_data, has_data, register_data_type, check_pytree)
from arbax.module import (Module, Sequential, iter_modules, iter_children, view,  # noqa: F401
                          iter_module_children, with_attributes, set_metadata)
from arbax.state import (State, FlatState, to_flat_state, from_flat_state, to_pure_dict,  # noqa: F401
                         replace_by_pure_dict, filter_state, split_state, merge_state, map_state,
                         restore_int_paths)
from arbax.filters import (All, Any, Not, Everything, Nothing, OfType, PathContains,  # noqa: F401
                           WithTag)
from arbax.graph import GraphDef  # noqa: F401
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,  # noqa: F401
                       variables, find_duplicates, recursive_map, flatten, unflatten, call,
                       as_pure, pure, map)
from arbax.rngs import (Rngs, RngStream, RngState, RngKey, RngCount, split_rngs, reseed,  # noqa: F401
                        fork_rngs, with_rngs, restore_rngs)
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

# The NNX module names users import (``nnx.statelib.State``). Looked up in sys.modules
# because functions of the same name (nnx.state, nnx.variables) shadow the submodules.
import sys as _sys  # noqa: E402
filterlib = _sys.modules['arbax.filters']
statelib = _sys.modules['arbax.state']
rnglib = _sys.modules['arbax.rngs']
variablelib = _sys.modules['arbax.variables']
pytreelib = _sys.modules['arbax.pytree']
del _sys
