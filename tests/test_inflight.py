"""arbax.transforms.inflight: which output nnx.jit waits on, and when it bothers at all.

The wait itself matters only with several CPU devices; test_data_parallel.py runs that
case (8 simulated devices, in a process of its own) and checks how many steps get queued.
"""
import types

import jax.numpy as jnp
import numpy as np

import arbax as nnx
from arbax.transforms.inflight import UNDECIDED, InflightLimit, first_array


def call_result(out_leaves=(), values=()):
  """What a jitted call hands back: the user's output leaves and the updated values."""
  return types.SimpleNamespace(out_leaves=list(out_leaves), values=list(values))


def test_first_array_prefers_the_users_output_over_updated_state():
  # Updated state is what a donating step hands to the next call; the output is not.
  loss, kernel = jnp.ones(()), jnp.zeros((2, 2))
  assert first_array(call_result(out_leaves=[loss], values=[kernel])) is loss
  assert first_array(call_result(out_leaves=['label', None], values=[kernel])) is kernel


def test_first_array_is_none_when_the_call_made_no_array():
  assert first_array(call_result(out_leaves=[3, np.ones(2)])) is None


def test_undecided_until_a_call_produces_an_array():
  assert InflightLimit.first_call(call_result()) is UNDECIDED
  assert UNDECIDED.after_call(call_result(out_leaves=[None])) is UNDECIDED


def test_one_cpu_device_needs_no_limit():
  # This process has one CPU device: no multi-device collective, nothing to deadlock.
  assert InflightLimit.first_call(call_result(out_leaves=[jnp.ones(3)])) is None


def test_jit_results_on_one_device_are_unchanged_by_the_limit():
  counter = nnx.Variable(jnp.array(0))

  @nnx.jit
  def bump(c):
    c[...] += 1
    return c[...] * 10

  outs = [int(bump(counter)) for _ in range(3 * 8 + 1)]
  assert outs == [10 * (i + 1) for i in range(25)]
  assert int(counter[...]) == 25
