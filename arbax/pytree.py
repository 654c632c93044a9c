"""Pytree: Python objects whose attributes define a JAX pytree.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> class Scale(nnx.Pytree):
    ...   def __init__(self, n):
    ...     self.n = n                       # int: static, part of the treedef
    ...     self.w = nnx.Param(jnp.ones(n))  # Variable: data, a leaf
    >>> s = jax.tree.map(lambda x: x * 2, Scale(3))
    >>> type(s).__name__, s.n, s.w[...].tolist()
    ('Scale', 3, [2.0, 2.0, 2.0])

Attributes are classified at their first assignment, as in Flax NNX 0.12, and
keep that class afterwards (``del`` forgets it):

- arrays, Variables, Pytrees (Modules, ``nnx.List``, ...) and registered data
  types are *data*; everything else is *static*, part of the tree definition;
- a plain list, tuple or dict that holds data is refused (ValueError): make it
  an ``nnx.List`` / ``nnx.Dict``, or mark it ``nnx.data([...])``;
- ``nnx.data(...)`` / ``nnx.static(...)`` (or ``x: nnx.Data[...]`` /
  ``nnx.Static[...]`` annotations) choose the class; a static attribute that
  later receives data is refused, a data attribute accepts anything;
- a static attribute still holding data when ``__init__`` returns (a list
  filled in place) is refused.

    >>> class Stack(nnx.Pytree):
    ...   def __init__(self):
    ...     self.ws = nnx.List([jnp.ones(2)])  # not a plain list: that is refused
    ...     self.name = 'stack'                # static from now on
    >>> s = Stack()
    >>> try:
    ...   s.name = jnp.zeros(2)
    ... except ValueError as e:
    ...   print(str(e)[:29])
    Cannot assign data value of t

Attributes written behind ``__setattr__``'s back (``object.__setattr__``,
``vars(m).update``) are classified by value when the object is next flattened
(see ``_structure``).

A Pytree belongs to the JAX trace it was made in: assigning to it from inside
another trace (a ``jax.jit`` function that captured it) raises TraceContextError.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np

from arbax import _structure, _walk, caches, reprhook
from arbax.errors import TraceContextError
from arbax.variables import Variable, current_trace, hash_stand_in

__all__ = ['Pytree', 'List', 'Dict', 'data', 'static', 'dataclass', 'is_data', 'has_data',
           'register_data_type', 'check_pytree', 'Data', 'Static', 'Object', 'attributes']

_KIND = 'arbax_kind'  # key in dataclasses.Field.metadata
_MISSING = object()


# -- data / static markers ----------------------------------------------------
class _Marked:
  __slots__ = ('value',)

  def __init__(self, value):
    self.value = value


class _DataValue(_Marked):
  pass


class _StaticValue(_Marked):
  pass


_A = tp.TypeVar('_A')


@tp.overload
def data(value: _A, /) -> _A: ...
@tp.overload
def data(**field_kwargs: tp.Any) -> tp.Any: ...
def data(value: tp.Any = _MISSING, /, **field_kwargs) -> tp.Any:
  """Mark an attribute as data.

  ``self.xs = nnx.data([1, 2])`` on assignment, or ``xs: list = nnx.data()`` as a
  class annotation / dataclass field.
  """
  if value is _MISSING:
    return dataclasses.field(metadata={_KIND: True}, **field_kwargs)
  return _DataValue(value)


def static(value: tp.Any = _MISSING, /, **field_kwargs):
  """Mark an attribute as static (part of the tree definition, never traced)."""
  if value is _MISSING:
    return dataclasses.field(metadata={_KIND: False}, **field_kwargs)
  return _StaticValue(value)


_T = tp.TypeVar('_T')
# ``x: nnx.Data[int]`` / ``y: nnx.Static[str]``: class-level markers read from annotations.
Data = tp.Annotated[_T, '__data__']
Static = tp.Annotated[_T, '__static__']

_DATA_TYPES: set[type] = set()


def register_data_type(type_: type, /) -> type:
  """Make values of ``type_`` data (pytree leaves) when assigned to a Pytree attribute.

  Usable as a decorator; returns the type unchanged.
  """
  _DATA_TYPES.add(type_)
  _PLAIN_STATIC.discard(type_)  # no longer known to be static
  return type_


def is_data(value: tp.Any, /) -> bool:
  """Whether ``value`` is itself a data type: an array, a ``jax.Ref``, a Variable, a Pytree, or
  a type passed to ``register_data_type``. Containers are not (see ``has_data``)."""
  return (isinstance(value, (Variable, Pytree, jax.Array, np.ndarray, jax.Ref))
          or any(isinstance(value, t) for t in _DATA_TYPES))


def has_data(value: tp.Any, /) -> list[tp.Any]:
  """The data values (see ``is_data``) found inside the pytree ``value``, outermost first.

  A Pytree counts as one value: its contents are not listed separately; a value
  reached twice is listed once.
  """
  found: list = []
  listed: set = set()
  for _, x in _walk.iter_matching(value, is_data):
    if id(x) not in listed:
      listed.add(id(x))
      found.append(x)
  return found


def check_pytree(pytree, /) -> None:
  """Check that no static attribute of ``pytree`` holds data; raise ValueError naming it.

  Useful after mutating a static container in place (``self.cfg['w'] = array``),
  which assignment-time checks cannot see.
  """
  if not isinstance(pytree, Pytree):
    raise TypeError(f'Expected a Pytree, got {type(pytree)}.')
  for name, value, kind in attributes(pytree):
    found = None if kind else _find_data(value)
    if found:
      raise ValueError(
          f'Found data ({found}) in static attribute {name!r} of {type(pytree).__name__}. '
          f'Static attributes are part of the tree definition and would lose it. Assign it '
          f'with `self.{name} = nnx.data(...)`, or use nnx.List / nnx.Dict for containers.')


# Values that are never data, checked by exact type first: most attributes are one of these
# (a layer's features, dtypes, activation and dot_general functions). Walking them to prove it
# costs microseconds each, which adds up over thousands of layers.
_PLAIN_STATIC = {int, float, bool, complex, str, bytes, type(None), type, types.FunctionType,
                 types.BuiltinFunctionType, type(jnp.float32), type(jnp.tanh),
                 *(type(np.dtype(t)) for t in ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8',
                                               'uint32', 'float16', 'float32', 'float64',
                                               'complex64', jnp.bfloat16))}


def _holds_data(value) -> bool:
  """Whether a value is data (a leaf or holds leaves) when set without a marker. Numpy scalars
  are hashable constants, static like Python numbers (as in NNX)."""
  if type(value) in _PLAIN_STATIC:
    return False
  return _walk.find_first(value, is_data) is not None


def _find_data(value) -> str | None:
  """Where (relative: ``[0]['w']``) the first data value inside ``value`` is, or None."""
  found = _walk.find_first(value, is_data)
  if found is None:
    return None
  path = found[0]
  return ''.join(f'[{k!r}]' for k in path) or '<the value itself>'


_OPAQUE_SKIP = (int, float, complex, str, bytes, type(None), np.generic, type, np.dtype)


def _find_hidden_state(value, holder=None) -> str | None:
  """Where a static value hides a Variable or Pytree that JAX cannot see, or None.

  Checked once at assignment (never when flattening): sets, bound methods,
  ``functools.partial`` and the attributes of plain objects are opaque to
  ``jax.tree``, so state inside them would be frozen into the treedef and its
  updates lost.
  """
  if isinstance(value, _OPAQUE_SKIP):
    return None
  if isinstance(value, (set, frozenset)):
    return next((f'an element {type(v).__name__}' for v in value if isinstance(v, (Variable, Pytree))),
                None)
  owner = getattr(value, '__self__', None)
  # A method bound to the holder itself (``self.fn = self._impl``) is a common idiom: the
  # holder's state is visible through the holder, so only other owners hide state.
  if isinstance(owner, (Variable, Pytree)) and owner is not holder:
    return f'.__self__ (the {type(owner).__name__} the method is bound to)'
  if isinstance(value, functools.partial):
    for i, v in enumerate(value.args):
      if isinstance(v, (Variable, Pytree)):
        return f'.args[{i}]'
    for k, v in value.keywords.items():
      if isinstance(v, (Variable, Pytree)):
        return f'.keywords[{k!r}]'
    return None
  if callable(value) or isinstance(value, (list, tuple, dict)):
    return None
  attrs = getattr(value, '__dict__', None)
  if isinstance(attrs, dict):
    for k, v in attrs.items():
      if isinstance(v, (Variable, Pytree)):
        return f'.{k}'
  return None


# -- the static part of a node ------------------------------------------------
class PytreeAux:
  """What a Pytree node contributes to a treedef: its data keys and static attributes.

  Equal structures compare equal (so ``jax.jit`` caches hit); the hash is
  computed once. Static values are kept as snapshots (``_structure.snapshot``:
  lists and dicts copied), so a static list changed in place afterwards no
  longer matches, and ``fits`` notices.
  """

  __slots__ = ('data_keys', 'static', 'order', '_hash', 'children_of', '_template', 'static_of',
               'static_values', 'mutable', 'size', 'check_of', 'check_values', 'path_entries')

  def __init__(self, data_keys: tuple, static: tuple, order: tuple):
    self.data_keys = data_keys
    self.static = static      # ((name, value), ...) in insertion order
    self.order = order        # every attribute name, insertion order (for repr)
    self._hash = None
    self._template = None
    self.path_entries: tuple | None = None  # JAX path keys of the children, made when asked
    # `__dict__ -> children` in C (itemgetter): flatten runs per node on every jit call.
    self.children_of = _getter(data_keys)
    self.static_of = _getter(tuple(k for k, _ in static))
    self.static_values = tuple(v for _, v in static)
    # static attributes holding lists / dicts: watched by caches, copied for each rebuilt node
    self.mutable = tuple((k, v) for k, v in static if _structure.is_mutable(v))
    # A node's ``__dict__`` holds its attributes plus exactly two ``_arbax_`` entries, so an
    # attribute added or removed behind ``__setattr__``'s back changes its size.
    self.size = len(order) + 2
    # What flatten compares to notice static values changed behind ``__setattr__``'s back:
    # without static attributes, the size again, so the check stays one C call (no frame).
    if static:
      self.check_of, self.check_values = self.static_of, self.static_values
    else:
      self.check_of, self.check_values = len, self.size

  def fits(self, d: dict) -> bool:
    """Whether the ``__dict__`` ``d`` still has this structure: no attribute added or removed
    behind ``__setattr__``'s back (a Pytree's dict holds its attributes plus exactly two
    ``_arbax_`` entries) and every static value equal to its snapshot."""
    try:
      return len(d) == self.size and self.check_of(d) == self.check_values
    except Exception:  # a static attribute deleted, or replaced by a value == cannot compare
      return False

  def template(self) -> tuple[dict, dict]:
    """(``__dict__`` with static values in attribute order, kinds) for building nodes; made once."""
    if self._template is None:
      kinds = {k: False for k, _ in self.static}
      kinds.update((k, True) for k in self.data_keys)
      values = {'_arbax_kinds': None, '_arbax_cache': self}
      values.update((k, None) for k in self.order)
      values.update(self.static)
      self._template = (values, kinds)
    return self._template

  def __hash__(self):
    if self._hash is None:
      self._hash = hash((self.data_keys, hash_stand_in(self.static)))
    return self._hash

  def __eq__(self, other):
    if self is other:
      return True
    if not isinstance(other, PytreeAux):
      return NotImplemented
    if self.data_keys != other.data_keys or len(self.static) != len(other.static):
      return False
    try:
      return all(a[0] == b[0] and (a[1] is b[1] or bool(a[1] == b[1]))
                 for a, b in zip(self.static, other.static))
    except Exception:
      return False

  def __repr__(self):
    return f'PytreeAux(data={self.data_keys}, static={dict(self.static)})'


def _getter(keys: tuple):
  """``d -> tuple of d[k] for k in keys``, in C where it can be."""
  if not keys:
    return _no_children
  if len(keys) == 1:
    return functools.partial(_one_child, keys[0])
  return operator.itemgetter(*keys)


def _no_children(d):
  return ()


def _one_child(key, d):
  return (d[key],)


def _sort_key(k):
  return (isinstance(k, str), k)


def node_parts(obj: 'Pytree') -> tuple[tuple, PytreeAux]:
  """(data keys in pytree order, aux) of a Pytree: cached, recomputed when the structure changed
  (through ``__setattr__`` or behind its back)."""
  d = obj.__dict__
  aux = d.get('_arbax_cache')
  if aux is None or not aux.fits(d):
    aux = _compute_parts(obj, d)
  return aux.data_keys, aux


def _compute_parts(obj, d: dict) -> PytreeAux:
  """The aux of ``obj`` (``__dict__`` ``d``) made anew, and kept in ``d['_arbax_cache']``."""
  kinds = d['_arbax_kinds']
  # (one attribute deleted and another added through ``__dict__`` keep the size)
  if len(d) != len(kinds) + 2 or not kinds.keys() <= d.keys():
    _adopt_bypassed(d, kinds)
  if not type(obj)._arbax_pytree:
    _promote_filled(d, kinds)
  order = tuple(k for k in d if k in kinds)
  data_keys = tuple(sorted((k for k in order if kinds[k]), key=_sort_key))
  static = tuple((k, _structure.snapshot(d[k])) for k in order if not kinds[k])
  key = _intern_key(order, data_keys, static)
  aux = _AUXES.get(key) if key is not None else None
  if aux is None:
    aux = PytreeAux(data_keys, static, order)
    if key is not None:
      _AUXES[key] = aux
  d['_arbax_cache'] = aux
  return aux


# Objects built alike (the 32 Linear layers of an MLP) share one aux: it describes a
# structure, not an object, and a model of 5,000 Variables would otherwise hold thousands
# of equal copies. Sharing is only safe when the static values are immutable and equal
# values are interchangeable, so each value's key is its type plus something exact.
_AUXES = caches.bounded('shared Pytree auxes', maxsize=4096)
_EXACT_TYPES = frozenset({int, bool, str, bytes, type(None), type, types.FunctionType,
                          types.BuiltinFunctionType, type(jnp.float32),
                          *(type(np.dtype(t)) for t in ('bool', 'int8', 'int16', 'int32',
                                                        'int64', 'uint8', 'uint32', 'float16',
                                                        'float32', 'float64', 'complex64',
                                                        jnp.bfloat16))})


def _intern_key(order: tuple, data_keys: tuple, static: tuple):
  """A hashable key that equals another one only when the auxes are interchangeable;
  None when some static value cannot be keyed that strictly."""
  parts = []
  for k, v in static:
    part = _exact(v)
    if part is None:
      return None
    parts.append((k, part))
  return order, data_keys, tuple(parts)


def _exact(v):
  t = type(v)
  if t in _EXACT_TYPES:
    return t, v
  if t is float:  # 0.0 == -0.0, but they are not interchangeable
    return t, v.hex()
  if t is tuple:
    parts = tuple(map(_exact, v))
    return None if None in parts else (t, parts)
  if t.__eq__ is object.__eq__ and t.__hash__ is object.__hash__:  # equality is identity
    return t, id(v), v  # v itself keeps the id from being reused while the key lives
  return None


def _is_internal(key) -> bool:
  return type(key) is str and key.startswith('_arbax_')


def _adopt_bypassed(d: dict, kinds: dict) -> None:
  """Attributes written into ``__dict__`` directly (``m.__dict__['x'] = v``,
  ``object.__setattr__``) are classified as ``setattr`` would (the value is kept as
  it is); attributes deleted that way are forgotten."""
  for k in [k for k in kinds if k not in d]:
    del kinds[k]
  for k, v in d.items():
    if k not in kinds and not _is_internal(k):
      kinds[k] = _holds_data(v)


def _promote_filled(d: dict, kinds: dict) -> None:
  """In a ``pytree=False`` class (no attribute rules, as in NNX) a static attribute that holds
  data now (``self.layers = []`` then ``append``) is data: its Variables are in the state."""
  for k, is_data_ in kinds.items():
    if not is_data_ and type(d[k]) not in _PLAIN_STATIC and _holds_data(d[k]):
      kinds[k] = True


def _key_entry(k):
  if isinstance(k, int):
    return jax.tree_util.SequenceKey(k)
  return jax.tree_util.GetAttrKey(k)


def _flatten(obj):
  # JAX calls this for every node of every flatten (jax.jit arguments, jax.tree.map), from C:
  # PytreeAux.fits inlined, its checks C calls (itemgetter, len) so no other Python frame runs.
  d = obj.__dict__
  try:
    aux = d['_arbax_cache']
    if len(d) == aux.size and aux.check_of(d) == aux.check_values:
      return aux.children_of(d), aux
  except Exception:  # no aux yet (None has no .size), or see PytreeAux.fits
    pass
  aux = _compute_parts(obj, d)
  return aux.children_of(d), aux


def _flatten_with_keys(obj):
  keys, aux = node_parts(obj)
  entries = aux.path_entries
  if entries is None:  # made once per structure: key objects are immutable
    entries = aux.path_entries = tuple(map(_key_entry, keys))
  return tuple(zip(entries, aux.children_of(obj.__dict__))), aux


def new_node(cls, aux: PytreeAux, children) -> 'Pytree':
  """Build a Pytree of class ``cls`` from its aux and data children, without calling ``__init__``.

  The node belongs to the JAX trace running now (see ``Pytree.__setattr__``).
  """
  obj = _new(cls)
  values, kinds = aux._template or aux.template()
  d = values.copy()  # keeps the attribute order; data slots are filled in place
  d['_arbax_kinds'] = kinds.copy()
  d.update(zip(aux.data_keys, children))
  for k, v in aux.mutable:  # a static list of its own, not the aux's snapshot
    d[k] = _structure.snapshot(v)
  _set_dict_slot(obj, d)
  _set_trace(obj, current_trace())
  _set_seen(obj, False)
  if cls._arbax_after_unflatten is not _no_hook:
    obj._arbax_after_unflatten()
  return obj


class NodeTemplate(tp.NamedTuple):
  """What every node of one structure is built from (``node_template``); builders keep one."""
  values: dict        # ``__dict__`` to copy: attribute order, static values, data slots None
  kinds: dict         # ``_arbax_kinds`` to copy
  mutable: tuple      # ((name, snapshot), ...) of static lists / dicts: each node gets a copy
  hook: tp.Any        # the class's after-unflatten hook, or None


def node_template(cls, aux: PytreeAux) -> NodeTemplate:
  """The template of nodes of class ``cls`` and structure ``aux`` (see ``NodeTemplate``).

  A builder makes a node as ``new_node`` does, in steps (so children may refer back to it):
  ``obj = object.__new__(cls)``, ``d = values.copy()``, ``d['_arbax_kinds'] = kinds.copy()``,
  a copy of each ``mutable`` value, ``set_dict(obj, '__dict__', d)``, ``set_trace(obj,
  trace)``, ``set_seen(obj, False)``, then the children, then ``hook(obj)``.
  """
  values, kinds = aux.template()
  hook = cls._arbax_after_unflatten
  return NodeTemplate(values, kinds, aux.mutable,
                      None if hook is Pytree._arbax_after_unflatten else hook)


_new = object.__new__


class Pytree:
  """Base class of objects that are JAX pytrees; see the module docstring."""

  _arbax_declared: tp.ClassVar[dict] = {}
  _arbax_pytree: tp.ClassVar[bool] = True
  _arbax_properties: tp.ClassVar[frozenset] = frozenset()  # assigned through their setter

  def __init_subclass__(cls, pytree: bool = True, **kwargs):
    super().__init_subclass__(**kwargs)
    declared = {}
    for base in reversed(cls.__mro__[1:]):
      declared.update(getattr(base, '_arbax_declared', {}))
    for name, value in list(vars(cls).items()):
      if isinstance(value, dataclasses.Field) and _KIND in value.metadata:
        declared[name] = value.metadata[_KIND]
    for name, annotation in vars(cls).get('__annotations__', {}).items():
      if name in declared or name.startswith('_'):
        continue
      kind = _annotation_kind(annotation)
      if kind is not None:
        declared[name] = kind
    cls._arbax_declared = declared
    cls._arbax_pytree = pytree
    if '__init__' in vars(cls):
      cls.__init__ = _checked_init(cls.__init__)
    cls._arbax_properties = frozenset(
        k for c in cls.__mro__ for k, v in vars(c).items() if isinstance(v, property))
    if pytree:
      # partial, not a lambda: JAX calls the unflatten per node, and partial adds no frame.
      jax.tree_util.register_pytree_with_keys(
          cls, _flatten_with_keys, functools.partial(new_node, cls), _flatten)

  # Outside __dict__, so a node's dict is its attributes plus exactly two `_arbax_` entries:
  # the trace the object belongs to (unset: any), and whether a cache depends on it.
  __slots__ = ('__dict__', '__weakref__', '_arbax_trace', '_arbax_seen')

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    d = obj.__dict__
    d['_arbax_kinds'] = {}
    d['_arbax_cache'] = None
    _set_trace(obj, current_trace())
    _set_seen(obj, False)
    return obj

  def _arbax_after_unflatten(self):
    """Hook for subclasses whose state lives outside ``__dict__``."""

  # -- attribute classification --
  def __setattr__(self, name: str, value: tp.Any):
    if name.startswith('_arbax_'):
      object.__setattr__(self, name, value)
      return
    try:
      owner = self._arbax_trace
    except AttributeError:
      owner = None
    if owner is not None and owner is not current_trace():
      check_trace(self, name)
    if name == '__class__':  # a real class change (NNX allows it), part of the structure
      object.__setattr__(self, name, value)
      _structure.changed(self)
      return
    d = self.__dict__
    kinds = d['_arbax_kinds']
    current = kinds.get(name)
    if self._arbax_pytree:
      value, kind = _classify(self, name, value, current)
    else:  # no rules: classified by value, at every assignment and again when flattened
      if isinstance(value, _Marked):
        value, kind = value.value, type(value) is _DataValue
      else:
        kind = _holds_data(value)
    if name in self._arbax_properties:
      object.__setattr__(self, name, value)
      return
    d[name] = value
    if current is not kind:
      kinds[name] = kind
    _structure.changed(self)

  def __delattr__(self, name: str):
    if name.startswith('_arbax_'):
      object.__delattr__(self, name)
      return
    check_trace(self, name)
    d = self.__dict__
    del d[name]
    d['_arbax_kinds'].pop(name, None)
    _structure.changed(self)

  # copy.copy, copy.deepcopy and pickle go through these two.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_arbax_cache', '_arbax_seen')}

  def __setstate__(self, state):
    d = self.__dict__
    d.update(state)
    d.pop('_arbax_seen', None)  # pickles made before it moved out of __dict__
    # The copy gets its own bookkeeping: sharing the kinds dict with the original would let an
    # attribute set on one change how the other flattens (copy.copy keeps the children shared).
    d['_arbax_kinds'] = dict(d['_arbax_kinds'])
    d['_arbax_cache'] = None

  def __repr__(self):
    return reprhook.render(self)

  def __treescope_repr__(self, path, subtree_renderer):
    return reprhook.render_treescope(self, path, subtree_renderer)


class Object(Pytree, pytree=False):
  """Deprecated name kept for old code: a Pytree that JAX sees as a single leaf.

  Subclasses are not pytrees unless they pass ``pytree=True``.
  """

  def __init_subclass__(cls, pytree: bool = False, **kwargs):
    super().__init_subclass__(pytree=pytree, **kwargs)


_set_trace = Pytree._arbax_trace.__set__
_set_dict_slot = Pytree.__dict__['__dict__'].__set__  # object.__setattr__ minus its lookups
_no_hook = Pytree._arbax_after_unflatten
_set_seen = Pytree._arbax_seen.__set__
# For builders that make nodes step by step (see ``node_template``): the slot setters.
set_dict = object.__setattr__
set_trace = _set_trace
set_seen = _set_seen


def check_trace(obj: Pytree, name) -> None:
  """Raise TraceContextError if ``obj`` belongs to a JAX trace other than the one running now.

  A Pytree belongs to the trace it was created in (rebuilt copies made inside
  NNX transforms belong to the transform's trace). Assigning to one from inside
  another trace, e.g. a ``jax.jit`` function that captured it, would store a
  tracer that outlives its trace.
  """
  try:
    owner = obj._arbax_trace
  except AttributeError:  # made by a builder that does not record it: belongs to any trace
    return
  now = current_trace()
  if owner is not now and owner != now:
    what = f'item [{name}]' if isinstance(name, int) else f'attribute {name!r}'
    raise TraceContextError(
        f"Cannot mutate '{type(obj).__name__}' from different trace level: {what} of a "
        f'{type(obj).__name__} created outside the JAX transform running now (jax.jit, jax.grad, '
        '...). The value would leak out of the trace. Pass the object through an NNX transform '
        '(nnx.jit, nnx.grad, ...), which rebuilds it inside, or make the change outside.')


# -- classification: NNX 0.12's rules ------------------------------------------
def _classify(obj, name, value, current: bool | None) -> tuple[tp.Any, bool]:
  """``(value without its marker, is_data)`` for ``obj.name = value``; ``current`` is the
  attribute's class if it has one (it keeps it). Raises ValueError as NNX does."""
  # The two assignments __init__ makes most (a number or function, a Param), decided at once.
  if type(value) in _PLAIN_STATIC:
    return value, current if current is not None else obj._arbax_declared.get(name, False)
  if isinstance(value, _DATA_ITSELF) and (
      current or current is None and name not in obj._arbax_declared):
    return value, True
  explicit = None
  if isinstance(value, _Marked):
    explicit = type(value) is _DataValue
    value = value.value
  data_at = None  # where data is inside the value: '' for the value itself
  if isinstance(value, _DATA_ITSELF):
    data_at = ''
  elif type(value) not in _PLAIN_STATIC:
    data_at, tags = _scan(value)
    if tags:
      raise _nested_markers(obj, name, value, tags)
  if explicit is not None:
    if not explicit and data_at is not None:
      raise _marked_static_holds_data(obj, name, value, data_at)
    return value, explicit
  declared = False
  if current is None:
    current = type(obj)._arbax_declared.get(name)
    declared = current is not None
  if current is None:  # first assignment: the value decides
    if data_at:
      raise _container_holds_data(obj, name, value, data_at)
    kind = data_at is not None
  elif current:
    kind = True      # a data attribute accepts anything, as NNX's do
  elif data_at is None:
    kind = False
  elif declared:
    raise _unexpected_data(obj, name, value, data_at, why='declared')
  elif data_at:
    raise _container_holds_data(obj, name, value, data_at)
  else:
    raise _cannot_assign_data(obj, name, value)
  if not kind and type(value) not in _PLAIN_STATIC:
    _check_no_hidden_state(obj, name, value)
  return value, kind


_DATA_ITSELF = (Variable, Pytree, jax.Array, np.ndarray)


def _data_or_marked(x) -> bool:
  return isinstance(x, _Marked) or is_data(x)


def _scan(value) -> tuple[str | None, set]:
  """(where the first data value inside ``value`` is: ``''`` for ``value`` itself, ``[0]['w']``
  below it, None if nowhere; the nnx.data / nnx.static markers nested inside it)."""
  data_at, tags = None, set()
  for path, x in _walk.iter_matching(value, _data_or_marked):
    if isinstance(x, _Marked):
      tags.add('data' if type(x) is _DataValue else 'static')
    elif data_at is None:
      data_at = ''.join(f'[{k!r}]' for k in path)
  return data_at, tags


def _checked_init(init):
  """Wrap a Pytree class's ``__init__``: when the outermost one returns, no static attribute
  may hold data (a list assigned empty, then filled in place)."""
  if getattr(init, '_arbax_checked', False):
    return init

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):
    init(self, *args, **kwargs)
    cls = type(self)
    if cls.__init__ is __init__ and cls._arbax_pytree:  # not a subclass's super().__init__()
      check_static_attributes(self)

  __init__._arbax_checked = True  # pyright: ignore[reportAttributeAccessIssue]  # a marker on the wrapper
  return __init__


