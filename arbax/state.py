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
from arbax import caches, reprhook
from arbax.errors import format_path
from arbax.variables import Variable

Path = tuple


def _sort_key(k):
  return (isinstance(k, str), str(type(k)), k)


def _path_sort_key(item):
  return tuple(_sort_key(k) for k in item[0])


class State(dict):
  """A nested mapping of Variables, keyed by attribute name or index: what ``nnx.state`` returns.

  Entries read as items or attributes (``state['linear']['kernel']`` or
  ``state.linear.kernel``). The leaves are the object's own Variables (or raw
  arrays), so writing into a leaf writes into the object. A State is a JAX
  pytree with sorted keys, so it passes through ``jax.jit``, ``jax.grad`` and
  ``jax.tree.map``.

      >>> import arbax as nnx
      >>> state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> list(state), state.kernel.shape
      (['bias', 'kernel'], (2, 3))
      >>> params, rest = state.split(nnx.Param, ...)   # split / filter by kind, tag, path...
      >>> sorted(params.to_pure_dict())                # ...and plain dicts for checkpoints
      ['bias', 'kernel']

  Args:
    mapping: the entries (a dict or pairs), as for ``dict``; nested dicts stay
      as they are given.
  """

  def __init__(self, mapping=(), /, **entries):
    dict.__init__(self, mapping, **entries)
    for k, v in self.items():
      if type(v) is dict:  # nested plain dicts become States: ``state.b.c`` reads, as NNX
        dict.__setitem__(self, k, State(v))

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    try:
      value = self[name]
    except KeyError:
      raise AttributeError(f'No attribute {name!r} in State; its keys are {list(self)}') from None
    if type(value) is dict:  # a plain dict stored as an entry: read (and written) as a State
      value = State(value)
      dict.__setitem__(self, name, value)
    return value

  def __setattr__(self, name, value):
    self[name] = value

  def __delattr__(self, name):
    try:
      del self[name]
    except KeyError:
      raise AttributeError(f'No attribute {name!r} in State') from None

  def __repr__(self):
    return reprhook.render(self)

  def __treescope_repr__(self, path, subtree_renderer):
    return reprhook.render_treescope(self, path, subtree_renderer)

  @property
  def raw_mapping(self) -> dict:
    """The State itself, as a plain mapping (NNX's accessor; arbax's State is already a dict)."""
    return self

  # -- flat views --
  def flat_state(self) -> 'FlatState':
    """The ``(path, leaf)`` pairs of this State, sorted by path, as a FlatState.

        >>> import arbax as nnx
        >>> nnx.State({'b': nnx.Param(1), 'a': nnx.Param(2)}).flat_state().paths
        (('a',), ('b',))

    Returns:
      A FlatState.
    """
    return to_flat_state(self)

  @classmethod
  def from_flat_path(cls, flat) -> 'State':
    """Nest ``[(path, leaf)]`` pairs (a FlatState, a list, or a ``{path: leaf}`` dict) into a State.

        >>> import arbax as nnx
        >>> state = nnx.State.from_flat_path([(('a', 'w'), 1), (('n',), 2)])
        >>> type(state['a']).__name__, state.to_pure_dict()
        ('State', {'a': {'w': 1}, 'n': 2})

    Args:
      flat: the pairs.

    Returns:
      A State of this class (nested levels too).
    """
    return from_flat_state(flat, cls=cls)

  def to_pure_dict(self) -> dict:
    """Plain nested dicts of raw values (Variables unwrapped): what checkpoints store.

        >>> import arbax as nnx
        >>> nnx.State({'w': nnx.Param(1.0), 'n': 2}).to_pure_dict()
        {'w': 1.0, 'n': 2}

    Returns:
      A new nested dict; the State is unchanged.
    """
    return to_pure_dict(self)

  def replace_by_pure_dict(self, pure_dict, replace_fn=None) -> None:
    """Put the raw values of ``pure_dict`` into this State, in place (``nnx.replace_by_pure_dict``).

    Each Variable entry is replaced by a new Variable of the same kind and
    metadata; the Variables it held (and the model they belong to) are not
    touched, so follow with ``nnx.update(model, state)`` to load a checkpoint.

        >>> import arbax as nnx
        >>> state = nnx.State({'w': nnx.Param(1.0)})
        >>> state.replace_by_pure_dict({'w': 5.0})
        >>> state['w'][...], type(state['w']).__name__
        (5.0, 'Param')

    Args:
      pure_dict: nested dicts of raw values, a subset of this State's paths.
      replace_fn: ``replace_fn(old_leaf, value) -> new_leaf``; by default a copy of
        the Variable holding ``value``.
    """
    replace_by_pure_dict(self, pure_dict, replace_fn)

  def filter(self, first, /, *filters):
    """The parts of this State the filters select: one State per filter (the first match wins).

    Leaves no filter matches are left out. See ``nnx.filter_state``.

        >>> import arbax as nnx
        >>> state = nnx.State({'w': nnx.Param(1.0), 'n': nnx.BatchStat(0)})
        >>> list(state.filter(nnx.Param))
        ['w']

    Args:
      first: a filter.
      *filters: more filters.

    Returns:
      A State for one filter, else a tuple of States.
    """
    return filter_state(self, first, *filters)

  def split(self, first, /, *filters):
    """Partition this State by filters: each leaf goes to the first filter that matches it.

    Every leaf must match one filter (end with ``...`` for the rest), else a
    ValueError names its path. See ``nnx.split_state``.

        >>> import arbax as nnx
        >>> state = nnx.State({'w': nnx.Param(1.0), 'n': nnx.BatchStat(0)})
        >>> params, rest = state.split(nnx.Param, ...)
        >>> list(params), list(rest)
        (['w'], ['n'])

    Args:
      first: a filter.
      *filters: more filters.

    Returns:
      A State for one filter, else a tuple of States.
    """
    return split_state(self, first, *filters)

  def merge(self, *states):
    """One State with the leaves of this one and of ``states``; later states win on equal paths.

        >>> import arbax as nnx
        >>> a, b = nnx.State({'w': 1}), nnx.State({'n': 2, 'w': 3})
        >>> a.merge(b).to_pure_dict()
        {'w': 3, 'n': 2}

    Args:
      *states: States (or nested dicts) to merge in.

    Returns:
      A new State; the inputs are unchanged. ``a | b`` is ``a.merge(b)``.
    """
    return merge_state(self, *states)

  def map(self, f):
    """A State with ``f(path, leaf)`` at every path (see ``nnx.map_state``).

        >>> import arbax as nnx
        >>> nnx.State({'a': 1, 'b': 2}).map(lambda path, x: 10 * x).to_pure_dict()
        {'a': 10, 'b': 20}

    Args:
      f: ``f(path, leaf) -> new leaf``.

    Returns:
      A new State of the same paths.
    """
    return map_state(f, self)

  def __or__(self, other):
    return merge_state(self, other)

  def __sub__(self, other):
    """The entries of ``self`` whose paths are not in ``other``."""
    return diff(self, other)


