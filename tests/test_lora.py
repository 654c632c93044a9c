"""LoRA, LoRALinear and LoRAParam."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx
from tests.layer_transforms import check_ensemble, check_scan_over_layers

X = jax.random.normal(jax.random.key(1), (2, 5, 3))
NORMAL = nnx.initializers.normal(1.0)


def test_lora_param_is_a_param():
  assert issubclass(nnx.LoRAParam, nnx.Param)


def test_lora_parameters_and_initialisation():
  lora = nnx.LoRA(3, 2, 4, rngs=nnx.Rngs(0))
  assert set(nnx.state(lora)) == {'lora_a', 'lora_b'}
  assert type(lora.lora_a) is nnx.LoRAParam and lora.lora_a.shape == (3, 2)
  assert lora.lora_b.shape == (2, 4)
  np.testing.assert_array_equal(lora.lora_b[...], np.zeros((2, 4)))
  key = jax.random.fold_in(jax.random.key(0), 0)
  np.testing.assert_allclose(lora.lora_a[...], jax.nn.initializers.he_uniform()(key, (3, 2)),
                             rtol=1e-6)


def test_lora_computes_the_low_rank_product():
  lora = nnx.LoRA(3, 2, 4, b_initializer=NORMAL, rngs=nnx.Rngs(0))
  expected = X @ lora.lora_a[...] @ lora.lora_b[...]
  np.testing.assert_allclose(lora(X), expected, rtol=1e-5, atol=1e-6)


def test_lora_adds_the_base_module_and_passes_keywords_on():
  base = nnx.Linear(3, 4, rngs=nnx.Rngs(5))
  lora = nnx.LoRA(3, 2, 4, base_module=base, b_initializer=NORMAL, rngs=nnx.Rngs(0))
  assert set(nnx.state(lora)) == {'base_module', 'lora_a', 'lora_b'}
  np.testing.assert_allclose(lora(X), base(X) + X @ lora.lora_a[...] @ lora.lora_b[...],
                             rtol=1e-5, atol=1e-5)
  seen = {}

  def base_fn(x, **kwargs):
    seen.update(kwargs)
    return jnp.zeros(x.shape[:-1] + (4,))

  nnx.LoRA(3, 2, 4, base_module=base_fn, rngs=nnx.Rngs(0))(X, flag=True)
  assert seen == {'flag': True}


def test_lora_linear_starts_equal_to_its_linear():
  layer = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
  assert isinstance(layer, nnx.Linear)
  assert set(nnx.state(layer)) == {'kernel', 'bias', 'lora'}
  plain = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])
  np.testing.assert_allclose(layer(X), plain(X), rtol=1e-6)


def test_lora_linear_output_with_a_trained_adapter():
  layer = nnx.LoRALinear(3, 4, lora_rank=2, b_initializer=NORMAL, use_bias=False,
                         rngs=nnx.Rngs(0))
  assert layer.bias is None
  expected = X @ layer.kernel[...] + X @ layer.lora.lora_a[...] @ layer.lora.lora_b[...]
  np.testing.assert_allclose(layer(X), expected, rtol=1e-5, atol=1e-5)


def test_filtering_by_lora_param_selects_only_the_adapter():
  layer = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
  lora_state = nnx.state(layer, nnx.LoRAParam)
  assert set(lora_state) == {'lora'} and set(lora_state['lora']) == {'lora_a', 'lora_b'}
  assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == 4


def test_gradients_reach_the_adapter_when_training_it_alone():
  layer = nnx.LoRALinear(3, 4, lora_rank=2, b_initializer=NORMAL, rngs=nnx.Rngs(0))
  graphdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)

  def loss(lora):
    return jnp.sum(nnx.merge(graphdef, lora, rest)(X) ** 2)

  grads = jax.grad(loss)(lora)
  assert set(grads['lora']) == {'lora_a', 'lora_b'}
  for g in jax.tree.leaves(grads):
    assert float(jnp.abs(g).sum()) > 0


def test_dtypes_and_custom_param_type():
  class Adapter(nnx.Param):
    pass

  lora = nnx.LoRA(3, 2, 4, lora_param_type=Adapter, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert type(lora.lora_a) is Adapter and lora.lora_a.dtype == jnp.bfloat16
  assert lora(X).dtype == jnp.float32
  assert nnx.LoRA(3, 2, 4, dtype=jnp.float16, rngs=nnx.Rngs(0))(X).dtype == jnp.float16
  layer = nnx.LoRALinear(3, 4, lora_rank=2, lora_param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.lora.lora_b.dtype == jnp.bfloat16 and layer.kernel.dtype == jnp.float32


def test_lora_linear_inside_jit():
  layer = nnx.LoRALinear(3, 4, lora_rank=2, b_initializer=NORMAL, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, X), layer(X), rtol=1e-5,
                             atol=1e-6)


# -- inside nnx.vmap / nnx.scan / nnx.jit ----------------------------------------


@pytest.mark.parametrize('make', [
    lambda rngs: nnx.LoRA(3, 2, 3, b_initializer=nnx.initializers.normal(1.0), rngs=rngs),
    lambda rngs: nnx.LoRALinear(3, 3, lora_rank=2, rngs=rngs),
], ids=['LoRA', 'LoRALinear'])
def test_ensemble_under_vmap_and_stack_under_scan(make):
  x = jax.random.normal(jax.random.key(3), (2, 3))
  check_ensemble(make, x, n=2)
  check_scan_over_layers(make, x, n=3)
