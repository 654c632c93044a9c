"""Cost of ``jax.tree.flatten`` / ``jax.tree.map`` over an arbax model vs the same leaves in dicts.

    .venv/bin/python benchmarks/pytree_flatten.py            # default repetitions
    .venv/bin/python benchmarks/pytree_flatten.py --quick    # fewer repetitions

The model is an ``nnx.Module`` holding an ``nnx.List`` of 32 small Modules,
each with two ``nnx.Param`` (so 64 Variable nodes, 32 Module nodes). The
baseline is a list of 32 ``{'kernel': ..., 'bias': ...}`` dicts with the very
same arrays. Flatten is on the hot path of ``jax.jit`` over models, so the
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


class Block(nnx.Module):
  def __init__(self, key):
    self.kernel = nnx.Param(jax.random.normal(key, (WIDTH, WIDTH)))
    self.bias = nnx.Param(jnp.zeros(WIDTH))


class Model(nnx.Module):
  def __init__(self, depth):
    keys = jax.random.split(jax.random.key(0), depth)
    self.layers = nnx.List([Block(k) for k in keys])


def plain_copy(model: Model) -> list[dict]:
  return [{'kernel': b.kernel.get_value(), 'bias': b.bias.get_value()} for b in model.layers]


def per_call_us(fn, arg, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    fn(arg)
  return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  rounds, calls = (5, 200) if args.quick else (15, 1000)

  model = Model(DEPTH)
  plain = plain_copy(model)
  assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(plain)) == 2 * DEPTH
  identity = lambda x: x  # noqa: E731
  ops = {
      'jax.tree.flatten': jax.tree.flatten,
      'jax.tree.map(identity)': lambda t: jax.tree.map(identity, t),
  }
  samples = {(op, kind): [] for op in ops for kind in ('arbax', 'dicts')}
  for fn in ops.values():  # warm caches (structure caches, treedef hashing)
    fn(model), fn(plain)
  for _ in range(rounds):
    for op, fn in ops.items():
      samples[(op, 'arbax')].append(per_call_us(fn, model, calls))
      samples[(op, 'dicts')].append(per_call_us(fn, plain, calls))

  C.header(f'jax.tree over a {DEPTH}-layer model ({2 * DEPTH} Params) vs the same leaves in dicts; '
           f'median of {rounds} rounds x {calls} calls')
  rows = []
  summary = C.Summary('pytree_flatten')
  for op in ops:
    ours = statistics.median(samples[(op, 'arbax')])
    base = statistics.median(samples[(op, 'dicts')])
    goal = GOAL if op == 'jax.tree.flatten' else None
    rows.append((op, f'{ours:.1f}', f'{base:.1f}', C.ratio_text(ours / base, goal)))
    summary.add(f'{op} of a {DEPTH}-layer model vs dicts', ours * 1e-6, 'same leaves in dicts',
                base * 1e-6, goal=goal)
  C.table(['operation', 'arbax µs/call', 'dicts µs/call', 'ratio'], rows)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