def check_static_attributes(obj: 'Pytree') -> None:
  """Raise ValueError (NNX's "Found unexpected data") if a static attribute of ``obj`` holds
  data; run when ``__init__`` returns."""
  d = obj.__dict__
  for k, is_data_ in d['_arbax_kinds'].items():
    v = d.get(k)
    if not is_data_ and type(v) not in _PLAIN_STATIC:
      data_at, _ = _scan(v)
      if data_at is not None:
        raise _unexpected_data(obj, k, v, data_at, why='init')


# The messages start as NNX's do (code matches on them), then name the attribute, the data and
# the fix.
def _target(name) -> str:
  return f'self[{name}]' if isinstance(name, int) else f'self.{name}'


def _culprit(name, value, data_at: str) -> str:
  if not data_at:
    return f'{_target(name)} itself'
  found = tp.cast(tuple, _walk.find_first(value, is_data))[1]  # data_at says there is one
  return f'the {type(found).__name__} at {_target(name)}{data_at}'


_STATIC_WHY = ('Static attributes are part of the tree definition: JAX would not see the data, '
               'and updates to it would be lost.')


def _container_holds_data(obj, name, value, data_at) -> ValueError:
  return ValueError(
      f"Found data on value of type '{type(value)}' assigned to static attribute '{name}' of "
      f"Pytree type '{type(obj)}': {_culprit(name, value, data_at)} is data, and a plain "
      f'{type(value).__name__} is static. {_STATIC_WHY} Use nnx.List(...) / nnx.Dict(...) '
      f'instead of a plain list / dict, or assign it with `{_target(name)} = nnx.data(...)`.')


