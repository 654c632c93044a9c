"""Autodiff with state propagation: ``grad``, ``value_and_grad``, ``vjp``, ``jvp``,
``custom_vjp`` and ``remat``.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class Count(nnx.Variable): pass
    >>> class Scale(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.array(3.0))
    ...     self.calls = Count(jnp.array(0))
    ...   def __call__(self, x):
    ...     self.calls[...] += 1
    ...     return self.w * x
    >>> m = Scale()
    >>> grads = nnx.grad(lambda m, x: m(x) ** 2)(m, 2.0)   # d/dw (w x)^2 = 2 w x^2
    >>> float(grads['w'][...]), int(m.calls[...])
    (24.0, 1)

Only ``nnx.Param`` Variables of a Module or State argument are differentiated
(``nnx.DiffState(argnum, filter)`` picks others); the rest enter the function
as constants, and whatever the function writes into them reaches the caller's
objects. The gradient of a Module or State is a State of the differentiated
Variables, paths as in ``nnx.state(model, nnx.Param)``.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np

from arbax import _settings
from arbax import filters as filterlib
from arbax.graph import VAR, NODE, LEAF, SEQ, MAP, JAXNODE, flatten
from arbax.state import State, from_flat_state
from arbax.transforms import _propagate as prop
from arbax.variables import Param, Variable

__all__ = ['DiffState', 'grad', 'value_and_grad', 'vjp', 'jvp', 'custom_vjp', 'remat']

_SKIP = object()  # a leaf that is not differentiated


@dataclasses.dataclass(frozen=True)
class DiffState:
  """Differentiate argument ``argnum`` with respect to the Variables matching ``filter``."""
  argnum: int
  filter: filterlib.Filter


# -- plans, cached per wrapped function ---------------------------------------
class _Plans:
  """The last plan of a wrapped function, reused while its graph arguments are unchanged."""

  def __init__(self, graph: bool, context: str, static_argnums: tuple = ()):
    self.graph = graph
    self.context = context
    self.static_argnums = static_argnums
    self.plan = None

  def get(self, args: tuple, kwargs: dict) -> prop.Plan:
    plan = self.plan
    if not prop.plan_still_valid(plan, args, kwargs):
      statics = frozenset(i if i >= 0 else len(args) + i for i in self.static_argnums)
      plan = prop.make_plan(args, kwargs, graph=self.graph, static_positions=statics,
                            context=self.context)
      self.plan = plan
    return plan


def _as_tuple(x) -> tuple:
  if x is None:
    return ()
  return (x,) if isinstance(x, int) else tuple(x)


# -- which leaves are differentiated ------------------------------------------
def _leaf_layout(d, path=(), inside=False, out=None) -> list:
  """``(relative path, inside a Pytree or State)`` of each leaf under the def ``d``, in order."""
  out = [] if out is None else out
  tag = d[0]
  if tag in (VAR, LEAF):
    out.append((path, inside))
  elif tag == NODE:
    for k, c in d[3]:
      _leaf_layout(c, path + (k,), True, out)
  elif tag == SEQ:
    for i, c in enumerate(d[2]):
      _leaf_layout(c, path + (i,), inside, out)
  elif tag in (MAP, JAXNODE):
    nested = inside or (tag == MAP and issubclass(d[1], State))
    for k, c in zip(d[2], d[3]):
      _leaf_layout(c, path + (k,), nested, out)
  return out


def _arg_defs(key: prop.CallKey) -> tuple:
  """The def of each positional argument (non-graph ones are static Nones)."""
  return key.graphdef.root[2][0][2]


def _graph_groups(plan: prop.Plan) -> dict:
  """``{positional index: (start, stop)}`` of each graph argument's leaves."""
  groups = iter(plan.groups)
  out = {}
  for pos, kind in enumerate(plan.kinds):
    if kind == prop.GRAPH:
      out[pos] = next(groups)
  return out


