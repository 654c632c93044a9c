"""Graph updates: structural changes made inside a transform reach the caller's objects.

The transforms share one mechanism (arbax/transforms/_propagate.py); these tests drive it
through ``nnx.jit`` and the other transforms built on it, in graph mode with graph updates
(NNX's default), without them, and in tree mode.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

from arbax.transforms import _propagate as prop


class Block(nnx.Module):
  def __init__(self, seed=0):
    self.w = nnx.Param(jnp.full((2,), float(seed)))
    self.scale = 1.0


class Model(nnx.Module):
  def __init__(self):
    self.a = Block(1)
    self.b = Block(2)
    self.count = jnp.array(0)
    self.items = nnx.List([nnx.Param(jnp.zeros(1))])


def jit_default(f):
  return nnx.jit(f)


def jit_remat(f):
  return nnx.jit(nnx.remat(f))


def cond_true(f):
  return lambda *args: nnx.cond(jnp.array(True), f, f, *args)


# Transforms that carry structural updates, each applied to a function of the model.
TRANSFORMS = [pytest.param(jit_default, id='jit'), pytest.param(jit_remat, id='jit(remat)'),
              pytest.param(cond_true, id='cond')]


@pytest.mark.parametrize('transform', TRANSFORMS)
def test_an_attribute_added_inside_appears_outside(transform):
  m = Model()

  def f(m):
    m.extra = nnx.BatchStat(m.a.w[...] * 3)
    m.note = 'added'

  transform(f)(m)
  assert isinstance(m.extra, nnx.BatchStat) and m.note == 'added'
  np.testing.assert_allclose(m.extra[...], [3.0, 3.0])
  assert 'extra' in nnx.state(m)


@pytest.mark.parametrize('transform', TRANSFORMS)
def test_an_attribute_deleted_inside_is_gone_outside(transform):
  m = Model()

  def f(m):
    del m.b

  transform(f)(m)
  assert not hasattr(m, 'b')
  assert 'b' not in nnx.state(m)


def test_swapped_submodules_keep_their_identity_and_replay_without_retracing():
  m = Model()
  a, b = m.a, m.b
  traces = []

  @nnx.jit
  def swap(m):
    traces.append(1)
    m.a, m.b = m.b, m.a

  swap(m)
  assert m.a is b and m.b is a
  swap(m)
  assert m.a is a and m.b is b
  assert len(traces) == 1  # same structure both times: the recorded change is replayed
  np.testing.assert_allclose(m.a.w[...], [1.0, 1.0])


def test_a_variable_replaced_by_another_kind_is_a_new_variable_outside():
  m = Model()
  old = m.a.w

  @nnx.jit
  def f(m):
    m.a.w = nnx.BatchStat(m.a.w[...] + 1)

  f(m)
  assert type(m.a.w) is nnx.BatchStat and m.a.w is not old
  np.testing.assert_allclose(m.a.w[...], [2.0, 2.0])
  np.testing.assert_allclose(old[...], [1.0, 1.0])  # the old Variable was not written


def test_a_submodule_created_inside_and_returned_is_the_stored_object():
  m = Model()

  @nnx.jit
  def f(m):
    m.c = Block(7)
    return m.c

  out = f(m)
  assert out is m.c
  np.testing.assert_allclose(m.c.w[...], [7.0, 7.0])


def test_list_and_dict_edits_come_out():
  m = Model()
  m.d = nnx.Dict(x=nnx.Param(jnp.ones(1)))

  @nnx.jit
  def f(m):
    m.items.append(nnx.Param(jnp.ones(1) * 5))
    m.d['y'] = nnx.Param(jnp.ones(1) * 6)
    del m.d['x']

  f(m)
  assert len(m.items) == 2 and float(m.items[1][...][0]) == 5.0
  assert list(m.d) == ['y'] and float(m.d['y'][...][0]) == 6.0


def test_shared_references_stay_shared():
  shared = Block(3)
  m = Model()
  m.a = shared

  @nnx.jit
  def f(m):
    m.b = m.a  # now shared inside
    m.a.w[...] += 1

  f(m)
  assert m.a is shared and m.b is shared
  np.testing.assert_allclose(shared.w[...], [4.0, 4.0])


def test_outputs_that_are_inputs_come_back_as_the_callers_objects():
  m = Model()
  out = nnx.jit(lambda m: (m, m.a, m.a.w))(m)
  assert out[0] is m and out[1] is m.a and out[2] is m.a.w


@pytest.mark.parametrize('flags', [dict(graph=True, graph_updates=False), dict(graph=False)],
                         ids=['no-graph-updates', 'tree'])
def test_without_graph_updates_only_values_come_out(flags):
  m = Model()
  a = m.a

  @nnx.jit(**flags)
  def f(m):
    m.a.w[...] += 10
    m.extra = nnx.Param(jnp.ones(1))
    m.a, m.b = m.b, m.a

  f(m)
  assert m.a is a and not hasattr(m, 'extra')
  np.testing.assert_allclose(a.w[...], [11.0, 11.0])


@pytest.mark.parametrize('flags', [dict(), dict(graph=True, graph_updates=False), dict(graph=False)],
                         ids=['graph-updates', 'no-graph-updates', 'tree'])
def test_array_attributes_updated_inside_come_out_in_every_mode(flags):
  m = Model()

  @nnx.jit(**flags)
  def step(m):
    m.count += 1
    return m.count

  for expected in (1, 2, 3):
    assert int(step(m)) == expected
    assert int(m.count) == expected


def test_array_attribute_updates_keep_the_cached_plan():
  m = Model()
  traces = []

  @nnx.jit
  def step(m):
    traces.append(1)
    m.count += 1

  for _ in range(3):
    step(m)
  plan = step._plan
  step(m)
  assert step._plan is plan and len(traces) == 1 and int(m.count) == 4


def test_an_array_attribute_seen_by_other_caches_is_not_stale():
  m = Model()
  bump = nnx.jit(lambda m: setattr(m, 'count', m.count + 1))
  read = nnx.jit(lambda m: m.count * 1)
  assert int(read(m)) == 0
  bump(m)
  assert int(read(m)) == 1
  assert int(nnx.state(m)['count']) == 1


@pytest.mark.parametrize('transform', TRANSFORMS)
def test_a_call_that_raises_changes_nothing_structure_included(transform):
  m = Model()
  before = nnx.graphdef(m)
  a = m.a

  def f(m):
    m.extra = nnx.Param(jnp.ones(1))
    m.a = Block(9)
    del m.b
    m.a.w[...] += 1
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    transform(f)(m)
  assert nnx.graphdef(m) == before and m.a is a and hasattr(m, 'b')
  assert not hasattr(m, 'extra')
  np.testing.assert_allclose(a.w[...], [1.0, 1.0])


def test_jit_on_init_builds_the_object_and_is_cached():
  traces = []

  class Foo(nnx.Module):
    @nnx.jit(static_argnums=(1, 2))
    def __init__(self, din, dout, *, rngs):
      traces.append(1)
      self.w = nnx.Param(rngs.params.normal((din, dout)))
      self.din = din

  a = Foo(2, 3, rngs=nnx.Rngs(0))
  b = Foo(2, 3, rngs=nnx.Rngs(1))
  assert a.w.shape == (2, 3) and a.din == 2 and isinstance(a.w[...], jax.Array)
  assert len(traces) == 1 and not np.allclose(a.w[...], b.w[...])


def test_the_plan_does_not_keep_a_dropped_model_alive():
  import gc
  import weakref

  m = Model()
  f = nnx.jit(lambda m: m.a.w[...].sum())
  f(m)
  ref = weakref.ref(m)
  arrays = {id(x) for x in jax.tree.leaves(nnx.state(m))}
  del m
  gc.collect()
  assert ref() is None
  assert not arrays & {id(x) for x in jax.live_arrays()}


def test_occurrences_list_every_path_of_a_shared_variable():
  shared = nnx.Param(jnp.ones(1))
  m = Model()
  m.a.w = shared
  m.b.w = shared
  plan = prop.make_plan((m,), {}, graph=True)
  paths = [p for i, p in prop.leaf_occurrences(plan) if plan.items[i] is shared]
  assert paths == [(0, 0, 'a', 'w'), (0, 0, 'b', 'w')]


def test_inconsistent_specs_for_a_shared_variable_name_both_paths():
  shared = nnx.Param(jnp.ones(1))
  m1, m2 = Block(), Block()
  m1.w = m2.w = shared
  plan = prop.make_plan((m1, m2), {}, graph=True)
  with pytest.raises(ValueError, match=r'Inconsistent aliasing detected[\s\S]*\.args\[0\]\.w: 0'
                                       r'[\s\S]*\.args\[1\]\.w: 1'):
    prop.resolve_leaf_specs(plan, lambda pos: pos, lambda spec, path, leaf: spec, 'axes')


def test_the_collector_is_paused_while_a_body_is_traced_and_resumed_after():
  import gc
  seen = []

  @nnx.jit
  def step(m, x):
    seen.append(gc.isenabled())
    return m(x)

  m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  step(m, jnp.ones(2))
  assert seen == [False] and gc.isenabled()

  @nnx.jit
  def fails(m):
    raise RuntimeError('inside')

  with pytest.raises(RuntimeError, match='inside'):
    fails(m)
  assert gc.isenabled()
  gc.disable()  # a caller who paused it keeps it paused
  try:
    nnx.jit(lambda m, x: m(x))(m, jnp.ones(2))
    assert not gc.isenabled()
  finally:
    gc.enable()
