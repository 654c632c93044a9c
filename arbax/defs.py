"""The defs a GraphDef is made of: one small named tuple per kind of thing ``graph.flatten`` meets.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> from arbax import defs
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    ...     self.n = 3
    >>> root = nnx.graphdef(Foo()).root
    >>> root.tag == defs.NODE, root.cls.__name__, [key for key, _ in root.entries()]
    (True, 'Foo', ['w'])
    >>> root.entries()[0][1].cls.__name__
    'Param'

Defs stay tuples (hashing and comparison run in C; equal structures give equal
defs), with names for their fields:

======================================  =========================================
``VarDef(VAR, cls, meta)``               a Variable (one leaf)
``ObjDef(NODE, cls, aux, attrs)``        a Pytree; ``attrs``: ``((key, def), ...)``
``LeafDef(LEAF)``                        a raw array or other leaf (one leaf)
``StaticDef(STATIC, value)``             a static value inside a container
``RefDef(REF, index)``                   graph mode: the ``index``-th object met again
``SeqDef(SEQ, cls, children)``           a tuple / list
``MapDef(MAP, cls, keys, children)``     a dict / State
``JaxNodeDef(JAXNODE, treedef, keys, children)``  any other registered JAX node
``ArrayRefDef(ARRAYREF)``                a raw ``jax.Ref`` (one leaf, numbered like an object)
======================================  =========================================

``d.entries()`` gives ``((key, child def), ...)`` for every kind (empty for leaves).

**Numbering.** Objects are numbered in traversal order, the numbering of
``RefDef`` indices and of the ``nodes`` lists flatten and build fill: every
Pytree, every Variable, every raw ``jax.Ref``, and right after a Variable whose
metadata says ``ref=True`` its Ref (its *ref slot*: NNX numbers a Variable's
Ref as its own node). ``numbered`` walks a def with these indices; ``leaf_layout``
lists each leaf with its def, path, parent and index (memoised per GraphDef).

``NoUpdate`` and ``ArrayRefOutput`` are the values a Ref turns into when state
leaves a transform (``jax.Ref`` s cannot be returned from a JAX transform): a Ref
the caller already has is not sent back (``NoUpdate``), a new one travels as its
value (``ArrayRefOutput``) and becomes a new Ref when built outside.
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax

from arbax.pytree import List

VAR, NODE, LEAF, STATIC, REF, SEQ, MAP, JAXNODE, ARRAYREF = range(9)

_new = tuple.__new__


class _Def(tuple):
  __slots__ = ()

  @property
  def tag(self) -> int:
    return self[0]

  def entries(self) -> tuple:
    """``((key, child def), ...)``: none for a leaf or a static value."""
    return ()

  @property
  def ref_slot(self) -> bool:
    """Whether a number for a Ref follows this def's own (only a ``VarDef`` can say yes)."""
    return False


class VarDef(_Def):
  """A Variable: its class and metadata (``VarMeta``)."""
  __slots__ = ()
  cls = property(lambda self: self[1])
  meta = property(lambda self: self[2])

  @property
  def ref_slot(self) -> bool:
    """Whether the Variable's Ref is numbered right after it (its metadata says ``ref=True``)."""
    return bool(self[2].items.get('ref'))


class ObjDef(_Def):
  """A Pytree: its class, its ``PytreeAux`` and ``((key, def), ...)`` of its data attributes."""
  __slots__ = ()
  cls = property(lambda self: self[1])
  aux = property(lambda self: self[2])
  attrs = property(lambda self: self[3])

  def entries(self) -> tuple:
    return self[3]


class LeafDef(_Def):
  """A raw leaf (an array, or any value JAX treats as a leaf where data is expected)."""
  __slots__ = ()


class StaticDef(_Def):
  """A static value (``Hashed`` when it is not hashable itself)."""
  __slots__ = ()

  @property
  def value(self):
    v = self[1]
    return v.value if type(v) is Hashed else v


class RefDef(_Def):
  """A later reference to the object numbered ``index`` (a shared object or a cycle)."""
  __slots__ = ()

  @property
  def index(self) -> int:  # shadows tuple.index on purpose
    return self[1]


