"""Plain ``jax.jit`` train step with hijax Variables: arbax vs Flax NNX, next to ``nnx.jit`` and raw ``jax.jit``.

    .venv/bin/python benchmarks/hijax_jit.py            # default repetitions
    .venv/bin/python benchmarks/hijax_jit.py --quick    # fewer repetitions

With ``nnx.var_defaults(hijax=True)`` Variables are JAX hi-types: a plain
``jax.jit`` step that updates them in place carries the updates out with no
``nnx.state`` / ``nnx.update`` calls. The step is the one of
``overhead.py`` (Adam on the small MLP, depth 4, 16 units, batch 8; the same
arrays in every variant); this script adds Flax NNX's hijax row and prints
ratios to raw ``jax.jit`` on dicts and to Flax NNX. Variants interleaved;
medians of wall time per call.

Goal: none yet (profile the path); the issue measured 3.4 ms arbax,
7.3 ms Flax NNX, 0.42 ms raw.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import optax

import _common as C
import _models as M
import overhead

RAW = 'raw jax.jit (dicts)'


def make_flax_hijax(fnnx, depth):
  with fnnx.var_defaults(hijax=True):
    model = M.mlp_classes(fnnx)(depth, rngs=fnnx.Rngs(0))
    optimizer = fnnx.Optimizer(model, optax.adam(1e-3), wrt=fnnx.Param)

  @jax.jit
  def step(model, optimizer, x, y):
    graphdef, params, nondiff = fnnx.split(model, fnnx.Param, ...)

    def loss_fn(params):
      return overhead._loss(fnnx.merge(graphdef, params, nondiff), x, y)

    loss, grads = jax.value_and_grad(loss_fn)(fnnx.with_vars(params, hijax=False))
    optimizer.update(model, grads)
    return loss

  return lambda x, y: step(model, optimizer, x, y)


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx = C.optional('flax.nnx')
  C.header('Plain jax.jit step with hijax Variables, small MLP (depth 4)')
  depth = M.DEPTH
  x, y = jnp.ones((M.BATCH, M.WIDTH)), jnp.zeros((M.BATCH, M.WIDTH))
  runs = {RAW: overhead.make_raw(depth),
          'arbax nnx.jit (graph mode)': overhead.make_arbax(depth, graph=True),
          'arbax jax.jit + hijax Variables': overhead.make_hijax(depth)}
  if fnnx is not None:
    runs['Flax NNX jax.jit + hijax Variables'] = make_flax_hijax(fnnx, depth)
  fns = {name: (lambda run=run: run(x, y)) for name, run in runs.items()}
  number, rounds = (10, 5) if args.quick else (30, 15)
  med = {k: C.median(v) for k, v in C.interleave(fns, rounds=rounds, number=number,
                                                 warmup=3).items()}
  flax = med.get('Flax NNX jax.jit + hijax Variables')
  rows = [(name, C.fmt_time(t), C.ratio_text(t / med[RAW]),
           C.ratio_text(t / flax) if flax else 'n/a') for name, t in med.items()]
  C.table(['variant', 'median per call', 'ratio to raw', 'ratio to Flax NNX hijax'], rows)
  ours = med['arbax jax.jit + hijax Variables']
  summary = C.Summary('hijax_jit')
  summary.add('plain jax.jit step, hijax Variables, small MLP', ours, RAW, med[RAW], goal=None,
              note=f'{ours / flax:.2f}x Flax NNX hijax' if flax else '',
              columns={'arbax': ours, 'Flax NNX': flax, 'raw JAX': med[RAW]})
  if args.profile:
    C.profile('arbax jax.jit + hijax Variables', fns['arbax jax.jit + hijax Variables'],
              number=50)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
