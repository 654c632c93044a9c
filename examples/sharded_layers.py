"""Dropout and Embed on inputs sharded over an explicit mesh (8 simulated CPU devices).

    .venv/bin/python examples/sharded_layers.py

Under ``jax.sharding.AxisType.Explicit`` axes every array's type records its
sharding (``float32[8@data,16]``: axis 0 split over the ``data`` mesh axis),
and operations must agree on it. Two layers need care there:

1. ``nnx.Dropout`` draws its random mask with the sharding of its input, so
   masking a sharded activation works, eagerly and under ``nnx.jit``, also with
   ``broadcast_dims`` (the mask is unsharded along broadcast axes, then spread);
2. ``nnx.Embed`` with its table split over ``model`` and token ids split over
   ``data`` cannot infer where the gathered rows should live: the lookup raises
   until ``out_sharding=`` names it, e.g. ``embed(ids, out_sharding=P('data'))``.
   ``embed.attend(h, out_sharding=...)`` lays out the tied-output logits.

The script builds a tiny token model from these layers, checks every sharding,
and takes one gradient step under ``nnx.jit``.
"""
from __future__ import annotations

import os

# Before jax is imported: simulate 8 CPU devices (keeping any flags already set).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P, reshard  # noqa: E402

import arbax as nnx  # noqa: E402

VOCAB, DIM, BATCH = 32, 16, 8


class TokenModel(nnx.Module):
  """Embed -> Dropout -> Linear -> logits against the (tied) embedding table."""

  def __init__(self, *, rngs: nnx.Rngs):
    # The vocabulary axis of the table is split over 'model'.
    self.embed = nnx.Embed(VOCAB, DIM, embedding_metadata={'out_sharding': P('model', None)},
                           rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.linear = nnx.Linear(DIM, DIM, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids, out_sharding=P('data', None))     # rows follow the ids' sharding
    h = self.drop(h)                                        # mask drawn as float32[8@data,16]
    h = nnx.relu(self.linear(h))
    return self.embed.attend(h, out_sharding=P('data', 'model'))


def loss_fn(model: TokenModel, ids, targets):
  # Gather the vocabulary axis back for the softmax over it.
  logits = reshard(model(ids), P('data', None))
  one_hot = jax.nn.one_hot(targets, VOCAB)
  return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))


def main() -> dict:
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    ids = reshard(jnp.arange(BATCH) % VOCAB, P('data'))
    x = reshard(jnp.ones((BATCH, DIM)), P('data', None))
    types = {}

    drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    types['dropout'] = jax.typeof(drop(x))
    types['dropout_jit'] = jax.typeof(nnx.jit(lambda d, x: d(x))(drop, x))
    wide = nnx.Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(dropout=0))
    y = wide(x)
    types['dropout_broadcast'] = jax.typeof(y)
    # Broadcast over the batch axis: every row gets the same mask, sharded rows included.
    rows = np.asarray(y)
    same_rows = bool((rows == rows[:1]).all())

    model = TokenModel(rngs=nnx.Rngs(0))
    try:
      model.embed(ids)          # table over 'model', ids over 'data': ambiguous
      ambiguous_error = None
    except Exception as e:      # jax's ShardingTypeError
      ambiguous_error = type(e).__name__
    types['embed'] = jax.typeof(model.embed(ids, out_sharding=P('data', None)))
    types['logits'] = jax.typeof(model(ids))

    targets = reshard((jnp.arange(BATCH) * 3) % VOCAB, P('data'))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, ids, targets):
      loss, grads = nnx.value_and_grad(loss_fn)(model, ids, targets)
      optimizer.update(model, grads)
      return loss

    loss = float(train_step(model, optimizer, ids, targets))
    table_type = jax.typeof(model.embed.embedding[...])

  for name, t in types.items():
    print(f'{name:18s} {t}')
  print(f'{"embedding":18s} {table_type}')
  print(f'unsharded-out lookup raises {ambiguous_error}; broadcast mask equal across rows: '
        f'{same_rows}; training loss {loss:.4f}')
  return {'types': {k: str(v) for k, v in types.items()}, 'table': str(table_type),
          'ambiguous_error': ambiguous_error, 'same_rows': same_rows, 'loss': loss}


if __name__ == '__main__':
  main()
