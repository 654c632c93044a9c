"""Split/merge contexts: several splits (or merges) sharing one index space, and the update
context that carries object identity and structure across a transform you write yourself.

    >>> import jax, arbax as nnx
    >>> class Foo(nnx.Module): pass
    >>> m = Foo()
    >>> with nnx.update_context('demo'):
    ...   with nnx.split_context('demo') as ctx:          # (1) outside
    ...     graphdef, state = ctx.split(m)
    ...   @jax.jit
    ...   def f(graphdef, state):
    ...     with nnx.merge_context('demo', True) as ctx:   # (2) inside
    ...       inner = ctx.merge(graphdef, state)
    ...     inner.me = inner                              # any change, structure included
    ...     with nnx.split_context('demo') as ctx:         # (3) inside
    ...       return ctx.split(inner)
    ...   graphdef, state = f(graphdef, state)
    ...   with nnx.merge_context('demo', False) as ctx:    # (4) outside
    ...     out = ctx.merge(graphdef, state)
    >>> out is m and m.me is m
    True

Within one ``split_context`` every ``ctx.split`` continues the same index
space, so an object split twice is stored once (the second GraphDef is a
``NodeRef``); the matching ``merge_context`` rebuilds the sharing when the
GraphDefs are merged in the same order.

An ``update_context(tag)`` links the four steps above: (1) records which outer
object has which index; (2) records which inner object stands for which outer
index; (3) writes those outer indices into the GraphDefs it makes; (4) finds
the outer objects by them and updates them in place (attributes, static
values and Variables), creating only what is new. The maps are dropped when
they are no longer needed and when the context exits.
"""
from __future__ import annotations

import contextlib
import threading
import typing as tp

import jax

from arbax.api import group_states, merged_leaves
from arbax.refmaps import IndexMap, RefMap, flatten_indexed, unflatten_indexed
from arbax.state import FlatState


class _Stacks(threading.local):
  def __init__(self):
    self.update: dict[tp.Hashable, list[UpdateContext]] = {}


_STACKS = _Stacks()


class UpdateContext:
  """The bookkeeping of one ``update_context``: the maps between outer and inner objects.

  ``outer_ref_outer_index`` / ``outer_index_outer_ref``: outer objects and their
  indices, from step (1). ``outer_index_inner_ref`` / ``inner_ref_outer_index``:
  the inner objects that stand for them, from step (2), dropped after step (3).
  Opaque to JAX: all UpdateContexts are equal, so passing one as a static
  argument does not retrace.

      >>> import arbax as nnx
      >>> with nnx.update_context('step') as ctx:
      ...   ctx, nnx.current_update_context('step') is ctx
      (UpdateContext(tag='step'), True)

  Args:
    tag: the tag of the ``update_context`` that made it.
  """

  def __init__(self, tag: tp.Hashable):
    self.tag = tag
    self.outer_ref_outer_index: RefMap | None = None
    self.outer_index_outer_ref: IndexMap | None = None
    self.outer_index_inner_ref: IndexMap | None = None
    self.inner_ref_outer_index: RefMap | None = None

  def __hash__(self):
    return 0

  def __eq__(self, other):
    return isinstance(other, UpdateContext)

  def __repr__(self):
    return f'UpdateContext(tag={self.tag!r})'

  def flatten_end(self, ref_index: RefMap) -> None:
    """A split context of this tag exited: step (1) if it is the first, else step (3).

    Args:
      ref_index: the object -> index map that split context built.
    """
    if self.outer_ref_outer_index is None:
      self.outer_ref_outer_index = ref_index
      self.outer_index_outer_ref = IndexMap.from_refmap(ref_index)
    else:
      self.outer_index_inner_ref = None
      self.inner_ref_outer_index = None

  def unflatten_end(self, index_ref: IndexMap, inner: bool) -> None:
    """A merge context of this tag exited: step (2) records the inner objects.

    Args:
      index_ref: the index -> object map that merge context built.
      inner: whether it ran inside the transform (step 2) or outside (step 4).
    """
    if inner:
      self.outer_index_inner_ref = index_ref
      self.inner_ref_outer_index = RefMap.from_indexmap(index_ref)

  def clear(self) -> None:
    """Drop every map (the context exited)."""
    self.outer_ref_outer_index = self.outer_index_outer_ref = None
    self.outer_index_inner_ref = self.inner_ref_outer_index = None


jax.tree_util.register_static(UpdateContext)


