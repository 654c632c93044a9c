"""``nnx.clone`` of a 195-Variable transformer next to ``split`` + ``merge``, arbax and Flax NNX.

    .venv/bin/python benchmarks/clone.py            # default repetitions
    .venv/bin/python benchmarks/clone.py --quick    # fewer repetitions

The model is the 12-block transformer of ``_models.py`` (195 Variables).
``clone`` is a deep copy of the object graph whose Variables are new objects
holding the same arrays, which is what ``merge(*split(model))`` builds too, so
a clone should cost about one split plus one merge. The plain-JAX row copies
the containers of the same arrays in dicts (``jax.tree.map`` identity).
Variants are interleaved; medians of wall time per call.

Goal: arbax ``clone`` <= 2x arbax ``split`` + ``merge``.
"""
from __future__ import annotations

import sys

import jax

import _common as C
import _models as M
import arbax as nnx

GOAL = 2.0


def variants(fnnx) -> dict:
  model = M.transformer_classes(nnx)(rngs=nnx.Rngs(0))
  params = M.transformer_params(model)
  fns = {'raw JAX: jax.tree.map copy (dicts)': lambda: jax.tree.map(lambda x: x, params),
         'arbax split': lambda: nnx.split(model),
         'arbax split + merge': lambda: nnx.merge(*nnx.split(model)),
         'arbax clone': lambda: nnx.clone(model)}
  if fnnx is not None:
    fmodel = M.transformer_classes(fnnx)(rngs=fnnx.Rngs(0))
    M.copy_variables(nnx, model, fnnx, fmodel)
    fns['Flax NNX split'] = lambda: fnnx.split(fmodel)
    fns['Flax NNX split + merge'] = lambda: fnnx.merge(*fnnx.split(fmodel))
    fns['Flax NNX clone'] = lambda: fnnx.clone(fmodel)
  return fns


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx = C.optional('flax.nnx')
  C.header('clone vs split + merge, 195 Variables')
  fns = variants(fnnx)
  number, rounds = (10, 5) if args.quick else (20, 15)
  med = {k: C.median(v) for k, v in C.interleave(fns, rounds=rounds, number=number,
                                                 block=False).items()}
  rows = []
  for name, t in med.items():
    lib = 'Flax NNX' if name.startswith('Flax') else 'arbax'
    ref = med.get(f'{lib} split + merge')
    goal = GOAL if name == 'arbax clone' else None
    rows.append((name, C.fmt_time(t), C.ratio_text(t / ref, goal) if ref else ''))
  C.table(['variant', 'median per call', 'ratio to own split + merge'], rows)
  summary = C.Summary('clone')
  summary.add('nnx.clone, 195 Variables', med['arbax clone'], 'arbax split + merge',
              med['arbax split + merge'], goal=GOAL,
              note=f"arbax split alone {C.fmt_time(med['arbax split'])}",
              columns={'arbax': med['arbax clone'], 'Flax NNX': med.get('Flax NNX clone'),
                       'raw JAX': med['raw JAX: jax.tree.map copy (dicts)']})
  if args.profile:
    C.profile('arbax clone', fns['arbax clone'], number=50)
    C.profile('arbax split + merge', fns['arbax split + merge'], number=50)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
