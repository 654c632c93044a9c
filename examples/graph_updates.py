"""Shared submodules under ``nnx.jit``: graph mode keeps them shared, tree mode refuses them.

    .venv/bin/python examples/graph_updates.py

NNX Modules form a *graph*: one object may be reachable from several places
(tied input/output embeddings, a block reused at two depths, the same model
passed as two arguments). In graph mode, NNX's default, a transform sees each
object once however many paths lead to it, and the objects it hands back keep
that sharing: after a jitted train step the two paths still lead to one
object, its parameters get one gradient (the sum of both uses) and one update.

Tree mode (``graph=False`` or ``nnx.set_graph_mode(False)``) treats Modules as
plain pytrees, which is faster to flatten but cannot express sharing: a
transform given a Module reachable twice raises a ``ValueError`` naming both
paths. Use tree mode for models without shared references; keep graph mode
(or untie the weights) otherwise.

This script:

1. trains a tiny encoder/decoder whose two halves hold the *same* ``nnx.Embed``;
   after the jitted steps it is still one object, and the gradient State has
   one entry for it;
2. passes one model as two arguments of a jitted function: inside, both names
   are the same object;
3. ties two separate tables *inside* ``nnx.jit``: a graph update, the caller's
   model comes out with one shared object (graph mode with graph updates, the
   default);
4. shows what ``graph=False`` says about the shared embedding.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

import arbax as nnx


class Encoder(nnx.Module):
  def __init__(self, embed: nnx.Embed, dim: int, *, rngs: nnx.Rngs):
    self.embed = embed
    self.mix = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, tokens):
    return jnp.tanh(self.mix(self.embed(tokens)))


class Decoder(nnx.Module):
  def __init__(self, embed: nnx.Embed):
    self.embed = embed  # the same object as the encoder's: tied weights

  def __call__(self, h):
    return self.embed.attend(h)  # logits against every token's embedding


class AutoEncoder(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.encoder = Encoder(embed, dim, rngs=rngs)
    self.decoder = Decoder(embed)

  def __call__(self, tokens):
    return self.decoder(self.encoder(tokens))


def train_tied(steps: int) -> dict:
  """1. The shared Embed stays one object, with one gradient and one update per step."""
  model = AutoEncoder(vocab=8, dim=4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  tokens = jnp.arange(8)
  grad_paths = []

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    grad_paths.append(sorted('.'.join(map(str, p)) for p, _ in nnx.to_flat_state(grads)))
    optimizer.update(model, grads)
    return loss

  embed = model.encoder.embed
  losses = [float(train_step(model, optimizer, tokens)) for _ in range(steps)]
  shared = model.encoder.embed is model.decoder.embed is embed
  print(f'tied embedding: loss {losses[0]:.3f} -> {losses[-1]:.3f}; still one object: {shared}')
  print(f'gradient paths (the shared table once): {grad_paths[0]}')
  return {'losses': losses, 'shared': shared, 'grad_paths': grad_paths[0]}


def same_argument_twice() -> dict:
  """2. One model passed as two arguments is one object inside the function."""
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

  @nnx.jit
  def double_step(a, b):
    a.kernel[...] += 1.0  # seen through `b` as well: they are one object
    return a is b, b.kernel[...]

  same, seen_by_b = double_step(model, model)
  print(f'same model passed twice: `a is b` inside = {same}; '
        f'b saw a\'s update: {bool(jnp.allclose(seen_by_b, model.kernel[...]))}')
  return {'same': same, 'seen': bool(jnp.allclose(seen_by_b, model.kernel[...]))}


def tie_inside_jit() -> dict:
  """3. A structural change made inside ``nnx.jit`` (tying two tables) reaches the caller."""
  model = AutoEncoder(vocab=8, dim=4, rngs=nnx.Rngs(0))
  model.decoder.embed = nnx.Embed(8, 4, rngs=nnx.Rngs(5))  # untied: two tables

  @nnx.jit
  def tie(model):
    model.decoder.embed = model.encoder.embed

  before = model.decoder.embed is model.encoder.embed
  tie(model)
  after = model.decoder.embed is model.encoder.embed
  tables = len(nnx.to_flat_state(nnx.state(model, nnx.PathContains('embedding'))))
  print(f'tied inside nnx.jit: shared before {before}, after {after}; '
        f'embedding tables in nnx.state: {tables}')
  return {'before': before, 'after': after, 'tables': tables}


def tree_mode_refuses() -> dict:
  """4. Tree mode has no notion of sharing: the shared Embed is an error, naming both paths."""
  model = AutoEncoder(vocab=8, dim=4, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda model, tokens: model(tokens), graph=False)
  try:
    forward(model, jnp.arange(8))
  except ValueError as error:
    message = str(error)
    print('graph=False says:\n  ' + '\n  '.join(message.splitlines()[:4]))
    return {'error': message}
  raise AssertionError('tree mode accepted a shared submodule')


def main(argv=None) -> dict:
  del argv
  return {'tied': train_tied(steps=20), 'twice': same_argument_twice(),
          'tie': tie_inside_jit(), 'tree': tree_mode_refuses()}


if __name__ == '__main__':
  main()
