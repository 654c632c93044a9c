"""The filter language: which Variables (or leaves) a call selects.

    >>> import arbax as nnx
    >>> is_param = nnx.filters.to_predicate(nnx.Param)
    >>> is_param((), nnx.Param(0)), is_param((), nnx.BatchStat(0))
    (True, False)
    >>> nnx.filters.to_predicate([nnx.Param, 'rng'])
    Any(OfType(Param), WithTag('rng'))

A filter is one of: a Variable type (or any type, matched with isinstance), a
string (matches Variables whose ``tag`` metadata is that string; RngStreams tag
their keys with the stream name), ``...`` / ``True`` (everything), ``None`` /
``False`` (nothing), a predicate ``(path, value) -> bool``, a list or tuple
(any of), or one of the combinators below.

Filters built only from types, tags, paths and the combinators are
*structural*: their answer depends on a leaf's path, kind and metadata, never
on its value, so the State API may cache what they select.
"""
from __future__ import annotations

import dataclasses
import typing as tp

Filter = tp.Any


def _tag_of(value):
  meta = getattr(value, '_meta', None)
  return None if meta is None else meta.items.get('tag')


@dataclasses.dataclass(frozen=True)
class OfType:
  """Matches values that are instances of ``type`` (or objects whose ``.type`` is a subclass)."""
  type: type

  def __call__(self, path, value):
    return isinstance(value, self.type) or (
        isinstance(getattr(value, 'type', None), type) and issubclass(value.type, self.type))

  def __repr__(self):
    return f'OfType({self.type.__name__})'


@dataclasses.dataclass(frozen=True)
class WithTag:
  """Matches Variables whose ``tag`` metadata equals ``tag`` (RngStreams tag their keys)."""
  tag: str

  def __call__(self, path, value):
    return _tag_of(value) == self.tag

  def __repr__(self):
    return f'WithTag({self.tag!r})'


@dataclasses.dataclass(frozen=True)
class PathContains:
  """Matches leaves whose path contains ``key``; ``exact=False`` matches substrings of path entries."""
  key: tp.Any
  exact: bool = True

  def __call__(self, path, value):
    if self.exact:
      return self.key in path
    return any(str(self.key) in str(k) for k in path)

  def __repr__(self):
    return f'PathContains({self.key!r}, exact={self.exact})'


class _Combinator:
  def __init__(self, *filters: Filter):
    self.predicates = tuple(to_predicate(f) for f in filters)

  def __eq__(self, other):
    return type(self) is type(other) and self.predicates == other.predicates

  def __hash__(self):
    return hash((type(self), self.predicates))

  def __repr__(self):
    return f'{type(self).__name__}({", ".join(map(repr, self.predicates))})'


class Any(_Combinator):
  """Matches when any of its filters matches (``Any()`` matches nothing)."""

  def __call__(self, path, value):
    return any(p(path, value) for p in self.predicates)


class All(_Combinator):
  """Matches when all of its filters match (``All()`` matches everything)."""

  def __call__(self, path, value):
    return all(p(path, value) for p in self.predicates)


class Not:
  """Matches what its filter does not."""

  def __init__(self, filter: Filter, /):
    self.predicate = to_predicate(filter)

  def __call__(self, path, value):
    return not self.predicate(path, value)

  def __eq__(self, other):
    return isinstance(other, Not) and self.predicate == other.predicate

  def __hash__(self):
    return hash((Not, self.predicate))

  def __repr__(self):
    return f'Not({self.predicate!r})'


class Everything:
  """Matches every leaf; the filter ``...`` and ``True`` mean this."""

  def __call__(self, path, value):
    return True

  def __eq__(self, other):
    return isinstance(other, Everything)

  def __hash__(self):
    return hash(Everything)

  def __repr__(self):
    return 'Everything()'


class Nothing:
  """Matches no leaf; the filters ``None`` and ``False`` mean this."""

  def __call__(self, path, value):
    return False

  def __eq__(self, other):
    return isinstance(other, Nothing)

  def __hash__(self):
    return hash(Nothing)

  def __repr__(self):
    return 'Nothing()'


_EVERYTHING = Everything()
_NOTHING = Nothing()
_BUILTIN = (Everything, Nothing, OfType, WithTag, PathContains, _Combinator, Not)


def to_predicate(filter: Filter) -> tp.Callable[[tuple, tp.Any], bool]:
  """Turn any filter into a predicate ``(path, value) -> bool``."""
  if isinstance(filter, _BUILTIN):
    return filter
  if filter is ... or filter is True:
    return _EVERYTHING
  if filter is None or filter is False:
    return _NOTHING
  if isinstance(filter, type):
    return OfType(filter)
  if isinstance(filter, str):
    return WithTag(filter)
  if isinstance(filter, (list, tuple)):
    return Any(*filter)
  if callable(filter):
    return filter
  raise ValueError(f'Invalid filter {filter!r} of type {type(filter).__name__}: expected a type, '
                   'a string (tag), ..., None, a predicate (path, value) -> bool, a list/tuple of '
                   'filters, or nnx.All / nnx.Any / nnx.Not.')


def filters_to_predicates(filters: tp.Sequence[Filter]) -> tuple:
  """One predicate per filter; ``...`` / ``True`` may only come last (it would shadow the rest)."""
  for i, f in enumerate(filters[:-1]):
    if f is ... or f is True:
      raise ValueError(f'`...` or `True` can only be used as the last filter, got {f!r} at '
                       f'index {i} of {len(filters)} filters. Move it to the end.')
  return tuple(to_predicate(f) for f in filters)


def is_structural(predicate, *, raw_leaves: bool = False) -> bool:
  """Whether ``predicate`` depends only on path, kind and metadata (so its answer can be cached).

  With ``raw_leaves`` (the tree has bare arrays) type tests are not structural:
  an array's type is a property of its value.
  """
  if isinstance(predicate, (Everything, Nothing, WithTag, PathContains)):
    return True
  if isinstance(predicate, OfType):
    return not raw_leaves
  if isinstance(predicate, _Combinator):
    return all(is_structural(p, raw_leaves=raw_leaves) for p in predicate.predicates)
  if isinstance(predicate, Not):
    return is_structural(predicate.predicate, raw_leaves=raw_leaves)
  return False


__all__ = ['Filter', 'OfType', 'WithTag', 'PathContains', 'Any', 'All', 'Not', 'Everything',
           'Nothing', 'to_predicate', 'filters_to_predicates', 'is_structural']
