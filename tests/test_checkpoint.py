"""nnx.checkpoint: Orbax save/restore of model and optimizer State, checked before writing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx


class Net(nnx.Module):
  def __init__(self, *, rngs, dout=2, layers=2, l1_dtype=jnp.float32):
    self.l1 = nnx.Linear(3, 4, param_dtype=l1_dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)          # holds an RngStream: a typed PRNG key
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(layers)])
    self.l2 = nnx.Linear(4, dout, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.l1(x))))
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.l2(x)


X = jnp.linspace(-1.0, 1.0, 15, dtype=jnp.float32).reshape(5, 3)
Y = jnp.stack([jnp.sin(X.sum(1)), jnp.cos(X[:, 0])], axis=1)


@nnx.jit
def train_step(model, optimizer):
  def loss_fn(model):
    return jnp.mean((model(X) - Y) ** 2)
  optimizer.update(model, nnx.grad(loss_fn)(model))


def trained(seed=0):
  model = Net(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  for _ in range(3):
    train_step(model, optimizer)
  return model, optimizer


def snapshot(obj) -> dict:
  """Every Variable's value as a host copy (PRNG keys as their raw data), by path."""
  out = {}
  for path, var in nnx.state(obj).flat_state():
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    out[path] = np.array(value)
  return out


def assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype, path
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A trained (model, optimizer) written to disk once; tests only read it."""
  model, optimizer = trained()
  path = tmp_path_factory.mktemp('ckpt') / 'model_and_opt'
  nnx.checkpoint.save(path, (model, optimizer))
  model_only = tmp_path_factory.mktemp('ckpt') / 'model'
  nnx.checkpoint.save(model_only, model)
  return {'pair': path, 'model': model_only, 'objects': (model, optimizer),
          'values': snapshot((model, optimizer)), 'model_values': snapshot(model)}


def test_round_trip_of_model_and_optimizer_is_bit_exact(saved):
  model, optimizer = trained(seed=1)          # other init, other optimizer moments
  assert int(optimizer.step[...]) == 3
  before = snapshot((model, optimizer))
  assert any(not np.array_equal(before[p], saved['values'][p]) for p in before)

  out = nnx.checkpoint.restore(saved['pair'], (model, optimizer))

  assert out[0] is model and out[1] is optimizer      # restored in place
  assert_same(snapshot((model, optimizer)), saved['values'])
  assert isinstance(model.drop.rngs.key.get_value(), jax.Array)
  assert jnp.issubdtype(model.drop.rngs.key.get_value().dtype, jax.dtypes.prng_key)


def test_restored_training_continues_exactly_like_the_original(saved):
  original, original_opt = trained()
  model, optimizer = trained(seed=1)
  nnx.checkpoint.restore(saved['pair'], (model, optimizer))
  # Adam's moments, its step count, BatchNorm stats and the dropout key all matter here.
  train_step(original, original_opt)
  train_step(model, optimizer)
  assert_same(snapshot((model, optimizer)), snapshot((original, original_opt)))
  assert int(optimizer.step[...]) == 4


def test_load_pure_dict_has_int_keys_for_lists(saved):
  pure = nnx.checkpoint.load_pure_dict(saved['model'])
  assert sorted(pure['layers']) == [0, 1]
  np.testing.assert_array_equal(pure['l2']['kernel'], saved['model_values'][('l2', 'kernel')])
  assert set(pure) == {'l1', 'bn', 'drop', 'layers', 'l2'}


@pytest.mark.parametrize('kwargs, culprit, words', [
    (dict(layers=3), '.layers[2]', ['nothing at', 'structure']),
    (dict(layers=1), '.layers[1]', ['lacks', 'structure']),
    (dict(dout=3), '.l2.bias', ['shape', '(2,)', '(3,)']),
    (dict(l1_dtype=jnp.bfloat16), '.l1.bias', ['dtype', 'float32', 'bfloat16']),
], ids=['target-has-more', 'target-has-less', 'shape', 'dtype'])
def test_incompatible_target_raises_naming_the_path_and_stays_untouched(saved, kwargs, culprit,
                                                                        words):
  target = Net(rngs=nnx.Rngs(7), **kwargs)
  before = snapshot(target)
  with pytest.raises(ValueError) as info:
    nnx.checkpoint.restore(saved['model'], target)
  message = str(info.value)
  assert culprit in message
  for word in words:
    assert word in message
  assert_same(snapshot(target), before)


def test_model_target_refuses_a_model_and_optimizer_checkpoint(saved):
  target = Net(rngs=nnx.Rngs(7))
  before = snapshot(target)
  with pytest.raises(ValueError, match='structure'):
    nnx.checkpoint.restore(saved['pair'], target)
  assert_same(snapshot(target), before)


def test_abstract_target_gives_a_new_concrete_model_equal_to_the_saved_one(saved):
  abstract = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0)))
  assert isinstance(abstract.l1.kernel.get_value(), jax.ShapeDtypeStruct)

  restored = nnx.checkpoint.restore(saved['model'], abstract)

  assert type(restored) is Net and restored is not abstract
  assert isinstance(restored.l1.kernel.get_value(), jax.Array)
  assert_same(snapshot(restored), saved['model_values'])
  model = saved['objects'][0]
  model.eval()
  restored.eval()
  np.testing.assert_array_equal(restored(X), model(X))


def test_abstract_model_and_optimizer_pair(saved):
  def build():
    model = Net(rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  model, optimizer = nnx.checkpoint.restore(saved['pair'], nnx.eval_shape(build))
  assert_same(snapshot((model, optimizer)), saved['values'])
  assert int(optimizer.step[...]) == 3


class Counter(nnx.Module):
  def __init__(self):
    self.calls = nnx.BatchStat(0)        # a plain Python int, not an array
    self.scale = nnx.Param(1.5)
    self.w = nnx.Param(jnp.arange(3.0))


def test_python_number_variables_round_trip(tmp_path):
  source = Counter()
  source.calls.set_value(7)
  source.scale.set_value(0.1)                  # not representable in float32
  nnx.checkpoint.save(tmp_path / 'c', source)
  target = Counter()
  nnx.checkpoint.restore(tmp_path / 'c', target)
  assert target.calls.get_value() == 7 and type(target.calls.get_value()) is int
  assert target.scale.get_value() == 0.1 and type(target.scale.get_value()) is float
  np.testing.assert_array_equal(target.w.get_value(), jnp.arange(3.0))


def test_python_number_target_accepts_a_counter_that_became_an_array(tmp_path):
  source = Counter()
  source.calls.set_value(jnp.array(5, jnp.int32))   # what a jitted `calls[...] += 1` leaves
  nnx.checkpoint.save(tmp_path / 'c', source)
  target = Counter()
  nnx.checkpoint.restore(tmp_path / 'c', target)
  assert int(target.calls.get_value()) == 5


def test_python_number_target_refuses_another_kind(tmp_path):
  source = Counter()
  source.calls.set_value(jnp.array(5.5))
  nnx.checkpoint.save(tmp_path / 'c', source)
  with pytest.raises(ValueError, match=r'\.calls'):
    nnx.checkpoint.restore(tmp_path / 'c', Counter())


def test_jitted_steps_do_not_compile_again_after_a_restore(saved, caplog):
  model, optimizer = trained(seed=1)       # train_step is compiled for these
  nnx.checkpoint.restore(saved['pair'], (model, optimizer))
  with jax.log_compiles(True), caplog.at_level('WARNING'):
    train_step(model, optimizer)
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]


def test_bfloat16_params_round_trip(tmp_path):
  source = Net(rngs=nnx.Rngs(0), l1_dtype=jnp.bfloat16)
  nnx.checkpoint.save(tmp_path / 'bf16', source)
  target = Net(rngs=nnx.Rngs(1), l1_dtype=jnp.bfloat16)
  nnx.checkpoint.restore(tmp_path / 'bf16', target)
  assert target.l1.kernel.get_value().dtype == jnp.bfloat16
  assert_same(snapshot(target), snapshot(source))


def test_saved_python_number_restores_into_an_array_counter(tmp_path):
  nnx.checkpoint.save(tmp_path / 'c', Counter())            # calls is the Python int 0
  target = Counter()
  target.calls.set_value(jnp.array(9, jnp.int32))
  nnx.checkpoint.restore(tmp_path / 'c', target)
  value = target.calls.get_value()
  assert isinstance(value, jax.Array) and value.dtype == jnp.int32 and int(value) == 0
