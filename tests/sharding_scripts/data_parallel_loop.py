"""A data-parallel NNX training loop on 8 simulated CPU devices, in a process of its own.

    python tests/sharding_scripts/data_parallel_loop.py --steps 3000 --modes plain,donate

The model is replicated, each batch is split over a 'data' mesh axis, and ``nnx.jit``
runs the step; nothing waits for a result until the end, so JAX may queue steps as
fast as Python calls them. Batches are placed on the devices before the loop, which
keeps the loop that fast: the case in which XLA's CPU client deadlocks when too many
steps are queued (see arbax/transforms/inflight.py). A deadlock aborts the process
after ``--collective-timeout`` seconds (XLA's rendezvous timeout) instead of hanging.

Prints one JSON object, mode -> the losses at the start and the end, the optimizer's step
count, and ``max_pending``: the most steps seen queued (not yet computed) at once (None for
'donate', whose outputs are all donated to the next step).
"""
import argparse
import os
import sys


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=3000)
  p.add_argument('--batch', type=int, default=16, help='global batch, split over 8 devices')
  p.add_argument('--hidden', type=int, default=32)
  p.add_argument('--batches', type=int, default=10, help='distinct batches placed up front')
  p.add_argument('--modes', default='plain',
                 help="comma-separated loops to run: 'plain' (the step returns the loss) and "
                      "'donate' (the step donates the model and optimizer, returns nothing)")
  p.add_argument('--collective-timeout', type=int, default=60,
                 help='seconds before a stuck XLA:CPU rendezvous aborts the process')
  return p.parse_args(argv)


ARGS = parse(sys.argv[1:])
# The device count and the timeouts are read once, when jax starts.
os.environ['XLA_FLAGS'] = ' '.join([
    '--xla_force_host_platform_device_count=8',
    f'--xla_cpu_collective_timeout_seconds={ARGS.collective_timeout}',
    f'--xla_cpu_collective_call_terminate_timeout_seconds={ARGS.collective_timeout}',
])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import collections  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import arbax as nnx  # noqa: E402

MESH = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
REPLICATED = NamedSharding(MESH, P())
BATCH_SHARDED = NamedSharding(MESH, P('data'))


class MLP(nnx.Module):
  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dhidden, rngs=rngs)
    self.linear2 = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.linear1(x)))


def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def donating_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  """The step with nothing returned: the only outputs are the updated (donated) state."""
  train_step(model, optimizer, x, y)


def placed_batches(count: int, size: int, seed: int = 0) -> list:
  """``count`` batches of y = 0.8 x^2 + 0.1 + noise, already split over the devices."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    x = rng.uniform(-2, 2, size=(size, 1)).astype(np.float32)
    y = (0.8 * x**2 + 0.1 + rng.normal(0, 0.1, size=x.shape)).astype(np.float32)
    out.append(jax.device_put((x, y), BATCH_SHARDED))
  return out


@nnx.jit
def evaluate(model: MLP, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def run(args, donate: bool) -> dict:
  model = MLP(1, args.hidden, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  nnx.update((model, optimizer), jax.device_put(state, REPLICATED))
  batches = placed_batches(args.batches, args.batch)

  if donate:
    step_fn = nnx.jit(donating_step, donate_argnums=(0, 1))
    first = float(evaluate(model, batches[0]))
  else:
    step_fn = nnx.jit(train_step)
    first = None
  recent = collections.deque(maxlen=64)  # the last losses, to see how many are still queued
  max_pending = 0
  for step in range(args.steps):
    x, y = batches[step % len(batches)]
    loss = step_fn(model, optimizer, x, y)
    if donate:
      continue  # nothing to watch: every output is donated to the next step
    if first is None:
      first = loss
    recent.append(loss)
    if step % 4 == 0:
      max_pending = max(max_pending, sum(not queued.is_ready() for queued in recent))
  if donate:
    loss = evaluate(model, batches[(args.steps - 1) % len(batches)])
  kernel_sharding = model.linear1.kernel[...].sharding
  return dict(steps=args.steps, first_loss=float(first), last_loss=float(loss),
              max_pending=None if donate else max_pending,
              step_count=int(optimizer.step[...]),
              kernel_replicated=kernel_sharding.is_equivalent_to(REPLICATED, 2))


def main(args) -> dict:
  return {mode: run(args, donate=(mode == 'donate')) for mode in args.modes.split(',')}


if __name__ == '__main__':
  print(json.dumps(main(ARGS)))
