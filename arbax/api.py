"""The functional State API: split, merge, state, update, clone, pop and friends.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    ...     self.n = nnx.BatchStat(jnp.zeros(()))
    >>> graphdef, params, rest = nnx.split(Foo(), nnx.Param, ...)
    >>> list(params), list(rest)
    (['w'], ['n'])
    >>> foo = nnx.merge(graphdef, params, rest)

``split`` and ``state`` return the object's own Variables (no copies), so a
State is a live view; ``merge`` builds new Pytrees around them (``copy=True``
copies them too) and ``update`` writes values into existing Variables.
"""
from __future__ import annotations

import typing as tp

from arbax import _settings
from arbax import filters as filterlib
from arbax.errors import format_path
from arbax.graph import GraphDef, flatten as _flatten, unflatten as _unflatten, Flattened
from arbax.pytree import Pytree, attributes
from arbax.state import FlatState, State, flat_dict, from_flat_state, _partition
from arbax.variables import Variable


def _states_by_filter(fl: Flattened, filters, *, strict: bool) -> tuple[State, ...]:
  items = list(zip(fl.paths, fl.leaves))
  if not filters:
    return (from_flat_state(items),)
  groups, _ = _partition(items, filterlib.filters_to_predicates(filters), strict=strict)
  return tuple(from_flat_state(g) for g in groups)


def split(node, *filters, graph: bool | None = None):
  """``(GraphDef, State, ...)``: one State per filter; each leaf goes to the first filter matching it.

  A Variable that no filter matches raises a ValueError naming its path; end
  the filters with ``...`` to catch the rest.
  """
  fl = _flatten(node, graph=graph, context='tree-mode split')
  return (fl.graphdef, *_states_by_filter(fl, filters, strict=True))


def graphdef(node, *, graph: bool | None = None) -> GraphDef:
  """The GraphDef of ``node`` (its structure, no state)."""
  return _flatten(node, graph=graph, context='tree-mode graphdef').graphdef


def _merged_leaves(graphdef: GraphDef, states) -> list:
  flat: dict = {}
  for s in states:
    if isinstance(s, Variable) or not isinstance(s, dict):
      raise TypeError(f'merge expects State objects after the GraphDef, got {type(s).__name__}')
    flat.update(flat_dict(s))
  leaves = []
  for path in graphdef.leaf_paths:
    try:
      leaves.append(flat.pop(path))
    except KeyError:
      raise ValueError(f'merge: the states have no value for {format_path(path)}, which the '
                       'GraphDef needs. Pass every State that split returned.') from None
  if flat:
    extra = next(iter(flat))
    raise ValueError(f'merge: the states have a value at {format_path(extra)} that the GraphDef '
                     'has no place for. Was the State made from another structure?')
  return leaves


def merge(graphdef: GraphDef, *states, copy: bool = False):
  """Build an object from a GraphDef and the States ``split`` returned."""
  if isinstance(graphdef, tuple) and len(graphdef) == 2 and isinstance(graphdef[0], GraphDef):
    graphdef, states = graphdef[0], (graphdef[1], *states)
  if not isinstance(graphdef, GraphDef):
    raise TypeError(f'merge expects a GraphDef first, got {type(graphdef).__name__}')
  return _unflatten(graphdef, _merged_leaves(graphdef, states), copy_variables=copy)


def state(node, *filters, graph: bool | None = None):
  """The State of ``node`` (any pytree of objects): one State per filter, the live Variables."""
  fl = _flatten(node, graph=graph, context='tree-mode state')
  states = _states_by_filter(fl, filters, strict=False)
  return states[0] if len(states) == 1 else states


def variables(node, *filters, graph: bool | None = None):
  """Like ``state`` but only Variables (raw array attributes left out)."""
  fl = _flatten(node, graph=graph, context='tree-mode variables')
  keep = [i for i, leaf in enumerate(fl.leaves) if isinstance(leaf, Variable)]
  fl = Flattened(fl.graphdef, [fl.leaves[i] for i in keep], [fl.paths[i] for i in keep], fl.nodes)
  states = _states_by_filter(fl, filters, strict=False)
  return states[0] if len(states) == 1 else states


def update(node, *states) -> None:
  """Write the values of ``states`` into the Variables of ``node`` in place.

  Accepts what ``state`` / ``split`` returned for the same structure
  (``nnx.update((model, optimizer), nnx.state((model, optimizer)))``).
  """
  fl = _flatten(node, graph=True)
  index = {path: i for i, path in enumerate(fl.paths)}
  for s in states:
    if isinstance(s, Variable) or not isinstance(s, dict):
      raise TypeError(f'update expects State objects, got {type(s).__name__}')
    for path, new in flat_dict(s).items():
      i = index.get(path)
      if i is None:
        raise ValueError(f'update: {format_path(path)} is not a Variable or array of the target '
                         f'{type(node).__name__}. Was the State made from another structure?')
      target = fl.leaves[i]
      value = new.get_value() if isinstance(new, Variable) else new
      if isinstance(target, Variable):
        target.set_value(value)
      else:
        _set_by_path(node, path, value)


def _child(obj, key):
  if isinstance(obj, Pytree) and not isinstance(key, int) and not hasattr(type(obj), '__getitem__'):
    return getattr(obj, key)
  return obj[key]


