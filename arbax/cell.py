"""Cell: the mutable JAX value behind a hijax Variable.

    >>> import jax, jax.numpy as jnp
    >>> from arbax.cell import Cell, cell_get, cell_set
    >>> c = Cell({'count': jnp.array(0)})
    >>> @jax.jit                       # no return value: JAX writes the Cell back itself
    ... def bump(c):
    ...   cell_set(c, {'count': cell_get(c)['count'] + 1, 'seen': jnp.array(True)})
    >>> bump(c)
    >>> sorted(c.contents)
    ['count', 'seen']

A Cell is registered with ``jax.experimental.hijax`` as a *mutable hi-type*:
JAX traces it as one value whose type state (``CellState``: the pytree
structure and avals of what it holds) may change while tracing. Reads and
writes are the hi-primitives ``cell_get`` / ``cell_set``; at the end of
``jit``, ``cond``, ``scan``... JAX writes the final contents back into the
caller's Cell, whether it came in as an argument or by closure.

vmap: a Cell can be mapped (``jax.vmap`` with an int axis, through the
Variable that holds it). The traced Cell is then the caller's Cell tagged with
a ``CellAxis``: reads return its contents batched along that axis, writes move
(or broadcast) the new contents to that axis and store them in the caller's
Cell, so updates need no write-back step. A Cell created inside ``vmap`` is
likewise one outer Cell holding the stacked values, and it is per-example
even when created from values shared by every example (they are broadcast,
as ``jax.new_ref`` does), so a later per-example write has somewhere to go.

What JAX 0.10 cannot do with any mutable hi-type: return it from ``jit`` or
``cond`` (a ``jax.Ref`` cannot be returned either), carry it through a
``scan`` / ``fori_loop`` / ``while_loop`` carry or scan over it (the loop body
is traced from the type alone, without its state), use it in
``jax.checkpoint``, or batch a ``jit`` / ``scan`` / ``cond`` that uses it
inside ``vmap`` (vmap does not lower such nested hi-type programs). Capture it
by closure instead, or carry a plain value.
"""
from __future__ import annotations

import dataclasses
import operator
import typing as tp

import jax
import numpy as np
from jax._src import core
from jax._src import effects as _effects
from jax._src import hijax as _hijax_impl
from jax._src import source_info_util
from jax._src.interpreters import batching
from jax._src.interpreters import partial_eval as pe
from jax._src.util import moveaxis
from jax.experimental import hijax as hjx

__all__ = ['Cell', 'CellTy', 'CellState', 'CellAxis', 'new_cell', 'cell_get', 'cell_set',
           'is_cell', 'NoTypeStateError']

_tree_flatten = jax.tree_util.tree_flatten
_tree_unflatten = jax.tree_util.tree_unflatten


class NoTypeStateError(TypeError):
  """A traced Cell arrived without its type state (a loop carry or a scanned-over input)."""


NESTED_HINT = (
    'A hijax Variable reached a jax.jit / lax.scan / lax.cond (or other control flow) '
    'that JAX 0.10 batches without lowering it first: inside jax.vmap, such a nested '
    'transform cannot take or capture a hijax Variable. Read and write the Variable in the '
    'vmapped function itself (outside the nested transform), move the jit outside the vmap, '
    'use nnx.vmap (which maps Variables as values), or use ref=True Variables (jax.Ref), '
    'which JAX batches natively.')


RETURN_HINT = (
    'A hijax Variable cannot be returned from jax.jit, jax.lax.cond or another JAX transform: '
    'like a jax.Ref, a mutable hijax value can go in (JAX carries its updates back) but not '
    'come out. Return its value (v[...]) or an immutable copy (nnx.with_vars(v, '
    'mutable=False)), or use the NNX transform (nnx.jit, nnx.cond), which returns Variables.')


# -- the type -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class CellState(core.QuasiDynamicData):
  """The type state of a Cell: the structure and avals of what it holds right now."""
  treedef: tp.Any
  avals: tuple

  def to_tangent_qdd(self):
    return CellState(self.treedef, tuple(a.to_tangent_aval() for a in self.avals))

  def normalize(self):
    return CellState(self.treedef, tuple(a.normalize() for a in self.avals))


