"""Cost of ``nnx.List`` operations on long lists, next to a Python list of the same items.

    .venv/bin/python benchmarks/containers.py            # default repetitions
    .venv/bin/python benchmarks/containers.py --quick    # fewer repetitions

Each row times one operation on a list of N ``nnx.Param`` (N = 10k by default)
and prints the median time per operation and its ratio to the same operation
on a plain Python list. Length, indexing, ``append`` + ``pop()`` at the end
are O(1) in both; iteration and ``nnx.state`` are O(N).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import _common as C
import arbax as nnx


def operations(n: int):
  """``(name, nnx.List op, list op, repetitions per timing)``."""
  items = [nnx.Param(jnp.zeros(())) for _ in range(n)]
  lst, plain = nnx.List(items), list(items)
  middle = n // 2

  def append_pop(xs):
    xs.append(1)
    xs.pop()

  return [
      ('len', lambda: len(lst), lambda: len(plain), 1000),
      ('index [n/2]', lambda: lst[middle], lambda: plain[middle], 1000),
      ('index [-1]', lambda: lst[-1], lambda: plain[-1], 1000),
      ('append + pop()', lambda: append_pop(lst), lambda: append_pop(plain), 1000),
      ('iterate', lambda: sum(1 for _ in lst), lambda: sum(1 for _ in plain), 3),
      ('nnx.state (cached)', lambda: nnx.state(lst), None, 3),
  ]


def measure(fn, reps: int, rounds: int) -> float:
  fn()  # warm up (and fill caches)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(reps):
      fn()
    times.append((time.perf_counter() - start) / reps)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--sizes', type=int, nargs='*', default=[10_000])
  parser.add_argument('--summary', metavar='FILE', help='write the summary rows as JSON to FILE')
  args = parser.parse_args(argv)
  summary = C.Summary('containers')
  rounds = 3 if args.quick else 9
  print(f'# jax {jax.__version__}, {platform.processor() or platform.machine()}, '
        f'{time.strftime("%Y-%m-%d")}')
  print('| operation | items | nnx.List us/op | list us/op | ratio |')
  print('|---|---|---|---|---|')
  for n in args.sizes:
    for name, ours, theirs, reps in operations(n):
      t = measure(ours, reps, rounds)
      if theirs is None:
        print(f'| {name} | {n} | {t * 1e6:.2f} | - | - |')
        continue
      base = measure(theirs, reps, rounds)
      print(f'| {name} | {n} | {t * 1e6:.2f} | {base * 1e6:.2f} | {t / base:.1f}x |')
      if name == 'index [n/2]':
        # O(1) indexing: a lookup costs a small constant over a list's, whatever N is.
        summary.add(f'nnx.List indexing, {n:,} items', t, 'Python list', base, goal=None,
                    note='per lookup; Flax ~1 µs')
  summary.write(args.summary)


if __name__ == '__main__':
  main()