def _set_by_path(root, path, value):
  parent = root
  for k in path[:-1]:
    parent = _child(parent, k)
  key = path[-1]
  if isinstance(parent, Pytree) and isinstance(key, str) and not hasattr(type(parent), '__setitem__'):
    setattr(parent, key, value)
  else:
    parent[key] = value


def clone(node, *, graph: bool | None = None):
  """A deep copy of the object's structure with new Variables (current trace, same values)."""
  fl = _flatten(node, graph=_settings.graph_mode(graph) or True)
  return _unflatten(fl.graphdef, fl.leaves, copy_variables=True)


def pop(node, *filters):
  """Remove the Variables matching ``filters`` from ``node`` and return them as State(s)."""
  fl = _flatten(node, graph=True)
  items = [(p, v) for p, v in zip(fl.paths, fl.leaves)]
  groups, _ = _partition(items, filterlib.filters_to_predicates(filters), strict=False)
  for group in groups:
    for path, _ in group:
      parent = node
      for k in path[:-1]:
        parent = _child(parent, k)
      key = path[-1]
      if isinstance(parent, Pytree) and isinstance(key, str) and not hasattr(type(parent), '__delitem__'):
        delattr(parent, key)
      else:
        del parent[key]
  states = tuple(from_flat_state(g) for g in groups)
  return states[0] if len(states) == 1 else states


def iter_graph(node, *, graph: bool = True) -> tp.Iterator[tuple[tuple, tp.Any]]:
  """Every Pytree, Variable and array in ``node`` once, with its path; children before parents."""
  seen: set = set()

  def visit(x, path):
    if isinstance(x, (Variable, Pytree)):
      if id(x) in seen:
        return
      seen.add(id(x))
    if isinstance(x, Pytree):
      for k, v, is_data in attributes(x):
        if is_data:
          yield from visit(v, path + (k,))
      yield path, x
    elif isinstance(x, (list, tuple)):
      for i, v in enumerate(x):
        yield from visit(v, path + (i,))
    elif isinstance(x, dict):
      for k, v in x.items():
        yield from visit(v, path + (k,))
    elif isinstance(x, Variable) or hasattr(x, 'shape'):
      yield path, x

  yield from visit(node, ())


def find_duplicates(node) -> list[list[tuple]]:
  """Groups of paths that reach the same Variable or Pytree (shared references)."""
  paths_by_id: dict = {}

  def visit(x, path):
    if isinstance(x, (Variable, Pytree)):
      first = id(x) not in paths_by_id
      paths_by_id.setdefault(id(x), []).append(path)
      if not first:
        return
    if isinstance(x, Pytree):
      for k, v, is_data in attributes(x):
        if is_data:
          visit(v, path + (k,))
    elif isinstance(x, (list, tuple)):
      for i, v in enumerate(x):
        visit(v, path + (i,))
    elif isinstance(x, dict):
      for k, v in x.items():
        visit(v, path + (k,))

  visit(node, ())
  return [paths for paths in paths_by_id.values() if len(paths) > 1]


def recursive_map(f: tp.Callable[[tuple, tp.Any], tp.Any], node, *, graph: bool = True):
  """Rebuild ``node`` bottom-up with ``f(path, x)`` applied to every Variable and Pytree."""
  g, st = split(node, graph=graph)
  new = merge(g, st, copy=True)
  done: dict = {}

  def visit(x, path):
    if isinstance(x, (Variable, Pytree)) and id(x) in done:
      return done[id(x)]
    if isinstance(x, Pytree):
      for k, v, is_data in attributes(x):
        if is_data:
          x.__dict__[k] = visit(v, path + (k,))
      x.__dict__['_arbax_cache'] = None
    elif isinstance(x, (list, tuple)):
      x = type(x)(visit(v, path + (i,)) for i, v in enumerate(x))
    elif isinstance(x, dict):
      x = type(x)({k: visit(v, path + (k,)) for k, v in x.items()})
    if isinstance(x, (Variable, Pytree)):
      out = f(path, x)
      done[id(x)] = out
      return out
    return x

  return visit(new, ())


def flatten(node, *, graph: bool | None = None) -> tuple[GraphDef, FlatState]:
  """``(GraphDef, FlatState)``: the structure and the ``(path, leaf)`` pairs in pytree order."""
  fl = _flatten(node, graph=graph, context='tree-mode flatten')
  return fl.graphdef, FlatState(zip(fl.paths, fl.leaves), sort=False)


def unflatten(graphdef: GraphDef, flat_state, *, copy: bool = False):
  """Inverse of ``flatten``: accepts a FlatState, ``[(path, leaf)]`` or a list of leaves."""
  if isinstance(flat_state, FlatState):
    leaves = list(flat_state.leaves)
  elif isinstance(flat_state, dict):
    return merge(graphdef, flat_state, copy=copy)
  else:
    items = list(flat_state)
    if items and isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][0], tuple):
      leaves = [v for _, v in items]
    else:
      leaves = items
  if len(leaves) != len(graphdef.leaf_paths):
    raise ValueError(f'unflatten: the GraphDef needs {len(graphdef.leaf_paths)} leaves, got {len(leaves)}')
  return _unflatten(graphdef, leaves, copy_variables=copy)