# keys in insertion order -> keys in pytree (sorted) order
_KEY_ORDER = caches.bounded('State key orders', maxsize=4096)


def _sorted_keys(s) -> tuple:
  # States of one structure are flattened again and again (every jax.jit call over them):
  # sort each distinct key set once.
  keys = tuple(s)
  order = _KEY_ORDER.get(keys)
  if order is None:
    order = _KEY_ORDER[keys] = tuple(sorted(keys, key=_sort_key))
  return order


def _state_flatten(s):
  keys = _sorted_keys(s)
  return [s[k] for k in keys], keys


def _state_flatten_with_keys(s):
  keys = _sorted_keys(s)
  return [(jax.tree_util.DictKey(k), s[k]) for k in keys], keys


def _state_unflatten(keys, children):
  s = _blank(State)
  dict.update(s, zip(keys, children))
  return s


# A State made from entries that are already States or leaves needs no __init__ (nothing to
# convert): the builders and JAX's unflatten make them this way, on hot paths.
_blank = dict.__new__


jax.tree_util.register_pytree_with_keys(State, _state_flatten_with_keys, _state_unflatten,
                                        _state_flatten)


class GraphState(tp.MutableMapping):
  """A State bundled with the GraphDef of its object: what ``nnx.unpack`` returns.

  Reads and writes (``gs['kernel']``, ``gs.linear.kernel = ...``) go to the
  State; as a pytree its leaves are the State's and the GraphDef is static, so
  ``jax.tree.map`` and ``nnx.grad`` return GraphStates again. ``nnx.merge``
  takes GraphStates without a separate GraphDef.

      >>> import jax, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> params = nnx.unpack(model, nnx.Param)
      >>> halved = jax.tree.map(lambda x: x / 2, params)
      >>> type(halved).__name__, list(halved)
      ('GraphState', ['bias', 'kernel'])
      >>> nnx.merge(halved).kernel.shape
      (2, 3)

  Args:
    graphdef: the GraphDef of the object the State came from.
    state: the State.
  """

  __slots__ = ('_graphdef', '_state')

  def __init__(self, graphdef, state):
    if not isinstance(state, State):
      raise ValueError(f'GraphState expects a State, got a {type(state).__name__}.')
    object.__setattr__(self, '_graphdef', graphdef)
    object.__setattr__(self, '_state', state)

  def __getattr__(self, name):
    if name.startswith('__') or name in GraphState.__slots__:  # not set yet (e.g. unpickling)
      raise AttributeError(name)
    return getattr(self._state, name)

  def __setattr__(self, name, value):
    if name in GraphState.__slots__:
      object.__setattr__(self, name, value)
    else:
      setattr(self._state, name, value)

  def __getitem__(self, key):
    return self._state[key]

  def __setitem__(self, key, value):
    self._state[key] = value

  def __delitem__(self, key):
    del self._state[key]

  def __iter__(self):
    return iter(self._state)

  def __len__(self):
    return len(self._state)

  def __contains__(self, key):
    return key in self._state

  def __repr__(self):
    return f'GraphState({self._graphdef!r}, {self._state!r})'


