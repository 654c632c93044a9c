"""Checks that need 8 devices; run in a process of their own (the device count is fixed at import).

    python tests/sharding_scripts/mesh_checks.py sharding|shard_map|all

Prints one JSON object: group -> check name -> "ok" or the failure's traceback. The
pytest files run it once per session (all groups) and assert each check.
"""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import functools  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import arbax as nnx  # noqa: E402

AUTO = (jax.sharding.AxisType.Auto,) * 2
MESH = jax.make_mesh((2, 4), ('data', 'model'), axis_types=AUTO)
X = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4) / 64.0
Y = jnp.sin(jnp.arange(16 * 2, dtype=jnp.float32)).reshape(16, 2)
CHECKS: dict = {}


def check(group):
  def register(fn):
    CHECKS.setdefault(group, []).append(fn)
    return fn
  return register


class MLP(nnx.Module):
  """Megatron-style: the first layer splits its outputs, the second its inputs over 'model'."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.l1 = nnx.Linear(4, 16, kernel_init=nnx.with_partitioning(init, (None, 'model')),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('model',)),
                         rngs=rngs)
    self.l2 = nnx.Linear(16, 2, kernel_init=nnx.with_partitioning(init, ('model', None)),
                         rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


ASKED = {('l1', 'kernel'): P(None, 'model'), ('l1', 'bias'): P('model'),
         ('l2', 'kernel'): P('model', None), ('l2', 'bias'): P()}


def unsharded_model():
  with nnx.use_eager_sharding(False):
    return MLP(nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def reference_losses(steps=3, lr=0.05):
  """Plain-JAX SGD on the same initial weights: the independent computation to match."""
  params = {'/'.join(k): jnp.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(unsharded_model()))}

  def loss_fn(p):
    h = jax.nn.relu(X @ p['l1/kernel'] + p['l1/bias'])
    return jnp.mean((h @ p['l2/kernel'] + p['l2/bias'] - Y) ** 2)

  @jax.jit
  def step(params):
    loss, g = jax.value_and_grad(loss_fn)(params)
    return loss, {k: params[k] - lr * g[k] for k in params}

  losses = []
  for _ in range(steps):
    loss, params = step(params)
    losses.append(float(loss))
  return tuple(losses)


def train(model, x_sharding, steps=3, lr=0.05):
  opt = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

  @nnx.jit(in_shardings=(None, None, x_sharding, x_sharding))
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt, X, Y)) for _ in range(steps)]


def specs_of(model):
  return {p: v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(model))}


def _norm(spec):
  entries = list(spec)
  while entries and entries[-1] is None:   # P('model', None) is stored as P('model')
    entries.pop()
  return P(*entries)


def assert_specs(model, asked):
  got = specs_of(model)
  for path, spec in asked.items():
    assert _norm(got[path]) == _norm(spec), f'{path}: got {got[path]}, asked {spec}'


# -- sharding (arbax/sharding.py and the sharding part of nnx.jit) -----------
@check('sharding')
def eager_sharding_places_params_under_set_mesh():
  with jax.set_mesh(MESH):
    model = MLP(nnx.Rngs(0))
  assert_specs(model, ASKED)
  np.testing.assert_allclose(model.l1.kernel[...], unsharded_model().l1.kernel[...])


@check('sharding')
def jit_out_shardings_creates_model_sharded():
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    shardings = nnx.get_named_sharding(nnx.state(abstract), MESH)
    model = nnx.jit(lambda: MLP(nnx.Rngs(0)), out_shardings=shardings)()
  assert_specs(model, ASKED)
  np.testing.assert_allclose(model.l2.kernel[...], unsharded_model().l2.kernel[...])


@check('sharding')
def jit_out_shardings_state_sharding_and_single():
  make = lambda: MLP(nnx.Rngs(0))  # noqa: E731
  with nnx.use_eager_sharding(False):
    per_filter = nnx.StateSharding({lambda path, v: path == ('l1', 'kernel'): NamedSharding(MESH, P(None, 'model')),
                                    ...: NamedSharding(MESH, P())})
    model = nnx.jit(make, out_shardings=per_filter)()
    whole = nnx.jit(make, out_shardings=NamedSharding(MESH, P()))()
  assert specs_of(model)[('l1', 'kernel')] == P(None, 'model')
  assert specs_of(model)[('l2', 'kernel')] == P()
  assert set(specs_of(whole).values()) == {P()}


@check('sharding')
def data_parallel_train_matches_unsharded():
  mesh = jax.make_mesh((8, 1), ('data', 'model'), axis_types=AUTO)
  model = unsharded_model()
  replicated = nnx.get_named_sharding(nnx.state(model), mesh)
  model = nnx.jit(lambda m: m, in_shardings=(nnx.StateSharding({...: NamedSharding(mesh, P())}),),
                  out_shardings=nnx.StateSharding({...: NamedSharding(mesh, P())}))(model)
  losses = train(model, NamedSharding(mesh, P('data')))
  np.testing.assert_allclose(losses, reference_losses(), rtol=1e-5)
  assert set(specs_of(model).values()) == {P()}
  assert replicated['l1']['kernel'].get_value().spec == P(None, 'model')


@check('sharding')
def tensor_parallel_train_matches_unsharded():
  with jax.set_mesh(MESH):
    model = MLP(nnx.Rngs(0))
  losses = train(model, NamedSharding(MESH, P('data')))
  np.testing.assert_allclose(losses, reference_losses(), rtol=1e-5)
  assert_specs(model, ASKED)   # updates kept the shardings their inputs came with


@check('sharding')
def jit_in_shardings_state_tree_reshards_plain_and_module():
  model = unsharded_model()
  tree = nnx.get_named_sharding(nnx.state(model), MESH)

  @nnx.jit(in_shardings=(tree, NamedSharding(MESH, P('data'))),
           out_shardings=NamedSharding(MESH, P('data')))
  def scale(m, x):
    m.l1.kernel[...] = m.l1.kernel[...] * 2
    return m(x)

  before = np.asarray(model.l1.kernel[...])
  y = scale(model, X)
  assert y.sharding.spec == P('data'), y.sharding
  assert model.l1.kernel[...].sharding.spec == P(None, 'model')
  np.testing.assert_allclose(model.l1.kernel[...], before * 2)


@check('sharding')
def jit_missing_path_in_sharding_tree_names_it():
  model = unsharded_model()
  tree = {'l1': {'kernel': NamedSharding(MESH, P())}}
  try:
    nnx.jit(lambda m: None, in_shardings=(tree,))(model)
  except ValueError as e:
    assert '.l1.bias' in str(e), str(e)
  else:
    raise AssertionError('expected ValueError')


@check('sharding')
def abstract_model_and_as_abstract_carry_shardings():
  graphdef, state = nnx.get_abstract_model(lambda: MLP(nnx.Rngs(0)), MESH)
  assert state['l1']['kernel'].get_value().sharding.spec == P(None, 'model')
  with jax.set_mesh(MESH):
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    abstract = nnx.as_abstract(abstract)
  assert abstract.l2.kernel.get_value().sharding.spec == P('model', None)
  assert nnx.abstract_with_sharding is nnx.as_abstract


@check('sharding')
def logical_rules_map_to_mesh_axes():
  init = nnx.with_partitioning(nnx.initializers.ones_init(), ('embed', 'mlp'))
  with jax.set_mesh(MESH), nnx.logical_axis_rules([('embed', None), ('mlp', 'model')]):
    layer = nnx.Linear(4, 8, kernel_init=init, rngs=nnx.Rngs(0))
  assert layer.kernel[...].sharding.spec == P(None, 'model')


@check('sharding')
def with_sharding_constraint_inside_model():
  class Constrained(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((4, 4)))

    def __call__(self, x):
      return jax.lax.with_sharding_constraint(x @ self.w, NamedSharding(MESH, P('data', 'model')))

  y = nnx.jit(lambda m, x: m(x))(Constrained(), X)
  assert y.sharding.spec == P('data', 'model')
  np.testing.assert_allclose(y, X @ jnp.ones((4, 4)), rtol=1e-6)


@check('sharding')
def checkpoint_restores_onto_another_mesh():
  with jax.set_mesh(MESH):
    model = MLP(nnx.Rngs(0))
  path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  nnx.checkpoint.save(path, model)
  other = jax.make_mesh((8, 1), ('model', 'data'), axis_types=AUTO)
  graphdef, abstract = nnx.get_abstract_model(lambda: MLP(nnx.Rngs(1)), other)
  restored = nnx.checkpoint.restore(path, nnx.merge(graphdef, abstract))
  for p, v in nnx.to_flat_state(nnx.state(restored)):
    arr = v.get_value()
    assert arr.sharding.mesh.shape == other.shape, (p, arr.sharding)
    np.testing.assert_allclose(arr, _at(model, p))
  assert specs_of(restored)[('l1', 'kernel')] == P(None, 'model')
  # explicit shardings= on a concrete, unsharded target
  target = unsharded_model()
  nnx.checkpoint.restore(path, target, shardings=nnx.StateSharding({...: NamedSharding(other, P())}))
  assert set(specs_of(target).values()) == {P()}
  np.testing.assert_allclose(target.l1.kernel[...], model.l1.kernel[...])


@check('sharding')
def optimizer_sharding_splits_the_moments_not_the_params():
  """ZeRO-style: params replicated, Adam's moments split by their `optimizer_sharding`."""
  def build(**metadata):
    return nnx.Linear(4, 8, kernel_metadata=metadata, rngs=nnx.Rngs(0))

  with jax.set_mesh(MESH):
    model = build(optimizer_sharding=('data', 'model'))
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  assert model.kernel[...].sharding.is_equivalent_to(NamedSharding(MESH, P()), 2)
  for moment in (optimizer.opt_state[0].mu, optimizer.opt_state[0].nu):
    sharding = moment['kernel'][...].sharding
    assert sharding.is_equivalent_to(NamedSharding(MESH, P('data', 'model')), 2), sharding
    assert sharding.shard_shape((4, 8)) == (2, 2)

  @nnx.jit
  def step(model, optimizer, x):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

  reference = build()   # the same training, unsharded
  ref_opt = nnx.Optimizer(reference, optax.adam(0.1), wrt=nnx.Param)
  with jax.set_mesh(MESH):
    for _ in range(2):
      step(model, optimizer, X)
  for _ in range(2):
    step(reference, ref_opt, X)
  np.testing.assert_allclose(model.kernel[...], reference.kernel[...], rtol=1e-5, atol=1e-6)
  assert int(optimizer.step[...]) == 2
  mu = optimizer.opt_state[0].mu['kernel'][...]
  assert mu.sharding.is_equivalent_to(NamedSharding(MESH, P('data', 'model')), 2), mu.sharding


