"""A data-parallel ``nnx.jit`` training loop on 8 simulated CPU devices, run without waiting
for results (sharding_scripts/data_parallel_loop.py, in a process of its own).

Such a loop used to deadlock XLA's CPU client within a few hundred steps, once ~40 steps
were queued (arbax/transforms/inflight.py). Each run sets XLA's rendezvous timeout, so a
deadlock aborts the process within a minute instead of hanging the suite.
"""
import json
import os
import subprocess
import sys

import pytest

from arbax.transforms.inflight import EVERY

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sharding_scripts',
                      'data_parallel_loop.py')


def run_loop(*flags: str, timeout: float = 600.0) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True,
                        timeout=timeout, env=env)
  if proc.returncode != 0:
    stuck = 'rendezvous' in proc.stderr or proc.returncode in (-6, 134)
    raise AssertionError(
        f'{SCRIPT} {" ".join(flags)} exited with {proc.returncode}'
        f'{" (an XLA:CPU collective deadlocked)" if stuck else ""}:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def check_trained(result: dict, steps: int) -> None:
  assert result['step_count'] == steps
  assert result['last_loss'] < result['first_loss'] / 10
  assert result['kernel_replicated']  # the updates kept the model's replicated sharding


def test_short_loop_trains_and_keeps_few_steps_queued():
  results = run_loop('--steps', '400', '--modes', 'plain,donate')
  check_trained(results['plain'], 400)
  # nnx.jit waits every EVERY calls for the call EVERY before: at most 2 * EVERY queued.
  # Unbounded, this loop queues 30+ steps and usually deadlocks before step 400.
  assert 0 < results['plain']['max_pending'] <= 2 * EVERY
  # Donated state and no output: the wait falls back to the newest output.
  check_trained(results['donate'], 400)


@pytest.mark.slow
def test_thousands_of_steps_never_deadlock():
  results = run_loop('--steps', '5000', '--modes', 'plain,donate')
  for mode in ('plain', 'donate'):
    check_trained(results[mode], 5000)
  assert results['plain']['max_pending'] <= 2 * EVERY


@pytest.mark.slow
def test_heavier_steps_never_deadlock():
  # Wider model and batch: each step computes longer, so Python runs further ahead.
  result = run_loop('--steps', '3000', '--hidden', '256', '--batch', '512')['plain']
  check_trained(result, 3000)
  assert result['max_pending'] <= 2 * EVERY
