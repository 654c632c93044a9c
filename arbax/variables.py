"""Variable: a mutable box for state, and the kinds of state NNX names.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> w = nnx.Param(jnp.ones((2, 3)), tag='kernel')
    >>> w[...] = w * 2          # writes in place: every holder of `w` sees it
    >>> (jnp.ones(2) @ w).shape # array-like: operators, jnp functions, methods
    (3,)
    >>> w.tag
    'kernel'

A Variable is a JAX pytree node with a single child, ``value``; its kind (the
class) and metadata are the static part, so ``jax.tree.map`` over a Variable
returns a Variable of the same kind carrying the same metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing as tp

import jax
import numpy as np
from jax.extend.core import get_opaque_trace_state

from arbax import _settings, caches, reprhook
from arbax.errors import TraceContextError
from arbax.placement import shard_new_value
from arbax.hijax_variable import STORE_METADATA, HijaxVariable, adopt  # noqa: F401 (re-export)

_GetAttrKey = jax.tree_util.GetAttrKey
_VALUE_KEY = _GetAttrKey('value')

__all__ = ['A', 'Variable', 'Param', 'BatchStat', 'Cache', 'Intermediate', 'Perturbation', 'VarMeta',
           'VariableMetadata', 'var_defaults', 'VarDefaults', 'VarDefaultsContext',
           'use_eager_sharding', 'using_eager_sharding', 'is_array_ref', 'register_variable_name',
           'variable_name_from_type', 'variable_type_from_name']

A = tp.TypeVar('A')  # a Variable's value type: ``class Count(nnx.Variable[nnx.A])``


try:  # JAX's own token for the current trace, read without building a wrapper object
  from jax._src.core import trace_ctx as _trace_ctx
  _trace_ctx.trace._weakref  # noqa: B018  (probe: the attribute exists in this JAX)

  # Read in C, without a Python frame: every Variable unflatten and attribute assignment asks.
  current_trace = functools.partial(operator.attrgetter('trace._weakref'), _trace_ctx)  # pyright: ignore[reportAssignmentType]
  current_trace.__doc__ = ('A token for the JAX trace running now (eval, jit, grad, ...); '
                           'equal tokens, same trace.')
  _trace_token = current_trace
except (ImportError, AttributeError):  # other JAX versions: the public, slower API
  def current_trace():
    """A token for the JAX trace running now (eval, jit, grad, ...); equal tokens, same trace."""
    return get_opaque_trace_state(convention='nnx')

  _trace_token = current_trace


def hash_stand_in(x):
  """A hashable stand-in used only to hash metadata (lists -> tuples, dicts -> sorted items)."""
  if isinstance(x, (list, tuple)):
    return tuple(hash_stand_in(e) for e in x)
  if isinstance(x, dict):
    return tuple(sorted((str(k), hash_stand_in(v)) for k, v in x.items()))
  try:
    hash(x)
    return x
  except TypeError:
    return id(x)


class VarMeta:
  """Immutable metadata of a Variable: the static aux data of its pytree node.

  Shared between a Variable and its copies, so equal metadata compares by
  identity first and hashes once. Users read metadata with
  ``Variable.get_metadata``; this type shows up in treedefs.

      >>> import jax, arbax as nnx
      >>> meta = jax.tree.structure(nnx.Param(1.0, tag='w')).node_data()[1]
      >>> type(meta).__name__, meta.items['tag']
      ('VarMeta', 'w')

  Args:
    items: the metadata dict (not copied; do not mutate it afterwards).
  """

  __slots__ = ('items', '_hash')

  def __init__(self, items: dict):
    self.items = items
    self._hash = None

  def __hash__(self):
    if self._hash is None:
      self._hash = hash(hash_stand_in(self.items))
    return self._hash

  def __eq__(self, other):
    if self is other:
      return True
    if not isinstance(other, VarMeta):
      return NotImplemented
    try:
      return bool(self.items == other.items)
    except Exception:  # array-valued metadata: fall back to identity
      return False

  def __repr__(self):
    return f'VarMeta({self.items!r})'


_EMPTY_META_CACHE = caches.bounded('interned Variable metadata', maxsize=4096)


def _make_meta(items: dict) -> VarMeta:
  # Interning the common small cases keeps treedefs of equal models identical.
  try:
    key = tuple(sorted(items.items()))
    hash(key)
  except TypeError:
    return VarMeta(items)
  meta = _EMPTY_META_CACHE.get(key)
  if meta is None:
    meta = _EMPTY_META_CACHE[key] = VarMeta(dict(items))
  return meta


_NO_INDEX = object()  # set_value without an index: replace the whole value
_MISSING = object()   # get_metadata without a default: a missing name is a KeyError

# Metadata every Variable has, fixed when it is created (set_metadata may not change it).
REQUIRED_METADATA = frozenset({'hijax', 'ref', 'eager_sharding'})


def _unwrap(x):
  return x._value if isinstance(x, Variable) else x


class Variable:
  """A mutable container of a value (an array, a scalar or any pytree) with metadata.

  A Variable is how state lives in an object: ``v[...]`` reads the value,
  ``v[...] = x`` writes it in place (every holder of ``v`` sees it), and it acts
  as its value in arithmetic and ``jnp`` functions. Subclass it to name a kind
  of state; filters select Variables by kind, so ``nnx.state(model, Count)``
  extracts only counters. ``nnx.Variable[jax.Array]`` / ``nnx.Param[jax.Array]``
  are type annotations (the kind is unchanged: ``isinstance`` takes the class).

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> class Count(nnx.Variable): pass
      >>> c = Count(jnp.array(0), tag='steps')
      >>> c[...] += 1
      >>> int(c[...]), c.tag, int(c + 10)
      (1, 'steps', 11)
      >>> type(jax.tree.map(lambda x: x * 5, c)).__name__   # a pytree: kind and metadata kept
      'Count'

  Every Variable has the metadata ``hijax``, ``ref`` and ``eager_sharding``,
  fixed at creation from the arguments or the current defaults
  (``nnx.var_defaults``, ``nnx.use_eager_sharding``). A Variable may only be
  written in the JAX trace it was created in (``TraceContextError`` otherwise):
  pass its owner to an NNX transform instead of closing over it.

  Args:
    value: the value; a Variable passed here lends its metadata (not its
      required metadata) and its value.
    hijax: back the Variable by a hijax Cell (default: ``nnx.var_defaults()``).
    ref: back the Variable by a ``jax.Ref`` (default: ``nnx.var_defaults()``).
    eager_sharding: place the value on the mesh now when it has ``out_sharding``
      metadata (default: ``nnx.use_eager_sharding``).
    **metadata: any other metadata (``tag``, ``out_sharding``, hooks, ...), read
      back as attributes (``v.tag``).
  """

  __slots__ = ('_value', '_meta', '_trace', '__weakref__', '__dict__')
  required_metadata = REQUIRED_METADATA

  # ``Param[jax.Array]``: an annotation, as for the generic classes of ``typing``.
  __class_getitem__ = classmethod(types.GenericAlias)

  def __init__(self, value: tp.Any, *, hijax: bool | None = None, ref: bool | None = None,
               eager_sharding: bool | None = None, **metadata):
    if isinstance(value, Variable):  # a carrier of metadata (nnx.with_metadata): its own
      metadata = {**value._meta.items, **metadata}  # required metadata is decided anew here
      value = value._value
    settings = _settings.SETTINGS
    defaults = settings.var_defaults
    metadata['hijax'] = defaults['hijax'] if hijax is None else bool(hijax)
    metadata['ref'] = defaults['ref'] if ref is None else bool(ref)
    metadata['eager_sharding'] = (settings.eager_sharding if eager_sharding is None
                                  else bool(eager_sharding))
    if 'out_sharding' in metadata:  # eager placement on the mesh
      value = shard_new_value(value, metadata)
    object.__setattr__(self, '_value', value)
    object.__setattr__(self, '_meta', _make_meta(metadata))
    object.__setattr__(self, '_trace', current_trace())
    if metadata['hijax'] or metadata['ref']:  # hijax hook: becomes a Cell/Ref-backed twin
      adopt(self)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if not cls.__dict__.get('_arbax_hijax_kind'):  # hijax hook: twins register themselves
      _register(cls)
    # A subclass with its own get_value sees every read through it, ``v[...]`` and
    # ``v.value`` included (as in NNX); the base class reads its slot directly.
    if 'get_value' in cls.__dict__:
      if '__getitem__' not in cls.__dict__:
        cls.__getitem__ = _read_through_get_value
      if 'value' not in cls.__dict__:
        cls.value = property(lambda self: self.get_value(), Variable.value.fset,
                             doc=Variable.value.__doc__)

  # -- construction without __init__ (pytree unflatten, merge, transforms) --
  @classmethod
  def _from_parts(cls, value, meta: VarMeta):
    obj = object.__new__(cls)
    object.__setattr__(obj, '_value', value)
    object.__setattr__(obj, '_meta', meta)
    object.__setattr__(obj, '_trace', current_trace())
    return obj

  # -- value access --
  def _check_trace(self):
    if self._trace is not current_trace():
      raise TraceContextError(
          f'Cannot mutate {type(self).__name__} from a different trace level: it was created '
          'outside the transform that is running now. Pass the object that holds it as an '
          'argument (NNX transforms propagate the update) or call nnx.clone(...) on it inside.')

  @property
  def value(self):
    """The value (``v.value = x`` replaces it through ``set_value``); ``v[...]`` is the same."""
    return self._value

  @value.setter
  def value(self, new_value):
    self.set_value(new_value)

  def get_value(self, index: tp.Any = ...):
    """The value, or ``value[index]``.

        >>> import jax.numpy as jnp, arbax as nnx
        >>> v = nnx.Param(jnp.arange(3.0))
        >>> v.get_value().tolist(), float(v.get_value(1))
        ([0.0, 1.0, 2.0], 1.0)

    Args:
      index: what to index the value with; ``...`` (the default) is the whole value.

    Returns:
      The value (not a copy) or the indexed part.
    """
    return self._value if index is ... else self._value[index]

  def get_raw_value(self):
    """The value as stored, without ``get_value`` overrides of subclasses.

    Returns:
      The stored value (for a hijax / ref Variable, what its Cell or Ref holds).
    """
    return self._value

  def set_raw_value(self, value) -> None:
    """Store ``value`` as it is, without ``set_value`` overrides of subclasses.

    Args:
      value: the new value, stored unchanged (no casting, no index).
    """
    self._check_trace()
    object.__setattr__(self, '_value', value)

  @property
  def shape(self):
    """The value's shape (``v.shape`` for ``v[...].shape``)."""
    return self._value.shape

  def set_value(self, new_value, *, index: tp.Any = _NO_INDEX):
    """Replace the value; with ``index``, assign into it (``v[index] = x`` semantics).

    An indexed write of an array keeps its shape and dtype (``x`` is broadcast
    and cast) and never mutates the old array.

        >>> import jax.numpy as jnp, arbax as nnx
        >>> v = nnx.Param(jnp.zeros(3))
        >>> v.set_value(5.0, index=0)
        >>> v[...].tolist()
        [5.0, 0.0, 0.0]
        >>> v.set_value(jnp.ones(2))     # no index: any new value
        >>> v.shape
        (2,)

    Args:
      new_value: the new value (a Variable stands for its value).
      index: where to assign into the current value; omit it to replace the value.
    """
    self._check_trace()
    new_value = _unwrap(new_value)
    if index is not _NO_INDEX:
      new_value = _set_at(self._value, index, new_value)
    object.__setattr__(self, '_value', new_value)

  def __getitem__(self, index):
    # `v[...]` is the whole value as it is, of any kind (arrays, lists, scalars): no indexing
    # op is dispatched for the most common read of all.
    if index is ...:
      return self._value
    return self._value[index]

  def __setitem__(self, index, new_value):
    self.set_value(new_value, index=index)

  def __delitem__(self, index):
    value = self.get_value()
    del value[index]  # containers (dict, list); arrays raise TypeError as they would
    self.set_value(value)

  def __call__(self, *args, **kwargs):
    """Call the value: a Variable holding a function or a callable object acts as it."""
    return self._value(*args, **kwargs)

  # -- metadata --
  @tp.overload
  def get_metadata(self, name: None = None, *,
                   exclude_required: bool | None = None) -> dict[str, tp.Any]: ...
  @tp.overload
  def get_metadata(self, name: str, default: tp.Any = ...) -> tp.Any: ...
  def get_metadata(self, name: str | None = None, default: tp.Any = _MISSING, *,
                   exclude_required: bool | None = None) -> tp.Any:
    """All metadata as a new dict, or the entry ``name`` (``default`` when it is missing).

        >>> import arbax as nnx
        >>> p = nnx.Param(1.0, tag='w')
        >>> p.get_metadata('tag'), p.get_metadata('lr', 0.1)
        ('w', 0.1)
        >>> p.get_metadata(exclude_required=True)
        {'tag': 'w'}

    Args:
      name: the entry to read; without it, a copy of every entry.
      default: returned when ``name`` is missing (else KeyError).
      exclude_required: leave out ``hijax``, ``ref`` and ``eager_sharding``.

    Returns:
      The entry's value, or a dict of the entries.
    """
    items = self._meta.items
    if name is None:
      if default is not _MISSING:
        raise TypeError(f'get_metadata() got default={default!r} without a name: a default is '
                        "for one entry, as in v.get_metadata('tag', None).")
      if exclude_required:
        return {k: v for k, v in items.items() if k not in REQUIRED_METADATA}
      return dict(items)
    if exclude_required is not None:
      raise TypeError("get_metadata() takes either a name or exclude_required=, not both.")
    if default is _MISSING:
      return items[name]
    return items.get(name, default)

  def has_metadata(self, name: str) -> bool:
    """Whether the metadata has an entry ``name``.

        >>> import arbax as nnx
        >>> nnx.Param(1.0, tag='w').has_metadata('tag'), nnx.Param(1.0).has_metadata('tag')
        (True, False)

    Args:
      name: the entry.

    Returns:
      True if the entry exists.
    """
    return name in self._meta.items

  def set_metadata(self, *args, **kwargs) -> None:
    """Change metadata in place, e.g. ``v.set_metadata(tag='x')``.

    ``v.set_metadata(tag='x')`` or ``v.set_metadata('tag', 'x')`` update entries;
    ``v.set_metadata({...})`` replaces them all. ``hijax``, ``ref`` and
    ``eager_sharding`` are fixed when the Variable is created: a dict without
    them keeps the current ones, and a different value is a ValueError.

        >>> import arbax as nnx
        >>> v = nnx.Param(1.0)
        >>> v.set_metadata(tag='w')
        >>> v.tag
        'w'

    Args:
      *args: one dict (all the metadata), or a name and a value.
      **kwargs: entries to update.
    """
    if args and kwargs:
      raise TypeError('Cannot mix positional and keyword arguments in set_metadata: pass one '
                      "dict, a name and a value, or keywords (v.set_metadata(tag='x')).")
    current = self._meta.items
    if len(args) == 1:
      items = dict(args[0])
      for key in REQUIRED_METADATA:
        items.setdefault(key, current.get(key))
    elif len(args) == 2:
      items = {**current, args[0]: args[1]}
    elif kwargs and not args:
      items = {**current, **kwargs}
    else:
      raise TypeError('set_metadata takes either 1 or 2 arguments, or at least 1 keyword '
                      f'argument, got args={args}, kwargs={kwargs}')
    for key in REQUIRED_METADATA:
      if items.get(key) != current.get(key):
        raise ValueError(f'Cannot change `{key}` metadata of this {type(self).__name__}, expected '
                         f'{current.get(key)}, got {items.get(key)}: it is fixed when the Variable '
                         f'is created. Create a new one, e.g. v.replace({key}=...) or '
                         'nnx.with_vars(...) for hijax/ref.')
    self._check_trace()
    object.__setattr__(self, '_meta', _make_meta(items))
    _settings.bump_epoch()

  def del_metadata(self, name: str) -> None:
    """Remove the metadata entry ``name`` (``hijax``, ``ref`` and ``eager_sharding`` must stay).

        >>> import arbax as nnx
        >>> v = nnx.Param(1.0, tag='w')
        >>> v.del_metadata('tag')
        >>> v.has_metadata('tag')
        False

    Args:
      name: the entry; a missing one raises KeyError.
    """
    if name in REQUIRED_METADATA:
      raise ValueError(f'Cannot delete `{name}` metadata: every Variable has it.')
    self._check_trace()
    items = dict(self._meta.items)
    del items[name]
    object.__setattr__(self, '_meta', _make_meta(items))
    _settings.bump_epoch()

  # -- hooks: a transform (vmap, scan, transform_metadata) added/removed a mapped axis --
  def add_axis(self, axis_index: int, axis_name) -> None:
    """Called after a transform added axis ``axis_index``; runs the ``on_add_axis`` metadata hooks.

    Override it (calling ``super()``) to keep custom metadata in step with the
    value's axes; ``nnx.vmap`` / ``nnx.scan`` call it on the Variables they stack.

    Args:
      axis_index: the position of the new axis in the value.
      axis_name: the name the transform gives it (``transform_metadata``), or None.
    """
    _run_hooks(self, 'on_add_axis', axis_index, axis_name)

  def remove_axis(self, axis_index: int, axis_name) -> None:
    """Called when a transform maps over axis ``axis_index``; runs the ``on_remove_axis`` hooks.

    Args:
      axis_index: the position of the mapped axis in the value.
      axis_name: the name the transform gives it, or None.
    """
    _run_hooks(self, 'on_remove_axis', axis_index, axis_name)

  @property
  def hijax(self) -> bool:
    """Whether the Variable is backed by a hijax Cell (fixed at creation)."""
    return self._meta.items.get('hijax', False)

  @property
  def ref(self) -> bool:
    """Whether the Variable is backed by a ``jax.Ref`` (fixed at creation)."""
    return self._meta.items.get('ref', False)

  @property
  def type(self):
    """The Variable's kind, ``type(v)`` (``var_type`` is the same)."""
    return type(self)

  var_type = type

  def __getattr__(self, name):
    # Only reached when normal lookup fails: metadata first, then the value's attributes.
    if name.startswith('__') or name in Variable.__slots__:
      raise AttributeError(name)
    try:
      return self._meta.items[name]
    except (AttributeError, KeyError):
      pass
    try:
      value = object.__getattribute__(self, '_value')
    except AttributeError:
      raise AttributeError(name) from None
    try:
      return getattr(value, name)
    except AttributeError:
      raise AttributeError(
          f'{type(self).__name__!r} has no attribute or metadata {name!r}, '
          f'and its value of type {type(value).__name__} has no attribute {name!r}') from None

  def __setattr__(self, name, value):
    # Only ``value``, private names and settable class attributes (properties, slots) are
    # attributes; metadata is changed with set_metadata, as in NNX, so a typo cannot
    # silently create metadata.
    if name == 'value':
      self.set_value(value)
    elif name.startswith('_') or _is_data_descriptor(type(self), name):
      object.__setattr__(self, name, value)
    else:
      raise AttributeError(
          f'Cannot set attribute {name!r} of a {type(self).__name__}: Variables have no '
          f'attributes besides value. To set metadata use v.set_metadata({name}=value) or '
          f"v.set_metadata('{name}', value).")

  def __delattr__(self, name):
    if name.startswith('_') or _is_data_descriptor(type(self), name):
      object.__delattr__(self, name)
    else:
      raise AttributeError(
          f'Cannot delete attribute {name!r} of a {type(self).__name__}. To delete metadata '
          f"use v.del_metadata('{name}').")

  # -- copies --
  def copy(self, value: tp.Any = ..., **metadata):
    """A new Variable of the same kind: this (or a new) value, this (or updated) metadata.

    The copy belongs to the current trace, so it may be written where it is made.

        >>> import arbax as nnx
        >>> p = nnx.Param(1.0, tag='a')
        >>> q = p.copy(2.0, tag='b')
        >>> q[...], q.tag, p[...], p.tag
        (2.0, 'b', 1.0, 'a')

    Args:
      value: the copy's value; ``...`` (the default) keeps this one's (not copied).
      **metadata: entries to change in the copy.

    Returns:
      The new Variable.
    """
    meta = self._meta if not metadata else _make_meta({**self._meta.items, **metadata})
    new = type(self)._from_parts(self._value, meta)
    if value is not ...:
      object.__setattr__(new, '_value', _unwrap(value))
    if metadata and not STORE_METADATA.isdisjoint(metadata):  # hijax hook: hijax/ref/mutable
      adopt(new)
    return new

  def replace(self, value: tp.Any = ..., **metadata):
    """Same as ``copy``: a new Variable with ``value`` and/or updated metadata.

        >>> import arbax as nnx
        >>> nnx.Param(1.0).replace(3.0)[...]
        3.0

    Args:
      value: the new value; ``...`` keeps this one's.
      **metadata: entries to change.

    Returns:
      The new Variable.
    """
    return self.copy(value, **metadata)

  to_state = replace  # NNX's older name, from when states were a separate type

  @classmethod
  def from_metadata(cls, value: tp.Any, metadata: dict):
    """A Variable of this kind from a value and its complete metadata, without running ``__init__``.

    The inverse of ``get_metadata()``: ``type(v).from_metadata(v[...],
    v.get_metadata())`` is a copy of ``v``.

        >>> import arbax as nnx
        >>> v = nnx.Param(1.0, tag='w')
        >>> w = nnx.Param.from_metadata(2.0, v.get_metadata())
        >>> w[...], w.tag
        (2.0, 'w')

    Args:
      value: the value.
      metadata: every entry, the required ``hijax``, ``ref`` and ``eager_sharding`` included.

    Returns:
      The new Variable.
    """
    obj = cls._from_parts(value, _make_meta(dict(metadata)))
    if metadata.get('hijax') or metadata.get('ref'):  # hijax hook, as in __init__
      adopt(obj)
    return obj

  def copy_from(self, other: 'Variable') -> None:
    """Take ``other``'s value and metadata, in place (``other`` must be of the same kind).

        >>> import arbax as nnx
        >>> v = nnx.Param(1.0)
        >>> v.copy_from(nnx.Param(2.0, tag='w'))
        >>> v[...], v.tag
        (2.0, 'w')

    Args:
      other: a Variable of exactly this kind (else ValueError).
    """
    if type(self) is not type(other):
      raise ValueError(f'Cannot copy from incompatible container, expected '
                       f'{type(self).__name__}, got {type(other).__name__}')
    if self is not other:
      self._check_trace()
      object.__setattr__(self, '_value', other._value)
      object.__setattr__(self, '_meta', other._meta)
      _settings.bump_epoch()

  def update_from_state(self, state: 'Variable') -> None:
    """Take the value and metadata of ``state``, in place, keeping this Variable's ``hijax``/``ref``.

    Unlike ``copy_from`` the kinds may differ; metadata ``state`` lacks is dropped.

    Args:
      state: a Variable holding the new value and metadata.
    """
    self._check_trace()
    object.__setattr__(self, '_value', _unwrap(state))
    if state._meta is not self._meta:
      items = {**state._meta.items, 'hijax': self.hijax, 'ref': self.ref}
      object.__setattr__(self, '_meta', _make_meta(items))
      _settings.bump_epoch()

  def __copy__(self):
    return self.copy()

  def __deepcopy__(self, memo):
    import copy as _copy
    return type(self)._from_parts(_copy.deepcopy(self._value, memo), self._meta)

  def __reduce__(self):
    return (_rebuild_variable, (type(self), self._value, dict(self._meta.items)))

  # -- array protocol --
  def __jax_array__(self):
    return jax.numpy.asarray(self._value)

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self._value, dtype=dtype)

  def __len__(self):
    return len(self._value)

  def __iter__(self):
    return iter(self._value)

  def __bool__(self):
    return bool(self._value)

  def __int__(self):
    return int(self._value)

  def __float__(self):
    return float(self._value)

  def __complex__(self):
    return complex(self._value)

  def __index__(self):
    return operator.index(self._value)

  def __round__(self, ndigits=None):
    return round(self._value, ndigits)

  def __contains__(self, item):
    return item in self._value

  __hash__ = object.__hash__

  def __repr__(self):
    return reprhook.render(self)

  def __treescope_repr__(self, path, subtree_renderer):
    return reprhook.render_treescope(self, path, subtree_renderer)


