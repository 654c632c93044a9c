"""``nnx.tabulate``: a table of the calls a model makes on given inputs, with its state.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.hidden = nnx.Linear(4, 8, rngs=rngs)
    ...     self.out = nnx.Linear(8, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.out(nnx.relu(self.hidden(x)))
    >>> table = nnx.tabulate(MLP(nnx.Rngs(0)), jnp.ones((1, 4)),
    ...                      console_kwargs={'force_terminal': False, 'width': 200})
    >>> [line.split('│')[1].strip() for line in table.splitlines() if 'Linear' in line]
    ['hidden', 'out']

The model is run *abstractly* (under ``jax.eval_shape``, on a copy): nothing is
computed and the model is left as it was, yet every method call of every
object in it is seen. One row per distinct call (object, method, input shapes),
in call order: the object's path (``block/forward`` for a method other than
``__call__``), its type, the inputs and outputs as ``dtype[shape]``, and one
column per Variable kind listing the object's own Variables and the count and
bytes of all Variables below it (each shared Variable counted once). The
footer totals each kind. ``compute_flops`` / ``compute_vjp_flops`` add XLA's
cost estimate of each call (forward, and forward plus backward) -- these
compile each call once, but run nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import types
import typing as tp

import jax
import jax.numpy as jnp
import rich.console
import rich.markup
import rich.table
import rich.text

from arbax import api
from arbax.display import in_notebook, size_and_bytes
from arbax.pytree import Pytree, node_parts
from arbax.rngs import RngState, RngStream
from arbax.variables import Variable

__all__ = ['tabulate', 'CallInfo', 'filter_rng_streams']


@dataclasses.dataclass
class CallInfo:
  """One row of the table: a method call seen while the model ran.

  ``row_filter`` functions receive it: ``type`` is the class of the object
  called, ``path`` its path (plus the method name unless it is ``__call__``).
  """

  call_order: int
  object_id: int
  type: type
  path: tuple
  inputs_repr: str
  outputs: str
  flops: int | None
  vjp_flops: int | None


def filter_rng_streams(row: CallInfo) -> bool:
  """The default ``row_filter``: hides the calls that draw random keys (``rngs.params()``)."""
  return not issubclass(row.type, RngStream)


# -- the objects of the model -------------------------------------------------
@dataclasses.dataclass
class _NodeInfo:
  """An object of the model: its first path, its own Variables by kind and key, and the
  ``[count, bytes]`` per kind of every Variable under it (shared ones counted once)."""

  node: tp.Any
  path: tuple
  own: dict[type, dict[tp.Any, Variable]]
  stats: dict[type, list[int]]


def _kind(v: Variable) -> type:
  return RngState if isinstance(v, RngState) else type(v)


def _children(node) -> list[tuple[tp.Any, tp.Any]]:
  if isinstance(node, Pytree):
    d = node.__dict__
    return [(k, d[k]) for k in node_parts(node)[0]]
  if isinstance(node, dict):
    return list(node.items())
  if isinstance(node, (list, tuple)):
    return list(enumerate(node))
  return []  # a leaf (tabulate of a plain function has no state to list)


def _is_node(x) -> bool:
  return isinstance(x, (Pytree, list, tuple, dict)) and not isinstance(x, Variable)


def _collect(root) -> dict[int, _NodeInfo]:
  """``{id(object): _NodeInfo}`` for every Pytree and container reachable from ``root``."""
  infos: dict[int, _NodeInfo] = {}
  counted: set[int] = set()

  def visit(node, path):
    info = infos[id(node)] = _NodeInfo(node, path, {}, {})
    for key, child in _children(node):
      if isinstance(child, Variable):
        if id(child) in counted:
          continue
        counted.add(id(child))
        kind = _kind(child)
        info.own.setdefault(kind, {})[key] = child
        _add(info.stats, {kind: size_and_bytes(child.get_value())})
      elif _is_node(child) and id(child) not in infos:
        visit(child, (*path, key))
        _add(info.stats, infos[id(child)].stats)

  visit(root, ())
  return infos


def _add(total: dict, more: tp.Mapping) -> None:
  for kind, (n, b) in more.items():
    entry = total.setdefault(kind, [0, 0])
    entry[0] += n
    entry[1] += b


# -- text of values -----------------------------------------------------------
def _leaf_text(x) -> str:
  if isinstance(x, Variable):
    return f'{type(x).__name__}({_leaf_text(x.get_value())})'
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return f'[dim]{x.dtype}[/dim]' + rich.markup.escape(f'[{",".join(map(str, x.shape))}]')
  if isinstance(x, type):
    return rich.markup.escape(f'type[{x.__name__}]')
  if isinstance(x, Pytree):
    return f'{type(x).__name__}(...)'
  return rich.markup.escape(x if isinstance(x, str) else repr(x))


def _as_container(x):
  """``x`` as a dict or list when it is a container worth opening, else None."""
  if isinstance(x, (dict, list)):
    return x
  if isinstance(x, tuple):
    asdict = getattr(x, '_asdict', None)  # a namedtuple opens as its fields
    return asdict() if asdict is not None else list(x)
  if x is None or isinstance(x, (Variable, Pytree)) or hasattr(x, 'shape'):
    return None
  children, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if not children or (len(children) == 1 and children[0][1] is x):
    return None  # a leaf JAX does not look into, or a node without children: shown by repr
  return {jax.tree_util.keystr(path): child for path, child in children}


def _lines(x) -> list[str]:
  """``x`` as YAML-style block lines: ``key: value``, ``- item``, nested levels indented."""
  c = _as_container(x)
  if c is None:
    return [_leaf_text(x)]
  if not c:
    return ['{}' if isinstance(c, dict) else '[]']
  out = []
  if isinstance(c, dict):
    for k, v in c.items():
      sub = _lines(v)
      if _as_container(v):  # a non-empty container: on the lines below its key
        out.append(f'{rich.markup.escape(str(k))}:')
        out += ['  ' + line for line in sub]
      else:
        out.append(f'{rich.markup.escape(str(k))}: {sub[0]}')
    return out
  for v in c:
    sub = _lines(v)
    out.append('- ' + sub[0])
    out += ['  ' + line for line in sub[1:]]
  return out


def _text(x) -> str:
  return '\n'.join(_lines(x))


def _inputs_text(args: tuple, kwargs: dict) -> str:
  parts = []
  if args:
    parts.append(_text(args[0] if len(args) == 1 and not kwargs else list(args)))
  if kwargs:
    parts.append(_text(kwargs))
  return '\n'.join(parts)


def _bytes_text(n: int) -> str:
  for scale, unit in ((1e9, 'GB'), (1e6, 'MB'), (1e3, 'KB')):
    if n > scale:
      return f'{n / scale:,.1f} {unit}'
  return f'{n:,} B'


def _size_text(stats: tp.Sequence[int]) -> str:
  return f'{stats[0]:,} [dim]({_bytes_text(stats[1])})[/dim]'


# -- FLOPs --------------------------------------------------------------------
def _abstract(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, 'shape') else x


def _is_inexact(x) -> bool:
  """Whether ``x`` is a float or complex array (what a VJP differentiates)."""
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)


def _flops(lowered) -> int:
  cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # one entry per device in some JAX versions
    cost = cost[0] if cost else None
  return int(cost['flops']) if cost and 'flops' in cost else 0


def _call_flops(fn, obj, args, kwargs, backward: bool) -> int:
  """XLA's FLOP estimate of ``fn(obj, *args, **kwargs)`` alone (``backward``: with its VJP)."""
  graphdef, state = api.split(((obj, args), kwargs), graph=True)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  leaves = [_abstract(x) for x in leaves]

  def call(leaves):
    (o, a), kw = api.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    return fn(o, *a, **kw)

  if not backward:
    return _flops(jax.jit(call).lower(leaves))
  inexact = [i for i, x in enumerate(leaves) if _is_inexact(x)]

  def forward_backward(diff, rest):
    def f(diff):
      full = list(rest)
      for i, x in zip(inexact, diff):
        full[i] = x
      return [y for y in jax.tree_util.tree_leaves(call(full)) if _is_inexact(y)]
    out, pullback = jax.vjp(f, diff)
    return pullback(out)

  diff = [leaves[i] for i in inexact]
  return _flops(jax.jit(forward_backward).lower(diff, leaves))


