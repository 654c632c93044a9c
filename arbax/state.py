"""State: the Variables of an object, as a nested mapping keyed by attribute name or index.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> s = nnx.State({'a': {'w': nnx.Param(jnp.ones(2))}, 'n': nnx.BatchStat(0)})
    >>> [path for path, _ in s.flat_state()]
    [('a', 'w'), ('n',)]
    >>> s.filter(nnx.Param).to_pure_dict()['a']['w'].tolist()
    [1.0, 1.0]

A State is itself a pytree (keys sorted, like dicts), so it passes through
``jax.jit``/``jax.grad`` and its leaves are the Variables (or raw arrays) it holds.
"""
from __future__ import annotations

import typing as tp

import jax

from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.variables import Variable

Path = tuple


def _sort_key(k):
  return (isinstance(k, str), str(type(k)), k)


class State(dict):
  """A nested mapping of Variables; see the module docstring."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f'State has no key {name!r}; keys: {list(self)}') from None

  def __setattr__(self, name, value):
    self[name] = value

  def __repr__(self):
    from arbax.display import object_repr
    return object_repr(self)

  def __treescope_repr__(self, path, subtree_renderer):
    from arbax.display import treescope_repr
    return treescope_repr(self, path, subtree_renderer)

  # -- flat views --
  def flat_state(self) -> 'FlatState':
    return to_flat_state(self)

  @classmethod
  def from_flat_path(cls, flat) -> 'State':
    return from_flat_state(flat)

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


def _state_flatten(s):
  keys = sorted(s, key=_sort_key)
  return [s[k] for k in keys], tuple(keys)


def _state_flatten_with_keys(s):
  keys = sorted(s, key=_sort_key)
  return [(jax.tree_util.DictKey(k), s[k]) for k in keys], tuple(keys)


def _state_unflatten(keys, children):
  s = State()
  dict.update(s, zip(keys, children))
  return s


jax.tree_util.register_pytree_with_keys(State, _state_flatten_with_keys, _state_unflatten,
                                        _state_flatten)


class FlatState(tp.Sequence):
  """A sorted sequence of ``(path, leaf)`` pairs; ``.paths`` and ``.leaves`` as tuples."""

  __slots__ = ('paths', 'leaves')

  def __init__(self, items: tp.Iterable[tuple[Path, tp.Any]], *, sort: bool = True):
    items = list(items)
    if sort:
      items.sort(key=lambda item: tuple(_sort_key(k) for k in item[0]))
    self.paths = tuple(p for p, _ in items)
    self.leaves = tuple(v for _, v in items)

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

  def to_nested_state(self) -> State:
    return from_flat_state(self)


def _is_mapping(x):
  return isinstance(x, dict)


def _flat_items(tree, prefix=()):
  for k, v in tree.items():
    path = prefix + (k,)
    if _is_mapping(v) and not isinstance(v, Variable):
      yield from _flat_items(v, path)
    else:
      yield path, v


def to_flat_state(state: tp.Mapping) -> FlatState:
  return FlatState(_flat_items(state))


def flat_dict(state: tp.Mapping) -> dict:
  """``{path: leaf}`` in insertion order (no sorting): the fast internal view."""
  return dict(_flat_items(state))


def from_flat_state(flat, *, cls=State) -> State:
  """Nest ``[(path, leaf)]`` (or a ``{path: leaf}`` dict) into a State."""
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
    elif _is_mapping(v):
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


def replace_by_pure_dict(state: tp.Mapping, pure_dict: tp.Mapping, replace_fn=None) -> None:
  """Write the raw values of ``pure_dict`` into the matching Variables of ``state`` in place."""
  flat = flat_dict(state)
  for path, value in _flat_items(restore_int_paths(dict(pure_dict))):
    if path not in flat:
      raise ValueError(f'replace_by_pure_dict: path {format_path(path)} is not in the state; '
                       f'the state has {[format_path(p) for p in list(flat)[:8]]}...')
    target = flat[path]
    if isinstance(target, Variable):
      if replace_fn is not None:
        value = replace_fn(target, value)
      else:
        value = value.get_value() if isinstance(value, Variable) else value
      object.__setattr__(target, '_value', value)
    else:
      _set_path(state, path, value)


def _set_path(tree, path, value):
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _partition(flat, predicates, *, strict: bool):
  groups = [[] for _ in predicates]
  rest = []
  for path, leaf in flat:
    for i, pred in enumerate(predicates):
      if pred(path, leaf):
        groups[i].append((path, leaf))
        break
    else:
      if strict:
        kind = type(leaf).__name__
        raise ValueError(
            f'{kind} at path {format_path(path)} matched none of the filters '
            f'{list(predicates)}. Add a filter for it, or end the filters with ... to catch the rest.')
      rest.append((path, leaf))
  return groups, rest


def filter_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """The parts of ``state`` matched by each filter (one State per filter)."""
  predicates = filterlib.filters_to_predicates((first, *filters))
  groups, _ = _partition(list(_flat_items(state)), predicates, strict=False)
  states = tuple(from_flat_state(g) for g in groups)
  return states[0] if len(states) == 1 else states


def split_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """Partition ``state``: each leaf goes to the first filter that matches; every leaf must match one."""
  predicates = filterlib.filters_to_predicates((first, *filters))
  groups, _ = _partition(list(_flat_items(state)), predicates, strict=True)
  states = tuple(from_flat_state(g) for g in groups)
  return states[0] if len(states) == 1 else states


def merge_state(state: tp.Mapping, /, *states: tp.Mapping) -> State:
  """One State with the leaves of all; later states win on equal paths."""
  merged = {}
  for s in (state, *states):
    merged.update(_flat_items(s))
  return from_flat_state(merged)


def map_state(f: tp.Callable[[tuple, tp.Any], tp.Any], state: tp.Mapping) -> State:
  """A State with ``f(path, leaf)`` at every path."""
  return from_flat_state({p: f(p, v) for p, v in _flat_items(state)})