def _is_data_descriptor(cls: type, name: str) -> bool:
  """Whether ``cls`` (or a base) defines ``name`` as something assignable (a property, a slot)."""
  for klass in cls.__mro__:
    if name in klass.__dict__:
      return hasattr(klass.__dict__[name], '__set__')
  return False


def _run_hooks(variable: Variable, key: str, axis_index: int, axis_name) -> None:
  hooks = variable._meta.items.get(key, ())
  for hook in hooks if isinstance(hooks, (tuple, list)) else (hooks,):
    hook(variable, axis_index, axis_name)


def _rebuild_variable(cls, value, metadata):
  return cls._from_parts(value, _make_meta(metadata))


def _set_at(current, index, new_value):
  """``current[index] = new_value`` without mutating ``current``.

  For arrays ``v[...] = x`` keeps the shape and dtype (``x`` is broadcast and cast), as
  NNX does; an array of the same shape and dtype is taken as it is.
  """
  if isinstance(current, jax.Array):
    if (index is ... and isinstance(new_value, jax.Array) and new_value.shape == current.shape
        and new_value.dtype == current.dtype):
      return new_value
    return current.at[index].set(new_value)
  if index is ... and not hasattr(current, 'shape'):
    return new_value  # a scalar or a pytree value: `v[...] = x` replaces it
  if isinstance(current, np.ndarray):
    current = current.copy()
    current[index] = new_value
    return current
  if hasattr(current, 'at'):
    return current.at[index].set(new_value)
  if isinstance(current, (list, dict)):
    current = type(current)(current)
    current[index] = new_value
    return current
  raise TypeError(f'cannot assign to index {index!r} of a value of type {type(current).__name__}')


