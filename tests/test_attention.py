"""Tests for arbax/nn/attention.py: attention maths, masks, MultiHeadAttention and its decode cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.nn.attention import dot_product_attention_weights
from tests.layer_transforms import check_ensemble, check_scan_over_layers


def _normal(seed, shape, dtype=jnp.float32):
  # numpy draws: no per-shape compilation of jax.random in eager mode, so the file stays fast.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _reference(q, k, v, mask=None, bias=None):
  """softmax(Q K^T / sqrt(d) + bias) V per head, written out; k/v heads repeated for GQA."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  rep = q.shape[-2] // k.shape[-2]
  k, v = np.repeat(k, rep, axis=-2), np.repeat(v, rep, axis=-2)
  logits = np.einsum('...qhd,...khd->...hqk', q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias)
  if mask is not None:
    logits = np.where(np.asarray(mask) != 0, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  return np.einsum('...hqk,...khd->...qhd', weights, v), weights


# -- dot_product_attention ------------------------------------------------------
@pytest.mark.parametrize('batch', [(), (2,), (2, 3)])
def test_attention_matches_softmax_formula(batch):
  q, k, v = _normal(0, batch + (4, 2, 8)), _normal(1, batch + (5, 2, 8)), _normal(2, batch + (5, 2, 8))
  out = nnx.dot_product_attention(q, k, v)
  assert out.shape == batch + (4, 2, 8)
  np.testing.assert_allclose(out, _reference(q, k, v)[0], atol=1e-5)


def test_attention_value_depth_may_differ_from_query_depth():
  q, k, v = _normal(0, (2, 4, 2, 8)), _normal(1, (2, 5, 2, 8)), _normal(2, (2, 5, 2, 3))
  out = nnx.dot_product_attention(q, k, v)
  assert out.shape == (2, 4, 2, 3)
  np.testing.assert_allclose(out, _reference(q, k, v)[0], atol=1e-5)


def test_mask_and_bias_enter_the_logits():
  q, k, v = _normal(0, (2, 4, 2, 8)), _normal(1, (2, 5, 2, 8)), _normal(2, (2, 5, 2, 8))
  mask = np.random.default_rng(3).uniform(size=(2, 1, 4, 5)) < 0.7
  mask[..., 0] = True
  bias = _normal(4, (2, 4, 5))
  out = nnx.dot_product_attention(q, k, v, mask=jnp.asarray(mask, jnp.float32), bias=bias)
  np.testing.assert_allclose(out, _reference(q, k, v, mask, bias)[0], atol=1e-5)


def test_masked_keys_do_not_influence_the_output():
  q, k, v = _normal(0, (1, 3, 1, 4)), _normal(1, (1, 4, 1, 4)), _normal(2, (1, 4, 1, 4))
  mask = jnp.array([1., 1., 0., 1.])[None, None, None, :]
  out = nnx.dot_product_attention(q, k, v, mask=mask)
  changed = nnx.dot_product_attention(q, k.at[:, 2].set(9.), v.at[:, 2].set(9.), mask=mask)
  np.testing.assert_allclose(out, changed, atol=1e-6)


def test_is_causal_equals_the_causal_mask():
  q, k, v = _normal(0, (2, 5, 2, 4)), _normal(1, (2, 5, 2, 4)), _normal(2, (2, 5, 2, 4))
  causal = nnx.make_causal_mask(jnp.ones((2, 5)))
  expected = _reference(q, k, v, causal)[0]
  np.testing.assert_allclose(nnx.dot_product_attention(q, k, v, is_causal=True), expected, atol=1e-5)
  np.testing.assert_allclose(nnx.dot_product_attention(q, k, v, mask=causal), expected, atol=1e-5)


def test_grouped_query_attention_shares_kv_heads():
  q, k, v = _normal(0, (2, 3, 4, 8)), _normal(1, (2, 5, 2, 8)), _normal(2, (2, 5, 2, 8))
  expected = _reference(q, k, v)[0]
  np.testing.assert_allclose(nnx.dot_product_attention(q, k, v), expected, atol=1e-5)
  explicit = nnx.dot_product_attention(q, k, v, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(explicit, expected, atol=1e-5)


def test_fused_and_explicit_paths_agree():
  q, k, v = _normal(0, (2, 3, 4, 2, 8)), _normal(1, (2, 3, 5, 2, 8)), _normal(2, (2, 3, 5, 2, 8))
  mask = nnx.make_attention_mask(jnp.ones((2, 3, 4)), jnp.array([1., 1., 1., 0., 1.]) * jnp.ones((2, 3, 5)))
  fused = nnx.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  explicit = nnx.dot_product_attention(q, k, v, mask=mask, is_causal=True, precision='highest')
  np.testing.assert_allclose(fused, explicit, atol=1e-5)


def test_weights_rows_sum_to_one_and_match_formula():
  q, k = _normal(0, (2, 4, 2, 8)), _normal(1, (2, 5, 2, 8))
  w = dot_product_attention_weights(q, k)
  assert w.shape == (2, 2, 4, 5)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(w, _reference(q, k, k)[1], atol=1e-6)


def test_weights_are_sown_into_the_module():
  class Holder(nnx.Module):
    pass
  holder = Holder()
  q, k, v = _normal(0, (1, 3, 2, 4)), _normal(1, (1, 3, 2, 4)), _normal(2, (1, 3, 2, 4))
  out = nnx.dot_product_attention(q, k, v, module=holder)
  (weights,) = holder.attention_weights[...]
  assert isinstance(holder.attention_weights, nnx.Intermediate)
  np.testing.assert_allclose(weights, _reference(q, k, v)[1], atol=1e-6)
  np.testing.assert_allclose(out, _reference(q, k, v)[0], atol=1e-5)


def test_dropout_zeroes_or_rescales_weights():
  q, k = _normal(0, (2, 4, 3, 8)), _normal(1, (2, 5, 3, 8))
  weights = jax.jit(dot_product_attention_weights,
                    static_argnames=('dropout_rate', 'broadcast_dropout'))
  plain = weights(q, k)
  dropped = weights(q, k, dropout_rate=0.5, dropout_rng=jax.random.key(0))
  kept = dropped != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(jnp.where(kept, dropped, 0), jnp.where(kept, plain / 0.5, 0), rtol=1e-6)
  # broadcast_dropout: the same (q, k) pattern for every batch element and head.
  assert bool((kept == kept[:1, :1]).all())
  unbroadcast = weights(q, k, dropout_rate=0.5, broadcast_dropout=False,
                        dropout_rng=jax.random.key(0))
  assert not bool(((unbroadcast != 0) == (unbroadcast != 0)[:1, :1]).all())


def test_deterministic_turns_dropout_off():
  q, k, v = _normal(0, (1, 3, 2, 4)), _normal(1, (1, 3, 2, 4)), _normal(2, (1, 3, 2, 4))
  out = nnx.dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=True)
  np.testing.assert_allclose(out, _reference(q, k, v)[0], atol=1e-5)


def test_dropout_without_a_key_raises():
  q = _normal(0, (1, 3, 2, 4))
  with pytest.raises(ValueError, match='dropout_rng'):
    nnx.dot_product_attention(q, q, q, dropout_rate=0.5)


def test_computation_dtype():
  q = _normal(0, (1, 3, 2, 4), jnp.bfloat16)
  assert nnx.dot_product_attention(q, q, q).dtype == jnp.bfloat16
  assert nnx.dot_product_attention(q, q, q, dtype=jnp.float32).dtype == jnp.float32
  assert dot_product_attention_weights(q, q).dtype == jnp.bfloat16


@pytest.mark.parametrize('shapes,match', [
    (((1, 3, 2, 4), (3, 2, 4), (3, 2, 4)), 'same rank'),
    (((1, 3, 2, 4), (2, 3, 2, 4), (2, 3, 2, 4)), 'batch dims must match'),
    (((1, 3, 2, 4), (1, 3, 2, 4), (1, 5, 2, 4)), 'k, v lengths'),
    (((1, 3, 3, 4), (1, 3, 2, 4), (1, 3, 2, 4)), r'Query heads \(3\)'),
])
def test_shape_errors_name_the_problem(shapes, match):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    nnx.dot_product_attention(q, k, v)


def test_weights_depth_mismatch_raises():
  with pytest.raises(ValueError, match='depths must match'):
    dot_product_attention_weights(jnp.ones((3, 2, 4)), jnp.ones((3, 2, 5)))


# -- masks ----------------------------------------------------------------------
def test_make_attention_mask_marks_padding():
  mask = nnx.make_attention_mask(jnp.array([[1, 1, 0]]), jnp.array([[1, 0, 1, 1]]))
  assert mask.shape == (1, 1, 3, 4) and mask.dtype == jnp.float32
  expected = np.outer([1, 1, 0], [1, 0, 1, 1])
  np.testing.assert_array_equal(mask[0, 0], expected)
  assert nnx.make_attention_mask(jnp.ones((2, 3)), jnp.ones((2, 3)), extra_batch_dims=2).shape == (1, 1, 2, 1, 3, 3)


def test_make_causal_mask_is_lower_triangular():
  mask = nnx.make_causal_mask(jnp.zeros((2, 4)), dtype=jnp.bool_)
  assert mask.shape == (2, 1, 4, 4) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((4, 4), bool)))