def graph_state_parts(gs: GraphState) -> tuple:
  """``(graphdef, state)`` of a GraphState.

  Attribute access on a GraphState reads its State, so this is the way to get
  the two parts back.

      >>> import arbax as nnx
      >>> gs = nnx.unpack(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> graphdef, state = nnx.statelib.graph_state_parts(gs)
      >>> type(graphdef).__name__, list(state)
      ('GraphDef', ['bias', 'kernel'])

  Args:
    gs: a GraphState.

  Returns:
    The pair ``(graphdef, state)``.
  """
  return gs._graphdef, gs._state


def _graph_state_flatten_with_keys(gs):
  children, keys = _state_flatten_with_keys(gs._state)
  return children, (gs._graphdef, keys)


def _graph_state_flatten(gs):
  children, keys = _state_flatten(gs._state)
  return children, (gs._graphdef, keys)


def _graph_state_unflatten(aux, children):
  graphdef, keys = aux
  return GraphState(graphdef, _state_unflatten(keys, children))


jax.tree_util.register_pytree_with_keys(GraphState, _graph_state_flatten_with_keys,
                                        _graph_state_unflatten, _graph_state_flatten)


class FlatState(tp.Sequence):
  """A sequence of ``(path, leaf)`` pairs: a State without the nesting.

  Sorted by path unless ``sort=False``. ``.paths`` and ``.leaves`` are tuples;
  ``to_nested_state()`` nests it back. As a pytree its leaves are the leaves
  (the paths are static), so it passes through ``jax.jit``.

      >>> import arbax as nnx
      >>> flat = nnx.FlatState([(('b',), 1), (('a', 'w'), 2)])
      >>> flat.paths, flat.leaves, flat[0]
      ((('a', 'w'), ('b',)), (2, 1), (('a', 'w'), 2))
      >>> flat.to_nested_state().to_pure_dict()
      {'a': {'w': 2}, 'b': 1}

  Args:
    items: the ``(path, leaf)`` pairs.
    sort: sort them by path.
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
    """A FlatState of ``paths`` and ``leaves`` taken in the given order (no sorting).

    Args:
      paths: the paths, already in the wanted order.
      leaves: one leaf per path.

    Returns:
      The FlatState.
    """
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
    """The pairs each filter selects, one FlatState per filter (the first match wins).

    Pairs no filter matches are left out; the order is kept.

        >>> import arbax as nnx
        >>> flat = nnx.FlatState([(('w',), nnx.Param(1)), (('n',), nnx.BatchStat(2))])
        >>> flat.filter(nnx.Param).paths
        (('w',),)

    Args:
      first: a filter.
      *filters: more filters.

    Returns:
      A FlatState for one filter, else a tuple of FlatStates.
    """
    return self._grouped((first, *filters), strict=False)

  def split(self, first, /, *filters):
    """Partition the pairs by filters; every pair must match one (else a ValueError names its path).

        >>> import arbax as nnx
        >>> flat = nnx.FlatState([(('w',), nnx.Param(1)), (('n',), nnx.BatchStat(2))])
        >>> params, rest = flat.split(nnx.Param, ...)
        >>> params.paths, rest.paths
        ((('w',),), (('n',),))

    Args:
      first: a filter.
      *filters: more filters; end with ``...`` to catch the rest.

    Returns:
      A FlatState for one filter, else a tuple of FlatStates.
    """
    return self._grouped((first, *filters), strict=True)

  def _grouped(self, filters: tuple, strict: bool):
    groups = _partition(list(self), filterlib.filters_to_predicates(filters), strict=strict)
    out = tuple(FlatState(g, sort=False) for g in groups)
    return out[0] if len(out) == 1 else out

  def to_nested_state(self) -> State:
    """The nested State of these pairs (the inverse of ``State.flat_state``).

    Returns:
      A State.
    """
    return from_flat_state(self)

  @staticmethod
  def merge(flat_state: 'FlatState', /, *flat_states: 'FlatState') -> 'FlatState':
    """One FlatState of the pairs of all, sorted by path.

        >>> import arbax as nnx
        >>> a, b = nnx.FlatState([(('b',), 1)]), nnx.FlatState([(('a',), 2)])
        >>> nnx.FlatState.merge(a, b).paths
        (('a',), ('b',))

    Args:
      flat_state: a FlatState.
      *flat_states: more of them.

    Returns:
      The merged FlatState.
    """
    return FlatState(pair for fs in (flat_state, *flat_states) for pair in fs)


def _flat_state_unflatten(paths, leaves) -> FlatState:
  out = object.__new__(FlatState)
  out.paths, out.leaves = paths, tuple(leaves)
  return out


# A pytree whose leaves are the values (the paths are static), as NNX's: it passes through jax.jit.
jax.tree_util.register_pytree_node(FlatState, lambda fs: (fs.leaves, fs.paths),
                                   _flat_state_unflatten)


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
  """The ``(path, leaf)`` pairs of a nested State (or dict), sorted by path.

      >>> import arbax as nnx
      >>> nnx.to_flat_state({'b': 1, 'a': {'w': 2}}).paths
      (('a', 'w'), ('b',))

  Args:
    state: a State or nested dict.

  Returns:
    A FlatState.
  """
  return FlatState(_flat_items(state))


def flat_dict(state: tp.Mapping) -> dict:
  """``{path: leaf}`` in insertion order (no sorting): the fast internal view of a State.

      >>> import arbax as nnx
      >>> nnx.statelib.flat_dict({'b': 1, 'a': {'w': 2}})
      {('b',): 1, ('a', 'w'): 2}

  Args:
    state: a State or nested dict.

  Returns:
    A new dict.
  """
  return dict(_flat_items(state))


def from_flat_state(flat, *, cls=State) -> State:
  """Nest ``[(path, leaf)]`` pairs, a FlatState or a ``{path: leaf}`` dict into a State.

      >>> import arbax as nnx
      >>> nnx.from_flat_state({('a', 'w'): 2, ('b',): 1}).to_pure_dict()
      {'a': {'w': 2}, 'b': 1}

  Args:
    flat: the pairs.
    cls: the mapping type of every level (State).

  Returns:
    The nested State.
  """
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


def diff(state: tp.Mapping, other: tp.Mapping) -> State:
  """The entries of ``state`` whose paths are not in ``other`` (``state - other``).

      >>> import arbax as nnx
      >>> a, b = nnx.State({'w': 1, 'n': {'k': 2}}), nnx.State({'w': 3})
      >>> nnx.statelib.diff(a, b).to_pure_dict()
      {'n': {'k': 2}}

  Args:
    state: the State to take entries from.
    other: the State whose paths are dropped.

  Returns:
    A new State (``state`` itself when ``other`` is empty, as NNX).
  """
  if not other:
    return state if isinstance(state, State) else State(state)
  drop = set(flat_dict(other))
  return from_flat_state([(p, v) for p, v in _flat_items(state) if p not in drop])


def to_pure_dict(state: tp.Mapping) -> dict:
  """Plain nested dicts of raw values (Variables unwrapped): what checkpoints store.

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> pure = nnx.to_pure_dict(nnx.state(model))
      >>> type(pure).__name__, type(pure['kernel']).__name__
      ('dict', 'ArrayImpl')

  Args:
    state: a State or nested dict.

  Returns:
    A new nested dict; ``state`` is unchanged.
  """
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
  """Keys that are digit strings (as JSON and Orbax store them) become ints again.

      >>> import arbax as nnx
      >>> nnx.restore_int_paths({'layers': {'0': {'w': 1}, '1': {'w': 2}}})
      {'layers': {0: {'w': 1}, 1: {'w': 2}}}

  Args:
    pure_dict: nested dicts.

  Returns:
    A new nested dict with the same values.
  """
  out = {}
  for k, v in pure_dict.items():
    if isinstance(k, str) and k.isdigit():
      k = int(k)
    out[k] = restore_int_paths(v) if isinstance(v, dict) else v
  return out


def _default_replace(target, value):
  value = value.get_value() if isinstance(value, Variable) else value
  return target.replace(value) if isinstance(target, Variable) else value


def replace_by_pure_dict(state: tp.MutableMapping, pure_dict: tp.Mapping, replace_fn=None) -> None:
  """Put the raw values of ``pure_dict`` into ``state``, in place: how a checkpoint is loaded.

  Each Variable entry is replaced by a new Variable of the same kind and metadata
  holding the new value; the Variables ``state`` held (and the model they belong
  to) are not touched, so follow with ``nnx.update(model, state)``. Digit-string
  keys (from JSON checkpoints) match integer keys. A key that ``state`` lacks is
  a ValueError naming its path.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> state = nnx.state(model)
      >>> nnx.replace_by_pure_dict(state, {'bias': jnp.ones(3)})
      >>> nnx.update(model, state)
      >>> model.bias[...].tolist()
      [1.0, 1.0, 1.0]

  Args:
    state: the State to fill (a nested mapping).
    pure_dict: nested dicts of raw values, a subset of ``state``'s paths.
    replace_fn: ``replace_fn(old_leaf, value) -> new_leaf``; by default a copy of
      the Variable holding ``value`` (or ``value`` itself for a raw leaf).
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
      f'Non-exhaustive filters, got a non-empty remainder: the {type(leaf).__name__} at '
      f'{format_path(path)}{more} matched none of the filters {list(predicates)}. Add a filter '
      'for it, or end the filters with `...` to match all remaining elements.')


