"""arbax: the NNX programming model for JAX. ``import arbax as nnx``.

This module only re-exports; each name lives in the file named in the README.
"""
import os as _os

# Tracebacks through JAX transforms hide arbax's internal frames, as they hide JAX's own:
# the user sees their function and the line that raised. (JAX_TRACEBACK_FILTERING=off shows all.)
try:
  from jax._src import traceback_util as _traceback_util
  _traceback_util.register_exclusion(_os.path.dirname(__file__))
except (ImportError, AttributeError):  # another JAX layout: tracebacks are just longer
  pass

from arbax import checkpoint, errors, filters, graphlib  # noqa: F401
from arbax.caches import clear_caches  # noqa: F401  (arbax-only: empties module-level caches)
from arbax._settings import set_graph_mode, set_graph_updates  # noqa: F401
from arbax.variables import (A, Variable, Param, BatchStat, Cache, Intermediate,  # noqa: F401
                             Perturbation, VarMeta, VariableMetadata, var_defaults,
                             register_variable_name, variable_name_from_type,
                             variable_type_from_name)
from arbax.pytree import (Pytree, List, Dict, data, static, dataclass, Data, Static,  # noqa: F401
                          Object, is_data, has_data, register_data_type, check_pytree)
from arbax.module import (Module, Sequential, iter_modules, iter_children, view,  # noqa: F401
                          iter_module_children, with_attributes, set_metadata, view_info, M)
from arbax.capture import capture  # noqa: F401
from arbax import ids, traversals  # noqa: F401
from arbax.state import (State, FlatState, to_flat_state, from_flat_state, to_pure_dict,  # noqa: F401
                         replace_by_pure_dict, filter_state, split_state, merge_state, map_state,
                         restore_int_paths)
from arbax.filters import (All, Any, Not, Everything, Nothing, OfType, PathContains,  # noqa: F401
                           WithTag)
from arbax.graph import GraphDef  # noqa: F401
from arbax.api import (split, merge, state, update, graphdef, clone, pop, iter_graph,  # noqa: F401
                       variables, find_duplicates, recursive_map, flatten, unflatten, call,
                       as_pure, pure, map, unpack, PureState)
from arbax.state import GraphState  # noqa: F401
from arbax.contexts import (UpdateContext, update_context, current_update_context,  # noqa: F401
                            SplitContext, split_context, MergeContext, merge_context)
from arbax.extract import NodeStates, to_tree, from_tree, prefix  # noqa: F401
from arbax import extract  # noqa: F401
from arbax.rngs import (Rngs, RngStream, RngState, RngKey, RngCount, split_rngs, reseed,  # noqa: F401
                        fork_rngs, with_rngs, restore_rngs)
from arbax.display import display  # noqa: F401
from arbax.summary import tabulate  # noqa: F401
from arbax.errors import TraceContextError  # noqa: F401
from arbax.transforms import *  # noqa: F401,F403
from arbax.transforms import jit, jit_partial, JitWrapped  # noqa: F401
from arbax.nn import *  # noqa: F401,F403
from arbax.nn import initializers  # noqa: F401
from arbax.training import *  # noqa: F401,F403
from arbax.training import metrics  # noqa: F401
from arbax.hijax import *  # noqa: F401,F403
from arbax.sharding import *  # noqa: F401,F403
from arbax.spmd import *  # noqa: F401,F403
from arbax import compat, spmd  # noqa: F401,E402
from arbax.transforms.shard_map import *  # noqa: F401,F403
from arbax.helpers import TrainState  # noqa: F401,E402
from arbax import helpers, summary  # noqa: F401,E402

# The NNX module names users import (``nnx.statelib.State``). Looked up in sys.modules
# because functions of the same name (nnx.state, nnx.variables) shadow the submodules.
import sys as _sys  # noqa: E402
filterlib = _sys.modules['arbax.filters']
statelib = _sys.modules['arbax.state']
rnglib = _sys.modules['arbax.rngs']
variablelib = _sys.modules['arbax.variables']
pytreelib = _sys.modules['arbax.pytree']
# NNX's other names of two modules: nnx.object (the pytree module), nnx.visualization (display).
# Entered in sys.modules too, so ``import arbax.visualization`` finds them as well.
object = pytreelib  # noqa: A001
visualization = _sys.modules['arbax.display']
_sys.modules.setdefault('arbax.object', object)
_sys.modules.setdefault('arbax.visualization', visualization)
del _sys


def __getattr__(name):
  # NNX's removed name, still found in older code: a deprecated alias of Variable.
  if name == 'VariableState':
    import warnings
    warnings.warn("'VariableState' was removed: it is an alias of 'Variable' now. Use "
                  'nnx.Variable instead.', DeprecationWarning, stacklevel=2)
    return Variable
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
