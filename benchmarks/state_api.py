"""Cost of the State API (split/merge, state/update) next to plain ``jax.tree`` flattening.

    .venv/bin/python benchmarks/state_api.py            # tree mode and graph mode rows
    .venv/bin/python benchmarks/state_api.py --quick    # fewer repetitions

The model is a 32-layer MLP: an ``nnx.Module`` holding an ``nnx.List`` of
Modules with two ``nnx.Param`` each (64 arrays). The baseline does the same
round trip on the same 64 arrays in a list of dicts with
``jax.tree.flatten`` / ``jax.tree.unflatten``, so a ratio of 1.0 means the NNX
API costs nothing beyond what any pytree traversal costs. A second column
times ``jax.tree.flatten`` / ``unflatten`` of the model object itself (arbax
Pytrees are JAX pytrees). Rows are interleaved in one process; each time is
the best of several rounds, in microseconds of this process's CPU time
(``time.process_time``, with the garbage collector paused as ``timeit``
does), so other processes on a busy machine do not bill the longer rows.
"""
from __future__ import annotations

import gc
import sys
import time

import jax
import jax.numpy as jnp

import _common as C
import arbax as nnx

DEPTH, WIDTH = 32, 4


class Layer(nnx.Module):
  def __init__(self, i):
    self.kernel = nnx.Param(jnp.full((WIDTH, WIDTH), float(i)))
    self.bias = nnx.Param(jnp.zeros(WIDTH))


class MLP(nnx.Module):
  def __init__(self, depth):
    self.layers = nnx.List([Layer(i) for i in range(depth)])


def make_cases(graph: bool):
  model = MLP(DEPTH)
  raw = [{'kernel': layer.kernel[...], 'bias': layer.bias[...]} for layer in model.layers]

  def split_merge():
    graphdef, state = nnx.split(model, graph=graph)
    return nnx.merge(graphdef, state)

  def state_update():
    nnx.update(model, nnx.state(model, graph=graph))

  def tree_roundtrip():
    leaves, treedef = jax.tree.flatten(raw)
    return jax.tree.unflatten(treedef, leaves)

  def model_roundtrip():
    leaves, treedef = jax.tree.flatten(model)
    return jax.tree.unflatten(treedef, leaves)

  return {'split+merge': split_merge, 'state+update': state_update}, tree_roundtrip, model_roundtrip


def time_us(fn, number: int) -> float:
  gc.disable()  # as timeit does: a collection would bill one row for garbage others made
  try:
    t0 = time.process_time()
    for _ in range(number):
      fn()
    return (time.process_time() - t0) / number * 1e6
  finally:
    gc.enable()


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  number, repeat = (50, 5) if args.quick else (200, 15)

  C.header(f'State API vs jax.tree, {DEPTH}-layer MLP ({2 * DEPTH} Params), best of rounds, '
           f'CPU time')
  rows = []
  summary = C.Summary('state_api')
  for graph in (False, True):
    cases, baseline, model_baseline = make_cases(graph)
    for name, fn in cases.items():
      fns = (fn, baseline, model_baseline)
      for f in fns:
        f()  # warm caches
      rounds = [[], [], []]
      for _ in range(repeat):  # interleaved so machine noise hits all alike
        for times, f in zip(rounds, fns):
          times.append(time_us(f, number))
      a, b, c = (min(times) for times in rounds)
      mode = 'graph' if graph else 'tree'
      rows.append((mode, name, f'{a:.1f}', f'{b:.1f}', f'{a / b:.2f}×', f'{c:.1f}', f'{a / c:.2f}×'))
      summary.add(f'{name} ({mode} mode), {2 * DEPTH} Params', a * 1e-6,
                  'jax.tree round trip of the leaves in dicts', b * 1e-6, goal=None)
  C.table(['mode', 'operation', 'arbax µs', 'jax.tree(leaves) µs', 'ratio', 'jax.tree(model) µs',
           'ratio'], rows)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
