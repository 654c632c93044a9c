"""Tests for arbax/nn/recurrent.py: cell maths against the equations, RNN scanning, Bidirectional."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from arbax.nn.recurrent import flip_sequences
from tests.layer_transforms import check_ensemble, check_scan_broadcast, check_scan_over_layers

sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _dense(lin, x):
  y = np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64)
  return y + np.asarray(lin.bias[...]) if lin.bias is not None else y


def _shapes(module):
  return jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


# -- cells ----------------------------------------------------------------------
def test_cell_parameters_are_named_like_nnx():
  rngs = nnx.Rngs(0)
  assert _shapes(nnx.SimpleCell(3, 4, rngs=rngs)) == {
      'dense_h': {'kernel': (4, 4)}, 'dense_i': {'kernel': (3, 4), 'bias': (4,)}}
  lstm = {f'i{g}': {'kernel': (3, 4)} for g in ('i', 'g', 'o')}
  lstm['if_'] = {'kernel': (3, 4)}
  lstm.update({f'h{g}': {'kernel': (4, 4), 'bias': (4,)} for g in 'ifgo'})
  assert _shapes(nnx.LSTMCell(3, 4, rngs=rngs)) == lstm
  assert _shapes(nnx.OptimizedLSTMCell(3, 4, rngs=rngs)) == {
      'dense_i': {'kernel': (3, 16)}, 'dense_h': {'kernel': (4, 16), 'bias': (16,)}}
  assert _shapes(nnx.GRUCell(3, 4, rngs=rngs)) == {
      'dense_i': {'kernel': (3, 12), 'bias': (12,)}, 'dense_h': {'kernel': (4, 12)}}


def _random_bias(cell):
  # Zero-initialised biases would hide a bias applied in the wrong place.
  for i, (path, v) in enumerate(nnx.to_flat_state(nnx.state(cell, nnx.Param))):
    if path[-1] == 'bias':
      v[...] = _normal(10 + i, v.shape)


def test_lstm_step_follows_the_equations():
  cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  _random_bias(cell)
  x, c, h = _normal(1, (2, 3)), _normal(2, (2, 4)), _normal(3, (2, 4))
  (new_c, new_h), y = cell((c, h), x)
  i = sigmoid(_dense(cell.ii, x) + _dense(cell.hi, h))
  f = sigmoid(_dense(cell.if_, x) + _dense(cell.hf, h))
  g = np.tanh(_dense(cell.ig, x) + _dense(cell.hg, h))
  o = sigmoid(_dense(cell.io, x) + _dense(cell.ho, h))
  expected_c = f * c + i * g
  np.testing.assert_allclose(new_c, expected_c, atol=1e-5)
  np.testing.assert_allclose(new_h, o * np.tanh(expected_c), atol=1e-5)
  np.testing.assert_array_equal(y, new_h)


def test_optimized_lstm_step_follows_the_equations():
  cell = nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0))
  _random_bias(cell)
  x, c, h = _normal(1, (2, 3)), _normal(2, (2, 4)), _normal(3, (2, 4))
  (new_c, new_h), y = cell((c, h), x)
  z = _dense(cell.dense_i, x) + _dense(cell.dense_h, h)
  i, f, g, o = sigmoid(z[:, :4]), sigmoid(z[:, 4:8]), np.tanh(z[:, 8:12]), sigmoid(z[:, 12:])
  expected_c = f * c + i * g
  np.testing.assert_allclose(new_c, expected_c, atol=1e-5)
  np.testing.assert_allclose(new_h, o * np.tanh(expected_c), atol=1e-5)
  np.testing.assert_array_equal(y, new_h)


def test_gru_step_follows_the_equations():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  _random_bias(cell)
  x, h = _normal(1, (2, 3)), _normal(3, (2, 4))
  new_h, y = cell(h, x)
  xi, hh = _dense(cell.dense_i, x), _dense(cell.dense_h, h)
  r = sigmoid(xi[:, :4] + hh[:, :4])
  z = sigmoid(xi[:, 4:8] + hh[:, 4:8])
  n = np.tanh(xi[:, 8:] + r * hh[:, 8:])
  np.testing.assert_allclose(new_h, (1 - z) * n + z * h, atol=1e-5)
  np.testing.assert_array_equal(y, new_h)


@pytest.mark.parametrize('residual', [False, True])
def test_simple_cell_step(residual):
  cell = nnx.SimpleCell(3, 4, residual=residual, rngs=nnx.Rngs(0))
  _random_bias(cell)
  x, h = _normal(1, (2, 3)), _normal(3, (2, 4))
  new_h, y = cell(h, x)
  pre = _dense(cell.dense_i, x) + _dense(cell.dense_h, h) + (h if residual else 0)
  np.testing.assert_allclose(new_h, np.tanh(pre), atol=1e-5)
  np.testing.assert_array_equal(y, new_h)


def test_initialize_carry():
  cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  rngs = nnx.Rngs(carry=1)
  c, h = cell.initialize_carry((2, 5, 3), rngs)
  assert c.shape == h.shape == (2, 5, 4) and c.dtype == jnp.float32
  assert not c.any() and not h.any()
  assert int(rngs.carry.count[...]) == 2  # one key per carry array
  ones = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)).initialize_carry((2, 3), rngs, carry_init=nnx.initializers.ones)
  np.testing.assert_array_equal(ones, np.ones((2, 4)))
  half = nnx.LSTMCell(3, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert half.initialize_carry((2, 3), rngs)[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='RNGs must be provided'):
    cell.initialize_carry((2, 3))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    kept = nnx.LSTMCell(3, 4, keep_rngs=True, rngs=nnx.Rngs(0))
  assert kept.initialize_carry((2, 3))[0].shape == (2, 4)


# -- RNN --------------------------------------------------------------------------
def _loop(cell, x, carry=None):
  """The cell applied step by step in Python over axis 1 of x."""
  if carry is None:
    carry = cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
  ys = []
  for t in range(x.shape[1]):
    carry, y = cell(carry, x[:, t])
    ys.append(y)
  return carry, jnp.stack(ys, 1)


@pytest.mark.parametrize('make_cell', [nnx.LSTMCell, nnx.GRUCell])
def test_rnn_equals_a_python_loop(make_cell):
  cell = make_cell(3, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, 3))
  carry, y = nnx.RNN(cell, return_carry=True)(x)
  expected_carry, expected_y = _loop(cell, x)
  np.testing.assert_allclose(y, expected_y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), carry, expected_carry)


def test_rnn_time_major_initial_carry_and_no_batch():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, 3))
  h0 = _normal(2, (2, 4))
  expected = _loop(cell, x, h0)[1]
  y = nnx.RNN(cell, time_major=True)(jnp.swapaxes(x, 0, 1), initial_carry=h0)
  np.testing.assert_allclose(jnp.swapaxes(y, 0, 1), expected, atol=1e-5)
  single = nnx.RNN(cell)(x[0], initial_carry=h0[0])
  np.testing.assert_allclose(single, expected[0], atol=1e-5)


def test_flip_sequences_keeps_padding_at_the_end():
  inputs = jnp.array([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
  flipped = flip_sequences(inputs, jnp.array([1, 2, 3]), num_batch_dims=1, time_major=False)
  np.testing.assert_array_equal(flipped, [[1, 0, 0], [3, 2, 0], [6, 5, 4]])
  np.testing.assert_array_equal(flip_sequences(inputs, None, 1, False), inputs[:, ::-1])


def test_rnn_reverse_and_keep_order():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, 3))
  backwards = _loop(cell, x[:, ::-1])[1]
  np.testing.assert_allclose(nnx.RNN(cell, reverse=True)(x), backwards, atol=1e-5)
  np.testing.assert_allclose(nnx.RNN(cell)(x, reverse=True, keep_order=True), backwards[:, ::-1],
                             atol=1e-5)


def test_rnn_seq_lengths_select_the_last_valid_carry():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, 3))
  carry, y = nnx.RNN(cell)(x, seq_lengths=jnp.array([2, 5]), return_carry=True)
  np.testing.assert_allclose(carry[0], _loop(cell, x[:1, :2])[0][0], atol=1e-5)
  np.testing.assert_allclose(carry[1], y[1, -1], atol=1e-5)
  # reversed, the first sequence is read as x[0, 1], x[0, 0]: its padding stays unread
  carry, _ = nnx.RNN(cell, reverse=True)(x, seq_lengths=jnp.array([2, 5]), return_carry=True)
  np.testing.assert_allclose(carry[0], _loop(cell, x[:1, 1::-1])[0][0], atol=1e-5)


def test_rnn_rngs_stream_and_errors():
  rnn = nnx.RNN(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)))
  assert set(nnx.to_pure_dict(nnx.state(rnn))['rngs']) == {'key', 'count'}
  rnn(jnp.ones((2, 5, 3)))
  assert int(rnn.rngs.count[...]) == 2
  no_stream = nnx.RNN(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), rngs=False)
  with pytest.raises(ValueError, match='RNGs must be provided'):
    no_stream(jnp.ones((2, 5, 3)))
  assert no_stream(jnp.ones((2, 5, 3)), rngs=nnx.Rngs(1)).shape == (2, 5, 4)
  with pytest.raises(ValueError, match='rngs'):
    nnx.RNN(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), rngs=3)


class _Counting(nnx.RNNCellBase):
  """Adds a fresh uniform draw to a running sum and counts its steps."""

  def __init__(self, rngs):
    self.rngs = rngs
    self.steps = nnx.BatchStat(jnp.array(0))

  def __call__(self, carry, x):
    self.steps[...] += 1
    noise = jax.random.uniform(self.rngs.noise(), x.shape)
    return carry + noise, noise

  def initialize_carry(self, input_shape, rngs=None, carry_init=None):
    return jnp.zeros(input_shape)

  @property
  def num_feature_axes(self):
    return 1


def test_rnn_threads_cell_state_through_the_steps():
  cell = _Counting(nnx.Rngs(noise=0))
  noise = nnx.RNN(cell)(jnp.ones((1, 3, 1)))
  assert int(cell.steps[...]) == 3 and int(cell.rngs.noise.count[...]) == 3
  assert len(set(np.asarray(noise).ravel().tolist())) == 3


def test_rnn_broadcast_rngs_reuses_one_key_per_call():
  cell = _Counting(nnx.Rngs(noise=0))
  rnn = nnx.RNN(cell, broadcast_rngs='noise')
  first = rnn(jnp.ones((1, 3, 1)))
  assert len(set(np.asarray(first).ravel().tolist())) == 1
  assert int(cell.rngs.noise.count[...]) == 1 and int(cell.steps[...]) == 3
  second = rnn(jnp.ones((1, 3, 1)))
  assert int(cell.rngs.noise.count[...]) == 2 and not np.allclose(first, second)


def test_rnn_gradients_reach_every_parameter():
  rnn = nnx.RNN(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)))
  x = _normal(1, (2, 5, 3))
  graphdef, params, rest = nnx.split(rnn, nnx.Param, ...)

  def loss(params, rest):
    # the carry stream advances inside: a trace-local copy of the non-differentiated state
    return jnp.sum(nnx.merge(graphdef, params, nnx.clone(rest))(x) ** 2)

  grads = jax.jit(jax.grad(loss))(params, rest)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)


def test_rnn_inside_nnx_jit():
  rnn = nnx.RNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)))
  x = _normal(1, (2, 5, 3))
  expected = rnn(x)
  y = nnx.jit(lambda rnn, x: rnn(x))(rnn, x)
  np.testing.assert_allclose(y, expected, atol=1e-5)
  assert int(rnn.rngs.count[...]) == 2  # one carry key per call, also under jit


def test_rnn_dtype():
  # LSTMCell's default recurrent init draws in float32 then casts, so bfloat16 params work.
  cell = nnx.LSTMCell(3, 4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert cell.hi.kernel.dtype == jnp.bfloat16
  y = nnx.jit(lambda rnn, x: rnn(x))(nnx.RNN(cell), jnp.ones((2, 5, 3)))
  assert y.dtype == jnp.bfloat16


def test_bidirectional_merges_both_directions():
  forward = nnx.RNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)))
  backward = nnx.RNN(nnx.GRUCell(3, 2, rngs=nnx.Rngs(1)))
  x = _normal(1, (2, 5, 3))
  (carry_f, carry_b), y = nnx.Bidirectional(forward, backward)(x, return_carry=True)
  assert y.shape == (2, 5, 6)
  np.testing.assert_allclose(y[..., :4], _loop(forward.cell, x)[1], atol=1e-5)
  np.testing.assert_allclose(y[..., 4:], _loop(backward.cell, x[:, ::-1])[1][:, ::-1], atol=1e-5)
  np.testing.assert_allclose(carry_b, y[:, 0, 4:], atol=1e-5)
  summed = nnx.Bidirectional(forward, forward, merge_fn=jnp.add)
  with pytest.warns(UserWarning, match='share parameters'):
    assert summed(x).shape == (2, 5, 4)
  with pytest.raises(TypeError, match='rngs'):
    nnx.Bidirectional(forward, backward, rngs=3)


def test_rnn_state_axes_broadcast_params():
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, 3))
  rnn = nnx.RNN(cell, state_axes={nnx.Param: None, ...: nnx.Carry})
  assert isinstance(rnn.state_axes, nnx.StateAxes)
  np.testing.assert_allclose(rnn(x), _loop(cell, x)[1], atol=1e-5)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------

CELLS = [nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.SimpleCell, nnx.GRUCell]


def _one_step(cell, x):
  carry = cell.initialize_carry(x.shape, nnx.Rngs(0))
  return cell(carry, x)[1]


@pytest.mark.parametrize('cls', CELLS, ids=lambda c: c.__name__)
def test_cell_ensemble_under_vmap_stack_under_scan_and_time_scan(cls):
  x = _normal(7, (2, 3))
  check_ensemble(lambda rngs: cls(3, 3, rngs=rngs), x, n=2, apply=_one_step)
  check_scan_over_layers(lambda rngs: cls(3, 3, rngs=rngs), x, n=2, apply=_one_step)
  cell = cls(3, 2, rngs=nnx.Rngs(0))

  @nnx.jit
  @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def over_time(cell, carry, x):  # the cell broadcast, its carry threaded through time
    return cell(carry, x)

  xs = _normal(8, (4, 2, 3))
  carry0 = cell.initialize_carry((2, 3), nnx.Rngs(0))
  carry, ys = over_time(cell, carry0, xs)
  ref_carry, refs = carry0, []
  for x in xs:
    ref_carry, y = cell(ref_carry, x)
    refs.append(y)
  np.testing.assert_allclose(ys, np.stack(refs), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               carry, ref_carry)


def test_rnn_and_bidirectional_under_vmap_and_scan():
  seq = _normal(9, (2, 3, 3))
  rnn = lambda rngs: nnx.RNN(nnx.GRUCell(3, 3, rngs=rngs), rngs=rngs)  # noqa: E731
  check_ensemble(rnn, seq, n=2)
  check_scan_over_layers(rnn, seq, n=2)  # a stacked RNN: hidden features == input features
  bi = nnx.Bidirectional(nnx.RNN(nnx.SimpleCell(3, 2, rngs=nnx.Rngs(0))),
                         nnx.RNN(nnx.SimpleCell(3, 2, rngs=nnx.Rngs(1))))
  check_scan_broadcast(bi, seq[:, None])  # output features 4 != 3: scan over the batch instead
