"""Hijax Variables: Variables whose in-place updates JAX itself carries through transforms.

    >>> import jax, jax.numpy as jnp, arbax as nnx
    >>> v = nnx.Variable(jnp.array(1), hijax=True)
    >>> @jax.jit                     # plain jax.jit, no nnx.state / nnx.update
    ... def inc(v):
    ...   v[...] += 1
    >>> inc(v)
    >>> int(v[...])
    2
    >>> isinstance(nnx.Param(jnp.ones(2), hijax=True), nnx.Param)
    True

How it works. A hijax Variable is still a pytree node of its kind, but its one
child is a ``Cell``: a mutable box registered with ``jax.experimental.hijax`` as
a *mutable hi-type*. JAX traces a Cell as one value whose type state (the
avals of what it holds) may change; reads and writes are the hi-primitives
``cell_get`` / ``cell_set``, and at the end of ``jit``, ``scan``, ``cond``...
JAX writes the final contents back into the caller's Cell, for arguments and
closed-over Cells alike.

Each Variable kind gets one hijax twin (``hijax_kind(nnx.Param)``), a subclass
created on demand with the same name, so ``isinstance(v, nnx.Param)`` and every
filter keep working. The twin turns the ``_value`` slot into a property that
reads and writes through the Cell, so no method of ``Variable`` needs to know
about Cells and plain Variables keep their raw slot speed. A twin holding a
plain value (what NNX transforms and ``merge`` build inside a trace) behaves
like an ordinary Variable.

``ref=True`` Variables hold a ``jax.new_ref`` mutable array instead of a Cell
(arrays only: a Ref cannot change shape or dtype).

``jax.grad`` cannot differentiate a mutable hi-type yet: convert first with
``nnx.with_vars(params, hijax=False)`` (``nnx.vars_as`` is the older name).
"""
from __future__ import annotations

import dataclasses
import typing as tp

import jax
from jax._src import core
from jax._src import effects as _effects
from jax._src.interpreters import batching
from jax.experimental import hijax as hjx

from arbax import filters as filterlib
from arbax.variables import current_trace, Variable, VarMeta, _make_meta

__all__ = ['with_vars', 'vars_as', 'hijax_kind', 'Cell']

_SLOT = Variable.__dict__['_value']  # the raw storage, under the twins' property
_tree_flatten = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten

GRAD_HINT = ('jax.grad cannot differentiate hijax Variables (mutable hijax types) yet. '
             'Convert them first: jax.grad(loss_fn)(nnx.with_vars(params, hijax=False)) '
             '(or nnx.vars_as(params, hijax=False)), or use nnx.grad.')


class HijaxGradError(NotImplementedError):
  """Raised when autodiff reaches a hijax Variable that was passed as a differentiated input."""


# -- the hi-type ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class CellState(core.QuasiDynamicData):
  """The type state of a Cell: the structure and avals of what it holds right now."""
  treedef: tp.Any
  avals: tuple

  def to_tangent_qdd(self):
    return CellState(self.treedef, tuple(a.to_tangent_aval() for a in self.avals))

  def normalize(self):
    return CellState(self.treedef, tuple(a.normalize() for a in self.avals))


class CellTy(hjx.MutableHiType):
  """The abstract type of every Cell; what it holds lives in the CellState."""

  def __hash__(self):
    return hash(CellTy)

  def __eq__(self, other):
    return isinstance(other, CellTy)

  def str_short(self, short_dtypes=False, **_):
    return 'Cell'

  def lo_ty_qdd(self, state):
    return [lo for a in state.avals for lo in a.lo_ty()]

  def new_from_loval(self, state, *lo_vals):
    return Cell(_raise(state, lo_vals))

  def read_loval(self, state, cell):
    leaves = _tree_flatten(cell_get(cell))[0]
    return [lo for a, x in zip(state.avals, leaves) for lo in a.lower_val(x)]

  def update_from_loval(self, state, cell, *lo_vals):
    cell_set(cell, _raise(state, lo_vals))

  def to_tangent_aval(self):
    # JAX asks even for Cells only read inside grad (closures); those get a
    # symbolic zero tangent, and the primitives below refuse non-zero ones.
    return CellTy()