# -- recording calls ----------------------------------------------------------
class _Recorder:
  """Records the calls of one ``tabulate``: the patched methods report to it."""

  def __init__(self, compute_flops: bool, compute_vjp_flops: bool, depth: int | None):
    self.depth = depth
    self.infos: dict[int, _NodeInfo] = {}
    self.rows: list[CallInfo] = []
    self.active: set[tuple[int, str]] = set()
    self.seen: set[tuple] = set()
    self.order = itertools.count()
    self.paused = False
    self.compute_flops = compute_flops
    self.compute_vjp_flops = compute_vjp_flops
    self.pending: list = []
    self.kept: list = []

  def call(self, fn, name: str, obj, args, kwargs):
    key = (id(obj), name)
    info = self.infos.get(id(obj))
    if self.paused or info is None or key in self.active:  # not ours, or a super() call
      return fn(obj, *args, **kwargs)
    inputs = _inputs_text(args, kwargs)
    identity = (id(obj), name, inputs)
    row = None
    call = functools.partial(fn, obj, *args, **kwargs)
    self.active.add(key)
    try:
      if identity not in self.seen:  # the same call again (a shared layer) is one row
        self.seen.add(identity)
        path = info.path if name == '__call__' else (*info.path, name)
        shown = self.depth is None or len(path) <= self.depth  # FLOPs only for rows shown
        order = next(self.order)  # before the calls inside it: rows list in pre-order
        flops = None
        if shown and self.compute_flops:
          # Lowering traces the body once (the calls inside record their own rows); the
          # call below then reuses that trace, so every body runs once, as in NNX.
          call = _TracedCall(fn, obj, args, kwargs)
          flops = call.flops()
        row = CallInfo(order, id(obj), type(obj), path, inputs, '', flops,
                       self._vjp_flops(fn, obj, args, kwargs) if shown else None)
        self.rows.append(row)
      out = call()
    finally:
      self.active.discard(key)
    if row is not None:
      row.outputs = _text(out) if out is not None else ''
    return out

  def expect(self, originals) -> None:
    """The next ``adopt`` receives copies of ``originals`` (a pytree of objects)."""
    self.pending = _nodes(originals)

  def adopt(self, copies) -> None:
    """Report the calls of ``copies`` (made from what ``expect`` was given) as the originals'."""
    for original, copy in zip(self.pending, _nodes(copies)):
      info = self.infos.get(id(original))
      if info is not None:
        self.infos[id(copy)] = info
        self.kept.append(copy)  # alive while its id names it here

  def _vjp_flops(self, fn, obj, args, kwargs) -> int | None:
    if not self.compute_vjp_flops:
      return None
    self.paused = True  # the calls made while lowering are not rows
    try:
      return _call_flops(fn, obj, args, kwargs, backward=True)
    finally:
      self.paused = False


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run_split(fn, graphdef, treedef, caller, leaves):
  # ``caller`` (the object's id) keeps equal layers apart: each one's calls inside are rows.
  merged = api.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
  if _RECORDERS:  # the copies made here are the caller's objects: their calls are rows too
    _RECORDERS[-1].adopt(merged)
  (obj, args), kwargs = merged
  return fn(obj, *args, **kwargs)