class update_context(contextlib.ContextDecorator):
  """Open an ``UpdateContext`` for ``tag``: a ``with`` block, or a decorator (fresh per call).

  It links the split and merge contexts of the same tag around a transform you
  write, so the objects come out updated in place (see the module docstring
  for the four steps).

      >>> import arbax as nnx
      >>> @nnx.update_context('train')
      ... def step():
      ...   return nnx.current_update_context('train')
      >>> step() is not step()          # a fresh context each call
      True

  Args:
    tag: any hashable; split/merge contexts and ``current_update_context`` find the
      context by it (contexts of one tag nest).
  """

  def __init__(self, tag: tp.Hashable):
    self.tag = tag

  def __enter__(self) -> UpdateContext:
    ctx = UpdateContext(self.tag)
    _STACKS.update.setdefault(self.tag, []).append(ctx)
    return ctx

  def __exit__(self, *exc):
    stack = _STACKS.update[self.tag]
    stack.pop().clear()
    if not stack:
      del _STACKS.update[self.tag]
    return False


def current_update_context(tag: tp.Hashable) -> UpdateContext:
  """The innermost open ``UpdateContext`` of ``tag``; a ValueError if there is none.

      >>> import arbax as nnx
      >>> with nnx.update_context('outer') as ctx:
      ...   nnx.current_update_context('outer') is ctx
      True

  Args:
    tag: the tag given to ``update_context``.

  Returns:
    The UpdateContext.
  """
  stack = _STACKS.update.get(tag)
  if not stack:
    raise ValueError(f'No update context found for tag {tag!r}. Open one with '
                     f'`with nnx.update_context({tag!r}):` around the split and merge contexts.')
  return stack[-1]


def _update_context_of(tag):
  return None if tag is None else current_update_context(tag)


class SplitContext:
  """What ``split_context`` yields: ``split`` and ``flatten`` sharing one index space.

      >>> import arbax as nnx
      >>> with nnx.split_context() as ctx:
      ...   type(ctx).__name__, len(ctx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
      ('SplitContext', 2)

  Args:
    ctxtag: the ``update_context`` tag, or None.
    ref_index: the object -> index map the splits continue.
    is_inner: which side of a transform it is on (None without a tag).
  """

  def __init__(self, ctxtag: tp.Hashable | None, ref_index: RefMap, is_inner: bool | None):
    self.ctxtag = ctxtag
    self.ref_index = ref_index
    self.is_inner = is_inner

  def _flatten(self, node):
    ctx = _update_context_of(self.ctxtag)
    outer = ctx.inner_ref_outer_index if ctx is not None else None
    return flatten_indexed(node, self.ref_index, outer, context='split_context')

  def split(self, node, *filters):
    """``nnx.split`` in graph mode, continuing this context's index space.

    An object already split in this context becomes a ref (a ``NodeRef``
    GraphDef, an empty State).

        >>> import arbax as nnx
        >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> with nnx.split_context() as ctx:
        ...   _, first = ctx.split(model)
        ...   _, again = ctx.split(model)
        >>> list(first), list(again)
        (['bias', 'kernel'], [])

    Args:
      node: the object.
      *filters: as for ``nnx.split``.

    Returns:
      ``(graphdef, state, ...)``, one State per filter.
    """
    fl = self._flatten(node)
    return (fl.graphdef, *group_states(fl, filters, strict=True))

  def flatten(self, node, *filters, with_paths: bool = True):
    """``nnx.flatten`` in this context: ``(graphdef, flat_state, ...)``, one FlatState per filter.

    Args:
      node: the object.
      *filters: group the leaves, as for ``nnx.split`` (needs the paths).
      with_paths: False returns ``(graphdef, leaves)``, a plain list.

    Returns:
      ``(graphdef, flat_state, ...)`` or ``(graphdef, leaves)``.
    """
    if filters and not with_paths:
      raise ValueError('flatten: filters need the paths; drop with_paths=False.')
    fl = self._flatten(node)
    if not with_paths:
      return fl.graphdef, list(fl.leaves)
    flat = FlatState(zip(fl.paths, fl.leaves), sort=False)
    if not filters:
      return fl.graphdef, flat
    groups = flat.split(*filters)
    return (fl.graphdef, *(groups if isinstance(groups, tuple) else (groups,)))


