"""``split_inputs`` / ``merge_inputs``: use any plain JAX transform on a function of Modules.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> from arbax.transforms import general
    >>> class Counter(nnx.Module):
    ...   def __init__(self):
    ...     self.n = nnx.BatchStat(jnp.array(0))
    >>> @general.split_inputs
    ... @jax.jit
    ... @general.merge_inputs
    ... def bump(c, k):
    ...   c.n[...] += k
    >>> c = Counter(); bump(c, 2); bump(c, 3)
    >>> int(c.n[...])
    5

``split_inputs(f)`` turns every argument holding objects into an ``ArgTree``, a
pytree whose leaves are the argument's state values, calls ``f`` with them and
writes the state that comes back into the caller's objects. ``merge_inputs(g)``
is the inside: it rebuilds the objects from the ``ArgTree`` s, calls ``g`` and
returns ``(arguments, output)`` as pytrees again. Between the two, any JAX
transform may run (``jax.jit``, ``jax.vmap`` with ``out_axes=(in_axes, ...)``,
``jax.lax.cond``, ...). Objects shared between arguments stay shared.

Only values travel back: an object whose structure changes inside (a new
attribute, a new Variable) raises a ValueError; use the ``nnx`` transforms for that.
"""
from __future__ import annotations

import functools
import typing as tp

import jax

from arbax.graph import GraphDef, flatten, unflatten
from arbax.pytree import Pytree
from arbax.variables import Variable

__all__ = ['ArgTree', 'split_inputs', 'merge_inputs']


class ArgTree:
  """One argument of a split call, as a pytree: its state values are the leaves.

  The GraphDef of all the split arguments together and which argument this
  is are static data, so a JAX transform sees only arrays.

      >>> import jax, arbax as nnx
      >>> from arbax.transforms import general
      >>> @general.split_inputs
      ... def show(*args):                 # what a transform between the two sees
      ...   print(args[0], jax.tree.leaves(args[0])[0].shape)
      ...   return args, None
      >>> show(nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0)))
      ArgTree(position=0, num_leaves=1) (2, 3)

  Args:
    graphdef: the GraphDef of all split arguments.
    position: which of them this is.
    leaves: its state values.
  """

  __slots__ = ('graphdef', 'position', 'leaves')

  def __init__(self, graphdef: GraphDef, position: int, leaves: list):
    self.graphdef = graphdef
    self.position = position
    self.leaves = leaves

  def __repr__(self):
    return f'ArgTree(position={self.position}, num_leaves={len(self.leaves)})'


jax.tree_util.register_pytree_node(
    ArgTree, lambda t: (t.leaves, (t.graphdef, t.position)),
    lambda aux, leaves: ArgTree(aux[0], aux[1], list(leaves)))


def _holds_objects(x) -> bool:
  leaves = jax.tree_util.tree_leaves(x, is_leaf=lambda y: isinstance(y, (Variable, Pytree)))
  return any(isinstance(leaf, (Variable, Pytree)) for leaf in leaves)


def _raw(x):
  return x._value if isinstance(x, Variable) else x


def _split(args: tuple) -> tuple[tuple, list, list]:
  """``(arguments with ArgTrees, the leaves of the split arguments, (argument, start, stop)
  per split argument)``."""
  positions = [i for i, a in enumerate(args) if _holds_objects(a)]
  if not positions:
    return args, [], []
  fl = flatten(tuple(args[i] for i in positions), graph=True)
  bounds: dict = {}
  for k, path in enumerate(fl.paths):
    bounds.setdefault(path[0], [k, k])[1] = k + 1
  out = list(args)
  spans = []
  for j, i in enumerate(positions):
    a, b = bounds.get(j, (0, 0))
    spans.append((j, a, b))
    out[i] = ArgTree(fl.graphdef, j, [_raw(x) for x in fl.leaves[a:b]])
  return tuple(out), fl.leaves, spans


