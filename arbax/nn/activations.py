"""Activation functions under their NNX names (the ``jax.nn`` implementations).

    >>> import jax.numpy as jnp, arbax as nnx
    >>> nnx.relu(jnp.array([-1.0, 2.0])).tolist()
    [0.0, 2.0]

Layers take them as plain callables: ``nnx.Sequential(layer, nnx.gelu, ...)``.
The learnable ``nnx.PReLU`` is a layer and lives in ``linear.py``.
"""
import jax.numpy as jnp

from jax.nn import (celu, elu, gelu, glu, hard_sigmoid, hard_silu, hard_swish, hard_tanh,  # noqa: F401
                    leaky_relu, log_sigmoid, log_softmax, logsumexp, one_hot, relu, relu6, selu,
                    sigmoid, silu, soft_sign, softmax, softplus, standardize, swish, sparse_plus,
                    sparse_sigmoid, squareplus, mish, identity)

tanh = jnp.tanh

__all__ = ['celu', 'elu', 'gelu', 'glu', 'hard_sigmoid', 'hard_silu', 'hard_swish', 'hard_tanh',
           'leaky_relu', 'log_sigmoid', 'log_softmax', 'logsumexp', 'one_hot', 'relu', 'relu6',
           'selu', 'sigmoid', 'silu', 'soft_sign', 'softmax', 'softplus', 'standardize', 'swish',
           'sparse_plus', 'sparse_sigmoid', 'squareplus', 'mish', 'identity', 'tanh']
