"""Process-wide unique ids (``nnx.ids``): a counter, never reused, unlike ``id()``.

    >>> from arbax import ids
    >>> a, b = ids.uuid(), ids.uuid()
    >>> a == b, b.id - a.id
    (False, 1)

A copy of an id (``copy.copy`` / ``copy.deepcopy``) is a fresh id, so copied
objects never claim to be the original.
"""
from __future__ import annotations

import itertools
import threading

__all__ = ['UUID', 'UUIDManager', 'uuid']


class UUID:
  """A hashable id; equal only to an UUID with the same number."""

  __slots__ = ('id',)

  def __init__(self, rawid: int):
    self.id = rawid

  def __eq__(self, other):
    return isinstance(other, UUID) and other.id == self.id

  def __hash__(self):
    return hash(self.id)

  def __repr__(self):
    return f'UUID({self.id})'

  def __copy__(self):
    return uuid()

  def __deepcopy__(self, memo):
    return uuid()


class UUIDManager:
  """Calling it returns the next ``UUID`` (thread-safe)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counter = itertools.count(1)

  def __call__(self) -> UUID:
    with self._lock:
      return UUID(next(self._counter))


uuid = UUIDManager()