def _cannot_assign_data(obj, name, value) -> ValueError:
  return ValueError(
      f"Cannot assign data value of type '{type(value)}' to static attribute '{name}' of Pytree "
      f"type '{type(obj)}': the attribute was static when first assigned, and keeps that class. "
      f'To override the status explicitly wrap the value with nnx.data on assignment: '
      f'`{_target(name)} = nnx.data(...)` (or `del {_target(name)}` first).')


def _marked_static_holds_data(obj, name, value, data_at) -> ValueError:
  return ValueError(
      f"Found data in value of type '{type(value)}' annotated with nnx.static(...) when setting "
      f"attribute '{name}' of Pytree type '{type(obj)}': {_culprit(name, value, data_at)} is data. "
      f'{_STATIC_WHY} Assign it with `{_target(name)} = nnx.data(...)`, or drop the '
      f'nnx.static(...) marker.')


def _unexpected_data(obj, name, value, data_at, *, why: str) -> ValueError:
  reason = ('the class declares the attribute static (an nnx.static() field or an '
            'nnx.Static[...] annotation)' if why == 'declared' else
            'the attribute was static when assigned and was filled in place before __init__ '
            'returned')
  return ValueError(
      f'Found unexpected data on value of type {type(value)} in static attribute \'{name}\' of '
      f"Pytree type '{type(obj)}': {_culprit(name, value, data_at)} is data, but {reason}. "
      f'{_STATIC_WHY} Assign it with `{_target(name)} = nnx.data(...)`, annotate it '
      f'`{name}: nnx.Data[...]`, or use nnx.List(...) / nnx.Dict(...) for containers.')


