"""split_context / merge_context / update_context: the protocol for writing transforms with JAX."""
import jax
import jax.numpy as jnp
import pytest

import arbax as nnx


class Box(nnx.Module):
  def __init__(self, value, note=None):
    self.value = nnx.Param(jnp.asarray(value))
    self.note = note


class Net(nnx.Module):
  def __init__(self):
    self.first = Box(1.0)
    self.second = Box(2.0)


def test_splits_in_one_context_store_each_object_once():
  net = Net()
  with nnx.split_context() as ctx:
    g_net, s_net = ctx.split(net)
    g_box, s_box = ctx.split(net.second)      # already split as part of net
  assert type(g_box.nodes[0]) is nnx.graphlib.NodeRef and len(nnx.to_flat_state(s_box)) == 0
  assert not hasattr(ctx, 'ref_index')        # the map is dropped on exit
  with nnx.merge_context() as ctx:
    net2 = ctx.merge(g_net, s_net)
    box2 = ctx.merge(g_box, s_box)
  assert box2 is net2.second and net2 is not net
  # merges in a context copy the Variables
  assert net2.second.value is not net.second.value
  assert float(net2.second.value[...]) == 2.0


def test_split_context_filters_and_flatten():
  net = Net()
  with nnx.split_context() as ctx:
    graphdef, params, rest = ctx.split(net, nnx.Param, ...)
    _, flat = ctx.flatten(net.first)
  assert len(nnx.to_flat_state(params)) == 2 and len(rest) == 0 and len(flat) == 0
  with nnx.merge_context() as ctx:
    assert isinstance(ctx.merge(graphdef, params, rest), Net)


def test_update_context_carries_identity_values_and_structure_through_jit():
  net = Net()
  first_value = net.first.value

  with nnx.update_context('step'):
    with nnx.split_context('step') as ctx:            # (1) outside
      graphdef, state = ctx.split(net)

    @jax.jit
    def step(graphdef, state):
      with nnx.merge_context('step', True) as ctx:    # (2) inside
        inner = ctx.merge(graphdef, state)
      inner.first, inner.second = inner.second, inner.first
      inner.second.value[...] += 100.0                # the old `first` Box
      inner.second.note = 'moved'
      inner.third = Box(3.0)                          # new inside: created outside at the end
      inner.back = inner                              # a cycle
      with nnx.split_context('step') as ctx:          # (3) inside
        return ctx.split(inner)

    graphdef, state = step(graphdef, state)
    with nnx.merge_context('step', False) as ctx:     # (4) outside
      out = ctx.merge(graphdef, state)

  assert out is net and net.back is net
  assert net.second.value is first_value               # the same Variable, updated in place
  assert float(first_value[...]) == 101.0 and net.second.note == 'moved'
  assert float(net.first.value[...]) == 2.0 and float(net.third.value[...]) == 3.0


def test_update_context_as_a_decorator_opens_a_fresh_context_per_call():
  @jax.jit
  def inner_step(graphdef, state):
    with nnx.merge_context('deco', True) as ctx:
      box = ctx.merge(graphdef, state)
    box.value[...] *= 2
    with nnx.split_context('deco') as ctx:
      return ctx.split(box)

  @nnx.update_context('deco')
  def run(box):
    with nnx.split_context('deco') as ctx:
      graphdef, state = ctx.split(box)
    graphdef, state = inner_step(graphdef, state)
    with nnx.merge_context('deco', False) as ctx:
      return ctx.merge(graphdef, state)

  box = Box(1.5)
  assert run(box) is box and run(box) is box
  assert float(box.value[...]) == 6.0
  with pytest.raises(ValueError, match="'deco'"):
    nnx.current_update_context('deco')                # closed after each call


def test_update_contexts_of_one_tag_nest():
  with nnx.update_context('t') as outer:
    with nnx.update_context('t') as inner:
      assert nnx.current_update_context('t') is inner
    assert nnx.current_update_context('t') is outer
  assert outer == inner and hash(outer) == hash(inner)  # opaque to JAX as a static value


def test_merge_context_with_a_tag_needs_to_know_its_side():
  with nnx.update_context('side'):
    with pytest.raises(ValueError, match='inner=True'):
      with nnx.merge_context('side'):
        pass


def test_current_update_context_without_one_names_the_tag():
  with pytest.raises(ValueError, match="'missing'.*nnx.update_context"):
    nnx.current_update_context('missing')