def _split_groups(state, filters, strict):
  predicates = filterlib.filters_to_predicates(filters)
  groups = _partition(list(_flat_items(state)), predicates, strict=strict)
  states = tuple(from_flat_state(g) for g in groups)
  return states[0] if len(states) == 1 else states


def filter_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """The parts of ``state`` each filter selects, one State per filter (the first match wins).

  Leaves no filter matches are left out; ``split_state`` requires every leaf to match.

      >>> import arbax as nnx
      >>> state = nnx.State({'w': nnx.Param(1.0), 'n': nnx.BatchStat(0)})
      >>> list(nnx.filter_state(state, nnx.BatchStat))
      ['n']

  Args:
    state: a State or nested dict.
    first: a filter.
    *filters: more filters.

  Returns:
    A State for one filter, else a tuple of States.
  """
  return _split_groups(state, (first, *filters), strict=False)


def split_state(state: tp.Mapping, first, /, *filters) -> State | tuple[State, ...]:
  """Partition ``state``: each leaf goes to the first filter that matches it.

  Every leaf must match one filter, else a ValueError names its path; end the
  filters with ``...`` to catch the rest.

      >>> import arbax as nnx
      >>> state = nnx.State({'w': nnx.Param(1.0), 'n': nnx.BatchStat(0)})
      >>> params, rest = nnx.split_state(state, nnx.Param, ...)
      >>> list(params), list(rest)
      (['w'], ['n'])

  Args:
    state: a State or nested dict.
    first: a filter.
    *filters: more filters.

  Returns:
    A State for one filter, else a tuple of States.
  """
  return _split_groups(state, (first, *filters), strict=True)


