"""Linear, LinearGeneral, Einsum and PReLU: parameters, maths, dtypes, gradients, jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_over_layers

X = jax.random.normal(jax.random.key(1), (2, 5, 3))
NORMAL = nnx.initializers.normal(1.0)


def first_params_key(seed=0):
  # Rngs(seed).params() is the first key of the default stream: fold_in(key(seed), count=0).
  return jax.random.fold_in(jax.random.key(seed), 0)


def param_grads(model, loss_of_output, *args):
  """Gradients of a loss with respect to every Param, through split/merge and jax.grad."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, nnx.clone(rest))
    return loss_of_output(m(*args))

  return jax.grad(loss)(params)


def assert_all_nonzero(grads):
  leaves = jax.tree.leaves(grads)
  assert leaves
  for g in leaves:
    assert float(jnp.abs(g).sum()) > 0


# -- Linear ---------------------------------------------------------------------
def test_linear_parameters_are_named_kernel_and_bias():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  state = nnx.state(layer)
  assert set(state) == {'kernel', 'bias'}
  assert type(layer.kernel) is nnx.Param and type(layer.bias) is nnx.Param
  assert layer.kernel.shape == (3, 4) and layer.bias.shape == (4,)
  assert (layer.in_features, layer.out_features, layer.use_bias) == (3, 4, True)


def test_linear_default_initialisation_is_lecun_normal_kernel_and_zero_bias():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  expected = jax.nn.initializers.lecun_normal()(first_params_key(), (3, 4))
  np.testing.assert_allclose(layer.kernel[...], expected, rtol=1e-6)
  np.testing.assert_array_equal(layer.bias[...], np.zeros(4))


def test_linear_computes_x_times_kernel_plus_bias():
  layer = nnx.Linear(3, 4, bias_init=NORMAL, rngs=nnx.Rngs(0))
  expected = jnp.einsum('bti,io->bto', X, layer.kernel[...]) + layer.bias[...]
  np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-6)


def test_linear_without_bias():
  layer = nnx.Linear(3, 4, use_bias=False, rngs=nnx.Rngs(0))
  assert layer.bias is None and set(nnx.state(layer)) == {'kernel'}
  np.testing.assert_allclose(layer(X), X @ layer.kernel[...], rtol=1e-5, atol=1e-6)


def test_linear_custom_initializers_receive_shape_and_param_dtype():
  seen = []

  def init(key, shape, dtype):
    seen.append((shape, dtype))
    return jnp.full(shape, 2.0, dtype)

  layer = nnx.Linear(3, 4, kernel_init=init, bias_init=init, param_dtype=jnp.float16,
                     rngs=nnx.Rngs(0))
  assert seen == [((3, 4), jnp.float16), ((4,), jnp.float16)]
  assert layer.kernel.dtype == jnp.float16


