"""Control flow and tracing utilities with state propagation: ``cond``, ``switch``,
``eval_shape``, ``checkify``, ``make_jaxpr`` and ``cached_partial``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Count(nnx.Variable): pass
    >>> class Gate(nnx.Module):
    ...   def __init__(self):
    ...     self.opened = Count(jnp.array(0))
    >>> def open_(g, x):
    ...   g.opened[...] += 1
    ...   return x
    >>> g = Gate()
    >>> y = nnx.cond(jnp.array(True), open_, lambda g, x: -x, g, jnp.ones(2))
    >>> int(g.opened[...])        # the update made in the branch reached `g`
    1
    >>> abstract = nnx.eval_shape(lambda: nnx.Param(jnp.zeros((2, 3))))
    >>> abstract.get_value().shape   # a ShapeDtypeStruct: nothing was computed
    (2, 3)

Branches must return outputs of the same structure; every Variable of the
operands comes back from both branches, so either may update any of them.
"""
from __future__ import annotations

import functools
import typing as tp

import jax
import jax.numpy as jnp
from jax.experimental import checkify as checkify_lib

from arbax import _settings
from arbax.pytree import Pytree
from arbax.transforms import _propagate as prop
from arbax.variables import Variable

__all__ = ['cond', 'switch', 'eval_shape', 'checkify', 'make_jaxpr', 'cached_partial']


def _variable_indices(key: prop.CallKey) -> frozenset:
  """Every Variable leaf: both branches of a cond must return the same updates."""
  return frozenset(i for i, is_var in enumerate(prop._leaf_kinds(key.graphdef)) if is_var)


def _scalars_to_arrays(out):
  # lax.cond returns arrays; a Python scalar left as is would be static and mismatch the
  # other branch's array output.
  return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x,
                      out, is_leaf=lambda x: isinstance(x, (Variable, Pytree)))


def _branch(fun: tp.Callable, key: prop.CallKey, graph: bool, keep: frozenset):
  array_fun = lambda *args, **kwargs: _scalars_to_arrays(fun(*args, **kwargs))  # noqa: E731
  return lambda *inputs: prop.run(array_fun, key, inputs, graph=graph, keep=keep)


def _branching(name: str, pick: tp.Callable, branches: tp.Sequence[tp.Callable], operands: tuple,
               graph: bool | None):
  graph = _settings.graph_mode(graph)
  plan = prop.make_plan(operands, {}, graph=graph, context=f'tree-mode {name}')
  keep = _variable_indices(plan.key)
  traced = [_branch(fun, plan.key, graph, keep) for fun in branches]
  result = pick(traced, prop.split_inputs(plan, operands, {}))
  return prop.finish(plan, result)


def cond(pred, true_fun: tp.Callable, false_fun: tp.Callable, *operands,
         graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.lax.cond`` with state propagation: ``(true_fun if pred else false_fun)(*operands)``."""
  return _branching('cond', lambda fs, inputs: jax.lax.cond(pred, fs[0], fs[1], *inputs),
                    (true_fun, false_fun), operands, graph)


def switch(index, branches: tp.Sequence[tp.Callable], *operands, graph: bool | None = None,
           graph_updates: bool | None = None):
  """``jax.lax.switch`` with state propagation: ``branches[index](*operands)``, index clamped."""
  return _branching('switch', lambda fs, inputs: jax.lax.switch(index, fs, *inputs),
                    tuple(branches), operands, graph)


def eval_shape(f: tp.Callable, *args, graph: bool | None = None,
               graph_updates: bool | None = None, **kwargs):
  """The output of ``f(*args, **kwargs)`` without computing it: arrays become ShapeDtypeStructs.

  Modules in the output come back whole, their Variables holding
  ``jax.ShapeDtypeStruct`` (``nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0)))``
  builds an abstract model for free). The arguments are left unchanged.
  """
  graph = _settings.graph_mode(graph)
  plan = prop.make_plan(args, kwargs, graph=graph, context='tree-mode eval_shape')
  key = plan.key
  result = jax.eval_shape(lambda *inputs: prop.run(f, key, inputs, graph=graph, map_inputs=False),
                          *prop.split_inputs(plan, args, kwargs))
  return prop.build_output(result.out_def, result.out_leaves)


def checkify(f: tp.Callable, errors: frozenset = checkify_lib.user_checks,
             graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.experimental.checkify.checkify`` with state propagation.

  The result returns ``(error, output)``; updates made by ``f`` reach the
  caller's objects whether or not a check failed (call ``error.throw()`` to raise).
  """
  graph = _settings.graph_mode(graph)

  @functools.wraps(f)
  def checked(*args, **kwargs):
    plan = prop.make_plan(args, kwargs, graph=graph, context='tree-mode checkify')
    key = plan.key
    fun = checkify_lib.checkify(lambda *inputs: prop.run(f, key, inputs, graph=graph),
                                errors=errors)
    error, result = fun(*prop.split_inputs(plan, args, kwargs))
    return error, prop.finish(plan, result)

  return checked


def make_jaxpr(f: tp.Callable | None = None, *, graph: bool | None = None,
               graph_updates: bool | None = None, static_argnums: int | tp.Sequence[int] = ()):
  """``jax.make_jaxpr`` for functions of Modules: ``nnx.make_jaxpr(f)(model, x)`` is a ClosedJaxpr.

  Its inputs are the leaves of the arguments in order, its outputs the leaves
  of ``f``'s result; updates made by ``f`` are traced but not applied.
  """
  if _settings.graph_updates(graph_updates):
    raise ValueError('nnx.make_jaxpr does not support graph_updates=True.')
  if f is None:
    return lambda fun: make_jaxpr(fun, graph=graph, static_argnums=static_argnums)
  graph = _settings.graph_mode(graph)
  statics = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

  @functools.wraps(f)
  def trace(*args, **kwargs):
    positions = frozenset(i if i >= 0 else len(args) + i for i in statics)
    plan = prop.make_plan(args, kwargs, graph=graph, static_positions=positions,
                          context='tree-mode make_jaxpr')
    key = plan.key
    outputs = lambda *inputs: prop.run(f, key, inputs, graph=graph).out_leaves  # noqa: E731
    return jax.make_jaxpr(outputs)(*prop.split_inputs(plan, args, kwargs))

  return trace


class cached_partial:
  """``f`` with its first arguments fixed: ``step = nnx.cached_partial(train_step, model, opt)``.

  arbax transforms already cache how they flatten an argument by its identity
  (invalidated by any structural change), so the fixed graph arguments are
  walked once and later calls only gather their current leaves.
  """

  def __init__(self, f: tp.Callable, *cached_args, graph: bool | None = None,
               graph_updates: bool | None = None):
    functools.update_wrapper(self, f)
    self.f = f
    self.cached_args = cached_args

  def __call__(self, *args, **kwargs):
    return self.f(*self.cached_args, *args, **kwargs)
