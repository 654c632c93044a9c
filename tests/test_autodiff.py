"""nnx.grad / value_and_grad / vjp / jvp / custom_vjp / remat: gradients and state propagation.

Two regimes (as in NNX): graph mode with graph updates (the default) gives States of the
differentiated Variables and carries structural changes out; tree mode or
``graph_updates=False`` follows jax.grad (gradients shaped like the arguments, values only).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

TREE_RULES = [pytest.param(dict(graph=True, graph_updates=False), id='graph-no-updates'),
              pytest.param(dict(graph=False, graph_updates=False), id='tree')]
ALL_MODES = [pytest.param(dict(graph=True, graph_updates=True), id='graph-updates'), *TREE_RULES]


class Count(nnx.Variable):
  pass


class Model(nnx.Module):
  """y = sum(w * x) * s + b, counting its calls."""

  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))
    self.b = nnx.Param(jnp.array(0.5))
    self.s = nnx.BatchStat(jnp.array(3.0))
    self.calls = Count(jnp.array(0))

  def __call__(self, x):
    self.calls[...] += 1
    return jnp.sum(self.w[...] * x) * self.s[...] + self.b[...]


class Floats(nnx.Module):
  """Only floating-point state: differentiable whole under jax.grad's rules."""

  def __init__(self):
    self.w = nnx.Param(jnp.array([1.0, 2.0]))
    self.s = nnx.BatchStat(jnp.array(3.0))
    self.label = 'floats'

  def __call__(self, x):
    return jnp.sum(self.w[...] * x) * self.s[...]


X = jnp.array([0.5, -1.5])


def pure_loss(w, b, s, x=X):
  return (jnp.sum(w * x) * s + b) ** 2


def assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# -- grad, graph mode with graph updates ----------------------------------------------------
def test_grad_of_module_is_state_of_params_and_updates_propagate():
  m = Model()
  grads = nnx.grad(lambda m, x: m(x) ** 2)(m, X)
  assert isinstance(grads, nnx.State)
  assert set(grads) == {'w', 'b'}                  # BatchStat and Count are not differentiated
  assert isinstance(grads['w'], nnx.Param)
  gw, gb = jax.grad(pure_loss, argnums=(0, 1))(m.w[...], m.b[...], m.s[...])
  assert_close(grads['w'][...], gw)
  assert_close(grads['b'][...], gb)
  assert int(m.calls[...]) == 1                    # the forward pass's update reached `m`


def test_grad_paths_match_state_of_params():
  m = Model()
  grads = nnx.grad(lambda m: m(X))(m)
  assert [p for p, _ in grads.flat_state()] == [p for p, _ in nnx.state(m, nnx.Param).flat_state()]


def test_variables_of_state_arguments_are_differentiated_whole():
  m = Model()
  graphdef, stats, rest = nnx.split(m, nnx.BatchStat, ...)

  def loss(stats, rest):
    return nnx.merge(graphdef, stats, rest)(X) ** 2

  grads = nnx.grad(loss)(stats, rest)               # a State is a container, not a Module:
  assert isinstance(grads, nnx.State) and set(grads) == {'s'}   # its BatchStat counts too
  assert isinstance(grads['s'], nnx.BatchStat)
  assert_close(grads['s'][...], jax.grad(pure_loss, argnums=2)(m.w[...], m.b[...], m.s[...]))
  assert int(m.calls[...]) == 1                    # counted through the `rest` State


def test_variables_in_containers_get_variable_gradients_and_a_shared_one_an_empty_state():
  p1, p2 = nnx.Param(jnp.array(10.0)), nnx.BatchStat(jnp.array(20.0))
  tree = {'a': [p1, p2], 'b': p1}
  grads = nnx.grad(lambda t: t['a'][0][...] + t['a'][1][...] * 3 + t['b'][...])(tree)
  assert isinstance(grads['a'][0], nnx.Param) and isinstance(grads['a'][1], nnx.BatchStat)
  assert_close(grads['a'][0][...], 2.0)            # both uses of p1, at its first place
  assert_close(grads['a'][1][...], 3.0)            # a bare Variable: differentiated, any type
  assert grads['b'] == nnx.State({})               # the second reference holds nothing


def test_argnums_tuple_with_plain_array():
  m = Model()
  gm, gx = nnx.grad(lambda m, x: m(x) ** 2, argnums=(0, 1))(m, X)
  assert_close(gm['w'][...], jax.grad(pure_loss)(m.w[...], m.b[...], m.s[...]))
  assert_close(gx, jax.grad(pure_loss, argnums=3)(m.w[...], m.b[...], m.s[...], X))


