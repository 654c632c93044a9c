"""nnx.grad / value_and_grad / vjp / jvp / custom_vjp / remat: gradients and state propagation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx


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


X = jnp.array([0.5, -1.5])


def pure_loss(w, b, s, x=X):
  return (jnp.sum(w * x) * s + b) ** 2


def assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# -- grad ---------------------------------------------------------------------
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


def test_grad_of_state_arguments_from_split():
  m = Model()
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params, rest):
    return nnx.merge(graphdef, params, rest)(X) ** 2

  grads = nnx.grad(loss)(params, rest)
  assert isinstance(grads, nnx.State) and set(grads) == set(params)
  gw, gb = jax.grad(pure_loss, argnums=(0, 1))(m.w[...], m.b[...], m.s[...])
  assert_close(grads['w'][...], gw)
  assert_close(grads['b'][...], gb)
  assert int(m.calls[...]) == 1                    # counted through the `rest` State


def test_argnums_tuple_with_plain_array():
  m = Model()
  gm, gx = nnx.grad(lambda m, x: m(x) ** 2, argnums=(0, 1))(m, X)
  assert_close(gm['w'][...], jax.grad(pure_loss)(m.w[...], m.b[...], m.s[...]))
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


def test_diffstate_with_path_filter_and_tuple():
  m = Model()
  gm, gx = nnx.grad(lambda m, x: m(x), argnums=(nnx.DiffState(0, nnx.PathContains('w')), 1))(m, X)
  assert set(gm) == {'w'}
  assert_close(gm['w'][...], X * 3.0)
  assert_close(gx, m.w[...] * 3.0)


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


def test_keyword_arguments_propagate_but_are_not_differentiated():
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


def test_failure_leaves_state_untouched():
  m = Model()
  w_before = m.w[...]

  def bad(m):
    m.calls[...] += 7
    m.w[...] = m.w[...] + 1
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.value_and_grad(bad)(m)
  assert int(m.calls[...]) == 0
  assert_close(m.w[...], w_before)


@pytest.mark.parametrize('use_setting', [False, True])
def test_shared_variables_tree_mode_errors_graph_mode_works(use_setting):
  p = nnx.Param(jnp.array(2.0))
  foo = nnx.Dict(a=p, b=p)
  with pytest.raises(ValueError) as info:
    nnx.grad(lambda f: f['a'] * f['b'])(foo)
  assert '.a' in str(info.value) or "['a']" in str(info.value)
  assert '.b' in str(info.value) or "['b']" in str(info.value)
  fn = lambda f: f['a'][...] * f['b'][...] + f['b'][...]  # noqa: E731
  if use_setting:
    with nnx.graphlib.set_graph_mode(True):
      g = nnx.grad(fn)(foo)
  else:
    g = nnx.grad(fn, graph=True)(foo)
  (path, leaf), = g.flat_state()
  assert_close(leaf[...], 2 * 2.0 + 1)             # d/dp (p*p + p), accumulated over both paths


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


# -- vjp / jvp ----------------------------------------------------------------
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


# -- custom_vjp ---------------------------------------------------------------
def test_custom_vjp_uses_the_custom_backward_and_propagates_state():
  @nnx.custom_vjp
  def f(m, x):
    return m(x)

  def fwd(m, x):
    return f(m, x), (m, x)

  def bwd(res, g):
    m, x = res
    return nnx.State({'w': nnx.Param(100.0 * x * g)}), m.w[...] * g

  f.defvjp(fwd, bwd)
  m = Model()
  assert_close(f(m, X), m.w[...] @ X * 3.0 + 0.5)
  assert int(m.calls[...]) == 1
  g_m, g_x = nnx.grad(lambda m, x: f(m, x), argnums=(0, 1))(m, X)
  assert_close(g_m['w'][...], 100.0 * X)
  assert_close(g_m['b'][...], 0.0)                 # left out of bwd's State: zero
  assert_close(g_x, m.w[...])
  assert int(m.calls[...]) == 2


def test_custom_vjp_nondiff_argnums_go_to_bwd_first():
  seen = []

  @nnx.custom_vjp(nondiff_argnums=(0,))
  def scaled(fn, x):
    return fn(x)

  def fwd(fn, x):
    return fn(x), x

  def bwd(fn, x, g):
    seen.append(fn)
    return (g * 7.0,)

  scaled.defvjp(fwd, bwd)
  assert_close(jax.grad(lambda x: scaled(jnp.sin, x))(1.0), 7.0)
  assert seen == [jnp.sin]


def test_custom_vjp_bwd_arity_error():
  @nnx.custom_vjp
  def f(x, y):
    return x * y

  f.defvjp(lambda x, y: (x * y, None), lambda res, g: (g,))
  with pytest.raises(TypeError, match='one cotangent per'):
    jax.grad(f)(1.0, 2.0)


# -- remat --------------------------------------------------------------------
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
  blk = Block()
  assert_close(nnx.grad(lambda b: b(3.0))(blk)['w'][...], 3.0)
  assert int(blk.calls[...]) == 1


def test_custom_vjp_with_python_scalars():
  @nnx.custom_vjp
  def mul(x, y):
    return x * y

  mul.defvjp(lambda x, y: (x * y, (x, y)), lambda res, g: (res[1] * g * 10.0, res[0] * g))
  assert_close(jax.grad(mul)(1.0, 2.0), 20.0)     # eager, with Python floats as primals
  assert_close(mul(3.0, 2.0), 6.0)


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