class _Selection:
  """The differentiated inputs of one plan, and how their gradients map back to arguments.

  ``slots`` lists ``(input index, leaf index or None)`` for each differentiated
  value: ``None`` stands for a whole plain argument.
  """

  def __init__(self, plan: prop.Plan, specs: tuple, loose_arrays: bool):
    self.plan = plan
    self.slots: list = []
    self.per_spec: list = []
    groups = _graph_groups(plan)
    defs = _arg_defs(plan.key)
    n_pos = len(plan.kinds) - len(plan.key.kw_names)
    for argnum, predicate in specs:
      if argnum >= n_pos or plan.kinds[argnum] != prop.GRAPH:
        self.per_spec.append(('plain', len(self.slots)))
        self.slots.append((argnum, None))
        continue
      a, b = groups[argnum]
      layout = _leaf_layout(defs[argnum])
      leaf_slots = []
      for k, ((path, inside), item) in enumerate(zip(layout, plan.items[a:b])):
        chosen = predicate(path, item) or (loose_arrays and not inside
                                          and not isinstance(item, Variable))
        leaf_slots.append(len(self.slots) if chosen else None)
        if chosen:
          self.slots.append((argnum, k))
      self.per_spec.append(('graph', defs[argnum], leaf_slots))

  def take(self, inputs: list) -> list:
    return [inputs[j] if k is None else inputs[j][k] for j, k in self.slots]

  def put(self, inputs: list, values: tp.Sequence) -> list:
    out = [list(x) if isinstance(x, list) else x for x in inputs]
    for (j, k), value in zip(self.slots, values):
      if k is None:
        out[j] = value
      else:
        out[j][k] = value
    return out

  def assemble(self, values: tp.Sequence) -> list:
    """One gradient per spec: arrays for plain arguments, States for Modules and States."""
    out = []
    for entry in self.per_spec:
      if entry[0] == 'plain':
        out.append(values[entry[1]])
      else:
        leaves = iter([_SKIP if i is None else values[i] for i in entry[2]])
        out.append(_gradient_tree(entry[1], leaves))
    return out


def _grad_leaf(d, g):
  return d[1]._from_parts(g, d[2]) if d[0] == VAR else g


def _gradient_tree(d, leaves: tp.Iterator):
  """Mirror the argument's def: containers stay containers, each Pytree/State becomes a State."""
  tag = d[0]
  if tag in (VAR, LEAF):
    g = next(leaves)
    return None if g is _SKIP else _grad_leaf(d, g)
  if tag == NODE or (tag == MAP and issubclass(d[1], State)):
    items = []
    for path, leaf_def in _leaf_defs(d):
      g = next(leaves)
      if g is not _SKIP:
        items.append((path, _grad_leaf(leaf_def, g)))
    return from_flat_state(items)
  if tag == SEQ:
    return d[1](_gradient_tree(c, leaves) for c in d[2])
  if tag == MAP:
    return d[1]((k, _gradient_tree(c, leaves)) for k, c in zip(d[2], d[3]))
  if tag == JAXNODE:
    return d[1].unflatten([_gradient_tree(c, leaves) for c in d[3]])
  return None  # static values and graph-mode references hold no leaves


def _leaf_defs(d, path=()) -> tp.Iterator[tuple]:
  tag = d[0]
  if tag in (VAR, LEAF):
    yield path, d
  elif tag == NODE:
    for k, c in d[3]:
      yield from _leaf_defs(c, path + (k,))
  elif tag == SEQ:
    for i, c in enumerate(d[2]):
      yield from _leaf_defs(c, path + (i,))
  elif tag in (MAP, JAXNODE):
    for k, c in zip(d[2], d[3]):
      yield from _leaf_defs(c, path + (k,))


def _argnum_specs(argnums) -> tuple[tuple, bool]:
  """``((argnum, predicate), ...)`` and whether a single gradient (not a tuple) is returned."""
  single = isinstance(argnums, (int, DiffState))
  entries = (argnums,) if single else tuple(argnums)
  specs = []
  seen = set()
  for entry in entries:
    if isinstance(entry, DiffState):
      argnum, filter_ = entry.argnum, entry.filter
    elif isinstance(entry, int):
      argnum, filter_ = entry, Param
    else:
      raise TypeError(f'argnums must be ints or nnx.DiffState, got {entry!r}')
    if argnum in seen:
      raise ValueError(f'argnum {argnum} is repeated in argnums')
    seen.add(argnum)
    specs.append((argnum, filterlib.to_predicate(filter_)))
  return tuple(specs), single


def _check_argnums(specs: tuple, args: tuple, argnums) -> tuple:
  n = len(args)
  out = []
  for argnum, predicate in specs:
    if argnum >= n or argnum < -n:
      raise TypeError(f'differentiating with respect to argnums={argnums} requires at least '
                      f'{max(a for a, _ in specs) + 1} positional arguments to be passed by '
                      f'the caller, but got only {n} positional arguments.')
    out.append((argnum % n, predicate))
  return tuple(out)