def test_keywords_naming_positional_parameters_can_be_differentiated():
  m = Model()
  gm, gx = nnx.grad(lambda m, x: m(x) ** 2, argnums=(0, 1))(m, x=X)
  assert set(gm) == {'w', 'b'}
  assert_close(gx, jax.grad(pure_loss, argnums=3)(m.w[...], m.b[...], m.s[...], X))


def test_grad_of_plain_arguments_matches_jax():
  f = lambda x, y: jnp.sum(jnp.sin(x) * y)  # noqa: E731
  x, y = jnp.array([0.1, 0.2]), jnp.array([3.0, 4.0])
  got = nnx.grad(f, argnums=(0, 1))(x, y)
  want = jax.grad(f, argnums=(0, 1))(x, y)
  assert_close(got[0], want[0])
  assert_close(got[1], want[1])
  assert_close(nnx.grad(lambda d: d['a'] @ d['a'])({'a': x})['a'], 2 * x)


def test_has_aux_and_value_and_grad_layouts():
  m = Model()
  fn = lambda m: (m(X) ** 2, {'y': m(X)})  # noqa: E731
  grads, aux = nnx.grad(fn, has_aux=True)(m)
  (value, aux2), grads2 = nnx.value_and_grad(fn, has_aux=True)(m)
  value3, grads3 = nnx.value_and_grad(lambda m: m(X) ** 2)(m)
  want = pure_loss(m.w[...], m.b[...], m.s[...])
  assert_close(value, want)
  assert_close(value3, want)
  assert_close(aux['y'] ** 2, want)
  assert_close(grads['w'][...], grads2['w'][...])
  assert_close(grads3['b'][...], grads['b'][...])
  assert int(m.calls[...]) == 5


def test_has_aux_requires_a_pair():
  with pytest.raises(TypeError, match='pair'):
    nnx.grad(lambda x: x ** 2, has_aux=True)(1.0)


def test_diffstate_selects_other_variables():
  m = Model()
  grads = nnx.grad(lambda m: m(X) ** 2, argnums=nnx.DiffState(0, nnx.BatchStat))(m)
  assert set(grads) == {'s'} and isinstance(grads['s'], nnx.BatchStat)
  assert_close(grads['s'][...], jax.grad(pure_loss, argnums=2)(m.w[...], m.b[...], m.s[...]))


def test_diffstate_filter_sees_paths_from_the_module_inside_a_container():
  a, b = Model(), Model()
  wrt = (nnx.DiffState(0, nnx.PathContains('w')), nnx.DiffState(1, nnx.PathContains('b')))
  ga, gb = nnx.grad(lambda la, lb: la[0](X) + lb[0](X), argnums=wrt)([a], [b])
  assert set(ga[0]) == {'w'} and set(gb[0]) == {'b'}
  assert_close(ga[0]['w'][...], X * 3.0)
  assert_close(gb[0]['b'][...], 1.0)


def test_integer_variables_need_allow_int():
  m = Model()
  with pytest.raises(TypeError, match='allow_int'):
    nnx.grad(lambda m: m(X), argnums=nnx.DiffState(0, ...))(m)
  assert int(m.calls[...]) == 0                    # failed call: nothing written
  grads = nnx.grad(lambda m: m(X), argnums=nnx.DiffState(0, ...), allow_int=True)(m)
  assert grads['calls'][...].dtype == jax.dtypes.float0
  assert int(m.calls[...]) == 1


def test_argnums_errors():
  with pytest.raises(ValueError, match='argnum 0 is repeated'):
    nnx.grad(lambda x: x, argnums=(0, 0))(1.0)
  with pytest.raises(TypeError, match='argnums=3'):
    nnx.grad(lambda x: x, argnums=3)(1.0)
  with pytest.raises(TypeError, match='scalar'):
    nnx.grad(lambda x: x * 2)(jnp.ones(2))


def test_argnums_prefix_errors_name_the_fix():
  with pytest.raises(ValueError, match='Graph nodes are not allowed as prefixes'):
    nnx.grad(lambda x: x, argnums=nnx.Dict(a=nnx.Param(1.0)))
  with pytest.raises(ValueError, match='Variables are not prefixes'):
    nnx.grad(lambda x: x, argnums=(nnx.Param(1.0),))
  for flags in (dict(graph=False), dict(graph=True, graph_updates=False)):
    with pytest.raises(ValueError, match='cannot contain `DiffState` objects') as info:
      nnx.grad(lambda m: m, argnums=nnx.DiffState(0, nnx.Param), **flags)
    assert 'graph_updates=True' in str(info.value)