def _nested_markers(obj, name, value, tags: set) -> ValueError:
  shown = '{' + ', '.join(repr(t) for t in sorted(tags)) + '}'
  return ValueError(
      f"Found unexpected tags {shown} on attribute '{type(obj).__name__}.{name}'. Values from "
      f'nnx.data(...) and nnx.static(...) should be assigned to nnx.Pytree attributes directly, '
      f"they should not be inside other structures. Got value of type '{type(value)}' on Pytree "
      f"of type '{type(obj)}'. Mark the whole value instead: `{_target(name)} = nnx.data([...])`.")


def _check_no_hidden_state(obj, name, value):
  hidden = _find_hidden_state(value, obj)
  if hidden is not None:
    raise ValueError(
        f'Attribute {name!r} of {type(obj).__name__} is static (a {type(value).__name__}), but it '
        f'holds a Variable or Pytree at {hidden}. JAX cannot see inside it, so that state would be '
        f'frozen into the tree definition and its updates lost. Store the Variable / Module in its '
        f'own attribute (or make the holder an nnx.Pytree), or wrap it with nnx.static(...) if '
        f'freezing it is intended.')


def _annotation_kind(annotation):
  if isinstance(annotation, str):
    # ``from __future__ import annotations``: the markers are still recognisable by name.
    if annotation.startswith(('nnx.Data[', 'Data[')):
      return True
    if annotation.startswith(('nnx.Static[', 'Static[')):
      return False
    return None
  marks = getattr(annotation, '__metadata__', ())
  if '__data__' in marks:
    return True
  if '__static__' in marks:
    return False
  origin = tp.get_origin(annotation) or annotation
  if isinstance(origin, type) and issubclass(origin, (Variable, Pytree)):
    return True
  if origin is jax.Array:
    return True
  return None