class _TracedCall:
  """``fn(obj, *args, **kwargs)`` as one jitted function: lowered for its FLOPs, then called
  with the same argument types, which reuses the trace the lowering made."""

  def __init__(self, fn, obj, args, kwargs):
    self.originals = ((obj, args), kwargs)
    graphdef, state = api.split(self.originals, graph=True)
    self.leaves, treedef = jax.tree_util.tree_flatten(state)
    self.static = (fn, graphdef, treedef, id(obj))

  def flops(self) -> int:
    _RECORDERS[-1].expect(self.originals)
    return _flops(_run_split.lower(*self.static, self.leaves))

  def __call__(self):
    return _run_split(*self.static, self.leaves)


def _nodes(tree) -> list:
  """The objects of ``tree`` in graph order (equal for an object graph and its merged copy)."""
  return [x for _, x in api.iter_graph(tree, graph=True) if isinstance(x, Pytree)]


_RECORDERS: list[_Recorder] = []


def _recording(fn, name: str):
  @functools.wraps(fn)
  def method(self, *args, **kwargs):
    if not _RECORDERS:
      return fn(self, *args, **kwargs)
    return _RECORDERS[-1].call(fn, name, self, args, kwargs)
  return method


def _methods(cls: type) -> dict[str, types.FunctionType]:
  """The public methods of ``cls`` and ``__call__`` (plain functions only, own or inherited)."""
  found = {}
  for klass in reversed(cls.__mro__[:-1]):  # bases first, so overrides win
    for name, attr in vars(klass).items():
      if not name.startswith('_') or name == '__call__':
        found[name] = attr
  return {k: v for k, v in found.items() if isinstance(v, types.FunctionType)}