def _binary(op):
  def forward(self, other):
    return op(self._value, _unwrap(other))

  def reflected(self, other):
    return op(_unwrap(other), self._value)

  def inplace(self, other):
    self.set_value(op(self._value, _unwrap(other)))
    return self

  return forward, reflected, inplace


for _name, _op in [('add', operator.add), ('sub', operator.sub), ('mul', operator.mul),
                   ('truediv', operator.truediv), ('floordiv', operator.floordiv),
                   ('mod', operator.mod), ('pow', operator.pow), ('matmul', operator.matmul),
                   ('and', operator.and_), ('or', operator.or_), ('xor', operator.xor),
                   ('lshift', operator.lshift), ('rshift', operator.rshift)]:
  _f, _r, _i = _binary(_op)
  setattr(Variable, f'__{_name}__', _f)
  setattr(Variable, f'__r{_name}__', _r)
  setattr(Variable, f'__i{_name}__', _i)

_divmod, _rdivmod, _ = _binary(divmod)  # divmod has no in-place form
for _name, _fn in [('__divmod__', _divmod), ('__rdivmod__', _rdivmod)]:
  setattr(Variable, _name, _fn)

for _name, _op in [('lt', operator.lt), ('le', operator.le), ('gt', operator.gt),
                   ('ge', operator.ge), ('eq', operator.eq), ('ne', operator.ne)]:
  setattr(Variable, f'__{_name}__', _binary(_op)[0])