def test_combine_masks():
  a = jnp.array([[1., 0., 1.]])
  b = jnp.array([[1., 1., 0.]])
  np.testing.assert_array_equal(nnx.combine_masks(a, None, b), [[1., 0., 0.]])
  assert nnx.combine_masks(None, None) is None
  assert nnx.combine_masks(a, dtype=jnp.int32).dtype == jnp.int32
  with pytest.raises(ValueError, match='same rank'):
    nnx.combine_masks(a, jnp.ones(3))


# -- MultiHeadAttention ---------------------------------------------------------
def _mha(**kwargs):
  # One configuration (grouped-query: 4 heads over 2 kv heads) so eager shapes compile once.
  kwargs.setdefault('decode', False)
  kwargs.setdefault('num_kv_heads', 2)
  return nnx.MultiHeadAttention(4, 6, qkv_features=8, out_features=5, rngs=nnx.Rngs(0), **kwargs)


def _mha_reference(layer, xq, xkv, mask=None):
  """The layer's maths written out from its parameters."""
  def proj(lin, x):
    y = np.einsum('...f,fhd->...hd', x, lin.kernel[...])
    return y + lin.bias[...] if lin.bias is not None else y
  q, k, v = proj(layer.query, xq), proj(layer.key, xkv), proj(layer.value, xkv)
  heads = _reference(q, k, v, mask)[0]
  out = np.einsum('...hd,hdo->...o', heads, layer.out.kernel[...])
  return out + layer.out.bias[...] if layer.out.bias is not None else out