def _at(model, path):
  node = model
  for k in path:
    node = getattr(node, k)
  return np.asarray(node[...])


# -- shard_map (arbax/transforms/shard_map.py) ------------------------------
@check('shard_map')
def shard_map_data_parallel_apply():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  model = unsharded_model()

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))
  def apply(m, x):
    assert x.shape == (2, 4)   # each device sees its 2 rows
    return m(x)

  np.testing.assert_allclose(apply(model, X), model(X), rtol=1e-5)


@check('shard_map')
def shard_map_tensor_parallel_with_state_sharding():
  mesh = jax.make_mesh((4,), ('model',), axis_types=(jax.sharding.AxisType.Auto,))
  model = unsharded_model()
  specs = nnx.StateSharding({
      lambda path, v: path[0] == 'l1' and path[-1] == 'kernel': P(None, 'model'),
      lambda path, v: path[0] == 'l1': P('model'),
      lambda path, v: path == ('l2', 'kernel'): P('model', None),
      ...: P()})

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(specs, P()), out_specs=P())
  def apply(m, x):
    assert m.l1.kernel.shape == (4, 4) and m.l2.kernel.shape == (4, 2)
    partial = jax.nn.relu(x @ m.l1.kernel[...] + m.l1.bias[...]) @ m.l2.kernel[...]
    return jax.lax.psum(partial, 'model') + m.l2.bias[...]

  np.testing.assert_allclose(apply(model, X), model(X), rtol=1e-5)


