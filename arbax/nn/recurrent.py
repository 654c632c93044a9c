"""Recurrent layers: cells that take one step, and ``RNN`` that runs a cell over a sequence.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> carry = cell.initialize_carry((2, 3), nnx.Rngs(1))   # (c, h), zeros by default
    >>> carry, y = cell(carry, jnp.ones((2, 3)))             # one time step
    >>> nnx.RNN(cell)(jnp.ones((2, 7, 3))).shape             # [batch, time, features]
    (2, 7, 4)

A cell maps ``(carry, x_t) -> (carry, y_t)``. ``RNN`` scans it over the time
axis with ``jax.lax.scan``, threading the cell's own state (e.g. RNG counters)
through the loop; ``Bidirectional`` runs one RNN forwards and one backwards
and merges their outputs.
"""
from __future__ import annotations

import types
import typing as tp
import warnings

import jax
import jax.numpy as jnp

from arbax import filters as filterlib
from arbax.api import iter_graph, merge, split, update
from arbax.module import Module
from arbax.nn import initializers
from arbax.nn.dtypes import promote_dtype as default_promote_dtype
from arbax.nn.linear import Linear
from arbax.pytree import data
from arbax.rngs import Rngs, RngState, RngStream
from arbax.transforms.iteration import Carry as CarryAxis, StateAxes

Array = jax.Array
Carry = tp.Any

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
_NO_METADATA = types.MappingProxyType({})


def modified_orthogonal(key: Array, shape: tp.Sequence[int], dtype=jnp.float32) -> Array:
  """An orthogonal matrix drawn in float32 and then cast, so half-precision dtypes work."""
  return initializers.orthogonal()(key, shape).astype(dtype)


# -- cells --------------------------------------------------------------------
class RNNCellBase(Module):
  """Base class of recurrent cells: ``__call__(carry, inputs) -> (carry, outputs)``."""

  def initialize_carry(self, input_shape: tuple[int, ...], rngs: Rngs | RngStream | None = None,
                       carry_init=None) -> Carry:
    """The carry at time 0 for inputs of ``input_shape`` (batch dims, then features)."""
    raise NotImplementedError(f'{type(self).__name__} must define initialize_carry.')

  def __call__(self, carry: Carry, inputs: Array) -> tuple[Carry, Array]:
    raise NotImplementedError(f'{type(self).__name__} must define __call__(carry, inputs).')

  @property
  def num_feature_axes(self) -> int:
    """How many trailing axes of the inputs are features (the time axis comes right before)."""
    raise NotImplementedError(f'{type(self).__name__} must define num_feature_axes.')


# Warnings from the cell helpers below point at the user's constructor call: helper, the
# cell's __init__, the Module metaclass's __call__, then the caller.
_CELL_CALLER = 4


def _keep_rngs(rngs: Rngs, keep: bool) -> RngStream | None:
  if not keep:
    return data(None)
  warnings.warn('keep_rngs is deprecated: pass rngs to initialize_carry / RNN.__call__ instead.',
                stacklevel=_CELL_CALLER)
  return rngs.carry.fork()


def _store_carry_init(carry_init):
  if carry_init:
    warnings.warn('carry_init given to the cell constructor: pass it to `initialize_carry` '
                  'instead. Cells built with different carry_init functions have different '
                  'graphdefs.', stacklevel=_CELL_CALLER)
  return carry_init


class _HiddenCell(RNNCellBase):
  """Shared carry logic of the cells whose carry is ``n_states`` arrays of ``hidden_features``."""

  _n_states = 1
  # Set by each cell's __init__ (declared here for the shared code below).
  hidden_features: int
  param_dtype: tp.Any
  rngs: RngStream | None
  carry_init: tp.Any

  def initialize_carry(self, input_shape: tuple[int, ...], rngs: Rngs | RngStream | None = None,
                       carry_init=None) -> Carry:
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, Rngs):
      rngs = rngs.carry
    if rngs is None:
      raise ValueError(f'RNGs must be provided to initialize the carry of {type(self).__name__}: '
                       'pass rngs=nnx.Rngs(...) to initialize_carry (or to RNN).')
    init = carry_init or self.carry_init or initializers.zeros_init()
    shape = tuple(input_shape[:-1]) + (self.hidden_features,)
    # One key per state array even for zeros, so the stream advances like NNX's.
    states = tuple(initializers.initial_value(init, rngs(), shape, self.param_dtype)
                   for _ in range(self._n_states))
    return states if self._n_states > 1 else states[0]

  @property
  def num_feature_axes(self) -> int:
    return 1


