"""State: the Variables of an object, as a nested mapping keyed by attribute name or index.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> s = nnx.State({'a': {'w': nnx.Param(jnp.ones(2))}, 'n': nnx.BatchStat(0)})
    >>> [path for path, _ in s.flat_state()]
    [('a', 'w'), ('n',)]
    >>> s.filter(nnx.Param).to_pure_dict()['a']['w'].tolist()
    [1.0, 1.0]

A State is itself a pytree (keys sorted, like dicts), so it passes through
``jax.jit``/``jax.grad`` and its leaves are the Variables (or raw arrays) it holds.

The functions at the bottom (``skeleton``, ``build_state``, ``compile_getter``)
are the fast path of ``nnx.split``/``nnx.merge``: a *skeleton* is the key
structure of a State without its leaves, computed once per structure.
"""
from __future__ import annotations

import operator
from itertools import islice
import typing as tp

import jax

from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.variables import Variable

Path = tuple


def _sort_key(k):
  return (isinstance(k, str), str(type(k)), k)


def _path_sort_key(item):
  return tuple(_sort_key(k) for k in item[0])


class State(dict):
  """A nested mapping of Variables; see the module docstring."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f'No attribute {name!r} in State; its keys are {list(self)}') from None

  def __setattr__(self, name, value):
    self[name] = value

  def __delattr__(self, name):
    try:
      del self[name]
    except KeyError:
      raise AttributeError(f'No attribute {name!r} in State') from None

  def __repr__(self):
    from arbax.display import object_repr
    return object_repr(self)

  def __treescope_repr__(self, path, subtree_renderer):
    from arbax.display import treescope_repr
    return treescope_repr(self, path, subtree_renderer)

  @property
  def raw_mapping(self) -> dict:
    return self

  # -- flat views --
  def flat_state(self) -> 'FlatState':
    return to_flat_state(self)

  @classmethod
  def from_flat_path(cls, flat) -> 'State':
    return from_flat_state(flat, cls=cls)

  def to_pure_dict(self) -> dict:
    return to_pure_dict(self)

  def replace_by_pure_dict(self, pure_dict, replace_fn=None) -> None:
    replace_by_pure_dict(self, pure_dict, replace_fn)

  def filter(self, first, /, *filters):
    return filter_state(self, first, *filters)

  def split(self, first, /, *filters):
    return split_state(self, first, *filters)

  def merge(self, *states):
    return merge_state(self, *states)

  def map(self, f):
    return map_state(f, self)

  def __or__(self, other):
    return merge_state(self, other)

  def __sub__(self, other):
    """The entries of ``self`` whose paths are not in ``other``."""
    drop = set(flat_dict(other))
    return from_flat_state([(p, v) for p, v in _flat_items(self) if p not in drop])


_KEY_ORDER: dict = {}  # keys in insertion order -> keys in pytree (sorted) order


def _sorted_keys(s) -> tuple:
  # States of one structure are flattened again and again (every jax.jit call over them):
  # sort each distinct key set once.
  keys = tuple(s)
  order = _KEY_ORDER.get(keys)
  if order is None:
    if len(_KEY_ORDER) > 4096:
      _KEY_ORDER.clear()
    order = _KEY_ORDER[keys] = tuple(sorted(keys, key=_sort_key))
  return order


def _state_flatten(s):
  keys = _sorted_keys(s)
  return [s[k] for k in keys], keys


def _state_flatten_with_keys(s):
  keys = _sorted_keys(s)
  return [(jax.tree_util.DictKey(k), s[k]) for k in keys], keys


def _state_unflatten(keys, children):
  s = State()
  dict.update(s, zip(keys, children))
  return s


jax.tree_util.register_pytree_with_keys(State, _state_flatten_with_keys, _state_unflatten,
                                        _state_flatten)


class FlatState(tp.Sequence):
  """A sequence of ``(path, leaf)`` pairs (sorted by path unless ``sort=False``).

  ``.paths`` and ``.leaves`` are tuples; ``to_nested_state()`` nests it back.
  """

  __slots__ = ('paths', 'leaves')

  def __init__(self, items: tp.Iterable[tuple[Path, tp.Any]], *, sort: bool = True):
    items = list(items)
    if sort:
      items.sort(key=_path_sort_key)
    self.paths = tuple(p for p, _ in items)
    self.leaves = tuple(v for _, v in items)

  @classmethod
  def from_sorted_keys_values(cls, paths, leaves) -> 'FlatState':
    return cls(zip(paths, leaves), sort=False)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return FlatState(zip(self.paths[i], self.leaves[i]), sort=False)
    return self.paths[i], self.leaves[i]

  def __len__(self):
    return len(self.paths)

  def __iter__(self):
    return iter(zip(self.paths, self.leaves))

  def __repr__(self):
    return 'FlatState([\n' + ''.join(f'  ({p!r}, {v!r}),\n' for p, v in self) + '])'

  def filter(self, first, /, *filters):
    groups = _partition(list(self), filterlib.filters_to_predicates((first, *filters)), strict=False)
    out = tuple(FlatState(g, sort=False) for g in groups)
    return out[0] if len(out) == 1 else out

  def split(self, first, /, *filters):
    groups = _partition(list(self), filterlib.filters_to_predicates((first, *filters)), strict=True)
    out = tuple(FlatState(g, sort=False) for g in groups)
    return out[0] if len(out) == 1 else out

  def to_nested_state(self) -> State:
    return from_flat_state(self)


def _is_branch(x) -> bool:
  return isinstance(x, dict)


def _flat_items(tree, prefix=()):
  for k, v in tree.items():
    path = prefix + (k,)
    if _is_branch(v):
      yield from _flat_items(v, path)
    else:
      yield path, v


def to_flat_state(state: tp.Mapping) -> FlatState:
  """The ``(path, leaf)`` pairs of a nested State, sorted by path."""
  return FlatState(_flat_items(state))


def flat_dict(state: tp.Mapping) -> dict:
  """``{path: leaf}`` in insertion order (no sorting): the fast internal view."""
  return dict(_flat_items(state))


def from_flat_state(flat, *, cls=State) -> State:
  """Nest ``[(path, leaf)]``, a FlatState or a ``{path: leaf}`` dict into a State."""
  items = flat.items() if isinstance(flat, dict) else flat
  root = cls()
  for path, leaf in items:
    node = root
    for k in path[:-1]:
      child = node.get(k)
      if child is None:
        child = node[k] = cls()
      node = child
    if path:
      node[path[-1]] = leaf
  return root


def to_pure_dict(state: tp.Mapping) -> dict:
  """Plain nested dicts of raw values (Variables unwrapped): what checkpoints store."""
  out = {}
  for k, v in state.items():
    if isinstance(v, Variable):
      out[k] = v.get_value()
    elif _is_branch(v):
      out[k] = to_pure_dict(v)
    else:
      out[k] = v
  return out


def restore_int_paths(pure_dict: dict) -> dict:
  """Keys that are digit strings (as JSON/Orbax store them) become ints again."""
  out = {}
  for k, v in pure_dict.items():
    if isinstance(k, str) and k.isdigit():
      k = int(k)
    out[k] = restore_int_paths(v) if isinstance(v, dict) else v
  return out


def _default_replace(target, value):
  value = value.get_value() if isinstance(value, Variable) else value
  return target.replace(value) if isinstance(target, Variable) else value


def replace_by_pure_dict(state: tp.Mapping, pure_dict: tp.Mapping, replace_fn=None) -> None:
  """Put the raw values of ``pure_dict`` into ``state``: each Variable is replaced by a new one of
  the same kind and metadata holding the new value (the Variables of the model are not touched).

  ``replace_fn(old_leaf, value)`` overrides how the new entry is made. Digit-string keys (from
  JSON checkpoints) match integer keys.
  """
  replace_fn = replace_fn or _default_replace
  for path, value in _flat_items(restore_int_paths(dict(pure_dict))):
    parent = state
    try:
      for k in path[:-1]:
        parent = parent[k]
      old = parent[path[-1]]
    except (KeyError, TypeError):
      raise ValueError(f'replace_by_pure_dict: key {format_path(path)} of the pure dict is not '
                       'in the state. Was the dict saved from another model?') from None
    parent[path[-1]] = replace_fn(old, value)


def _partition(flat, predicates, *, strict: bool) -> list[list]:
  """Split ``[(path, leaf)]`` into one list per predicate; the first match wins."""
  groups = [[] for _ in predicates]
  unmatched = []
  for path, leaf in flat:
    for i, pred in enumerate(predicates):
      if pred(path, leaf):
        groups[i].append((path, leaf))
        break
    else:
      unmatched.append((path, leaf))
  if strict and unmatched:
    raise unmatched_error(unmatched, predicates)
  return groups


def unmatched_error(unmatched: list, predicates) -> ValueError:
  """The error of a split whose filters left ``[(path, leaf)]`` unmatched: names the paths."""
  (path, leaf), rest = unmatched[0], unmatched[1:]
  more = ''
  if rest:
    more = f' (and {len(rest)} more: ' + ', '.join(format_path(p) for p, _ in rest[:3]) + \
        (', ...' if len(rest) > 3 else '') + ')'
  return ValueError(
      f'Non-exhaustive filters: the {type(leaf).__name__} at {format_path(path)}{more} matched '
      f'none of the filters {list(predicates)}. Add a filter for it, or end the filters with '
      '`...` to match all remaining elements.')


def _split_groups(state, filters, strict):
  predicates = filterlib.filters_to_predicates(filters)
  groups = _partition(list(_flat_items(state)), predicates, strict=strict)
  states = tuple(from_flat_state(g) for g in groups)
  return states[0] if len(states) == 1 else states


def filter_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """The parts of ``state`` matched by each filter (one State per filter; the first match wins)."""
  return _split_groups(state, (first, *filters), strict=False)


def split_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """Partition ``state``: each leaf goes to the first filter that matches; every leaf must match one."""
  return _split_groups(state, (first, *filters), strict=True)


def merge_state(state: tp.Mapping, /, *states: tp.Mapping) -> State:
  """One State with the leaves of all; later states win on equal paths."""
  merged = {}
  for s in (state, *states):
    merged.update(_flat_items(s))
  return from_flat_state(merged)


def map_state(f: tp.Callable[[tuple, tp.Any], tp.Any], state: tp.Mapping) -> State:
  """A State with ``f(path, leaf)`` at every path."""
  return from_flat_state({p: f(p, v) for p, v in _flat_items(state)})


# -- skeletons: the fast path of split / merge / update ------------------------
# A skeleton is ((key, sub), ...) where sub is None for a leaf or a skeleton.


def skeleton(paths: tp.Iterable[tuple]) -> tuple:
  """The key structure of the State that ``from_flat_state`` would build from ``paths``."""
  root: dict = {}
  for path in paths:
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = None

  def freeze(node):
    return tuple((k, None if sub is None else freeze(sub)) for k, sub in node.items())

  return freeze(root)


def build_state(skel: tuple, leaves: tp.Iterator) -> State:
  """A fresh State of shape ``skel`` filled from ``leaves`` (an iterator, in skeleton order)."""
  s = State()
  for k, sub in skel:
    s[k] = next(leaves) if sub is None else build_state(sub, leaves)
  return s


def compile_builder(skel: tuple) -> tp.Callable[[tp.Iterator], State]:
  """``build_state`` for one skeleton, compiled: a level of leaves is one ``State(zip(...))``."""
  keys = tuple(k for k, _ in skel)
  if all(sub is None for _, sub in skel):
    n = len(keys)

    def leaf_level(it):
      return State(zip(keys, islice(it, n)))
    return leaf_level
  parts = tuple((k, None if sub is None else compile_builder(sub)) for k, sub in skel)

  def branch_level(it):
    s = State()
    for k, sub in parts:
      s[k] = next(it) if sub is None else sub(it)
    return s
  return branch_level


_BRANCHES = frozenset({dict, State})


def compile_getter(skel: tuple) -> tp.Callable[[tp.Mapping, list], bool]:
  """A function ``get(state, out) -> bool`` that appends the leaves of ``state`` to ``out`` in
  skeleton order (False if the shapes differ); a level whose entries are all leaves is read
  with one ``itemgetter`` call."""
  inner = _compile_level(skel)

  def get(state, out):
    try:
      return inner(state, out)
    except (KeyError, TypeError, IndexError):
      return False
  return get


def _compile_level(skel):
  keys = tuple(k for k, _ in skel)
  n = len(keys)
  if all(sub is None for _, sub in skel):
    if n == 1:
      key = keys[0]

      def fetch(d):
        return (d[key],)
    else:
      fetch = operator.itemgetter(*keys) if keys else (lambda d: ())

    def leaf_level(d, out):
      if len(d) != n:
        return False
      values = fetch(d)
      if not _BRANCHES.isdisjoint(map(type, values)):
        return False
      out.extend(values)
      return True
    return leaf_level
  parts = tuple((k, None if sub is None else _compile_level(sub)) for k, sub in skel)

  def branch_level(d, out):
    if len(d) != n:
      return False
    for k, sub in parts:
      v = d[k]
      if sub is None:
        if type(v) in _BRANCHES:
          return False
        out.append(v)
      elif type(v) not in _BRANCHES or not sub(v, out):
        return False
    return True
  return branch_level


__all__ = ['State', 'FlatState', 'to_flat_state', 'from_flat_state', 'flat_dict', 'to_pure_dict',
           'replace_by_pure_dict', 'filter_state', 'split_state', 'merge_state', 'map_state',
           'restore_int_paths']
