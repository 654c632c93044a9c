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

import operator
import typing as tp

import jax
import numpy as np
from jax.extend.core import get_opaque_trace_state

from arbax import _settings
from arbax.errors import TraceContextError

_GetAttrKey = jax.tree_util.GetAttrKey
_VALUE_KEY = _GetAttrKey('value')

__all__ = ['Variable', 'Param', 'BatchStat', 'Cache', 'Intermediate', 'Perturbation', 'VarMeta',
           'var_defaults', 'register_variable_name', 'variable_name_from_type',
           'variable_type_from_name']


try:  # JAX's own token for the current trace, read without building a wrapper object
  from jax._src.core import trace_ctx as _trace_ctx
  _trace_ctx.trace._weakref  # noqa: B018  (probe: the attribute exists in this JAX)

  def current_trace():
    """A token for the JAX trace running now (eval, jit, grad, ...); equal tokens, same trace."""
    return _trace_ctx.trace._weakref
except (ImportError, AttributeError):  # other JAX versions: the public, slower API
  def current_trace():
    """A token for the JAX trace running now (eval, jit, grad, ...); equal tokens, same trace."""
    return get_opaque_trace_state(convention='nnx')


def _hashable(x):
  """A hashable stand-in used only to hash metadata (lists -> tuples, dicts -> sorted items)."""
  if isinstance(x, (list, tuple)):
    return tuple(_hashable(e) for e in x)
  if isinstance(x, dict):
    return tuple(sorted((str(k), _hashable(v)) for k, v in x.items()))
  try:
    hash(x)
    return x
  except TypeError:
    return id(x)


class VarMeta:
  """Immutable metadata of a Variable; the static aux data of its pytree node.

  Shared between a Variable and its copies, so equal metadata compares by
  identity first and hashes once.
  """

  __slots__ = ('items', '_hash')

  def __init__(self, items: dict):
    self.items = items
    self._hash = None

  def __hash__(self):
    if self._hash is None:
      self._hash = hash(_hashable(self.items))
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


_EMPTY_META_CACHE: dict = {}


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


def _unwrap(x):
  return x._value if isinstance(x, Variable) else x


class Variable:
  """A mutable container of a value (an array, a scalar or any pytree) with metadata.

  Subclass it to name a kind of state: ``class Count(nnx.Variable): pass``.
  Filters select Variables by kind, so ``nnx.state(model, Count)`` extracts
  only counters.
  """

  __slots__ = ('_value', '_meta', '_trace', '__weakref__', '__dict__')

  def __init__(self, value: tp.Any, *, hijax: bool | None = None, ref: bool | None = None,
               **metadata):
    if isinstance(value, Variable):
      metadata = {**value._meta.items, **metadata}
      value = value._value
    defaults = _settings.SETTINGS.var_defaults
    metadata['hijax'] = defaults['hijax'] if hijax is None else bool(hijax)
    metadata['ref'] = defaults['ref'] if ref is None else bool(ref)
    if 'out_sharding' in metadata:  # sharding hook: eager placement on the mesh
      from arbax.sharding import shard_new_value
      value = shard_new_value(value, metadata)
    object.__setattr__(self, '_value', value)
    object.__setattr__(self, '_meta', _make_meta(metadata))
    object.__setattr__(self, '_trace', current_trace())
    if metadata['hijax'] or metadata['ref']:  # hijax hook: becomes a Cell/Ref-backed twin
      from arbax.hijax import adopt
      adopt(self)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if not cls.__dict__.get('_arbax_hijax_kind'):  # hijax hook: twins register themselves
      _register(cls)

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
    return self._value

  @value.setter
  def value(self, new_value):
    self.set_value(new_value)

  def get_value(self, index: tp.Any = ...):
    return self._value if index is ... else self._value[index]

  def set_value(self, new_value, *, index: tp.Any = _NO_INDEX):
    """Replace the value; with ``index``, assign into it (``v[index] = x`` semantics)."""
    self._check_trace()
    new_value = _unwrap(new_value)
    if index is not _NO_INDEX:
      new_value = _set_at(self._value, index, new_value)
    object.__setattr__(self, '_value', new_value)

  def __getitem__(self, index):
    value = self._value
    # `v[...]` reads the whole value of any kind, not only of arrays (lists, tuples, scalars).
    if index is ... and not hasattr(value, 'shape'):
      return value
    return value[index]

  def __setitem__(self, index, new_value):
    self.set_value(new_value, index=index)

  # -- metadata --
  def get_metadata(self, name: str | None = None, default: tp.Any = ...):
    if name is None:
      return dict(self._meta.items)
    if default is ...:
      return self._meta.items[name]
    return self._meta.items.get(name, default)

  def set_metadata(self, *args, **kwargs):
    """``v.set_metadata(tag='x')`` updates keys; ``v.set_metadata({...})`` replaces all."""
    if args:
      if len(args) != 1 or not isinstance(args[0], dict) or kwargs:
        raise TypeError('set_metadata takes either one dict or keyword arguments')
      items = dict(args[0])
      items.setdefault('hijax', self._meta.items.get('hijax', False))
      items.setdefault('ref', self._meta.items.get('ref', False))
    else:
      items = {**self._meta.items, **kwargs}
    object.__setattr__(self, '_meta', _make_meta(items))
    _settings.bump_epoch()

  def del_metadata(self, name: str):
    items = dict(self._meta.items)
    del items[name]
    object.__setattr__(self, '_meta', _make_meta(items))
    _settings.bump_epoch()

  @property
  def hijax(self) -> bool:
    return self._meta.items.get('hijax', False)

  @property
  def ref(self) -> bool:
    return self._meta.items.get('ref', False)

  @property
  def type(self):
    return type(self)

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
    if name == 'value':
      self.set_value(value)
    elif name.startswith('_') or name in type(self).__dict__:
      object.__setattr__(self, name, value)
    else:
      self.set_metadata(**{name: value})

  # -- copies --
  def copy(self, **metadata):
    """A new Variable of the same kind: same value, same (or updated) metadata."""
    meta = self._meta if not metadata else _make_meta({**self._meta.items, **metadata})
    return type(self)._from_parts(self._value, meta)

  def replace(self, value: tp.Any = ..., **metadata):
    new = self.copy(**metadata)
    if value is not ...:
      object.__setattr__(new, '_value', _unwrap(value))
    return new

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
    from arbax.display import object_repr
    return object_repr(self)

  def __treescope_repr__(self, path, subtree_renderer):
    from arbax.display import treescope_repr
    return treescope_repr(self, path, subtree_renderer)


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