@pytest.mark.parametrize('dtype, param_dtype, x_dtype, out_dtype', [
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
    (None, jnp.bfloat16, jnp.float32, jnp.float32),
    (None, jnp.float32, jnp.int32, jnp.float32),
])
def test_linear_dtypes(dtype, param_dtype, x_dtype, out_dtype):
  layer = nnx.Linear(3, 4, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  assert layer.kernel.dtype == param_dtype and layer.bias.dtype == param_dtype
  assert layer(jnp.ones((2, 3), x_dtype)).dtype == out_dtype


def test_linear_metadata_is_attached_to_the_params():
  layer = nnx.Linear(3, 4, kernel_metadata={'note': 'k'}, bias_metadata={'note': 'b'},
                     rngs=nnx.Rngs(0))
  assert layer.kernel.get_metadata('note') == 'k' and layer.bias.note == 'b'


def test_linear_uses_the_given_dot_general_and_precision():
  calls = []

  def dot_general(x, k, dims, precision=None, preferred_element_type=None):
    calls.append(precision)
    return jax.lax.dot_general(x, k, dims, precision=precision)

  layer = nnx.Linear(3, 4, dot_general=dot_general, precision=jax.lax.Precision.HIGHEST,
                     rngs=nnx.Rngs(0))
  layer(X)
  assert calls == [jax.lax.Precision.HIGHEST]


def test_linear_params_come_from_the_params_stream():
  a = nnx.Linear(3, 4, rngs=nnx.Rngs(params=7, default=0))
  b = nnx.Linear(3, 4, rngs=nnx.Rngs(7))
  np.testing.assert_array_equal(a.kernel[...], b.kernel[...])


def test_linear_gradients_reach_kernel_and_bias():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  grads = param_grads(layer, lambda y: jnp.sum(y ** 2), X)
  assert set(grads) == {'kernel', 'bias'}
  assert_all_nonzero(grads)
  # d sum(y^2) / d bias = 2 * (sum of y over the batch axes); / d kernel = 2 x^T y.
  y = layer(X)
  np.testing.assert_allclose(grads['bias'][...], 2 * y.sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(grads['kernel'][...], 2 * jnp.einsum('bti,bto->io', X, y),
                             rtol=1e-4, atol=1e-5)


def test_linear_inside_jit_and_wrong_input_size():
  layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  y = nnx.jit(lambda m, x: m(x))(layer, X)
  np.testing.assert_allclose(y, layer(X), rtol=1e-6)
  with pytest.raises(TypeError):
    layer(jnp.ones((2, 5)))


# -- LinearGeneral --------------------------------------------------------------
def test_linear_general_contracts_several_axes():
  layer = nnx.LinearGeneral((5, 3), (4, 2), axis=(-2, -1), bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (5, 3, 4, 2) and layer.bias.shape == (4, 2)
  assert layer.in_features == (5, 3) and layer.axis == (-2, -1)
  expected = jnp.einsum('bti,tiof->bof', X, layer.kernel[...]) + layer.bias[...]
  np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-5)


def test_linear_general_on_a_leading_axis_keeps_the_others_in_order():
  layer = nnx.LinearGeneral(2, 6, axis=0, rngs=nnx.Rngs(0))
  y = layer(X)
  assert y.shape == (5, 3, 6)
  np.testing.assert_allclose(y, jnp.einsum('bti,bo->tio', X, layer.kernel[...]), rtol=1e-5,
                             atol=1e-6)


def test_linear_general_batch_axis_gives_each_item_its_own_kernel():
  layer = nnx.LinearGeneral(3, (4, 2), batch_axis={0: 2}, bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (2, 3, 4, 2) and layer.bias.shape == (2, 4, 2)
  expected = (jnp.einsum('bti,biof->btof', X, layer.kernel[...])
              + layer.bias[...][:, None])
  np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-5)


def test_linear_general_initialises_the_flattened_matrix():
  # Variance scaling sees fan_in = prod(in_features), as for the equivalent Linear.
  layer = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
  flat = jax.nn.initializers.lecun_normal()(first_params_key(), (6, 4))
  np.testing.assert_allclose(layer.kernel[...], flat.reshape(2, 3, 4), rtol=1e-6)


def test_linear_general_rejects_non_leading_batch_axes():
  with pytest.raises(ValueError, match='batch_axis'):
    nnx.LinearGeneral(3, 4, batch_axis={1: 5}, rngs=nnx.Rngs(0))


def test_linear_general_rejects_axis_and_features_of_different_lengths():
  with pytest.raises(ValueError, match='axis'):
    nnx.LinearGeneral((2, 3), 4, axis=-1, rngs=nnx.Rngs(0))


def test_linear_general_gradients_and_jit():
  layer = nnx.LinearGeneral((5, 3), 4, axis=(1, 2), rngs=nnx.Rngs(0))
  assert_all_nonzero(param_grads(layer, lambda y: jnp.sum(y ** 2), X))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, X), layer(X), rtol=1e-6)


def test_linear_general_batched_kernel_is_one_flat_matrix_of_all_input_axes():
  # The initializer sees (batch * fan_in, fan_out): an orthogonal init gives orthonormal
  # columns across the batch items together, not one orthogonal matrix per item.
  shapes = []

  def recording_bias_init(key, shape, dtype):
    shapes.append(shape)
    return jnp.arange(np.prod(shape), dtype=dtype)

  layer = nnx.LinearGeneral((3, 2), 4, axis=(1, 2), batch_axis={0: 2},
                            kernel_init=nnx.initializers.orthogonal(),
                            bias_init=recording_bias_init, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (2, 3, 2, 4) and layer.bias.shape == (2, 4)
  flat = np.asarray(layer.kernel[...]).reshape(12, 4)
  np.testing.assert_allclose(flat.T @ flat, np.eye(4), atol=1e-5)
  assert shapes == [(8,)]
  np.testing.assert_array_equal(layer.bias[...], np.arange(8.0).reshape(2, 4))


def test_linear_general_keeps_the_metadata_of_a_partitioned_initializer():
  with nnx.use_eager_sharding(False):
    layer = nnx.LinearGeneral(
        (2, 3), 4, axis=(-2, -1),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, 'model')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ('model',)),
        rngs=nnx.Rngs(0))
  assert type(layer.kernel) is nnx.Param and layer.kernel.shape == (2, 3, 4)
  assert layer.kernel.out_sharding == (None, None, 'model')
  assert layer.bias.out_sharding == ('model',)