def test_mha_parameters_are_named_and_shaped_like_nnx():
  layer = _mha()
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
  assert shapes == {
      'query': {'kernel': (6, 4, 2), 'bias': (4, 2)},
      'key': {'kernel': (6, 2, 2), 'bias': (2, 2)},
      'value': {'kernel': (6, 2, 2), 'bias': (2, 2)},
      'out': {'kernel': (4, 2, 5), 'bias': (5,)},
  }
  assert layer.head_dim == 2 and layer.query_ln is None and layer.cached_key is None


def test_mha_self_attention_matches_reference():
  layer = _mha()
  x = _normal(1, (2, 3, 6))
  np.testing.assert_allclose(layer(x), _mha_reference(layer, x, x), atol=1e-5)


def test_mha_cross_attention_with_other_kv_features():
  layer = _mha(in_kv_features=3)
  xq, xkv = _normal(1, (2, 3, 6)), _normal(2, (2, 7, 3))
  out = layer(xq, xkv)
  assert out.shape == (2, 3, 5)
  np.testing.assert_allclose(out, _mha_reference(layer, xq, xkv), atol=1e-5)


def test_mha_mask():
  layer = _mha()
  x = _normal(1, (2, 4, 6))
  mask = nnx.make_causal_mask(jnp.ones((2, 4)))
  np.testing.assert_allclose(layer(x, mask=mask), _mha_reference(layer, x, x, mask), atol=1e-5)
  np.testing.assert_allclose(layer(x, is_causal=True), layer(x, mask=mask), atol=1e-5)


