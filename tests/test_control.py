"""nnx.cond / switch / eval_shape / checkify / make_jaxpr / cached_partial: values and state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify as checkify_lib

import arbax as nnx


class Count(nnx.Variable):
  pass


class Acc(nnx.Module):
  """A running total and a call counter."""

  def __init__(self, seed: int = 0):
    # strong dtypes: a weak-typed start would change type on the first update (a retrace)
    self.total = nnx.BatchStat(jnp.zeros((), jnp.float32))
    self.calls = Count(jnp.zeros((), jnp.int32))
    self.w = nnx.Param(jax.random.normal(jax.random.key(seed), (2,)))


def add(acc, x):
  acc.total[...] += jnp.sum(x)
  acc.calls[...] += 1
  return x * 2


def sub(acc, x):
  acc.total[...] -= jnp.sum(x)
  return -x


def assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# -- cond / switch ------------------------------------------------------------
@pytest.mark.parametrize('pred', [True, jnp.array(True)])
def test_cond_true_branch_updates_state(pred):
  acc = Acc()
  y = nnx.cond(pred, add, sub, acc, jnp.array([1.0, 2.0]))
  assert_close(y, [2.0, 4.0])
  assert float(acc.total[...]) == 3.0
  assert int(acc.calls[...]) == 1


def test_cond_false_branch_leaves_other_variables():
  acc = Acc()
  y = nnx.cond(jnp.array(False), add, sub, acc, jnp.array([1.0, 2.0]))
  assert_close(y, [-1.0, -2.0])
  assert float(acc.total[...]) == -3.0
  assert int(acc.calls[...]) == 0                  # only the taken branch's updates apply


def test_cond_inside_jit_traces_once():
  acc = Acc()
  traces = []

  @nnx.jit
  def step(acc, flag, x):
    traces.append(1)
    return nnx.cond(flag, add, sub, acc, x)

  x = jnp.ones(2)
  step(acc, jnp.array(True), x)
  step(acc, jnp.array(True), x)
  step(acc, jnp.array(False), x)
  assert len(traces) == 1
  assert float(acc.total[...]) == 2.0
  assert int(acc.calls[...]) == 2


def test_switch_selects_and_clamps():
  acc = Acc()
  branches = [add, sub, lambda acc, x: x]
  assert_close(nnx.switch(1, branches, acc, jnp.ones(2)), -jnp.ones(2))
  assert float(acc.total[...]) == -2.0
  assert_close(nnx.switch(jnp.array(7), branches, acc, jnp.ones(2)), jnp.ones(2))  # clamped to 2
  assert_close(nnx.switch(jnp.array(-3), branches, acc, jnp.ones(2)), 2 * jnp.ones(2))  # to 0
  assert float(acc.total[...]) == 0.0
  assert int(acc.calls[...]) == 1


def test_cond_branches_must_agree():
  with pytest.raises(TypeError):
    nnx.cond(jnp.array(True), lambda a, x: x, lambda a, x: (x, x), Acc(), jnp.ones(2))


def test_cond_failure_leaves_state_untouched():
  acc = Acc()

  def bad(acc, x):
    acc.calls[...] += 1
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.cond(jnp.array(True), add, bad, acc, jnp.ones(2))
  assert int(acc.calls[...]) == 0
  assert float(acc.total[...]) == 0.0


@pytest.mark.parametrize('graph_updates', [True, False])
def test_cond_shared_variables_graph_mode_works_tree_mode_refuses(graph_updates):
  v = nnx.BatchStat(jnp.array(1.0))
  d = nnx.Dict(a=v, b=v)

  def bump(d):
    d['a'][...] += 1.0
    return d['b'][...]

  out = nnx.cond(jnp.array(True), bump, bump, d, graph_updates=graph_updates)
  assert float(out) == 2.0                          # the write through .a is seen through .b
  assert float(v[...]) == 2.0 and d['a'] is d['b']
  with pytest.raises(ValueError) as info:
    nnx.cond(True, bump, bump, d, graph=False)
  assert 'a' in str(info.value) and 'b' in str(info.value)
  assert float(v[...]) == 2.0


def test_switch_shared_variables_in_graph_mode():
  v = nnx.BatchStat(jnp.array(0.0))
  d = nnx.Dict(a=v, b=v)
  branches = (lambda d: d['a'].__setitem__(..., d['a'][...] + 1),
              lambda d: d['b'].__setitem__(..., d['b'][...] + 10))
  nnx.switch(1, branches, d)
  nnx.switch(0, branches, d, graph_updates=False)
  assert float(d['a'][...]) == 11.0 and d['a'] is d['b']
  with pytest.raises(ValueError):
    nnx.switch(0, branches, d, graph=False)


def test_cond_structural_updates_need_both_branches_to_agree():
  def grow(acc, x):
    acc.extra = nnx.BatchStat(jnp.sum(x))
    acc.note = 'grown'
    return x

  def grow_more(acc, x):
    acc.extra = nnx.BatchStat(jnp.sum(x) * 10)
    acc.note = 'grown'
    return -x

  acc = Acc()
  nnx.cond(jnp.array(False), grow, grow_more, acc, jnp.ones(2))
  assert acc.note == 'grown' and float(acc.extra[...]) == 20.0
  acc = Acc()
  nnx.switch(0, (grow, grow_more), acc, jnp.ones(2))
  assert float(acc.extra[...]) == 2.0
  acc = Acc()
  nnx.cond(True, grow, grow_more, acc, jnp.ones(2), graph_updates=False)
  assert not hasattr(acc, 'extra')                 # without graph updates: values only
  acc, before = Acc(), None
  before = nnx.graphdef(acc)
  with pytest.raises(TypeError):                   # one branch changes the structure, one not
    nnx.cond(jnp.array(True), grow, add, acc, jnp.ones(2))
  assert nnx.graphdef(acc) == before and int(acc.calls[...]) == 0


def test_cond_outputs_that_are_operands():
  acc = Acc()
  assert nnx.cond(True, lambda a: a, lambda a: a, acc) is acc   # graph updates: the caller's
  assert nnx.cond(True, lambda a: a.w, lambda a: a.w, acc) is acc.w
  with pytest.raises(ValueError, match='Duplicate Param') as info:
    nnx.cond(True, lambda a: a.w, lambda a: a.w, acc, graph_updates=False)
  assert '.args[0].w' in str(info.value) and 'nnx.cond' in str(info.value)


def test_cond_and_switch_reuse_their_traces_for_the_same_branches():
  traces = []

  def up(acc, x):
    traces.append('up')
    return add(acc, x)

  def down(acc, x):
    traces.append('down')
    return sub(acc, x)

  acc = Acc()
  for flag in (True, False, True):
    nnx.cond(flag, up, down, acc, jnp.ones(2))
  assert sorted(traces) == ['down', 'up']          # each branch traced once, then reused
  for index in (0, 1, 1):
    nnx.switch(index, (up, down), acc, jnp.ones(2))
  assert len(traces) == 4                          # once more each, for switch
  assert int(acc.calls[...]) == 3
  nnx.cond(True, up, down, acc, jnp.ones(3))       # a new operand shape traces again
  assert len(traces) == 6


def test_grad_through_cond():
  acc = Acc()
  x = jnp.array([0.5, 1.5])
  grads = nnx.grad(lambda a: nnx.cond(True, lambda a: jnp.sum(a.w * x) ** 2, lambda a: 0.0, a))(acc)
  assert_close(grads['w'][...], 2 * jnp.sum(acc.w[...] * x) * x)


# -- eval_shape ---------------------------------------------------------------
class Tiny(nnx.Module):
  def __init__(self, din, dout, *, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout)))
    self.bias = nnx.Param(jnp.zeros((dout,)))
    self.steps = Count(jnp.array(0))
    self.din = din

  def __call__(self, x):
    self.steps[...] += 1
    return x @ self.kernel + self.bias


def test_eval_shape_builds_an_abstract_model():
  model = nnx.eval_shape(lambda: Tiny(2, 3, rngs=nnx.Rngs(0)))
  assert isinstance(model, Tiny)
  assert isinstance(model.kernel, nnx.Param)
  kernel = model.kernel.get_value()
  assert isinstance(kernel, jax.ShapeDtypeStruct)
  assert kernel.shape == (2, 3) and kernel.dtype == jnp.float32
  assert model.bias.get_value().shape == (3,)
  assert model.din == 2
  graphdef, state = nnx.split(model)
  assert [p for p, _ in state.flat_state()] == [('bias',), ('kernel',), ('steps',)]


def test_eval_shape_of_a_call_leaves_arguments_unchanged():
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  out = nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((5, 2)))
  assert out == jax.ShapeDtypeStruct((5, 3), jnp.float32)
  assert int(model.steps[...]) == 0
  assert isinstance(model.kernel.get_value(), jax.Array)
  kw = nnx.eval_shape(lambda x, *, scale: x * scale, jnp.ones(4), scale=2.0)
  assert kw.shape == (4,)


@pytest.mark.parametrize('graph_updates', [True, False])
def test_eval_shape_never_changes_the_arguments(graph_updates):
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  before = nnx.graphdef(model)

  def grow(m):
    m.steps[...] += 1
    m.extra = nnx.Param(jnp.zeros(4))
    return m.extra

  out = nnx.eval_shape(grow, model, graph_updates=graph_updates)
  assert isinstance(out, nnx.Param) and out.get_value().shape == (4,)
  assert nnx.graphdef(model) == before and int(model.steps[...]) == 0


def test_eval_shape_with_graph_updates_returns_new_abstract_objects_for_inputs():
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  out, kernel = nnx.eval_shape(lambda m: (m, m.kernel), model)
  assert isinstance(out, Tiny) and out is not model
  assert out.kernel is kernel                        # sharing inside the output is kept
  assert isinstance(kernel.get_value(), jax.ShapeDtypeStruct)


@pytest.mark.parametrize('flags', [dict(graph_updates=False), dict(graph=False)])
def test_eval_shape_without_graph_updates_refuses_aliased_variables(flags):
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(ValueError, match='Duplicate Param') as info:
    nnx.eval_shape(lambda v: v, v, **flags)
  assert '.args[0]' in str(info.value) and '.out' in str(info.value)
  with pytest.raises(ValueError, match='Duplicate Param'):
    nnx.eval_shape(lambda a, b: None, v, v, **flags)
  with pytest.raises(ValueError, match='Duplicate Param'):
    nnx.eval_shape(lambda d: d['a'][...], nnx.Dict(a=v, b=v), **flags)
  assert nnx.eval_shape(lambda a, b: a[...] + b[...], v, v).shape == ()   # graph updates: fine


def test_eval_shape_reuses_its_trace_and_takes_abstract_inputs():
  traces = []

  def forward(m, x):
    traces.append(1)
    return m(x)

  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  spec = jax.ShapeDtypeStruct((5, 2), jnp.float32)
  for _ in range(3):
    assert nnx.eval_shape(forward, model, spec).shape == (5, 3)
  assert len(traces) == 1
  nnx.eval_shape(forward, model, jax.ShapeDtypeStruct((7, 2), jnp.float32))
  assert len(traces) == 2


# -- checkify -----------------------------------------------------------------
def checked_step(acc, x):
  checkify_lib.check(jnp.all(x > 0), 'x must be positive')
  return add(acc, x)


def test_checkify_reports_errors_and_propagates_state():
  acc = Acc()
  err, y = nnx.checkify(checked_step)(acc, jnp.ones(2))
  assert err.get() is None
  assert_close(y, 2 * jnp.ones(2))
  err, _ = nnx.checkify(checked_step)(acc, -jnp.ones(2))
  assert 'x must be positive' in err.get()
  with pytest.raises(checkify_lib.JaxRuntimeError, match='positive'):
    err.throw()
  assert int(acc.calls[...]) == 2                  # updates apply whether or not a check failed
  assert float(acc.total[...]) == 0.0


@pytest.mark.parametrize('graph_updates', [True, False])
def test_checkify_structural_updates_follow_graph_updates(graph_updates):
  def grow(acc):
    acc.extra = nnx.BatchStat(acc.total[...] + 1)
    acc.calls[...] += 1
    return acc.calls[...]

  acc = Acc()
  err, out = nnx.checkify(grow, graph_updates=graph_updates)(acc)
  assert err.get() is None and int(out) == 1 and int(acc.calls[...]) == 1
  assert hasattr(acc, 'extra') == graph_updates


def test_checkify_failure_changes_nothing():
  acc = Acc()

  def bad(acc):
    acc.calls[...] += 1
    acc.extra = nnx.Param(jnp.ones(1))
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.checkify(bad)(acc)
  assert int(acc.calls[...]) == 0 and not hasattr(acc, 'extra')


def test_checkify_other_error_sets():
  err, _ = nnx.checkify(lambda x: x / 0.0, errors=checkify_lib.float_checks)(jnp.ones(2))
  assert 'division by zero' in err.get()


# -- make_jaxpr ---------------------------------------------------------------
def test_make_jaxpr_of_a_module_call():
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  jaxpr = nnx.make_jaxpr(lambda m, x: m(x), graph_updates=False)(model, jnp.ones((1, 2)))
  assert isinstance(jaxpr, jax.extend.core.ClosedJaxpr)
  assert [v.aval.shape for v in jaxpr.jaxpr.invars] == [(3,), (2, 3), (), (1, 2)]
  assert [v.aval.shape for v in jaxpr.jaxpr.outvars] == [(1, 3)]
  assert int(model.steps[...]) == 0                 # traced, not applied


def test_make_jaxpr_static_argnums_and_graph_updates():
  jaxpr = nnx.make_jaxpr(lambda x, n: x ** n, static_argnums=1, graph_updates=False)(
      jnp.ones(2), 3)
  assert len(jaxpr.jaxpr.invars) == 1
  assert 'integer_pow' in str(jaxpr) and 'y=3' in str(jaxpr)
  with pytest.raises(ValueError, match='graph_updates=True'):
    nnx.make_jaxpr(lambda x: x)                     # NNX's default has graph updates: refused
  with pytest.raises(ValueError, match='graph_updates=True'):
    nnx.make_jaxpr(graph_updates=True)(lambda x: x)


def test_make_jaxpr_refuses_aliased_variables():
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(ValueError, match='Duplicate Param'):
    nnx.make_jaxpr(lambda a, b: a[...] + b[...], graph_updates=False)(v, v)
  with pytest.raises(ValueError, match='Duplicate Param'):
    nnx.make_jaxpr(lambda a: a, graph_updates=False)(v)


@pytest.mark.parametrize('name', ['eval_shape', 'checkify', 'make_jaxpr'])
def test_bound_methods_are_refused(name):
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  calls = {'eval_shape': lambda f: nnx.eval_shape(f, jnp.ones((1, 2))),
           'checkify': lambda f: nnx.checkify(f),
           'make_jaxpr': lambda f: nnx.make_jaxpr(f, graph_updates=False)}
  with pytest.raises(ValueError, match='bound methods') as info:
    calls[name](model.__call__)
  assert f'nnx.{name}' in str(info.value)


# -- cached_partial -----------------------------------------------------------
def test_cached_partial_matches_direct_calls():
  a, b = Tiny(2, 3, rngs=nnx.Rngs(0)), Tiny(2, 3, rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def step(m, x):
    traces.append(1)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(m, nnx.Param), grads))
    return jnp.sum(m(x))

  cached = nnx.cached_partial(step, a)
  x = jnp.ones((4, 2))
  for _ in range(3):
    assert_close(cached(x), step(b, x))
  assert_close(a.kernel[...], b.kernel[...])
  assert int(a.steps[...]) == 6
  assert len(traces) == 1


def test_cached_partial_is_graph_mode_only():
  model = Tiny(2, 3, rngs=nnx.Rngs(0))
  for flags in (dict(graph=False), dict(graph_updates=False)):
    with pytest.raises(ValueError, match='graph-mode-only') as info:
      nnx.cached_partial(lambda m: m, model, **flags)
    assert 'jit_partial' in str(info.value)
  with nnx.set_graph_updates(False):
    with pytest.raises(ValueError, match='graph-mode-only'):
      nnx.cached_partial(lambda m: m, model)
    assert nnx.compat.cached_partial(lambda m: m, model)() is not model   # compat: graph updates


def test_eval_shape_gives_each_variable_its_own_shape_when_layers_share_traced_values():
  # Under eval_shape equal layers share their traced initial values; the output keeps order.
  class Mixed(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 5, rngs=rngs),
                              nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 5, use_bias=False,
                                                                      rngs=rngs)])

  abstract = nnx.eval_shape(lambda: Mixed(nnx.Rngs(0)))
  shapes = [(layer.kernel.shape, layer.bias.shape if layer.bias is not None else None)
            for layer in abstract.layers]
  assert shapes == [((2, 3), (3,)), ((3, 5), (5,)), ((2, 3), (3,)), ((3, 5), None)]
  assert all(isinstance(v[...], jax.ShapeDtypeStruct) for v in nnx.state(abstract).flat_state().leaves)
  x = jnp.ones((4, 2), jnp.int32)
  a, b, c = nnx.eval_shape(lambda x: (x, x, x.astype(jnp.float32)), x)
  assert (a.shape, a.dtype, b.dtype, c.dtype) == ((4, 2), jnp.int32, jnp.int32, jnp.float32)


def test_cond_called_outside_jit_compiles_nothing_on_a_repeat(compilations):
  acc, x = Acc(), jnp.ones(2)

  def skip(acc, x):
    return x

  def step(flag):
    return nnx.cond(flag, add, skip, acc, x)

  step(True), step(False)  # first calls compile
  with compilations() as compiled:
    for flag in (True, False, True):
      step(flag)
  assert compiled == []
  assert int(acc.calls[...]) == 3 and float(acc.total[...]) == 6.0
