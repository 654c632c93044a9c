"""Eager forward call (no jit): arbax vs Flax NNX, Equinox and the plain-JAX function on dicts.

    .venv/bin/python benchmarks/eager_forward.py            # MLP and transformer
    .venv/bin/python benchmarks/eager_forward.py --quick    # fewer repetitions

Two models, each variant on the same arrays (see ``_models.py``): the small
MLP of ``overhead.py`` (depth 4, 16 units, batch 8) and a 12-block
transformer (64 features, 4 heads, 4 x 32 tokens). Eager calls dispatch op
by op, so whatever a layer does in Python beyond the JAX ops (reading
Variables, dtype promotion, extra reshapes) shows up here. Variants are
interleaved; the table shows each one's median wall time per call.

Goal: arbax <= 1.3x the plain-JAX function on dicts.
"""
from __future__ import annotations

import sys

import jax.numpy as jnp

import _common as C
import _models as M
import arbax as nnx

GOAL = 1.3
RAW = 'raw JAX (dicts)'


def mlp_variants(fnnx, eqx) -> dict:
  model = M.mlp_classes(nnx)(rngs=nnx.Rngs(0))
  params = M.mlp_params(model)
  x = jnp.ones((M.BATCH, M.WIDTH))
  fns = {RAW: lambda: M.raw_mlp(params, x), 'arbax': lambda: model(x)}
  if fnnx is not None:
    fmodel = M.mlp_classes(fnnx)(rngs=fnnx.Rngs(0))
    M.copy_variables(nnx, model, fnnx, fmodel)
    fns['Flax NNX'] = lambda: fmodel(x)
  if eqx is not None:
    emodel = M.eqx_mlp(params)
    fns['Equinox'] = lambda: emodel(x)
  return fns


def transformer_variants(fnnx, eqx) -> dict:
  model = M.transformer_classes(nnx)(rngs=nnx.Rngs(0))
  params = M.transformer_params(model)
  tokens, _ = M.tokens_and_targets()
  fns = {RAW: lambda: M.raw_transformer(params, tokens), 'arbax': lambda: model(tokens)}
  if fnnx is not None:
    fmodel = M.transformer_classes(fnnx)(rngs=fnnx.Rngs(0))
    M.copy_variables(nnx, model, fnnx, fmodel)
    fns['Flax NNX'] = lambda: fmodel(tokens)
  if eqx is not None:
    emodel = M.eqx_transformer(params)
    fns['Equinox'] = lambda: emodel(tokens)
  return fns


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx, eqx = C.optional('flax.nnx'), C.optional('equinox')
  C.header('Eager forward call')
  summary = C.Summary('eager_forward')
  cases = [('small MLP', mlp_variants, (20, 5) if args.quick else (50, 15)),
           ('transformer, 12 blocks', transformer_variants, (2, 5) if args.quick else (2, 9))]
  rows = []
  for name, build, (number, rounds) in cases:
    fns = build(fnnx, eqx)
    med = {k: C.median(v) for k, v in C.interleave(fns, rounds=rounds, number=number).items()}
    raw = med[RAW]
    for variant, t in med.items():
      rows.append((name, variant, C.fmt_time(t),
                   C.ratio_text(t / raw, GOAL if variant == 'arbax' else None)))
    summary.add(f'eager forward, {name}', med['arbax'], RAW, raw, goal=GOAL,
                columns={('raw JAX' if k == RAW else k): t for k, t in med.items()})
    if args.profile:
      C.profile(f'arbax eager forward, {name}', fns['arbax'], number=number)
  C.table(['model', 'variant', 'median per call', 'ratio to raw JAX'], rows)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