@dataclasses.dataclass(frozen=True)
class CellAxis(_hijax_impl.MappingSpec):
  """vmap's batch dimension of a mapped Cell: every leaf of its contents is mapped along ``axis``."""
  axis: int


class CellTy(hjx.MutableHiType, hjx.HiType):
  """The abstract type of every Cell; what it holds lives in the ``CellState``.

  A mutable hi-type first (it has type state). It is also a ``HiType`` only
  so that vmap accepts a ``CellAxis`` as its batch dimension: mapping does not
  change the type, the mapped axis lives in the contents.
  """

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

  def read_loval_in(self, state, cell=None):
    # JAX passes the Cell alone (no state) when it lost the type state on the way.
    if cell is None:
      raise NoTypeStateError(NESTED_HINT)
    return self.read_loval(state, cell)

  def update_from_loval(self, state, cell, *lo_vals):
    cell_set(cell, _raise(state, lo_vals))

  def lower_val(self, cell):
    # JAX asks for a Cell as plain values only where it would leave the
    # program for good, as a jit output (JAX refuses a returned Ref there too).
    raise ValueError(RETURN_HINT)

  def to_tangent_aval(self):
    # JAX asks even for Cells only read inside grad (closures); those get a
    # symbolic zero tangent, and the primitives below refuse non-zero ones.
    return _CELL_TY

  # vmap: the type is the same mapped or not (the axis is in the contents).
  def dec_rank(self, size, spec):
    return self

  def inc_rank(self, size, spec):
    return self

  def leading_axis_spec(self):
    # Only scan asks: for its scanned-over inputs (xs) and stacked outputs (ys).
    raise NoTypeStateError(
        'scan cannot scan over (xs) or stack (ys) hijax Variables: JAX traces the loop body '
        'from the type alone, without the contents. Scan over the values instead '
        '(v[...] or nnx.with_vars(..., hijax=False)), or use nnx.scan, which maps Variables '
        'along an axis.')


_CELL_TY = CellTy()


def _raise(state: CellState, lo_vals):
  it = iter(lo_vals)
  leaves = [a.raise_val(*[next(it) for _ in a.lo_ty()]) for a in state.avals]
  return _tree_unflatten(state.treedef, leaves)


class Cell:
  """A mutable box that JAX traces as one hijax value (see the module docstring)."""

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
    return np.asarray(self.contents, dtype=dtype)

  shape = property(lambda self: jax.numpy.shape(self.contents))
  dtype = property(lambda self: jax.numpy.result_type(self.contents))
  ndim = property(lambda self: jax.numpy.ndim(self.contents))
  size = property(lambda self: jax.numpy.size(self.contents))


def _forward(op):
  return lambda self, *other: op(self.contents, *other)


def _reflect(op):
  return lambda self, other: op(other, self.contents)


for _name in ('add', 'sub', 'mul', 'truediv', 'floordiv', 'mod', 'pow', 'matmul', 'neg', 'abs',
              'lt', 'le', 'gt', 'ge', 'getitem'):
  setattr(Cell, f'__{_name}__', _forward(getattr(operator, _name)))
for _name in ('add', 'sub', 'mul', 'truediv', 'matmul', 'pow'):
  setattr(Cell, f'__r{_name}__', _reflect(getattr(operator, _name)))

hjx.register_hitype(Cell, lambda cell: _CELL_TY)


def is_cell(x) -> bool:
  """Whether ``x`` is a Cell, concrete or traced."""
  return type(x) is Cell or (isinstance(x, core.Tracer) and isinstance(x.aval, CellTy))


# -- the primitives -------------------------------------------------------------
class CellEffect(_effects.Effect):
  """Orders Cell reads and writes; allowed inside control flow and custom derivatives."""


cell_effect = CellEffect()
hjx.control_flow_allowed_effects.add_type(CellEffect)
_effects.custom_derivatives_allowed_effects.add_type(CellEffect)
_effects.remat_allowed_effects.add_type(CellEffect)


