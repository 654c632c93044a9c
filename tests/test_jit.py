"""nnx.jit: state propagation, outputs, aliasing, transactions, caching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx


class Count(nnx.Variable):
  pass


class Linear(nnx.Module):
  def __init__(self, din, dout, *, rngs):
    self.din, self.dout = din, dout
    self.w = nnx.Param(rngs.uniform((din, dout)))
    self.count = Count(jnp.array(0))

  def __call__(self, x):
    self.count[...] += 1
    return x @ self.w


def make():
  return Linear(2, 3, rngs=nnx.Rngs(0))


def test_updates_reach_the_caller():
  model = make()

  @nnx.jit
  def forward(model, x):
    return model(x)

  y = forward(model, jnp.ones((4, 2)))
  np.testing.assert_allclose(y, jnp.ones((4, 2)) @ model.w[...], rtol=1e-6)
  forward(model, jnp.ones((4, 2)))
  assert int(model.count[...]) == 2


def test_variables_keep_their_identity():
  model = make()
  w, count = model.w, model.count

  @nnx.jit
  def step(model):
    model.w[...] = model.w * 2
    model(jnp.ones((1, 2)))

  before = np.asarray(w[...])
  step(model)
  assert model.w is w and model.count is count
  np.testing.assert_allclose(w[...], before * 2)
  assert int(count[...]) == 1


def test_decorating_methods_works_and_bound_methods_are_refused():
  model = make()
  with pytest.raises(ValueError, match=r'bound methods.*nnx\.jit\(Linear\.__call__\)'):
    nnx.jit(model.__call__)
  fwd = nnx.jit(Linear.__call__)
  fwd(model, jnp.ones((1, 2)))
  assert int(model.count[...]) == 1

  class Wrapper(nnx.Module):
    def __init__(self):
      self.inner = make()

    @nnx.jit
    def __call__(self, x):
      return self.inner(x)

  wrapper = Wrapper()
  wrapper(jnp.ones((1, 2)))
  wrapper(jnp.ones((1, 2)))
  assert int(wrapper.inner.count[...]) == 2


def test_objects_created_inside_come_back_as_objects():
  @nnx.jit
  def create(seed):
    return Linear(2, 3, rngs=nnx.Rngs(seed))

  model = create(0)
  assert type(model) is Linear and model.din == 2
  assert isinstance(model.w, nnx.Param) and model.w.shape == (2, 3)
  np.testing.assert_allclose(model.w[...], make().w[...])


def test_variable_argument_and_output():
  v = nnx.Param(jnp.array(1.0))

  @nnx.jit
  def double(v):
    v[...] = v * 2
    return v

  out = double(v)
  assert float(v[...]) == 2.0
  assert isinstance(out, nnx.Param) and float(out[...]) == 2.0


def test_containers_of_objects_and_keyword_arguments():
  a, b, c = make(), make(), make()

  @nnx.jit(graph=False)
  def both(models, x, *, extra):
    return models[0](x) + models[1](x) + extra(x)

  both([a, b], jnp.ones((1, 2)), extra=c)
  both([a, b], jnp.ones((1, 2)), extra=c)
  assert int(a.count[...]) == 2 and int(b.count[...]) == 2 and int(c.count[...]) == 2
  with pytest.raises(ValueError, match=r'\[1\]\.extra.*\[0\]\[0\]\[0\]'):
    both([a, b], jnp.ones((1, 2)), extra=a)   # the same model twice: an alias in tree mode
  assert int(a.count[...]) == 2


def test_tree_mode_alias_error_names_both_paths_and_changes_nothing():
  p = nnx.Param(jnp.array(1.0))

  @nnx.dataclass
  class Foo(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  model = Foo(p, p)

  @nnx.jit(graph=False)
  def forward(model):
    model.a[...] += 1.0

  with pytest.raises(ValueError, match=r'\[0\]\[0\]\.b.*\[0\]\[0\]\.a[\s\S]*Duplicate Param'):
    forward(model)
  assert float(p[...]) == 1.0


def test_graph_mode_keeps_sharing():
  p = nnx.Param(jnp.array(1.0))

  @nnx.dataclass
  class Foo(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  model = Foo(p, p)

  @nnx.jit(graph=True)
  def forward(model, x):
    model.a[...] += 1.0
    return model.a * x + model.b

  assert float(forward(model, jnp.array(1.0))) == 4.0
  assert model.a is model.b and float(model.b[...]) == 2.0


def test_set_graph_mode_context_manager_is_the_default():
  p = nnx.Param(jnp.array(1.0))
  pair = nnx.List([p, p])
  with nnx.graphlib.set_graph_mode(True):
    @nnx.jit
    def inc(pair):
      pair[0][...] += 1.0
  inc(pair)
  assert float(p[...]) == 2.0


def test_failure_while_tracing_leaves_state_untouched():
  model = make()
  w = np.asarray(model.w[...])

  @nnx.jit
  def broken(model):
    model.w[...] = model.w + 1
    model.count[...] += 1
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    broken(model)
  np.testing.assert_array_equal(model.w[...], w)
  assert int(model.count[...]) == 0


def test_failure_while_running_leaves_state_untouched():
  model = make()

  def fail(x):
    raise ValueError('runtime failure')

  @nnx.jit
  def broken(model):
    model.count[...] += 1
    jax.debug.callback(fail, model.count[...])
    return model.count[...]

  with pytest.raises(Exception, match='runtime failure'):
    jax.block_until_ready(broken(model))
  assert int(model.count[...]) == 0


def test_closure_write_to_outer_variable_raises():
  outer = nnx.Param(jnp.array(0.0))

  @nnx.jit
  def leak(x):
    outer[...] = x

  with pytest.raises(nnx.TraceContextError, match='nnx.clone'):
    leak(jnp.array(1.0))
  assert float(outer[...]) == 0.0


def test_retraces_only_when_structure_changes():
  traces = []

  @nnx.jit
  def forward(model, x):
    traces.append(1)
    return model(x)

  model = make()
  x = jnp.ones((1, 2))
  forward(model, x)
  forward(model, x)
  forward(make(), x)            # another object, same structure: cached executable
  assert len(traces) == 1
  forward(model, jnp.ones((5, 2)))  # new shape
  assert len(traces) == 2
  model.extra = nnx.BatchStat(jnp.zeros(()))   # new attribute: new structure
  forward(model, x)
  assert len(traces) == 3
  model.din = 7                 # static attribute changed
  forward(model, x)
  assert len(traces) == 4


def test_replacing_a_variable_after_a_call_is_seen():
  model = make()

  @nnx.jit
  def read(model):
    return model.w[...]

  read(model)
  model.w = nnx.Param(jnp.full((2, 3), 5.0))
  np.testing.assert_array_equal(read(model), jnp.full((2, 3), 5.0))
  model.w[...] = jnp.full((2, 3), 6.0)
  np.testing.assert_array_equal(read(model), jnp.full((2, 3), 6.0))


def test_list_mutation_invalidates_the_cached_plan():
  class Stack(nnx.Module):
    def __init__(self):
      self.items = nnx.List([nnx.Param(jnp.array(1.0))])

  stack = Stack()

  @nnx.jit
  def total(stack):
    return sum(v[...] for v in stack.items)

  assert float(total(stack)) == 1.0
  stack.items.append(nnx.Param(jnp.array(2.0)))
  assert float(total(stack)) == 3.0


def test_static_argnums_and_argnames():
  @nnx.jit(static_argnums=1, static_argnames='mode')
  def f(model, n, mode='add'):
    for _ in range(n):
      model.count[...] += 1 if mode == 'add' else -1
    return model.count[...]

  model = make()
  assert int(f(model, 3)) == 3
  assert int(f(model, 2, mode='sub')) == 1


def test_donated_model_stays_usable():
  model = make()

  @nnx.jit(donate_argnums=0)
  def step(model, x):
    model.w[...] = model.w * 2
    return model(x)

  w = np.asarray(model.w[...])
  step(model, jnp.ones((1, 2)))
  step(model, jnp.ones((1, 2)))
  np.testing.assert_allclose(model.w[...], w * 4)
  assert int(model.count[...]) == 2


def test_rngs_advance_through_jit():
  rngs = nnx.Rngs(0)

  @nnx.jit
  def draw(rngs):
    return rngs.normal((2,))

  a, b = draw(rngs), draw(rngs)
  assert not np.allclose(a, b)
  assert int(rngs.default.count[...]) == 2
  expected = jax.random.normal(jax.random.fold_in(jax.random.key(0), 1), (2,))
  np.testing.assert_allclose(b, expected)


def test_lower_compiles():
  model = make()
  f = nnx.jit(lambda m, x: m(x))
  lowered = f.lower(model, jnp.ones((1, 2)))
  assert 'dot' in lowered.as_text()
  assert int(model.count[...]) == 0


def test_static_arguments_reuse_the_cached_plan_until_they_change():
  traces = []

  @nnx.jit(static_argnames='n')
  def add(model, n):
    traces.append(n)
    model.count[...] += n

  model = make()
  add(model, n=2)
  plan = add._plan
  add(model, n=2)
  assert add._plan is plan and traces == [2]
  add(model, n=3)
  assert add._plan is not plan and traces == [2, 3]
  assert int(model.count[...]) == 7


def test_graph_mode_returns_the_callers_own_objects():
  model = make()

  @nnx.jit(graph=True)
  def touch(model):
    model.count[...] += 1
    return model, model.w, Linear(1, 1, rngs=nnx.Rngs(1))

  same, w, fresh = touch(model)
  assert same is model and w is model.w
  assert int(model.count[...]) == 1 and isinstance(fresh, Linear)
  same, _, _ = touch(model)      # the cached executable maps them back too
  assert same is model and int(model.count[...]) == 2


def test_returning_an_input_without_graph_updates_is_refused_naming_both_paths():
  model = make()
  for flags in (dict(graph=False), dict(graph=True, graph_updates=False)):
    with pytest.raises(ValueError, match=r'Duplicate \w+ found at paths[\s\S]*\.args\[0\]\.\w+[\s\S]*\.out\.\w+'):
      nnx.jit(lambda m: m, **flags)(model)
  assert nnx.jit(lambda m: m)(model) is model  # graph updates (the default): the caller's object
  fresh = nnx.jit(lambda m: nnx.clone(m), graph=False)(model)
  assert fresh is not model and type(fresh) is Linear
  np.testing.assert_array_equal(fresh.w[...], model.w[...])


def test_graph_mode_output_with_its_own_shared_variable():
  model = make()

  @nnx.dataclass
  class Pair(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  @nnx.jit(graph=True)
  def pair(model):
    p = nnx.Param(model.w[0, 0] * 2)
    return model, Pair(p, p)

  same, out = pair(model)
  assert same is model
  assert out.a is out.b and float(out.a[...]) == pytest.approx(2 * float(model.w[0, 0]))
  fresh = nnx.jit(lambda m: Pair(*(2 * [nnx.Param(m.w[0, 0])])), graph=True)(model)
  assert fresh.a is fresh.b   # refs among new objects only: numbered without the inputs


def test_tree_mode_traces_plain_numbers_held_next_to_variables_graph_mode_keeps_them_static():
  seen = {}
  tree = {'w': nnx.Param(jnp.array(2.0)), 'k': 3}

  def scale(name):
    def f(d):
      seen[name] = d['k']
      return d['w'][...] * d['k']
    return f

  assert float(nnx.jit(scale('tree'), graph=False)(tree)) == 6.0
  assert isinstance(seen['tree'], jax.core.Tracer)   # a leaf of the state, as JAX would see it
  assert float(nnx.jit(scale('graph'), graph=True)(tree)) == 6.0
  assert seen['graph'] == 3 and tree['k'] == 3
  with pytest.raises(TypeError, match=r"type <class 'str'>"):   # a str leaf is no array
    nnx.jit(lambda d: d['w'][...], graph=False)({'w': nnx.Param(jnp.array(1.0)), 's': 'x'})
