"""``nnx.scan`` over 12 stacked layers called outside ``jit``: arbax vs Flax NNX, Equinox and ``lax.scan``.

    .venv/bin/python benchmarks/scan_eager.py            # default repetitions
    .venv/bin/python benchmarks/scan_eager.py --quick    # fewer repetitions

The classic scan over layers: 12 ``Linear(32, 32)`` + relu blocks created at
once with ``split_rngs`` + ``vmap`` (so each Variable has a leading axis of
12), then applied one after the other by a function decorated once with
``nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)`` and called eagerly,
again and again, on the same arrays. The Equinox row is its idiom (partition
the arrays, ``lax.scan`` a body that combines them); the raw row is
``lax.scan`` of a module-level body over a dict of the same stacked arrays.
A transform called again with arguments of the same structure should reuse
its traced and compiled work: the ``compiles per repeat`` column counts XLA
compilations per call after the first (via ``jax.monitoring``).

Goal: arbax <= 1.2x Flax NNX, and no recompilation on a repeat call.
"""
from __future__ import annotations

import sys

import jax.numpy as jnp

import _common as C
import _models as M
import arbax as nnx

GOAL = 1.2
REPEATS = 3  # calls whose compilations are counted


def forward_fn(lib):
  @lib.scan(in_axes=(lib.Carry, 0), out_axes=lib.Carry)
  def forward(x, layer):
    return layer(x)

  return forward


def variants(fnnx, eqx) -> dict:
  x = jnp.ones((M.BATCH, M.SCAN_DIM))
  layers = M.scan_classes(nnx)(nnx.Rngs(0))
  params = M.scan_params(layers)
  forward = forward_fn(nnx)
  fns = {'raw lax.scan (dicts)': lambda: M.raw_scan(params, x),
         'arbax': lambda: forward(x, layers)}
  if fnnx is not None:
    flayers = M.scan_classes(fnnx)(fnnx.Rngs(0))
    M.copy_variables(nnx, layers, fnnx, flayers)
    fforward = forward_fn(fnnx)
    fns['Flax NNX'] = lambda: fforward(x, flayers)
  if eqx is not None:
    elayers = M.eqx_scan_layers(params)
    fns['Equinox'] = lambda: M.eqx_scan_forward(elayers, x)
  return fns


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx, eqx = C.optional('flax.nnx'), C.optional('equinox')
  C.header('nnx.scan over 12 stacked layers, called outside jit')
  fns = variants(fnnx, eqx)
  rounds = 3 if args.quick else 9
  # Calls per sample: enough that a sample is not timer noise (Equinox retraces: one is plenty).
  number = {name: 1 if name == 'Equinox' else 20 for name in fns}
  med = {k: C.median(v) for k, v in C.interleave(fns, rounds=rounds, number=number).items()}
  counter = C.CompileCounter()
  compiles = {}
  for name, fn in fns.items():
    with counter.window() as w:
      for _ in range(REPEATS):
        fn()
    compiles[name] = w.count / REPEATS
  ref_name = 'Flax NNX' if 'Flax NNX' in med else None
  ref = med.get(ref_name)
  rows = [(name, C.fmt_time(t), f'{compiles[name]:g}',
           C.ratio_text(t / ref, GOAL if name == 'arbax' else None) if ref else 'n/a')
          for name, t in med.items()]
  C.table(['variant', 'median per call', 'compiles per repeat', 'ratio to Flax NNX'], rows)
  summary = C.Summary('scan_eager')
  summary.add('nnx.scan outside jit, 12 layers', med['arbax'], ref_name or 'Flax NNX (not installed)',
              ref, goal=GOAL, note=f"arbax compiles per repeat: {compiles['arbax']:g} (goal 0)",
              columns={('raw JAX' if k.startswith('raw') else k): t for k, t in med.items()})
  summary.add('nnx.scan outside jit: compiles per repeat call', compiles['arbax'], 'none', None,
              goal=None, unit='count', note='goal 0')
  if args.profile:
    C.profile('arbax nnx.scan outside jit', fns['arbax'], number=3)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