@contextlib.contextmanager
def split_context(ctxtag: tp.Hashable | None = None):
  """A ``SplitContext`` whose splits share one index space (a ``with`` block).

  With ``ctxtag``, it is a step of the ``update_context`` of that tag: the
  first split context is step (1), the next one step (3).

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> with nnx.split_context() as ctx:
      ...   pair_a = ctx.split(model)
      ...   pair_b = ctx.split(model)         # the same object: stored once
      >>> with nnx.merge_context() as ctx:
      ...   a, b = ctx.merge(*pair_a), ctx.merge(*pair_b)
      >>> a is b
      True

  Args:
    ctxtag: the tag of an open ``update_context``, or None.

  Yields:
    The SplitContext; its maps are dropped when the block exits.
  """
  ctx = _update_context_of(ctxtag)
  is_inner = None if ctx is None else ctx.outer_ref_outer_index is not None
  split_ctx = SplitContext(ctxtag, RefMap(), is_inner)
  try:
    yield split_ctx
  finally:
    if ctxtag is not None:
      current_update_context(ctxtag).flatten_end(split_ctx.ref_index)
    del split_ctx.ref_index, split_ctx.ctxtag


class MergeContext:
  """What ``merge_context`` yields: ``merge`` and ``unflatten`` sharing one index space.

      >>> import arbax as nnx
      >>> pair = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> with nnx.merge_context() as ctx:
      ...   type(ctx).__name__, type(ctx.merge(*pair)).__name__
      ('MergeContext', 'Linear')

  Args:
    ctxtag: the ``update_context`` tag, or None.
    index_ref: the index -> object map the merges continue.
    is_inner: which side of a transform it is on (None without a tag).
  """

  def __init__(self, ctxtag: tp.Hashable | None, index_ref: IndexMap, is_inner: bool | None):
    self.ctxtag = ctxtag
    self.index_ref = index_ref
    self.is_inner = is_inner

  def _build(self, graphdef, leaves):
    ctx = _update_context_of(self.ctxtag)
    outer = ctx.outer_index_outer_ref if ctx is not None else None
    return unflatten_indexed(graphdef, leaves, self.index_ref, outer, copy_variables=True)

  def merge(self, graphdef, state, /, *states):
    """``nnx.merge`` in this context: refs resolve to objects merged before in it.

    In step (4) of an update context, objects from outside are updated in place
    instead of created. The Variables are copies.

    Args:
      graphdef: a GraphDef from the matching split context.
      state: its State.
      *states: more States.

    Returns:
      The object.
    """
    return self._build(graphdef, merged_leaves(graphdef, (state, *states)))

  def unflatten(self, graphdef, flat_state, /, *flat_states):
    """``merge`` for FlatStates (or one list of leaves) as ``SplitContext.flatten`` returned.

    Args:
      graphdef: a GraphDef from the matching split context.
      flat_state: a FlatState, or a list of leaves.
      *flat_states: more FlatStates.

    Returns:
      The object.
    """
    if isinstance(flat_state, list):
      if flat_states:
        raise ValueError('unflatten: a list of leaves must be the only state passed.')
      return self._build(graphdef, flat_state)
    return self._build(graphdef, merged_leaves(graphdef, (flat_state, *flat_states)))


@contextlib.contextmanager
def merge_context(ctxtag: tp.Hashable | None = None, inner: bool | None = None):
  """A ``MergeContext`` whose merges share one index space (a ``with`` block).

  With ``ctxtag``, it is a step of the ``update_context`` of that tag:
  ``inner=True`` is step (2) (inside the transform), ``inner=False`` step (4).

      >>> import arbax as nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> with nnx.split_context() as ctx:
      ...   graphdef, flat = ctx.flatten(model)
      >>> with nnx.merge_context() as ctx:
      ...   copy = ctx.unflatten(graphdef, flat)
      >>> type(copy).__name__, copy.kernel is model.kernel     # Variables are copied
      ('Linear', False)

  Args:
    ctxtag: the tag of an open ``update_context``, or None.
    inner: with ``ctxtag``, which side of the transform (required).

  Yields:
    The MergeContext; its maps are dropped when the block exits.
  """
  if ctxtag is not None and inner is None:
    raise ValueError('merge_context: with a ctxtag, say which side it is: inner=True inside the '
                     'transform (step 2), inner=False outside (step 4).')
  merge_ctx = MergeContext(ctxtag, IndexMap(), inner)
  try:
    yield merge_ctx
  finally:
    if ctxtag is not None:
      current_update_context(ctxtag).unflatten_end(merge_ctx.index_ref, bool(inner))
    del merge_ctx.index_ref, merge_ctx.ctxtag


__all__ = ['UpdateContext', 'update_context', 'current_update_context', 'SplitContext',
           'split_context', 'MergeContext', 'merge_context']