for _name, _op in [('neg', operator.neg), ('pos', operator.pos), ('abs', operator.abs),
                   ('invert', operator.invert)]:
  setattr(Variable, f'__{_name}__', (lambda op: lambda self: op(self._value))(_op))
Variable.__hash__ = object.__hash__


def _read_through_get_value(self, index):
  return self.get_value(index=index)


def _flatten(v):
  return (v._value,), v._meta


def _flatten_with_keys(v):
  return ((_VALUE_KEY, v._value),), v._meta


_new = object.__new__
_set_value_slot = Variable.__dict__['_value'].__set__
_set_meta_slot = Variable.__dict__['_meta'].__set__
_set_trace_slot = Variable.__dict__['_trace'].__set__


def _register(cls):
  # The unflatten runs for every Variable each time JAX rebuilds a tree (jax.jit outputs,
  # jax.tree.map): it writes the slots directly instead of going through _from_parts.
  def unflatten(meta, children):
    obj = _new(cls)
    _set_value_slot(obj, children[0])
    _set_meta_slot(obj, meta)
    _set_trace_slot(obj, _trace_token())
    return obj

  jax.tree_util.register_pytree_with_keys(cls, _flatten_with_keys, unflatten, _flatten)


_register(Variable)


# -- the kinds NNX names ------------------------------------------------------
class Param(Variable):
  """A trainable parameter: what ``nnx.grad`` and ``nnx.Optimizer`` differentiate by default.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> class Scale(nnx.Module):
      ...   def __init__(self):
      ...     self.w = nnx.Param(jnp.array(2.0))
      ...     self.n = nnx.BatchStat(jnp.array(0.0))
      >>> list(nnx.grad(lambda m: m.w * m.n + m.w ** 2)(Scale()))   # only Params
      ['w']
  """