def test_mha_without_bias():
  layer = _mha(use_bias=False)
  assert layer.query.bias is None and layer.out.bias is None
  x = _normal(1, (2, 3, 6))
  np.testing.assert_allclose(layer(x), _mha_reference(layer, x, x), atol=1e-5)


def test_mha_dtypes():
  ones = nnx.initializers.ones
  layer = _mha(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, kernel_init=ones)
  assert layer.query.kernel.dtype == jnp.bfloat16 and layer.out.bias.dtype == jnp.bfloat16
  forward = nnx.jit(lambda layer, x: layer(x))
  assert forward(layer, jnp.ones((1, 3, 6))).dtype == jnp.bfloat16
  assert forward(_mha(dtype=jnp.bfloat16), jnp.ones((1, 3, 6))).dtype == jnp.bfloat16


def test_mha_argument_errors():
  layer = _mha()
  x = jnp.ones((1, 3, 6))
  with pytest.raises(ValueError, match='inputs_k'):
    layer(x, inputs_v=x)
  with pytest.raises(ValueError, match='in_features=6'):
    layer(jnp.ones((1, 3, 7)))
  with pytest.raises(ValueError, match='decode'):
    nnx.MultiHeadAttention(2, 6, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match='num_kv_heads'):
    nnx.MultiHeadAttention(4, 8, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='qkv_features'):
    nnx.MultiHeadAttention(3, 8, rngs=nnx.Rngs(0))


def test_mha_sow_weights():
  layer = _mha()
  layer(jnp.ones((1, 3, 6)), sow_weights=True)
  (weights,) = layer.attention_weights[...]
  assert weights.shape == (1, 4, 3, 3)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


def test_mha_dropout():
  layer = _mha(dropout_rate=0.5)
  x = _normal(1, (2, 3, 6))
  with pytest.raises(ValueError, match='deterministic'):
    layer(x)
  np.testing.assert_allclose(layer(x, deterministic=True), _mha_reference(layer, x, x), atol=1e-5)
  count = int(layer.rngs.count[...])
  a, b = layer(x, deterministic=False), layer(x, deterministic=False)
  assert int(layer.rngs.count[...]) == count + 2 and not np.allclose(a, b)
  c = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  d = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_allclose(c, d)
  no_rngs = _mha(dropout_rate=0.5, keep_rngs=False)
  assert no_rngs.rngs is None
  with pytest.raises(ValueError, match='rngs'):
    no_rngs(x, deterministic=False)


def test_mha_gradients_reach_every_parameter():
  layer = _mha()
  x = _normal(1, (2, 3, 6))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)


def test_mha_inside_nnx_jit():
  layer = _mha()
  x = _normal(1, (2, 3, 6))

  @nnx.jit
  def forward(layer, x):
    return layer(x, is_causal=True)

  np.testing.assert_allclose(forward(layer, x), layer(x, is_causal=True), atol=1e-5)


# -- decoding -------------------------------------------------------------------
def test_init_cache_creates_cache_variables():
  layer = _mha(decode=True)
  layer.init_cache((3, 7, 6), dtype=jnp.bfloat16)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(nnx.state(layer, nnx.Cache)))
  assert shapes == {'cached_key': ((3, 7, 2, 2), jnp.bfloat16),
                    'cached_value': ((3, 7, 2, 2), jnp.bfloat16),
                    'cache_index': ((), jnp.int32)}


