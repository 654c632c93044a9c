"""The NNX Basics guide, section by section, as one runnable script on arbax.

    .venv/bin/python examples/spec_guide.py

Every example of the guide runs unchanged with ``import arbax as nnx`` and prints
the guide's values, except the graph-mode section: it prints ``y = 4.0`` where the
guide's text shows 6.0 (a stale output in the guide; Flax NNX 0.12 prints 4.0 too).
"""
import jax
import jax.numpy as jnp
import optax

import arbax as nnx

nnx.graphlib.set_graph_mode(False)
nnx.graphlib.set_graph_updates(False)


class Count(nnx.Variable):  # custom Variable types
  pass


class Linear(nnx.Pytree):
  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.din, self.dout = din, dout  # static attributes
    self.w = nnx.Param(rngs.uniform((din, dout)))  # data attribute
    self.count = Count(jnp.array(0))  # data attribute

  def __call__(self, x: jax.Array):
    self.count[...] += 1  # inplace state updates
    return x @ self.w  # Variable are Array-like


class MLP(nnx.Pytree):
  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    self.din, self.dmid, self.dout = din, dmid, dout
    self.linear1 = Linear(din, dmid, rngs=rngs)
    self.linear2 = Linear(dmid, dout, rngs=rngs)

  def __call__(self, x: jax.Array):
    x = nnx.relu(self.linear1(x))
    return self.linear2(x)


def pytrees_and_variables():
  model = Linear(2, 5, rngs=nnx.Rngs(0))
  nnx.display(model)
  x = jnp.ones((3, 2))
  y = model(x)
  print(f'{y.shape = }, {model.count[...] = }')
  doubled_model = jax.tree.map(lambda x: x * 2, model)
  print(f'\nmodel.w sum: {model.w.sum():.4f}')
  print(f'doubled.w sum: {doubled_model.w.sum():.4f}')
  print('\nPytree leaves:')
  for path, value in jax.tree.leaves_with_path(model):
    print(f'{jax.tree_util.keystr(path)}: {value!r}')


def rngs():
  rngs = nnx.Rngs(0)
  key1 = rngs()
  key2 = rngs()
  arr = rngs.normal((2, 3))
  print(f'{key1 = }')
  print(f'{key2 = }')
  print(f'{arr = }')
  print(rngs)


def nested_modules():
  mlp = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  y = mlp(jnp.ones((3, 2)))
  print(f'{y.shape = }')
  nnx.display(mlp)


def jax_transforms():
  x = jnp.ones((3, 2))
  model = Linear(2, 5, rngs=nnx.Rngs(0))

  @jax.jit
  def forward(model, x):  # pure function
    return model(x)

  forward(model, x)
  print(model.count[...])  # no state update: 0

  @jax.jit
  def forward_with_state(model, x):
    y = model(x)
    return y, nnx.state(model, Count)  # propagate state

  y, updates = forward_with_state(model, x)
  nnx.update(model, updates)  # apply state updates
  print(model.count[...])  # 1


def training_step_with_jax_transforms():
  x, y = jnp.ones((3, 2)), jnp.ones((3, 5))
  model = Linear(2, 5, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @jax.jit
  def train_step(model, optimizer, x, y):
    graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, nondiff):
      nondiff = nnx.clone(nondiff)  # refresh trace state
      model = nnx.merge(graphdef, params, nondiff)
      loss = jnp.mean((model(x) - y) ** 2)
      return loss, nnx.state(model, Count)  # propagate state

    grads, updates = jax.grad(loss_fn, has_aux=True)(params, nondiff)
    nnx.update(model, updates)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  updates = train_step(model, optimizer, x, y)
  nnx.update((model, optimizer), updates)
  print(f'{model.count[...] = }')
  print(f'{optimizer.step[...] = }')


def nnx_transforms():
  x, y = jnp.ones((3, 2)), jnp.ones((3, 5))
  model = Linear(2, 5, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit  # automatic state propagation
  def train_step(model, optimizer, x, y):
    graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, nondiff):
      model = nnx.merge(graphdef, params, nondiff)
      return jnp.mean((model(x) - y) ** 2)

    grads = nnx.grad(loss_fn)(params, nondiff)
    optimizer.update(model, grads)

  train_step(model, optimizer, x, y)
  print(f'{model.count[...] = }')
  print(f'{optimizer.step[...] = }')


def graph_mode():
  @nnx.dataclass
  class Foo(nnx.Module):
    a: nnx.Param
    b: nnx.Param

  p = nnx.Param(jnp.array(1.0))
  model = Foo(p, p)  # shared Param

  @nnx.jit
  def forward(model, x):
    model.a[...] += 1.0
    return model.a * x + model.b

  try:
    forward(model, jnp.array(1.0))
  except ValueError as e:
    print(f'Error: {e}')

  @nnx.jit(graph=True)
  def forward(model, x):
    model.a[...] += 1.0
    return model.a * x + model.b

  y = forward(model, jnp.array(1.0))
  print(f'{y = !s}, {model.a[...] = !s}, {model.b[...] = !s}')


def hijax():
  with nnx.var_defaults(hijax=True):
    x, y = jnp.ones((3, 2)), jnp.ones((3, 5))
    model = Linear(2, 5, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    print(model)

    @jax.jit  # automatic state propagation
    def train_step(model, optimizer, x, y):
      graphdef, params, nondiff = nnx.split(model, nnx.Param, ...)

      def loss_fn(params):
        model = nnx.merge(graphdef, params, nondiff)
        return jnp.mean((model(x) - y) ** 2)

      grads = jax.grad(loss_fn)(nnx.vars_as(params, hijax=False))
      optimizer.update(model, grads)

    train_step(model, optimizer, x, y)
    print(f'{model.count[...] = }')
    print(f'{optimizer.step[...] = }')

  v = nnx.Variable(jnp.array(1), hijax=True)

  @jax.jit
  def inc(v):
    v[...] += 1

  print(f'{v[...] = !s}')
  inc(v)
  print(f'{v[...] = !s}')


SECTIONS = [pytrees_and_variables, rngs, nested_modules, jax_transforms,
            training_step_with_jax_transforms, nnx_transforms, graph_mode, hijax]


def main():
  for section in SECTIONS:
    print(f'\n===== {section.__name__} =====')
    section()


if __name__ == '__main__':
  main()