def _unwrap(x):
  return x._value if isinstance(x, Variable) else x


def _call_rebuilt(fun, key, inputs):
  """Call ``fun`` on objects rebuilt around ``inputs``; returns (out, changed, values)."""
  args, kwargs, in_leaves, inner_items = prop.rebuild(key, inputs)
  out = fun(*args, **kwargs)
  changed, values = prop.collect_updates(in_leaves, inner_items)
  return out, changed, values


def _split_aux(out, has_aux: bool):
  if not has_aux:
    return out, None
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise TypeError('with has_aux=True the function must return a pair (output, aux), '
                    f'got {type(out).__name__}')
  return out[0], out[1]


# -- grad / value_and_grad ----------------------------------------------------
class _Grad:
  """A function wrapped by ``grad`` or ``value_and_grad``."""

  def __init__(self, fun, *, argnums, has_aux, holomorphic, allow_int, graph, with_value):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.argnums = argnums
    self.specs, self.single = _argnum_specs(argnums)
    self.has_aux = has_aux
    self.holomorphic = holomorphic
    self.allow_int = allow_int
    self.graph = _settings.graph_mode(graph)
    self.with_value = with_value
    self._plans = _Plans(self.graph, 'tree-mode grad')
    self._selection: _Selection | None = None

  def _select(self, plan, specs) -> _Selection:
    sel = self._selection
    if sel is None or sel.plan is not plan:
      sel = self._selection = _Selection(plan, specs, loose_arrays=True)
    return sel

  def __call__(self, *args, **kwargs):
    specs = _check_argnums(self.specs, args, self.argnums)
    plan = self._plans.get(args, kwargs)
    sel = self._select(plan, specs)
    inputs = prop.split_inputs(plan, args, kwargs)
    key = plan.key

    def pure(diff_values):
      out, changed, values = _call_rebuilt(self.fun, key, sel.put(inputs, diff_values))
      value, aux = _split_aux(out, self.has_aux)
      aux_def, aux_leaves = prop.flatten_output(aux, graph=self.graph)
      return _unwrap(value), prop.Output(changed, aux_def, values, aux_leaves)

    (value, result), grads = jax.value_and_grad(
        pure, has_aux=True, holomorphic=self.holomorphic, allow_int=self.allow_int)(
            sel.take(inputs))
    aux = prop.finish(plan, result)
    grads = sel.assemble(grads)
    grads = grads[0] if self.single else tuple(grads)
    if self.with_value:
      return ((value, aux), grads) if self.has_aux else (value, grads)
    return (grads, aux) if self.has_aux else grads


def _check_reduce_axes(reduce_axes):
  if reduce_axes:
    raise NotImplementedError('reduce_axes is not supported (JAX removed it); reduce explicitly '
                              'inside the function instead.')


def grad(f=None, *, argnums: int | DiffState | tp.Sequence[int | DiffState] = 0,
         has_aux: bool = False, holomorphic: bool = False, allow_int: bool = False,
         reduce_axes: tp.Sequence = (), graph: bool | None = None,
         graph_updates: bool | None = None):
  """``jax.grad`` with state propagation; see the module docstring.

  Returns the gradient of argument ``argnums`` (a tuple of them for a sequence),
  and ``(grads, aux)`` with ``has_aux=True``.
  """
  _check_reduce_axes(reduce_axes)
  options = dict(argnums=argnums, has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int,
                 graph=graph)
  if f is None:
    return lambda fun: _Grad(fun, with_value=False, **options)
  return _Grad(f, with_value=False, **options)


def value_and_grad(f=None, *, argnums: int | DiffState | tp.Sequence[int | DiffState] = 0,
                   has_aux: bool = False, holomorphic: bool = False, allow_int: bool = False,
                   reduce_axes: tp.Sequence = (), graph: bool | None = None,
                   graph_updates: bool | None = None):
  """Like ``grad`` but returns ``(value, grads)``, or ``((value, aux), grads)`` with ``has_aux``."""
  _check_reduce_axes(reduce_axes)
  options = dict(argnums=argnums, has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int,
                 graph=graph)
  if f is None:
    return lambda fun: _Grad(fun, with_value=True, **options)
  return _Grad(f, with_value=True, **options)


