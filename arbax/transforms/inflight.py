"""How far ``nnx.jit`` calls may run ahead of their computations on several CPU devices.

JAX dispatches asynchronously: a training loop that never reads a result queues
computations as fast as Python calls them. XLA's CPU client deadlocks when that queue
is deep and the computations hold collectives. With several CPU devices
(``--xla_force_host_platform_device_count=8``) a data-parallel step is one program on 8
devices whose gradient ``all-reduce`` needs all 8 to take part; the launch of a later
step, blocked on the client's per-device limit of computations in flight, holds worker
threads one of them needs, so the all-reduce waits for a participant that never comes
until XLA's rendezvous timeout aborts the process. A loop ~40 steps ahead is enough
(raw ``jax.jit`` loops too); a slow Python loop never gets that far.

``nnx.jit`` therefore waits, every ``EVERY`` calls, for an output of the call ``EVERY``
calls earlier when that output spans several CPU devices, keeping at most ``2 * EVERY``
calls queued. The computation runs on the same cores either way, so this costs no
throughput. Other backends, one-CPU-device processes and one-device outputs are left
alone::

    limit = UNDECIDED                 # before the first call
    limit = limit.after_call(result)  # after each call; None: nothing to bound here
"""
from __future__ import annotations

import jax
from jax.core import Tracer

# Calls between two waits. The deadlock needs ~40 multi-device computations queued;
# 2 * EVERY stays well below that and still overlaps Python with the computations.
EVERY = 8


def first_array(result) -> jax.Array | None:
  """A concrete array the call produced: the user's outputs first (the next call is less
  likely to donate them than the updated state), else an updated Variable value. A call
  made while tracing an outer transform produces tracers: nothing to wait for."""
  for leaf in result.out_leaves:
    if isinstance(leaf, jax.Array) and not isinstance(leaf, Tracer):
      return leaf
  for leaf in result.values:
    if isinstance(leaf, jax.Array) and not isinstance(leaf, Tracer):
      return leaf
  return None


def needs_limit(array: jax.Array) -> bool:
  """Whether ``array`` lives on CPU in a process with several CPU devices (the only place
  the deadlock above exists)."""
  devices = array.sharding.device_set
  return (next(iter(devices)).platform == 'cpu'
          and jax.local_device_count('cpu') > 1)


class InflightLimit:
  """Waits, every ``every`` calls, for an output of the call ``every`` calls earlier.

  ``first_call(result)`` decides whether a jitted function needs one (``UNDECIDED`` while
  its calls produced no array yet); ``after_call(result)`` is the per-call step and
  returns the limit to keep.
  """

  __slots__ = ('every', 'count', 'mark')

  def __init__(self, every: int = EVERY):
    self.every = every
    self.count = 0
    self.mark: jax.Array | None = None

  @classmethod
  def first_call(cls, result) -> 'InflightLimit | Undecided | None':
    array = first_array(result)
    if array is None:
      return UNDECIDED
    if not needs_limit(array):
      return None
    limit = cls()
    limit.mark = array
    return limit

  def after_call(self, result) -> 'InflightLimit':
    self.count += 1
    if self.count < self.every:
      return self
    self.count = 0
    mark, self.mark = self.mark, first_array(result)
    if mark is not None and mark.is_deleted():
      mark = self.mark  # donated to a later call: wait for this call's output instead
    if mark is not None and len(mark.sharding.device_set) > 1:  # one device: no collective
      mark.block_until_ready()
    return self


class Undecided:
  """No call has produced an array yet: decide on the next one."""

  __slots__ = ()

  def after_call(self, result) -> 'InflightLimit | Undecided | None':
    return InflightLimit.first_call(result)


UNDECIDED = Undecided()