class CellGradError(NotImplementedError):
  """Autodiff reached a Cell passed as a differentiated input."""


GRAD_HINT = ('jax.grad cannot differentiate hijax Variables (mutable hijax values) yet. '
             'Convert them first: jax.grad(loss_fn)(nnx.with_vars(params, mutable=False)) '
             '(or hijax=False), or use nnx.grad.')


def _is_zero(t) -> bool:
  return type(t) is hjx.Zero


def _as_program_values(leaves) -> list:
  """``leaves``, with constants made values of the program being lowered (literal tracers).

  When JAX lowers a program that uses Cells (``jit``), a literal operand of
  ``cell_new`` / ``cell_set`` reaches ``to_lojax`` as a plain constant. JAX
  expects every low-level value a hi-primitive returns to be a tracer of the
  program it builds (it reads the tracer's variable when a later equation
  uses it), so a constant stored as is and returned by ``cell_get`` breaks
  lowering (``v = Param(1.0); v[...] += 1`` inside ``jit``). ``jax.new_ref``
  never meets this: its lowering binds ordinary primitives, whose outputs are
  always tracers. Tracers are kept: the Cell may belong to another program
  being lowered (a loop body), and its values are that program's.
  """
  trace = core.trace_ctx.trace
  if not isinstance(trace, pe.DynamicJaxprTrace):  # eager: the values themselves
    return list(leaves)
  src = source_info_util.current()
  return [x if isinstance(x, core.Tracer) else trace.to_jaxpr_tracer(x, src) for x in leaves]


class _NewCell(hjx.HiPrimitive):
  def is_high(self, *avals, treedef) -> bool:
    return True

  def abstract_eval(self, *avals, treedef):
    return core.AvalQDD(_CELL_TY, CellState(treedef, tuple(avals))), {cell_effect}

  def to_lojax(self, *leaves, treedef):
    return Cell(_tree_unflatten(treedef, _as_program_values(leaves)))

  def jvp(self, primals, tangents, *, treedef):
    if not all(_is_zero(t) for t in tangents):
      raise CellGradError('creating a hijax Variable from a value being differentiated. '
                          + GRAD_HINT)
    return self.bind(*primals, treedef=treedef), hjx.Zero(_CELL_TY)


class _GetCell(hjx.HiPrimitive):
  multiple_results = True

  def abstract_eval(self, cell_ty, *, avals):
    return list(avals), {cell_effect}

  def to_lojax(self, cell, *, avals):
    return _tree_flatten(cell.contents)[0]

  def jvp(self, primals, tangents, *, avals):
    if not _is_zero(tangents[0]):
      raise CellGradError('reading a hijax Variable passed as a differentiated input. '
                          + GRAD_HINT)
    outs = self.bind(*primals, avals=avals)
    return outs, [hjx.Zero(a.to_tangent_aval()) for a in avals]


class _SetCell(hjx.HiPrimitive):
  multiple_results = True

  def abstract_eval(self, cell_ty, *avals, treedef):
    if not isinstance(cell_ty, core.AvalMutableQDD):  # traced without its type state
      raise NoTypeStateError(NESTED_HINT)
    cell_ty.mutable_qdd.update(CellState(treedef, tuple(avals)))
    return [], {cell_effect}

  def to_lojax(self, cell, *leaves, treedef):
    cell.contents = _tree_unflatten(treedef, _as_program_values(leaves))
    return []

  def jvp(self, primals, tangents, *, treedef):
    if not _is_zero(tangents[0]):
      raise CellGradError('writing a hijax Variable passed as a differentiated input. '
                          + GRAD_HINT)
    # A write inside grad to state grad does not differentiate (a counter, a
    # running mean): the value is stored, its derivative is not carried.
    self.bind(*primals, treedef=treedef)
    return [], []


new_cell_p = _NewCell('cell_new')
get_cell_p = _GetCell('cell_get')
set_cell_p = _SetCell('cell_set')