def test_container_arguments_mirror_their_structure():
  a, b = Model(), Model()
  g = nnx.grad(lambda t: t[0](X) + 2 * t[1](X))((a, b))
  assert isinstance(g, tuple) and len(g) == 2
  assert_close(g[0]['w'][...], X * 3.0)
  assert_close(g[1]['w'][...], 2 * X * 3.0)
  d = nnx.grad(lambda d: d['m'](d['x']))({'m': a, 'x': X})
  assert_close(d['x'], a.w[...] * 3.0)             # loose arrays in containers are differentiated
  assert set(d['m']) == {'w', 'b'}
  assert int(a.calls[...]) == 2 and int(b.calls[...]) == 1


def test_keyword_only_arguments_propagate_but_are_not_differentiated():
  m, other = Model(), Model()
  g = nnx.grad(lambda m, *, aux_model: m(X) + aux_model(X))(m, aux_model=other)
  assert set(g) == {'w', 'b'}
  assert int(other.calls[...]) == 1


def test_holomorphic():
  z = jnp.array(1.0 + 2.0j)
  assert_close(nnx.grad(lambda z: z ** 2, holomorphic=True)(z), 2 * z)


def test_params_updated_inside_keep_their_update():
  m = Model()

  def loss(m):
    m.w[...] = m.w[...] * 0 + 10.0
    return jnp.sum(m.w[...])

  g = nnx.grad(loss)(m)
  assert_close(g['w'][...], jnp.zeros(2))          # w was overwritten by a constant
  assert_close(m.w[...], jnp.array([10.0, 10.0]))


def test_structural_changes_in_the_loss_reach_the_model_with_graph_updates():
  def loss(m):
    m.cache = nnx.BatchStat(m.w[...] * 2)          # a new Variable
    m.label = 'seen'                               # a new static attribute
    return jnp.sum(m.w[...] ** 2)

  m = Floats()
  grads = nnx.grad(loss)(m)
  assert isinstance(grads, nnx.State)
  assert m.label == 'seen' and isinstance(m.cache, nnx.BatchStat)
  assert_close(m.cache[...], [2.0, 4.0])
  (_, aux), _ = nnx.value_and_grad(lambda m: (loss(m), m), has_aux=True)(m)
  assert aux is m                                  # an output that is an input is the caller's

  m = Floats()
  nnx.grad(loss, graph_updates=False)(m)
  assert m.label == 'floats' and not hasattr(m, 'cache')   # only values come out


# -- grad, tree rules (tree mode or graph_updates=False) ------------------------------------
@pytest.mark.parametrize('flags', TREE_RULES)
def test_tree_rules_give_a_gradient_shaped_like_the_argument(flags):
  m = Floats()
  grads = nnx.grad(lambda m: m(X) ** 2, **flags)(m)
  assert type(grads) is Floats and grads is not m
  assert grads.label == 'floats'                   # static attributes come along
  assert isinstance(grads.w, nnx.Param) and isinstance(grads.s, nnx.BatchStat)
  gw, gs = jax.grad(pure_loss, argnums=(0, 2))(m.w[...], 0.0, m.s[...])
  assert_close(grads.w[...], gw)
  assert_close(grads.s[...], gs)                   # every array is differentiated, not only Params
  nnx.update(m, nnx.state(grads))                  # and it updates the model like a State would
  assert_close(m.w[...], gw)


@pytest.mark.parametrize('flags', TREE_RULES)
def test_tree_rules_need_allow_int_for_integer_variables(flags):
  m = Model()
  with pytest.raises(TypeError, match='allow_int'):
    nnx.grad(lambda m: m(X), **flags)(m)
  assert int(m.calls[...]) == 0
  grads = nnx.grad(lambda m: m(X), allow_int=True, **flags)(m)
  assert grads.calls[...].dtype == jax.dtypes.float0
  assert int(m.calls[...]) == 1


@pytest.mark.parametrize('flags', TREE_RULES)
def test_tree_rules_refuse_aux_holding_an_input_variable(flags):
  m = Floats()
  with pytest.raises(ValueError, match='Duplicate Param') as info:
    nnx.grad(lambda m: (m(X), m.w), has_aux=True, **flags)(m)
  assert '.args[0].w' in str(info.value) and '.out' in str(info.value)


