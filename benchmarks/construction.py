"""Building a 5,000-Variable model, eagerly and abstractly: arbax vs Flax NNX, Equinox and plain JAX.

    .venv/bin/python benchmarks/construction.py            # default repetitions
    .venv/bin/python benchmarks/construction.py --quick    # one round

The model is 2,500 ``Linear(8, 8)`` layers in a list (5,000 Variables; see
``_models.py``). Eagerly: ``Model(rngs=Rngs(0))`` (Equinox: one
``eqx.nn.Linear`` per key of ``jax.random.split``). Abstractly:
``nnx.eval_shape(lambda: Model(rngs=Rngs(0)))`` (Equinox:
``eqx.filter_eval_shape``), which traces the constructor and creates no
array. The plain-JAX row runs the ops arbax's constructor runs (per layer two
key ``fold_in``s with their counter increments, ``lecun_normal`` and ``zeros``)
into a list of dicts, so the gap between it and arbax is arbax's own Python;
its abstract row is ``jax.eval_shape`` of the same function. Flax NNX has
no abstract row: its ``eval_shape`` of this model is quadratic in the layers
(minutes). Variants are interleaved; medians of wall time.

Goals: arbax abstract <= 0.5x arbax eager; arbax eager <= Equinox eager.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

import _common as C
import _models as M
import arbax as nnx

ABSTRACT_GOAL, EAGER_GOAL = 0.5, 1.0
N = M.WIDE_LAYERS


def raw_build(n=N):
  """What arbax's constructor computes, as plain JAX into dicts."""
  key = jax.random.key(0)
  count = jnp.zeros((), jnp.uint32)
  init = jax.nn.initializers.lecun_normal()
  layers = []
  for _ in range(n):
    keys = []
    for _ in range(2):  # a key for the kernel and one for the bias, as nnx.Linear draws
      keys.append(jax.random.fold_in(key, count))
      count = count + 1
    layers.append({'kernel': init(keys[0], (M.WIDE_WIDTH, M.WIDE_WIDTH)),
                   'bias': jnp.zeros((M.WIDE_WIDTH,))})
  return layers


def eqx_build(eqx, n):
  def build():
    keys = jax.random.split(jax.random.key(0), n)
    return [eqx.nn.Linear(M.WIDE_WIDTH, M.WIDE_WIDTH, key=k) for k in keys]
  return build


def variants(fnnx, eqx, n=N) -> tuple[dict, dict]:
  Wide = M.wide_classes(nnx, n)
  eager = {'raw JAX (same ops, dicts)': lambda: raw_build(n),
           'arbax': lambda: Wide(rngs=nnx.Rngs(0))}
  abstract = {'raw JAX (same ops, dicts)': lambda: jax.eval_shape(lambda: raw_build(n)),
              'arbax': lambda: nnx.eval_shape(lambda: Wide(rngs=nnx.Rngs(0)))}
  if fnnx is not None:
    FWide = M.wide_classes(fnnx, n)
    eager['Flax NNX'] = lambda: FWide(rngs=fnnx.Rngs(0))
    # No abstract Flax row: Flax 0.12.8's eval_shape of this model runs for many minutes
    # (each RngStream count update asks a tracer for its sharding, which scans the whole
    # jaxpr built so far: quadratic in the number of layers).
  if eqx is not None:
    build = eqx_build(eqx, n)
    eager['Equinox'] = build
    abstract['Equinox'] = lambda: eqx.filter_eval_shape(build)
  return eager, abstract


def columns(med: dict, mode: str) -> dict:
  names = {'arbax': 'arbax', 'Flax NNX': 'Flax NNX', 'Equinox': 'Equinox',
           'raw JAX (same ops, dicts)': 'raw JAX'}
  return {column: med[(mode, name)] for name, column in names.items() if (mode, name) in med}


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx, eqx = C.optional('flax.nnx'), C.optional('equinox')
  C.header(f'Building a {2 * N}-Variable model ({N} Linear(8, 8))')
  for fn in [*variants(fnnx, eqx, 50)[0].values(), *variants(fnnx, eqx, 50)[1].values()]:
    fn()  # JAX's per-shape caches, on a 50-layer model: alike for all, and quicker than a round
  eager, abstract = variants(fnnx, eqx)
  fns = {**{('eager', k): f for k, f in eager.items()},
         **{('abstract', k): f for k, f in abstract.items()}}
  rounds = 1 if args.quick else 3
  med = {k: C.median(v) for k, v in C.interleave(fns, rounds=rounds, warmup=0).items()}
  rows = []
  for (mode, name), t in med.items():
    vs_own_eager = t / med[('eager', name)]
    vs_eqx = t / med[('eager', 'Equinox')] if ('eager', 'Equinox') in med else None
    rows.append((mode, name, C.fmt_time(t),
                 C.ratio_text(vs_own_eager, ABSTRACT_GOAL if name == 'arbax' and mode == 'abstract'
                              else None) if mode == 'abstract' else '',
                 C.ratio_text(vs_eqx, EAGER_GOAL if name == 'arbax' and mode == 'eager' else None)
                 if mode == 'eager' and vs_eqx is not None else ''))
  C.table(['mode', 'variant', 'median', 'ratio to own eager', 'ratio to Equinox eager'], rows)
  summary = C.Summary('construction')
  summary.add(f'abstract construction ({2 * N} Variables) vs eager', med[('abstract', 'arbax')],
              'arbax eager', med[('eager', 'arbax')], goal=ABSTRACT_GOAL,
              columns=columns(med, 'abstract'))
  summary.add(f'eager construction ({2 * N} Variables)', med[('eager', 'arbax')],
              'Equinox eager' if eqx else 'Equinox (not installed)', med.get(('eager', 'Equinox')),
              goal=EAGER_GOAL, columns=columns(med, 'eager'))
  if args.profile:
    C.profile('arbax eager construction', eager['arbax'])
    C.profile('arbax abstract construction', abstract['arbax'])
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