def _raise(state: CellState, lo_vals):
  it = iter(lo_vals)
  leaves = [a.raise_val(*[next(it) for _ in a.lo_ty()]) for a in state.avals]
  return _tree_unflatten(state.treedef, leaves)


class Cell:
  """A mutable box JAX traces as one hijax value (see the module docstring)."""

  __slots__ = ('contents',)

  def __init__(self, contents):
    self.contents = contents

  def cur_qdd(self):
    leaves, treedef = _tree_flatten(self.contents)
    return CellState(treedef, tuple(core.typeof(x) for x in leaves))

  type_state = cur_qdd

  def __repr__(self):
    return f'Cell({self.contents!r})'

  # Enough of the array protocol for code that maps over leaves outside any
  # trace (``tx.init(params)`` in optax calls ``jnp.zeros_like`` on each leaf).
  def __jax_array__(self):
    return jax.numpy.asarray(self.contents)

  def __array__(self, dtype=None, copy=None):
    import numpy as np
    return np.asarray(self.contents, dtype=dtype)

  shape = property(lambda self: jax.numpy.shape(self.contents))
  dtype = property(lambda self: jax.numpy.result_type(self.contents))
  ndim = property(lambda self: jax.numpy.ndim(self.contents))
  size = property(lambda self: jax.numpy.size(self.contents))



def _cell_op(op):
  def forward(self, *other):
    return op(self.contents, *other)
  return forward


import operator as _op  # noqa: E402
for _name in ('add', 'sub', 'mul', 'truediv', 'floordiv', 'mod', 'pow', 'matmul', 'neg', 'abs',
              'lt', 'le', 'gt', 'ge', 'getitem'):
  setattr(Cell, f'__{_name}__', _cell_op(getattr(_op, _name)))
for _name in ('add', 'sub', 'mul', 'truediv', 'matmul', 'pow'):
  setattr(Cell, f'__r{_name}__', _cell_op((lambda f: lambda a, b: f(b, a))(getattr(_op, _name))))

hjx.register_hitype(Cell, lambda cell: CellTy())


class CellEffect(_effects.Effect):
  """Orders Cell reads and writes; allowed inside control flow and custom derivatives."""


cell_effect = CellEffect()
hjx.control_flow_allowed_effects.add_type(CellEffect)
_effects.custom_derivatives_allowed_effects.add_type(CellEffect)
_effects.remat_allowed_effects.add_type(CellEffect)


def _is_zero(t) -> bool:
  return type(t) is hjx.Zero


class _NewCell(hjx.HiPrimitive):
  def is_high(self, *avals, treedef) -> bool:
    return True

  def abstract_eval(self, *avals, treedef):
    return core.AvalQDD(CellTy(), CellState(treedef, tuple(avals))), {cell_effect}

  def to_lojax(self, *leaves, treedef):
    return Cell(_tree_unflatten(treedef, leaves))

  def jvp(self, primals, tangents, *, treedef):
    if not all(_is_zero(t) for t in tangents):
      raise HijaxGradError('creating a hijax Variable from a value being differentiated. '
                           + GRAD_HINT)
    out = self.bind(*primals, treedef=treedef)
    return out, hjx.Zero(CellTy())


class _GetCell(hjx.HiPrimitive):
  multiple_results = True

  def abstract_eval(self, cell_ty, *, avals):
    return list(avals), {cell_effect}

  def to_lojax(self, cell, *, avals):
    return _tree_flatten(cell.contents)[0]

  def jvp(self, primals, tangents, *, avals):
    if not _is_zero(tangents[0]):
      raise HijaxGradError('reading a hijax Variable passed as a differentiated input. '
                           + GRAD_HINT)
    outs = self.bind(*primals, avals=avals)
    return outs, [hjx.Zero(a.to_tangent_aval()) for a in avals]