def test_decode_token_by_token_equals_causal_forward():
  layer = _mha(decode=True)
  x = _normal(1, (2, 4, 6))
  full = layer(x, mask=nnx.make_causal_mask(jnp.ones((2, 4))), decode=False)
  layer.init_cache(x.shape)

  @nnx.jit
  def step(layer, token):
    return layer(token)

  steps = [step(layer, x[:, t:t + 1]) for t in range(4)]
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
  assert int(layer.cache_index[...]) == 4
  np.testing.assert_allclose(layer.cached_key[...], layer.key(x), atol=1e-6)
  np.testing.assert_allclose(layer.cached_value[...], layer.value(x), atol=1e-6)


def test_decode_eagerly_writes_one_position():
  layer = _mha(decode=True)
  layer.init_cache((2, 4, 6))
  token = _normal(1, (2, 1, 6))
  layer(token)
  assert int(layer.cache_index[...]) == 1
  np.testing.assert_allclose(layer.cached_key[:, 0], layer.key(token)[:, 0], atol=1e-6)
  np.testing.assert_array_equal(layer.cached_key[:, 1:], 0)


def test_decode_errors():
  layer = _mha(decode=True)
  with pytest.raises(ValueError, match='init_cache'):
    layer(jnp.ones((1, 1, 6)))
  layer.init_cache((1, 4, 6))
  with pytest.raises(ValueError, match=r'expected key shape \(1, 1, 2, 2\)'):
    layer(jnp.ones((1, 2, 6)))


def test_set_view_switches_modes_and_builds_the_cache():
  layer = _mha(dropout_rate=0.1)
  layer.set_view(deterministic=True, decode=True, batch_size=2, max_length=6)
  assert layer.deterministic is True and layer.decode is True
  assert layer.cached_key.shape == (2, 6, 2, 2)
  assert layer(jnp.ones((2, 1, 6))).shape == (2, 1, 5)


def test_mha_normalize_qk_layer_norms_queries_and_keys():
  layer = _mha(normalize_qk=True)
  assert _mha_shapes(layer)['query_ln'] == {'scale': (2,)} == _mha_shapes(layer)['key_ln']
  x = _normal(1, (2, 3, 6))
  q, k, v = layer.query(x), layer.key(x), layer.value(x)
  norm = lambda a: (a - a.mean(-1, keepdims=True)) / jnp.sqrt(a.var(-1, keepdims=True) + 1e-6)  # noqa: E731
  heads = _reference(norm(q), norm(k), v)[0]
  expected = np.einsum('...hd,hdo->...o', heads, layer.out.kernel[...]) + layer.out.bias[...]
  np.testing.assert_allclose(layer(x), expected, atol=1e-4)


def _mha_shapes(layer):
  return jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------


def _decoder(rngs):
  mha = nnx.MultiHeadAttention(2, 4, decode=True, rngs=rngs)
  mha.init_cache((1, 3, 4))
  return mha


def test_attention_ensemble_under_vmap_and_stack_under_scan():
  x = jax.random.normal(jax.random.key(5), (1, 3, 4))
  check_ensemble(lambda rngs: nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs), x, n=2)
  check_scan_over_layers(lambda rngs: nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs), x,
                         n=2)


def test_decoding_ensemble_under_vmap_writes_each_members_cache_back():
  token = jax.random.normal(jax.random.key(6), (1, 1, 4))
  layers = check_ensemble(_decoder, token, n=2)  # compares cached_key/value and cache_index
  np.testing.assert_array_equal(layers.cache_index[...], [1, 1])
  assert layers.cached_key.shape == (2, 1, 3, 2, 2)
  assert not np.allclose(layers.cached_key[0, :, 0], layers.cached_key[1, :, 0])
