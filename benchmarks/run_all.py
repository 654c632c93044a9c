"""Run every benchmark script and print one combined table of the goal rows at the end (``make bench``).

    .venv/bin/python benchmarks/run_all.py                 # all scripts
    .venv/bin/python benchmarks/run_all.py --quick         # fewer repetitions everywhere
    .venv/bin/python benchmarks/run_all.py --only scan_eager clone
    .venv/bin/python benchmarks/run_all.py --out table.md  # also write the combined table

Each script runs in its own process (so one's caches and heap do not colour
another's numbers) with ``--summary``, which writes its goal rows as JSON;
their own tables are printed as they finish. The combined table lists, per
row, arbax's number, the reference's, their ratio and the goal (the largest
acceptable ratio); before it, the rows that measure several libraries are
printed side by side, one column each for arbax, Flax NNX, Equinox and raw
JAX (issue 18's table; ``—`` where a library has no such row, ``n/a`` where
it is not installed). Rows for Flax NNX and Equinox appear when the ``bench``
extra is installed (``pip install -e '.[bench]'``); goals measured against
them read ``n/a`` without it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from _common import COLUMNS

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = ['overhead', 'state_api', 'pytree_flatten', 'eager_forward', 'scan_eager', 'clone',
           'state_heap', 'hijax_jit', 'construction', 'trace_step', 'containers']


def fmt_value(value, unit: str) -> str:
  if value is None:
    return 'n/a'
  if unit == 'B':
    return f'{value / 2 ** 20:.2f} MiB'
  if unit == 'count':
    return f'{value:g}'
  if value >= 1:
    return f'{value:.2f} s'
  if value >= 1e-3:
    return f'{value * 1e3:.1f} ms'
  return f'{value * 1e6:.1f} µs'


def combined_table(rows: list[dict]) -> str:
  lines = ['| what | arbax | reference | reference value | ratio | goal | met | note |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    ratio = f"{r['ratio']:.2f}×" if r['ratio'] is not None else 'n/a'
    goal = f"≤{r['goal']:g}×" if r['goal'] is not None else '—'
    met = {True: 'yes', False: '**no**', None: '—'}[r['met']]
    lines.append(f"| {r['row']} | {fmt_value(r['value'], r['unit'])} | {r['reference']} | "
                 f"{fmt_value(r['ref_value'], r['unit'])} | {ratio} | {goal} | {met} | "
                 f"{r['note']} |")
  return '\n'.join(lines)


def side_by_side(rows: list[dict]) -> str:
  """The rows that measure each library, one column per library (issue 18's table)."""
  lines = ['| what | ' + ' | '.join(COLUMNS) + ' | goal | met |',
           '|---|' + '---|' * (len(COLUMNS) + 2)]
  for r in rows:
    columns = r.get('columns') or {}
    if not columns:
      continue
    cells = [fmt_value(columns[lib], r['unit']) if lib in columns else '—' for lib in COLUMNS]
    goal = (f"≤{r['goal']:g}× {r['reference']}" if r['goal'] is not None else '—')
    met = {True: 'yes', False: '**no**', None: '—'}[r['met']]
    lines.append(f"| {r['row']} | " + ' | '.join(cells) + f' | {goal} | {met} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='pass --quick to every script')
  parser.add_argument('--only', nargs='*', choices=SCRIPTS, help='run these scripts only')
  parser.add_argument('--out', metavar='FILE', help='also write the combined table to FILE')
  args = parser.parse_args(argv)
  scripts = args.only or SCRIPTS
  rows, failed, loads = [], [], []
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for name in scripts:
      out = os.path.join(tmp, f'{name}.json')
      cmd = [sys.executable, str(HERE / f'{name}.py'), '--summary', out]
      if args.quick:
        cmd.append('--quick')
      t0 = time.perf_counter()
      code = subprocess.call(cmd)
      took = time.perf_counter() - t0
      if code != 0 or not os.path.exists(out):
        failed.append(name)
        print(f'!! {name}.py failed (exit {code})')
        continue
      with open(out) as f:
        result = json.load(f)
      rows.extend(result['rows'])
      loads.append(f"{name}: {took:.0f} s, {result['load_start']} -> {result['load_end']}")
  table = combined_table(rows)
  libraries = side_by_side(rows)
  print(f'\n## Side by side: arbax, Flax NNX, Equinox, raw JAX\n\n{libraries}\n')
  print(f'\n## Combined: arbax against each goal\n\n{table}\n')
  print(f'total {time.perf_counter() - start:.0f} s; per script: ' + '; '.join(loads))
  if failed:
    print(f'failed: {", ".join(failed)}')
  if args.out:
    pathlib.Path(args.out).write_text(f'{libraries}\n\n{table}\n')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
