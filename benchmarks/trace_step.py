"""Tracing a jitted Adam train step: arbax ``nnx.jit`` vs Flax NNX and raw ``jax.jit`` on dicts.

    .venv/bin/python benchmarks/trace_step.py            # transformer and 5,000-Variable model
    .venv/bin/python benchmarks/trace_step.py --quick    # fewer repeats
    .venv/bin/python benchmarks/trace_step.py --only transformer

What a first call costs before XLA compiles: ``step.trace(*args)`` (the
library's work on the arguments plus JAX tracing the step to a jaxpr) and
``.lower()`` (jaxpr to MLIR), timed separately; nothing is compiled (XLA's
compile of these steps takes 5-40 s on a loaded 2-core machine, would swamp
the difference and is the same work for every variant). The steady-state
work a call does after the computation (writing updates back) is measured by
``overhead.py``. Two models, same arrays for every variant (see
``_models.py``): the 12-block transformer (195 Variables; cross-entropy) and
2,500 ``Linear(8, 8)`` layers (5,000 Variables; mean-squared error; tracing
only, no tree-mode row: each trace of it takes 10-30 s). Each
repeat builds a fresh jitted function and, for arbax and Flax, fresh model
and optimizer objects (``clone``), so no per-function or per-object cache
helps; a warm-up repeat on a small copy of the model first fills JAX's own
per-shape caches for every variant alike. Variants are interleaved within
each repeat; medians of this process's CPU time (``time.process_time``:
tracing is single-threaded Python, and CPU time is not inflated by other
processes on a loaded machine; the garbage collector stays on, as in real use,
since its pauses grow with what a library keeps alive).

The ``jaxpr eqns`` column counts the traced step's equations (nested ones
included): more equations than raw means arbax adds work to the computation
itself, not just to Python. ``GC`` is the collector's share of trace + lower
and its full collections: one costs 0.1-0.2 s in a process this size and lands
in whichever phase crosses the collector's threshold, so the transformer rows
also show trace + lower together and a second trace with the collector off
(pure Python work).

Goal: arbax (graph mode, the NNX default) <= 1.15x raw ``jax.jit`` on dicts,
tracing (the ``trace`` column; lowering is shown beside it).
"""
from __future__ import annotations

import gc
import sys
import time
import typing as tp

import jax
import jax.extend
import jax.numpy as jnp
import optax

import _common as C
import _models as M
import arbax as nnx

GOAL = 1.15
RAW = 'raw jax.jit (dicts)'
FLAX = 'Flax NNX (graph mode: NNX default)'


def xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def mse(out, target):
  return jnp.mean((out - target) ** 2)


def raw_step_factory(forward, loss):
  tx = optax.adam(1e-3)

  def make():
    @jax.jit
    def step(params, opt_state, x, y):
      value, grads = jax.value_and_grad(lambda p: loss(forward(p, x), y))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value
    return step

  return make, tx


def nnx_step_factory(lib, loss, **jit_kwargs):
  def make():
    @lib.jit(**jit_kwargs)
    def step(model, optimizer, x, y):
      value, grads = lib.value_and_grad(lambda m: loss(m(x), y))(model)
      optimizer.update(model, grads)
      return value
    return step

  return make


class Case:
  """One model: its arbax instance, the same arrays in dicts, the inputs, and how to build the
  small copy that warms JAX's caches (``small_classes(lib)``)."""

  def __init__(self, name, classes, params_of, raw_forward, loss, inputs, small_classes, *,
               lower=True, tree_mode=True):
    self.name, self.classes, self.loss, self.inputs = name, classes, loss, inputs
    self.lower, self.tree_mode = lower, tree_mode
    self.params_of, self.raw_forward, self.small_classes = params_of, raw_forward, small_classes
    self.model = classes(nnx)(rngs=nnx.Rngs(0))
    self.params = params_of(self.model)


