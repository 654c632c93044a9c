"""Structural-change bookkeeping: when may a cached flattening be reused?

Transforms and the State API cache how they flattened an object (its GraphDef,
its leaves, where each leaf lives) and reuse it while the object's structure is
unchanged. Everything that decides "unchanged" lives here, in three parts:

1. **The epoch** (``_settings.EPOCH``). Every public way to change a Pytree's
   structure (``setattr``/``delattr``, nnx.List / nnx.Dict edits, a class
   change, a container that starts holding data) ends in ``changed(obj)``: the
   object's own parts are recomputed, and if a cache may depend on the object
   (it was flattened with ``mark_seen``) the epoch is bumped, which
   invalidates every cache at once. Variable metadata changes bump it too.

2. **The watch** (``Watch``): for what the epoch cannot see. Writes that bypass
   ``Pytree.__setattr__`` (``object.__setattr__(m, 'scale', 3.0)``,
   ``m.__dict__['scale'] = 3.0``, ``vars(m).update(...)``) and containers arbax
   does not own (plain lists and dicts held as data, States, OrderedDicts,
   mutable registered dataclasses, static lists filled in place) change without
   telling anyone. A cached flattening keeps shallow copies of every mutable
   container it was made from; ``Watch.unchanged()`` compares them all in one
   C-level list comparison (about 1 us per call for a 4-layer MLP with its Adam
   state, 6-9 us for 32 layers: under 1% of an nnx.jit training step):

       >>> w = Watch([d := {'a': 1}])
       >>> w.unchanged(), d.update(a=2), w.unchanged()
       (True, None, False)

   Values compare by identity first and by ``==`` only when they differ, so
   one replacement goes unseen: a Variable (or array) swapped, through a bypass
   write, for another one whose value compares equal as a truth value (both
   scalars with the same value). Check mode (below) catches it. Replacing an
   object's whole ``__dict__`` is not seen either: code that does it must
   ``bump()``. The copies hold the objects below the roots, so a cache drops
   its watch when a root dies; a flattening whose copies hold the roots
   themselves (a reference cycle) is not kept at all (``Watch.keeps_alive``).

3. **Check mode**: ``ARBAX_CHECK_CACHE=1`` in the environment (read once, at
   import) or ``check_cache(True)`` (also a ``with`` block) makes every reuse
   of a cached flattening or call plan flatten the objects again and raise
   ``StaleCacheError`` if the result differs, naming what differs. The test
   suite runs with it on; it costs a full walk per call.
"""
from __future__ import annotations

import contextlib
import os
import typing as tp

import jax

from arbax import _settings

__all__ = ['EPOCH', 'bump', 'changed', 'mark_seen', 'snapshot', 'is_mutable', 'Watch',
           'check_cache', 'checking', 'StaleCacheError', 'verify']

EPOCH = _settings.EPOCH  # the same list: code that reads _settings.EPOCH sees every bump
bump = _settings.bump_epoch

_SEEN = '_arbax_seen'  # the slot Pytree declares for "a cache may depend on this object"


# -- 1. the epoch -------------------------------------------------------------


def changed(obj) -> None:
  """Record that the structure of the Pytree ``obj`` changed (the one place that does).

  Its cached parts are dropped (recomputed at the next flatten) and, if a
  cache may depend on it, every cache is invalidated.
  """
  obj.__dict__['_arbax_cache'] = None
  if getattr(obj, _SEEN, False):
    bump()


def mark_seen(obj) -> None:
  """Flag ``obj`` as flattened by a cache: its later structural changes bump the epoch."""
  object.__setattr__(obj, _SEEN, True)


# -- 2. the watch -------------------------------------------------------------


def snapshot(value):
  """A copy of ``value``'s builtin containers (lists, dicts, sets, and tuples holding them),
  all the way down; anything else is kept as is. ``value == snapshot(value)`` until one of
  those containers is changed in place.

      >>> xs = [1, [2]]; s = snapshot(xs); xs[1].append(3); xs == s
      False
  """
  t = type(value)
  if t is list:
    return [snapshot(v) for v in value]
  if t is dict:
    return {k: snapshot(v) for k, v in value.items()}
  if t is set:
    return set(value)
  if t is tuple:
    parts = tuple(snapshot(v) for v in value)
    return value if all(a is b for a, b in zip(parts, value)) else parts
  return value


def is_mutable(value) -> bool:
  """Whether ``value`` is, or holds, a builtin container that can change in place."""
  return snapshot(value) is not value


