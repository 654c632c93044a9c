"""Cached plans and flattenings never go stale.

A hypothesis state machine edits one model's structure in every way arbax
knows of (and some it cannot see: writes behind ``__setattr__``, plain
containers changed in place) and, between edits, calls nnx.jit, nnx.grad,
nnx.vmap and split/merge in tree and graph mode. Each result is compared
with the same computation run eagerly on the model as it is now. The
transform wrappers live for the whole module, so their cached plans see
every edit. ``make test`` runs 200 examples; ``make stress``
(``ARBAX_HYPOTHESIS_PROFILE=stress``) runs 5,000.

The explicit tests at the end cover each container kind arbax does not own.
"""
import collections
import copy
import dataclasses
import os
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import arbax as nnx
from arbax import _structure, graph as graphlib


# -- the computation: one walk over whatever the object holds now --------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
  """A mutable registered dataclass: JAX sees ``a``; ``scale`` is static."""
  a: tp.Any
  scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))


def walk(obj, factor=1.0, out=None) -> list:
  """``[(Variable or raw array, factor)]`` for everything reachable by attribute and item access.

  ``scale`` attributes multiply what is below them, ``deterministic=True`` halves it and
  a Variable's ``coef`` metadata multiplies its own term.
  """
  out = [] if out is None else out
  if isinstance(obj, nnx.Variable):
    out.append((obj, factor * obj.get_metadata('coef', 1.0)))
  elif isinstance(obj, (jax.Array, np.ndarray)):
    out.append((obj, factor))
  elif isinstance(obj, (nnx.List, list, tuple)):
    for item in obj:
      walk(item, factor, out)
  elif isinstance(obj, (nnx.Dict, dict)):
    for key in list(obj.keys()):
      walk(obj[key], factor, out)
  elif isinstance(obj, nnx.Pytree) or dataclasses.is_dataclass(obj):
    attrs = {k: v for k, v in vars(obj).items() if not str(k).startswith('_arbax_')}
    factor = factor * attrs.get('scale', 1.0) * (0.5 if attrs.get('deterministic') else 1.0)
    for k, v in attrs.items():
      if k not in ('scale', 'deterministic'):
        walk(v, factor, out)
  return out


def value_of(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def evaluate(model, x):
  total = jnp.zeros(())
  for leaf, factor in walk(model):
    total = total + factor * jnp.sum(value_of(leaf)) * x
  return total


def bump_stats(model, x):
  for leaf, _ in walk(model):
    if isinstance(leaf, nnx.BatchStat):
      leaf[...] = leaf[...] + x


# One wrapper per transform and mode for the whole module: their plans persist across edits.
JIT = {g: nnx.jit(evaluate, graph=g) for g in (False, True)}
GRAD = {g: nnx.grad(evaluate, graph=g) for g in (False, True)}
VMAP = {g: nnx.vmap(evaluate, in_axes=(None, 0), graph=g) for g in (False, True)}
BUMP = {g: nnx.jit(bump_stats, graph=g) for g in (False, True)}


class Leafy(nnx.Module):
  def __init__(self, value: float):
    self.w = nnx.Param(jnp.full((2,), value))
    self.stat = nnx.BatchStat(jnp.zeros(2))
    self.scale = 1.0
    self.deterministic = False


class Root(nnx.Module):
  def __init__(self):
    self.blocks = nnx.List([Leafy(1.0)])
    self.table = nnx.Dict(a=nnx.Param(jnp.ones(2)))
    self.bag = nnx.data([])                      # an untracked plain list, data
    self.later = nnx.data([])                    # data from the start: reset, then refilled
    self.ints = nnx.data({0: nnx.Param(jnp.ones(2))})  # non-string keys: a plain dict
    self.ordered = nnx.data(collections.OrderedDict(a=nnx.Param(jnp.ones(2))))
    self.pair = nnx.data((nnx.Param(jnp.ones(2)), []))  # a list inside a tuple
    self.box = nnx.data(Box(nnx.Param(jnp.ones(2))))
    self.stats = nnx.data(nnx.State({'a': nnx.BatchStat(jnp.zeros(2))}))
    self.raw = nnx.data([jnp.ones(2)])
    self.scale = 1.0


def leaves_by_path(tree, mode) -> dict:
  """``{path: leaf}`` of a State (graph mode's gradients) or of a Module (tree mode's)."""
  fl = graphlib.flatten(tree, graph=mode)
  return dict(zip(fl.paths, fl.leaves))


def assert_close(actual, expected, what):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-5,
                             err_msg=what)


_counter = iter(range(1, 10**9))


def fresh_value() -> float:
  """A value no other Variable of the run holds (bypass swaps must not be equal-valued)."""
  return float(next(_counter) % 97) + 0.25