def test_graph_mode_without_updates_keeps_shared_variables_shared_in_the_gradient():
  p = nnx.Param(jnp.array(2.0))
  d = nnx.Dict(a=p, b=p)
  grads = nnx.grad(lambda d: d['a'][...] * d['b'][...] + d['b'][...], graph_updates=False)(d)
  assert type(grads) is nnx.Dict and grads['a'] is grads['b']
  assert_close(grads['a'][...], 2 * 2.0 + 1)       # accumulated over both references


def test_shared_variables_tree_mode_errors_graph_mode_works():
  p = nnx.Param(jnp.array(2.0))
  foo = nnx.Dict(a=p, b=p)
  with pytest.raises(ValueError) as info:
    nnx.grad(lambda f: f['a'] * f['b'], graph=False)(foo)
  assert '.a' in str(info.value) and '.b' in str(info.value)
  g = nnx.grad(lambda f: f['a'][...] * f['b'][...] + f['b'][...])(foo)
  (path, leaf), = g.flat_state()
  assert_close(leaf[...], 2 * 2.0 + 1)             # d/dp (p*p + p), accumulated over both paths


@pytest.mark.parametrize('flags', [dict(), dict(graph_updates=False)])
def test_a_variable_both_differentiated_and_not_is_inconsistent_aliasing(flags):
  v = nnx.Param(jnp.array(1.0))
  with pytest.raises(ValueError, match='Inconsistent aliasing') as info:
    nnx.grad(lambda a, b: a[...] * b[...], argnums=0, **flags)(v, v)
  assert '.args[0]' in str(info.value) and '.args[1]' in str(info.value)
  ga, gb = nnx.grad(lambda a, b: a[...] * b[...], argnums=(0, 1), **flags)(v, v)
  assert_close(ga[...], 2.0)                        # consistent: d(v*v)/dv once


def test_a_module_both_differentiated_and_not_is_inconsistent_aliasing():
  m = Floats()
  with pytest.raises(ValueError, match='Inconsistent aliasing') as info:
    nnx.grad(lambda a, b: a(X) + b(X))(m, [m])
  assert '.args[0].' in str(info.value) and '.args[1][0].' in str(info.value)


# -- bound methods, methods ---------------------------------------------------------------
@pytest.mark.parametrize('transform', [nnx.grad, nnx.value_and_grad, nnx.remat, nnx.custom_vjp,
                                       nnx.checkify, nnx.vjp, nnx.jvp])
def test_bound_methods_are_refused(transform):
  m = Floats()
  with pytest.raises(ValueError, match='bound methods') as info:
    transform(m.__call__)
  assert 'Floats.__call__' in str(info.value)


def test_grad_as_a_method_decorator_receives_the_instance():
  class Regressor(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array(2.0))

    @nnx.grad
    def loss_grad(self, x):
      return (self.w[...] * x) ** 2

  r = Regressor()
  assert_close(r.loss_grad(3.0)['w'][...], 2 * 2.0 * 9.0)


# -- failures -----------------------------------------------------------------------------
def _fails(m):
  m.calls[...] += 7
  m.w[...] = m.w[...] + 1
  m.extra = nnx.Param(jnp.ones(1))
  del m.b
  raise RuntimeError('boom')


FAILING_CALLS = {
    'grad': lambda m: nnx.grad(_fails)(m),
    'value_and_grad-tree-rules': lambda m: nnx.value_and_grad(_fails, graph_updates=False,
                                                              allow_int=True)(m),
    'vjp': lambda m: nnx.vjp(_fails, m),
    'jvp': lambda m: nnx.jvp(_fails, (m,), (m,)),
    'custom_vjp': lambda m: nnx.custom_vjp(_fails)(m),
    'remat': lambda m: nnx.remat(_fails)(m),
    'grad-of-remat': lambda m: nnx.grad(nnx.remat(_fails))(m),
}


@pytest.mark.parametrize('call', FAILING_CALLS.values(), ids=FAILING_CALLS.keys())
def test_a_call_that_raises_changes_nothing(call):
  m = Model()
  before, w_before = nnx.graphdef(m), m.w[...]
  with pytest.raises(RuntimeError, match='boom'):
    call(m)
  assert nnx.graphdef(m) == before and hasattr(m, 'b') and not hasattr(m, 'extra')
  assert int(m.calls[...]) == 0
  assert_close(m.w[...], w_before)