def merge_state(state: tp.Mapping, /, *states: tp.Mapping) -> State:
  """One State with the leaves of all; later states win on equal paths.

  The inverse of ``split_state``.

      >>> import arbax as nnx
      >>> params, rest = nnx.State({'w': 1}), nnx.State({'n': 2})
      >>> nnx.merge_state(params, rest).to_pure_dict()
      {'w': 1, 'n': 2}

  Args:
    state: a State or nested dict.
    *states: more of them.

  Returns:
    A new State.
  """
  merged = {}
  for s in (state, *states):
    merged.update(_flat_items(s))
  return from_flat_state(merged)


def map_state(f: tp.Callable[[tuple, tp.Any], tp.Any], state: tp.Mapping) -> State:
  """A State with ``f(path, leaf)`` at every path of ``state``.

      >>> import arbax as nnx
      >>> state = nnx.State({'w': nnx.Param(2.0)})
      >>> nnx.map_state(lambda path, v: v.replace(v[...] * 10), state)['w'][...]
      20.0

  Args:
    f: ``f(path, leaf) -> new leaf``.
    state: a State or nested dict.

  Returns:
    A new State of the same paths.
  """
  return from_flat_state({p: f(p, v) for p, v in _flat_items(state)})


# -- skeletons: the fast path of split / merge / update ------------------------
# A skeleton is ((key, sub), ...) where sub is None for a leaf or a skeleton.


