"""HijaxVariable: Variables whose value lives in a Cell or a ``jax.Ref``, so JAX carries their updates.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> p = nnx.Param(jnp.zeros(2), hijax=True)
    >>> isinstance(p, nnx.Param), isinstance(p, nnx.variablelib.HijaxVariable)
    (True, True)
    >>> type(p.get_raw_value()).__name__     # the store JAX traces
    'Cell'

How it works. Each Variable kind gets store-backed *twins*, subclasses created
on demand with the kind's name: one for hijax Variables (also a subclass of
``HijaxVariable``) and one for ``ref=True`` Variables that are not hijax. So
``isinstance(v, nnx.Param)`` and every filter keep working. A twin turns the
``_value`` slot into a property that reads and writes through the store
(a Cell, see ``arbax.cell``, or a ``jax.Ref``), so no method of ``Variable``
needs to know about stores and plain Variables keep their raw slot speed.

A twin's pytree child is its store, so ``jax.jit`` & co. trace the Cell or Ref
and write updates back to it. A twin may also hold a plain value: NNX
transforms rebuild Variables around traced values, and an *immutable* hijax
Variable (``mutable=False`` metadata) is deliberately a plain value, which
``jax.grad`` differentiates and loops carry; writing to it is an
``ImmutableVariableError``.

``jax.vmap`` maps a hijax Variable as one unit: it is registered as a vmappable
type, so the mapped Variable holds the caller's Cell with a ``CellAxis``
(updates land in the caller's Cell), and a hijax Variable returned from
``vmap`` comes out holding the Cell of the mapped values.

This module sits below ``arbax.variables`` (which calls ``adopt`` when a new
Variable asks for a store): it takes everything it needs from the Variable
classes it is given.
"""
from __future__ import annotations

import copy as copylib
import typing as tp

import jax
import numpy as np
from jax._src import core
from jax._src.interpreters import batching
from jax._src.util import moveaxis
from jax.experimental import hijax as hjx

from arbax import cell as celllib
from arbax.cell import cell_get, cell_set, new_cell
from arbax.errors import ImmutableVariableError

__all__ = ['HijaxVariable', 'adopt', 'twin_kind', 'base_kind', 'store_kind', 'wants_store',
           'STORE_METADATA']

# The metadata that decides how a Variable stores its value.
STORE_METADATA = frozenset({'hijax', 'ref', 'mutable'})

CELL, REF, RAW = 0, 1, 2


def store_kind(store) -> int:
  """CELL, REF or RAW: what a twin's slot holds (concrete or traced)."""
  t = type(store)
  if t is celllib.Cell:
    return CELL
  if isinstance(store, core.Tracer):
    aval = store.aval
    if isinstance(aval, celllib.CellTy):
      return CELL
    if isinstance(aval, hjx.AbstractRef):
      return REF
    return RAW
  if isinstance(store, jax.Ref):
    return REF
  return RAW


def wants_store(items: dict) -> bool:
  """Whether metadata asks for a Cell or a Ref (hijax or ref, and not immutable)."""
  return bool(items.get('hijax') or items.get('ref')) and items.get('mutable', True) is not False