def _merge(args: tuple) -> tuple:
  """The arguments with their ArgTrees rebuilt into objects (shared ones rebuilt once)."""
  trees = [(i, a) for i, a in enumerate(args) if isinstance(a, ArgTree)]
  if not trees:
    return args
  graphdef = trees[0][1].graphdef
  leaves = [x for _, t in sorted(trees, key=lambda p: p[1].position) for x in t.leaves]
  objects = unflatten(graphdef, leaves)
  out = list(args)
  for i, t in trees:
    out[i] = objects[t.position]
  return tuple(out)


def merge_inputs(f: tp.Callable) -> tp.Callable:
  """The inside of ``split_inputs``: ``f`` on rebuilt objects, returning ``(arguments, output)``.

  The arguments come back with their new state as ArgTrees, so a JAX transform
  between ``split_inputs`` and ``merge_inputs`` returns them like any pytree.
  A change of structure inside ``f`` is a ValueError.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> from arbax.transforms import general
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> forward = general.split_inputs(jax.vmap(
      ...     general.merge_inputs(lambda m, x: m(x)),
      ...     in_axes=(None, 0), out_axes=((None, 0), 0)))    # model broadcast, x mapped
      >>> forward(model, jnp.ones((5, 2))).shape
      (5, 3)

  Args:
    f: the function of objects.

  Returns:
    A function of ArgTrees (and other arguments) returning ``(arguments, output)``.
  """

  @functools.wraps(f)
  def merged(*args):
    objects = _merge(args)
    out = f(*objects)
    if not any(isinstance(a, ArgTree) for a in args):
      return args, out
    positions = [i for i, a in enumerate(args) if isinstance(a, ArgTree)]
    graphdef = args[positions[0]].graphdef
    fl = flatten(tuple(objects[i] for i in positions), graph=True)
    if fl.graphdef != graphdef:
      raise ValueError('general.merge_inputs: the structure of the arguments changed inside the '
                       f'function (it was {graphdef}, it is now {fl.graphdef}). split_inputs / '
                       'merge_inputs carry values only; use the nnx transforms (nnx.jit, '
                       'nnx.vmap, nnx.cond, ...) for functions that add or replace attributes.')
    new_args, _, _ = _split(tuple(objects[i] if isinstance(a, ArgTree) else a
                                  for i, a in enumerate(args)))
    return new_args, _split((out,))[0][0]

  return merged


def split_inputs(f: tp.Callable) -> tp.Callable:
  """The outside of ``merge_inputs``: split the objects in the arguments into ArgTrees, call ``f``.

  ``f`` (a JAX transform of a ``merge_inputs`` function) returns ``(arguments,
  output)``; the state of the returned arguments is written into the caller's
  objects, so updates made inside reach them.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> from arbax.transforms import general
      >>> class Counter(nnx.Module):
      ...   def __init__(self):
      ...     self.n = nnx.BatchStat(jnp.array(0))
      >>> @general.split_inputs
      ... @jax.jit
      ... @general.merge_inputs
      ... def bump(c, k):
      ...   c.n[...] += k
      >>> c = Counter(); bump(c, 2); bump(c, 3)
      >>> int(c.n[...])
      5

  Args:
    f: a function of ArgTrees returning ``(arguments, output)``.

  Returns:
    A function of the objects returning the output.
  """

  @functools.wraps(f)
  def split(*args):
    split_args, leaves, spans = _split(args)
    result = f(*split_args)
    if not (isinstance(result, tuple) and len(result) == 2):
      raise TypeError('general.split_inputs: the function must return (arguments, output), as a '
                      'merge_inputs function does; got '
                      f'{type(result).__name__}.')
    new_args, out = result
    returned = {t.position: t for t in jax.tree_util.tree_leaves(
        new_args, is_leaf=lambda x: isinstance(x, ArgTree)) if isinstance(t, ArgTree)}
    for j, a, b in spans:
      tree = returned.get(j)
      if tree is None:
        continue
      for target, value in zip(leaves[a:b], tree.leaves):
        if isinstance(target, Variable) and value is not target._value:
          object.__setattr__(target, '_value', value)
    return _merge((out,))[0]

  return split
