"""Checks shared by the layer test files: a layer inside nnx.vmap, nnx.scan and nnx.jit.

Each layer's test file calls these with a tiny factory, e.g.

    check_ensemble(lambda rngs: nnx.Linear(3, 3, rngs=rngs), jnp.ones((2, 3)))

The reference is always the slow, obvious computation: slice member ``i`` out
of the stacked state with ``nnx.split``/``nnx.merge`` and call it on its own.
"""
import jax
import jax.numpy as jnp
import numpy as np

import arbax as nnx


def stacked(make, n, seed=0):
  """``n`` independent copies of ``make(rngs)``, their state stacked on axis 0."""
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return make(rngs)
  return create(nnx.Rngs(seed))


def member(layers, i):
  """Copy of item ``i`` of a stacked module, unstacked; independent of ``layers``."""
  graphdef, state = nnx.split(layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _numbers(a):
  a = a[...] if isinstance(a, nnx.Variable) else a
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.asarray(a)


def assert_state_is_stack_of(layers, members):
  """Every Variable of ``layers`` equals the same Variable of each member, stacked."""
  stacked_leaves = jax.tree.leaves(nnx.state(layers))
  per_member = [jax.tree.leaves(nnx.state(m)) for m in members]
  assert len(stacked_leaves) == len(per_member[0])
  for k, leaf in enumerate(stacked_leaves):
    want = np.stack([_numbers(leaves[k]) for leaves in per_member])
    np.testing.assert_allclose(_numbers(leaf), want, rtol=1e-5, atol=1e-6)


def check_ensemble(make, x, n=2, apply=lambda m, x: m(x)):
  """vmap over stacked members == each member alone, and state updates come back stacked."""
  layers = stacked(make, n)
  members = [member(layers, i) for i in range(n)]
  ys = nnx.jit(nnx.vmap(apply, in_axes=(0, None)))(layers, x)
  for i, m in enumerate(members):
    jax.tree.map(lambda y, r, i=i: np.testing.assert_allclose(y[i], r, rtol=1e-5, atol=1e-6),
                 ys, apply(m, x))
  assert_state_is_stack_of(layers, members)
  return layers


def check_scan_over_layers(make, x, n=3, apply=lambda m, x: m(x)):
  """A stack of same-shape layers scanned over its layer axis == a Python loop."""
  layers = stacked(make, n)
  members = [member(layers, i) for i in range(n)]

  @nnx.jit
  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, layer):
    return apply(layer, x)

  y = forward(x, layers)
  ref = x
  for m in members:
    ref = apply(m, ref)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  assert_state_is_stack_of(layers, members)
  return layers


def check_scan_broadcast(layer, xs, apply=lambda m, x: m(x)):
  """One layer broadcast (``None``) over the steps of ``xs`` inside nnx.scan, both NNX rules.

  With graph updates (the default) every step sees the layer as it came in and
  its state updates are dropped: each step equals a call on a fresh copy, and the
  layer is unchanged. Without graph updates its state is carried, so updates
  accumulate exactly as in a Python loop (this run updates ``layer`` itself). The
  carry sums the outputs.
  """
  for graph_updates in (True, False):
    scanned = nnx.clone(layer) if graph_updates else layer
    ref_layer = nnx.clone(layer)

    @nnx.jit
    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0), graph_updates=graph_updates)
    def run(m, total, x):
      y = apply(m, x)
      return total + y.sum(), y

    total, ys = run(scanned, jnp.zeros(()), xs)
    if graph_updates:
      refs = [apply(nnx.clone(ref_layer), x) for x in xs]
    else:
      refs = [apply(ref_layer, x) for x in xs]
    np.testing.assert_allclose(ys, np.stack(refs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, sum(float(r.sum()) for r in refs), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(ref_layer))):
      np.testing.assert_allclose(_numbers(a), _numbers(b), rtol=1e-5, atol=1e-6)