class BatchStat(Variable):
  """Running statistics (BatchNorm's mean and var): state, not trained.

      >>> import arbax as nnx
      >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> sorted(nnx.state(bn, nnx.BatchStat))
      ['mean', 'var']
  """


class Cache(Variable):
  """Decoding caches (attention keys and values): state kept between calls, not trained.

      >>> import jax.numpy as jnp, arbax as nnx
      >>> nnx.Cache(jnp.zeros((1, 4))).shape
      (1, 4)
  """


class Intermediate(Variable):
  """Values recorded with ``Module.sow`` (read back with ``nnx.capture``).

      >>> import arbax as nnx
      >>> class Probe(nnx.Module):
      ...   def __call__(self, x):
      ...     self.sow(nnx.Intermediate, 'x', x)
      ...     return x
      >>> _, found = nnx.capture(Probe(), nnx.Intermediate)(1.0)
      >>> type(found['x']).__name__, found['x'][...]
      ('Intermediate', (1.0,))
  """


class Perturbation(Intermediate):
  """Zeros added with ``Module.perturb`` whose gradient is the gradient of an intermediate.

  A kind of ``Intermediate`` (as in NNX): the filter ``nnx.Intermediate`` selects them too.

      >>> import arbax as nnx
      >>> isinstance(nnx.Perturbation(0.0), nnx.Intermediate)
      True
  """