class SeqDef(_Def):
  """A tuple or list: its type and one def per item."""
  __slots__ = ()
  cls = property(lambda self: self[1])
  children = property(lambda self: self[2])

  def entries(self) -> tuple:
    return tuple(enumerate(self[2]))


class MapDef(_Def):
  """A dict or State: its type, its keys in pytree (sorted) order and one def per key."""
  __slots__ = ()
  cls = property(lambda self: self[1])
  keys = property(lambda self: self[2])
  children = property(lambda self: self[3])

  def entries(self) -> tuple:
    return tuple(zip(self[2], self[3]))


class JaxNodeDef(_Def):
  """Any other registered JAX node: its one-level treedef, child keys and child defs."""
  __slots__ = ()
  treedef = property(lambda self: self[1])
  keys = property(lambda self: self[2])
  children = property(lambda self: self[3])

  @property
  def cls(self) -> type:
    return self[1].node_data()[0]

  def entries(self) -> tuple:
    return tuple(zip(self[2], self[3]))


class ArrayRefDef(_Def):
  """A raw ``jax.Ref``: a leaf, numbered like an object so that sharing it is kept."""
  __slots__ = ()


def var_def(cls, meta) -> VarDef:
  return _new(VarDef, (VAR, cls, meta))


def obj_def(cls, aux, attrs: tuple) -> ObjDef:
  return _new(ObjDef, (NODE, cls, aux, attrs))


def ref_def(index: int) -> RefDef:
  return _new(RefDef, (REF, index))


def seq_def(cls, children: tuple) -> SeqDef:
  return _new(SeqDef, (SEQ, cls, children))


def map_def(cls, keys: tuple, children: tuple) -> MapDef:
  return _new(MapDef, (MAP, cls, keys, children))


def jax_node_def(treedef, keys: tuple, children: tuple) -> JaxNodeDef:
  return _new(JaxNodeDef, (JAXNODE, treedef, keys, children))


LEAF_DEF = _new(LeafDef, (LEAF,))
ARRAYREF_DEF = _new(ArrayRefDef, (ARRAYREF,))
NONE_DEF = _new(StaticDef, (STATIC, None))


class Hashed:
  """Wraps an unhashable static value so defs stay hashable (compared by equality)."""

  __slots__ = ('value',)

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return hash(type(self.value).__name__)

  def __eq__(self, other):
    try:
      return isinstance(other, Hashed) and bool(self.value == other.value)
    except Exception:
      return False


def static_def(value) -> StaticDef:
  """The def of a static value (wrapped in ``Hashed`` when it cannot be hashed)."""
  if value is None:
    return NONE_DEF
  try:
    hash(value)
  except TypeError:
    value = Hashed(value)
  return _new(StaticDef, (STATIC, value))


_CLASSES = {VAR: VarDef, NODE: ObjDef, LEAF: LeafDef, STATIC: StaticDef, REF: RefDef,
            SEQ: SeqDef, MAP: MapDef, JAXNODE: JaxNodeDef, ARRAYREF: ArrayRefDef}


def named(d: tuple) -> _Def:
  """``d`` and the defs under it as named defs (plain tuples from old pickles)."""
  if isinstance(d, _Def):
    return d
  tag = d[0]
  if tag == NODE:
    return obj_def(d[1], d[2], tuple((k, named(c)) for k, c in d[3]))
  if tag == SEQ:
    return seq_def(d[1], tuple(named(c) for c in d[2]))
  if tag in (MAP, JAXNODE):
    return _new(_CLASSES[tag], (tag, d[1], d[2], tuple(named(c) for c in d[3])))
  return _new(_CLASSES[tag], d)


# -- walking defs -----------------------------------------------------------------


def iter_defs(root) -> tp.Iterator[tuple[tuple, _Def]]:
  """Every def under ``root`` with its path, in traversal order (a node before its children)."""
  stack: list[tuple[tuple, _Def]] = [((), root)]
  pop, extend = stack.pop, stack.extend
  while stack:
    path, d = pop()
    yield path, d
    entries = d.entries()
    if entries:
      extend([(path + (k,), c) for k, c in reversed(entries)])