# -- vmap -----------------------------------------------------------------------
def canonical_axis(axis: int, ndim: int) -> int:
  """``axis`` counted from the front for a value with ``ndim`` dimensions."""
  return axis + ndim if axis < 0 else axis


def _to_axis(axis_data, x, dim, axis: int):
  """``x`` (batched along ``dim``, or not batched) as a value batched along ``axis``."""
  if dim is None:
    return batching.broadcast(x, axis_data.size, canonical_axis(axis, np.ndim(x) + 1),
                              axis_data.explicit_mesh_axis)
  return moveaxis(x, dim, canonical_axis(axis, np.ndim(x)))


def _get_batch(axis_data, args, dims, *, avals):
  (cell,), (dim,) = args, dims
  if dim is None:
    return get_cell_p.bind(cell, avals=avals), [None] * len(avals)
  state = core.cur_qdd(cell)  # the caller's Cell: its contents carry the mapped axis
  if state is None:
    raise NoTypeStateError(NESTED_HINT)
  outs = get_cell_p.bind(cell, avals=state.avals)
  return outs, [canonical_axis(dim.axis, a.ndim) for a in state.avals]


def _set_batch(axis_data, args, dims, *, treedef):
  cell, *leaves = args
  dim, *leaf_dims = dims
  if dim is None:
    if any(d is not None for d in leaf_dims):
      raise ValueError(
          'vmap: writing a per-example (batched) value into a hijax Variable that is not mapped '
          '(captured by closure or passed with in_axes=None). Its value must be the same for '
          'every example: reduce it first (e.g. .mean(0)), or map the Variable too '
          '(in_axes=0), so that each example owns its slice.')
  else:
    leaves = [_to_axis(axis_data, x, d, dim.axis) for x, d in zip(leaves, leaf_dims)]
  set_cell_p.bind(cell, *leaves, treedef=treedef)
  return [], []


def _new_batch(axis_data, args, dims, *, treedef):
  # A Cell created inside vmap is always mapped, even from unmapped values (as
  # jax.new_ref does): each example owns its copy, so a later per-example write
  # (``v = Param(0.); v[...] += x``) has somewhere to go.
  leaves = [_to_axis(axis_data, x, d, 0) for x, d in zip(args, dims)]
  return new_cell_p.bind(*leaves, treedef=treedef), CellAxis(0)


batching.fancy_primitive_batchers[get_cell_p] = _get_batch
batching.fancy_primitive_batchers[set_cell_p] = _set_batch
batching.fancy_primitive_batchers[new_cell_p] = _new_batch


# -- the API --------------------------------------------------------------------
def is_eager() -> bool:
  """Whether no JAX trace is running (values are concrete)."""
  return isinstance(core.trace_ctx.trace, core.EvalTrace)


def new_cell(contents):
  """A Cell holding ``contents``; inside a trace, a new traced Cell."""
  if is_eager():
    return Cell(contents)
  leaves, treedef = _tree_flatten(contents)
  return new_cell_p.bind(*leaves, treedef=treedef)


def cell_get(cell):
  """What ``cell`` holds now (traced values inside a trace)."""
  if type(cell) is Cell and is_eager():
    return cell.contents
  state = core.cur_qdd(cell)
  if state is None:
    raise NoTypeStateError(
        'A hijax Variable reached this code without its type state: JAX 0.10 traced it from '
        'its type alone, as it does for scan / fori_loop / while_loop carries (and '
        'jax.checkpoint arguments), so a mutable hijax Variable cannot be one. Capture it by '
        'closure instead (its updates propagate), carry an immutable copy '
        '(nnx.with_vars(v, mutable=False)) and rebuild it in the body, or use nnx.scan / '
        'nnx.fori_loop, which carry Variables.')
  return _tree_unflatten(state.treedef, get_cell_p.bind(cell, avals=state.avals))


def cell_set(cell, contents) -> None:
  """Replace what ``cell`` holds (structure and dtypes may change)."""
  if type(cell) is Cell and is_eager():
    cell.contents = contents
    return
  leaves, treedef = _tree_flatten(contents)
  set_cell_p.bind(cell, *leaves, treedef=treedef)
