"""NNX transforms: JAX transforms that carry Variable updates in and out.

``_propagate`` is the shared mechanism; each file is one family of transforms.
"""
from arbax.transforms.jit import jit, jit_partial, JitWrapped  # noqa: F401
from arbax.transforms.autodiff import *  # noqa: F401,F403
from arbax.transforms.iteration import *  # noqa: F401,F403
from arbax.transforms.control import *  # noqa: F401,F403
from arbax.transforms.metadata import *  # noqa: F401,F403