class _Patched:
  """Within the block, the methods of ``classes`` report their calls to the active recorder."""

  def __init__(self, classes: tp.Iterable[type]):
    self.classes = list(classes)
    self.saved: list[tuple[type, str, tp.Any]] = []

  def __enter__(self):
    for cls in self.classes:
      for name, fn in _methods(cls).items():
        self.saved.append((cls, name, cls.__dict__.get(name, _ABSENT)))
        setattr(cls, name, _recording(fn, name))
    return self

  def __exit__(self, *exc):
    for cls, name, original in reversed(self.saved):
      if original is _ABSENT:
        delattr(cls, name)
      else:
        setattr(cls, name, original)
    return False


_ABSENT = object()
_NO_OPTIONS: tp.Mapping[str, tp.Any] = types.MappingProxyType({})


# -- the table ----------------------------------------------------------------
def _variables_text(info: _NodeInfo, kind: type) -> str:
  """A kind's cell: the object's own Variables of that kind, then the kind's total under it."""
  entries = {}
  for key, v in info.own.get(kind, {}).items():
    value = v.get_value()
    value_text = value if hasattr(value, 'shape') and hasattr(value, 'dtype') else ''
    metadata = v.get_metadata(exclude_required=True)
    if metadata:
      entries[key] = {'value': value_text, **metadata}
    elif value_text != '':
      entries[key] = value_text
  text = _text(entries) + '\n\n' if entries else ''
  if kind in info.stats:
    text += f'[bold]{_size_text(info.stats[kind])}[/bold]'
  return text


def _render(table, console_kwargs: tp.Mapping) -> str:
  out = io.StringIO()
  options = {'force_terminal': True, 'force_jupyter': in_notebook(), **console_kwargs}
  rich.console.Console(file=out, **options).print(table)
  return out.getvalue()


