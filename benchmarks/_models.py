"""The models the benchmarks share, written once for every library so each variant runs the same arrays.

arbax and Flax NNX have the same API, so one class body serves both: the
``*_classes(lib)`` factories take the library module (``arbax`` or
``flax.nnx``). The arbax model is built first; ``copy_variables`` puts its
arrays into the Flax model, the ``*_params`` functions read them into plain
dicts for the raw-JAX variant (``raw_*``), and the ``eqx_*`` builders put them
into Equinox modules:

    >>> import arbax as nnx
    >>> model = mlp_classes(nnx)(rngs=nnx.Rngs(0))
    >>> params = mlp_params(model)
    >>> x = jnp.ones((BATCH, WIDTH))
    >>> bool(jnp.allclose(model(x), raw_mlp(params, x)))
    True
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# Small MLP (as in overhead.py): depth 4, 16 units, batch 8.
DEPTH, WIDTH, BATCH = 4, 16, 8
# Transformer: 12 pre-LayerNorm blocks, 64 features, 4 heads; 195 Variables.
VOCAB, DIM, HEADS, FF, SEQ, TBATCH, BLOCKS = 128, 64, 4, 256, 32, 4, 12
# The 5,000-Variable model: 2,500 Linear(8, 8) applied one after the other.
WIDE_LAYERS, WIDE_WIDTH = 2500, 8
# Scan over layers: 12 stacked Linear(32, 32) + relu.
SCAN_LAYERS, SCAN_DIM = 12, 32
EPS = 1e-6


# ---------------------------------------------------------------- small MLP

def mlp_classes(lib):
  class MLP(lib.Module):
    def __init__(self, depth=DEPTH, *, rngs):
      self.layers = lib.List([lib.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.relu(layer(x))
      return x

  return MLP


def _linear(layer) -> dict:
  return {'kernel': layer.kernel[...], 'bias': layer.bias[...]}


def mlp_params(model) -> list[dict]:
  return [_linear(layer) for layer in model.layers]


def raw_mlp(params, x):
  for p in params:
    x = jax.nn.relu(x @ p['kernel'] + p['bias'])
  return x


def eqx_mlp(params):
  import equinox as eqx

  class EMLP(eqx.Module):
    layers: list

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.relu(jax.vmap(layer)(x))
      return x

  return EMLP([_eqx_linear(p) for p in params])


def _eqx_linear(p):
  import equinox as eqx
  n_in, n_out = p['kernel'].shape
  layer = eqx.nn.Linear(n_in, n_out, key=jax.random.key(0))
  return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p['kernel'].T, p['bias']))


# -------------------------------------------------------------- transformer

def attention(q, k, v):
  """Multi-head softmax attention over ``(..., T, DIM)`` inputs, no mask."""
  *lead, t, _ = q.shape
  q, k, v = (a.reshape(*lead, t, HEADS, DIM // HEADS) for a in (q, k, v))
  logits = jnp.einsum('...qhd,...khd->...hqk', q, k) / math.sqrt(DIM // HEADS)
  return jnp.einsum('...hqk,...khd->...qhd', jax.nn.softmax(logits, axis=-1), v).reshape(
      *lead, t, DIM)


def transformer_classes(lib):
  class Block(lib.Module):
    def __init__(self, *, rngs):
      self.ln1 = lib.LayerNorm(DIM, epsilon=EPS, rngs=rngs)
      self.q = lib.Linear(DIM, DIM, rngs=rngs)
      self.k = lib.Linear(DIM, DIM, rngs=rngs)
      self.v = lib.Linear(DIM, DIM, rngs=rngs)
      self.o = lib.Linear(DIM, DIM, rngs=rngs)
      self.ln2 = lib.LayerNorm(DIM, epsilon=EPS, rngs=rngs)
      self.up = lib.Linear(DIM, FF, rngs=rngs)
      self.down = lib.Linear(FF, DIM, rngs=rngs)

    def __call__(self, x):
      h = self.ln1(x)
      x = x + self.o(attention(self.q(h), self.k(h), self.v(h)))
      return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))

  class Transformer(lib.Module):
    def __init__(self, *, rngs):
      self.embed = lib.Embed(VOCAB, DIM, rngs=rngs)
      self.blocks = lib.List([Block(rngs=rngs) for _ in range(BLOCKS)])
      self.ln = lib.LayerNorm(DIM, epsilon=EPS, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x)
      return self.embed.attend(self.ln(x))

  return Transformer


def _norm(layer) -> dict:
  return {'scale': layer.scale[...], 'bias': layer.bias[...]}


def transformer_params(model) -> dict:
  blocks = [{'ln1': _norm(b.ln1), 'q': _linear(b.q), 'k': _linear(b.k), 'v': _linear(b.v),
             'o': _linear(b.o), 'ln2': _norm(b.ln2), 'up': _linear(b.up), 'down': _linear(b.down)}
            for b in model.blocks]
  return {'embed': model.embed.embedding[...], 'blocks': blocks, 'ln': _norm(model.ln)}


def raw_layer_norm(p, x):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x * x, -1, keepdims=True) - mean * mean)
  return (x - mean) * (lax.rsqrt(var + EPS) * p['scale']) + p['bias']


def raw_linear(p, x):
  return x @ p['kernel'] + p['bias']


def raw_transformer(params, tokens):
  x = params['embed'][tokens]
  for b in params['blocks']:
    h = raw_layer_norm(b['ln1'], x)
    x = x + raw_linear(b['o'], attention(raw_linear(b['q'], h), raw_linear(b['k'], h),
                                         raw_linear(b['v'], h)))
    x = x + raw_linear(b['down'], jax.nn.gelu(raw_linear(b['up'], raw_layer_norm(b['ln2'], x))))
  return raw_layer_norm(params['ln'], x) @ params['embed'].T


def eqx_transformer(params):
  """The transformer as idiomatic Equinox: layers act on one token, ``jax.vmap`` over tokens and batch."""
  import equinox as eqx

  def norm(p):
    ln = eqx.nn.LayerNorm(DIM, eps=EPS)
    return eqx.tree_at(lambda m: (m.weight, m.bias), ln, (p['scale'], p['bias']))

  class EBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    o: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x):  # one sequence, (T, DIM)
      h = jax.vmap(self.ln1)(x)
      a = attention(jax.vmap(self.q)(h), jax.vmap(self.k)(h), jax.vmap(self.v)(h))
      x = x + jax.vmap(self.o)(a)
      return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x))))

  class ETransformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    ln: eqx.nn.LayerNorm

    def __call__(self, tokens):  # (B, T)
      def one(seq):
        x = jax.vmap(self.embed)(seq)
        for block in self.blocks:
          x = block(x)
        return jax.vmap(self.ln)(x) @ self.embed.weight.T
      return jax.vmap(one)(tokens)

  embed = eqx.tree_at(lambda e: e.weight, eqx.nn.Embedding(VOCAB, DIM, key=jax.random.key(0)),
                      params['embed'])
  blocks = [EBlock(norm(b['ln1']), _eqx_linear(b['q']), _eqx_linear(b['k']), _eqx_linear(b['v']),
                   _eqx_linear(b['o']), norm(b['ln2']), _eqx_linear(b['up']),
                   _eqx_linear(b['down'])) for b in params['blocks']]
  return ETransformer(embed, blocks, norm(params['ln']))


def tokens_and_targets():
  key = jax.random.key(1)
  tokens = jax.random.randint(key, (TBATCH, SEQ + 1), 0, VOCAB)
  return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------- 5,000-Variable model

def wide_classes(lib, n_layers=WIDE_LAYERS):
  class Wide(lib.Module):
    def __init__(self, *, rngs):
      self.layers = lib.List([lib.Linear(WIDE_WIDTH, WIDE_WIDTH, rngs=rngs)
                              for _ in range(n_layers)])

    def __call__(self, x):
      for layer in self.layers:
        x = jnp.tanh(layer(x))
      return x

  return Wide


def copy_wide(src, dst) -> None:
  """``copy_variables`` for the wide model, by attribute access only: ``src`` is never
  flattened, so no per-object cache of its library is made before a benchmark looks."""
  for a, b in zip(src.layers, dst.layers):
    b.kernel.set_value(a.kernel.get_value())
    b.bias.set_value(a.bias.get_value())


def wide_params(model) -> list[dict]:
  return [_linear(layer) for layer in model.layers]


def raw_wide(params, x):
  for p in params:
    x = jnp.tanh(x @ p['kernel'] + p['bias'])
  return x


# ------------------------------------------------------------ scan over layers

def scan_classes(lib):
  class ScanBlock(lib.Module):
    def __init__(self, *, rngs):
      self.linear = lib.Linear(SCAN_DIM, SCAN_DIM, rngs=rngs)

    def __call__(self, x):
      return jax.nn.relu(self.linear(x))

  def create(rngs):
    @lib.split_rngs(splits=SCAN_LAYERS)
    @lib.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
      return ScanBlock(rngs=rngs)
    return build(rngs)

  return create


def scan_params(stacked) -> dict:
  return _linear(stacked.linear)


def raw_scan_body(x, p):
  return jax.nn.relu(x @ p['kernel'] + p['bias']), None


def raw_scan(params, x):
  return lax.scan(raw_scan_body, x, params)[0]


def eqx_scan_forward(stacked, x):
  """Idiomatic Equinox scan over layers: partition out the arrays, ``lax.scan`` a combining body."""
  import equinox as eqx
  params, static = eqx.partition(stacked, eqx.is_array)

  def body(x, p):
    return jax.nn.relu(jax.vmap(eqx.combine(p, static))(x)), None

  return lax.scan(body, x, params)[0]


def eqx_scan_layers(params):
  import equinox as eqx
  layer = _eqx_linear({'kernel': params['kernel'][0], 'bias': params['bias'][0]})
  return eqx.tree_at(lambda m: (m.weight, m.bias), layer,
                     (jnp.swapaxes(params['kernel'], 1, 2), params['bias']))


# ------------------------------------------------------------------ copying

def _variables_by_path(lib, model) -> dict:
  return {tuple(path): node for path, node in lib.iter_graph(model)
          if isinstance(node, lib.Variable)}


def copy_variables(src_lib, src, dst_lib, dst) -> None:
  """Give every Variable of ``dst`` (any library) the array of the Variable at the same path in ``src``."""
  theirs = _variables_by_path(src_lib, src)
  ours = _variables_by_path(dst_lib, dst)
  assert theirs.keys() == ours.keys(), sorted(set(theirs) ^ set(ours))[:5]
  for path, var in ours.items():
    var.set_value(theirs[path].get_value())