def count_eqns(jaxpr) -> int:
  """Equations in a jaxpr, those of the jaxprs nested in its equations' parameters included."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          n += count_eqns(sub)
  return n


class Sample(tp.NamedTuple):
  trace: float      # CPU seconds of step.trace(*args)
  lower: float      # CPU seconds of .lower() (0 when not lowered)
  eqns: int         # equations of the traced jaxpr, nested ones included
  gc_seconds: float  # of those seconds, spent in the garbage collector
  full_gcs: int     # full (generation 2) collections during trace + lower
  trace_no_gc: float  # CPU seconds of the same trace with the collector off


class _GCClock:
  """Time and count the collector's runs (``gc.callbacks``) while installed."""

  def __init__(self):
    self.seconds, self.full, self._start = 0.0, 0, 0.0

  def __call__(self, phase, info):
    if phase == 'start':
      self._start = time.process_time()
      self.full += info['generation'] == 2
    else:
      self.seconds += time.process_time() - self._start

  def __enter__(self):
    gc.callbacks.append(self)
    return self

  def __exit__(self, *exc):
    gc.callbacks.remove(self)


def trace_and_lower(fresh, lower: bool = True, no_gc: bool = True) -> Sample:
  """Trace (and lower) a fresh step with the collector on, then trace another with it off."""
  step, args = fresh()
  gc.collect()  # every sample starts with no garbage pending; the collector stays on
  with _GCClock() as clock:
    start = time.process_time()
    traced = step.trace(*args)
    mid = time.process_time()
    if lower:
      traced.lower()
    end = time.process_time()
  eqns = count_eqns(getattr(traced, 'traced', traced).jaxpr)
  del step, args, traced
  no_gc_time = float('nan')
  if no_gc:
    step, args = fresh()
    gc.collect()
    with C.gc_paused():
      t0 = time.process_time()
      step.trace(*args)
      no_gc_time = time.process_time() - t0
  return Sample(mid - start, end - mid, eqns, clock.seconds, clock.full, no_gc_time)


def variant_runners(case: Case, model, params, fnnx, fmodel):
  """name -> zero-argument function that makes a fresh step and objects and returns (step, args)."""
  make_raw, tx = raw_step_factory(case.raw_forward, case.loss)
  opt_state = tx.init(params)
  x, y = case.inputs
  runners = {RAW: lambda: (make_raw(), (params, opt_state, x, y))}

  def nnx_runner(lib, base, **kw):
    make = nnx_step_factory(lib, case.loss, **kw)

    def fresh():
      m = lib.clone(base)
      return make(), (m, lib.Optimizer(m, optax.adam(1e-3), wrt=lib.Param), x, y)
    return fresh

  runners['arbax (graph mode: NNX default)'] = nnx_runner(nnx, model)
  if case.tree_mode:
    runners['arbax (tree mode)'] = nnx_runner(nnx, model, graph=False)
  if fnnx is not None:
    runners[FLAX] = nnx_runner(fnnx, fmodel)
  return runners


def measure(case: Case, fnnx, repeats: int) -> dict[str, list[Sample]]:
  """variant -> one Sample per repeat."""
  small = case.small_classes(nnx)(rngs=nnx.Rngs(0))
  small_f = None
  if fnnx is not None:
    small_f = case.small_classes(fnnx)(rngs=fnnx.Rngs(0))
  warm = variant_runners(case, small, case.params_of(small), fnnx, small_f)
  for fresh in warm.values():  # JAX's per-shape caches, alike for all variants
    trace_and_lower(fresh, case.lower, no_gc=False)
  fmodel = None
  if fnnx is not None:
    fmodel = case.classes(fnnx)(rngs=fnnx.Rngs(0))
    M.copy_variables(nnx, case.model, fnnx, fmodel)
  runners = variant_runners(case, case.model, case.params, fnnx, fmodel)
  samples = {name: [] for name in runners}
  for _ in range(repeats):
    for name, fresh in runners.items():
      samples[name].append(trace_and_lower(fresh, case.lower, no_gc=case.lower))
  return samples