def test_linear_general_dot_general_cls_is_preferred_over_dot_general():
  calls = []

  class Recording:
    def __call__(self, *args, **kwargs):
      calls.append('cls')
      return jax.lax.dot_general(*args, **kwargs)

  def plain(*args, **kwargs):
    calls.append('fn')
    return jax.lax.dot_general(*args, **kwargs)

  layer = nnx.LinearGeneral(3, 4, dot_general=plain, dot_general_cls=Recording,
                            rngs=nnx.Rngs(0))
  layer(X)
  assert calls == ['cls']


@pytest.mark.parametrize('make', [
    lambda dg, **kw: nnx.Linear(3, 4, dot_general=dg, rngs=nnx.Rngs(0), **kw),
    lambda dg, **kw: nnx.LinearGeneral(3, 4, dot_general=dg, rngs=nnx.Rngs(0), **kw),
])
def test_custom_dot_general_gets_optional_keywords_only_when_set(make):
  # A hand-written contraction need not know about out_sharding or preferred_element_type.
  def minimal(lhs, rhs, dimension_numbers, precision=None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)

  assert make(minimal)(X).shape == (2, 5, 4)
  seen = {}

  def recording(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    seen.update(kwargs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)

  y = make(recording, dtype=jnp.bfloat16, preferred_element_type=jnp.float32)(X)
  assert seen == {'preferred_element_type': jnp.float32} and y.dtype == jnp.float32


# -- Einsum ---------------------------------------------------------------------
def test_einsum_matches_jnp_einsum_with_bias_on_kernel_axes():
  layer = nnx.Einsum('bti,ihd->bhtd', (3, 4, 2), (4, 2), bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert set(nnx.state(layer)) == {'kernel', 'bias'} and layer.kernel.shape == (3, 4, 2)
  expected = (jnp.einsum('bti,ihd->bhtd', X, layer.kernel[...])
              + layer.bias[...][None, :, None, :])
  np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-5)


def test_einsum_without_bias_and_with_a_call_time_equation():
  layer = nnx.Einsum('bti,ihd->bthd', (3, 4, 2), rngs=nnx.Rngs(0))
  assert layer.bias is None
  np.testing.assert_allclose(layer(X, 'bti,ihd->bhd'),
                             jnp.einsum('bti,ihd->bhd', X, layer.kernel[...]), rtol=1e-5,
                             atol=1e-5)


def test_einsum_spaces_are_ignored():
  assert nnx.Einsum('b t i, i d -> b t d', (3, 2), rngs=nnx.Rngs(0)).einsum_str == 'bti,id->btd'


@pytest.mark.parametrize('bad', ['bti->bt', 'bti,id,dk->btk'])
def test_einsum_needs_exactly_two_operands(bad):
  with pytest.raises(ValueError, match='comma'):
    nnx.Einsum(bad, (3, 2), rngs=nnx.Rngs(0))


def test_einsum_gradients_and_jit():
  layer = nnx.Einsum('bti,id->btd', (3, 2), (2,), rngs=nnx.Rngs(0))
  assert_all_nonzero(param_grads(layer, lambda y: jnp.sum(y ** 2), X))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, X), layer(X), rtol=1e-6)


def test_einsum_bias_follows_kernel_axes_spelled_by_an_ellipsis():
  # '...' stands for the same axes in both operands; the bias lies over the output axes that
  # come from the kernel, here the two hidden by the kernel's '...' and 'c'.
  x = jax.random.normal(jax.random.key(2), (8, 6, 7, 3, 4))
  layer = nnx.Einsum('d...ab,bc...->ad...c', (4, 5, 6, 7), (6, 7, 5), bias_init=NORMAL,
                     rngs=nnx.Rngs(0))
  y = layer(x)
  assert y.shape == (3, 8, 6, 7, 5)
  # The (6, 7, 5) bias lies over output axes 2, 3 and 4.
  expected = jnp.einsum('d...ab,bc...->ad...c', x, layer.kernel[...]) + layer.bias[...]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_einsum_shorter_input_ellipsis_lines_up_with_the_kernel_ones_on_the_right():
  x = jax.random.normal(jax.random.key(2), (2, 3, 4))
  layer = nnx.Einsum('...i,i...->...', (4, 5, 2, 3), (5, 2, 3), bias_init=NORMAL,
                     rngs=nnx.Rngs(0))
  y = layer(x)
  assert y.shape == (5, 2, 3)
  np.testing.assert_allclose(y, jnp.einsum('...i,i...->...', x, layer.kernel[...])
                             + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_einsum_bias_shape_may_be_an_int():
  layer = nnx.Einsum('ik,kj->ij', (5, 4), 4, bias_init=NORMAL, rngs=nnx.Rngs(0))
  assert layer.bias.shape == (4,) and layer.bias_shape == 4
  x = jnp.ones((2, 5))
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-6)