class _SetCell(hjx.HiPrimitive):
  multiple_results = True

  def abstract_eval(self, cell_ty, *avals, treedef):
    cell_ty.mutable_qdd.update(CellState(treedef, tuple(avals)))
    return [], {cell_effect}

  def to_lojax(self, cell, *leaves, treedef):
    cell.contents = _tree_unflatten(treedef, leaves)
    return []

  def jvp(self, primals, tangents, *, treedef):
    if not _is_zero(tangents[0]):
      raise HijaxGradError('writing a hijax Variable passed as a differentiated input. '
                           + GRAD_HINT)
    # A write inside grad to state grad does not differentiate (a counter, a
    # running mean): the value is stored, its derivative is not carried.
    self.bind(*primals, treedef=treedef)
    return [], []


new_cell_p = _NewCell('cell_new')
get_cell_p = _GetCell('cell_get')
set_cell_p = _SetCell('cell_set')


# vmap: a Cell is never batched itself (JAX cannot map a mutable hi-type), so a
# Cell captured by closure or passed with in_axes=None can be read (unbatched
# values) and written with values that do not depend on the mapped axis.
def _get_batch(args, dims, *, avals):
  return get_cell_p.bind(*args, avals=avals), [None] * len(avals)


def _set_batch(args, dims, *, treedef):
  if dims[0] is not None or any(d is not None for d in dims[1:]):
    raise ValueError(
        'vmap: writing a per-example (batched) value into a hijax Variable that is not mapped '
        '(captured by closure or passed with in_axes=None). Its value must be the same for '
        'every example: reduce it first (e.g. .mean(0) outside, or write an unbatched value), '
        'or use nnx.vmap, which maps Variables along an axis.')
  set_cell_p.bind(*args, treedef=treedef)
  return [], []


def _new_batch(args, dims, *, treedef):
  if any(d is not None for d in dims):
    raise ValueError('vmap: creating a hijax Variable from a per-example (batched) value is not '
                     'supported; create it outside the vmapped function, or use hijax=False.')
  return new_cell_p.bind(*args, treedef=treedef), None


batching.primitive_batchers[get_cell_p] = _get_batch
batching.primitive_batchers[set_cell_p] = _set_batch
batching.primitive_batchers[new_cell_p] = _new_batch


def _eager() -> bool:
  return isinstance(core.trace_ctx.trace, core.EvalTrace)


def new_cell(contents):
  """A Cell holding ``contents``; inside a trace, a new traced Cell."""
  if _eager():
    return Cell(contents)
  leaves, treedef = _tree_flatten(contents)
  return new_cell_p.bind(*leaves, treedef=treedef)


def cell_get(cell):
  if type(cell) is Cell and _eager():
    return cell.contents
  state = core.cur_qdd(cell)
  return _tree_unflatten(state.treedef, get_cell_p.bind(cell, avals=state.avals))


def cell_set(cell, contents) -> None:
  if type(cell) is Cell and _eager():
    cell.contents = contents
    return
  leaves, treedef = _tree_flatten(contents)
  set_cell_p.bind(cell, *leaves, treedef=treedef)


# -- what a twin's slot holds ------------------------------------------------
CELL, REF, RAW = 0, 1, 2


def _store_kind(store) -> int:
  t = type(store)
  if t is Cell:
    return CELL
  if isinstance(store, core.Tracer):
    aval = core.typeof(store)
    if isinstance(aval, CellTy):
      return CELL
    if isinstance(aval, hjx.AbstractRef):
      return REF
    return RAW
  if isinstance(store, jax.Ref):
    return REF
  return RAW