# -- vjp / jvp ----------------------------------------------------------------
def _inexact(path, value) -> bool:
  value = _unwrap(value)
  try:
    return bool(jnp.issubdtype(jnp.result_type(value), jnp.inexact))
  except TypeError:
    return False


def _all_primals(n: int) -> tuple:
  return tuple((i, _inexact) for i in range(n))


def _traced(fun, primals, graph, context):
  """The plan, selection, inputs and the pure function of the differentiated primals.

  The pure function returns ``(output leaves, Output)`` where the ``Output``
  carries the updates, the output's treedef and the aux.
  """
  plan = prop.make_plan(primals, {}, graph=graph, context=context)
  sel = _Selection(plan, _all_primals(len(primals)), loose_arrays=False)
  inputs = prop.split_inputs(plan, primals, {})

  def pure(has_aux, diff_values):
    out, changed, values = _call_rebuilt(fun, plan.key, sel.put(inputs, diff_values))
    out, aux = _split_aux(out, has_aux)
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    aux_def, aux_leaves = prop.flatten_output(aux, graph=graph)
    return out_leaves, prop.Output(changed, (out_tree, aux_def), values, aux_leaves)

  return plan, sel, inputs, pure


def _finish_traced(plan, result: prop.Output):
  out_tree, aux_def = result.out_def
  if result.changed:
    plan.write_back(result.changed, result.values)
  return out_tree, prop.build_output(aux_def, result.out_leaves)


