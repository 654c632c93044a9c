"""Shared test configuration: fast XLA compiles, and NNX's default settings for every test."""
import os

# The suite's cost is XLA compilation of many tiny programs; the cheap pipeline halves it and
# does not change results beyond float rounding the tests' tolerances allow.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('ARBAX_CHECK_CACHE', '1')  # every cache reuse re-walks and compares

import pytest  # noqa: E402

import arbax as nnx  # noqa: E402,F401
from arbax import _settings  # noqa: E402


@pytest.fixture(autouse=True)
def _default_settings():
  saved = (_settings.SETTINGS.graph_mode, _settings.SETTINGS.graph_updates,
           dict(_settings.SETTINGS.var_defaults))
  yield
  (_settings.SETTINGS.graph_mode, _settings.SETTINGS.graph_updates) = saved[:2]
  _settings.SETTINGS.var_defaults = saved[2]


@pytest.fixture
def compilations(caplog):
  """A context manager collecting what JAX compiles inside it: ``with compilations() as got``."""
  import contextlib

  import jax

  @contextlib.contextmanager
  def collect():
    got: list[str] = []
    with jax.log_compiles(True), caplog.at_level('WARNING'):
      start = len(caplog.records)
      yield got
      got.extend(r.getMessage() for r in caplog.records[start:] if 'Compiling' in r.getMessage())
  return collect
