"""Conv and ConvTranspose: kernels, every padding mode, dilation, groups, masks, batching, grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_over_layers

NORMAL = nnx.initializers.normal(1.0)
X1 = jax.random.normal(jax.random.key(1), (2, 7, 3))        # (batch, length, features)
X2 = jax.random.normal(jax.random.key(2), (2, 6, 5, 4))     # (batch, h, w, features)
X3 = jax.random.normal(jax.random.key(3), (1, 4, 5, 3, 2))  # (batch, d, h, w, features)
DN = {1: ('NHC', 'HIO', 'NHC'), 2: ('NHWC', 'HWIO', 'NHWC'), 3: ('NDHWC', 'DHWIO', 'NDHWC')}


def reference_conv(x, kernel, bias=None, strides=1, padding='SAME', lhs_dilation=1,
                   rhs_dilation=1, groups=1):
  n = kernel.ndim - 2

  def rep(v):
    return (v,) * n if isinstance(v, int) else tuple(v)

  y = lax.conv_general_dilated(x, kernel, rep(strides), padding, lhs_dilation=rep(lhs_dilation),
                               rhs_dilation=rep(rhs_dilation), dimension_numbers=DN[n],
                               feature_group_count=groups)
  return y if bias is None else y + bias


def grads_of(model, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, nnx.clone(rest))(x) ** 2)

  return jax.grad(loss)(params)


def assert_grads_everywhere(model, x):
  grads = grads_of(model, x)
  assert set(grads) == set(nnx.state(model, nnx.Param))
  for g in jax.tree.leaves(grads):
    assert float(jnp.abs(g).sum()) > 0


# -- Conv -------------------------------------------------------------------------
def test_conv_parameters():
  conv = nnx.Conv(4, 6, (3, 2), rngs=nnx.Rngs(0))
  assert set(nnx.state(conv)) == {'kernel', 'bias'}
  assert conv.kernel.shape == (3, 2, 4, 6) and conv.bias.shape == (6,)
  assert conv.kernel_size == (3, 2)
  key = jax.random.fold_in(jax.random.key(0), 0)
  np.testing.assert_allclose(conv.kernel[...],
                             jax.nn.initializers.lecun_normal()(key, (3, 2, 4, 6)), rtol=1e-6)


def test_conv_int_kernel_size_means_one_spatial_axis():
  conv = nnx.Conv(3, 5, 3, rngs=nnx.Rngs(0))
  assert conv.kernel_size == (3,) and conv.kernel.shape == (3, 3, 5)
  assert conv(X1).shape == (2, 7, 5)


@pytest.mark.parametrize('padding, strides, dilation', [
    ('SAME', 1, 1), ('SAME', 2, 2), ('VALID', 3, 1), (2, 1, 2), ([(1, 0)], 2, 1), ([(0, 2)], 1, 1)])
def test_conv_1d_matches_lax(padding, strides, dilation):
  conv = nnx.Conv(3, 4, (3,), strides=strides, padding=padding, kernel_dilation=dilation,
                  bias_init=NORMAL, rngs=nnx.Rngs(0))
  lax_padding = [(padding, padding)] if isinstance(padding, int) else padding
  expected = reference_conv(X1, conv.kernel[...], conv.bias[...], strides, lax_padding,
                            rhs_dilation=dilation)
  np.testing.assert_allclose(conv(X1), expected, rtol=1e-5, atol=1e-5)


# lax only supports input dilation with explicit padding.
@pytest.mark.parametrize('padding, input_dilation', [('SAME', 1), ([(0, 1), (2, 1)], (1, 2))])
def test_conv_2d_with_groups_strides_and_input_dilation(padding, input_dilation):
  conv = nnx.Conv(4, 6, (3, 2), strides=(2, 1), padding=padding, feature_group_count=2,
                  input_dilation=input_dilation, bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert conv.kernel.shape == (3, 2, 2, 6)
  expected = reference_conv(X2, conv.kernel[...], conv.bias[...], (2, 1), padding,
                            lhs_dilation=input_dilation, groups=2)
  np.testing.assert_allclose(conv(X2), expected, rtol=1e-5, atol=1e-5)


def test_conv_3d():
  conv = nnx.Conv(2, 3, (2, 3, 2), rngs=nnx.Rngs(0), use_bias=False)
  assert conv.bias is None
  np.testing.assert_allclose(conv(X3), reference_conv(X3, conv.kernel[...]), rtol=1e-5,
                             atol=1e-5)


def test_conv_circular_padding_wraps_around():
  conv = nnx.Conv(3, 4, (3,), padding='CIRCULAR', use_bias=False, rngs=nnx.Rngs(0))
  k = conv.kernel[...]
  # y[t] = sum_j x[(t + j - 1) mod n] @ k[j]
  expected = sum(jnp.roll(X1, 1 - j, axis=1) @ k[j] for j in range(3))
  np.testing.assert_allclose(conv(X1), expected, rtol=1e-5, atol=1e-5)


def test_conv_reflect_padding():
  conv = nnx.Conv(3, 4, (3,), padding='REFLECT', use_bias=False, rngs=nnx.Rngs(0))
  padded = np.pad(np.asarray(X1), [(0, 0), (1, 1), (0, 0)], mode='reflect')
  expected = reference_conv(jnp.asarray(padded), conv.kernel[...], padding='VALID')
  np.testing.assert_allclose(conv(X1), expected, rtol=1e-5, atol=1e-5)


def test_conv_causal_padding_only_looks_back():
  conv = nnx.Conv(3, 4, (3,), padding='CAUSAL', kernel_dilation=2, rngs=nnx.Rngs(0))
  y = conv(X1)
  assert y.shape == X1.shape[:2] + (4,)
  changed = conv(X1.at[:, 4].add(10.0))
  np.testing.assert_allclose(changed[:, :4], y[:, :4], rtol=1e-6)
  assert not np.allclose(changed[:, 4], y[:, 4])
  expected = reference_conv(X1, conv.kernel[...], conv.bias[...], padding=[(4, 0)],
                            rhs_dilation=2)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_conv_causal_padding_is_1d_only():
  with pytest.raises(ValueError, match='1D'):
    nnx.Conv(4, 6, (3, 2), padding='CAUSAL', rngs=nnx.Rngs(0))(X2)


@pytest.mark.parametrize('padding', [(1, 2), ((0, 1), (2, 0), (1, 1))])
def test_conv_rejects_padding_of_the_wrong_length(padding):
  with pytest.raises(ValueError, match='Invalid padding'):
    nnx.Conv(3, 4, (3,), padding=padding, rngs=nnx.Rngs(0))(X1)


def test_conv_mask_zeroes_kernel_entries():
  mask = jnp.zeros((3, 3, 4)).at[:2].set(1.0)    # drop the last tap
  conv = nnx.Conv(3, 4, (3,), mask=mask, use_bias=False, rngs=nnx.Rngs(0))
  expected = reference_conv(X1, conv.kernel[...] * mask)
  np.testing.assert_allclose(conv(X1), expected, rtol=1e-5, atol=1e-5)
  bad = nnx.Conv(3, 4, (3,), mask=jnp.ones((3, 3, 5)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='Mask'):
    bad(X1)


def test_conv_accepts_unbatched_and_multi_batch_inputs():
  conv = nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(conv(X1[0]), conv(X1)[0], rtol=1e-5, atol=1e-6)
  stacked = jnp.stack([X1, 2 * X1])
  y = conv(stacked)
  assert y.shape == (2, 2, 7, 4)
  np.testing.assert_allclose(y[1], conv(2 * X1), rtol=1e-5, atol=1e-5)


def test_conv_wrong_feature_count_is_an_error():
  with pytest.raises((TypeError, ValueError)):
    nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0))(X2)   # 4 features where 3 are expected


@pytest.mark.parametrize('dtype, param_dtype, out', [
    (jnp.bfloat16, jnp.float32, jnp.bfloat16), (None, jnp.bfloat16, jnp.float32)])
def test_conv_dtypes(dtype, param_dtype, out):
  conv = nnx.Conv(3, 4, (3,), dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  assert conv.kernel.dtype == param_dtype
  assert conv(X1).dtype == out


def test_conv_gradients_and_jit():
  conv = nnx.Conv(4, 6, (3, 2), strides=2, rngs=nnx.Rngs(0))
  assert_grads_everywhere(conv, X2)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(conv, X2), conv(X2), rtol=1e-5,
                             atol=1e-6)


# -- ConvTranspose ------------------------------------------------------------------
def test_conv_transpose_parameters():
  up = nnx.ConvTranspose(3, 4, 3, rngs=nnx.Rngs(0))
  assert up.kernel.shape == (3, 3, 4) and up.bias.shape == (4,)
  flipped = nnx.ConvTranspose(3, 4, (3, 2), transpose_kernel=True, rngs=nnx.Rngs(0))
  assert flipped.kernel.shape == (3, 2, 4, 3)


@pytest.mark.parametrize('padding, strides, dilation', [
    ('SAME', 1, 1), ('SAME', 2, 2), ('VALID', 3, 1), ([(1, 2)], 2, 1), (1, 1, 2)])
def test_conv_transpose_1d_matches_lax(padding, strides, dilation):
  up = nnx.ConvTranspose(3, 4, (3,), strides=strides, padding=padding, kernel_dilation=dilation,
                         bias_init=NORMAL, rngs=nnx.Rngs(0))
  lax_padding = [(padding, padding)] if isinstance(padding, int) else padding
  expected = lax.conv_transpose(X1, up.kernel[...], (strides,), lax_padding,
                                rhs_dilation=(dilation,), dimension_numbers=DN[1])
  np.testing.assert_allclose(up(X1), expected + up.bias[...], rtol=1e-5, atol=1e-5)


def test_conv_transpose_same_multiplies_the_size_by_the_stride():
  up = nnx.ConvTranspose(4, 6, (3, 2), strides=(2, 3), rngs=nnx.Rngs(0))
  assert up(X2).shape == (2, 12, 15, 6)
  assert up(X2[0]).shape == (12, 15, 6)


def test_conv_transpose_with_transposed_kernel_matches_lax():
  up = nnx.ConvTranspose(4, 6, (3, 2), strides=2, transpose_kernel=True, rngs=nnx.Rngs(0))
  expected = lax.conv_transpose(X2, up.kernel[...], (2, 2), 'SAME', dimension_numbers=DN[2],
                                transpose_kernel=True)
  np.testing.assert_allclose(up(X2), expected + up.bias[...], rtol=1e-5, atol=1e-5)


def circular_transpose_reference(x, kernel, stride):
  """The unpadded result scatters x[i] * k[j] to i*s + (k-1-j) (lax correlates, unflipped);
  CIRCULAR wraps it onto n*s positions, centred: position p goes to (p - offset) mod (n*s)."""
  x, kernel = np.asarray(x), np.asarray(kernel)
  n, k = x.shape[1], kernel.shape[0]
  size = n * stride
  full = (n - 1) * stride + k
  offset = (full - size) // 2
  out = np.zeros((x.shape[0], size, kernel.shape[-1]), np.float32)
  for i in range(n):
    for j in range(k):
      out[:, (i * stride + k - 1 - j - offset) % size] += x[:, i] @ kernel[j]
  return out


@pytest.mark.parametrize('stride, k', [(1, 3), (2, 4), (3, 3)])
def test_conv_transpose_circular_wraps_the_full_result(stride, k):
  up = nnx.ConvTranspose(3, 4, (k,), strides=stride, padding='CIRCULAR', use_bias=False,
                         rngs=nnx.Rngs(0))
  y = up(X1)
  assert y.shape == (2, 7 * stride, 4)
  np.testing.assert_allclose(y, circular_transpose_reference(X1, up.kernel[...], stride),
                             rtol=1e-4, atol=1e-4)


def test_conv_transpose_mask_and_bad_mask():
  mask = jnp.ones((3, 3, 4)).at[1].set(0.0)
  up = nnx.ConvTranspose(3, 4, (3,), mask=mask, use_bias=False, rngs=nnx.Rngs(0))
  expected = lax.conv_transpose(X1, up.kernel[...] * mask, (1,), 'SAME', dimension_numbers=DN[1])
  np.testing.assert_allclose(up(X1), expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='Mask'):
    nnx.ConvTranspose(3, 4, (3,), mask=jnp.ones((2, 3, 4)), rngs=nnx.Rngs(0))(X1)


def test_conv_transpose_gradients_and_jit():
  up = nnx.ConvTranspose(4, 6, (3, 2), strides=2, padding='CIRCULAR', rngs=nnx.Rngs(0))
  assert_grads_everywhere(up, X2)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(up, X2), up(X2), rtol=1e-5, atol=1e-6)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------


@pytest.mark.parametrize('cls', [nnx.Conv, nnx.ConvTranspose])
def test_ensemble_under_vmap_and_stack_under_scan(cls):
  make = lambda rngs: cls(3, 3, (2,), rngs=rngs)  # noqa: E731
  x = jax.random.normal(jax.random.key(3), (2, 4, 3))
  layers = check_ensemble(make, x, n=2)
  assert layers.kernel.shape == (2, 2, 3, 3)
  check_scan_over_layers(make, x, n=3)
