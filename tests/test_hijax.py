"""Hijax Variables: updates carried by plain JAX transforms, conversion for jax.grad."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx
from arbax.hijax import HijaxGradError


def hv(value, kind=nnx.Variable):
  return kind(jnp.asarray(value, jnp.float32), hijax=True)


# -- construction ---------------------------------------------------------------
def test_hijax_variable_keeps_its_kind_and_shows_the_flag():
  p = nnx.Param(jnp.ones(2), hijax=True)
  assert isinstance(p, nnx.Param) and isinstance(p, nnx.Variable)
  assert p.type is nnx.Param and type(p).__name__ == 'Param'
  assert p.hijax and 'hijax=True' in repr(p)
  assert not nnx.Param(jnp.ones(2)).hijax


def test_var_defaults_context_and_global():
  with nnx.var_defaults(hijax=True):
    assert nnx.Param(jnp.ones(1)).hijax
  assert not nnx.Param(jnp.ones(1)).hijax
  nnx.var_defaults(hijax=True)
  try:
    assert nnx.Param(jnp.ones(1)).hijax
  finally:
    nnx.var_defaults(hijax=False)
  assert not nnx.Param(jnp.ones(1)).hijax


def test_eager_reads_and_writes():
  v = hv([1.0, 2.0])
  v[...] += 1
  v.value = v.value * 2
  np.testing.assert_allclose(v[...], [4.0, 6.0])
  np.testing.assert_allclose(v + 1, [5.0, 7.0])
  assert v.shape == (2,)


# -- plain JAX transforms: by argument and by closure ---------------------------
def test_jit_argument_and_closure():
  v = hv(1.0)

  @jax.jit
  def inc(v):
    v[...] += 1

  inc(v)
  inc(v)
  assert float(v[...]) == 3.0

  w = hv(1.0)
  jax.jit(lambda x: w.__setitem__(..., w[...] * x))(5.0)
  assert float(w[...]) == 5.0


def test_vmap_argument_unmapped_and_closure():
  v = hv(0.0)
  jax.vmap(lambda v, x: v.__setitem__(..., v[...] + 1), in_axes=(None, 0))(v, jnp.arange(3.0))
  assert float(v[...]) == 1.0
  out = jax.vmap(lambda x: (v.__setitem__(..., v[...] + 10), x * v[...])[1])(jnp.arange(3.0))
  assert float(v[...]) == 11.0
  np.testing.assert_allclose(out, [0.0, 11.0, 22.0])


def test_vmap_batched_write_to_unmapped_variable_is_an_error():
  v = hv(0.0)
  with pytest.raises(ValueError, match='batched'):
    jax.vmap(lambda x: v.__setitem__(..., x))(jnp.arange(3.0))
  assert float(v[...]) == 0.0


def test_scan_and_fori_loop_closure():
  v = hv(0.0)

  def body(c, x):
    v[...] += x
    return c + 1, v[...]

  n, ys = jax.lax.scan(body, 0, jnp.arange(4.0))
  assert float(v[...]) == 6.0 and int(n) == 4
  np.testing.assert_allclose(ys, np.cumsum(np.arange(4.0)))
  jax.lax.fori_loop(0, 3, lambda i, c: (v.__setitem__(..., v[...] * 2), c)[1], 0)
  assert float(v[...]) == 48.0


def test_scan_under_jit_with_variable_argument():
  v = hv(1.0)

  @jax.jit
  def run(v, xs):
    def body(c, x):
      v[...] = v[...] * x
      return c, None
    jax.lax.scan(body, None, xs)

  run(v, jnp.array([2.0, 3.0]))
  assert float(v[...]) == 6.0


def test_scan_carry_gives_a_clear_error():
  v = hv(0.0)
  with pytest.raises(TypeError, match='closure'):
    jax.lax.scan(lambda c, x: (c.__setitem__(..., c[...] + x), (c, None))[1], v, jnp.ones(2))


def test_cond_argument_and_closure():
  v = hv(1.0)
  jax.lax.cond(True, lambda v: v.__setitem__(..., v[...] + 10), lambda v: None, v)
  assert float(v[...]) == 11.0
  jax.lax.cond(False, lambda: None, lambda: v.__setitem__(..., v[...] * 2))
  assert float(v[...]) == 22.0


def test_module_under_jit_updates_every_variable():
  with nnx.var_defaults(hijax=True):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  @jax.jit
  def shift(model):
    model.bias[...] += 1
    model.kernel[...] = model.kernel[...] * 0

  shift(model)
  np.testing.assert_allclose(model.bias[...], np.ones(3))
  np.testing.assert_allclose(model.kernel[...], np.zeros((2, 3)))


def test_rngs_advance_under_plain_jit():
  with nnx.var_defaults(hijax=True):
    rngs = nnx.Rngs(0)
  draw = jax.jit(lambda r: r.normal(()))
  a, b = draw(rngs), draw(rngs)
  assert int(rngs.default.count[...]) == 2 and float(a) != float(b)


# -- autodiff ------------------------------------------------------------------
def test_grad_through_hijax_variable_points_to_vars_as():
  p = hv([1.0, 2.0], nnx.Param)
  with pytest.raises(NotImplementedError, match='vars_as') as info:
    jax.grad(lambda p: jnp.sum(p[...] ** 2))(p)
  assert isinstance(info.value, HijaxGradError)


def test_vars_as_converts_for_grad_and_keeps_closure_updates():
  p = hv([1.0, 2.0], nnx.Param)
  count = hv(0.0, nnx.BatchStat)

  def loss(p):
    count[...] += 1  # hijax state read and written inside grad
    return jnp.sum(p[...] ** 2)

  plain = nnx.vars_as(p, hijax=False)
  assert isinstance(plain, nnx.Param) and not plain.hijax
  g = jax.jit(jax.grad(loss))(plain)
  np.testing.assert_allclose(g[...], [2.0, 4.0])
  assert float(count[...]) == 1.0
  back = nnx.with_vars(plain, hijax=True)
  assert back.hijax and float(back[...][0]) == 1.0


def test_with_vars_on_a_state_filters_with_only():
  with nnx.var_defaults(hijax=True):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  plain = nnx.with_vars(state, hijax=False, only=lambda path, v: path[-1] == 'bias')
  assert not plain['bias'].hijax and plain['kernel'].hijax
  assert plain['kernel'] is state['kernel']


# -- the State API keeps the flag ------------------------------------------------
def test_split_merge_state_update_clone_keep_hijax():
  with nnx.var_defaults(hijax=True):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  assert params['kernel'].hijax
  merged = nnx.merge(graphdef, params)
  assert merged.kernel.hijax and isinstance(merged.kernel, nnx.Param)
  nnx.update(model, nnx.State({'bias': nnx.Param(jnp.full(3, 2.0))}))
  np.testing.assert_allclose(model.bias[...], np.full(3, 2.0))
  clone = nnx.clone(model)
  clone.bias[...] += 1  # an independent Cell
  assert clone.bias.hijax
  np.testing.assert_allclose(model.bias[...], np.full(3, 2.0))
  doubled = jax.tree.map(lambda x: x * 2, nnx.state(model))
  assert doubled['bias'].hijax
  np.testing.assert_allclose(doubled['bias'][...], np.full(3, 4.0))


# -- NNX transforms ------------------------------------------------------------
def test_nnx_jit_with_hijax_argument_and_closure():
  v = hv([1.0, 1.0], nnx.Param)

  @nnx.jit
  def double(v):
    v[...] *= 2

  double(v)
  double(v)
  np.testing.assert_allclose(v[...], [4.0, 4.0])
  w = hv(0.0)
  nnx.jit(lambda x: w.__setitem__(..., w[...] + x))(3.0)
  assert float(w[...]) == 3.0


# -- ref=True ------------------------------------------------------------------
def test_ref_variables_are_backed_by_jax_refs():
  r = nnx.Param(jnp.zeros(2), ref=True)
  assert r.ref and isinstance(r, nnx.Param)
  jax.jit(lambda r: r.__setitem__(..., r[...] + 1))(r)
  jax.jit(lambda: r.__setitem__(..., r[...] * 3))()
  np.testing.assert_allclose(r[...], [3.0, 3.0])
  with pytest.raises(TypeError, match='arrays'):
    nnx.Variable({'a': 1}, ref=True)


# -- a training loop: plain jax.jit + hijax vs nnx.jit + plain Variables --------
class Model(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 1, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.array(0))

  def __call__(self, x):
    self.calls[...] += 1
    return self.linear(x)


def test_training_loop_plain_jit_matches_nnx_jit():
  x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
  y = jnp.array([[1.0], [0.0], [2.0]])
  loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731

  with nnx.var_defaults(hijax=True):
    hmodel = Model(nnx.Rngs(0))
    hopt = nnx.Optimizer(hmodel, optax.adam(0.1), wrt=nnx.Param)
  pmodel = Model(nnx.Rngs(0))
  popt = nnx.Optimizer(pmodel, optax.adam(0.1), wrt=nnx.Param)

  @jax.jit  # the guide's pattern: no nnx.state / nnx.update
  def hstep(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(
        nnx.vars_as(params, hijax=False))
    optimizer.update(model, grads)

  @nnx.jit
  def pstep(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(3):
    hstep(hmodel, hopt)
    pstep(pmodel, popt)
  assert int(hmodel.calls[...]) == 3 and int(pmodel.calls[...]) == 3
  assert int(hopt.step[...]) == 3
  np.testing.assert_allclose(hmodel.linear.kernel[...], pmodel.linear.kernel[...], rtol=1e-6)
  np.testing.assert_allclose(hmodel.linear.bias[...], pmodel.linear.bias[...], rtol=1e-6)
  assert not np.allclose(hmodel.linear.bias[...], 0.0)