@check('shard_map')
def shard_map_updates_reach_caller_with_their_spec():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))

  class Counter(nnx.Module):
    def __init__(self):
      self.total = nnx.BatchStat(jnp.zeros(()))
      self.per_device = nnx.BatchStat(jnp.zeros((8,)))

  c = Counter()

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(nnx.StateSharding({nnx.PathContains('per_device'): P('data'),
                                                         ...: P()}),
                                      P('data')), out_specs=P())
  def count(c, x):
    c.total[...] = c.total[...] + jax.lax.psum(x.sum(), 'data')
    c.per_device[...] = c.per_device[...] + x.sum()
    return None

  count(c, X)
  np.testing.assert_allclose(c.total[...], X.sum(), rtol=1e-6)
  np.testing.assert_allclose(c.per_device[...], X.reshape(8, -1).sum(axis=1), rtol=1e-6)
  assert c.per_device[...].sharding.spec == P('data')


@check('shard_map')
def shard_map_batchnorm_axis_name_matches_global_batch():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  bn = nnx.BatchNorm(4, axis_name='data', momentum=0.5, rngs=nnx.Rngs(0))

  @nnx.jit
  @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data'))
  def apply(bn, x):
    return bn(x)

  y = apply(bn, X)
  mean, var = X.mean(0), X.var(0)
  np.testing.assert_allclose(y, (X - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.5 * mean, rtol=1e-5)


@check('shard_map')
def shard_map_inside_jit_train_step():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  model = unsharded_model()
  opt = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=(P(), P()))
    def grads_on_shard(model, x, y):
      # the gradient of a replicated input is summed over devices by JAX: average the loss first
      global_loss = lambda m: jax.lax.pmean(jnp.mean((m(x) - y) ** 2), 'data')  # noqa: E731
      return nnx.value_and_grad(global_loss)(model)
    loss, grads = grads_on_shard(model, x, y)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, X, Y)) for _ in range(3)]
  np.testing.assert_allclose(losses, reference_losses(), rtol=1e-5)


@check('shard_map')
def shard_map_wrong_arity_names_counts():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  f = nnx.shard_map(lambda a, b: a, mesh=mesh, in_specs=(P(),), out_specs=P())
  try:
    f(X, X)
  except ValueError as e:
    assert '1 entries' in str(e) and '2 positional' in str(e), str(e)
  else:
    raise AssertionError('expected ValueError')


def main(group: str) -> None:
  results: dict = {}
  for g in (sorted(CHECKS) if group == 'all' else [group]):
    for fn in CHECKS[g]:
      try:
        t0 = time.perf_counter()
        fn()
        results.setdefault(g, {})[fn.__name__] = 'ok'
        print(fn.__name__, round(time.perf_counter() - t0, 2), file=sys.stderr)
      except Exception:  # noqa: BLE001  (reported to the test, which fails with the traceback)
        results.setdefault(g, {})[fn.__name__] = traceback.format_exc()
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1])
