"""Global switches that can also be used as context managers.

``nnx.graphlib.set_graph_mode(True)`` changes the default for the rest of the
program; ``with nnx.graphlib.set_graph_mode(True): ...`` changes it for a block.
"""
from __future__ import annotations

import contextlib
import threading


class _Settings(threading.local):
  def __init__(self):
    self.graph_mode = False
    self.graph_updates = False
    self.var_defaults = {'hijax': False, 'ref': False}


SETTINGS = _Settings()


class ScopedSetting(contextlib.AbstractContextManager):
  """Sets a setting now; restores the previous value when used as a ``with`` block and exited."""

  _field: str = ''

  def __init__(self, value):
    self._previous = getattr(SETTINGS, self._field)
    setattr(SETTINGS, self._field, self._convert(value))

  def _convert(self, value):
    return bool(value)

  def __exit__(self, *exc):
    setattr(SETTINGS, self._field, self._previous)
    return False


class set_graph_mode(ScopedSetting):
  """Default for ``graph=`` in split/merge/state and the transforms: True shares references, False (tree mode) refuses aliases."""
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
# seen by a transform (e.g. under construction) do not bump it.
EPOCH = [0]


def bump_epoch():
  EPOCH[0] += 1