def test_nested_in_jit_train_step_traces_once():
  m = Model()
  traces = []

  @nnx.jit
  def step(m, x):
    traces.append(1)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, rest):
      return nnx.merge(graphdef, params, rest)(x) ** 2

    grads = nnx.grad(loss)(params, rest)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))

  w, b, s = m.w[...], m.b[...], m.s[...]
  for _ in range(2):
    step(m, X)
    gw, gb = jax.grad(pure_loss, argnums=(0, 1))(w, b, s)
    w, b = w - 0.1 * gw, b - 0.1 * gb
  assert len(traces) == 1
  assert int(m.calls[...]) == 2
  assert_close(m.w[...], w)
  assert_close(m.b[...], b)
  step(m, jnp.ones((1, 2)))                         # a new input shape retraces
  assert len(traces) == 2


def test_second_order_gradients_and_counts():
  class Cube(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array(2.0))
      self.calls = Count(jnp.array(0))

    def __call__(self):
      self.calls[...] += 1
      return self.w[...] ** 3

  m = Cube()
  g2 = nnx.grad(lambda m: nnx.grad(lambda m: m())(m)['w'][...])(m)
  assert_close(g2['w'][...], 6 * 2.0)              # d2/dw2 w^3 = 6w
  assert int(m.calls[...]) == 1


# -- vjp / jvp ----------------------------------------------------------------------------
def test_vjp_cotangents_and_state():
  m = Model()
  out, vjp_fn = nnx.vjp(lambda m, x: m(x) * jnp.array([1.0, 2.0]), m, X)
  ct = jnp.array([1.0, -1.0])
  g_m, g_x = vjp_fn(ct)
  pure = lambda w, b, s, x: (jnp.sum(w * x) * s + b) * jnp.array([1.0, 2.0])  # noqa: E731
  want_out, want_fn = jax.vjp(pure, m.w[...], m.b[...], m.s[...], X)
  gw, gb, gs, gx = want_fn(ct)
  assert_close(out, want_out)
  assert_close(g_m['w'][...], gw)
  assert_close(g_m['s'][...], gs)                  # every floating Variable gets a cotangent
  assert 'calls' not in g_m
  assert_close(g_x, gx)
  assert int(m.calls[...]) == 1


@pytest.mark.parametrize('flags', TREE_RULES)
def test_vjp_tree_rules_give_cotangents_shaped_like_the_primals(flags):
  m = Model()
  out, vjp_fn = nnx.vjp(lambda m, x: m(x), m, X, **flags)
  g_m, g_x = vjp_fn(jnp.array(1.0))
  assert type(g_m) is Model
  assert_close(g_m.w[...], X * 3.0)
  assert g_m.calls[...].dtype == jax.dtypes.float0  # an integer primal: a float0 cotangent
  assert_close(g_x, m.w[...] * 3.0)
  assert int(m.calls[...]) == 1


def test_vjp_and_jvp_carry_structural_updates_with_graph_updates():
  def grow(m, x):
    m.seen = nnx.BatchStat(jnp.sum(x))
    return m(x)

  m = Floats()
  nnx.vjp(grow, m, X)
  assert float(m.seen[...]) == float(jnp.sum(X))
  m = Floats()
  nnx.jvp(grow, (m, X), (m, X))
  assert hasattr(m, 'seen')
  m = Floats()
  nnx.vjp(grow, m, X, graph_updates=False)
  assert not hasattr(m, 'seen')


def test_vjp_has_aux():
  out, vjp_fn, aux = nnx.vjp(lambda x: (jnp.sin(x), x * 2), jnp.array(0.3), has_aux=True)
  assert_close(aux, 0.6)
  assert_close(vjp_fn(1.0)[0], jnp.cos(0.3))


def test_jvp_with_state_tangent():
  m = Model()
  t_state = nnx.State({'w': nnx.Param(jnp.array([1.0, 0.0]))})   # b and s get zero tangent
  out, t_out = nnx.jvp(lambda m, x: m(x), (m, X), (t_state, jnp.ones(2)))
  pure = lambda w, x: jnp.sum(w * x) * 3.0 + 0.5  # noqa: E731
  want_out, want_t = jax.jvp(pure, (m.w[...], X), (jnp.array([1.0, 0.0]), jnp.ones(2)))
  assert_close(out, want_out)
  assert_close(t_out, want_t)
  assert int(m.calls[...]) == 1


