"""Per-call overhead of a jitted Adam train step: arbax vs raw ``jax.jit`` on plain containers.

    .venv/bin/python benchmarks/overhead.py            # arbax rows
    .venv/bin/python benchmarks/overhead.py --quick    # fewer repetitions

Every variant runs the same computation on the same arrays (an MLP of depth 4
and 32, 16 units, batch 8); the rows are interleaved in one process and the
table prints each variant's median time per call and its ratio to raw jax.jit.
With the ``bench`` extra installed (flax, equinox) their rows are added.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import _common as C
import arbax as nnx

WIDTH, BATCH = 16, 8


class MLP(nnx.Module):
  def __init__(self, depth, *, rngs):
    self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(depth)])

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return x


def raw_params(depth, key):
  keys = jax.random.split(key, depth)
  return [{'kernel': jax.random.normal(k, (WIDTH, WIDTH)) * 0.1, 'bias': jnp.zeros(WIDTH)}
          for k in keys]


def raw_forward(params, x):
  for p in params:
    x = jax.nn.relu(x @ p['kernel'] + p['bias'])
  return x


def make_raw(depth):
  tx = optax.adam(1e-3)
  params = raw_params(depth, jax.random.key(0))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((raw_forward(p, x) - y) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def run(x, y):
    state[0], state[1], loss = step(state[0], state[1], x, y)
    return loss

  return run


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def make_arbax(depth, graph, graph_updates=True):
  model = MLP(depth, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit(graph=graph, graph_updates=graph_updates and graph)
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  return lambda x, y: step(model, optimizer, x, y)


def make_guide_pattern(depth):
  model = MLP(depth, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @jax.jit
  def step(model, optimizer, x, y):
    graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, nondiff):
      return _loss(nnx.merge(graphdef, params, nnx.clone(nondiff)), x, y)

    loss, grads = jax.value_and_grad(loss_fn)(params, nondiff)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  def run(x, y):
    loss, new_state = step(model, optimizer, x, y)
    nnx.update((model, optimizer), new_state)
    return loss

  return run


def make_hijax(depth):
  """Plain ``jax.jit`` with hijax Variables: JAX itself carries the updates (spec guide, last section)."""
  with nnx.var_defaults(hijax=True):
    model = MLP(depth, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @jax.jit
  def step(model, optimizer, x, y):
    graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
      return _loss(nnx.merge(graphdef, params, nondiff), x, y)

    loss, grads = jax.value_and_grad(loss_fn)(nnx.with_vars(params, hijax=False))
    optimizer.update(model, grads)
    return loss

  return lambda x, y: step(model, optimizer, x, y)


def make_flax(depth, graph, graph_updates=True):
  from flax import nnx as fnnx

  class FMLP(fnnx.Module):
    def __init__(self, depth, *, rngs):
      self.layers = fnnx.List([fnnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
      for layer in self.layers:
        x = fnnx.relu(layer(x))
      return x

  model = FMLP(depth, rngs=fnnx.Rngs(0))
  optimizer = fnnx.Optimizer(model, optax.adam(1e-3), wrt=fnnx.Param)

  @fnnx.jit(graph=graph, graph_updates=graph_updates and graph)
  def step(model, optimizer, x, y):
    loss, grads = fnnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  return lambda x, y: step(model, optimizer, x, y)


def make_equinox(depth):
  import equinox as eqx

  class EMLP(eqx.Module):
    layers: list

    def __init__(self, depth, key):
      self.layers = [eqx.nn.Linear(WIDTH, WIDTH, key=k) for k in jax.random.split(key, depth)]

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.relu(jax.vmap(layer)(x))
      return x

  model = EMLP(depth, jax.random.key(0))
  tx = optax.adam(1e-3)
  opt_state = tx.init(eqx.filter(model, eqx.is_array))

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(_loss)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  state = [model, opt_state]

  def run(x, y):
    state[0], state[1], loss = step(state[0], state[1], x, y)
    return loss

  return run


def variants(depth):
  rows = [('raw jax.jit', make_raw(depth)),
          ('arbax nnx.jit (tree)', make_arbax(depth, graph=False)),
          ('arbax nnx.jit (graph, graph updates: NNX default)', make_arbax(depth, graph=True)),
          ('arbax nnx.jit (graph, no graph updates)', make_arbax(depth, True, False)),
          ('arbax jax.jit + state/update', make_guide_pattern(depth)),
          ('arbax jax.jit + hijax Variables', make_hijax(depth))]
  try:
    rows.append(('flax nnx.jit (tree)', make_flax(depth, graph=False)))
    rows.append(('flax nnx.jit (graph, graph updates: NNX default)', make_flax(depth, graph=True)))
    rows.append(('flax nnx.jit (graph, no graph updates)', make_flax(depth, True, False)))
  except ImportError:
    pass
  try:
    rows.append(('equinox filter_jit', make_equinox(depth)))
  except ImportError:
    pass
  return rows


def measure(rows, x, y, *, calls: int, rounds: int):
  for _, run in rows:  # compile and warm up
    for _ in range(3):
      jax.block_until_ready(run(x, y))
  times = {name: [] for name, _ in rows}
  for _ in range(rounds):
    for name, run in rows:  # interleaved, so drift affects every row alike
      jax.block_until_ready(run(x, y))
      start = time.perf_counter()
      for _ in range(calls):
        out = run(x, y)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--depths', type=int, nargs='*', default=[4, 32])
  parser.add_argument('--summary', metavar='FILE', help='write the summary rows as JSON to FILE')
  args = parser.parse_args(argv)
  calls, rounds = (20, 5) if args.quick else (100, 15)
  x = jnp.ones((BATCH, WIDTH))
  y = jnp.zeros((BATCH, WIDTH))
  print('\n## Per-call overhead of a jitted Adam train step\n')
  print(f'jax {jax.__version__}, {platform.processor() or platform.machine()}, '
        f'{jax.devices()[0].platform}, python {sys.version.split()[0]}, {C.load_text()}, '
        f'{time.strftime("%Y-%m-%d")}\n')
  print('| variant | depth | us/call | ratio to raw |')
  print('|---|---|---|---|')
  results = {}
  summary = C.Summary('overhead')
  for depth in args.depths:
    med = measure(variants(depth), x, y, calls=calls, rounds=rounds)
    raw = med['raw jax.jit']
    for name, t in med.items():
      results[(name, depth)] = t / raw
      print(f'| {name} | {depth} | {t * 1e6:.1f} | {t / raw:.2f}x |')
    summary.add(f'nnx.jit train step per call, MLP depth {depth}',
                med['arbax nnx.jit (graph, graph updates: NNX default)'], 'raw jax.jit', raw,
                goal=None)
  print()
  summary.write(args.summary)
  return results


if __name__ == '__main__':
  main()
