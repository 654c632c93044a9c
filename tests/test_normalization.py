"""Normalization layers against statistics computed with jnp in the test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_broadcast, check_scan_over_layers

NORMAL = nnx.initializers.normal(1.0)
X = jax.random.normal(jax.random.key(1), (4, 3, 6)) * 2 + 1
X4 = jax.random.normal(jax.random.key(2), (2, 3, 4, 6))
MASK = jax.random.bernoulli(jax.random.key(3), 0.7, X.shape)


def standardize(x, axes, eps):
  mean = x.mean(axes, keepdims=True)
  return (x - mean) / jnp.sqrt(x.var(axes, keepdims=True) + eps)


def grads_of(model, x, **kwargs):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    y = nnx.merge(graphdef, params, nnx.clone(rest))(x, **kwargs)
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size)  # not invariant to shifts

  return jax.grad(loss)(params)


def assert_grads_everywhere(model, x, **kwargs):
  grads = grads_of(model, x, **kwargs)
  assert jax.tree.leaves(grads)
  for g in jax.tree.leaves(grads):
    assert float(jnp.abs(g).sum()) > 0


# -- LayerNorm / RMSNorm ---------------------------------------------------------------
@pytest.mark.parametrize('fast', [True, False])
def test_layer_norm(fast):
  norm = nnx.LayerNorm(6, scale_init=NORMAL, bias_init=NORMAL, use_fast_variance=fast,
                       rngs=nnx.Rngs(0))
  assert set(nnx.state(norm)) == {'scale', 'bias'} and norm.scale.shape == (6,)
  expected = standardize(X, -1, 1e-6) * norm.scale[...] + norm.bias[...]
  np.testing.assert_allclose(norm(X), expected, rtol=1e-4, atol=1e-4)


def test_layer_norm_defaults_and_switches():
  norm = nnx.LayerNorm(6, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(norm.scale[...], np.ones(6))
  np.testing.assert_array_equal(norm.bias[...], np.zeros(6))
  assert norm.epsilon == 1e-6
  bare = nnx.LayerNorm(6, use_bias=False, use_scale=False, rngs=nnx.Rngs(0))
  assert bare.scale is None and bare.bias is None and not nnx.state(bare)
  np.testing.assert_allclose(bare(X), standardize(X, -1, 1e-6), rtol=1e-4, atol=1e-4)


def test_layer_norm_over_several_axes():
  norm = nnx.LayerNorm(18, reduction_axes=(1, 2), feature_axes=(1, 2), scale_init=NORMAL,
                       rngs=nnx.Rngs(0))
  expected = standardize(X, (1, 2), 1e-6) * norm.scale[...].reshape(3, 6)
  np.testing.assert_allclose(norm(X), expected, rtol=1e-4, atol=1e-4)


def test_layer_norm_mask_selects_the_entries_that_count():
  norm = nnx.LayerNorm(6, use_fast_variance=False, rngs=nnx.Rngs(0))
  x = np.asarray(X)
  m = np.asarray(MASK)
  mean = (x * m).sum(-1, keepdims=True) / m.sum(-1, keepdims=True)
  var = (((x - mean) ** 2) * m).sum(-1, keepdims=True) / m.sum(-1, keepdims=True)
  np.testing.assert_allclose(norm(X, mask=MASK), (x - mean) / np.sqrt(var + 1e-6), rtol=1e-4,
                             atol=1e-4)


def test_rms_norm():
  norm = nnx.RMSNorm(6, scale_init=NORMAL, rngs=nnx.Rngs(0))
  assert set(nnx.state(norm)) == {'scale'}
  expected = X / jnp.sqrt((X ** 2).mean(-1, keepdims=True) + 1e-6) * norm.scale[...]
  np.testing.assert_allclose(norm(X), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layer', [nnx.LayerNorm, nnx.RMSNorm])
@pytest.mark.parametrize('dtype, param_dtype, x_dtype, out', [
    (None, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.int32, jnp.bfloat16)])
def test_output_dtype(layer, dtype, param_dtype, x_dtype, out):
  norm = layer(6, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  assert norm.scale.dtype == param_dtype
  assert norm(X.astype(x_dtype)).dtype == out


def test_low_precision_inputs_get_float32_statistics():
  x = (jnp.arange(6.0) + 1000).astype(jnp.bfloat16)    # var is lost in bf16 arithmetic
  y = nnx.LayerNorm(6, rngs=nnx.Rngs(0))(x)
  np.testing.assert_allclose(y, standardize(x.astype(jnp.float32), -1, 1e-6), atol=0.05)


# -- BatchNorm ------------------------------------------------------------------------
def test_batch_norm_state_names_and_kinds():
  bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  assert set(nnx.state(bn)) == {'mean', 'var', 'scale', 'bias'}
  assert type(bn.mean) is nnx.BatchStat and type(bn.var) is nnx.BatchStat
  assert set(nnx.state(bn, nnx.Param)) == {'scale', 'bias'}
  np.testing.assert_array_equal(bn.mean[...], np.zeros(6))
  np.testing.assert_array_equal(bn.var[...], np.ones(6))
  assert (bn.momentum, bn.epsilon, bn.use_running_average) == (0.99, 1e-5, False)


@pytest.mark.parametrize('fast', [True, False])
def test_batch_norm_training_uses_batch_statistics_and_updates_running_averages(fast):
  bn = nnx.BatchNorm(6, momentum=0.9, scale_init=NORMAL, bias_init=NORMAL,
                     use_fast_variance=fast, rngs=nnx.Rngs(0))
  y = bn(X)
  expected = standardize(X, (0, 1), 1e-5) * bn.scale[...] + bn.bias[...]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], 0.1 * X.mean((0, 1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * X.var((0, 1)), rtol=1e-4)
  bn(2 * X)
  np.testing.assert_allclose(bn.mean[...], 0.09 * X.mean((0, 1)) + 0.1 * 2 * X.mean((0, 1)),
                             rtol=1e-4, atol=1e-6)


def test_batch_norm_evaluation_uses_running_averages_and_changes_nothing():
  bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  bn.mean[...] = jnp.full(6, 2.0)
  bn.var[...] = jnp.full(6, 4.0)
  bn.eval()
  assert bn.use_running_average is True
  np.testing.assert_allclose(bn(X), (X - 2.0) / jnp.sqrt(4.0 + 1e-5), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(bn.mean[...], np.full(6, 2.0))
  bn.train()
  assert bn.use_running_average is False
  bn(X)
  assert not np.allclose(bn.mean[...], 2.0)


def test_batch_norm_call_argument_overrides_the_attribute():
  bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(bn(X, use_running_average=True), X / jnp.sqrt(1 + 1e-5), rtol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], np.zeros(6))


def test_batch_norm_without_a_mode_is_an_error():
  bn = nnx.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='use_running_average'):
    bn(X)


def test_batch_norm_on_another_axis_with_a_mask():
  bn = nnx.BatchNorm(3, axis=1, momentum=0.0, use_fast_variance=False, rngs=nnx.Rngs(0))
  assert bn.mean.shape == (3,)
  bn(X, mask=MASK)
  x, m = np.asarray(X), np.asarray(MASK)
  mean = (x * m).sum((0, 2)) / m.sum((0, 2))
  np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-6)


def test_batch_norm_running_stats_stay_float32():
  bn = nnx.BatchNorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert bn.scale.dtype == jnp.bfloat16 and bn.mean.dtype == jnp.float32
  bn(X.astype(jnp.bfloat16))
  assert bn.mean.dtype == jnp.float32


def test_batch_norm_axis_name_averages_statistics_across_the_mapped_axis():
  bn = nnx.BatchNorm(6, axis_name='devices', momentum=0.0, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(bn)

  def per_device(x):
    m = nnx.merge(graphdef, nnx.clone(state))
    return m(x), nnx.state(m)

  shards = X.reshape(2, 2, 3, 6)
  y, new_state = jax.vmap(per_device, axis_name='devices')(shards)
  np.testing.assert_allclose(y.reshape(X.shape), standardize(X, (0, 1), 1e-5), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(new_state['mean'][...][0], X.mean((0, 1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_state['mean'][...][1], X.mean((0, 1)), rtol=1e-4, atol=1e-6)


def test_batch_norm_in_jit_updates_the_callers_statistics():
  bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  nnx.jit(lambda m, x: m(x))(bn, X)
  np.testing.assert_allclose(bn.mean[...], 0.01 * X.mean((0, 1)), rtol=1e-4, atol=1e-6)


def test_batch_norm_gradients():
  assert_grads_everywhere(nnx.BatchNorm(6, rngs=nnx.Rngs(0)), X)


# -- GroupNorm / InstanceNorm ------------------------------------------------------------
def test_group_norm():
  gn = nnx.GroupNorm(6, num_groups=3, scale_init=NORMAL, bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert (gn.num_groups, gn.group_size) == (3, 2) and set(nnx.state(gn)) == {'scale', 'bias'}
  grouped = X4.reshape(2, 3, 4, 3, 2)
  expected = standardize(grouped, (1, 2, 4), 1e-6).reshape(X4.shape)
  np.testing.assert_allclose(gn(X4), expected * gn.scale[...] + gn.bias[...], rtol=1e-4,
                             atol=1e-4)


def test_group_norm_by_group_size():
  gn = nnx.GroupNorm(6, num_groups=None, group_size=3, rngs=nnx.Rngs(0))
  assert (gn.num_groups, gn.group_size) == (2, 3)
  expected = standardize(X4.reshape(2, 3, 4, 2, 3), (1, 2, 4), 1e-6).reshape(X4.shape)
  np.testing.assert_allclose(gn(X4), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_groups=4), 'does not divide'),
    (dict(num_groups=None, group_size=4), 'not multiple'),
    (dict(num_groups=2, group_size=3), 'Either'),
    (dict(num_groups=None), 'Either')])
def test_group_norm_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nnx.GroupNorm(6, rngs=nnx.Rngs(0), **kwargs)


def test_instance_norm_normalises_each_channel_of_each_example():
  norm = nnx.InstanceNorm(6, scale_init=NORMAL, bias_init=NORMAL, rngs=nnx.Rngs(0))
  expected = standardize(X4, (1, 2), 1e-6) * norm.scale[...] + norm.bias[...]
  np.testing.assert_allclose(norm(X4), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layer', [
    lambda: nnx.LayerNorm(6, rngs=nnx.Rngs(0)), lambda: nnx.RMSNorm(6, rngs=nnx.Rngs(0)),
    lambda: nnx.GroupNorm(6, num_groups=2, rngs=nnx.Rngs(0)),
    lambda: nnx.InstanceNorm(6, rngs=nnx.Rngs(0))])
def test_gradients_and_jit(layer):
  norm = layer()
  assert_grads_everywhere(norm, X4)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(norm, X4), norm(X4), rtol=1e-5,
                             atol=1e-5)


# -- exact values ---------------------------------------------------------------------------
# Statistics are plain means (jnp.mean, where=mask): mean and E[x^2] - mean^2 clipped at 0
# (fast) or E[(x - mean)^2]; then y = (x - mean) * (rsqrt(var + eps) * scale) + bias. Other
# orders of the same maths (sum / count, dividing by sqrt) differ in the last bits.
def reference_stats(x, axes, fast, mask=None):
  mean = jnp.mean(x, axes, where=mask)
  if fast:
    return mean, jnp.maximum(0.0, jnp.mean(jax.lax.square(x), axes, where=mask)
                             - jax.lax.square(mean))
  return mean, jnp.mean(jax.lax.square(x - jnp.expand_dims(mean, axes)), axes, where=mask)


def reference_normalize(x, mean, var, stats_shape, scale, bias, eps):
  y = x - mean.reshape(stats_shape)
  mul = jax.lax.rsqrt(var.reshape(stats_shape) + eps)
  if scale is not None:
    mul = mul * scale
  y = y * mul
  return y if bias is None else y + bias


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize('masked', [False, True])
def test_batch_norm_values_and_running_averages_are_exact(fast, masked):
  mask = MASK if masked else None
  bn = nnx.BatchNorm(6, momentum=0.9, scale_init=NORMAL, bias_init=NORMAL,
                     use_fast_variance=fast, rngs=nnx.Rngs(0))
  y = bn(X, mask=mask)
  mean, var = reference_stats(X, (0, 1), fast, mask)
  expected = reference_normalize(X, mean, var, (1, 1, 6), bn.scale[...], bn.bias[...], 1e-5)
  np.testing.assert_array_equal(y, expected)
  np.testing.assert_array_equal(bn.mean[...], 0.9 * jnp.zeros(6) + (1 - 0.9) * mean)
  np.testing.assert_array_equal(bn.var[...], 0.9 * jnp.ones(6) + (1 - 0.9) * var)


@pytest.mark.parametrize('fast', [True, False])
def test_group_norm_values_are_exact(fast):
  gn = nnx.GroupNorm(6, num_groups=3, scale_init=NORMAL, bias_init=NORMAL,
                     use_fast_variance=fast, rngs=nnx.Rngs(0))
  x = X4 * 3 + 1.5
  mean, var = reference_stats(x.reshape(2, 3, 4, 3, 2), (1, 2, 4), fast)   # (batch, group)
  mean, var = jnp.repeat(mean, 2, axis=1), jnp.repeat(var, 2, axis=1)   # (batch, channel)
  expected = reference_normalize(x, mean, var, (2, 1, 1, 6), gn.scale[...], gn.bias[...], 1e-6)
  np.testing.assert_array_equal(gn(x), expected)


def test_group_norm_mask_may_broadcast_over_examples():
  # A mask of just the channel axis selects the same channels in every example.
  gn = nnx.GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0))
  channels = jnp.array([True, False, True, True, False, True])
  y = gn(X4, mask=channels)
  full = gn(X4, mask=jnp.broadcast_to(channels, X4.shape))
  np.testing.assert_array_equal(y, full)
  mean, var = reference_stats(X4.reshape(2, 3, 4, 3, 2), (1, 2, 4), True,
                              channels.reshape(3, 2))
  mean, var = jnp.repeat(mean, 2, axis=1), jnp.repeat(var, 2, axis=1)
  np.testing.assert_array_equal(y, reference_normalize(X4, mean, var, (2, 1, 1, 6),
                                                       gn.scale[...], gn.bias[...], 1e-6))


@pytest.mark.parametrize('make, axes, stats_shape', [
    (lambda: nnx.LayerNorm(18, reduction_axes=(1, 2), feature_axes=(1, 2), scale_init=NORMAL,
                           bias_init=NORMAL, rngs=nnx.Rngs(0)), (1, 2), (4, 1, 1)),
    (lambda: nnx.InstanceNorm(6, scale_init=NORMAL, bias_init=NORMAL, rngs=nnx.Rngs(0)),
     (1,), (4, 1, 6)),
])
def test_layer_and_instance_norm_values_are_exact(make, axes, stats_shape):
  norm = make()
  mean, var = reference_stats(X, axes, True)
  scale = norm.scale[...].reshape(X.shape[1:] if len(axes) == 2 else (6,))
  bias = norm.bias[...].reshape(scale.shape)
  np.testing.assert_array_equal(norm(X), reference_normalize(X, mean, var, stats_shape, scale,
                                                             bias, 1e-6))


def test_rms_norm_values_are_exact():
  norm = nnx.RMSNorm(6, scale_init=NORMAL, rngs=nnx.Rngs(0))
  ms = jnp.mean(jax.lax.square(X), -1)
  expected = reference_normalize(X, jnp.zeros_like(ms), ms, (4, 3, 1), norm.scale[...], None,
                                 1e-6)
  np.testing.assert_array_equal(norm(X), expected)


def test_half_precision_layers_compute_in_their_dtype_with_float32_statistics():
  # dtype=float16 casts input and params first; statistics are float32, the result float16.
  norm = nnx.LayerNorm(6, dtype=jnp.float16, scale_init=NORMAL, rngs=nnx.Rngs(0))
  x16, scale16 = X.astype(jnp.float16), norm.scale[...].astype(jnp.float16)
  mean, var = reference_stats(x16.astype(jnp.float32), (2,), True)
  expected = reference_normalize(x16, mean, var, (4, 3, 1), scale16, jnp.zeros(6, jnp.float16),
                                 1e-6).astype(jnp.float16)
  y = norm(X)
  assert y.dtype == jnp.float16
  np.testing.assert_array_equal(y, expected)


def test_batch_norm_running_averages_carry_no_gradient():
  # Updating the averages is bookkeeping: differentiating through it gives zero.
  bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0))

  def new_mean(x, bn):
    bn(x)
    return jnp.sum(bn.mean[...])

  grad = nnx.grad(new_mean)(X, bn)
  np.testing.assert_array_equal(grad, np.zeros(X.shape))


def test_instance_norm_rejects_the_batch_axis_as_a_feature_axis():
  norm = nnx.InstanceNorm(4, feature_axes=(0, -1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='batch axis'):
    norm(X)


# -- WeightNorm ----------------------------------------------------------------------------
XL = jax.random.normal(jax.random.key(4), (5, 3))


def test_weight_norm_normalises_each_output_column():
  linear = nnx.Linear(3, 4, bias_init=NORMAL, rngs=nnx.Rngs(0))
  wn = nnx.WeightNorm(linear, scale_init=NORMAL, rngs=nnx.Rngs(1))
  scale = wn.scales[('kernel',)]
  assert type(scale) is nnx.Param and scale.shape == (4,)
  k = linear.kernel[...]
  direction = k / jnp.linalg.norm(k, axis=0, keepdims=True)
  expected = XL @ (direction * scale[...]) + linear.bias[...]
  np.testing.assert_allclose(wn(XL), expected, rtol=1e-5, atol=1e-5)
  # As in NNX the layer keeps the normalised kernel: its columns now have the scales' norms.
  np.testing.assert_allclose(jnp.linalg.norm(linear.kernel[...], axis=0), jnp.abs(scale[...]),
                             rtol=1e-5)


def test_weight_norm_of_the_whole_kernel_and_without_scale():
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  k = linear.kernel[...]
  whole = nnx.WeightNorm(linear, feature_axes=None, rngs=nnx.Rngs(1))
  assert whole.scales[('kernel',)].shape == ()
  np.testing.assert_allclose(whole(XL), XL @ (k / jnp.linalg.norm(k)), rtol=1e-5, atol=1e-6)
  bare = nnx.WeightNorm(linear, use_scale=False, rngs=nnx.Rngs(1))
  assert bare.scales is None
  np.testing.assert_allclose(bare(XL), XL @ (k / jnp.linalg.norm(k, axis=0)), rtol=1e-5,
                             atol=1e-6)


def test_weight_norm_of_a_conv():
  conv = nnx.Conv(6, 2, (2, 2), rngs=nnx.Rngs(0))
  wn = nnx.WeightNorm(conv, rngs=nnx.Rngs(1))
  k = conv.kernel[...]
  normalized = k / jnp.sqrt((k ** 2).sum((0, 1, 2), keepdims=True))
  expected = jax.lax.conv_general_dilated(X4, normalized, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(wn(X4), expected, rtol=1e-4, atol=1e-5)


def test_weight_norm_gradients_reach_scale_kernel_and_bias():
  wn = nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  grads = grads_of(wn, XL)
  assert set(grads) == {'layer_instance', 'scales'}
  assert_grads_everywhere(wn, XL)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(wn, XL), wn(XL), rtol=1e-5, atol=1e-6)


# -- SpectralNorm ---------------------------------------------------------------------------
def test_spectral_norm_state():
  sn = nnx.SpectralNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  assert sorted(sn.batch_stats) == [('kernel', 'sigma'), ('kernel', 'u')]
  u = sn.batch_stats[('kernel', 'u')]
  assert type(u) is nnx.BatchStat and u.shape == (1, 5)
  assert float(sn.batch_stats[('kernel', 'sigma')][...]) == 1.0


def test_spectral_norm_divides_by_the_largest_singular_value():
  linear = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
  k = linear.kernel[...]
  top = np.linalg.svd(np.asarray(k), compute_uv=False)[0]
  sn = nnx.SpectralNorm(linear, n_steps=30, rngs=nnx.Rngs(1))
  y = sn(XL)
  sigma = float(sn.batch_stats[('kernel', 'sigma')][...])
  assert sigma == pytest.approx(top, rel=1e-3)
  np.testing.assert_allclose(y, XL @ (k / sigma) + linear.bias[...], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(linear.kernel[...], k / sigma, rtol=1e-5)  # kept, as in NNX


def test_spectral_norm_power_iteration_step():
  linear = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
  sn = nnx.SpectralNorm(linear, rngs=nnx.Rngs(1))
  w, u = linear.kernel[...], sn.batch_stats[('kernel', 'u')][...]
  v = u @ w.T
  v = v / jnp.linalg.norm(v)
  u = v @ w
  u = u / jnp.linalg.norm(u)
  sn(XL)
  np.testing.assert_allclose(sn.batch_stats[('kernel', 'u')][...], u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sn.batch_stats[('kernel', 'sigma')][...], (v @ w @ u.T)[0, 0],
                             rtol=1e-5)


def test_spectral_norm_eval_does_not_update_statistics():
  sn = nnx.SpectralNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  before = sn.batch_stats[('kernel', 'u')][...]
  sn.eval()
  sn(XL)
  np.testing.assert_array_equal(sn.batch_stats[('kernel', 'u')][...], before)
  sn.train()
  sn(XL, update_stats=False)
  np.testing.assert_array_equal(sn.batch_stats[('kernel', 'u')][...], before)
  sn(XL)
  assert not np.array_equal(sn.batch_stats[('kernel', 'u')][...], before)


def test_spectral_norm_of_higher_rank_kernels():
  sn = nnx.SpectralNorm(nnx.Conv(6, 2, (2, 2), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  assert sn.batch_stats[('kernel', 'u')].shape == (1, 2)
  assert sn(X4).shape == (2, 3, 4, 2)
  with pytest.raises(ValueError, match='4D'):
    nnx.SpectralNorm(nnx.Conv(6, 2, (2, 2), rngs=nnx.Rngs(0)), error_on_non_matrix=True,
                     rngs=nnx.Rngs(1))


def test_spectral_norm_gradients_and_jit():
  sn = nnx.SpectralNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  assert_grads_everywhere(sn, XL)
  y = nnx.jit(lambda m, x: m(x))(sn, XL)
  assert y.shape == (5, 5)
  # jit propagated the power-iteration update back to the caller.
  assert float(sn.batch_stats[('kernel', 'sigma')][...]) != 1.0


def test_batch_norm_axis_name_under_nnx_vmap_updates_the_shared_statistics():
  bn = nnx.BatchNorm(6, axis_name='batch', momentum=0.0, rngs=nnx.Rngs(0))
  y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='batch')(bn, X)
  np.testing.assert_allclose(y, standardize(X, (0, 1), 1e-5), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], X.mean((0, 1)), rtol=1e-4, atol=1e-6)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------

TRANSFORM_LAYERS = {
    'LayerNorm': lambda rngs: nnx.LayerNorm(4, scale_init=NORMAL, rngs=rngs),
    'RMSNorm': lambda rngs: nnx.RMSNorm(4, scale_init=NORMAL, rngs=rngs),
    'BatchNorm': lambda rngs: nnx.BatchNorm(4, rngs=rngs),
    'GroupNorm': lambda rngs: nnx.GroupNorm(4, num_groups=2, scale_init=NORMAL, rngs=rngs),
    'InstanceNorm': lambda rngs: nnx.InstanceNorm(4, scale_init=NORMAL, rngs=rngs),
    'WeightNorm': lambda rngs: nnx.WeightNorm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs),
    'SpectralNorm': lambda rngs: nnx.SpectralNorm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs),
}
XT = jax.random.normal(jax.random.key(4), (3, 2, 4)) * 2 + 1


@pytest.mark.parametrize('name', list(TRANSFORM_LAYERS))
def test_ensemble_under_vmap_and_stack_under_scan(name):
  # check_* compare every Variable, so BatchNorm's mean/var and SpectralNorm's u/sigma
  # updated inside the transform must come back stacked and equal to each member's own update
  layers = check_ensemble(TRANSFORM_LAYERS[name], XT, n=2)
  stats = jax.tree.leaves(nnx.state(layers, nnx.BatchStat))
  assert all(s.shape[0] == 2 for s in stats)
  if name == 'BatchNorm':
    assert not np.allclose(layers.mean[...], 0.)
  check_scan_over_layers(TRANSFORM_LAYERS[name], XT, n=3)


def test_batch_norm_broadcast_under_scan_accumulates_its_statistics():
  bn = nnx.BatchNorm(6, momentum=0.5, rngs=nnx.Rngs(0))
  check_scan_broadcast(bn, X4)  # two steps, each a (3, 4, 6) batch
  assert not np.allclose(bn.var[...], 1.)