_SKELETON_LEVELS = caches.bounded('State skeleton levels', maxsize=4096)


def skeleton(paths: tp.Iterable[tuple]) -> tuple:
  """The key structure of the State that ``from_flat_state`` would build from ``paths``."""
  root: dict = {}
  for path in paths:
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = None

  # Frozen bottom-up on an explicit stack: frames are [items left, frozen items, key in parent].
  stack = [[iter(root.items()), [], None]]
  while True:
    frame = stack[-1]
    for k, sub in frame[0]:
      if sub is None:
        frame[1].append((k, None))
      else:
        stack.append([iter(sub.items()), [], k])
        break
    else:
      stack.pop()
      frozen = tuple(frame[1])
      # Equal levels (every Linear's) share one tuple, as their builders do.
      frozen = _SKELETON_LEVELS.setdefault(frozen, frozen)
      if not stack:
        return frozen
      stack[-1][1].append((frame[2], frozen))


def build_state(skel: tuple, leaves: tp.Iterator) -> State:
  """A fresh State of shape ``skel`` filled from ``leaves`` (an iterator, in skeleton order)."""
  s = _blank(State)
  for k, sub in skel:
    s[k] = next(leaves) if sub is None else build_state(sub, leaves)
  return s


_LEAF_LEVELS = caches.bounded('State leaf-level builders', maxsize=4096)


def _leaf_level(keys: tuple) -> tp.Callable[[tp.Iterator], State]:
  n = len(keys)

  def leaf_level(it):
    s = _blank(State)
    dict.update(s, zip(keys, islice(it, n)))
    return s
  return leaf_level


def compile_builder(skel: tuple) -> tp.Callable[[tp.Iterator], State]:
  """``build_state`` for one skeleton, compiled: a level of leaves is one ``State(zip(...))``."""
  keys = tuple(k for k, _ in skel)
  if all(sub is None for _, sub in skel):
    # Levels of leaves repeat (every Linear is ``(('bias', None), ('kernel', None))``): one
    # builder per key tuple serves them all, so a model of N layers does not hold N of them.
    leaf_level = _LEAF_LEVELS.get(keys)
    if leaf_level is None:
      leaf_level = _LEAF_LEVELS[keys] = _leaf_level(keys)
    return leaf_level
  parts = tuple((k, None if sub is None else compile_builder(sub)) for k, sub in skel)

  def branch_level(it):
    s = _blank(State)
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
    fetch: tp.Callable[[tp.Any], tuple]
    if n == 1:
      key = keys[0]

      def fetch_one(d):
        return (d[key],)
      fetch = fetch_one  # itemgetter of one key returns the value, not a 1-tuple
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


__all__ = ['create_path_filters', 'graph_state_parts', 'State', 'GraphState', 'FlatState',
           'to_flat_state', 'from_flat_state', 'flat_dict', 'to_pure_dict',
           'replace_by_pure_dict', 'filter_state', 'split_state', 'merge_state', 'map_state', 'diff',
           'restore_int_paths']


def create_path_filters(state: tp.Mapping) -> dict:
  """``{nnx.PathIn(*paths): value}``: one exact-path filter per distinct value of ``state``.

  A Variable counts as its value. Turns a State of per-leaf values (shardings,
  axes) into the ``{filter: value}`` form ``StateSharding`` / ``StateAxes`` take.

      >>> import arbax as nnx
      >>> nnx.statelib.create_path_filters({'a': 0, 'b': {'c': 0, 'd': 1}})
      {PathIn(('a',), ('b', 'c')): 0, PathIn(('b', 'd')): 1}

  Args:
    state: a State (or nested dict) whose leaves are the values.

  Returns:
    A dict from PathIn filters to values.
  """
  by_value: dict = {}
  for path, value in to_flat_state(state):
    if isinstance(value, Variable):
      value = value.get_value()
    key = _hashable_key(value)
    by_value.setdefault(key, (value, []))[1].append(path)
  return {filterlib.PathIn(*paths): value for value, paths in by_value.values()}


def _hashable_key(value):
  try:
    hash(value)
    return value
  except TypeError:
    return ('unhashable', id(value))

