"""The layer library (``nnx.Linear``, ``nnx.Conv``, ...): one family of layers per file."""
from arbax.nn import initializers  # noqa: F401
from arbax.nn.initializers import Initializer  # noqa: F401  (``nnx.Initializer``, a type alias)
from arbax.nn.activations import *  # noqa: F401,F403
from arbax.nn.linear import *  # noqa: F401,F403
from arbax.nn.conv import *  # noqa: F401,F403
from arbax.nn.embed import *  # noqa: F401,F403
from arbax.nn.pooling import *  # noqa: F401,F403
from arbax.nn.normalization import *  # noqa: F401,F403
from arbax.nn.attention import *  # noqa: F401,F403
from arbax.nn.recurrent import *  # noqa: F401,F403
from arbax.nn.stochastic import *  # noqa: F401,F403
from arbax.nn.lora import *  # noqa: F401,F403
