"""Hijax Variables: updates carried by plain JAX transforms, conversion for jax.grad."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx
from arbax.hijax import HijaxGradError
from arbax.errors import ImmutableVariableError


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
def test_grad_through_a_mutable_hijax_variable_points_to_with_vars():
  p = hv([1.0, 2.0], nnx.Param)
  with pytest.raises(NotImplementedError, match=r'with_vars\(params, mutable=False\)') as info:
    jax.grad(lambda p: jnp.sum(p[...] ** 2))(p)
  assert isinstance(info.value, HijaxGradError)


def test_immutable_copy_is_differentiated_and_closure_updates_still_land():
  p = hv([1.0, 2.0], nnx.Param)
  count = hv(0.0, nnx.BatchStat)

  def loss(p):
    count[...] += 1  # hijax state read and written inside grad
    return jnp.sum(p[...] ** 2)

  frozen = nnx.with_vars(p, mutable=False)
  assert isinstance(frozen, nnx.Param) and frozen.hijax and frozen.mutable is False
  g = jax.jit(jax.grad(loss))(frozen)
  np.testing.assert_allclose(g[...], [2.0, 4.0])
  assert float(count[...]) == 1.0
  back = nnx.with_vars(frozen, mutable=True)
  back[...] += 1
  np.testing.assert_allclose(back[...], [2.0, 3.0])
  np.testing.assert_allclose(p[...], [1.0, 2.0])  # conversions copy: the original is untouched


def test_with_vars_hijax_false_gives_plain_variables():
  p = hv([1.0, 2.0], nnx.Param)
  plain = nnx.with_vars(p, hijax=False)
  assert isinstance(plain, nnx.Param) and not plain.hijax
  g = jax.grad(lambda p: jnp.sum(p[...] ** 2))(plain)
  np.testing.assert_allclose(g[...], [2.0, 4.0])


# -- with_vars on structures ---------------------------------------------------------
class Pair(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones(2))
    self.n = nnx.BatchStat(jnp.array(0.0))


def test_with_vars_converts_only_what_differs_and_what_only_selects():
  m = nnx.with_vars(Pair(), hijax=True, ref=True)
  assert (m.w.hijax, m.w.ref, m.n.hijax, m.n.ref) == (True, True, True, True)
  m2 = nnx.with_vars(m, hijax=False, only=nnx.BatchStat)
  assert m2 is not m and m2.w is m.w  # untouched Variables are the same objects
  assert (m2.n.hijax, m2.n.ref) == (False, True)
  assert isinstance(m2.n.get_raw_value(), jax.Ref)
  m3 = nnx.with_vars(m2, hijax=True)
  assert m3.w is m.w and m3.n.hijax


def test_with_vars_on_a_state_filters_with_only():
  with nnx.var_defaults(hijax=True):
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  plain = nnx.with_vars(state, hijax=False, only=lambda path, v: path[-1] == 'bias')
  assert not plain['bias'].hijax and plain['kernel'].hijax
  assert plain['kernel'] is state['kernel']


def test_with_vars_refuses_to_split_a_shared_variable():
  m = Pair()
  m.alias = m.w
  with pytest.raises(ValueError, match=r'Found duplicate at paths \.alias and \.w.*allow_duplicates'):
    nnx.with_vars(m, hijax=True)
  out = nnx.with_vars(m, hijax=True, allow_duplicates=True)
  assert out.w.hijax and out.alias.hijax
  assert nnx.with_vars(m, hijax=True, only=nnx.BatchStat).n.hijax  # the shared one is not converted


def test_vars_as_is_the_deprecated_name():
  with pytest.warns(DeprecationWarning, match='with_vars'):
    v = nnx.vars_as(nnx.Variable(jnp.ones(1)), hijax=True)
  assert v.hijax


def test_writes_to_an_immutable_copy_are_refused():
  frozen = nnx.with_vars(hv(1.0), mutable=False)
  with pytest.raises(ImmutableVariableError, match='immutable'):
    frozen[...] = 2.0


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


# -- hijax Variables created inside a transform --------------------------------
def counter_and_params(x):
  """Creates hijax Variables from constants and from ``x``, updates them, returns their values."""
  with nnx.var_defaults(hijax=True):
    count = nnx.Variable(jnp.array(0, jnp.uint32))
  scale = nnx.Param(jnp.array(1.0), hijax=True)
  shifted = nnx.Param(x, hijax=True)
  count[...] += 1
  scale[...] = scale[...] * 2 + x  # made from a constant, written with a traced value
  shifted[...] += 1
  return count[...], scale[...], shifted[...]


@pytest.mark.parametrize('jit', [jax.jit, nnx.jit], ids=['jax.jit', 'nnx.jit'])
def test_variables_created_inside_jit_from_constants_and_traced_values(jit):
  count, scale, shifted = jit(counter_and_params)(jnp.array(3.0))
  assert int(count) == 1 and count.dtype == jnp.uint32
  assert float(scale) == 5.0 and float(shifted) == 4.0


@pytest.mark.parametrize('vmap', [
    jax.vmap, nnx.vmap, lambda f: jax.jit(jax.vmap(f)), lambda f: nnx.jit(nnx.vmap(f))],
    ids=['jax.vmap', 'nnx.vmap', 'jax.jit(jax.vmap)', 'nnx.jit(nnx.vmap)'])
def test_variables_created_inside_vmap_are_per_example(vmap):
  count, scale, shifted = vmap(counter_and_params)(jnp.arange(3.0))
  np.testing.assert_array_equal(count, [1, 1, 1])
  np.testing.assert_allclose(scale, [2.0, 3.0, 4.0])
  np.testing.assert_allclose(shifted, [1.0, 2.0, 3.0])


def test_nnx_transforms_return_hijax_variables_built_inside():
  def make(x):
    v = nnx.Param(jnp.array(1.0), hijax=True)
    v[...] += x
    return v

  v = nnx.jit(make)(2.0)
  assert v.hijax and float(v[...]) == 3.0
  v[...] += 1  # an ordinary hijax Variable from now on
  assert float(v[...]) == 4.0
  stacked = nnx.vmap(make)(jnp.arange(3.0))
  assert stacked.hijax
  np.testing.assert_allclose(stacked[...], [1.0, 2.0, 3.0])


def test_nnx_jit_builds_a_hijax_module_that_plain_jit_updates():
  @nnx.jit
  def make(key):
    with nnx.var_defaults(hijax=True):
      return nnx.Linear(2, 3, rngs=nnx.Rngs(key))

  model = make(jax.random.key(0))
  assert model.kernel.hijax and model.bias.hijax and model.kernel.shape == (2, 3)

  @jax.jit
  def shift(model):
    model.bias[...] += 1

  shift(model)
  np.testing.assert_allclose(model.bias[...], np.ones(3))


def test_plain_jit_cannot_return_a_hijax_variable_and_says_what_can():
  with pytest.raises(ValueError, match=r'cannot be returned from jax\.jit.*nnx\.jit'):
    jax.jit(lambda x: nnx.Param(x, hijax=True))(1.0)


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


def test_nnx_vmap_maps_hijax_variables_and_builds_them_inside():
  counts = nnx.BatchStat(jnp.zeros(3), hijax=True)

  @nnx.vmap(in_axes=(0, 0))
  def bump(c, x):
    c[...] += x

  bump(counts, jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(counts[...], [1.0, 2.0, 3.0])

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    with nnx.var_defaults(hijax=True):
      return nnx.Linear(2, 2, rngs=nnx.Rngs(key))

  stack = make(jax.random.split(jax.random.key(1), 3))
  assert stack.kernel.hijax and stack.kernel.shape == (3, 2, 2)


def test_nnx_scan_and_fori_loop_carry_hijax_variables():
  v = hv(1.0)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def acc(v, x):
    v[...] += x
    return v, v[...]

  out, seen = acc(v, jnp.arange(4.0))
  assert float(v[...]) == 7.0 and float(out[...]) == 7.0 and out.hijax
  np.testing.assert_allclose(seen, [1.0, 2.0, 4.0, 7.0])

  def double(i, v):
    v[...] *= 2
    return v

  out = nnx.fori_loop(0, 3, double, v)
  assert float(v[...]) == 56.0 and float(out[...]) == 56.0


# -- ref=True ------------------------------------------------------------------
def test_ref_variables_are_backed_by_jax_refs():
  r = nnx.Param(jnp.zeros(2), ref=True)
  assert r.ref and isinstance(r, nnx.Param)
  jax.jit(lambda r: r.__setitem__(..., r[...] + 1))(r)
  jax.jit(lambda: r.__setitem__(..., r[...] * 3))()
  np.testing.assert_allclose(r[...], [3.0, 3.0])
  with pytest.raises(TypeError, match='hijax=True'):
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
        nnx.with_vars(params, mutable=False))
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