def _holds_arrays(value) -> bool:
  # JAX builds trees around placeholders (None, object()) while it works; only
  # real values get a store.
  leaves = jax.tree_util.tree_leaves(value)
  return bool(leaves) and all(isinstance(x, (jax.Array, int, float, complex, bool))
                              or hasattr(x, '__array__') for x in leaves)


def _new_store(value, *, ref: bool):
  if ref:
    if not hasattr(value, 'shape'):
      raise TypeError(f'ref=True Variables hold arrays (a jax.Ref); got a value of type '
                      f'{type(value).__name__}. Use hijax=True for other values.')
    return jax.new_ref(value)
  return new_cell(value)


def _get(self):
  store = _SLOT.__get__(self)
  kind = _store_kind(store)
  if kind == CELL:
    try:
      return cell_get(store)
    except AttributeError as e:  # inside a property, it would surface as "no attribute _value"
      raise TypeError(
          f'This {type(self).__name__} (hijax) was traced without its type state: JAX 0.10 '
          'cannot carry mutable hijax values as a scan / fori_loop / while_loop carry. '
          'Capture the Variable by closure instead (its updates propagate), or convert with '
          'nnx.with_vars(..., hijax=False) and return it from the loop.') from e
  if kind == REF:
    return store[...]
  return store


def _set(self, value):
  store = _SLOT.__get__(self)
  kind = _store_kind(store)
  if kind == CELL:
    cell_set(store, value)
  elif kind == REF:
    store[...] = value
  else:
    _SLOT.__set__(self, value)


class _HijaxTwin:
  """Mixed into each hijax twin (before the kind): the Cell-backed ``_value``."""

  __slots__ = ()
  _arbax_hijax_kind = True  # variables.py: do not register with the plain flatten

  _value = property(_get, _set)

  @classmethod
  def _from_parts(cls, value, meta: VarMeta):
    # Whatever JAX or NNX hands over: a (traced) Cell, a Ref, or a raw value.
    # Outside any trace a raw value gets a store when the metadata asks for one
    # (``jax.tree.map`` over hijax Variables keeps them hijax); inside a trace
    # it stays raw, which is what NNX transforms rebuild Variables around.
    obj = object.__new__(cls)
    if (_eager() and (meta.items.get('hijax') or meta.items.get('ref'))
        and _store_kind(value) == RAW and _holds_arrays(value)):
      value = _new_store(value, ref=meta.items.get('ref', False))
    _SLOT.__set__(obj, value)
    object.__setattr__(obj, '_meta', meta)
    object.__setattr__(obj, '_trace', current_trace())
    return obj

  def _check_trace(self):
    # JAX itself carries writes to Cells and Refs across traces.
    if _store_kind(_SLOT.__get__(self)) == RAW:
      super()._check_trace()

  @property
  def type(self):
    return self._arbax_base_kind

  def _fresh(self, value, meta: VarMeta):
    """A twin like ``self`` holding ``value``: in a new store when ``self`` has one."""
    new = type(self)._from_parts(value, meta)
    if _store_kind(_SLOT.__get__(self)) != RAW:
      _SLOT.__set__(new, _new_store(value, ref=meta.items.get('ref', False)))
    return new

  def copy(self, **metadata):
    meta = self._meta if not metadata else _make_meta({**self._meta.items, **metadata})
    return self._fresh(self._value, meta)

  def replace(self, value: tp.Any = ..., **metadata):
    meta = self._meta if not metadata else _make_meta({**self._meta.items, **metadata})
    if value is ...:
      value = self._value
    elif isinstance(value, Variable):
      value = value._value
    return self._fresh(value, meta)

  def __deepcopy__(self, memo):
    import copy as _copy
    return self._fresh(_copy.deepcopy(self._value, memo), self._meta)

  def __reduce__(self):
    return (_rebuild_twin, (self._arbax_base_kind, self._value, dict(self._meta.items)))


def _rebuild_twin(kind, value, items):
  return adopt(kind._from_parts(value, _make_meta(items)))


_TWINS: dict = {}


