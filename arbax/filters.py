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
  """Matches values that are instances of ``type`` (or objects whose ``.type`` is a subclass of it).

  A bare type used as a filter means this: ``nnx.state(model, nnx.Param)``.

      >>> import arbax as nnx
      >>> is_param = nnx.OfType(nnx.Param)
      >>> is_param((), nnx.Param(0)), is_param((), nnx.BatchStat(0))
      (True, False)

  Args:
    type: the class to match.
  """
  type: type

  def __call__(self, path, value):
    return isinstance(value, self.type) or (
        isinstance(getattr(value, 'type', None), type) and issubclass(value.type, self.type))

  def __repr__(self):
    return f'OfType({self.type.__name__})'


@dataclasses.dataclass(frozen=True)
class WithTag:
  """Matches Variables whose ``tag`` metadata equals ``tag``; a string used as a filter means this.

  RngStreams tag their keys and counts with the stream name, so ``'dropout'``
  selects the state of the ``dropout`` stream.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> list(nnx.state(rngs, nnx.WithTag('dropout')))
      ['dropout']

  Args:
    tag: the tag to match.
  """
  tag: str

  def __call__(self, path, value):
    return _tag_of(value) == self.tag

  def __repr__(self):
    return f'WithTag({self.tag!r})'


@dataclasses.dataclass(frozen=True)
class PathContains:
  """Matches leaves whose path contains ``key``.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Layer(nnx.Module):
      ...   def __init__(self):
      ...     self.kernel = nnx.Param(jnp.ones(2))
      ...     self.bias = nnx.Param(jnp.zeros(2))
      >>> list(nnx.state(Layer(), nnx.PathContains('kernel')))
      ['kernel']
      >>> list(nnx.state(Layer(), nnx.PathContains('ker', exact=False)))
      ['kernel']

  Args:
    key: a path entry (attribute name or index).
    exact: match whole entries (True) or substrings of their ``str`` (False).
  """
  key: tp.Any
  exact: bool = True

  def __call__(self, path, value):
    if self.exact:
      return self.key in path
    return any(str(self.key) in str(k) for k in path)

  def __repr__(self):
    return f'PathContains({self.key!r}, exact={self.exact})'


class PathIn:
  """Matches leaves whose path is exactly one of ``paths``.

  ``nnx.StateSharding(state)`` / ``nnx.StateAxes(state)`` build these from a
  State whose leaves are the values (one filter per distinct value).

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Layer(nnx.Module):
      ...   def __init__(self):
      ...     self.kernel = nnx.Param(jnp.ones(2))
      ...     self.bias = nnx.Param(jnp.zeros(2))
      >>> list(nnx.state(Layer(), nnx.filters.PathIn(('bias',))))
      ['bias']

  Args:
    *paths: the paths, as tuples of attribute names and indices.
  """

  def __init__(self, *paths: tuple):
    self.paths = frozenset(tuple(p) for p in paths)

  def __call__(self, path, value):
    return tuple(path) in self.paths

  def __eq__(self, other):
    return isinstance(other, PathIn) and self.paths == other.paths

  def __hash__(self):
    return hash(self.paths)

  def __repr__(self):
    return f'PathIn({", ".join(map(repr, sorted(self.paths, key=str)))})'


class _Combinator:
  def __init__(self, *filters: Filter):
    self.predicates = tuple(to_predicate(f) for f in filters)

  def __call__(self, path, value) -> bool:
    raise NotImplementedError  # Any and All combine the predicates

  def __eq__(self, other):
    return type(self) is type(other) and self.predicates == other.predicates

  def __hash__(self):
    return hash((type(self), self.predicates))

  def __repr__(self):
    return f'{type(self).__name__}({", ".join(map(repr, self.predicates))})'


class Any(_Combinator):
  """Matches when any of its filters matches (``Any()`` matches nothing); a list means this.

      >>> import arbax as nnx
      >>> stats_or_cache = nnx.Any(nnx.BatchStat, nnx.Cache)
      >>> stats_or_cache((), nnx.Cache(0)), stats_or_cache((), nnx.Param(0))
      (True, False)

  Args:
    *filters: the filters.
  """

  def __call__(self, path, value):
    return any(p(path, value) for p in self.predicates)


