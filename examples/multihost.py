"""Data-parallel training over several processes (hosts) with JAX's own runtime.

    # two processes on this machine, one CPU device each:
    .venv/bin/python examples/multihost.py --launch 2
    # or start each process yourself (same command on every host, its own --process-id):
    .venv/bin/python examples/multihost.py --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0

Nothing here is arbax machinery: ``jax.distributed.initialize`` connects the
processes, ``jax.make_mesh`` spans all their devices, every process feeds its
slice of the global batch (``jax.make_array_from_process_local_data``), and
``nnx.jit`` with shardings compiles one SPMD program that every process runs.
The model is created by ``nnx.jit(..., out_shardings=...)`` so its Params are
global arrays, replicated over the ``data`` axis; gradients are averaged by the
collectives XLA inserts (Gloo on CPU).

Each process prints one JSON line: ``{"process": i, "losses": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

BATCH, STEPS, LR = 16, 3, 0.05


def batch():
  """The global batch, identical in every process (each keeps its own rows)."""
  import numpy as np
  x = (np.arange(BATCH * 4, dtype=np.float32).reshape(BATCH, 4) / 64.0)
  y = np.sin(np.arange(BATCH * 2, dtype=np.float32)).reshape(BATCH, 2)
  return x, y


def make_model():
  import jax
  import arbax as nnx

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.l1 = nnx.Linear(4, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  return MLP(nnx.Rngs(0))


def train(model, x, y, *, data_sharding=None):
  """``STEPS`` SGD steps; returns the losses. ``data_sharding`` splits the batch over devices."""
  import jax.numpy as jnp
  import optax
  import arbax as nnx

  opt = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
  shardings = (None, None, data_sharding, data_sharding) if data_sharding is not None else None

  @nnx.jit(in_shardings=shardings)
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt, x, y)) for _ in range(STEPS)]


def run_process(coordinator: str, num_processes: int, process_id: int) -> dict:
  import jax
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')   # CPU collectives across hosts
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=60,
                             heartbeat_timeout_seconds=20)
  try:
    from jax.sharding import NamedSharding, PartitionSpec as P
    import arbax as nnx
    mesh = jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P('data'))
    model = nnx.jit(make_model, out_shardings=replicated)()   # global, replicated Params
    x, y = batch()
    rows = BATCH // jax.process_count()
    mine = slice(process_id * rows, (process_id + 1) * rows)
    gx = jax.make_array_from_process_local_data(data, x[mine], x.shape)
    gy = jax.make_array_from_process_local_data(data, y[mine], y.shape)
    losses = train(model, gx, gy, data_sharding=data)
    return {'process': process_id, 'devices': jax.device_count(), 'losses': losses}
  finally:
    jax.distributed.shutdown()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(num_processes: int, timeout: float = 120.0) -> list[dict]:
  """Start ``num_processes`` local processes and collect their results; a hung peer is killed."""
  coordinator = f'127.0.0.1:{free_port()}'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)   # one CPU device per process
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), '--coordinator', coordinator,
                             '--num-processes', str(num_processes), '--process-id', str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(num_processes)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      if p.returncode != 0:
        raise RuntimeError(f'process exited with {p.returncode}:\n{err[-3000:]}')
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--launch', type=int, help='start this many local processes')
  parser.add_argument('--coordinator', default='127.0.0.1:12355')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  args = parser.parse_args(argv)
  if args.launch:
    for result in launch(args.launch):
      print(json.dumps(result))
    return
  print(json.dumps(run_process(args.coordinator, args.num_processes, args.process_id)), flush=True)


if __name__ == '__main__':
  main()
