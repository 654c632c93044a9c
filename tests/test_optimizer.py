"""nnx.Optimizer, ModelAndOptimizer and TrainState, checked against plain optax loops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx
from arbax.errors import TraceContextError


class MLP(nnx.Module):
  def __init__(self, key, din=3, dmid=4, dout=2):
    k1, k2 = jax.random.split(key)
    self.w1 = nnx.Param(jax.random.normal(k1, (din, dmid)) * 0.5)
    self.b1 = nnx.Param(jnp.zeros(dmid))
    self.w2 = nnx.Param(jax.random.normal(k2, (dmid, dout)) * 0.5, tag='out')
    self.b2 = nnx.Param(jnp.zeros(dout))
    self.calls = nnx.BatchStat(jnp.array(0))  # not trained: outside wrt=nnx.Param

  def __call__(self, x):
    return jnp.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2


def mlp_apply(p, x):
  return jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2']


def pure_loss(p, x, y):
  return jnp.mean((mlp_apply(p, x) - y) ** 2)


def model_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (8, 3))
Y = jnp.sin(X[:, :2]) + 0.1 * X[:, 2:]
STEPS = 4

TXS = {
    'adam': lambda: optax.adam(1e-2),
    'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
    'clip_chain': lambda: optax.chain(optax.clip_by_global_norm(0.05), optax.adam(3e-2)),
}


@functools.lru_cache(maxsize=None)
def pure_optax(name):
  """The reference: the same model as a dict of arrays, trained with optax alone."""
  tx = TXS[name]()
  m = MLP(KEY)
  p = {k: getattr(m, k)[...] for k in ('w1', 'b1', 'w2', 'b2')}

  @jax.jit
  def step(p, st):
    u, st = tx.update(jax.grad(pure_loss)(p, X, Y), st, p)
    return optax.apply_updates(p, u), st

  st = tx.init(p)
  for _ in range(STEPS):
    p, st = step(p, st)
  return p


def assert_params(model, ref, atol=1e-6):
  for k, v in ref.items():
    np.testing.assert_allclose(getattr(model, k)[...], v, atol=atol, rtol=0)


@nnx.jit
def nnx_step(model, optimizer, x, y):  # the guide's pattern with NNX transforms
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest):
    return model_loss(nnx.merge(graphdef, params, rest), x, y)

  optimizer.update(model, nnx.grad(loss_fn)(params, rest))


@jax.jit
def jax_step(model, optimizer, x, y):  # the guide's pattern: state out, nnx.update outside
  graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, nondiff):
    nondiff = nnx.clone(nondiff)
    return model_loss(nnx.merge(graphdef, params, nondiff), x, y)

  optimizer.update(model, jax.grad(loss_fn)(params, nondiff))
  return nnx.state((model, optimizer))


@pytest.mark.parametrize('name', list(TXS))
def test_nnx_jit_training_matches_pure_optax(name):
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, TXS[name](), wrt=nnx.Param)
  for _ in range(STEPS):
    nnx_step(model, optimizer, X, Y)
  assert_params(model, pure_optax(name))
  assert int(optimizer.step[...]) == STEPS
  assert optimizer.step[...].dtype == jnp.uint32


@pytest.mark.parametrize('name', list(TXS))
def test_jax_jit_training_matches_pure_optax(name):
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, TXS[name](), wrt=nnx.Param)
  for _ in range(STEPS):
    nnx.update((model, optimizer), jax_step(model, optimizer, X, Y))
  assert_params(model, pure_optax(name))
  assert int(optimizer.step[...]) == STEPS


def test_eager_update_returns_the_optax_updates():
  tx = optax.adam(1e-2)
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.grad(lambda p: model_loss(nnx.merge(graphdef, p, rest), X, Y))(params)
  updates = optimizer.update(model, grads)
  p = {k: getattr(MLP(KEY), k)[...] for k in ('w1', 'b1', 'w2', 'b2')}
  ref_updates, _ = tx.update(jax.grad(pure_loss)(p, X, Y), tx.init(p), p)
  for k in p:
    np.testing.assert_allclose(updates[k], ref_updates[k], atol=1e-7)
  assert int(model.calls[...]) == 0


def test_hijax_variables_under_plain_jax_jit():
  with nnx.var_defaults(hijax=True):
    model = MLP(KEY)
    optimizer = nnx.Optimizer(model, TXS['adam'](), wrt=nnx.Param)
  assert optimizer.step.hijax and optimizer.opt_state[0].mu['w1'].hijax

  @jax.jit
  def step(model, optimizer, x, y):  # no nnx.state / nnx.update: hijax carries the writes
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: model_loss(nnx.merge(graphdef, p, rest), x, y))(
        nnx.vars_as(params, hijax=False))
    optimizer.update(model, grads)

  for _ in range(STEPS):
    step(model, optimizer, X, Y)
  assert_params(model, pure_optax('adam'))
  assert int(optimizer.step[...]) == STEPS


class Tied(nnx.Module):
  """Two attributes holding the same Param: only graph mode accepts it."""

  def __init__(self):
    self.a = nnx.Param(jnp.array([1.0, -2.0]))
    self.b = self.a
    self.c = nnx.Param(jnp.array(0.5))

  def __call__(self, x):
    return (self.a * x).sum() + (self.b * x * x).sum() + self.c


def test_graph_mode_shared_param_matches_pure_optax():
  tx = optax.sgd(0.1, momentum=0.9)
  model = Tied()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param, graph=True)
  x = jnp.array([0.3, -1.2])

  @nnx.jit(graph=True)
  def step(model, optimizer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ..., graph=True)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(x) ** 2)(params)
    optimizer.update(model, grads)

  p = {'a': jnp.array([1.0, -2.0]), 'c': jnp.array(0.5)}
  st = tx.init(p)
  for _ in range(3):
    step(model, optimizer)
    g = jax.grad(lambda p: ((p['a'] * x).sum() + (p['a'] * x * x).sum() + p['c']) ** 2)(p)
    u, st = tx.update(g, st, p)
    p = optax.apply_updates(p, u)
  assert model.a is model.b
  np.testing.assert_allclose(model.a[...], p['a'], atol=1e-6)
  np.testing.assert_allclose(model.c[...], p['c'], atol=1e-6)


def test_graph_mode_is_the_default_and_the_context_decides_graph_none():
  model = Tied()
  optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)  # graph mode: shared is fine
  assert optimizer.graph is None
  optimizer.update(model, nnx.State({'a': jnp.ones(2), 'c': jnp.array(1.0)}))
  assert model.a is model.b and model.a[...].tolist() == [0.5, -2.5]
  # graph=None is read at every call: an update under tree mode sees the shared Param twice
  with nnx.set_graph_mode(False):
    with pytest.raises(ValueError, match=r'\.b.*\.a|\.a.*\.b'):
      optimizer.update(model, nnx.State({'a': jnp.ones(2), 'c': jnp.array(1.0)}))
  assert int(optimizer.step[...]) == 1


@pytest.mark.parametrize('tree_mode', ['argument', 'context'])
def test_tree_mode_refuses_shared_params(tree_mode):
  with pytest.raises(ValueError, match=r'\.b.*\.a|\.a.*\.b'):
    if tree_mode == 'argument':
      nnx.Optimizer(Tied(), optax.sgd(0.1), wrt=nnx.Param, graph=False)
    else:
      with nnx.set_graph_mode(False):
        nnx.Optimizer(Tied(), optax.sgd(0.1), wrt=nnx.Param)


@pytest.mark.parametrize('graph', [True, False])
def test_training_under_nnx_jit_in_either_mode(graph):
  with nnx.set_graph_mode(graph):
    model = MLP(KEY)
    optimizer = nnx.Optimizer(model, TXS['adam'](), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      optimizer.update(model, nnx.grad(model_loss, allow_int=True)(model, X, Y))

    for _ in range(STEPS):
      step(model, optimizer)
  assert_params(model, pure_optax('adam'))
  assert int(optimizer.step[...]) == STEPS


def test_state_is_stored_in_variables():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  # optax's own structure, with Variables where it had arrays
  assert isinstance(optimizer.opt_state[0], optax.ScaleByAdamState)
  assert isinstance(optimizer.opt_state[1], optax.EmptyState)
  assert isinstance(optimizer.opt_state[0].mu, nnx.State)
  flat = dict(nnx.state(optimizer).flat_state())
  assert type(flat[('step',)]) is nnx.OptState
  assert type(flat[('opt_state', 0, 'count')]) is nnx.OptArray
  mu = flat[('opt_state', 0, 'mu', 'w2')]
  assert type(mu) is nnx.OptVariable and mu.tag == 'out'  # keeps the param's metadata
  assert mu is not model.w2
  assert {p[-1] for p in flat if p[:3] == ('opt_state', 0, 'nu')} == {'w1', 'b1', 'w2', 'b2'}
  assert not any('calls' in p for p in flat)  # wrt=nnx.Param leaves the BatchStat out
  assert issubclass(nnx.OptArray, nnx.OptState) and issubclass(nnx.OptVariable, nnx.OptState)


def test_checkpoint_round_trip_through_pure_dicts():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  nnx_step(model, optimizer, X, Y)
  saved = nnx.state((model, optimizer)).to_pure_dict()
  model2 = MLP(jax.random.key(5))
  optimizer2 = nnx.Optimizer(model2, optax.adam(1e-2), wrt=nnx.Param)
  target = nnx.state((model2, optimizer2))
  target.replace_by_pure_dict(saved)
  nnx.update((model2, optimizer2), target)
  nnx_step(model, optimizer, X, Y)
  nnx_step(model2, optimizer2, X, Y)
  assert int(optimizer2.step[...]) == 2
  for k in ('w1', 'b1', 'w2', 'b2'):
    np.testing.assert_allclose(getattr(model2, k)[...], getattr(model, k)[...], atol=1e-7)


def test_grads_of_every_param_train_only_the_wrt_part():
  base = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  model = nnx.LoRA(3, 2, 2, base_module=base, rngs=nnx.Rngs(1))
  model.lora_b[...] = jnp.ones((2, 2))  # a nonzero LoRA product, so lora_a gets a gradient
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
  x = jnp.ones((4, 3))
  loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
  grads = nnx.grad(loss)(model)         # nnx.grad's default: every Param, LoRA or not
  assert ('base_module', 'kernel') in dict(grads.flat_state())
  kernel, lora_a = model.base_module.kernel[...], model.lora_a[...]
  optimizer.update(model, grads)
  np.testing.assert_array_equal(model.base_module.kernel[...], kernel)  # outside wrt: untouched
  np.testing.assert_allclose(model.lora_a[...], lora_a - 0.1 * grads['lora_a'][...], atol=1e-6)


def test_jax_grad_over_a_module_gives_module_shaped_grads():
  class Scaled(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array([1.0, -1.0]))
      self.scale = nnx.BatchStat(jnp.array(2.0))  # differentiated by jax.grad, not trained

    def __call__(self, x):
      return jnp.sum(self.scale * self.w * x) ** 2

  model = Scaled()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  grads = jax.grad(lambda m: m(jnp.array([1.0, 2.0])))(model)
  assert isinstance(grads, Scaled) and float(grads.scale[...]) != 0.0
  optimizer.update(model, grads)
  # d/dw (2 * (w0 + 2 w1))^2 = 8 * (w0 + 2 w1) * [1, 2] = -8 * [1, 2]
  np.testing.assert_allclose(model.w[...], [1.8, 0.6], atol=1e-6)
  assert float(model.scale[...]) == 2.0


def test_optimizer_does_not_hold_the_model():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(AttributeError, match='ModelAndOptimizer'):
    optimizer.model  # noqa: B018
  with pytest.raises(AttributeError, match="no attribute 'params'"):
    optimizer.params  # noqa: B018


def test_grads_may_be_raw_arrays_or_a_plain_dict():
  tx = optax.sgd(0.5)
  for make in (lambda g: nnx.State(g), lambda g: g):
    model = MLP(KEY)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = {k: jnp.ones_like(getattr(model, k)[...]) for k in ('w1', 'b1', 'w2', 'b2')}
    before = model.w1[...]
    optimizer.update(model, make(grads))
    np.testing.assert_allclose(model.w1[...], before - 0.5, atol=1e-7)
    np.testing.assert_allclose(model.b2[...], -0.5 * np.ones(2), atol=1e-7)


def test_raw_array_attributes_are_updated_with_wrt_everything():
  class Raw(nnx.Pytree):
    def __init__(self):
      self.w = jnp.array([1.0, 2.0])  # a plain array attribute, not a Variable

  model = Raw()
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=...)
  optimizer.update(model, nnx.State({'w': jnp.array([0.5, 0.5])}))
  np.testing.assert_allclose(model.w, [0.5, 1.5])


# -- errors -------------------------------------------------------------------
def test_missing_wrt_is_a_type_error():
  with pytest.raises(TypeError, match='wrt'):
    nnx.Optimizer(MLP(KEY), optax.sgd(0.1))


def test_missing_grads_is_a_type_error():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(TypeError, match='model, grads'):
    optimizer.update(nnx.state(model, nnx.Param))


def test_grads_not_a_state_is_a_type_error():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  with pytest.raises(TypeError, match='got Array|got ArrayImpl'):
    optimizer.update(model, jnp.ones(3))


def _grads(model, drop=(), add=None, reshape=None):
  g = {k: jnp.ones_like(getattr(model, k)[...]) for k in ('w1', 'b1', 'w2', 'b2') if k not in drop}
  if add:
    g.update(add)
  if reshape:
    g[reshape] = jnp.zeros((7,))
  return nnx.State(g)


@pytest.mark.parametrize('kwargs, culprit', [
    (dict(drop=('b1',)), r'no gradient for the parameter \.b1'),
    (dict(add={'calls': jnp.zeros(())}), r'not a parameter: \.calls'),
    (dict(reshape='w2'), r'\.w2 has shape \(7,\) but the parameter has shape \(4, 2\)'),
])
def test_grads_mismatch_names_the_path(kwargs, culprit):
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = model.w1[...]
  with pytest.raises(ValueError, match=culprit):
    optimizer.update(model, _grads(model, **kwargs))
  assert int(optimizer.step[...]) == 0 and (model.w1[...] == before).all()


def test_nested_path_in_mismatch_message():
  class Outer(nnx.Module):
    def __init__(self):
      self.layers = nnx.List([MLP(KEY), MLP(KEY)])

  model = Outer()
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.state(model, nnx.Param)
  del grads['layers'][1]['w2']
  with pytest.raises(ValueError, match=r'\.layers\[1\]\.w2'):
    optimizer.update(model, grads)


def test_structure_changing_transformation_is_refused():
  def init(params):
    return (jnp.zeros(()),)

  def update(updates, state, params=None):
    return updates, (jnp.zeros(()), jnp.zeros(()))

  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.GradientTransformation(init, update), wrt=nnx.Param)
  before = model.w1[...]
  with pytest.raises(ValueError, match='changed the structure'):
    optimizer.update(model, _unit_grads(model))  # the updates would move every param
  assert (model.w1[...] == before).all() and int(optimizer.step[...]) == 0


def test_optimizer_captured_by_jax_jit_cannot_be_updated():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @jax.jit
  def step(model, grads):
    optimizer.update(model, grads)  # closed over: its Variables belong to the outer trace

  with pytest.raises(TraceContextError):
    step(model, _grads(model))


# -- any optax transformation -------------------------------------------------
def test_inject_hyperparams_are_readable_and_settable():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                            wrt=nnx.Param)
  lr = optimizer.opt_state.hyperparams['learning_rate']
  assert isinstance(lr, nnx.OptArray) and float(lr[...]) == pytest.approx(0.1)
  lr[...] = 0.25
  before = model.b1[...]
  nnx_step(model, optimizer, X, Y)
  g = jax.grad(pure_loss)({k: getattr(MLP(KEY), k)[...] for k in ('w1', 'b1', 'w2', 'b2')}, X, Y)
  np.testing.assert_allclose(model.b1[...], before - 0.25 * g['b1'], atol=1e-6)
  flat = dict(nnx.state(optimizer).flat_state())
  assert float(flat[('opt_state', 'hyperparams', 'learning_rate')][...]) == 0.25


def _unit_grads(model):
  return nnx.State({k: jnp.ones_like(getattr(model, k)[...]) for k in ('w1', 'b1', 'w2', 'b2')})


@pytest.mark.parametrize('labels', [
    nnx.State({'w1': 'train', 'b1': 'train', 'w2': 'freeze', 'b2': 'freeze'}),
    lambda params: nnx.State({k: 'train' if k.endswith('1') else 'freeze' for k in params}),
])
def test_multi_transform_with_labels(labels):
  model = MLP(KEY)
  tx = optax.multi_transform({'train': optax.sgd(1.0), 'freeze': optax.set_to_zero()}, labels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  w1, w2 = model.w1[...], model.w2[...]
  optimizer.update(model, _unit_grads(model))
  np.testing.assert_allclose(model.w1[...], w1 - 1.0, atol=1e-7)
  np.testing.assert_allclose(model.w2[...], w2, atol=0)


def test_masked_with_a_mask_state():
  model = MLP(KEY)
  mask = nnx.State({'w1': False, 'b1': True, 'w2': False, 'b2': True})
  optimizer = nnx.Optimizer(model, optax.masked(optax.sgd(1.0), mask), wrt=nnx.Param)
  w1 = model.w1[...]
  optimizer.update(model, _unit_grads(model))
  np.testing.assert_allclose(model.b1[...], -np.ones(4), atol=1e-7)
  # unmasked leaves get the gradient itself as their update (optax.masked semantics)
  np.testing.assert_allclose(model.w1[...], w1 + 1.0, atol=1e-7)


def test_multisteps_accumulates_then_applies():
  model = MLP(KEY)
  optimizer = nnx.Optimizer(model, optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2),
                            wrt=nnx.Param)
  grads = _unit_grads(model)
  optimizer.update(model, grads)
  np.testing.assert_allclose(model.b1[...], np.zeros(4), atol=0)
  optimizer.update(model, jax.tree.map(lambda g: 3 * g, grads))
  np.testing.assert_allclose(model.b1[...], -2.0 * np.ones(4), atol=1e-7)  # mean of 1 and 3
  assert int(optimizer.step[...]) == 2


def test_line_search_kwargs_reach_tx_update():
  class Quad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.array([0.0, 1.0, -1.0]))

  def f(w):
    return jnp.sum((w - jnp.array([1.0, 2.0, 3.0])) ** 2 * jnp.array([1.0, 2.0, 3.0]))

  def make_tx():  # needs value=, grad= and value_fn= at every update, like optax.lbfgs
    return optax.chain(optax.sgd(0.1),
                       optax.scale_by_backtracking_linesearch(max_backtracking_steps=4))

  model = Quad()
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  graphdef = nnx.graphdef(model)

  def value_fn(params):  # receives the params as a State of arrays
    return f(nnx.merge(graphdef, params).w[...])

  tx = make_tx()
  w = jnp.array([0.0, 1.0, -1.0])
  st = tx.init(w)
  for _ in range(2):
    value, grads = jax.value_and_grad(value_fn)(nnx.state(model, nnx.Param))
    optimizer.update(model, grads, value=value, grad=grads, value_fn=value_fn)
    v, g = jax.value_and_grad(f)(w)
    u, st = tx.update(g, st, w, value=v, grad=g, value_fn=f)
    w = optax.apply_updates(w, u)
  assert float(f(w)) < float(f(jnp.array([0.0, 1.0, -1.0])))  # the line search did step
  np.testing.assert_allclose(model.w[...], w, atol=1e-6)


# -- sharding of the optimizer state (8 devices: tests/sharding_scripts/mesh_checks.py) --
MESH1 = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_optimizer_sharding_metadata_shards_the_state_not_the_param():
  with jax.set_mesh(MESH1):
    model = nnx.Linear(2, 4, kernel_metadata={'optimizer_sharding': ('data', 'model')},
                       rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  P = jax.sharding.PartitionSpec
  mu = optimizer.opt_state[0].mu['kernel']
  assert mu.out_sharding == ('data', 'model') and 'optimizer_sharding' not in mu.get_metadata()
  assert mu[...].sharding.spec == P('data', 'model')
  assert model.kernel.get_metadata('out_sharding', None) is None
  specs = nnx.get_partition_spec(nnx.state(optimizer))
  assert specs['opt_state'][0]['nu']['kernel'].get_value() == P('data', 'model')
  assert specs['opt_state'][0]['mu']['bias'].get_value() == P()


def test_param_out_sharding_is_kept_by_its_optimizer_state():
  init = nnx.with_partitioning(nnx.initializers.ones_init(), (None, 'model'))
  with jax.set_mesh(MESH1):
    model = nnx.Linear(2, 4, kernel_init=init, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  assert optimizer.opt_state[0].mu['kernel'].out_sharding == (None, 'model')


# -- ModelAndOptimizer ----------------------------------------------------------
def test_model_and_optimizer_owns_its_model():
  tx = TXS['adam']()
  model = MLP(KEY)
  mo = nnx.ModelAndOptimizer(model, tx)
  assert mo.model is model and mo.wrt is nnx.Param
  assert set(nnx.state(mo)) == {'model', 'opt_state', 'step'}

  @nnx.jit
  def step(mo, x, y):
    graphdef, params, rest = nnx.split(mo.model, nnx.Param, ...)
    grads = jax.grad(lambda p: model_loss(nnx.merge(graphdef, p, rest), x, y))(params)
    mo.update(grads)

  for _ in range(STEPS):
    step(mo, X, Y)
  assert_params(model, pure_optax('adam'))
  assert int(mo.step[...]) == STEPS


# -- TrainState ---------------------------------------------------------------
def test_train_state_apply_gradients_under_jax_jit():
  tx = TXS['sgd_momentum']()
  graphdef, params, rest = nnx.split(MLP(KEY), nnx.Param, ...)
  ts = nnx.TrainState.create(graphdef, params=params, tx=tx)

  @jax.jit
  def step(ts):
    loss_fn = lambda p: model_loss(nnx.merge(ts.graphdef, p, nnx.clone(rest)), X, Y)  # noqa: E731
    return ts.apply_gradients(jax.grad(loss_fn)(ts.params))

  for _ in range(STEPS):
    ts = step(ts)
  assert int(ts.step) == STEPS
  assert_params(nnx.merge(graphdef, ts.params, rest), pure_optax('sgd_momentum'))
  with pytest.raises(Exception, match='cannot assign'):
    ts.step = 0  # frozen


def test_train_state_subclass_and_apply():
  class WithRest(nnx.TrainState):
    rest: nnx.State

  graphdef, params, rest = nnx.split(MLP(KEY), nnx.Param, ...)
  ts = WithRest.create(graphdef, params=params, tx=optax.sgd(0.1), rest=rest)
  assert isinstance(ts, nnx.TrainState) and ts.rest is rest
  y, (g, state) = ts.apply('params', 'rest')(X)
  np.testing.assert_allclose(y, MLP(KEY)(X), atol=1e-6)
  assert jax.tree.structure(ts) == jax.tree.structure(ts.replace(step=ts.step + 1))
