"""Global switches that can also be used as context managers and decorators.

``nnx.set_graph_mode(False)`` changes the default for the rest of the program;
``with nnx.set_graph_mode(False): ...`` changes it for a block, and
``@nnx.set_graph_mode(False)`` for every call of the decorated function.
The defaults are NNX's: graph mode with graph updates.
"""
from __future__ import annotations

import contextlib
import functools
import threading


class _Settings(threading.local):
  def __init__(self):
    self.graph_mode = True
    self.graph_updates = True
    self.var_defaults = {'hijax': False, 'ref': False}
    self.eager_sharding = True  # nnx.use_eager_sharding (variables.py)


SETTINGS = _Settings()


class ScopedSetting(contextlib.AbstractContextManager):
  """Sets a setting now; restores the previous value when used as a ``with`` block and exited.

  Used as a decorator, it leaves the setting as it was and applies the value
  only while the decorated function runs.
  """

  _field: str = ''

  def __init__(self, value):
    self._previous = getattr(SETTINGS, self._field)
    self._value = self._convert(value)
    setattr(SETTINGS, self._field, self._value)

  def _convert(self, value):
    return bool(value)

  @classmethod
  def current_value(cls):
    return getattr(SETTINGS, cls._field)

  def __exit__(self, *exc):
    setattr(SETTINGS, self._field, self._previous)
    return False

  def __call__(self, fun):
    setattr(SETTINGS, self._field, self._previous)
    field, value = self._field, self._value

    @functools.wraps(fun)
    def with_setting(*args, **kwargs):
      previous = getattr(SETTINGS, field)
      setattr(SETTINGS, field, value)
      try:
        return fun(*args, **kwargs)
      finally:
        setattr(SETTINGS, field, previous)
    return with_setting


class set_graph_mode(ScopedSetting):
  """Default for ``graph=`` in split/merge/state and the transforms.

  True shares references; False (tree mode) refuses aliases.
  """
  _field = 'graph_mode'


class set_graph_updates(ScopedSetting):
  """Default for ``graph_updates=`` of the transforms (structural updates in graph mode)."""
  _field = 'graph_updates'


def graph_mode(graph: bool | None) -> bool:
  return SETTINGS.graph_mode if graph is None else bool(graph)


def graph_updates(flag: bool | None) -> bool:
  return SETTINGS.graph_updates if flag is None else bool(flag)


# -- structure epoch ----------------------------------------------------------
# Transforms cache how they flattened an argument, keyed by the argument's
# identity. Any structural change to an object they have seen (an attribute
# set or deleted, a container mutated, Variable metadata changed) bumps this
# counter, which invalidates every such cache at once. Objects that were never
# seen by a transform (e.g. under construction) do not bump it. The rules (and
# what the epoch cannot see: writes behind ``__setattr__``, plain containers
# changed in place, the ARBAX_CHECK_CACHE=1 check mode) live in ``_structure``.
EPOCH = [0]


def bump_epoch():
  EPOCH[0] += 1
