"""Every module-level cache of arbax, in one place: bounded, and emptied by ``clear_caches()``.

    >>> from arbax import caches
    >>> squares = caches.bounded('example squares', maxsize=2)
    >>> for n in range(3):
    ...   squares[n] = n * n
    >>> sorted(squares)                   # the oldest entry made room
    [1, 2]
    >>> caches.clear_caches(); len(squares)
    0

A cache that lives as long as the process must not grow without bound (a loop
building models of ever new shapes would otherwise hold them all) and must be
clearable (tests, notebooks, freeing memory): module code makes its caches with
``bounded(name, maxsize)`` so both hold. Caches kept on an object (a GraphDef's
compiled builders) live and die with it and are not registered here.
"""
from __future__ import annotations

import collections
import typing as tp

__all__ = ['BoundedCache', 'bounded', 'register', 'clear_caches', 'registered']


class BoundedCache(collections.OrderedDict):
  """A dict that keeps at most ``maxsize`` entries, dropping the least recently inserted one.

  Lookups are plain dict lookups (no reordering), so a hit costs what a dict hit costs.
  """

  def __init__(self, name: str, maxsize: int):
    super().__init__()
    self.name = name
    self.maxsize = maxsize

  def __setitem__(self, key, value):
    if key not in self and len(self) >= self.maxsize:
      self.popitem(last=False)
    super().__setitem__(key, value)

  def __repr__(self):
    return f'BoundedCache({self.name!r}, {len(self)}/{self.maxsize} entries)'


_REGISTRY: list = []


def bounded(name: str, maxsize: int) -> BoundedCache:
  """A new module-level cache of at most ``maxsize`` entries, registered for ``clear_caches``."""
  return register(BoundedCache(name, maxsize))


_C = tp.TypeVar('_C')


def register(cache: _C) -> _C:
  """Register a cache bounded some other way (a ``WeakKeyDictionary`` lives only as long as its
  keys, ``functools.lru_cache`` has its ``maxsize``): anything with ``clear()`` or
  ``cache_clear()``. Returns it, so it can wrap the definition."""
  _REGISTRY.append(cache)
  return cache


def registered() -> tp.Sequence:
  """The module-level caches that exist, for inspection (``[repr(c) for c in registered()]``)."""
  return tuple(_REGISTRY)


def clear_caches() -> None:
  """Empty every module-level cache of arbax (JAX's own caches: ``jax.clear_caches()``)."""
  for cache in _REGISTRY:
    clear = getattr(cache, 'cache_clear', None) or cache.clear
    clear()