def test_einsum_op_gets_preferred_element_type_only_when_set():
  def minimal(equation, a, b, precision=None):
    return jnp.einsum(equation, a, b, precision=precision)

  layer = nnx.Einsum('bti,id->btd', (3, 2), (2,), einsum_op=minimal, rngs=nnx.Rngs(0))
  assert layer(X).shape == (2, 5, 2)


# -- PReLU ----------------------------------------------------------------------
def test_prelu_scales_negative_inputs_by_a_learned_slope():
  layer = nnx.PReLU(0.25)
  assert set(nnx.state(layer)) == {'negative_slope'}
  assert layer.negative_slope.shape == () and layer.negative_slope.dtype == jnp.float32
  x = jnp.array([-4.0, -1.0, 0.0, 3.0])
  np.testing.assert_allclose(layer(x), [-1.0, -0.25, 0.0, 3.0])
  assert nnx.PReLU()(jnp.array([-1.0])).tolist() == pytest.approx([-0.01])


def test_prelu_slope_gradient_is_the_sum_of_negative_inputs():
  layer = nnx.PReLU(0.1)
  x = jnp.array([-2.0, -3.0, 5.0])
  g = param_grads(layer, jnp.sum, x)['negative_slope'][...]
  assert float(g) == pytest.approx(-5.0)


def test_prelu_dtype():
  assert nnx.PReLU(dtype=jnp.bfloat16)(jnp.ones(2)).dtype == jnp.bfloat16
  assert nnx.PReLU(param_dtype=jnp.float16).negative_slope.dtype == jnp.float16


def test_prelu_without_dtype_computes_in_the_input_dtype():
  # The float32 slope is cast to the input's dtype first, so a float16 input stays float16
  # and its products are rounded as float16 products.
  x = jnp.linspace(-10, 10, 20, dtype=jnp.float16)
  y = nnx.PReLU(0.02)(x)
  assert y.dtype == jnp.float16
  np.testing.assert_array_equal(y, jnp.where(x >= 0, x, jnp.float16(0.02) * x))


# -- with nnx.vmap ----------------------------------------------------------------
def test_vmapped_ensemble_of_linears():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return nnx.Linear(3, 4, rngs=rngs)

  ensemble = create(nnx.Rngs(0))
  assert ensemble.kernel.shape == (3, 3, 4) and ensemble.bias.shape == (3, 4)
  assert not np.allclose(ensemble.kernel[...][0], ensemble.kernel[...][1])
  x = X[:, :3].reshape(2, 3, 3).transpose(1, 0, 2)          # one (2, 3) batch per member
  y = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(ensemble, x)
  expected = jnp.einsum('ebi,eio->ebo', x, ensemble.kernel[...]) + ensemble.bias[...][:, None]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------

SAME_SHAPE_LAYERS = {
    'Linear': lambda rngs: nnx.Linear(3, 3, rngs=rngs),
    'LinearGeneral': lambda rngs: nnx.LinearGeneral(3, (3,), rngs=rngs),
    'Einsum': lambda rngs: nnx.Einsum('bi,io->bo', (3, 3), (3,), rngs=rngs),
    'PReLU': lambda rngs: nnx.PReLU(negative_slope_init=0.2),
}


@pytest.mark.parametrize('name', list(SAME_SHAPE_LAYERS))
def test_ensemble_under_vmap_and_stack_under_scan(name):
  x = jax.random.normal(jax.random.key(3), (2, 3))
  layers = check_ensemble(SAME_SHAPE_LAYERS[name], x, n=2)
  if name != 'PReLU':  # PReLU has no random init: its members are identical by design
    assert not np.allclose(layers.kernel[0], layers.kernel[1])
  check_scan_over_layers(SAME_SHAPE_LAYERS[name], x, n=3)
