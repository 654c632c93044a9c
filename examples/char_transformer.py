"""A character-level transformer language model, trained on Python's own ``argparse.py``.

    .venv/bin/python examples/char_transformer.py                 # ~600 steps, a readable sample
    .venv/bin/python examples/char_transformer.py --steps 3 --dim 16 --layers 1 --heads 2 \\
        --block-size 16 --sample-len 8                            # fast check

The text ships with every Python install, so nothing is downloaded. The model is
the usual pre-LayerNorm GPT: token + position ``nnx.Embed``, blocks of causal
``nnx.MultiHeadAttention`` and an MLP (``nnx.Linear``, ``nnx.Dropout``), and a
final ``nnx.LayerNorm`` and ``nnx.Linear`` to logits. Training masks attention
with ``nnx.make_causal_mask``.

Sampling uses the attention layers' decode cache: ``init_cache`` allocates
``nnx.Cache`` Variables for the keys and values of ``block_size`` positions,
and each call with ``decode=True`` feeds one token, appends its key and value,
and attends over everything cached so far. ``nnx.jit`` carries those cache
updates between calls, so each new character costs one token's work. The script
checks that the cached logits equal a full causal forward pass over the prompt.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import arbax as nnx


def load_text() -> str:
  return pathlib.Path(argparse.__file__).read_text(encoding='utf-8')


class Vocab:
  """Characters <-> integer ids."""

  def __init__(self, text: str):
    self.chars = sorted(set(text))
    self.index = {c: i for i, c in enumerate(self.chars)}

  def __len__(self):
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    return np.array([self.index[c] for c in text], dtype=np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.chars[int(i)] for i in ids)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, dropout_rate=dropout, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x, mask, decode: bool):
    x = x + self.dropout(self.attn(self.ln1(x), mask=mask, decode=decode))
    return x + self.dropout(self.down(nnx.gelu(self.up(self.ln2(x)))))


class CharTransformer(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, heads: int, layers: int, block_size: int,
               dropout: float = 0.1, *, rngs: nnx.Rngs):
    self.block_size = block_size
    self.token_embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.pos_embed = nnx.Embed(block_size, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, dropout, rngs=rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

  def __call__(self, tokens, positions=None, decode: bool = False):
    """Logits ``(batch, length, vocab)`` for ``tokens`` ``(batch, length)``.

    With ``decode=True`` tokens are one step ``(batch, 1)`` at ``positions``; the
    caches hide positions not yet written, so no causal mask is needed.
    """
    if positions is None:
      positions = jnp.arange(tokens.shape[-1])
    x = self.token_embed(tokens) + self.pos_embed(positions)
    mask = None if decode else nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask, decode)
    return self.head(self.ln(x))

  def init_cache(self, batch_size: int) -> None:
    for block in self.blocks:
      block.attn.init_cache((batch_size, self.block_size, block.attn.in_features))


def loss_fn(model: CharTransformer, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: CharTransformer, optimizer: nnx.Optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def forward(model: CharTransformer, tokens):
  return model(tokens)


@nnx.jit
def decode_step(model: CharTransformer, token, position, rngs: nnx.Rngs, temperature):
  """Feed ``token`` ``(batch,)`` at ``position``; return its logits and a sampled next token."""
  logits = model(token[:, None], jnp.full((1,), position), decode=True)[:, -1]
  return logits, jax.random.categorical(rngs.sample(), logits / temperature)


def generate(model: CharTransformer, prompt: np.ndarray, length: int, rngs: nnx.Rngs,
             temperature: float = 0.8):
  """``prompt`` then ``length`` sampled ids (within ``block_size``), and the prompt's last logits.

  Every position goes through the cache, prompt included; sampled ids are kept
  only past the prompt.
  """
  total = min(len(prompt) + length, model.block_size)
  model.init_cache(batch_size=1)
  ids = [int(t) for t in prompt]
  prompt_logits = None
  for position in range(total - 1):
    logits, sample = decode_step(model, jnp.array([ids[position]]), position, rngs, temperature)
    if position == len(prompt) - 1:
      prompt_logits = logits[0]
    if position + 1 >= len(ids):
      ids.append(int(sample[0]))
  return ids, prompt_logits


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description='A character-level transformer on argparse.py.')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--dim', type=int, default=96)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--block-size', type=int, default=96)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--sample-len', type=int, default=80)
  parser.add_argument('--prompt', default='def ')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  start = time.perf_counter()

  text = load_text()
  vocab = Vocab(text)
  data = vocab.encode(text)
  print(f'{len(text)} characters of {argparse.__file__}, vocabulary of {len(vocab)}')

  model = CharTransformer(len(vocab), args.dim, args.heads, args.layers, args.block_size,
                          args.dropout, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)
  rng = np.random.default_rng(args.seed)
  losses = []
  model.train()
  for step in range(args.steps):
    starts = rng.integers(0, len(data) - args.block_size - 1, args.batch_size)
    batch = np.stack([data[s:s + args.block_size + 1] for s in starts])
    losses.append(float(train_step(model, optimizer, batch)))
    if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
      print(f'step {step:4d}  loss {losses[-1]:.3f}')

  model.eval()  # no dropout while sampling
  prompt = vocab.encode(args.prompt)
  ids, cached = generate(model, prompt, args.sample_len, nnx.Rngs(sample=args.seed))
  full = forward(model, jnp.asarray(prompt)[None])[0, -1]
  gap = float(jnp.max(jnp.abs(cached - full)))
  np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
  sample = vocab.decode(ids)
  print(f'decode cache vs full forward pass on the prompt: max |difference| = {gap:.2e}')
  print('sample:\n' + sample)
  wall = time.perf_counter() - start
  print(f'wall time: {wall:.1f} s')
  return {'losses': losses, 'sample': sample, 'cache_gap': gap, 'vocab_size': len(vocab),
          'wall_time': wall}


if __name__ == '__main__':
  main()
