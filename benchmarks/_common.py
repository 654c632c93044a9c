"""Helpers shared by the benchmark scripts: arguments, interleaved timing, tables, summaries.

Every script measures its variants interleaved in one process (round 1 of A,
B, C, then round 2 of A, B, C, ...) so that load from other processes on a
shared machine hits every variant alike, and reports medians. A script run
with ``--summary FILE`` also writes its goal rows as JSON for ``run_all.py``:

    >>> s = Summary('demo')
    >>> s.add('eager forward, MLP', 2.0e-3, 'raw JAX', 1.0e-3, goal=1.3, unit='s')
    >>> s.rows[0]['ratio'], s.rows[0]['met']
    (2.0, False)
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import json
import io
import os
import platform
import pstats
import statistics
import time
import typing as tp

import jax

__all__ = ['parse_args', 'header', 'load_text', 'optional', 'interleave', 'median', 'table',
           'fmt_time', 'ratio_text', 'Summary', 'COLUMNS', 'CompileCounter', 'gc_paused', 'profile']


def parse_args(doc: str, add: tp.Callable[[argparse.ArgumentParser], None] | None = None,
               argv=None) -> argparse.Namespace:
  """The common flags: ``--quick`` (fewer repetitions) and ``--summary FILE`` (JSON goal rows)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer repetitions')
  parser.add_argument('--summary', metavar='FILE', help='write the goal rows as JSON to FILE')
  parser.add_argument('--profile', action='store_true',
                      help="after measuring, print a cProfile of arbax's variants")
  if add is not None:
    add(parser)
  return parser.parse_args(argv)


def load_text() -> str:
  """The 1/5/15-minute load averages next to the number of cores, e.g. ``load 7.1/9.8/10.2 on 2 cores``."""
  one, five, fifteen = os.getloadavg()
  return f'load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores'


def header(title: str) -> None:
  """Print the title line with what the numbers depend on: versions, device, machine load."""
  print(f'\n## {title}\n')
  print(f'python {platform.python_version()}, jax {jax.__version__}, '
        f'{jax.devices()[0].platform}, {platform.machine()}, {load_text()}, '
        f'{time.strftime("%Y-%m-%d %H:%M")}\n')


def optional(module: str):
  """The module when it is importable (the ``bench`` extra: flax, equinox), else ``None``."""
  try:
    return importlib.import_module(module)
  except ImportError:
    print(f'({module} not installed: its rows are skipped; `pip install -e .[bench]` adds them)')
    return None


@contextlib.contextmanager
def gc_paused():
  """Pause the garbage collector, as ``timeit`` does, so one variant is not billed for another's garbage."""
  was_enabled = gc.isenabled()
  gc.collect()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


