"""Activations: every NNX activation name is exported and computes the standard function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.nn import activations

X = jnp.array([-2.0, -0.5, 0.0, 0.5, 3.0])


def test_every_name_in_all_is_exported_on_nnx():
  for name in activations.__all__:
    assert getattr(nnx, name) is getattr(activations, name), name


@pytest.mark.parametrize('name,reference', [
    ('relu', lambda x: np.maximum(x, 0)),
    ('relu6', lambda x: np.clip(x, 0, 6)),
    ('sigmoid', lambda x: 1 / (1 + np.exp(-x))),
    ('tanh', np.tanh),
    ('softplus', lambda x: np.log1p(np.exp(x))),
    ('silu', lambda x: x / (1 + np.exp(-x))),
    ('swish', lambda x: x / (1 + np.exp(-x))),
    ('elu', lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    ('leaky_relu', lambda x: np.where(x >= 0, x, 0.01 * x)),
    ('log_sigmoid', lambda x: -np.log1p(np.exp(-x))),
    ('soft_sign', lambda x: x / (1 + np.abs(x))),
    ('hard_tanh', lambda x: np.clip(x, -1, 1)),
    ('identity', lambda x: x),
    ('softmax', lambda x: np.exp(x) / np.exp(x).sum()),
    ('log_softmax', lambda x: x - np.log(np.exp(x).sum())),
])
def test_activation_values(name, reference):
  np.testing.assert_allclose(getattr(nnx, name)(X), reference(np.asarray(X)), rtol=1e-5, atol=1e-6)


def test_gelu_approximate_and_exact():
  from math import erf
  exact = np.array([0.5 * x * (1 + erf(x / np.sqrt(2))) for x in np.asarray(X)])
  np.testing.assert_allclose(nnx.gelu(X, approximate=False), exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nnx.gelu(X), jax.nn.gelu(X), rtol=1e-6)


def test_one_hot_standardize_and_logsumexp():
  np.testing.assert_array_equal(nnx.one_hot(jnp.array([0, 2]), 3), [[1, 0, 0], [0, 0, 1]])
  z = nnx.standardize(X)
  np.testing.assert_allclose([float(z.mean()), float(z.std())], [0.0, 1.0], atol=1e-5)
  np.testing.assert_allclose(nnx.logsumexp(X), np.log(np.exp(np.asarray(X)).sum()), rtol=1e-6)


def test_activations_accept_variables():
  np.testing.assert_allclose(nnx.relu(nnx.Param(X)), np.maximum(np.asarray(X), 0))


def test_activations_compose_in_sequential():
  seq = nnx.Sequential(nnx.relu, nnx.tanh)
  np.testing.assert_allclose(seq(X), np.tanh(np.maximum(np.asarray(X), 0)), rtol=1e-6)