@pytest.mark.parametrize('flags', TREE_RULES)
def test_jvp_with_a_module_shaped_tangent(flags):
  m = Floats()
  tangent = jax.tree.map(jnp.ones_like, m)
  out, t_out = nnx.jvp(lambda m, x: m(x), (m, X), (tangent, jnp.zeros(2)), **flags)
  assert_close(out, jnp.sum(m.w[...] * X) * 3.0)
  assert_close(t_out, jnp.sum(X) * 3.0 + jnp.sum(m.w[...] * X))   # d/dw . 1 + d/ds . 1


def test_jvp_has_aux_and_plain():
  out, t, aux = nnx.jvp(lambda x: (x ** 3, 'tag'), (jnp.array(2.0),), (jnp.array(1.0),),
                        has_aux=True)
  assert_close(out, 8.0)
  assert_close(t, 12.0)
  assert aux == 'tag'
  with pytest.raises(TypeError, match='tangent'):
    nnx.jvp(lambda x: x, (1.0,), ())
  cube = nnx.jvp(lambda x: x ** 3)                  # partial forms, like NNX
  assert_close(cube((jnp.array(1.0),), (jnp.array(1.0),))[1], 3.0)
  out, vjp_fn = nnx.vjp(lambda x: x ** 3)(jnp.array(2.0))
  assert_close(vjp_fn(1.0)[0], 12.0)


# -- custom_vjp ---------------------------------------------------------------------------
@dataclasses.dataclass
class Pair(nnx.Module):
  x: nnx.Param
  y: nnx.Param
  steps: int = 0


def sin_x_times_y(m):
  return jnp.sin(m.x[...]) * m.y[...]


def test_custom_vjp_graph_updates_bwd_gets_state_cotangents_and_returns_states():
  seen = {}

  @nnx.custom_vjp
  def f(m, scale):
    m.steps += 1                                    # a structural change: it comes out
    return sin_x_times_y(m) * scale

  def fwd(m, scale):
    return f(m, scale), (jnp.cos(m.x[...]), m, scale)

  def bwd(res, g):
    inputs_g, out_g = g
    cos_x, m, scale = res
    seen['inputs_g'] = inputs_g
    m_g = nnx.State({'x': cos_x * m.y[...] * out_g * scale * 100.0})   # y left out: zero
    return m_g, jnp.sin(m.x[...]) * m.y[...] * out_g

  f.defvjp(fwd, bwd)
  m = Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0)))
  assert_close(f(m, 1.0), jnp.sin(1.0) * 2.0)
  assert m.steps == 1
  g_m, g_scale = nnx.grad(f, argnums=(0, 1))(m, jnp.array(1.5))
  assert isinstance(g_m, nnx.State)
  assert_close(g_m['x'][...], jnp.cos(1.0) * 2.0 * 1.5 * 100.0)
  assert_close(g_m['y'][...], 0.0)
  assert_close(g_scale, jnp.sin(1.0) * 2.0)
  m_g, scale_g = seen['inputs_g']                   # the cotangent of each argument's state
  assert isinstance(m_g, nnx.State) and set(m_g) == {'x', 'y'} and scale_g is None
  assert m.steps == 2


def test_custom_vjp_cotangents_of_state_used_after_the_call_go_through_bwd():
  @nnx.custom_vjp
  def touch(m):
    return sin_x_times_y(m)

  def fwd(m):
    return touch(m), None

  def bwd(res, g):
    (m_g,), out_g = g
    return (nnx.State({'x': m_g['x'][...] + out_g, 'y': m_g['y'][...]}),)

  touch.defvjp(fwd, bwd)
  m = Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0)))
  g = nnx.grad(lambda m: touch(m) + 10.0 * m.x[...] * m.y[...])(m)
  assert_close(g['x'][...], 1.0 + 20.0)             # out_g plus the later use, via inputs_g
  assert_close(g['y'][...], 10.0)


def test_custom_vjp_diffstate_differentiates_part_of_a_module():
  @nnx.custom_vjp(nondiff_argnums=(nnx.DiffState(0, nnx.PathContains('x')),))
  def f(m):
    return sin_x_times_y(m)

  def fwd(m):
    return f(m), m

  def bwd(m, g):
    (m_g,), out_g = g
    return (nnx.State({'x': jnp.cos(m.x[...]) * m.y[...] * out_g}),)

  f.defvjp(fwd, bwd)
  m = Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0)))
  g = nnx.grad(f, argnums=nnx.DiffState(0, nnx.PathContains('x')))(m)
  assert set(g) == {'x'}
  assert_close(g['x'][...], jnp.cos(1.0) * 2.0)


