"""Python heap held after ``nnx.state(model)`` of a 5,000-Variable model: arbax vs Flax NNX, Equinox, plain JAX.

    .venv/bin/python benchmarks/state_heap.py            # default
    .venv/bin/python benchmarks/state_heap.py --quick    # the same (it is one call per variant)

The model is 2,500 ``Linear(8, 8)`` layers (5,000 Variables; ``_models.py``),
the same arrays in every variant, freshly built (nothing flattened it before
the measured call, so per-object caches made by the first flatten count).
``tracemalloc`` counts the Python heap a
call leaves allocated while its result is kept (``held``), what stays after
the result is dropped (``cached``: memory the library keeps for later calls),
and the peak during the call. No array data is copied by any variant, so
this is the bookkeeping the state costs: the Equinox row is
``eqx.filter(model, eqx.is_array)``, the plain-JAX row copies the dicts
holding the arrays (``jax.tree.map`` identity). Before measuring, each
variant runs once on a 50-layer model of the same classes, so type-level
caches are warm for all alike; the table shows the first call on the big
model and a second one.

Goal: arbax held <= 1.5x Flax NNX's.
"""
from __future__ import annotations

import gc
import sys
import tracemalloc

import jax

import _common as C
import _models as M
import arbax as nnx

GOAL = 1.5
MIB = 2 ** 20


def heap(fn) -> tuple[float, float, float]:
  """Bytes held with the result alive, bytes still held after dropping it, peak bytes during."""
  gc.collect()
  tracemalloc.start()
  try:
    base = tracemalloc.get_traced_memory()[0]
    result = fn()
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    del result
    gc.collect()
    cached = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  return held - base, cached - base, peak - base


def variants(fnnx, eqx, n_layers: int) -> dict:
  model = M.wide_classes(nnx, n_layers)(rngs=nnx.Rngs(0))
  params = M.wide_params(model)
  fns = {'raw JAX: jax.tree.map copy (dicts)': lambda: jax.tree.map(lambda x: x, params),
         'arbax nnx.state': lambda: nnx.state(model)}
  if fnnx is not None:
    fmodel = M.wide_classes(fnnx, n_layers)(rngs=fnnx.Rngs(0))
    M.copy_wide(model, fmodel)
    fns['Flax NNX nnx.state'] = lambda: fnnx.state(fmodel)
  if eqx is not None:
    emodel = [M._eqx_linear(p) for p in params]
    fns['Equinox eqx.filter(is_array)'] = lambda: eqx.filter(emodel, eqx.is_array)
  return fns


def main(argv=None) -> int:
  args = C.parse_args(__doc__, argv=argv)
  fnnx, eqx = C.optional('flax.nnx'), C.optional('equinox')
  C.header(f'Heap held after nnx.state, {2 * M.WIDE_LAYERS} Variables')
  for fn in variants(fnnx, eqx, 50).values():  # type-level caches, alike for all
    fn()
  fns = variants(fnnx, eqx, M.WIDE_LAYERS)
  first = {name: heap(fn) for name, fn in fns.items()}
  second = {name: heap(fn) for name, fn in fns.items()}
  flax_held = first.get('Flax NNX nnx.state', (None,))[0]
  rows = []
  for name, (held, cached, peak) in first.items():
    goal = GOAL if name.startswith('arbax') else None
    rows.append((name, f'{held / MIB:.2f} MiB', f'{cached / MIB:.2f} MiB', f'{peak / MIB:.2f} MiB',
                 f'{second[name][0] / MIB:.2f} MiB',
                 C.ratio_text(held / flax_held, goal) if flax_held else 'n/a'))
  C.table(['variant', 'held (1st call)', 'cached after drop', 'peak during', 'held (2nd call)',
           'ratio to Flax NNX'], rows)
  summary = C.Summary('state_heap')
  summary.add(f'heap held after nnx.state ({2 * M.WIDE_LAYERS} Variables)',
              first['arbax nnx.state'][0], 'Flax NNX' if fnnx else 'Flax NNX (not installed)',
              flax_held, goal=GOAL, unit='B',
              columns={'arbax': first['arbax nnx.state'][0], 'Flax NNX': flax_held,
                       'Equinox': first.get('Equinox eqx.filter(is_array)', (None,))[0],
                       'raw JAX': first['raw JAX: jax.tree.map copy (dicts)'][0]})
  if args.profile:
    fresh = M.wide_classes(nnx)(rngs=nnx.Rngs(0))  # a first call: nothing cached for it yet
    gc.collect()
    tracemalloc.start(25)
    kept = [nnx.state(fresh)]  # alive while the snapshot is taken
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    tracemalloc.stop()
    print('\n### what arbax nnx.state leaves allocated on a first call (tracemalloc, top lines)\n')
    for stat in snapshot.statistics('lineno')[:15]:
      print(f'{stat.size / 1024:9.1f} KiB  {stat.count:7d} blocks  {stat.traceback[0]}')
    kept.clear()
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