def _ref_able(value) -> bool:
  return isinstance(value, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


def new_store(value, *, ref: bool):
  """A new Cell (or, with ``ref``, a new ``jax.Ref``) holding ``value``."""
  if ref:
    if not _ref_able(value):
      raise TypeError(f'ref=True Variables hold an array or a scalar (in a jax.Ref); got a value '
                      f'of type {type(value).__name__}. Use hijax=True (a Cell holds any pytree).')
    return jax.new_ref(value)
  return new_cell(value)


def _holds_arrays(value) -> bool:
  # JAX builds trees around placeholders (None, object()) while it works; only
  # real values get a store.
  leaves = jax.tree_util.tree_leaves(value)
  return bool(leaves) and all(isinstance(x, (jax.Array, int, float, complex, bool))
                              or hasattr(x, '__array__') for x in leaves)


_SLOTS: dict = {}


def _raw_slot(cls: type):
  """The ``_value`` slot descriptor of a Variable class (under any twin property)."""
  slot = _SLOTS.get(cls)
  if slot is None:
    slot = next((d for c in cls.__mro__ if (d := c.__dict__.get('_value')) is not None
                 and not isinstance(d, property)), None)
    if slot is None:
      raise TypeError(f'{cls.__name__} has no _value slot: not a Variable class')
    _SLOTS[cls] = slot
  return slot


def _store_property(slot):
  """The twins' ``_value``: reads and writes go through the store in ``slot``."""
  get_slot, set_slot = slot.__get__, slot.__set__
  Cell = celllib.Cell

  def get(self):
    store = get_slot(self)
    if type(store) is Cell:  # the common case first: an eager Cell
      return cell_get(store)
    kind = store_kind(store)
    if kind == CELL:
      return cell_get(store)
    if kind == REF:
      return store[...]
    return store

  def set(self, value):
    try:
      store = get_slot(self)
    except AttributeError:  # a twin being built (Variable._from_parts): this is its store
      set_slot(self, value)
      return
    kind = store_kind(store)
    if kind == CELL:
      cell_set(store, value)
    elif kind == REF:
      store[...] = value
    else:
      set_slot(self, value)

  return property(get, set)


if tp.TYPE_CHECKING:
  class _KindAPI:
    """What StoreBacked finds after it in a twin's MRO: the Variable kind (not importable here)."""
    _meta: tp.Any
    _value: tp.Any

    @classmethod
    def _from_parts(cls, value, meta) -> tp.Any: ...
    def _check_trace(self) -> None: ...
    def copy(self, value: tp.Any = ..., **metadata) -> tp.Any: ...
else:
  _KindAPI = object


class StoreBacked(_KindAPI):
  """Mixed into every twin (before the kind): store-aware construction, copies and raw access."""

  __slots__ = ()
  _arbax_hijax_kind = True  # variables.py: twins register their own pytree flatten
  _arbax_slot: tp.Any = None
  _arbax_base_kind: type

  @classmethod
  def _from_parts(cls, value, meta):
    # Whatever JAX or NNX hands over: a (traced) Cell, a Ref, or a raw value.
    # Outside any trace a raw value gets a store when the metadata asks for one
    # (``jax.tree.map`` over hijax Variables keeps them hijax); inside a trace
    # it stays raw, which is what NNX transforms rebuild Variables around.
    obj = super()._from_parts(value, meta)
    if (celllib.is_eager() and store_kind(value) == RAW and wants_store(meta.items)
        and _holds_arrays(value)):
      cls._arbax_slot.__set__(obj, new_store(value, ref=meta.items.get('ref', False)))
    return obj

  def _check_trace(self):
    # JAX itself carries writes to Cells and Refs across traces.
    if store_kind(type(self)._arbax_slot.__get__(self)) == RAW:
      if self._meta.items.get('mutable', True) is False:
        raise ImmutableVariableError(
            f'Cannot write to this {type(self).__name__}: it is immutable (mutable=False), a '
            'plain value for JAX transforms. Write to the mutable original instead, or convert '
            'back with nnx.with_vars(..., mutable=True).')
      super()._check_trace()

  @property
  def type(self):
    return self._arbax_base_kind

  var_type = type

  def get_raw_value(self):
    """The store: a Cell (hijax), a ``jax.Ref`` (ref=True), or the plain value (immutable)."""
    return type(self)._arbax_slot.__get__(self)

  def set_raw_value(self, value) -> None:
    """Replace the store itself (a Cell, a Ref or a plain value) without writing through it."""
    self._check_trace()
    type(self)._arbax_slot.__set__(self, value)

  def copy(self, value: tp.Any = ..., **metadata):
    # The base copy builds the new twin around this one's contents (and writes
    # ``value``); ``adopt`` then settles the class and store the metadata asks
    # for. A copy is independent: its Cell or Ref is never this one's.
    return adopt(super().copy(value, **metadata))

  def replace(self, value: tp.Any = ..., **metadata):
    return self.copy(value, **metadata)

  def __deepcopy__(self, memo):
    return base_kind(type(self)).from_metadata(copylib.deepcopy(self._value, memo),
                                               dict(self._meta.items))

  def __reduce__(self):
    return (_rebuild, (base_kind(type(self)), self._value, dict(self._meta.items)))


def _rebuild(kind, value, items):
  return kind.from_metadata(value, items)


class HijaxVariable(StoreBacked):
  """The base of every hijax Variable: ``isinstance(v, HijaxVariable)`` is ``v.hijax``.

  Not instantiated itself: ``nnx.Param(x, hijax=True)`` is a ``Param`` twin
  that also derives from this class.
  """

  __slots__ = ()


_TWINS: dict = {}


def base_kind(cls: type) -> type:
  """The Variable kind a twin stands for (``cls`` itself for plain kinds)."""
  return cls.__dict__.get('_arbax_base_kind', cls)


def twin_kind(kind: type, *, hijax: bool) -> type:
  """The store-backed twin of a Variable kind: a subclass with the same name, made once."""
  kind = base_kind(kind)
  twin = _TWINS.get((kind, hijax))
  if twin is None:
    slot = _raw_slot(kind)
    ns = {'__slots__': (), '__module__': kind.__module__, '__qualname__': kind.__qualname__,
          '__doc__': kind.__doc__, '_arbax_hijax_kind': True, '_arbax_base_kind': kind,
          '_arbax_slot': slot, '_value': _store_property(slot)}
    mixin = HijaxVariable if hijax else StoreBacked
    twin = type(kind.__name__, (mixin, kind), ns)
    _register(twin, slot, vmappable=hijax)
    _TWINS[(kind, hijax)] = twin
  return twin


_VALUE_KEY = jax.tree_util.GetAttrKey('value')


def _register(twin, slot, *, vmappable: bool):
  # The child is the store itself (the Cell or Ref), so JAX transforms see and carry it.
  get = slot.__get__
  from_parts = twin._from_parts
  jax.tree_util.register_pytree_with_keys(
      twin,
      lambda v: (((_VALUE_KEY, get(v)),), v._meta),
      lambda meta, children: from_parts(*children, meta),  # the one child: the store
      lambda v: ((get(v),), v._meta))
  if vmappable:
    batching.register_vmappable(twin, int, int, _to_elt, _from_elt, None)
    # vmap asks every mapped argument for its aval (for its sharding): a
    # Variable is not an array value, and a TypeError is how JAX is told so.
    core.pytype_aval_mappings[twin] = _not_an_array


def _not_an_array(var):
  raise TypeError(f'A hijax {type(var).__name__} is not a JAX array value: use its value '
                  '(v[...]) where an array is expected.')


def adopt(var, *, fresh: bool = False):
  """Give ``var`` (in place) the class and store its metadata asks for; returns ``var``.

  ``hijax`` / ``ref`` (and not ``mutable=False``): a twin holding a Cell or a
  Ref, reusing the one it has when it is of the right sort (unless ``fresh``);
  immutable hijax: a hijax twin holding the plain value; neither: the plain kind.
  """
  items = var._meta.items
  kind = base_kind(type(var))
  slot = _raw_slot(kind)
  current = slot.__get__(var)
  value = var._value  # the contents, read through the store when there is one
  if items.get('hijax') or items.get('ref'):
    cls = twin_kind(kind, hijax=bool(items.get('hijax')))
  else:
    cls = kind
  if wants_store(items):
    ref = bool(items.get('ref'))
    if fresh or store_kind(current) != (REF if ref else CELL):
      current = new_store(value, ref=ref)
  else:
    current = value
  object.__setattr__(var, '__class__', cls)
  slot.__set__(var, current)
  return var


# -- vmap: a hijax Variable is mapped as one unit ----------------------------------
def _batch_trace(values):
  return next((x._trace for x in values if isinstance(x, batching.BatchTracer)), None)


def _rebuild_in(trace, var, store):
  """``var``'s kind and metadata around ``store``, created as if inside ``trace``."""
  if trace is None:
    return type(var)._from_parts(store, var._meta)
  with core.set_current_trace(trace):
    return type(var)._from_parts(store, var._meta)


def _to_elt(cont, get_idx, var, spec):
  # vmap in: a Cell becomes the caller's Cell tagged with the mapped axis; a
  # Ref or a plain value is mapped leaf by leaf, as JAX maps them anyway.
  if spec is None:
    return var
  store = type(var)._arbax_slot.__get__(var)
  kind = store_kind(store)
  if kind == CELL:
    inner = cont(store, celllib.CellAxis(spec))
    return _rebuild_in(_batch_trace([inner]), var, inner)
  if kind == REF:
    inner = cont(store, spec)
    return _rebuild_in(_batch_trace([inner]), var, inner)
  inner = jax.tree.map(lambda leaf: cont(leaf, spec), store)
  return _rebuild_in(_batch_trace(jax.tree_util.tree_leaves(inner)), var, inner)


def _restack(axis_data, cell, src, dst):
  """A new Cell holding ``cell``'s contents with the mapped axis at ``dst`` (broadcast if unmapped)."""
  def move(x):
    if src is None:
      return batching.broadcast(x, axis_data.size, celllib.canonical_axis(dst, np.ndim(x) + 1),
                                axis_data.explicit_mesh_axis)
    return moveaxis(x, celllib.canonical_axis(src, np.ndim(x)),
                             celllib.canonical_axis(dst, np.ndim(x)))
  return new_cell(jax.tree.map(move, cell_get(cell)))


def _from_elt(cont, axis_size, var, spec):
  # vmap out: a Cell mapped along ``spec`` leaves as the outer Cell holding the
  # stacked values; anything else is unmapped leaf by leaf.
  trace = core.trace_ctx.trace
  parent = getattr(trace, 'parent_trace', None)
  store = type(var)._arbax_slot.__get__(var)
  kind = store_kind(store)
  if kind == CELL:
    val, dim = (trace.to_batch_info(store) if isinstance(trace, batching.BatchTrace)
                else (store, None))
    src = dim.axis if isinstance(dim, celllib.CellAxis) else None
    if spec is batching.infer or spec == src:
      return _rebuild_in(parent, var, val)
    if spec is None:
      raise ValueError(
          f'vmap: a hijax {type(var).__name__} mapped along axis {src} is returned with '
          'out_axes=None (a Variable created inside vmap is per-example, like a jax.Ref). '
          'Return it with an int out_axes, or return a value that is the same for every '
          'example.')
    # Not mapped, or mapped along another axis: a new Cell with the values stacked on ``spec``.
    with core.set_current_trace(parent):
      return type(var)._from_parts(_restack(trace.axis_data, val, src, spec), var._meta)
  if kind == REF:
    return _rebuild_in(parent, var, cont(axis_size, store, spec))
  out = jax.tree.map(lambda leaf: cont(axis_size, leaf, spec), store)
  return _rebuild_in(parent, var, out)
