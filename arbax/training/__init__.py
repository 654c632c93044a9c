"""Training utilities: the optax-backed Optimizer, metrics, EMA."""
from arbax.training import metrics  # noqa: F401
from arbax.training.optimizer import *  # noqa: F401,F403
from arbax.training.metrics import *  # noqa: F401,F403
from arbax.training.ema import *  # noqa: F401,F403