class All(_Combinator):
  """Matches when all of its filters match (``All()`` matches everything).

      >>> import arbax as nnx
      >>> trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains('embed')))
      >>> trainable(('dense',), nnx.Param(0)), trainable(('embed',), nnx.Param(0))
      (True, False)

  Args:
    *filters: the filters.
  """

  def __call__(self, path, value):
    return all(p(path, value) for p in self.predicates)


class Not:
  """Matches what its filter does not.

      >>> import arbax as nnx
      >>> not_params = nnx.Not(nnx.Param)
      >>> not_params((), nnx.Param(0)), not_params((), nnx.BatchStat(0))
      (False, True)

  Args:
    filter: the filter to negate.
  """

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
  """Matches every leaf; the filters ``...`` and ``True`` mean this.

      >>> import arbax as nnx
      >>> nnx.Everything()((), nnx.Param(0)), nnx.filters.to_predicate(...)
      (True, Everything())
  """

  def __call__(self, path, value):
    return True

  def __eq__(self, other):
    return isinstance(other, Everything)

  def __hash__(self):
    return hash(Everything)

  def __repr__(self):
    return 'Everything()'


class Nothing:
  """Matches no leaf; the filters ``None`` and ``False`` mean this.

      >>> import arbax as nnx
      >>> nnx.Nothing()((), nnx.Param(0)), nnx.filters.to_predicate(None)
      (False, Nothing())
  """

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
  """Turn any filter into a predicate ``(path, value) -> bool``.

      >>> import arbax as nnx
      >>> nnx.filters.to_predicate(nnx.Param), nnx.filters.to_predicate('dropout')
      (OfType(Param), WithTag('dropout'))

  Args:
    filter: a type, a tag string, ``...``/``True``, ``None``/``False``, a
      predicate, a list or tuple of filters, or a combinator.

  Returns:
    The predicate (a combinator or predicate is returned as it is). An
    unknown kind of filter raises a ValueError.
  """
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
    return tp.cast(tp.Callable[[tuple, tp.Any], bool], filter)  # a user predicate: trusted
  raise ValueError(f'Invalid filter {filter!r} of type {type(filter).__name__}: expected a type, '
                   'a string (tag), ..., None, a predicate (path, value) -> bool, a list/tuple of '
                   'filters, or nnx.All / nnx.Any / nnx.Not.')


def filters_to_predicates(filters: tp.Sequence[Filter]) -> tuple:
  """One predicate per filter, as ``split`` uses them (the first match wins).

  ``...`` / ``True`` may only come last, where it catches the rest: anywhere
  else it would shadow the filters after it, so it raises a ValueError.

      >>> import arbax as nnx
      >>> nnx.filters.filters_to_predicates((nnx.Param, ...))
      (OfType(Param), Everything())

  Args:
    filters: a sequence of filters.

  Returns:
    A tuple of predicates.
  """
  for i, f in enumerate(filters[:-1]):
    if f is ... or f is True:
      raise ValueError(f'`...` or `True` can only be used as the last filters, got {f!r} at '
                       f'index {i} of {len(filters)} filters. Move it to the end.')
  return tuple(to_predicate(f) for f in filters)


def is_structural(predicate, *, raw_leaves: bool = False) -> bool:
  """Whether ``predicate`` depends only on path, kind and metadata, so its answer may be cached.

  With ``raw_leaves`` (the tree has bare arrays) type tests are not structural:
  an array's type is a property of its value. A user predicate is never
  structural, since it may read values.

      >>> import arbax as nnx
      >>> is_structural = nnx.filters.is_structural
      >>> is_structural(nnx.OfType(nnx.Param)), is_structural(lambda path, value: True)
      (True, False)

  Args:
    predicate: a predicate from ``to_predicate``.
    raw_leaves: whether the leaves include bare arrays.

  Returns:
    True when the State API may memoize what it selects.
  """
  if isinstance(predicate, (Everything, Nothing, WithTag, PathContains, PathIn)):
    return True
  if isinstance(predicate, OfType):
    return not raw_leaves
  if isinstance(predicate, _Combinator):
    return all(is_structural(p, raw_leaves=raw_leaves) for p in predicate.predicates)
  if isinstance(predicate, Not):
    return is_structural(predicate.predicate, raw_leaves=raw_leaves)
  return False


__all__ = ['Filter', 'OfType', 'WithTag', 'PathContains', 'PathIn', 'Any', 'All', 'Not', 'Everything',
           'Nothing', 'to_predicate', 'filters_to_predicates', 'is_structural']