class use_eager_sharding(_settings.ScopedSetting):
  """Whether new Variables with ``out_sharding`` metadata are placed on the mesh when created.

  On by default, as in NNX. ``nnx.use_eager_sharding(False)`` changes the default
  for the program, ``with nnx.use_eager_sharding(False): ...`` for a block, and
  ``@nnx.use_eager_sharding(False)`` for a function. A Variable records the value
  it was created with as its ``eager_sharding`` metadata:

      >>> import arbax as nnx
      >>> with nnx.use_eager_sharding(False):
      ...   nnx.Param(1.0).eager_sharding
      False
      >>> nnx.Param(1.0).eager_sharding
      True

  Args:
    value: the new default.
  """

  _field = 'eager_sharding'


def using_eager_sharding() -> bool:
  """The current default of ``use_eager_sharding`` (whether new Variables shard eagerly).

      >>> import arbax as nnx
      >>> with nnx.use_eager_sharding(False):
      ...   nnx.variablelib.using_eager_sharding()
      False

  Returns:
    The default, a bool.
  """
  return _settings.SETTINGS.eager_sharding


@dataclasses.dataclass(frozen=True)
class VarDefaults(tp.Mapping[str, bool]):
  """The defaults new Variables get, as ``nnx.var_defaults()`` found them: a read-only mapping.

      >>> import arbax as nnx
      >>> d = nnx.var_defaults()
      >>> d.hijax, dict(d)
      (False, {'hijax': False, 'ref': False})

  Args:
    hijax: the default of ``hijax``.
    ref: the default of ``ref``.
  """

  hijax: bool
  ref: bool

  def __getitem__(self, key: str) -> bool:
    if key not in ('hijax', 'ref'):
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self) -> tp.Iterator[str]:
    return iter(('hijax', 'ref'))

  def __len__(self) -> int:
    return 2


