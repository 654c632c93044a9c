"""Shared test configuration: fixed settings so every test starts from NNX's defaults."""
import pytest

import arbax as nnx
from arbax import _settings


@pytest.fixture(autouse=True)
def _default_settings():
  saved = (_settings.SETTINGS.graph_mode, _settings.SETTINGS.graph_updates,
           dict(_settings.SETTINGS.var_defaults))
  yield
  (_settings.SETTINGS.graph_mode, _settings.SETTINGS.graph_updates) = saved[:2]
  _settings.SETTINGS.var_defaults = saved[2]
