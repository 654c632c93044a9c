"""The filter language: which Variables (or leaves) a call selects.

    >>> import arbax as nnx
    >>> is_param = nnx.filters.to_predicate(nnx.Param)
    >>> is_param((), nnx.Param(0)), is_param((), nnx.BatchStat(0))
    (True, False)

A filter is one of: a Variable type (or any type, matched with isinstance), a
string (a tag, or an attribute name on the path), ``...`` / ``True``
(everything), ``None`` / ``False`` (nothing), a predicate ``(path, value) ->
bool``, a list or tuple (any of), or one of the combinators below.
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
  """Matches values that are instances of ``type`` (or Variables whose kind is a subclass)."""
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


@dataclasses.dataclass(frozen=True)
class PathContains:
  """Matches leaves whose path contains ``key`` (an attribute name or index)."""
  key: tp.Any
  exact: bool = True

  def __call__(self, path, value):
    if self.exact:
      return self.key in path
    return any(str(self.key) in str(k) for k in path)


class _Combinator:
  def __init__(self, *filters: Filter):
    self.filters = tuple(filters)
    self.predicates = tuple(to_predicate(f) for f in filters)

  def __eq__(self, other):
    return type(self) is type(other) and self.filters == other.filters

  def __hash__(self):
    return hash((type(self), self.filters))

  def __repr__(self):
    return f'{type(self).__name__}({", ".join(map(repr, self.filters))})'


class Any(_Combinator):
  """Matches when any of its filters matches."""

  def __call__(self, path, value):
    return any(p(path, value) for p in self.predicates)


class All(_Combinator):
  """Matches when all of its filters match."""

  def __call__(self, path, value):
    return all(p(path, value) for p in self.predicates)


class Not:
  """Matches what its filter does not."""

  def __init__(self, filter: Filter):
    self.filter = filter
    self.predicate = to_predicate(filter)

  def __call__(self, path, value):
    return not self.predicate(path, value)

  def __eq__(self, other):
    return isinstance(other, Not) and self.filter == other.filter

  def __hash__(self):
    return hash((Not, self.filter))

  def __repr__(self):
    return f'Not({self.filter!r})'


class _Everything:
  def __call__(self, path, value):
    return True

  def __repr__(self):
    return 'Everything()'


class _Nothing:
  def __call__(self, path, value):
    return False

  def __repr__(self):
    return 'Nothing()'


Everything = _Everything
Nothing = _Nothing
_EVERYTHING = _Everything()
_NOTHING = _Nothing()


@dataclasses.dataclass(frozen=True)
class _TagOrName:
  name: str

  def __call__(self, path, value):
    return _tag_of(value) == self.name or self.name in path

  def __repr__(self):
    return repr(self.name)


def to_predicate(filter: Filter) -> tp.Callable[[tuple, tp.Any], bool]:
  """Turn any filter into a predicate ``(path, value) -> bool``."""
  if isinstance(filter, (_Everything, _Nothing, OfType, WithTag, PathContains, _Combinator, Not,
                         _TagOrName)):
    return filter
  if filter is ... or filter is True:
    return _EVERYTHING
  if filter is None or filter is False:
    return _NOTHING
  if isinstance(filter, type):
    return OfType(filter)
  if isinstance(filter, str):
    return _TagOrName(filter)
  if isinstance(filter, (list, tuple)):
    return Any(*filter)
  if callable(filter):
    return filter
  raise TypeError(f'Invalid filter {filter!r}: expected a type, a string, ..., None, a predicate '
                  '(path, value) -> bool, a list/tuple of filters, or nnx.All/Any/Not.')


def filters_to_predicates(filters: tp.Sequence[Filter]) -> tuple:
  return tuple(to_predicate(f) for f in filters)
