"""Cost of ``jax.tree.flatten`` / ``jax.tree.map`` over an arbax model vs the same leaves in dicts.

    .venv/bin/python benchmarks/pytree_flatten.py            # default repetitions
    .venv/bin/python benchmarks/pytree_flatten.py --quick    # fewer repetitions

The model is an ``nnx.Module`` holding an ``nnx.List`` of 32 small Modules,
each with two ``nnx.Param`` (so 64 Variable nodes, 32 Module nodes). The
baseline is a list of 32 ``{'kernel': ..., 'bias': ...}`` dicts with the very
same arrays; Flax NNX's Modules (pytrees too) and a list of Equinox Modules
hold them as well when the ``bench`` extra is installed. Flatten is on the hot path of ``jax.jit`` over models, so the
target is a ratio of at most 2x. Rounds of the variants are interleaved so
machine noise hits them alike; the table shows each variant's median.
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp

import _common as C
import arbax as nnx

GOAL = 2.0

DEPTH, WIDTH = 32, 4


def model_classes(lib):
  class Block(lib.Module):
    def __init__(self, key):
      self.kernel = lib.Param(jax.random.normal(key, (WIDTH, WIDTH)))
      self.bias = lib.Param(jnp.zeros(WIDTH))

  class Model(lib.Module):
    def __init__(self, depth):
      keys = jax.random.split(jax.random.key(0), depth)
      self.layers = lib.List([Block(k) for k in keys])

  return Model


def plain_copy(model) -> list[dict]:
  return [{'kernel': b.kernel.get_value(), 'bias': b.bias.get_value()} for b in model.layers]


def eqx_copy(eqx, plain: list[dict]) -> list:
  """The same arrays as Equinox modules (its idiom: layers in a list, fields on dataclasses)."""
  class Block(eqx.Module):
    kernel: jax.Array
    bias: jax.Array

  return [Block(p['kernel'], p['bias']) for p in plain]


def per_call_us(fn, arg, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn(arg)
  return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx, eqx = C.optional('flax.nnx'), C.optional('equinox')
  rounds, calls = (5, 200) if args.quick else (15, 1000)

  model = model_classes(nnx)(DEPTH)
  plain = plain_copy(model)
  trees = {'arbax': model, 'dicts': plain}
  if fnnx is not None:
    fmodel = model_classes(fnnx)(DEPTH)
    for a, b in zip(model.layers, fmodel.layers):
      b.kernel.set_value(a.kernel.get_value())
      b.bias.set_value(a.bias.get_value())
    trees['Flax NNX'] = fmodel
  if eqx is not None:
    trees['Equinox'] = eqx_copy(eqx, plain)
  for tree in trees.values():
    assert len(jax.tree.leaves(tree)) == 2 * DEPTH
  identity = lambda x: x  # noqa: E731
  ops = {
      'jax.tree.flatten': jax.tree.flatten,
      'jax.tree.map(identity)': lambda t: jax.tree.map(identity, t),
  }
  samples = {(op, kind): [] for op in ops for kind in trees}
  for fn in ops.values():  # warm caches (structure caches, treedef hashing)
    for tree in trees.values():
      fn(tree)
  for _ in range(rounds):
    for op, fn in ops.items():
      for kind, tree in trees.items():
        samples[(op, kind)].append(per_call_us(fn, tree, calls))

  C.header(f'jax.tree over a {DEPTH}-layer model ({2 * DEPTH} Params) vs the same leaves in dicts; '
           f'median of {rounds} rounds x {calls} calls')
  rows = []
  summary = C.Summary('pytree_flatten')
  for op in ops:
    med = {kind: statistics.median(samples[(op, kind)]) for kind in trees}
    base = med['dicts']
    goal = GOAL if op == 'jax.tree.flatten' else None
    for kind, t in med.items():
      rows.append((op, kind, f'{t:.1f}', C.ratio_text(t / base, goal if kind == 'arbax' else None)))
    summary.add(f'{op} of a {DEPTH}-layer model vs dicts', med['arbax'] * 1e-6,
                'same leaves in dicts', base * 1e-6, goal=goal,
                columns={('raw JAX' if k == 'dicts' else k): t * 1e-6 for k, t in med.items()})
  C.table(['operation', 'variant', 'µs/call', 'ratio to dicts'], rows)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