def hijax_kind(kind: type) -> type:
  """The hijax twin of a Variable kind: a subclass with the same name, made once."""
  if kind.__dict__.get('_arbax_hijax_kind'):
    return kind
  twin = _TWINS.get(kind)
  if twin is None:
    ns = {'__slots__': (), '__module__': kind.__module__, '__qualname__': kind.__qualname__,
          '__doc__': kind.__doc__, '_arbax_hijax_kind': True, '_arbax_base_kind': kind}
    twin = type(kind.__name__, (_HijaxTwin, kind), ns)
    _register_twin(twin)
    _TWINS[kind] = twin
  return twin


def base_kind(cls: type) -> type:
  return cls.__dict__.get('_arbax_base_kind', cls)


_VALUE_KEY = jax.tree_util.GetAttrKey('value')


def _register_twin(twin):
  # The child is the raw store (the Cell), so JAX transforms see and carry it.
  jax.tree_util.register_pytree_with_keys(
      twin,
      lambda v: (((_VALUE_KEY, _SLOT.__get__(v)),), v._meta),
      lambda meta, children: twin._from_parts(children[0], meta),
      lambda v: ((_SLOT.__get__(v),), v._meta))


def adopt(var: Variable) -> Variable:
  """Make ``var`` (just built, hijax or ref in its metadata) a Cell- or Ref-backed twin, in place."""
  value = _SLOT.__get__(var)
  if isinstance(value, Variable):
    value = value._value
  twin = hijax_kind(type(var))
  object.__setattr__(var, '__class__', twin)
  _SLOT.__set__(var, _new_store(value, ref=var._meta.items.get('ref', False)))
  return var


# -- converting ---------------------------------------------------------------
def _convert(v: Variable, changes: dict) -> Variable:
  items = {**v._meta.items, **changes}
  kind = base_kind(type(v))
  new = kind._from_parts(v.get_value(), _make_meta(items))
  if items.get('hijax') or items.get('ref'):
    adopt(new)
  return new


def with_vars(node, /, *, hijax: bool | None = None, ref: bool | None = None,
              only: filterlib.Filter = ..., allow_duplicates: bool = False):
  """A copy of ``node`` whose Variables (those matching ``only``) have the given flags.

  ``nnx.with_vars(params, hijax=False)`` turns hijax Variables into plain ones
  holding the current values, which ``jax.grad`` can differentiate;
  ``hijax=True`` goes the other way (new Cells: updates to the copy do not reach
  the original). Variables already as asked are kept as they are.
  """
  changes = {}
  if hijax is not None:
    changes['hijax'] = bool(hijax)
  if ref is not None:
    changes['ref'] = bool(ref)
  predicate = filterlib.to_predicate(only)
  if not allow_duplicates:
    _check_no_duplicates(node)

  def convert(path, v):
    if not isinstance(v, Variable):
      return v
    differs = any(v._meta.items.get(k, False) != want for k, want in changes.items())
    if not differs or not predicate(_path_keys(path), v):
      return v
    return _convert(v, changes)

  return jax.tree_util.tree_map_with_path(convert, node,
                                          is_leaf=lambda x: isinstance(x, Variable))


def vars_as(node, /, *, hijax: bool | None = None, ref: bool | None = None,
            only: filterlib.Filter = ..., allow_duplicates: bool = False):
  """The older name of :func:`with_vars` (the spec guide uses it)."""
  return with_vars(node, hijax=hijax, ref=ref, only=only, allow_duplicates=allow_duplicates)


def _path_keys(path) -> tuple:
  out = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def _check_no_duplicates(node) -> None:
  from arbax.api import find_duplicates
  from arbax.errors import format_path
  groups = [g for g in find_duplicates(node)]
  if groups:
    shown = ', '.join(format_path(p) for p in groups[0])
    raise ValueError(f'with_vars: the same object is reachable at {shown}; converting would '
                     'split it into independent copies. Pass allow_duplicates=True to accept that.')