def test_custom_vjp_nondiff_argnums_go_to_bwd_first():
  seen = []

  @nnx.custom_vjp(nondiff_argnums=(0,))
  def scaled(fn, x):
    return fn(x)

  def fwd(fn, x):
    return fn(x), x

  def bwd(fn, x, g):
    seen.append(fn)
    inputs_g, out_g = g
    assert inputs_g == (None,)                      # an array argument: no state cotangent
    return (out_g * 7.0,)

  scaled.defvjp(fwd, bwd)
  assert_close(jax.grad(lambda x: scaled(jnp.sin, x))(1.0), 7.0)
  assert seen == [jnp.sin]


def test_custom_vjp_argument_errors():
  with pytest.raises(TypeError, match='graph node'):
    f = nnx.custom_vjp(lambda m: sin_x_times_y(m), nondiff_argnums=(0,))
    f(Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0))))
  with pytest.raises(ValueError, match='`nondiff_argnums` cannot contain `DiffState` objects'):
    nnx.custom_vjp(lambda m: m, nondiff_argnums=(nnx.DiffState(0, ...),), graph=False)


def test_custom_vjp_bwd_arity_error():
  @nnx.custom_vjp(graph_updates=False)
  def f(x, y):
    return x * y

  f.defvjp(lambda x, y: (x * y, None), lambda res, g: (g,))
  with pytest.raises(TypeError, match='one cotangent per'):
    jax.grad(f)(1.0, 2.0)


@pytest.mark.parametrize('flags', TREE_RULES)
def test_custom_vjp_tree_rules_module_shaped_cotangents_and_updates_g(flags):
  seen = {}

  @nnx.custom_vjp(**flags)
  def f(m):
    m.x[...] += 1.0                                 # a value update: it comes out
    m.steps += 1                                    # a static change: it does not
    return m.x[...] * m.y[...]

  def fwd(m):
    return f(m), (m,)

  def bwd(res, g, updates_g):
    (m,) = res
    seen['updates_g'] = updates_g
    m_g = nnx.clone(m)                               # shaped like the argument
    m_g.x[...] = g * m.y[...]
    m_g.y[...] = g * m.x[...]
    return (m_g,)

  f.defvjp(fwd, bwd)
  m = Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0)))
  grads = nnx.grad(f, **flags)(m)
  assert type(grads) is Pair
  assert_close(grads.x[...], 2.0)
  assert_close(grads.y[...], 2.0)                   # the updated x (1 + 1)
  (m_up,) = seen['updates_g']
  assert isinstance(m_up.x, nnx.Param) and m_up.y is None   # only the updated Variable
  assert_close(m.x[...], 2.0) and m.steps == 0


@pytest.mark.parametrize('flags', TREE_RULES)
def test_custom_vjp_tree_rules_take_a_module_as_a_nondiff_argument(flags):
  seen = []

  @nnx.custom_vjp(nondiff_argnums=(1,), **flags)
  def f(m, stats):
    stats.s[...] += 1.0                             # updates of a nondiff argument come out
    return sin_x_times_y(m)

  def fwd(m, stats):
    return f(m, stats), m

  def bwd(stats, m, g):
    seen.append(type(stats))
    m_g = nnx.clone(m)
    m_g.x[...] = jnp.cos(m.x[...]) * m.y[...] * g
    m_g.y[...] = jnp.sin(m.x[...]) * g
    return (m_g,)

  f.defvjp(fwd, bwd)
  m, stats = Pair(nnx.Param(jnp.array(1.0)), nnx.Param(jnp.array(2.0))), Floats()
  grads = nnx.grad(f, **flags)(m, stats)
  assert_close(grads.x[...], jnp.cos(1.0) * 2.0)
  assert_close(grads.y[...], jnp.sin(1.0))
  assert seen == [Floats] and float(stats.s[...]) == 4.0


def test_custom_vjp_without_graph_updates_refuses_a_variable_passed_twice():
  v = nnx.Param(jnp.array(1.0))

  @nnx.custom_vjp(nondiff_argnums=(1,), graph_updates=False)
  def f(a, b):
    return a[...] + b[...]

  f.defvjp(lambda a, b: (f(a, b), ()), lambda b, res, g: (nnx.clone(b),))
  with pytest.raises(ValueError, match='Duplicate Param') as info:
    f(v, v)
  assert '.args[0]' in str(info.value) and '.args[1]' in str(info.value)


