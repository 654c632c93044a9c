"""Hijax Variables under JAX's own transforms: jit, vmap, scan, fori_loop, and NNX's vmap / scan.

    .venv/bin/python examples/hijax_transforms.py              # 100 training steps
    .venv/bin/python examples/hijax_transforms.py --steps 3    # fast check

A hijax Variable (``nnx.Param(x, hijax=True)``, or every Variable created under
``nnx.var_defaults(hijax=True)``) keeps its value in a mutable JAX value, so
*plain* JAX transforms carry its in-place updates: no ``nnx.split`` /
``nnx.update`` around ``jax.jit``. This script walks through each transform:

1. ``jax.jit`` train step: the model and the optimizer are updated in place;
   ``jax.grad`` differentiates immutable copies of the parameters,
   ``nnx.with_vars(params, mutable=False)`` (JAX cannot differentiate a mutable value).
2. ``jax.vmap``: an ensemble of models built by ``jax.vmap`` (each Variable
   gets a leading axis), evaluated by ``jax.vmap``, with a per-member counter
   written in place.
3. ``jax.lax.scan`` / ``fori_loop``: Variables captured by the loop body are
   updated in place; a loop *carry* must be an immutable copy (JAX cannot carry
   a mutable value through a loop) and is turned back into a mutable Variable after.
4. ``nnx.vmap`` / ``nnx.scan``: a stack of blocks built by ``nnx.vmap`` and run
   by ``nnx.scan``, with hijax Variables exactly as with plain ones.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import arbax as nnx


class MLP(nnx.Module):
  """A two-layer MLP that counts its calls in a BatchStat (state that is not trained)."""

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
    self.out = nnx.Linear(dhidden, dout, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.array(0))

  def __call__(self, x):
    self.calls[...] += 1
    return self.out(nnx.relu(self.hidden(x)))


def train_with_jax_jit(steps: int) -> dict:
  """1. A plain ``jax.jit`` train step that returns only the loss."""
  with nnx.var_defaults(hijax=True):
    model = MLP(2, 16, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x = jnp.linspace(-1, 1, 32).reshape(16, 2)
  y = jnp.sin(x.sum(-1, keepdims=True))

  @jax.jit
  def train_step(x, y):  # model and optimizer are captured: their updates propagate
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):  # params: immutable copies; rest (the counter) stays mutable
      return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(nnx.with_vars(params, mutable=False))
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(x, y)) for _ in range(steps)]
  print(f'1. jax.jit: loss {losses[0]:.4f} -> {losses[-1]:.4f} after {steps} steps; '
        f'optimizer.step = {int(optimizer.step[...])}, model.calls = {int(model.calls[...])}')
  return {'losses': losses, 'step': int(optimizer.step[...]), 'calls': int(model.calls[...])}


def ensemble_with_jax_vmap(members: int) -> dict:
  """2. ``jax.vmap`` builds, runs and updates an ensemble of hijax models."""
  @jax.vmap
  def create(key):
    with nnx.var_defaults(hijax=True):
      return MLP(2, 8, 1, rngs=nnx.Rngs(key))

  ensemble = create(jax.random.split(jax.random.key(1), members))
  x = jnp.ones((4, 2))
  # in_axes=(0, None): each member (mapped along axis 0) sees the same batch.
  ys = jax.vmap(lambda m, x: m(x), in_axes=(0, None))(ensemble, x)
  print(f'2. jax.vmap: kernel {ensemble.hidden.kernel.shape}, outputs {ys.shape}, '
        f'calls per member {ensemble.calls[...].tolist()}')
  return {'kernel_shape': ensemble.hidden.kernel.shape, 'out_shape': ys.shape,
          'calls': ensemble.calls[...].tolist()}


def loops_with_jax_lax() -> dict:
  """3. Loop bodies update captured Variables; a carry is an immutable copy."""
  total = nnx.BatchStat(jnp.array(0.0), hijax=True)

  def body(count, x):
    total[...] += x  # captured by closure: JAX writes it back after the loop
    return count + 1, total[...]

  count, running = jax.lax.scan(body, 0, jnp.arange(1.0, 5.0))
  jax.lax.fori_loop(0, 3, lambda i, c: (total.__setitem__(..., total[...] * 2), c)[1], None)

  # As a carry: an immutable copy goes in, a new value comes out, and
  # with_vars makes it a mutable hijax Variable again.
  scale = nnx.with_vars(nnx.Param(jnp.array(1.0), hijax=True), mutable=False)
  scale = jax.lax.fori_loop(0, 4, lambda i, s: s.replace(s[...] * 1.5), scale)
  scale = nnx.with_vars(scale, mutable=True)
  scale[...] += 1
  print(f'3. lax loops: running sums {running.tolist()} over {int(count)} steps, '
        f'total after doubling 3 times = {float(total[...])}, carried scale = {float(scale[...])}')
  return {'running': running.tolist(), 'total': float(total[...]), 'scale': float(scale[...])}


class Block(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    return x + nnx.tanh(self.linear(x))


def layers_with_nnx_transforms(depth: int) -> dict:
  """4. ``nnx.vmap`` stacks ``depth`` blocks; ``nnx.scan`` runs them one after the other."""
  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    with nnx.var_defaults(hijax=True):
      return Block(4, rngs=rngs)

  stack = create(nnx.Rngs(2))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, block):
    return block(x)

  y = forward(jnp.ones((3, 4)), stack)
  print(f'4. nnx.vmap/nnx.scan: {depth} stacked blocks, kernel {stack.linear.kernel.shape} '
        f'(hijax={stack.linear.kernel.hijax}), output {y.shape}')
  return {'kernel_shape': stack.linear.kernel.shape, 'hijax': stack.linear.kernel.hijax,
          'out_shape': y.shape}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--members', type=int, default=3)
  parser.add_argument('--depth', type=int, default=4)
  args = parser.parse_args(argv)
  return {'jit': train_with_jax_jit(args.steps),
          'vmap': ensemble_with_jax_vmap(args.members),
          'loops': loops_with_jax_lax(),
          'nnx': layers_with_nnx_transforms(args.depth)}


if __name__ == '__main__':
  main()
