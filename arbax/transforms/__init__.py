"""NNX transforms: JAX transforms that carry Variable updates in and out."""
from arbax.transforms.jit import jit, JitWrapped  # noqa: F401