def test_custom_vjp_with_python_scalars():
  @nnx.custom_vjp(graph_updates=False)
  def mul(x, y):
    return x * y

  mul.defvjp(lambda x, y: (x * y, (x, y)), lambda res, g: (res[1] * g * 10.0, res[0] * g))
  assert_close(jax.grad(mul)(1.0, 2.0), 20.0)     # eager, with Python floats as primals
  assert_close(mul(3.0, 2.0), 6.0)


# -- remat --------------------------------------------------------------------------------
def test_remat_values_gradients_and_state():
  m = Model()
  block = nnx.remat(lambda m, x: jnp.sin(m(x)))
  y = block(m, X)
  assert_close(y, jnp.sin(m.w[...] @ X * 3.0 + 0.5))
  g = nnx.grad(lambda m: block(m, X))(m)
  assert_close(g['w'][...], jnp.cos(m.w[...] @ X * 3.0 + 0.5) * X * 3.0)
  assert int(m.calls[...]) == 2
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: nnx.remat(jnp.sin)(x)))(1.0)
  assert 'remat' in str(jaxpr)


def test_remat_static_argnums_and_policy_and_method():
  class Block(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array(2.0))
      self.calls = Count(jnp.array(0))

    @nnx.remat
    def __call__(self, x):
      self.calls[...] += 1
      return self.w * x

  power = nnx.remat(lambda x, n: x ** n, static_argnums=1,
                    policy=jax.checkpoint_policies.nothing_saveable)
  assert_close(jax.grad(power)(3.0, 2), 6.0)
  assert_close(jax.grad(power)(3.0, 3), 27.0)      # another static value: another trace
  blk = Block()
  assert_close(nnx.grad(lambda b: b(3.0))(blk)['w'][...], 3.0)
  assert int(blk.calls[...]) == 1


@pytest.mark.parametrize('flags', ALL_MODES)
def test_remat_reuses_its_trace_for_the_same_structure(flags):
  traces = []

  def forward(m, x):
    traces.append(1)
    return m(x)

  block = nnx.remat(forward, **flags)
  m = Floats()
  for _ in range(3):
    block(m, X)
  assert len(traces) == 1
  block(m, jnp.ones((3, 2)))                       # a new shape traces again
  assert len(traces) == 2


def test_remat_structural_changes_follow_graph_updates():
  def grow(m):
    m.cache = nnx.BatchStat(m.w[...] + 1)
    return m.w[...]

  m = Floats()
  nnx.remat(grow)(m)
  assert_close(m.cache[...], [2.0, 3.0])
  m = Floats()
  nnx.remat(grow, graph_updates=False)(m)
  assert not hasattr(m, 'cache')


@pytest.mark.parametrize('flags', TREE_RULES)
def test_remat_under_tree_rules_grad(flags):
  m = Floats()
  grads = nnx.grad(lambda m: nnx.remat(lambda m: m(X), **flags)(m), **flags)(m)
  assert type(grads) is Floats
  assert_close(grads.w[...], X * 3.0)


def test_remat_inside_scan_over_stacked_layers():
  layers = nnx.vmap(lambda key: nnx.Linear(2, 2, rngs=nnx.Rngs(key)))(jax.random.split(
      jax.random.key(0), 3))

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  @nnx.remat
  def forward(layer, x):
    return jnp.tanh(layer(x))

  x = jnp.ones((1, 2))
  y = forward(layers, x)
  want = x
  for i in range(3):
    want = jnp.tanh(want @ layers.kernel[...][i] + layers.bias[...][i])
  assert_close(y, want)
  grads = nnx.grad(lambda layers: jnp.sum(forward(layers, x)))(layers)
  assert grads['kernel'][...].shape == (3, 2, 2)


def test_grad_and_remat_called_outside_jit_compile_nothing_on_a_repeat(compilations):
  model, x = Model(), jnp.array([1.0, 1.0])
  grad = nnx.grad(lambda m, x: m(x))
  remat = nnx.remat(lambda m, x: m(x))
  grad(model, x), remat(model, x)  # first calls compile
  with compilations() as compiled:
    for _ in range(3):
      grads = grad(model, x)
      remat(model, x)
  assert compiled == []
  assert int(model.calls[...]) == 8
  np.testing.assert_allclose(grads['w'][...], [3.0, 3.0])
