"""Model surgery: replace layers, load and rename weights, freeze parts of a model.

    .venv/bin/python examples/model_surgery.py

Model surgery is changing a built model: swapping a layer for another, loading
weights that were saved under other names (or only some of them), training only
part of the parameters. In NNX a model is a plain Python object and its weights
are a ``State`` (a nested mapping of Variables), so surgery is ordinary Python on
one or the other:

* **Replace a submodule** by assigning an attribute: ``model.linear1 = new_layer``.
  Copy weights into the new layer with ``nnx.update(new_layer, nnx.state(old))``;
  ``update`` sets only the Variables the State names, so a State holding a
  subset of the weights loads just those.
* **Freeze with a filter**: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
  ``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))`` touch only the
  Variables the filter selects; the rest keep their values.
* **Abstract model**: ``nnx.eval_shape(lambda: Model(...))`` builds the model with
  shapes only (no memory, no random numbers), the skeleton to load a checkpoint
  into; ``nnx.split`` gives its ``graphdef`` and ``state``, ``nnx.merge`` builds
  the real model once the state holds arrays.
* **Rename checkpoint keys**: ``nnx.traversals.flatten_mapping`` turns nested
  dicts into ``{path tuple: array}`` (``sep='/'`` for ``'a/b'`` strings), where
  renaming is a dict comprehension; ``unflatten_mapping`` nests them again and
  ``nnx.replace_by_pure_dict`` pours them into the abstract state.
* **Per-Variable settings** with ``nnx.prefix(model, {filter: value, ...: default})``:
  a tree shaped like the model with one value per Variable, e.g. the ``in_axes``
  of ``nnx.vmap`` to evaluate several candidate heads at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import arbax as nnx


class TwoLayerMLP(nnx.Module):

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(dim, dim, rngs=rngs)
    self.linear2 = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.linear1(x)))


def replace_submodule(model: TwoLayerMLP, x: jax.Array) -> dict:
  """1. Swap ``linear1`` for a LoRA layer that starts with the same weights."""
  before = model(x)
  old = model.linear1
  model.linear1 = nnx.LoRALinear(old.in_features, old.out_features, lora_rank=2,
                                 rngs=nnx.Rngs(1))
  nnx.update(model.linear1, nnx.state(old))  # kernel and bias; the LoRA factors stay
  # lora_b starts at zero, so the new layer computes exactly what the old one did.
  gap = float(jnp.max(jnp.abs(model(x) - before)))
  paths = sorted('/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model)))
  print(f'after surgery: {paths}; output gap {gap:.1e}')
  return {'gap': gap, 'paths': paths}


def finetune_lora_only(model: TwoLayerMLP, x: jax.Array, y: jax.Array, steps: int) -> dict:
  """2. Freeze everything but the LoRA factors: the filter decides what trains."""
  frozen_before = nnx.state(model, nnx.Not(nnx.LoRAParam))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
  frozen_after = nnx.state(model, nnx.Not(nnx.LoRAParam))
  frozen_moved = max(float(jnp.max(jnp.abs(a - b)))
                     for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)))
  lora_b = float(jnp.max(jnp.abs(model.linear1.lora.lora_b[...])))
  print(f'LoRA-only fine-tuning: loss {losses[0]:.4f} -> {losses[-1]:.4f}; frozen weights moved '
        f'{frozen_moved:.1e}; |lora_b| max {lora_b:.3f}')
  return {'losses': losses, 'frozen_moved': frozen_moved, 'lora_b': lora_b}


def load_renamed_checkpoint(dim: int, x: jax.Array) -> dict:
  """3. Load weights saved by another codebase, under other names, into an abstract model."""
  # The "checkpoint": flat 'layer/weight' keys, as another library might write them.
  rng = np.random.default_rng(0)
  checkpoint = {'fc_in/w': rng.normal(size=(dim, dim)), 'fc_in/b': np.zeros(dim),
                'fc_out/w': rng.normal(size=(dim, dim)), 'fc_out/b': np.ones(dim)}
  renames = {'fc_in': 'linear1', 'fc_out': 'linear2', 'w': 'kernel', 'b': 'bias'}

  # Shapes only: building the model this way allocates no arrays.
  abstract = nnx.eval_shape(lambda: TwoLayerMLP(dim, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  kernel = state['linear1']['kernel'].get_value()
  print(f'abstract kernel: {type(kernel).__name__} {kernel.shape}')

  nested = nnx.traversals.unflatten_mapping(checkpoint, sep='/')
  renamed = {tuple(renames[k] for k in path): jnp.asarray(v, jnp.float32)
             for path, v in nnx.traversals.flatten_mapping(nested).items()}
  nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(renamed))
  model = nnx.merge(graphdef, state)

  expected = np.maximum(np.asarray(x) @ checkpoint['fc_in/w'], 0) @ checkpoint['fc_out/w'] + 1
  gap = float(np.max(np.abs(np.asarray(model(x)) - expected)))
  print(f'loaded {sorted(renamed)} -> output gap vs numpy {gap:.1e}')
  return {'abstract_is_shape': isinstance(kernel, jax.ShapeDtypeStruct), 'gap': gap,
          'model': model}


def load_subset(model: TwoLayerMLP, donor: TwoLayerMLP) -> dict:
  """4. Take only ``linear2`` from another model: a State with a subset of the paths."""
  linear1_before = nnx.state(model.linear1)
  subset = nnx.state(donor, nnx.PathContains('linear2'))
  nnx.update(model, subset)
  copied = bool(jnp.array_equal(model.linear2.kernel[...], donor.linear2.kernel[...]))
  kept = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(linear1_before),
                                                          jax.tree.leaves(nnx.state(model.linear1))))
  print(f'loaded {sorted(subset.keys())} only: linear2 copied {copied}, linear1 kept {kept}')
  return {'copied': copied, 'kept': kept}


def evaluate_candidate_heads(model: TwoLayerMLP, x: jax.Array, heads: int) -> dict:
  """5. Put a stack of candidate ``linear2`` heads in the model and evaluate all at once."""

  @nnx.vmap(in_axes=0, out_axes=0)
  def make_heads(rngs):
    return nnx.Linear(model.linear2.in_features, model.linear2.out_features, rngs=rngs)

  model.linear2 = make_heads(nnx.Rngs(7).split(heads))
  # One vmap axis per Variable: 0 for the stacked head, None (shared) for the rest.
  axes = nnx.prefix(model, {nnx.PathContains('linear2'): 0, ...: None}, graph=False)
  print(f'vmap axes: linear1.kernel -> {axes.linear1.kernel}, linear2.kernel -> '
        f'{axes.linear2.kernel}')

  @nnx.vmap(in_axes=(axes, None), out_axes=0, graph=False)
  def forward(model, x):
    return model(x)

  ys = forward(model, x)
  # Head 1 alone, by hand: the same as row 1 of the vmapped result.
  hidden = nnx.relu(model.linear1(x))
  head_1 = hidden @ model.linear2.kernel[...][1] + model.linear2.bias[...][1]
  gap = float(jnp.max(jnp.abs(ys[1] - head_1)))
  print(f'{heads} heads evaluated together: outputs {ys.shape}, head 1 gap {gap:.1e}')
  return {'shape': ys.shape, 'gap': gap, 'axes': (axes.linear1.kernel, axes.linear2.kernel)}


def main(argv=None) -> dict:
  del argv
  dim = 4
  x = jax.random.normal(jax.random.key(0), (8, dim))
  y = jnp.sin(x)
  model = TwoLayerMLP(dim, rngs=nnx.Rngs(0))
  result = {'replace': replace_submodule(model, x),
            'finetune': finetune_lora_only(model, x, y, steps=20)}
  loaded = load_renamed_checkpoint(dim, x)
  result['checkpoint'] = {k: v for k, v in loaded.items() if k != 'model'}
  result['subset'] = load_subset(TwoLayerMLP(dim, rngs=nnx.Rngs(3)), loaded['model'])
  result['heads'] = evaluate_candidate_heads(TwoLayerMLP(dim, rngs=nnx.Rngs(4)), x, heads=3)
  return result


if __name__ == '__main__':
  main()