def vjp(f=None, *primals, has_aux: bool = False, reduce_axes: tp.Sequence = (),
        graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.vjp`` with state propagation: ``out, vjp_fn = nnx.vjp(f, model, x)``.

  ``vjp_fn(cotangent)`` returns one cotangent per primal: for a Module or State
  a State of its floating-point Variables. With ``has_aux`` returns
  ``(out, vjp_fn, aux)``.
  """
  _check_reduce_axes(reduce_axes)
  if f is None or not primals:  # `nnx.vjp(f)(*primals)` and `nnx.vjp(has_aux=True)(f, *primals)`
    head = () if f is None else (f,)
    return functools.partial(vjp, *head, has_aux=has_aux, graph=graph)
  graph = _settings.graph_mode(graph)
  plan, sel, inputs, pure = _traced(f, primals, graph, 'tree-mode vjp')
  out_leaves, jax_vjp_fn, result = jax.vjp(functools.partial(pure, has_aux), sel.take(inputs),
                                           has_aux=True)
  out_tree, aux = _finish_traced(plan, result)

  def vjp_fn(cotangent):
    (cts,) = jax_vjp_fn(jax.tree_util.tree_leaves(cotangent))
    return tuple(sel.assemble(cts))

  out = jax.tree_util.tree_unflatten(out_tree, out_leaves)
  return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def _tangent_values(sel: _Selection, tangents: tuple) -> list:
  """The tangent of each differentiated leaf; Module/State tangents are matched by path."""
  plan = sel.plan
  groups = _graph_groups(plan)
  by_arg: dict = {}
  out = []
  for j, k in sel.slots:
    if k is None:
      out.append(tangents[j])
      continue
    if j not in by_arg:
      by_arg[j] = _paths_to_values(tangents[j])
    a, _ = groups[j]
    path = plan.key.graphdef.leaf_paths[a + k][2:]
    primal = _unwrap(plan.items[a + k])
    t = by_arg[j].get(path)
    out.append(jnp.zeros_like(primal) if t is None else t)
  return out


def _paths_to_values(tangent) -> dict:
  if tangent is None:
    return {}
  fl = flatten(tangent, graph=True)
  return {path: _unwrap(leaf) for path, leaf in zip(fl.paths, fl.leaves)}


def jvp(f=None, primals: tuple | None = None, tangents: tuple | None = None, *,
        has_aux: bool = False, graph: bool | None = None, graph_updates: bool | None = None):
  """``jax.jvp`` with state propagation: ``out, t_out = nnx.jvp(f, (model, x), (t_model, t_x))``.

  The tangent of a Module or State primal is a Module or State whose Variables
  are matched by path; floating-point Variables it leaves out get zero tangent,
  integer ones are constants. With ``has_aux`` returns ``(out, out_tangent, aux)``.
  """
  if f is None or primals is None:  # `nnx.jvp(f)(primals, tangents)` and `nnx.jvp(has_aux=True)`
    head = () if f is None else (f,)
    return functools.partial(jvp, *head, has_aux=has_aux, graph=graph)
  if tangents is None:
    raise TypeError('jvp: pass the tangents, one per primal')
  primals, tangents = tuple(primals), tuple(tangents)
  if len(primals) != len(tangents):
    raise TypeError(f'jvp: {len(primals)} primals but {len(tangents)} tangents; pass one tangent '
                    'per primal')
  graph = _settings.graph_mode(graph)
  plan, sel, inputs, pure = _traced(f, primals, graph, 'tree-mode jvp')
  out_leaves, tangent_leaves, result = jax.jvp(
      functools.partial(pure, has_aux), (sel.take(inputs),),
      (_tangent_values(sel, tangents),), has_aux=True)
  out_tree, aux = _finish_traced(plan, result)
  out = jax.tree_util.tree_unflatten(out_tree, out_leaves)
  tangent_out = jax.tree_util.tree_unflatten(out_tree, tangent_leaves)
  return (out, tangent_out, aux) if has_aux else (out, tangent_out)


# -- custom_vjp ---------------------------------------------------------------
def _zero_cotangent(x):
  x = np.shape(x), jnp.result_type(x)
  if jnp.issubdtype(x[1], jnp.inexact):
    return jnp.zeros(x[0], x[1])
  return np.zeros(x[0], dtype=jax.dtypes.float0)


class CustomVjp:
  """A function with a custom backward pass: ``f.defvjp(fwd, bwd)``.

  ``fwd(*args)`` returns ``(out, residuals)`` (residuals may hold Modules);
  ``bwd(*nondiff_args, residuals, out_cotangent)`` returns one cotangent per
  differentiated argument: an array for arrays, a State (any subset of
  ``nnx.state(arg)``, missing Variables count as zero) for Modules and States.
  """

  def __init__(self, fun, *, nondiff_argnums: tuple, graph: bool):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.nondiff_argnums = tuple(nondiff_argnums)
    self.graph = graph
    self.fwd = None
    self.bwd = None
    self._signature = inspect.signature(fun)
    self._jax_fn = jax.custom_vjp(self._primal, nondiff_argnums=(0,))
    self._jax_fn.defvjp(self._fwd, self._bwd)

  def defvjp(self, fwd: tp.Callable, bwd: tp.Callable, symbolic_zeros: bool = False):
    if symbolic_zeros:
      raise NotImplementedError('symbolic_zeros=True is not supported by nnx.custom_vjp')
    self.fwd, self.bwd = fwd, bwd

  def _primal(self, key, *inputs):
    return prop.run(self.fun, key, inputs, graph=self.graph)

  def _fwd(self, key, *inputs):
    if self.fwd is None:
      raise TypeError(f'{self.fun.__name__}: call defvjp(fwd, bwd) before differentiating it')
    out, changed, values = _call_rebuilt(self.fwd, key, inputs)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError('custom_vjp fwd must return a pair (output, residuals), got '
                      f'{type(out).__name__}')
    out, residuals = out
    out_def, out_leaves = prop.flatten_output(out, graph=self.graph)
    res_def, res_leaves = prop.flatten_output(residuals, graph=self.graph)
    saved = prop.Output((), res_def, [], res_leaves)
    return prop.Output(changed, out_def, values, out_leaves), (saved, list(inputs))

  def _bwd(self, key, saved, g: prop.Output):
    res_out, inputs = saved
    residuals = prop.build_output(res_out.out_def, res_out.out_leaves)
    out_ct = prop.build_output(g.out_def, g.out_leaves)
    args, _, _, _ = prop.rebuild(key, inputs)
    nondiff = [args[i] for i in self.nondiff_argnums]
    cts = self.bwd(*nondiff, residuals, out_ct)
    diff_positions = [i for i in range(len(args)) if i not in self.nondiff_argnums]
    if not isinstance(cts, (tuple, list)) or len(cts) != len(diff_positions):
      is_seq = isinstance(cts, (tuple, list))
      got = f'a tuple of length {len(cts)}' if is_seq else type(cts).__name__
      raise TypeError(f'custom_vjp bwd must return a tuple with one cotangent per '
                      f'differentiated argument (positions {diff_positions}), got {got}')
    return tuple(self._input_cotangents(key, inputs, dict(zip(diff_positions, cts))))

  def _input_cotangents(self, key, inputs, cts: dict) -> tp.Iterator:
    offset = 0
    sizes = iter(key.group_sizes)
    dyn = [pos for pos, kind in enumerate(key.kinds) if kind != prop.STATIC_ARG]
    for pos, value in zip(dyn, inputs):
      ct = cts.get(pos)
      if key.kinds[pos] != prop.GRAPH:
        yield jax.tree.map(_zero_cotangent, value) if ct is None else ct
        continue
      size = next(sizes)
      by_path = _paths_to_values(ct)
      paths = key.graphdef.leaf_paths[offset:offset + size]
      offset += size
      yield [_leaf_cotangent(by_path.get(path[2:]), leaf) for path, leaf in zip(paths, value)]

  def __call__(self, *args, **kwargs):
    if kwargs:
      bound = self._signature.bind(*args, **kwargs)
      if bound.kwargs:
        raise TypeError(f'custom_vjp: keyword-only arguments {list(bound.kwargs)} are not '
                        'supported; pass them positionally')
      args = bound.args
    statics = frozenset(i for i in self.nondiff_argnums
                        if i < len(args) and not prop.holds_graph(args[i])
                        and not _is_array_tree(args[i]))
    plan = prop.make_plan(args, {}, graph=self.graph, static_positions=statics,
                          context='tree-mode custom_vjp')
    # Python scalars become arrays: the eager fwd sees raw inputs, and a scalar result
    # computed from them would otherwise be taken for a constant of the output.
    inputs = [x if kind == prop.GRAPH else jax.tree.map(_scalar_to_array, x)
              for x, kind in zip(prop.split_inputs(plan, args, {}),
                                 [k for k in plan.kinds if k != prop.STATIC_ARG])]
    result = self._jax_fn(plan.key, *inputs)
    return prop.finish(plan, result)


def _scalar_to_array(x):
  return jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x


def _leaf_cotangent(ct, primal):
  if ct is None or not _inexact((), primal):
    return _zero_cotangent(primal)
  return ct


def _is_array_tree(x) -> bool:
  leaves = jax.tree_util.tree_leaves(x)
  return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray, np.generic))
                              for leaf in leaves)


def custom_vjp(fun=None, *, nondiff_argnums: tuple = (), graph: bool | None = None,
               graph_updates: bool | None = None):
  """``jax.custom_vjp`` with state propagation; define the rules with ``f.defvjp(fwd, bwd)``.

  Arguments in ``nondiff_argnums`` get no cotangent and are passed to ``bwd``
  first, like ``jax.custom_vjp``.
  """
  if fun is None:
    return lambda f: custom_vjp(f, nondiff_argnums=nondiff_argnums, graph=graph)
  if any(isinstance(i, DiffState) for i in nondiff_argnums):
    raise NotImplementedError('nnx.custom_vjp: DiffState in nondiff_argnums is not supported; '
                              'return a State holding only the Variables you differentiate')
  return CustomVjp(fun, nondiff_argnums=nondiff_argnums, graph=_settings.graph_mode(graph))


# -- remat --------------------------------------------------------------------
class _Remat:
  """A function whose activations are recomputed on the backward pass (``jax.checkpoint``)."""

  def __init__(self, fun, *, prevent_cse: bool, static_argnums, policy, graph: bool):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.graph = graph
    self._plans = _Plans(graph, 'tree-mode remat', _as_tuple(static_argnums))
    self._checkpointed = jax.checkpoint(self._inner, prevent_cse=prevent_cse, policy=policy,
                                        static_argnums=(0,))

  def _inner(self, key, *inputs):
    return prop.run(self.fun, key, inputs, graph=self.graph)

  def __call__(self, *args, **kwargs):
    plan = self._plans.get(args, kwargs)
    result = self._checkpointed(plan.key, *prop.split_inputs(plan, args, kwargs))
    return prop.finish(plan, result)

  def __get__(self, obj, objtype=None):
    return self if obj is None else functools.partial(self, obj)


def remat(f=None, *, prevent_cse: bool = True, static_argnums: int | tuple[int, ...] = (),
          policy: tp.Callable[..., bool] | None = None, graph: bool | None = None,
          graph_updates: bool | None = None):
  """``jax.checkpoint`` with state propagation: activations are recomputed for the gradient."""
  options = dict(prevent_cse=prevent_cse, static_argnums=static_argnums, policy=policy,
                 graph=_settings.graph_mode(graph))
  if f is None:
    return lambda fun: _Remat(fun, **options)
  return _Remat(f, **options)