def _linear(n_in, n_out, *, use_bias, kernel_init, cell, rngs, kernel_metadata,
            bias_init=default_bias_init, bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
  return Linear(n_in, n_out, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                dtype=cell.dtype, param_dtype=cell.param_dtype, promote_dtype=cell.promote_dtype,
                rngs=rngs, kernel_metadata=kernel_metadata,
                bias_metadata=bias_metadata if use_bias else _NO_METADATA)


class LSTMCell(_HiddenCell):
  r"""Long short-term memory cell with one Linear per gate.

  .. math::
      i = \sigma(W_{ii} x + W_{hi} h + b_{hi}) \quad
      f = \sigma(W_{if} x + W_{hf} h + b_{hf}) \\
      g = \tanh(W_{ig} x + W_{hg} h + b_{hg}) \quad
      o = \sigma(W_{io} x + W_{ho} h + b_{ho}) \\
      c' = f c + i g \qquad h' = o \tanh(c')

  The carry is ``(c, h)``; the output is ``h'``. Input Linears (``ii``,
  ``if_``, ``ig``, ``io``) have no bias since they are summed with the
  recurrent ones (``hi``, ``hf``, ``hg``, ``ho``).
  """

  _n_states = 2

  def __init__(self, in_features: int, hidden_features: int, *, gate_fn=jax.nn.sigmoid,
               activation_fn=jnp.tanh, kernel_init=default_kernel_init,
               recurrent_kernel_init=modified_orthogonal, bias_init=default_bias_init,
               dtype=None, param_dtype=jnp.float32, carry_init=None,
               promote_dtype=default_promote_dtype, keep_rngs: bool = False, rngs: Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               recurrent_kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.rngs = _keep_rngs(rngs, keep_rngs)

    def dense_i():
      return _linear(in_features, hidden_features, use_bias=False, kernel_init=kernel_init,
                     cell=self, rngs=rngs, kernel_metadata=kernel_metadata)

    def dense_h():
      return _linear(hidden_features, hidden_features, use_bias=True,
                     kernel_init=recurrent_kernel_init, bias_init=bias_init, cell=self,
                     rngs=rngs, kernel_metadata=recurrent_kernel_metadata,
                     bias_metadata=bias_metadata)

    self.ii, self.if_, self.ig, self.io = dense_i(), dense_i(), dense_i(), dense_i()
    self.hi, self.hf, self.hg, self.ho = dense_h(), dense_h(), dense_h(), dense_h()
    self.carry_init = _store_carry_init(carry_init)

  def __call__(self, carry: tuple[Array, Array], inputs: Array):
    c, h = carry
    i = self.gate_fn(self.ii(inputs) + self.hi(h))
    f = self.gate_fn(self.if_(inputs) + self.hf(h))
    g = self.activation_fn(self.ig(inputs) + self.hg(h))
    o = self.gate_fn(self.io(inputs) + self.ho(h))
    new_c = f * c + i * g
    new_h = o * self.activation_fn(new_c)
    return (new_c, new_h), new_h


class OptimizedLSTMCell(_HiddenCell):
  """The LSTM of ``LSTMCell`` with the four gates in two wide Linears (``dense_i``, ``dense_h``).

  Gate columns are ordered ``i, f, g, o``; one matmul per operand instead of
  four makes it faster on accelerators.
  """

  _n_states = 2

  def __init__(self, in_features: int, hidden_features: int, *, gate_fn=jax.nn.sigmoid,
               activation_fn=jnp.tanh, kernel_init=default_kernel_init,
               recurrent_kernel_init=initializers.orthogonal(), bias_init=default_bias_init,
               dtype=None, param_dtype=jnp.float32, carry_init=None,
               promote_dtype=default_promote_dtype, keep_rngs: bool = False, rngs: Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               recurrent_kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.rngs = _keep_rngs(rngs, keep_rngs)
    self.dense_i = _linear(in_features, 4 * hidden_features, use_bias=False,
                           kernel_init=kernel_init, cell=self, rngs=rngs,
                           kernel_metadata=kernel_metadata)
    self.dense_h = _linear(hidden_features, 4 * hidden_features, use_bias=True,
                           kernel_init=recurrent_kernel_init, bias_init=bias_init, cell=self,
                           rngs=rngs, kernel_metadata=recurrent_kernel_metadata,
                           bias_metadata=bias_metadata)
    self.carry_init = _store_carry_init(carry_init)

  def __call__(self, carry: tuple[Array, Array], inputs: Array):
    c, h = carry
    i, f, g, o = jnp.split(self.dense_i(inputs) + self.dense_h(h), 4, axis=-1)
    new_c = self.gate_fn(f) * c + self.gate_fn(i) * self.activation_fn(g)
    new_h = self.gate_fn(o) * self.activation_fn(new_c)
    return (new_c, new_h), new_h


class SimpleCell(_HiddenCell):
  """Elman cell: ``h' = activation_fn(W_i x + b + W_h h [+ h if residual])``; output ``h'``."""

  def __init__(self, in_features: int, hidden_features: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, carry_init=None, residual: bool = False,
               activation_fn=jnp.tanh, kernel_init=default_kernel_init,
               recurrent_kernel_init=initializers.orthogonal(), bias_init=default_bias_init,
               promote_dtype=default_promote_dtype, keep_rngs: bool = False, rngs: Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               recurrent_kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.residual = residual
    self.activation_fn = activation_fn
    self.promote_dtype = promote_dtype
    self.rngs = _keep_rngs(rngs, keep_rngs)
    self.dense_h = _linear(hidden_features, hidden_features, use_bias=False,
                           kernel_init=recurrent_kernel_init, cell=self, rngs=rngs,
                           kernel_metadata=recurrent_kernel_metadata)
    self.dense_i = _linear(in_features, hidden_features, use_bias=True, kernel_init=kernel_init,
                           bias_init=bias_init, cell=self, rngs=rngs,
                           kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.carry_init = _store_carry_init(carry_init)

  def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
    pre = self.dense_i(inputs) + self.dense_h(carry)
    if self.residual:
      pre = pre + carry
    new = self.activation_fn(pre)
    return new, new


class GRUCell(_HiddenCell):
  r"""Gated recurrent unit.

  .. math::
      r = \sigma(W_{ir} x + b_{ir} + W_{hr} h) \quad
      z = \sigma(W_{iz} x + b_{iz} + W_{hz} h) \\
      n = \tanh(W_{in} x + b_{in} + r \odot W_{hn} h) \qquad
      h' = (1 - z) n + z h

  ``dense_i`` (with bias) and ``dense_h`` (without) hold the three blocks
  ``r, z, n`` side by side.
  """

  def __init__(self, in_features: int, hidden_features: int, *, gate_fn=jax.nn.sigmoid,
               activation_fn=jnp.tanh, kernel_init=default_kernel_init,
               recurrent_kernel_init=initializers.orthogonal(), bias_init=default_bias_init,
               dtype=None, param_dtype=jnp.float32, carry_init=None,
               promote_dtype=default_promote_dtype, keep_rngs: bool = False, rngs: Rngs,
               kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               recurrent_kernel_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA,
               bias_metadata: tp.Mapping[str, tp.Any] = _NO_METADATA):
    self.in_features = in_features
    self.hidden_features = hidden_features
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype
    self.rngs = _keep_rngs(rngs, keep_rngs)
    self.dense_i = _linear(in_features, 3 * hidden_features, use_bias=True,
                           kernel_init=kernel_init, bias_init=bias_init, cell=self, rngs=rngs,
                           kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.dense_h = _linear(hidden_features, 3 * hidden_features, use_bias=False,
                           kernel_init=recurrent_kernel_init, cell=self, rngs=rngs,
                           kernel_metadata=recurrent_kernel_metadata)
    self.carry_init = _store_carry_init(carry_init)

  def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
    x_r, x_z, x_n = jnp.split(self.dense_i(inputs), 3, axis=-1)
    h_r, h_z, h_n = jnp.split(self.dense_h(carry), 3, axis=-1)
    r = self.gate_fn(x_r + h_r)
    z = self.gate_fn(x_z + h_z)
    n = self.activation_fn(x_n + r * h_n)
    new = (1.0 - z) * n + z * carry
    return new, new


# -- sequence helpers ---------------------------------------------------------
def flip_sequences(inputs: Array, seq_lengths: Array | None, num_batch_dims: int,
                   time_major: bool) -> Array:
  """Reverse each sequence along time, keeping padding (beyond ``seq_lengths``) at the end.

  ``[[1, 0, 0], [2, 3, 0]]`` with lengths ``[1, 2]`` becomes ``[[1, 0, 0], [3, 2, 0]]``.
  """
  time_axis = 0 if time_major else num_batch_dims
  if seq_lengths is None:
    return jnp.flip(inputs, axis=time_axis)
  steps = inputs.shape[time_axis]
  # Position t reads from (length - 1 - t) mod steps: valid items reversed, padding after.
  reversed_t = jnp.arange(steps - 1, -1, -1)
  shape = [1] * (num_batch_dims + 1)
  shape[time_axis] = steps
  lengths = jnp.expand_dims(jnp.asarray(seq_lengths), time_axis)
  idx = (reversed_t.reshape(shape) + lengths) % steps
  idx = idx.reshape(idx.shape + (1,) * (inputs.ndim - idx.ndim))
  return jnp.take_along_axis(inputs, idx, axis=time_axis)


def _last_valid(carries, seq_lengths: Array):
  """From carries stacked on axis 0 (time), each sequence's carry after its last valid step."""
  last = jnp.asarray(seq_lengths) - 1

  def pick(x):
    idx = last.reshape((1,) + last.shape + (1,) * (x.ndim - 1 - last.ndim))
    return jnp.take_along_axis(x, idx, axis=0)[0]

  return jax.tree.map(pick, carries)


# -- running a cell over time -------------------------------------------------
def _is_carry_axis(axis) -> bool:
  return axis is CarryAxis


def _fresh(state):
  # New Variables owned by the running trace, so the step may write to them.
  return jax.tree.map(lambda x: x, state)


def _broadcast_keys(cell, only):
  """Give matching RngStreams one fresh key for the whole scan; returns the function that restores them.

  Every step then draws the same keys; the stream itself advances by one per call.
  """
  predicate = filterlib.to_predicate(filterlib.All(RngState, only))
  saved = []
  for path, obj in list(iter_graph(cell)):
    if isinstance(obj, RngStream) and predicate((*path, 'key'), obj.key):
      key = obj()
      saved.append((obj, obj.key.get_value(), obj.count.get_value()))
      obj.key.set_value(key)
      obj.count.set_value(jnp.zeros_like(obj.count.get_value()))

  def restore():
    for stream, key, count in saved:
      stream.key.set_value(key)
      stream.count.set_value(count)

  return restore


def _scan_cell(cell, carry, inputs, *, state_axes, broadcast_rngs, unroll, keep_carries):
  """``lax.scan`` of ``cell`` over axis 0 of ``inputs``; the cell's state follows ``state_axes``.

  ``None``: the same value every step, updates dropped; an int: sliced along
  that axis per step and re-stacked; ``nnx.Carry``: threaded through the steps.
  Returns ``(carry, outputs)`` or, with ``keep_carries``, ``(carry, (carries, outputs))``.
  """
  axes: list[tuple[tp.Any, tp.Any]] = (
      [(filterlib.All(RngState, broadcast_rngs), None)] if broadcast_rngs is not None else [])
  axes += list(state_axes.items())
  if not any(f is ... for f, _ in axes):
    axes.append((..., CarryAxis))
  filters = [f for f, _ in axes]
  kinds = [a for _, a in axes]
  graphdef, *states = split(cell, *filters)
  fixed = [s for s, a in zip(states, kinds) if a is None]
  threaded = [s for s, a in zip(states, kinds) if _is_carry_axis(a)]
  slice_axes = [a for a in kinds if isinstance(a, int)]
  sliced = [jax.tree.map(lambda x, a=a: jnp.moveaxis(x, a, 0), s)
            for s, a in zip(states, kinds) if isinstance(a, int)]

  def step(loop, xs):
    carry, threaded = loop
    x, slices = xs
    inner = merge(graphdef, *[_fresh(s) for s in fixed], *threaded, *slices)
    carry, y = inner(carry, x)
    _, *new = split(inner, *filters)
    new_threaded = [s for s, a in zip(new, kinds) if _is_carry_axis(a)]
    new_slices = [s for s, a in zip(new, kinds) if isinstance(a, int)]
    out = (carry, y) if keep_carries else y
    return (carry, new_threaded), (out, new_slices)

  (carry, threaded), (outputs, slices) = jax.lax.scan(
      step, (carry, threaded), (inputs, sliced), unroll=unroll)
  restacked = [jax.tree.map(lambda x, a=a: jnp.moveaxis(x, 0, a), s)
               for s, a in zip(slices, slice_axes)]
  if threaded or restacked:
    update(cell, *threaded, *restacked)
  return carry, outputs


class RNN(Module):
  """Runs ``cell`` over the time axis of its inputs (``[batch..., time, features]`` by default).

  ``reverse`` reads the sequences backwards (``keep_order`` flips the outputs
  back); ``seq_lengths`` marks padding so reversal keeps it at the end and,
  with ``return_carry``, the returned carry is the one after each sequence's
  last valid step.
  """

  def __init__(self, cell: RNNCellBase, *, time_major: bool = False, return_carry: bool = False,
               reverse: bool = False, keep_order: bool = False, unroll: int = 1,
               state_axes: tp.Mapping[tp.Any, int | type[CarryAxis] | None] | None = None,
               broadcast_rngs: filterlib.Filter = None,
               rngs: Rngs | RngStream | bool = True):
    self.cell = cell
    self.time_major = time_major
    self.return_carry = return_carry
    self.reverse = reverse
    self.keep_order = keep_order
    self.unroll = unroll
    if rngs is True:
      self.rngs = RngStream(0, tag='carry')
    elif isinstance(rngs, Rngs):
      self.rngs = rngs.carry.fork()
    elif rngs is False:
      self.rngs = data(None)
    else:
      raise ValueError(f'Expected rngs to be an Rngs or a bool, got {type(rngs).__name__}. '
                       'Pass rngs=nnx.Rngs(seed), True (a default carry stream) or False.')
    self.state_axes = StateAxes(state_axes if state_axes else {...: CarryAxis})
    self.broadcast_rngs = broadcast_rngs

  def __call__(self, inputs: Array, *, initial_carry: Carry | None = None,
               seq_lengths: Array | None = None, return_carry: bool | None = None,
               time_major: bool | None = None, reverse: bool | None = None,
               keep_order: bool | None = None, rngs: Rngs | RngStream | None = None):
    return_carry = self.return_carry if return_carry is None else return_carry
    time_major = self.time_major if time_major is None else time_major
    reverse = self.reverse if reverse is None else reverse
    keep_order = self.keep_order if keep_order is None else keep_order
    n_features = self.cell.num_feature_axes
    time_axis = 0 if time_major else inputs.ndim - n_features - 1
    n_batch = inputs.ndim - n_features - 1
    if time_axis < 0:
      raise ValueError(f'RNN inputs of shape {inputs.shape} have no time axis: expected '
                       f'[batch..., time, features] with {n_features} feature axis(es).')
    if reverse:
      inputs = flip_sequences(inputs, seq_lengths, n_batch, time_major)
    if initial_carry is None:
      if rngs is None:
        rngs = self.rngs
      elif isinstance(rngs, Rngs):
        rngs = rngs.carry.fork()
      step_shape = inputs.shape[:time_axis] + inputs.shape[time_axis + 1:]
      initial_carry = self.cell.initialize_carry(step_shape, rngs)
    keep_carries = seq_lengths is not None and return_carry
    restore = (_broadcast_keys(self.cell, self.broadcast_rngs)
               if self.broadcast_rngs is not None else None)
    try:
      carry, outputs = _scan_cell(self.cell, initial_carry, jnp.moveaxis(inputs, time_axis, 0),
                                  state_axes=self.state_axes, broadcast_rngs=self.broadcast_rngs,
                                  unroll=self.unroll, keep_carries=keep_carries)
    finally:
      if restore is not None:
        restore()
    if keep_carries and seq_lengths is not None:  # (keep_carries implies seq_lengths)
      carries, outputs = outputs
      carry = _last_valid(carries, seq_lengths)
    outputs = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), outputs)
    if reverse and keep_order:
      outputs = jax.tree.map(lambda y: flip_sequences(y, seq_lengths, n_batch, time_major),
                             outputs)
    return (carry, outputs) if return_carry else outputs


def _concatenate(a: Array, b: Array) -> Array:
  return jnp.concatenate([a, b], axis=-1)


class Bidirectional(Module):
  """Runs ``forward_rnn`` forwards and ``backward_rnn`` backwards; merges outputs with ``merge_fn``.

  The backward outputs are flipped back into input order before merging
  (concatenation on the feature axis by default).
  """

  def __init__(self, forward_rnn: RNN, backward_rnn: RNN, *,
               merge_fn: tp.Callable[[Array, Array], Array] = _concatenate,
               time_major: bool = False, return_carry: bool = False,
               rngs: Rngs | RngStream | bool = True):
    self.forward_rnn = forward_rnn
    self.backward_rnn = backward_rnn
    self.merge_fn = merge_fn
    self.time_major = time_major
    self.return_carry = return_carry
    if rngs is True:
      self.rngs = RngStream(0, tag='carry')
    elif rngs is False:
      self.rngs = None
    elif isinstance(rngs, Rngs):
      self.rngs = rngs.carry.fork()
    elif isinstance(rngs, RngStream):
      self.rngs = rngs
    else:
      raise TypeError(f'rngs must be an Rngs, an RngStream or a bool, got {type(rngs).__name__}.')

  def __call__(self, inputs: Array, *, initial_carry: tuple[Carry, Carry] | None = None,
               rngs: Rngs | RngStream | None = None, seq_lengths: Array | None = None,
               return_carry: bool | None = None, time_major: bool | None = None,
               reverse: bool | None = None, keep_order: bool | None = None):
    # reverse and keep_order are accepted for signature compatibility with RNN and ignored.
    time_major = self.time_major if time_major is None else time_major
    return_carry = self.return_carry if return_carry is None else return_carry
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, Rngs):
      rngs = rngs.carry
    forward_carry, backward_carry = (None, None) if initial_carry is None else initial_carry
    if self.forward_rnn is self.backward_rnn:
      warnings.warn('forward_rnn and backward_rnn are the same object, so they share parameters.',
                    stacklevel=2)
    carry_f, out_f = self.forward_rnn(inputs, initial_carry=forward_carry, rngs=rngs,
                                      seq_lengths=seq_lengths, return_carry=True,
                                      time_major=time_major, reverse=False)
    carry_b, out_b = self.backward_rnn(inputs, initial_carry=backward_carry, rngs=rngs,
                                       seq_lengths=seq_lengths, return_carry=True,
                                       time_major=time_major, reverse=True, keep_order=True)
    outputs = jax.tree.map(self.merge_fn, out_f, out_b)
    return ((carry_f, carry_b), outputs) if return_carry else outputs


__all__ = ['RNNCellBase', 'SimpleCell', 'LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'RNN',
           'Bidirectional']