def interleave(fns: dict[str, tp.Callable[[], tp.Any]], *, rounds: int,
               number: int | dict[str, int] = 1, block: bool = True,
               warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each function, one sample per round, the functions interleaved.

  Args:
    fns: name -> zero-argument callable.
    rounds: samples per function.
    number: calls per sample (the sample is their mean); a dict gives each function its own (default 1).
    block: wait for the result's arrays (``jax.block_until_ready``) before stopping the clock.
    warmup: calls of each function before the first round (compilation, caches).

  Returns:
    name -> list of ``rounds`` per-call times in seconds.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      n = number.get(name, 1) if isinstance(number, dict) else number
      with gc_paused():
        start = time.perf_counter()
        for _ in range(n):
          out = fn()
        if block:
          jax.block_until_ready(out)
        samples[name].append((time.perf_counter() - start) / n)
      del out
  return samples


def median(xs: tp.Sequence[float]) -> float:
  return statistics.median(xs)


def fmt_time(seconds: float) -> str:
  """A duration in the unit that reads best: ``1.23 s``, ``45.6 ms`` or ``789 µs``."""
  if seconds >= 1:
    return f'{seconds:.2f} s'
  if seconds >= 1e-3:
    return f'{seconds * 1e3:.1f} ms' if seconds < 0.1 else f'{seconds * 1e3:.0f} ms'
  return f'{seconds * 1e6:.1f} µs' if seconds < 1e-4 else f'{seconds * 1e6:.0f} µs'


def table(headers: tp.Sequence[str], rows: tp.Iterable[tp.Sequence[tp.Any]]) -> None:
  """Print a markdown table."""
  print('| ' + ' | '.join(headers) + ' |')
  print('|' + '---|' * len(headers))
  for row in rows:
    print('| ' + ' | '.join(str(c) for c in row) + ' |')
  print()


#: The libraries of the side-by-side table, in order.
COLUMNS = ('arbax', 'Flax NNX', 'Equinox', 'raw JAX')


class Summary:
  """The goal rows of one script: arbax's number, the reference's, their ratio and the goal."""

  def __init__(self, script: str):
    self.script = script
    self.rows: list[dict] = []
    self.load_start = load_text()

  def add(self, row: str, value: float | None, reference: str, ref_value: float | None, *,
          goal: float | None, unit: str = 's', note: str = '',
          columns: dict[str, float | None] | None = None) -> None:
    """Record one goal row; ``goal`` is the largest acceptable ratio (``None``: no goal, just measured).

    ``columns`` gives the same measurement for each library, by column name
    (``COLUMNS``: arbax, Flax NNX, Equinox, raw JAX); ``run_all.py`` prints them
    side by side, ``—`` where a library has no such row or is not installed.
    """
    ratio = value / ref_value if value is not None and ref_value else None
    met = None if goal is None or ratio is None else ratio <= goal
    unknown = set(columns or ()) - set(COLUMNS)
    assert not unknown, f'columns {sorted(unknown)}: expected some of {COLUMNS}'
    self.rows.append(dict(script=self.script, row=row, value=value, reference=reference,
                          ref_value=ref_value, ratio=ratio, goal=goal, met=met, unit=unit,
                          note=note, columns=dict(columns or {})))

  def write(self, path: str | None) -> None:
    if path is None:
      return
    with open(path, 'w') as f:
      json.dump(dict(script=self.script, load_start=self.load_start, load_end=load_text(),
                     rows=self.rows), f, indent=1)


class CompileCounter:
  """Counts XLA backend compilations (and their seconds) via ``jax.monitoring``.

      counter = CompileCounter()
      with counter.window() as w:
        f(x)
      w.count, w.seconds   # compilations inside the block, and their total time
  """

  _EVENT = '/jax/core/compile/backend_compile_duration'
  _events: list[float] = []
  _registered = False

  def __init__(self):
    if not CompileCounter._registered:
      jax.monitoring.register_event_duration_secs_listener(CompileCounter._listen)
      CompileCounter._registered = True

  @staticmethod
  def _listen(event: str, duration: float, **_) -> None:
    if event == CompileCounter._EVENT:
      CompileCounter._events.append(duration)

  class _Window:
    count = 0
    seconds = 0.0

  @contextlib.contextmanager
  def window(self):
    w = CompileCounter._Window()
    start = len(CompileCounter._events)
    try:
      yield w
    finally:
      new = CompileCounter._events[start:]
      w.count, w.seconds = len(new), sum(new)


def ratio_text(ratio: float | None, goal: float | None = None) -> str:
  """``1.23×`` with a mark against the goal: ``1.23× ✗ (goal ≤1.15×)``."""
  if ratio is None:
    return 'n/a'
  text = f'{ratio:.2f}×'
  if goal is not None:
    text += f' {"✓" if ratio <= goal else "✗"} (goal ≤{goal:g}×)'
  return text



def profile(name: str, fn: tp.Callable[[], tp.Any], *, number: int = 1, top: int = 25) -> None:
  """Print where ``fn``'s time goes: cProfile over ``number`` calls, the ``top`` functions by own time.

  Both orderings are printed: by own time (``tottime``: the hot spots) and by
  cumulative time (which caller owns them).
  """
  jax.block_until_ready(fn())  # compile and warm caches outside the profile
  prof = cProfile.Profile()
  prof.enable()
  for _ in range(number):
    jax.block_until_ready(fn())
  prof.disable()
  for order in ('tottime', 'cumulative'):
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats(order).print_stats(top)
    body = out.getvalue()
    print(f'\n### profile of {name}, {number} call(s), by {order}\n')
    print(body[body.find('   ncalls'):].rstrip() + '\n')
