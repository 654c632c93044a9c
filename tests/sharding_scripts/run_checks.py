"""Run ``mesh_checks.py`` once per test session in a fresh process (8 simulated CPU devices).

One process for every group: JAX's start-up and the first compilations are paid once.
"""
import functools
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mesh_checks.py')


@functools.lru_cache(maxsize=None)
def _run_all(timeout: float = 240.0) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, SCRIPT, 'all'], capture_output=True, text=True,
                        timeout=timeout, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f'{SCRIPT} exited with {proc.returncode}:\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_group(group: str) -> dict:
  """The results of the checks registered under ``group``: name -> "ok" or a traceback."""
  return _run_all()[group]