class Watch:
  """The mutable containers a cached flattening was made from, with copies to compare.

  ``containers`` may hold: dicts (a Pytree's ``__dict__``, a State, a plain dict),
  lists, ``(container, snapshot)`` pairs (a static attribute's value with the deep
  copy its PytreeAux keeps), and other registered pytree nodes (compared one level
  deep through ``jax.tree_util``). Duplicates are watched once.
  """

  __slots__ = ('_objs', '_copies', '_copiers', '_nodes')

  def __init__(self, containers: tp.Iterable = ()):
    objs, copies, copiers, nodes = [], [], [], []
    seen: set = set()
    for c in containers:
      copy = None
      if type(c) is tuple:  # (container, the snapshot to compare it with)
        c, copy = c
      if id(c) in seen:
        continue
      seen.add(id(c))
      if copy is not None:
        copier = snapshot
      elif isinstance(c, (dict, list)):
        copier = _shallow_copy
        copy = copier(c)
      else:
        nodes.append((c, *_one_level(c)))
        continue
      objs.append(c)
      copies.append(copy)
      copiers.append(copier)
    self._objs, self._copies, self._copiers, self._nodes = objs, copies, copiers, tuple(nodes)

  def unchanged(self) -> bool:
    """Whether every watched container still holds what it held (the per-call check)."""
    try:
      if self._objs != self._copies:  # one C-level loop over all the pairs
        return False
      for node, children, treedef in self._nodes:
        now, now_def = _one_level(node)
        if now_def != treedef or now != children:
          return False
    except Exception:  # a replaced value whose == raises (an array): it changed
      return False
    return True

  def refresh(self) -> None:
    """Take the copies again: the caller made changes it has accounted for itself."""
    self._copies = [copier(c) for copier, c in zip(self._copiers, self._objs)]
    self._nodes = tuple((n, *_one_level(n)) for n, _, _ in self._nodes)

  def keeps_alive(self, objects: tp.Sequence) -> bool:
    """Whether the copies hold every one of ``objects``.

    A cache that drops its watch when one of its objects dies (a weak reference
    callback) would then keep them all alive: none can die first. That happens only
    with reference cycles (a child holding its parent); such flattenings are not kept.
    """
    held = set()
    for copy in [*self._copies, *(children for _, children, _ in self._nodes)]:
      for value in (copy.values() if isinstance(copy, dict) else copy):
        held.add(id(value))
        held.add(id(getattr(value, '__self__', None)))  # `self.fn = self.method` holds self
    return bool(objects) and all(id(o) in held for o in objects)

  def __len__(self):
    return len(self._objs) + len(self._nodes)


def _shallow_copy(c):
  if isinstance(c, list):
    return list(c)
  # a dict subclass with its own equality (OrderedDict: order matters) compares with its own kind
  return dict(c) if type(c).__eq__ is dict.__eq__ else c.copy()


def _one_level(node):
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda y: y is not node)
  return children, treedef


# -- 3. check mode ------------------------------------------------------------

_CHECK = [os.environ.get('ARBAX_CHECK_CACHE', '').strip().lower() not in ('', '0', 'false', 'no')]


def checking() -> bool:
  """Whether check mode is on (``ARBAX_CHECK_CACHE=1`` or ``check_cache(True)``)."""
  return _CHECK[0]


class check_cache:
  """Turn check mode on or off: now, or for a ``with`` block (restored on exit).

      with check_cache(True):
        train_step(model, batch)   # raises StaleCacheError if a cached plan is stale
  """

  def __init__(self, flag: bool = True):
    self._previous = _CHECK[0]
    _CHECK[0] = bool(flag)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    _CHECK[0] = self._previous
    return False


class StaleCacheError(AssertionError):
  """Check mode found a cached flattening that no longer matches its objects (an arbax bug:
  some structural change did not invalidate the cache)."""


def verify(what: str, cached_graphdef, cached_leaves: tp.Sequence, fresh_graphdef,
           fresh_leaves: tp.Sequence, fresh_paths: tp.Sequence = ()) -> None:
  """Raise StaleCacheError if a cached flattening differs from a fresh one.

  Args:
    what: what was cached, for the message (``'nnx.jit plan'``, ``'nnx.state'``).
    cached_graphdef, cached_leaves: what the cache would have reused.
    fresh_graphdef, fresh_leaves, fresh_paths: a new walk of the same objects.
  """
  # The structures are compared, not context annotations a GraphDef may carry; a deep one
  # compares under its ``deep()`` (tuples compare recursively).
  with getattr(fresh_graphdef, 'deep', contextlib.nullcontext)():
    same = (getattr(cached_graphdef, 'root', cached_graphdef)
            == getattr(fresh_graphdef, 'root', fresh_graphdef))
  if not same:
    raise StaleCacheError(
        f'{what}: the cached structure is stale.\n  cached: {cached_graphdef!r}\n'
        f'  now:    {fresh_graphdef!r}\nSome structural change did not invalidate the cache '
        '(an arbax bug: please report it with the code that changed the object).')
  if len(cached_leaves) != len(fresh_leaves):
    raise StaleCacheError(f'{what}: the cached flattening has {len(cached_leaves)} leaves, the '
                          f'objects now have {len(fresh_leaves)}.')
  for i, (a, b) in enumerate(zip(cached_leaves, fresh_leaves)):
    if a is not b:
      where = fresh_paths[i] if i < len(fresh_paths) else i
      raise StaleCacheError(
          f'{what}: leaf {where} is now a different {type(b).__name__} than the one the cache '
          'holds (it was replaced without invalidating the cache: an arbax bug, or a bypass '
          'write swapping a Variable for an equal-valued one).')