Variable.__divmod__ = lambda self, other: divmod(self._value, _unwrap(other))
Variable.__rdivmod__ = lambda self, other: divmod(_unwrap(other), self._value)

for _name, _op in [('lt', operator.lt), ('le', operator.le), ('gt', operator.gt),
                   ('ge', operator.ge), ('eq', operator.eq), ('ne', operator.ne)]:
  setattr(Variable, f'__{_name}__', _binary(_op)[0])

for _name, _op in [('neg', operator.neg), ('pos', operator.pos), ('abs', operator.abs),
                   ('invert', operator.invert)]:
  setattr(Variable, f'__{_name}__', (lambda op: lambda self: op(self._value))(_op))
Variable.__hash__ = object.__hash__


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
    _set_trace_slot(obj, current_trace())
    return obj

  jax.tree_util.register_pytree_with_keys(cls, _flatten_with_keys, unflatten, _flatten)


_register(Variable)


# -- the kinds NNX names ------------------------------------------------------
class Param(Variable):
  """A trainable parameter: what ``nnx.grad`` and ``nnx.Optimizer`` differentiate by default."""


class BatchStat(Variable):
  """Running statistics (BatchNorm's mean and var): state, not trained."""


class Cache(Variable):
  """Decoding caches (attention keys and values)."""


class Intermediate(Variable):
  """Values recorded with ``Module.sow``."""


class Perturbation(Variable):
  """Zeros added with ``Module.perturb`` whose gradient is the gradient of an intermediate."""


class var_defaults(_settings.ScopedSetting):
  """Defaults for new Variables: ``nnx.var_defaults(hijax=True)`` globally, or as a ``with`` block."""

  _field = 'var_defaults'

  def __init__(self, *, hijax: bool | None = None, ref: bool | None = None):
    current = dict(_settings.SETTINGS.var_defaults)
    if hijax is not None:
      current['hijax'] = bool(hijax)
    if ref is not None:
      current['ref'] = bool(ref)
    super().__init__(current)

  def _convert(self, value):
    return value

  @property
  def hijax(self) -> bool:
    return _settings.SETTINGS.var_defaults['hijax']

  @property
  def ref(self) -> bool:
    return _settings.SETTINGS.var_defaults['ref']


# Linen collection name <-> Variable type, for checkpoints and interop that speak collections.
_NAME_TO_TYPE: dict[str, type[Variable]] = {
    'params': Param, 'batch_stats': BatchStat, 'cache': Cache, 'intermediates': Intermediate,
    'perturbations': Perturbation,
}


def register_variable_name(name: str, typ: type[Variable] | None = None, *, overwrite: bool = False):
  """Map the collection ``name`` to the Variable type ``typ``.

  ``@nnx.register_variable_name('stats')`` on a class works too. A name already
  mapped raises ValueError unless ``overwrite=True``.
  """
  if typ is None:
    return lambda t: register_variable_name(name, t, overwrite=overwrite)
  if not overwrite and name in _NAME_TO_TYPE and _NAME_TO_TYPE[name] is not typ:
    raise ValueError(f'Name {name} already mapped to type {_NAME_TO_TYPE[name]}. To overwrite, '
                     f'call register_variable_name() with `overwrite=True`.')
  _NAME_TO_TYPE[name] = typ
  return typ


def variable_name_from_type(typ: type[Variable], /, *, allow_register: bool = False) -> str:
  """The collection name of a Variable type (``Param`` -> ``'params'``); inverse of
  ``variable_type_from_name``. An unknown type raises ValueError, or with
  ``allow_register=True`` is registered under its class name."""
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
  """The Variable type of a collection name (``'params'`` -> ``Param``). An unknown
  name raises ValueError, or with ``allow_register=True`` gets a new subclass of
  ``base`` named ``name``."""
  if name in _NAME_TO_TYPE:
    return _NAME_TO_TYPE[name]
  if not allow_register:
    raise ValueError(f'Name {name} is not registered in the registry. To register a new name, '
                     f'use register_variable_name() or set allow_register=True.')
  return register_variable_name(name, type(name, (base,), {'__module__': __name__}))