class VarDefaultsContext(_settings.ScopedSetting):
  """What ``nnx.var_defaults(hijax=..., ref=...)`` returns: the new defaults are in effect at once.

  A ``with`` block restores the previous ones on exit, and used as a decorator
  it applies them only while the function runs.

      >>> import arbax as nnx
      >>> @nnx.var_defaults(ref=True)
      ... def make():
      ...   return nnx.Param(0.0)
      >>> make().ref, nnx.Param(0.0).ref
      (True, False)

  Args:
    value: the complete new defaults, ``{'hijax': bool, 'ref': bool}``.
  """

  _field = 'var_defaults'

  def _convert(self, value):
    return value


@tp.overload
def var_defaults() -> VarDefaults: ...


@tp.overload
def var_defaults(*, hijax: bool | None = None, ref: bool | None = None) -> VarDefaultsContext: ...


def var_defaults(*, hijax: bool | None = None, ref: bool | None = None):
  """Read or set the defaults of ``hijax`` and ``ref`` for new Variables.

      >>> import arbax as nnx
      >>> with nnx.var_defaults(hijax=True):
      ...   nnx.var_defaults().hijax, nnx.Param(1.0).hijax
      (True, True)
      >>> nnx.var_defaults().hijax
      False

  Args:
    hijax: the new default of ``hijax`` (None keeps the current one).
    ref: the new default of ``ref`` (None keeps the current one).
  Returns:
    Without arguments, a ``VarDefaults`` snapshot of the current defaults. With
    arguments, a ``VarDefaultsContext``: the defaults change now (for the program),
    until the end of a ``with`` block, or only inside a decorated function.
  """
  current = _settings.SETTINGS.var_defaults
  if hijax is None and ref is None:
    return VarDefaults(hijax=current['hijax'], ref=current['ref'])
  new = dict(current)
  if hijax is not None:
    new['hijax'] = bool(hijax)
  if ref is not None:
    new['ref'] = bool(ref)
  return VarDefaultsContext(new)


def is_array_ref(x) -> bool:
  """Whether ``x`` is a ``jax.Ref`` (a mutable array), concrete or traced.

      >>> import jax, jax.numpy as jnp, arbax as nnx
      >>> nnx.variablelib.is_array_ref(jax.new_ref(jnp.zeros(2)))
      True
      >>> nnx.variablelib.is_array_ref(jnp.zeros(2)), nnx.variablelib.is_array_ref(1.0)
      (False, False)

  A Variable is not a Ref; ``is_array_ref(v.get_raw_value())`` tells whether a
  ``ref=True`` Variable holds one.

  Args:
    x: anything.

  Returns:
    True for a Ref.
  """
  return isinstance(x, jax.Ref)  # also true of a traced Ref (the check looks at its aval)


