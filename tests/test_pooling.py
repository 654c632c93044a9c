"""Pooling functions against explicit window loops."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

X = jax.random.normal(jax.random.key(1), (2, 5, 6, 3))


def window_reference(x, window, strides, pads, reduce, fill):
  """Loop over output positions of (batch, h, w, c) and reduce each padded window."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)], constant_values=fill)
  out_h = (x.shape[1] - window[0]) // strides[0] + 1
  out_w = (x.shape[2] - window[1]) // strides[1] + 1
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i, j in itertools.product(range(out_h), range(out_w)):
    win = x[:, i * strides[0]:i * strides[0] + window[0], j * strides[1]:j * strides[1] + window[1]]
    out[:, i, j] = reduce(win, axis=(1, 2))
  return out


@pytest.mark.parametrize('strides, padding, pads', [
    (None, 'VALID', [(0, 0), (0, 0)]), ((2, 1), [(1, 0), (2, 1)], [(1, 0), (2, 1)]),
    ((1, 3), 'VALID', [(0, 0), (0, 0)])])
def test_max_min_and_avg_pool(strides, padding, pads):
  window = (2, 3)
  s = strides or (1, 1)
  np.testing.assert_allclose(nnx.max_pool(X, window, strides, padding),
                             window_reference(X, window, s, pads, np.max, -np.inf), rtol=1e-6)
  np.testing.assert_allclose(nnx.min_pool(X, window, strides, padding),
                             window_reference(X, window, s, pads, np.min, np.inf), rtol=1e-6)
  np.testing.assert_allclose(nnx.avg_pool(X, window, strides, padding),
                             window_reference(X, window, s, pads, np.mean, 0.0), rtol=1e-5,
                             atol=1e-6)


def test_same_padding_keeps_the_size_and_padding_never_wins_a_max():
  x = -jnp.ones((1, 3, 1))
  np.testing.assert_array_equal(nnx.max_pool(x, (2,), padding='SAME'), -np.ones((1, 3, 1)))
  assert nnx.max_pool(X, (3, 3), padding='SAME').shape == X.shape


def test_avg_pool_count_include_pad():
  x = jnp.ones((1, 3, 1))
  np.testing.assert_allclose(nnx.avg_pool(x, (2,), padding='SAME').ravel(), [1, 1, 0.5])
  np.testing.assert_allclose(
      nnx.avg_pool(x, (2,), padding=((1, 1),), count_include_pad=False).ravel(), [1, 1, 1, 1])
  np.testing.assert_allclose(nnx.avg_pool(x, (2,), padding=((1, 1),)).ravel(),
                             [0.5, 1, 1, 0.5])


def test_unbatched_and_multi_batch_inputs():
  y = nnx.max_pool(X, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(nnx.max_pool(X[0], (2, 2), strides=(2, 2)), y[0])
  stacked = nnx.avg_pool(jnp.stack([X, 2 * X]), (2, 2))
  assert stacked.shape == (2, 2, 4, 5, 3)
  np.testing.assert_allclose(stacked[1], 2 * nnx.avg_pool(X, (2, 2)), rtol=1e-6)


def test_integer_inputs():
  x = jnp.arange(6, dtype=jnp.int32).reshape(1, 6, 1)
  y = nnx.max_pool(x, (2,), strides=(2,))
  assert y.dtype == jnp.int32 and y.ravel().tolist() == [1, 3, 5]
  assert nnx.min_pool(x, (3,), strides=(3,)).ravel().tolist() == [0, 3]
  assert jnp.issubdtype(nnx.avg_pool(x, (2,)).dtype, jnp.floating)


def test_pool_with_a_custom_reduction():
  x = jnp.arange(4.0).reshape(1, 4, 1)
  y = nnx.pool(x, 1.0, jax.lax.mul, (2,), (2,), 'VALID')
  assert y.ravel().tolist() == [0.0, 6.0]
  assert nnx.pool(x, 0.0, jax.lax.add, (2,), None, 'VALID').ravel().tolist() == [1.0, 3.0, 5.0]


def test_argument_errors():
  with pytest.raises(TypeError, match='window_shape'):
    nnx.max_pool(X, 2)
  with pytest.raises(AssertionError, match='padding'):
    nnx.max_pool(X, (2, 2), padding=((1, 1),))
  with pytest.raises(AssertionError):
    nnx.avg_pool(X, (2, 2), strides=(1,))


def test_pooling_is_differentiable_and_jittable():
  g = jax.grad(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)).sum())(X)
  # Each non-overlapping window passes gradient 1 to exactly its maximum.
  assert float(g.sum()) == 2 * 2 * 3 * 3
  np.testing.assert_allclose(jax.jit(lambda x: nnx.avg_pool(x, (2, 2)))(X), nnx.avg_pool(X, (2, 2)),
                             rtol=1e-6)