def attributes(obj: Pytree) -> list[tuple[tp.Any, tp.Any, bool]]:
  """``[(name, value, is_data)]`` in insertion order, internal fields excluded."""
  d = obj.__dict__
  kinds = d['_arbax_kinds']
  return [(k, d[k], kinds[k]) for k in d if k in kinds]


# -- containers ---------------------------------------------------------------
class List(Pytree):
  """A list that is a Pytree: items are keyed ``[0]``, ``[1]``, ... in paths.

  A plain list holding data is refused as an attribute (it would be static);
  this is the list to use for layers and other data. Items follow the
  attribute rules, each on its own (``[1, [array]]`` is refused as well).
  Item ``i`` is the attribute ``i`` (an int key of ``__dict__``): length,
  indexing, ``append`` and ``pop()`` are O(1); inserting or deleting before
  the end renumbers the items after it, like a Python list.
  """

  def __init__(self, items: tp.Iterable = ()):
    for item in items:
      self._store(len(self), item)
    _structure.changed(self)

  def __len__(self):
    kinds = self.__dict__['_arbax_kinds']
    n = len(kinds)
    # Items are keys 0..n-1; only a subclass's own (str) attributes break that, then count.
    if n == 0 or (n - 1) in kinds:
      return n
    return sum(1 for k in kinds if type(k) is int)

  def _index(self, i: int) -> int:
    n = len(self)
    i = operator.index(i)
    if i < 0:
      i += n
    if not 0 <= i < n:
      raise IndexError(f'nnx.List index {i} out of range for length {n}')
    return i

  def __getitem__(self, i):
    d: dict = self.__dict__  # items are stored under int keys
    if isinstance(i, slice):
      return [d[j] for j in range(len(self))[i]]
    return d[self._index(i)]

  def __setitem__(self, i, value):
    if isinstance(i, slice):
      items = list(self)
      items[i] = value
      self._reset(items)
      return
    i = self._index(i)
    check_trace(self, i)
    self._store(i, value)
    _structure.changed(self)

  def __delitem__(self, i):
    if not isinstance(i, slice) and self._index(i) == len(self) - 1:
      self.pop()
      return
    items = list(self)
    del items[i]
    self._reset(items)

  def _store(self, i: int, value):
    d: dict = self.__dict__
    value, kind = _classify(self, i, value, None)
    d[i] = value
    d['_arbax_kinds'][i] = kind

  def _reset(self, items):
    """Replace every item (the general path of slices, inserts and deletes)."""
    check_trace(self, 'items')
    d: dict = self.__dict__
    kinds = d['_arbax_kinds']
    for k in [k for k in kinds if type(k) is int]:
      d.pop(k, None)
      del kinds[k]
    for i, item in enumerate(items):
      self._store(i, item)
    _structure.changed(self)

  def append(self, value):
    check_trace(self, len(self))
    self._store(len(self), value)
    _structure.changed(self)

  def extend(self, values):
    values = list(values)  # `l.extend(l)` reads all before writing
    check_trace(self, len(self))
    for v in values:
      self._store(len(self), v)
    _structure.changed(self)

  def __iadd__(self, values):
    self.extend(values)
    return self

  def insert(self, i, value):
    items = list(self)
    items.insert(i, value)
    self._reset(items)

  def pop(self, i=-1):
    last = len(self) - 1
    if last < 0:
      raise IndexError('pop from empty nnx.List')
    i = self._index(i)
    if i != last:
      items = list(self)
      value = items.pop(i)
      self._reset(items)
      return value
    check_trace(self, i)
    d: dict = self.__dict__
    value = d.pop(i)
    del d['_arbax_kinds'][i]
    _structure.changed(self)
    return value

  def remove(self, value):
    del self[self.index(value)]

  def clear(self):
    self._reset([])

  def reverse(self):
    self._reset(list(self)[::-1])

  def __iter__(self):
    d: dict = self.__dict__
    return map(d.__getitem__, range(len(self)))

  def __reversed__(self):
    d: dict = self.__dict__
    return map(d.__getitem__, reversed(range(len(self))))

  def __contains__(self, value):
    return any(v is value or v == value for v in self)

  def index(self, value):
    for i, v in enumerate(self):
      if v is value or v == value:
        return i
    raise ValueError(f'{value!r} is not in nnx.List')

  def count(self, value):
    return sum(1 for v in self if v is value or v == value)

  def __eq__(self, other):
    if isinstance(other, (List, list)):
      return list(self) == list(other)
    return NotImplemented

  __hash__ = object.__hash__

  def __add__(self, other):
    return List(list(self) + list(other))