@dataclasses.dataclass
class VariableMetadata(tp.Generic[A]):
  """A value with the metadata and hooks to create a Variable from.

  NNX's record type for ``nnx.with_metadata``-style wrappers. arbax Variables
  keep metadata as a plain dict (``get_metadata()``), so this type only
  describes such bundles.

      >>> import arbax as nnx
      >>> m = nnx.VariableMetadata(1.0, metadata={'tag': 'w'})
      >>> m.raw_value, m.metadata
      (1.0, {'tag': 'w'})

  Args:
    raw_value: the value.
    on_set_value, on_get_value, on_create_value, on_add_axis, on_remove_axis: hooks.
    metadata: the other metadata.
  """

  raw_value: A
  on_set_value: tuple[tp.Callable, ...] = ()
  on_get_value: tuple[tp.Callable, ...] = ()
  on_create_value: tuple[tp.Callable, ...] = ()
  on_add_axis: tuple[tp.Callable, ...] = ()
  on_remove_axis: tuple[tp.Callable, ...] = ()
  metadata: tp.Mapping[str, tp.Any] = dataclasses.field(default_factory=dict)


# Linen collection name <-> Variable type, for checkpoints and interop that speak collections.
_NAME_TO_TYPE: dict[str, type[Variable]] = {
    'params': Param, 'batch_stats': BatchStat, 'cache': Cache, 'intermediates': Intermediate,
    'perturbations': Perturbation,
}


VT = tp.TypeVar('VT', bound='type[Variable]')


@tp.overload
def register_variable_name(name: str, typ: VT, *, overwrite: bool = False) -> VT: ...
@tp.overload
def register_variable_name(name: str, typ: None = None, *,
                           overwrite: bool = False) -> tp.Callable[[VT], VT]: ...
def register_variable_name(name: str, typ: type[Variable] | None = None, *,
                           overwrite: bool = False) -> tp.Any:
  """Map the collection name ``name`` to the Variable type ``typ`` (``'params'`` <-> ``Param``).

  Checkpoints and interop code that speak Linen collections use the mapping.
  ``@nnx.register_variable_name('stats')`` on a class works too.

      >>> import arbax as nnx
      >>> @nnx.register_variable_name('step_counts')
      ... class Count(nnx.Variable): pass
      >>> nnx.variable_type_from_name('step_counts') is Count, nnx.variable_name_from_type(Count)
      (True, 'step_counts')

  Args:
    name: the collection name.
    typ: the Variable type; omit it to get a class decorator.
    overwrite: replace an existing mapping of ``name`` (else a ValueError).

  Returns:
    ``typ`` (or the decorator).
  """
  if typ is None:
    return lambda t: register_variable_name(name, t, overwrite=overwrite)
  if not overwrite and name in _NAME_TO_TYPE and _NAME_TO_TYPE[name] is not typ:
    raise ValueError(f'Name {name} already mapped to type {_NAME_TO_TYPE[name]}. To overwrite, '
                     f'call register_variable_name() with `overwrite=True`.')
  _NAME_TO_TYPE[name] = typ
  return typ


def variable_name_from_type(typ: type[Variable], /, *, allow_register: bool = False) -> str:
  """The collection name of a Variable type: the inverse of ``variable_type_from_name``.

      >>> import arbax as nnx
      >>> nnx.variable_name_from_type(nnx.Param), nnx.variable_name_from_type(nnx.BatchStat)
      ('params', 'batch_stats')

  Args:
    typ: the Variable type.
    allow_register: register an unknown type under its class name (else a ValueError).

  Returns:
    The name.
  """
  for name, t in _NAME_TO_TYPE.items():
    if t is typ:
      return name
  if not allow_register:
    raise ValueError(f'Type {typ} is not registered in the registry. To register a new type, '
                     f'use register_variable_name() or set allow_register=True.')
  register_variable_name(typ.__name__, typ)
  return typ.__name__


def variable_type_from_name(name: str, /, *, base: type[Variable] = Variable,
                            allow_register: bool = False) -> type[Variable]:
  """The Variable type of a collection name: the inverse of ``variable_name_from_type``.

      >>> import arbax as nnx
      >>> nnx.variable_type_from_name('params').__name__
      'Param'
      >>> nnx.variable_type_from_name('running_stats', allow_register=True).__name__
      'running_stats'

  Args:
    name: the collection name.
    base: the base class of a type created for an unknown name.
    allow_register: create and register a subclass of ``base`` named ``name``
      for an unknown name (else a ValueError).

  Returns:
    The type.
  """
  if name in _NAME_TO_TYPE:
    return _NAME_TO_TYPE[name]
  if not allow_register:
    raise ValueError(f'Name {name} is not registered in the registry. To register a new name, '
                     f'use register_variable_name() or set allow_register=True.')
  return register_variable_name(name, type(name, (base,), {'__module__': __name__}))