def tabulate(obj, *input_args, depth: int | None = None, method: str = '__call__',
             row_filter: tp.Callable[[CallInfo], bool] = filter_rng_streams,
             table_kwargs: tp.Mapping[str, tp.Any] = _NO_OPTIONS,
             column_kwargs: tp.Mapping[str, tp.Any] = _NO_OPTIONS,
             console_kwargs: tp.Mapping[str, tp.Any] = _NO_OPTIONS,
             compute_flops: bool = False, compute_vjp_flops: bool = False,
             **input_kwargs) -> str:
  """A table of the calls ``obj.<method>(*input_args, **input_kwargs)`` makes, with the state
  of each object called (see the module docstring for the columns).

  The call runs abstractly on a copy (``jax.eval_shape``): ``obj`` is not changed
  and nothing is computed.

  Args:
    obj: the object to run (a Module or other ``nnx.Pytree``).
    *input_args: positional arguments of the call.
    depth: show only rows whose path has at most this many parts.
    method: the method to call (default ``'__call__'``).
    row_filter: keeps the rows for which it returns True (default: hides RngStream draws).
    table_kwargs: extra arguments of ``rich.table.Table``.
    column_kwargs: extra arguments of ``Table.add_column``.
    console_kwargs: extra arguments of ``rich.console.Console`` (e.g. ``width``,
      ``force_terminal=False`` for plain text without escape codes).
    compute_flops: add a ``flops`` column (XLA's estimate of each call's forward pass).
    compute_vjp_flops: add a ``vjp_flops`` column (forward and backward pass).
    **input_kwargs: keyword arguments of the call.
  Returns:
    The rendered table.
  """
  if not callable(getattr(obj, method, None)):
    raise AttributeError(f'tabulate: {type(obj).__name__} has no method {method!r} to call. '
                         f"Pass the name of one with method='...'.")
  outer = _collect(obj)
  kinds: set[type] = set()
  for info in outer.values():
    kinds.update(info.own)
  kinds_sorted = sorted(kinds, key=lambda t: t.__name__)
  classes = {type(info.node) for info in outer.values() if isinstance(info.node, Pytree)}

  recorder = _Recorder(compute_flops, compute_vjp_flops, depth)
  graphdef, state = api.split(((obj, input_args), input_kwargs), graph=True)

  def run(state):
    (model, args), kwargs = api.merge(graphdef, state)
    recorder.infos = _collect(model)
    getattr(model, method)(*args, **kwargs)

  with _Patched(classes):
    _RECORDERS.append(recorder)
    try:
      jax.eval_shape(run, state)
    finally:
      _RECORDERS.remove(recorder)
      # its traces are keyed by object ids, valid for this run only
      _run_split.clear_cache()  # pyright: ignore[reportAttributeAccessIssue]  (jax.jit's method)

  rows = [r for r in sorted(recorder.rows, key=lambda r: r.call_order)
          if (depth is None or len(r.path) <= depth) and row_filter(r)]

  table = rich.table.Table(**{'show_header': True, 'show_lines': True, 'show_footer': True,
                              'title': f'{type(obj).__name__} Summary', **table_kwargs})
  columns = ['path', 'type', 'inputs', 'outputs']
  columns += ['flops'] * compute_flops + ['vjp_flops'] * compute_vjp_flops
  for name in columns + [k.__name__ for k in kinds_sorted]:
    table.add_column(name, **column_kwargs)
  # The cells describe the caller's objects (concrete values: a Python number is no array,
  # as in the totals), found by the path of the traced copy that was called.
  by_path = {info.path: info for info in outer.values()}
  for row in rows:
    info = by_path[recorder.infos[row.object_id].path]
    cells = ['/'.join(map(str, row.path)), row.type.__name__, row.inputs_repr, row.outputs]
    cells += [str(row.flops)] * compute_flops + [str(row.vjp_flops)] * compute_vjp_flops
    cells += [_variables_text(info, kind) for kind in kinds_sorted]
    table.add_row(*cells)

  total = outer[id(obj)].stats
  table.columns[len(columns) - 1].footer = rich.text.Text.from_markup('Total', justify='right')
  for i, kind in enumerate(kinds_sorted):
    if kind in total:
      table.columns[len(columns) + i].footer = _size_text(total[kind])
  table.caption_style = 'bold'
  everything = [sum(n for n, _ in total.values()), sum(b for _, b in total.values())]
  table.caption = f'\nTotal Parameters: {_size_text(everything)}'
  return _render(table, console_kwargs)