def numbered(root, base: int = 0) -> tp.Iterator[tuple[tuple, _Def, int | None]]:
  """``(path, def, index)`` for every def under ``root`` in traversal order; ``index`` is the
  object number of a Pytree, Variable or raw Ref (None for the rest). A ref-slot Variable
  takes two numbers: its own, and the next one for its Ref."""
  index = base
  for path, d in iter_defs(root):
    tag = d[0]
    if tag == NODE or tag == ARRAYREF:
      yield path, d, index
      index += 1
    elif tag == VAR:
      yield path, d, index
      index += 2 if d[2].items.get('ref') else 1
    else:
      yield path, d, None


def num_objects(root) -> int:
  """How many numbers the objects under ``root`` take (see ``numbered``)."""
  n = 0
  for _, d in iter_defs(root):
    tag = d[0]
    if tag == NODE or tag == ARRAYREF:
      n += 1
    elif tag == VAR:
      n += 2 if d[2].items.get('ref') else 1
  return n


class LeafInfo(tp.NamedTuple):
  """One leaf of a GraphDef (see ``leaf_layout``)."""
  d: _Def                       # its def: a VarDef, LeafDef or ArrayRefDef
  path: tuple                   # where it lives
  index: int | None             # its object number (a Variable or raw Ref), None for a raw leaf
  parent: tuple | None          # (object number, key) of the Pytree holding it as an attribute

  @property
  def is_var(self) -> bool:
    return self.d[0] == VAR


def leaf_layout(root, base: int = 0) -> tuple[LeafInfo, ...]:
  """Every leaf under ``root`` in leaf order, with its def, path, number and parent.

  ``parent`` is set for a leaf held directly by a Pytree: an attribute (a string
  key) or an item of an ``nnx.List``, so the parent object can be found again
  (inside a transform and outside) by its number.
  """
  out: list = []
  owner: dict = {}  # path of a Pytree -> its number
  for path, d, index in numbered(root, base):
    tag = d[0]
    if tag == NODE:
      owner[path] = (index, d[1])
    elif tag == VAR or tag == LEAF or tag == ARRAYREF:
      parent = None
      if path:
        holder = owner.get(path[:-1])
        key = path[-1]
        if holder is not None and (isinstance(key, str) or issubclass(holder[1], List)):
          parent = (holder[0], key)
      out.append(LeafInfo(d, path, index, parent))
  return tuple(out)


def describe(d) -> str:
  """A short text form of a def: ``Foo(w=Param, n=...)``."""
  tag = d[0]
  if tag == NODE:
    return f'{d[1].__name__}(' + ', '.join(f'{k}={describe(c)}' for k, c in d[3]) + ')'
  if tag == VAR:
    return d[1].__name__
  if tag == REF:
    return f'ref[{d[1]}]'
  if tag == LEAF:
    return 'leaf'
  if tag == ARRAYREF:
    return 'Ref'
  if tag == STATIC:
    return repr(d[1])
  return f'{getattr(d[1], "__name__", "node")}[...]'


# -- Refs leaving a transform -------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, slots=True)
class NoUpdate:
  """The value of a Ref the caller already holds, in state leaving a transform: nothing to send
  back (the Ref was written in place); building it outside keeps the caller's Ref."""


NO_UPDATE = NoUpdate()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, slots=True)
class ArrayRefOutput:
  """The value of a Ref made inside a transform, in state leaving it: building it outside makes
  a new ``jax.Ref`` holding ``value``."""
  value: tp.Any


__all__ = ['VAR', 'NODE', 'LEAF', 'STATIC', 'REF', 'SEQ', 'MAP', 'JAXNODE', 'ARRAYREF', 'VarDef',
           'ObjDef', 'LeafDef', 'StaticDef', 'RefDef', 'SeqDef', 'MapDef', 'JaxNodeDef',
           'ArrayRefDef', 'LEAF_DEF', 'ARRAYREF_DEF', 'Hashed', 'static_def', 'named', 'iter_defs',
           'numbered', 'num_objects', 'LeafInfo', 'leaf_layout', 'describe', 'NoUpdate',
           'NO_UPDATE', 'ArrayRefOutput']
