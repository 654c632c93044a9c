"""Capturing intermediate values, and their gradients, with ``nnx.capture``.

    .venv/bin/python examples/capture_intermediates.py

A Module marks values worth looking at with ``self.sow(nnx.Intermediate, name, value)``
and values whose *gradient* is worth looking at with ``x = self.perturb(name, x)``.
Wrap the call in ``nnx.capture``, which runs it and also returns what was
sown / perturbed as a ``State`` laid out like the model::

    out, intermediates = nnx.capture(model, nnx.Intermediate)(x)
    intermediates['block']['features']          # a tuple: one entry per sow call

A kind that is not captured is dropped (``sow`` returns False). Outside any
capture, ``sow`` and ``perturb`` store into Module attributes instead, which NNX
deprecates (and where a name taken by a method or layer is a ValueError).

Use it to log activations (feature norms, attention maps) or to debug a model
without changing what ``__call__`` returns. The captured values are ordinary state
while the call runs, so capture works inside ``nnx.jit`` (and ``nnx.grad``,
``nnx.vmap``, ...) like any other Module state.

Gradients of intermediates take two steps:

1. ``nnx.capture(model, nnx.Perturbation)`` runs once to create zero perturbations,
   one per ``perturb`` call, with the shapes of the values they are added to.
2. A loss that runs the model under ``nnx.capture(..., init=perturbations)`` adds
   them to those values; differentiating with respect to the perturbations gives
   ``d loss / d intermediate`` (adding zero changes nothing, so the loss is the same).

This script:

1. sows the hidden features of an MLP (``reduce_fn`` keeps a running sum across
   two calls, the default appends to a tuple), captured inside ``nnx.jit``;
2. captures outputs of every method automatically with ``method_outputs=``;
3. computes the gradient of the loss with respect to the hidden activation, and
   checks it against the chain rule written by hand.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import arbax as nnx


class MLP(nnx.Module):
  """``hidden -> relu -> out``; sows the features and perturbs the pre-activation."""

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
    self.out = nnx.Linear(dhidden, dout, rngs=rngs)

  def features(self, x):
    h = self.perturb('pre_activation', self.hidden(x))  # h + 0: its gradient is d loss / d h
    features = nnx.relu(h)
    # Not 'features': with method_outputs= (section 2) that name holds the method's output.
    self.sow(nnx.Intermediate, 'hidden_features', features)  # appended to a tuple
    # A custom reduce_fn: keep a running sum of the feature norms instead of a tuple.
    self.sow(nnx.Intermediate, 'norm_sum', jnp.linalg.norm(features),
             reduce_fn=lambda total, v: total + v, init_fn=lambda: 0.0)
    return features

  def __call__(self, x):
    return self.out(self.features(x))


def sow_inside_jit(model: MLP, x: jax.Array) -> dict:
  """1. Capture what ``sow`` records while the model runs twice inside ``nnx.jit``."""

  def apply_twice(model, x):  # din == dout, so the model can run on its own output
    return model(model(x))

  @nnx.jit
  def forward(model, x):
    return nnx.capture(apply_twice, nnx.Intermediate)(model, x)

  y, intermediates = forward(model, x)
  features = intermediates['hidden_features']
  norms = [float(jnp.linalg.norm(f)) for f in features]
  norm_sum = float(intermediates['norm_sum'][...])
  print(f'sown: {sorted(intermediates.keys())}; features: {len(features)} calls, '
        f'shapes {[f.shape for f in features]}')
  print(f'norm_sum = {norm_sum:.4f} (sum of the per-call norms {sum(norms):.4f})')
  # Capture changes neither the output nor the model: nothing sown is left on it.
  def by_hand(x):
    return model.out(nnx.relu(model.hidden(x)))

  same_output = bool(jnp.allclose(y, by_hand(by_hand(x))))
  left_on_model = len(nnx.state(model, nnx.Intermediate))
  print(f'same output as without capture: {same_output}; Intermediate state left on the '
        f'model: {left_on_model}')
  return {'same_output': same_output, 'n_features': len(features),
          'feature_shape': features[0].shape, 'norm_sum': norm_sum, 'norms': norms,
          'left_on_model': left_on_model}


def method_outputs(model: MLP, x: jax.Array) -> dict:
  """2. Every method's output, without writing any ``sow`` call."""
  y, outputs = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
  names = sorted(outputs.keys())
  print(f'method outputs: {names}; hidden Linear: {sorted(outputs["hidden"].keys())}')
  return {'names': names, 'call_matches': bool(jnp.allclose(outputs['__call__'][0], y)),
          'hidden_shape': outputs['hidden']['__call__'][0].shape}


def intermediate_gradient(model: MLP, x: jax.Array, target: jax.Array) -> dict:
  """3. d loss / d (pre-activation), via perturbations, inside ``nnx.jit``."""
  _, perturbations = nnx.capture(model, nnx.Perturbation)(x)
  zeros = perturbations['pre_activation'][...]
  print(f'perturbation created: pre_activation {zeros.shape}, all zero: {not zeros.any()}')

  def loss_fn(model, perturbations, x, target):
    y, features = nnx.capture(model, nnx.Intermediate, init=perturbations)(x)
    return jnp.mean((y - target) ** 2), features

  @nnx.jit
  def grads_of(model, perturbations, x, target):
    grad_fn = nnx.grad(loss_fn, argnums=(0, 1), has_aux=True)
    (param_grads, d_intermediates), features = grad_fn(model, perturbations, x, target)
    return param_grads, d_intermediates, features

  param_grads, d_intermediates, features = grads_of(model, perturbations, x, target)
  d_h = d_intermediates['pre_activation'][...]

  # The same gradient by hand: loss = mean((relu(h) @ W + b - t)^2).
  h = model.hidden(x)
  y = model.out(nnx.relu(h))
  d_y = 2 * (y - target) / y.size
  by_hand = (d_y @ model.out.kernel[...].T) * (h > 0)
  gap = float(jnp.max(jnp.abs(d_h - by_hand)))
  # The perturbation gradient also gives the parameter gradient of the layer below it.
  kernel_gap = float(jnp.max(jnp.abs(param_grads['hidden']['kernel'][...] - x.T @ d_h)))
  print(f'd loss / d pre_activation: shape {d_h.shape}, max |perturb - by hand| = {gap:.2e}; '
        f'hidden kernel grad from it: gap {kernel_gap:.2e}')
  return {'gap': gap, 'kernel_gap': kernel_gap, 'shape': d_h.shape,
          'features_sown': len(features['hidden_features'])}


def main(argv=None) -> dict:
  del argv
  model = MLP(3, 8, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3))
  target = jax.random.normal(jax.random.key(2), (4, 3))
  return {'sow': sow_inside_jit(model, x), 'methods': method_outputs(model, x),
          'grad': intermediate_gradient(model, x, target)}


if __name__ == '__main__':
  main()