SCALES = st.sampled_from([1.0, 2.0])  # few distinct static values: compiled programs are reused
MODES = st.booleans()
XS = st.sampled_from([0.5, 1.5])
WRITES = st.sampled_from(['setattr', 'object.__setattr__', '__dict__', 'vars.update'])


class CacheMachine(RuleBasedStateMachine):
  """Structural edits of ``self.m`` interleaved with checks against eager evaluation."""

  @initialize()
  def build(self):
    self.m = Root()

  def pick(self, index):
    blocks = self.m.blocks
    return blocks[index % len(blocks)] if len(blocks) else None

  # -- edits of the nnx containers ---------------------------------------------
  @rule(value=st.sampled_from([1.0, 2.0]))
  def append_block(self, value):
    self.m.blocks.append(Leafy(value))

  @rule(how=st.sampled_from(['pop', 'pop0', 'del-last', 'del-slice', 'slice-empty', 'clear',
                             'slice-replace', 'insert', 'remove']))
  def shrink_or_reorder_blocks(self, how):
    blocks = self.m.blocks
    if how == 'insert':
      blocks.insert(0, Leafy(2.0))
    elif how == 'slice-replace':
      blocks[0:1] = [Leafy(1.0)]
    elif not len(blocks):
      return
    elif how == 'pop':
      blocks.pop()
    elif how == 'pop0':
      blocks.pop(0)
    elif how == 'del-last':
      del blocks[-1]
    elif how == 'del-slice':
      del blocks[:]
    elif how == 'slice-empty':
      blocks[:] = []
    elif how == 'clear':
      blocks.clear()
    else:
      blocks.remove(blocks[-1])

  @rule(key=st.sampled_from(['a', 'b']), kind=st.sampled_from(['param', 'module', 'delete']))
  def edit_table(self, key, kind):
    table = self.m.table
    if kind == 'delete':
      table.pop(key, None)
    else:
      table[key] = nnx.Param(jnp.full(2, fresh_value())) if kind == 'param' else Leafy(1.0)

  # -- attributes: set, bypass, delete, replace Variables and submodules ---------
  @rule(scale=SCALES, write=WRITES, on_block=st.booleans(), index=st.integers(0, 3))
  def set_scale(self, scale, write, on_block, index):
    target = self.pick(index) if on_block else self.m
    if target is None:
      return
    if write == 'setattr':
      target.scale = scale
    elif write == 'object.__setattr__':
      object.__setattr__(target, 'scale', scale)
    elif write == '__dict__':
      target.__dict__['scale'] = scale
    else:
      vars(target).update(scale=scale)

  @rule(write=st.sampled_from(['setattr', 'object.__setattr__', '__dict__']),
        index=st.integers(0, 3))
  def replace_variable(self, write, index):
    block = self.pick(index)
    if block is None:
      return
    new = nnx.Param(jnp.full(2, fresh_value()))
    if write == 'setattr':
      block.w = new
    elif write == 'object.__setattr__':
      object.__setattr__(block, 'w', new)
    else:
      block.__dict__['w'] = new

  @rule(index=st.integers(0, 3))
  def replace_submodule(self, index):
    if len(self.m.blocks):
      self.m.blocks[index % len(self.m.blocks)] = Leafy(2.0)

  @rule(kind=st.sampled_from(['param', 'module', 'static']))
  def add_extra(self, kind):
    if 'extra' in vars(self.m):
      del self.m.extra  # an attribute keeps the class of its first value (as in NNX)
    self.m.extra = {'param': lambda: nnx.Param(jnp.full(2, fresh_value())),
                    'module': lambda: Leafy(1.0), 'static': lambda: 3}[kind]()

  @rule()
  def delete_extra(self):
    if 'extra' in vars(self.m):
      del self.m.extra

  @rule(index=st.integers(0, 3), coef=st.sampled_from([1.0, 3.0]))
  def set_metadata(self, index, coef):
    block = self.pick(index)
    if block is not None:
      block.w.set_metadata(coef=coef)

  @rule(training=st.booleans())
  def train_or_eval(self, training):
    if training:
      self.m.train()
    else:
      self.m.eval()

  # -- containers arbax does not own, changed in place ---------------------------
  @rule(how=st.sampled_from(['append', 'pop', 'replace']))
  def edit_bag(self, how):
    bag = self.m.bag
    if how == 'append' or not bag:
      bag.append(nnx.Param(jnp.full(2, fresh_value())))
    elif how == 'pop':
      bag.pop()
    else:
      bag[0] = nnx.Param(jnp.full(2, fresh_value()))

  @rule(reset=st.booleans())
  def fill_later(self, reset):
    if reset:
      self.m.later = []  # still data: the class is kept from the first assignment
    else:
      self.m.later.append(nnx.Param(jnp.full(2, fresh_value())))

  @rule(key=st.integers(0, 2), delete=st.booleans())
  def edit_int_keys(self, key, delete):
    if delete:
      self.m.ints.pop(key, None)
    else:
      self.m.ints[key] = nnx.Param(jnp.full(2, fresh_value()))

  @rule(key=st.sampled_from(['a', 'b']), how=st.sampled_from(['set', 'delete', 'move']))
  def edit_ordered(self, key, how):
    od = self.m.ordered
    if how == 'set':
      od[key] = nnx.Param(jnp.full(2, fresh_value()))
    elif how == 'delete':
      od.pop(key, None)
    elif key in od:
      od.move_to_end(key)

  @rule()
  def fill_list_in_tuple(self):
    self.m.pair[1].append(nnx.Param(jnp.full(2, fresh_value())))

  @rule(scale=SCALES, replace=st.booleans())
  def edit_dataclass(self, scale, replace):
    if replace:
      self.m.box.a = nnx.Param(jnp.full(2, fresh_value()))
    else:
      self.m.box.scale = scale

  @rule(key=st.sampled_from(['a', 'b']), delete=st.booleans())
  def edit_state_attribute(self, key, delete):
    if delete:
      self.m.stats.pop(key, None)
    else:
      self.m.stats[key] = nnx.BatchStat(jnp.full(2, fresh_value()))

  @rule(delta=st.sampled_from([1.0, -2.0]))
  def update_values(self, delta):
    """nnx.update: new values into the Variables, and a raw array into the plain list."""
    state = nnx.state(self.m)
    nnx.update(self.m, jax.tree.map(lambda v: v + delta, state))
    nnx.update(self.m, {'raw': {0: jnp.full(2, fresh_value())}})

  @rule(index=st.integers(0, 3), scale=SCALES)
  def shallow_copy(self, index, scale):
    """Edit a shallow copy and put it in place of the original: the original stays as it was."""
    original = self.pick(index)
    if original is None:
      return
    before = sorted(map(str, dict(nnx.state(original).flat_state())))
    c = copy.copy(original)
    assert c.w is original.w  # shallow: same children
    c.scale = scale
    c.extra = nnx.Param(jnp.ones(1))
    original.deterministic = original.deterministic  # any setattr on the original
    assert sorted(map(str, dict(nnx.state(original).flat_state()))) == before
    self.m.blocks[index % len(self.m.blocks)] = c

  # -- checks: every transform against the eager computation --------------------
  @rule(mode=MODES, x=XS)
  def check_jit(self, mode, x):
    assert_close(JIT[mode](self.m, x), evaluate(self.m, x), f'nnx.jit(graph={mode})')

  @rule(mode=MODES, x=XS)
  def check_grad(self, mode, x):
    grads = GRAD[mode](self.m, x)
    # graph mode differentiates the Params; tree mode, like jax.grad, every leaf (as NNX does)
    expected = {id(v): f * x * jnp.ones_like(value_of(v))
                for v, f in walk(self.m) if isinstance(v, nnx.Param) or not mode}
    fresh = graphlib.flatten(self.m, graph=mode)  # uncached: where each path leads now
    at_path = dict(zip(fresh.paths, fresh.leaves))
    got = leaves_by_path(grads, mode)
    assert len(got) == len(expected), (sorted(map(str, got)), len(expected))
    for path, g in got.items():
      assert_close(value_of(g), expected[id(at_path[path])], f'nnx.grad(graph={mode}) at {path}')

  @rule(mode=MODES)
  def check_vmap(self, mode):
    xs = jnp.array([0.5, 1.5])
    assert_close(VMAP[mode](self.m, xs), jnp.stack([evaluate(self.m, x) for x in xs]),
                 f'nnx.vmap(graph={mode})')

  @rule(mode=MODES, x=XS)
  def check_write_back(self, mode, x):
    before = [(v, v.get_value()) for v, _ in walk(self.m) if isinstance(v, nnx.BatchStat)]
    BUMP[mode](self.m, x)
    for v, old in before:
      assert_close(v.get_value(), old + x, f'write-back of nnx.jit(graph={mode})')

  @rule(mode=MODES, x=XS)
  def check_split_merge(self, mode, x):
    graphdef, state = nnx.split(self.m, graph=mode)
    fresh = graphlib.flatten(self.m, graph=mode)
    assert graphdef == fresh.graphdef
    now = dict(zip(fresh.paths, fresh.leaves))
    assert {p: id(v) for p, v in state.flat_state()} == {p: id(v) for p, v in now.items()}
    assert_close(evaluate(nnx.merge(graphdef, state), x), evaluate(self.m, x),
                 f'split/merge(graph={mode})')

  @rule(mode=MODES, x=XS)
  def check_view(self, mode, x):
    view = nnx.view(self.m, deterministic=True, raise_if_not_found=False)
    assert_close(JIT[mode](view, x), evaluate(view, x), f'nnx.jit(graph={mode}) of nnx.view')

  @invariant()
  def state_holds_every_reachable_variable(self):
    state = nnx.state(self.m)
    held = {id(v) for v in dict(state.flat_state()).values() if isinstance(v, nnx.Variable)}
    reachable = {id(v) for v, _ in walk(self.m) if isinstance(v, nnx.Variable)}
    assert held == reachable