def cases(only):
  tokens, targets = M.tokens_and_targets()
  transformer = Case('transformer, 12 blocks (195 Variables)', M.transformer_classes,
                     M.transformer_params, M.raw_transformer, xent, (tokens, targets),
                     M.transformer_classes)
  x = jnp.ones((M.BATCH, M.WIDE_WIDTH))
  y = jnp.zeros((M.BATCH, M.WIDE_WIDTH))
  wide = Case(f'{M.WIDE_LAYERS} Linear layers ({2 * M.WIDE_LAYERS} Variables)', M.wide_classes,
              M.wide_params, M.raw_wide, mse, (x, y),
              lambda lib: M.wide_classes(lib, n_layers=50), lower=False, tree_mode=False)
  out = []
  if only in (None, 'transformer'):
    out.append(('transformer', transformer))
  if only in (None, 'wide'):
    out.append(('wide', wide))
  return out


def main(argv=None) -> int:
  args = C.parse_args(__doc__, lambda p: p.add_argument('--only', choices=['transformer', 'wide']),
                      argv=argv)
  fnnx = C.optional('flax.nnx')
  C.header('Tracing a train step (trace + lower, no compile)')
  summary = C.Summary('trace_step')
  rows = []
  for key, case in cases(args.only):
    repeats = {'transformer': 3 if args.quick else 5, 'wide': 1 if args.quick else 2}[key]
    samples = measure(case, fnnx, repeats)
    med = {name: {field: C.median([getattr(x, field) for x in s]) for field in Sample._fields}
           for name, s in samples.items()}
    both = {name: C.median([x.trace + x.lower for x in s]) for name, s in samples.items()}
    trace = {name: m['trace'] for name, m in med.items()}
    for name, m in med.items():
      goal = GOAL if name.startswith('arbax (graph') else None
      lowered = ((C.fmt_time(m['lower']), C.fmt_time(both[name]),
                  C.ratio_text(both[name] / both[RAW]),
                  C.fmt_time(m['trace_no_gc']),
                  C.ratio_text(m['trace_no_gc'] / med[RAW]['trace_no_gc']))
                 if case.lower else ('—',) * 5)
      rows.append((case.name, name, C.fmt_time(m['trace']),
                   C.ratio_text(m['trace'] / trace[RAW], goal), samples[name][-1].eqns,
                   f"{C.fmt_time(m['gc_seconds'])} ({m['full_gcs']:g} full)", *lowered))
    ours = 'arbax (graph mode: NNX default)'
    note = f'{repeats} repeat(s)'
    if case.lower:
      note = (f'trace + lower: {both[ours] / both[RAW]:.2f}x; trace with GC off: '
              f"{med[ours]['trace_no_gc'] / med[RAW]['trace_no_gc']:.2f}x; " + note)
    summary.add(f'tracing a train step, {case.name}', trace[ours], RAW, trace[RAW], goal=GOAL,
                note=note, columns={'arbax': trace[ours], 'Flax NNX': trace.get(FLAX),
                                    'raw JAX': trace[RAW]})
    print(f'({case.name}: {repeats} repeat(s), {C.load_text()})')
    if args.profile:
      make = nnx_step_factory(nnx, case.loss)
      x, y = case.inputs

      def once(case=case, make=make, x=x, y=y):
        m = nnx.clone(case.model)
        return make().trace(m, nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param), x, y).lower()
      C.profile(f'arbax trace + lower, {case.name}', once, number=1)
  C.table(['model', 'variant', 'trace', 'ratio to raw', 'jaxpr eqns', 'GC in trace + lower',
           'lower', 'trace + lower', 'ratio to raw', 'trace, GC off', 'ratio to raw'], rows)
  summary.write(args.summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
