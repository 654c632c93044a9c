"""Plain ``jax.Array`` attributes as Module state, updated inside ``nnx.jit`` / ``nnx.grad``.

    .venv/bin/python examples/array_attributes.py

A Module attribute holding a ``jax.Array`` (``self.count = jnp.array(0)``,
``self.w = jax.random.normal(...)``) is state, like a Variable's value: ``nnx.state``
lists it, ``nnx.split`` / ``nnx.merge`` carry it, transforms trace it. Arrays are
immutable, so you update one by assigning a new array to the attribute
(``self.count = self.count + 1``); inside ``nnx.jit`` that assignment is written
back to the caller's object when the call returns.

Use raw arrays for small bits of state where a Variable type adds nothing (a
step counter, a buffer, a quick experiment). What you give up: ``nnx.grad``
differentiates ``nnx.Param`` by default, and a raw array is not a Param, so say
which arrays to differentiate with a filter,
``nnx.grad(loss, argnums=nnx.DiffState(0, filter))`` (graph mode), or in tree mode
differentiate every leaf (``allow_int=True`` for integer ones, whose gradient is
JAX's ``float0`` placeholder) and use the ones you need.

This script:

1. trains a linear regression whose weights are raw arrays, in graph mode (NNX's
   default): the loss goes down and a raw step counter counts every call;
2. trains the same model in tree mode (``with nnx.set_graph_mode(False)``, or
   ``graph=False`` per call), where the gradient has the model's own type;
3. shows graph updates: attributes first assigned inside ``nnx.jit`` (a raw array,
   a Variable) appear on the caller's object (graph mode with graph updates, the
   default; in tree mode a transform cannot change the structure of its inputs).

Portability: arbax writes raw array attributes back in every mode. Flax NNX
0.12.8 does so only in graph mode with graph updates (under ``graph=False`` or
``graph_updates=False`` it writes back Variable values only), and leaves a raw
array attribute *created* inside ``nnx.jit`` holding a tracer. State that must
change in tree mode on both belongs in a Variable (``nnx.BatchStat``,
``nnx.Param``) or is returned from the jitted function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import arbax as nnx


class RawLinear(nnx.Module):
  """``x @ w + b`` with ``w``, ``b`` and a call counter held as plain arrays."""

  def __init__(self, din: int, dout: int, *, key: jax.Array):
    self.w = jax.random.normal(key, (din, dout)) * 0.1
    self.b = jnp.zeros((dout,))
    self.calls = jnp.array(0)  # an integer array: state, never differentiated

  def __call__(self, x):
    self.calls = self.calls + 1  # a new array: written back after nnx.jit
    return x @ self.w + self.b


def is_float_array(path, x) -> bool:
  """Filter for the trainable leaves: floating-point raw arrays (not the int counter)."""
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def data(key: jax.Array, n: int = 64):
  x = jax.random.normal(key, (n, 3))
  return x, x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3


def train_graph_mode(model: RawLinear, x, y, steps: int, lr: float) -> list[float]:
  """1. Graph mode: differentiate the float arrays, assign the new ones in place."""

  @nnx.jit
  def train_step(model, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, is_float_array))(model)
    model.w = model.w - lr * grads['w']  # grads is a State with the filtered paths
    model.b = model.b - lr * grads['b']
    return loss

  return [float(train_step(model, x, y)) for _ in range(steps)]


def train_tree_mode(model: RawLinear, x, y, steps: int, lr: float) -> list[float]:
  """2. Tree mode: the Module is a pytree; its gradient is a RawLinear of gradients."""
  grad_types = []  # filled while tracing

  # A transform reads the mode when it is created: nnx.jit at decoration,
  # nnx.value_and_grad when the step is traced. Both happen inside the block here;
  # graph=False on each transform says the same without a block.
  with nnx.set_graph_mode(False):
    @nnx.jit
    def train_step(model, x, y):
      def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)
      loss, grads = nnx.value_and_grad(loss_fn, allow_int=True)(model)
      grad_types.append(type(grads).__name__)
      model.w = model.w - lr * grads.w
      model.b = model.b - lr * grads.b
      return loss

    losses = [float(train_step(model, x, y)) for _ in range(steps)]
  print(f'tree mode gradient type: {grad_types[0]} (traced {len(grad_types)} time)')
  return losses


def graph_update(model: RawLinear, x) -> dict:
  """3. Attributes created inside ``nnx.jit`` show up on the caller's object."""

  @nnx.jit
  def evaluate(model, x):
    y = model(x)
    model.last_mean = jnp.mean(y)                    # a new raw array attribute
    model.last_max = nnx.Intermediate(jnp.max(y))    # a new Variable
    return y

  before = [hasattr(model, name) for name in ('last_mean', 'last_max')]
  y = evaluate(model, x)
  last_mean, last_max = float(model.last_mean), float(model.last_max[...])
  in_state = sorted(nnx.state(model).keys())
  print(f'attributes added inside nnx.jit: before {before}; after: last_mean = {last_mean:.4f}, '
        f'last_max = {last_max:.4f}; nnx.state keys now {in_state}')
  return {'before': before, 'last_mean': last_mean, 'last_max': last_max,
          'expected': (float(jnp.mean(y)), float(jnp.max(y))), 'in_state': in_state}


def main(argv=None) -> dict:
  del argv
  steps, lr = 30, 0.1
  x, y = data(jax.random.key(0))
  result = {}
  for mode, train in (('graph', train_graph_mode), ('tree', train_tree_mode)):
    model = RawLinear(3, 1, key=jax.random.key(1))
    print(f'{mode} mode state: {sorted(nnx.state(model).keys())}')
    losses = train(model, x, y, steps, lr)
    calls = int(model.calls)
    print(f'{mode} mode: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps; '
          f'model.calls = {calls}; b = {model.b.tolist()}')
    result[mode] = {'losses': losses, 'calls': calls, 'w': model.w, 'b': model.b,
                    'is_array': isinstance(model.w, jax.Array)}
  result['graph_update'] = graph_update(RawLinear(3, 1, key=jax.random.key(2)), x)
  return result


if __name__ == '__main__':
  main()