def _machine_settings():
  stress = os.environ.get('ARBAX_HYPOTHESIS_PROFILE') == 'stress'
  return settings(max_examples=5000 if stress else 200, stateful_step_count=15, deadline=None,
                  database=None, derandomize=not stress,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = _machine_settings()


# -- each container kind arbax does not own, in every transform ------------------
def _container_cases():
  """``make(param) -> container`` and ``fill(container, param)`` for each untracked kind."""
  def set_key(key):
    def fill(c, p):
      c[key] = p
    return fill
  cases = [
      ('nnx.data list', lambda p: nnx.data([p]), lambda c, p: c.append(p)),
      ('int keys', lambda p: nnx.data({0: p}), set_key(1)),
      ('mixed keys', lambda p: nnx.data({0: p, 'a': nnx.Param(jnp.ones(2))}), set_key('b')),
      ('OrderedDict', lambda p: nnx.data(collections.OrderedDict(a=p)), set_key('b')),
      ('list in tuple', lambda p: nnx.data((p, [])), lambda c, p: c[1].append(p)),
      ('dataclass', lambda p: nnx.data(Box(p)), lambda c, p: setattr(c, 'a', p)),
      ('State', lambda p: nnx.data(nnx.State({'a': p})), set_key('b')),
  ]
  return [pytest.param(name, make, fill, id=name) for name, make, fill in cases]


class Holder(nnx.Module):
  def __init__(self, container):
    self.c = container


@pytest.mark.parametrize('mode', [False, True], ids=['tree', 'graph'])
@pytest.mark.parametrize('name,make,fill', _container_cases())
def test_untracked_containers_changed_in_place_reach_every_transform(name, make, fill, mode):
  m = Holder(make(nnx.Param(jnp.ones(2))))
  jitted = nnx.jit(evaluate, graph=mode)
  grad = nnx.grad(evaluate, graph=mode)
  value_and_grad = nnx.value_and_grad(evaluate, graph=mode)
  vmapped = nnx.vmap(evaluate, in_axes=(None, 0), graph=mode)
  xs = jnp.array([1.0, 2.0])
  for _ in range(2):  # the second round reuses every cached plan
    assert_close(jitted(m, 1.0), evaluate(m, 1.0), name)
    assert_close(vmapped(m, xs), jnp.stack([evaluate(m, 1.0), evaluate(m, 2.0)]), name)
  new = nnx.Param(jnp.full(2, 5.0))
  fill(m.c, new)
  assert_close(jitted(m, 1.0), evaluate(m, 1.0), f'{name}: jit after the in-place change')
  assert_close(vmapped(m, xs), jnp.stack([evaluate(m, 1.0), evaluate(m, 2.0)]), name)
  grads = leaves_by_path(grad(m, 1.0), mode)
  value, grads2 = value_and_grad(m, 1.0)
  assert_close(value, evaluate(m, 1.0), name)
  for g in (grads, leaves_by_path(grads2, mode)):
    assert len(g) == sum(isinstance(v, nnx.Param) or not mode for v, _ in walk(m)), name
  assert any(v is new for v in dict(nnx.state(m).flat_state()).values())


@pytest.mark.parametrize('mode', [False, True], ids=['tree', 'graph'])
def test_update_writing_a_raw_array_into_a_plain_list_reaches_cached_plans(mode):
  m = Holder(nnx.data([jnp.ones(2)]))
  jitted = nnx.jit(evaluate, graph=mode)
  assert float(jitted(m, 1.0)) == 2.0
  nnx.update(m, {'c': {0: jnp.full(2, 4.0)}})
  assert type(m.c) is list and float(m.c[0][0]) == 4.0
  assert float(jitted(m, 1.0)) == 8.0 == float(evaluate(m, 1.0))


def test_check_mode_raises_on_a_stale_cache():
  """The one change the watch cannot see (a bypass swap for an equal-valued Variable)."""
  m = Holder(nnx.Param(jnp.array(1.0)))
  nnx.state(m)
  nnx.state(m)  # cached from the second sight on
  object.__setattr__(m, 'c', nnx.Param(jnp.array(1.0)))
  with _structure.check_cache(True):
    with pytest.raises(_structure.StaleCacheError, match=r"leaf \('c',\)"):
      nnx.state(m)