class Dict(Pytree):
  """A dict that is a Pytree: keys appear as attributes (``.key``) in paths, and read as attributes."""

  def __init__(self, *args, **kwargs):
    for k, v in dict(*args, **kwargs).items():
      self[k] = v

  def __getitem__(self, key):
    d = self.__dict__
    if key in d['_arbax_kinds']:
      return d[key]
    raise KeyError(key)

  def __setitem__(self, key, value):
    Pytree.__setattr__(self, key, value)

  def __delitem__(self, key):
    if key not in self.__dict__['_arbax_kinds']:
      raise KeyError(key)
    Pytree.__delattr__(self, key)

  def __getattr__(self, name):
    raise AttributeError(f'nnx.Dict has no key {name!r}')

  def __iter__(self):
    return iter(list(self.__dict__['_arbax_kinds']))

  def __len__(self):
    return len(self.__dict__['_arbax_kinds'])

  def __contains__(self, key):
    return key in self.__dict__['_arbax_kinds']

  def keys(self):
    return list(self)

  def values(self):
    d = self.__dict__
    return [d[k] for k in self]

  def items(self):
    d = self.__dict__
    return [(k, d[k]) for k in self]

  def get(self, key, default=None):
    return self[key] if key in self else default

  def pop(self, key, *default):
    if key in self:
      value = self[key]
      del self[key]
      return value
    if default:
      return default[0]
    raise KeyError(key)

  def update(self, *args, **kwargs):
    for k, v in dict(*args, **kwargs).items():
      self[k] = v

  def setdefault(self, key, default=None):
    if key not in self:
      self[key] = default
    return self[key]

  def clear(self):
    for k in list(self):
      del self[k]

  def __eq__(self, other):
    if isinstance(other, (Dict, dict)):
      return dict(self.items()) == dict(other.items())
    return NotImplemented

  __hash__ = object.__hash__


def dataclass(cls=None, /, **kwargs):
  """``@nnx.dataclass``: a dataclass whose fields are Pytree attributes.

  Fields annotated with a Variable, Pytree or ``jax.Array`` type are data;
  ``nnx.data()`` / ``nnx.static()`` as a field's default force the class;
  others are classified by value.
  """
  kwargs.setdefault('eq', False)
  kwargs.setdefault('repr', False)

  def wrap(c):
    c = dataclasses.dataclass(c, **kwargs)
    if isinstance(c, type) and issubclass(c, Pytree):
      c.__init__ = _checked_init(c.__init__)  # the generated one: check it like a written one
    return c

  return wrap if cls is None else wrap(cls)
