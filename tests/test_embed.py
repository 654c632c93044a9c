"""Embed: lookup, attend, initialisation, dtypes, errors, gradients, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import AxisType, PartitionSpec as P, reshard

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_broadcast

IDS = jnp.array([[1, 2, 2], [0, 9, 4]])


def test_embedding_param_and_default_initialisation():
  embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  assert set(nnx.state(embed)) == {'embedding'} and type(embed.embedding) is nnx.Param
  assert embed.embedding.shape == (10, 4)
  assert (embed.num_embeddings, embed.features) == (10, 4)
  key = jax.random.fold_in(jax.random.key(0), 0)
  # Unit variance per entry: fan_in is the feature axis (out_axis=0 is the vocabulary).
  init = jax.nn.initializers.variance_scaling(1.0, 'fan_in', 'normal', out_axis=0)
  np.testing.assert_allclose(embed.embedding[...], init(key, (10, 4)), rtol=1e-6)


def test_lookup_returns_the_rows_of_the_ids():
  embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  y = embed(IDS)
  assert y.shape == (2, 3, 4)
  table = np.asarray(embed.embedding[...])
  np.testing.assert_array_equal(y, table[np.asarray(IDS)])


def test_out_of_range_ids_give_nan_rows():
  embed = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
  y = embed(jnp.array([1, 5]))
  assert not np.isnan(y[0]).any() and np.isnan(y[1]).all()


def test_a_single_embedding_is_broadcast_to_every_id():
  # With one row there is nothing to index: every id, in range or not, gets that row.
  embed = nnx.Embed(1, 3, rngs=nnx.Rngs(0))
  y = embed(jnp.array([[0, 5], [-1, 0]], jnp.int16))
  assert y.shape == (2, 2, 3)
  np.testing.assert_array_equal(y, np.broadcast_to(np.asarray(embed.embedding[0]), (2, 2, 3)))


def test_float_ids_are_rejected():
  with pytest.raises(ValueError, match='integer'):
    nnx.Embed(5, 3, rngs=nnx.Rngs(0))(jnp.array([1.0]))


def test_attend_scores_every_embedding():
  embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  q = jax.random.normal(jax.random.key(1), (2, 3, 4))
  scores = embed.attend(q)
  assert scores.shape == (2, 3, 10)
  np.testing.assert_allclose(scores, jnp.einsum('btf,vf->btv', q, embed.embedding[...]),
                             rtol=1e-5, atol=1e-6)


def test_dtype_defaults_to_param_dtype():
  embed = nnx.Embed(10, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert embed.dtype == jnp.bfloat16 and embed.embedding.dtype == jnp.bfloat16
  assert embed(IDS).dtype == jnp.bfloat16
  assert embed.attend(jnp.ones((2, 4))).dtype == jnp.bfloat16
  cast = nnx.Embed(10, 4, dtype=jnp.float16, rngs=nnx.Rngs(0))
  assert cast.embedding.dtype == jnp.float32 and cast(IDS).dtype == jnp.float16


def test_custom_init_and_metadata():
  embed = nnx.Embed(3, 2, embedding_init=nnx.initializers.ones, rngs=nnx.Rngs(0),
                    embedding_metadata={'note': 'vocab'})
  np.testing.assert_array_equal(embed.embedding[...], np.ones((3, 2)))
  assert embed.embedding.note == 'vocab'


def test_gradient_reaches_only_the_looked_up_rows():
  embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(embed)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(IDS))

  g = jax.grad(loss)(params)['embedding'][...]
  counts = np.bincount(np.asarray(IDS).ravel(), minlength=10)
  np.testing.assert_allclose(g, np.repeat(counts[:, None], 4, axis=1).astype(np.float32))


def test_embed_inside_jit():
  embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))

  @nnx.jit
  def tied(m, ids):
    return m.attend(m(ids))

  np.testing.assert_allclose(tied(embed, IDS), embed.attend(embed(IDS)), rtol=1e-5, atol=1e-6)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------


def test_embed_ensemble_under_vmap_and_broadcast_under_scan():
  layers = check_ensemble(lambda rngs: nnx.Embed(5, 3, rngs=rngs), jnp.array([0, 4, 2]), n=2)
  assert layers.embedding.shape == (2, 5, 3)
  # the output (ids -> vectors) has another shape than the input: scan over the ids instead
  check_scan_broadcast(nnx.Embed(5, 3, rngs=nnx.Rngs(0)), jnp.array([[0, 1], [4, 2], [3, 3]]))


# -- explicit sharding ----------------------------------------------------------------
def explicit_mesh():
  # One device is enough: under Explicit axes the sharding is part of each array's type.
  return jax.make_mesh((1, 1), ('X', 'Y'), axis_types=(AxisType.Explicit, AxisType.Explicit))


def test_out_sharding_resolves_a_lookup_with_differently_sharded_ids_and_table():
  with jax.set_mesh(explicit_mesh()):
    embed = nnx.Embed(8, 4, rngs=nnx.Rngs(0))
    embed.embedding[...] = reshard(embed.embedding[...], P('X'))
    ids = reshard(jnp.array([3, 0, 7, 3]), P('Y'))
    # The gather cannot tell where its rows should live (jax's ShardingTypeError, not public).
    with pytest.raises(Exception, match='out_sharding') as error:
      embed(ids)
    assert type(error.value).__name__ == 'ShardingTypeError'
    y = embed(ids, out_sharding=P('X'))
    assert str(jax.typeof(y)) == 'float32[4@X,4]'
    y_jit = nnx.jit(lambda m, i: m(i, out_sharding=P('X')))(embed, ids)
    assert str(jax.typeof(y_jit)) == 'float32[4@X,4]'
    table = np.asarray(embed.embedding[...])
  np.testing.assert_array_equal(y, table[[3, 0, 7, 3]])
  np.testing.assert_array_equal(y_jit, y)

