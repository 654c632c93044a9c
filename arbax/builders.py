"""Building objects from defs: the one builder behind ``GraphDef.build`` (merge, unflatten,
transforms, the update contexts) and the fused builder that reads a State while building.

    >>> import jax.numpy as jnp, arbax as nnx
    >>> from arbax import builders
    >>> class Foo(nnx.Module):
    ...   def __init__(self):
    ...     self.w = nnx.Param(jnp.ones(2))
    >>> graphdef, state = nnx.split(Foo())
    >>> build = builders.compiled(graphdef.root, builders.Options())
    >>> foo = build(iter([state['w']]), [], None)
    >>> type(foo).__name__, foo.w is state['w']
    ('Foo', True)

Each def compiles once into a closure ``build(leaves_iterator, nodes, trace)``, so
building never re-dispatches on tags. The closures are cached globally by
``(def, options)``: equal structures (2,500 identical ``Linear`` layers, the
GraphDef of the same model flattened again) share one compiled builder.

``Options``, fixed at compile time:

* ``track``: append every object to ``nodes`` in the numbering of ``arbax.defs``
  (refs index that list; a caller may pre-fill it to continue an index space).
* ``copy``: copy the Variables found among the leaves.
* ``reuse``: ``nodes`` carries ``reuse`` (a list by object number): where it holds
  an object, that object is updated in place instead of a new one made (a Pytree gets
  the described attributes, a Variable the leaf's value and the def's metadata).
* ``recreate``: a raw value at a Variable def becomes a Variable of the recorded kind
  (else it stays raw).
* ``adopt``: a reused object of another class takes the def's class (graph updates of
  transforms, where ``m.__class__ = ...`` is a structural change); else a ValueError,
  as NNX's update contexts raise.

Every node built gets its own copy of its static lists and dicts and records the
trace it was built in (``trace``), so writes from other traces are refused.
"""
from __future__ import annotations

import typing as tp

import jax

from arbax import _structure, caches
from arbax.defs import (VAR, NODE, LEAF, STATIC, REF, SEQ, MAP, JAXNODE, ARRAYREF, ArrayRefOutput,
                        Hashed, NoUpdate)
from arbax.pytree import node_template, set_dict, set_seen, set_trace
from arbax.state import State
from arbax.variables import Variable

__all__ = ['Options', 'compiled', 'ReusingNodes', 'fused', 'NO_FIT', 'NoFit']


class Options(tp.NamedTuple):
  track: bool = False
  copy: bool = False
  reuse: bool = False
  recreate: bool = True
  adopt: bool = True


class ReusingNodes(list):
  """The ``nodes`` list of a reusing build: also holds, by object number, the existing object
  to update in place (None: make a new one)."""

  def __init__(self, prefix: tp.Iterable, reuse: list):
    super().__init__(prefix)
    self.reuse = reuse


_CACHE = caches.bounded('compiled GraphDef builders', maxsize=20_000)


def compiled(d, opts: Options) -> tp.Callable:
  """The compiled builder of def ``d`` (cached by ``(d, opts)``)."""
  return _cached(d, opts, None)


# Hashing a def hashes everything below it (tuples do not keep their hash), so looking up
# every def of a chain of n nested Modules would cost n * n / 2 hashes. Below the root, only
# defs at most this many levels tall (the repeated layers worth sharing) are looked up.
_SHARED_HEIGHT = 32


def _cached(d, opts: Options, heights: dict | None) -> tp.Callable:
  """``d`` compiled, from the cache when it is the root (``heights`` None) or short enough."""
  if heights is not None and heights[id(d)] > _SHARED_HEIGHT:
    return _COMPILERS[d[0]](d, opts, heights)
  key = (d, opts)
  try:
    return _CACHE[key]
  except KeyError:
    pass
  except TypeError:  # a def holding a value that cannot be hashed after all: not shared
    return _COMPILERS[d[0]](d, opts, heights or def_heights(d))
  fn = _CACHE[key] = _COMPILERS[d[0]](d, opts, heights or def_heights(d))
  return fn


def def_heights(root) -> dict:
  """``{id(def): height}`` for every def under ``root`` (a leaf is 1 tall), without recursion.

      >>> from arbax import defs
      >>> leaf = defs.LEAF_DEF
      >>> pair = defs.seq_def(tuple, (leaf, defs.seq_def(tuple, (leaf,))))
      >>> def_heights(pair)[id(pair)]
      3
  """
  order = [root]
  for d in order:  # grows while it is read: every def, parents before their children
    order.extend(c for _, c in d.entries())
  heights: dict = {}
  for d in reversed(order):
    heights[id(d)] = 1 + max((heights[id(c)] for _, c in d.entries()), default=0)
  return heights


def _static_value(v):
  return v.value if type(v) is Hashed else v


# -- Variables ---------------------------------------------------------------------


def _var_fixer(cls, meta, opts: Options):
  """What a leaf at a Variable def becomes: the Variable itself, a copy, or a new one."""
  from_parts = cls._from_parts
  copy, recreate = opts.copy, opts.recreate

  def fix(leaf):
    if isinstance(leaf, Variable):
      if copy:
        leaf = leaf.copy()
      if type(leaf) is not cls:
        leaf = from_parts(leaf._value, leaf._meta)
      return leaf
    return from_parts(leaf, meta) if recreate else leaf

  if not meta.items.get('ref'):
    return fix

  def fix_ref(leaf):
    # A ref Variable leaving a transform arrives as its value (ArrayRefOutput): a new Ref.
    raw = leaf.get_raw_value() if isinstance(leaf, Variable) else leaf
    if type(raw) is ArrayRefOutput:
      return from_parts(raw.value, leaf._meta if isinstance(leaf, Variable) else meta)
    if type(raw) is NoUpdate:
      raise ValueError(f'A {cls.__name__} arrived without its value (NoUpdate: the Ref stayed '
                       'with the object outside the transform), but no outer object is known '
                       'for it here. Merge it in the update context it was split in.')
    return fix(leaf)
  return fix_ref


def _slot_of(var):
  """The entry of a ref Variable's ref slot in ``nodes``: its Ref, or None when it holds none."""
  raw = var.get_raw_value()
  return raw if isinstance(raw, jax.Ref) else None


def _compile_var(d, opts: Options, heights: dict):
  cls, meta = d[1], d[2]
  fix = _var_fixer(cls, meta, opts)
  track = opts.track
  slot = bool(meta.items.get('ref'))
  if opts.reuse:
    return _compile_reused_var(cls, meta, fix, slot)

  if not track:
    def build_var(it, nodes, trace):
      return fix(next(it))
    return build_var

  if slot:
    def build_ref_var(it, nodes, trace):
      var = fix(next(it))
      nodes.append(var)
      nodes.append(_slot_of(var))
      return var
    return build_ref_var

  def build_tracked_var(it, nodes, trace):
    var = fix(next(it))
    nodes.append(var)
    return var
  return build_tracked_var


def _compile_reused_var(cls, meta, fix, slot: bool):
  set_attr = object.__setattr__

  def reuse_var(it, nodes, trace):
    index = len(nodes)
    old = nodes.reuse[index]
    leaf = next(it)
    if old is None:
      var = fix(leaf)
    else:
      if not isinstance(old, Variable):
        raise ValueError(f'Expected a Variable for index {index}, but the outer object there is '
                         f'a {type(old).__name__}.')
      var = old
      value = leaf._value if isinstance(leaf, Variable) else leaf
      if type(value) is ArrayRefOutput:
        value = value.value
      if type(value) is not NoUpdate and value is not var:
        set_attr(var, '_value', value)
      if var._meta is not meta and var._meta != meta:
        set_attr(var, '_meta', meta)
    nodes.append(var)
    if slot:
      nodes.append(_slot_of(var))
    return var
  return reuse_var


# -- Pytrees -----------------------------------------------------------------------


def _child_builders(attrs, opts: Options, heights: dict) -> tuple:
  """``((key, Variable class or None, fixer or builder), ...)``: without tracking, a Variable
  attribute is placed inline (the common case of merge), no call when it is already of its kind."""
  inline = not opts.track and not opts.copy and not opts.reuse
  specs = []
  for k, c in attrs:
    if inline and c[0] == VAR:
      specs.append((k, c[1], _var_fixer(c[1], c[2], opts)))
    else:
      specs.append((k, None, _cached(c, opts, heights)))
  return tuple(specs)


def _compile_node(d, opts: Options, heights: dict):
  cls, aux = d[1], d[2]
  specs = _child_builders(d[3], opts, heights)
  values, kinds, mutable, hook = node_template(cls, aux)
  snapshot = _structure.snapshot
  new = object.__new__
  track = opts.track
  if opts.reuse:
    return _compile_reused_node(cls, specs, values, kinds, mutable, hook, opts.adopt)

  def build_node(it, nodes, trace):
    obj = new(cls)
    if track:
      nodes.append(obj)  # before the children: refs (cycles) may point back at it
    od = values.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, v in mutable:  # a static list of its own, not the def's snapshot
      od[k] = snapshot(v)
    set_dict(obj, '__dict__', od)
    set_trace(obj, trace)
    set_seen(obj, False)
    for k, var_cls, b in specs:
      if var_cls is None:
        od[k] = b(it, nodes, trace)
      else:
        leaf = next(it)
        od[k] = leaf if type(leaf) is var_cls else b(leaf)
    if hook is not None:
      hook(obj)
    return obj
  return build_node


def _compile_reused_node(cls, specs, values, kinds, mutable, hook, adopt: bool):
  snapshot = _structure.snapshot
  new = object.__new__

  def reuse_node(it, nodes, trace):
    index = len(nodes)
    old = nodes.reuse[index]
    if old is not None and type(old) is not cls and not adopt:
      raise ValueError(f'Expected a node of type {cls.__name__} for index {index}, but the outer '
                       f'object there is a {type(old).__name__}.')
    obj = new(cls) if old is None else old
    nodes.append(obj)
    od = values.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, v in mutable:
      od[k] = snapshot(v)
    if old is None:
      set_dict(obj, '__dict__', od)
      set_trace(obj, trace)
      set_seen(obj, False)
    for k, _, b in specs:
      od[k] = b(it, nodes, trace)
    if old is not None:
      _adopt_dict(obj, cls, od)
    if hook is not None:
      hook(obj)
    return obj
  return reuse_node


def _adopt_dict(obj, cls, new_dict: dict) -> None:
  """Give an existing Pytree the attributes ``new_dict`` describes, keeping its own bookkeeping
  entries (``_arbax_*`` keys the template does not set) and the identity of its ``__dict__``."""
  d = obj.__dict__
  kept = {k: v for k, v in d.items() if isinstance(k, str) and k.startswith('_arbax_')
          and k not in new_dict}
  d.clear()
  d.update(new_dict)
  d.update(kept)
  if type(obj) is not cls:
    obj.__class__ = cls


# -- leaves, statics, refs, containers ---------------------------------------------


def _compile_leaf(d, opts: Options, heights: dict):
  def build_leaf(it, nodes, trace):
    return next(it)
  return build_leaf


def _new_ref(leaf):
  """A raw Ref's leaf: the Ref itself, or its value when it left a transform (a new Ref)."""
  if type(leaf) is ArrayRefOutput:
    return jax.new_ref(leaf.value)
  if type(leaf) is NoUpdate:
    raise ValueError('A jax.Ref arrived without its value (NoUpdate: it stayed with the object '
                     'outside the transform), but no outer Ref is known for it here. Merge it in '
                     'the update context it was split in.')
  return leaf


def _compile_array_ref(d, opts: Options, heights: dict):
  if opts.reuse:
    def reuse_array_ref(it, nodes, trace):
      old = nodes.reuse[len(nodes)]
      leaf = next(it)
      ref = old if old is not None else _new_ref(leaf)  # the caller's Ref was written in place
      nodes.append(ref)
      return ref
    return reuse_array_ref
  if opts.track:
    def build_tracked_array_ref(it, nodes, trace):
      ref = _new_ref(next(it))
      nodes.append(ref)
      return ref
    return build_tracked_array_ref

  def build_array_ref(it, nodes, trace):
    return _new_ref(next(it))
  return build_array_ref


def _compile_static(d, opts: Options, heights: dict):
  value = _static_value(d[1])

  def build_static(it, nodes, trace):
    return value
  return build_static


def _compile_ref(d, opts: Options, heights: dict):
  index = d[1]

  def build_ref(it, nodes, trace):
    return nodes[index]
  return build_ref


def _compile_seq(d, opts: Options, heights: dict):
  t, builders = d[1], tuple(_cached(c, opts, heights) for c in d[2])

  def build_seq(it, nodes, trace):
    return t([b(it, nodes, trace) for b in builders])
  return build_seq


def _compile_map(d, opts: Options, heights: dict):
  t, pairs = d[1], tuple(zip(d[2], (_cached(c, opts, heights) for c in d[3])))

  def build_map(it, nodes, trace):
    out = t()
    for k, b in pairs:
      dict.__setitem__(out, k, b(it, nodes, trace))
    return out
  return build_map


def _compile_jaxnode(d, opts: Options, heights: dict):
  treedef, builders = d[1], tuple(_cached(c, opts, heights) for c in d[3])

  def build_jaxnode(it, nodes, trace):
    return treedef.unflatten([b(it, nodes, trace) for b in builders])
  return build_jaxnode


_COMPILERS = {VAR: _compile_var, NODE: _compile_node, LEAF: _compile_leaf,
              STATIC: _compile_static, REF: _compile_ref, SEQ: _compile_seq, MAP: _compile_map,
              JAXNODE: _compile_jaxnode, ARRAYREF: _compile_array_ref}


# -- fused builders: read a State while building (merge's fast path) ----------------
# Each def with leaves compiles to ``f(entry, trace)`` where ``entry`` is its part of
# the State (the leaf itself for a Variable); defs without leaves get None. Any
# mismatch between the State and the GraphDef raises NoFit (or the KeyError of a
# missing key), and merge falls back to matching paths one by one. GraphDefs with
# refs or Refs (which need the object numbering) take the general path.

NO_FIT = object()


class NoFit(Exception):
  pass


_BRANCHES = frozenset({dict, State})


def fused(d) -> tp.Callable:
  """The fused builder of ``d``: ``f(state, trace) -> object`` (raises NoFit on a mismatch)."""
  return _fused(d)[0]


def _fused(d) -> tuple[tp.Callable, bool]:
  """``(reader, whether d holds leaves)``."""
  tag = d[0]
  if tag == VAR:
    cls, fix = d[1], _var_fixer(d[1], d[2], Options())

    def read_var(leaf, trace):
      if type(leaf) is cls:
        return leaf
      if type(leaf) in _BRANCHES:
        raise NoFit
      return fix(leaf)
    return read_var, True
  if tag == LEAF:
    def read_leaf(leaf, trace):
      if type(leaf) in _BRANCHES:
        raise NoFit
      return leaf
    return read_leaf, True
  if tag == STATIC:
    value = _static_value(d[1])

    def read_static(_, trace):
      return value
    return read_static, False
  if tag == NODE:
    return _fused_node(d)
  specs, expected = _child_specs(d.entries())
  if tag == SEQ:
    t = d[1]

    def read_seq(level, trace):
      return t(_read_children(level, specs, expected, trace).values())
    return read_seq, expected > 0
  if tag == MAP:
    t = d[1]

    def read_map(level, trace):
      out = t()
      dict.update(out, _read_children(level, specs, expected, trace))
      return out
    return read_map, expected > 0
  treedef = d[1]

  def read_jaxnode(level, trace):
    return treedef.unflatten(list(_read_children(level, specs, expected, trace).values()))
  return read_jaxnode, expected > 0


def _child_specs(entries):
  """``((key, reader, has_leaves), ...)`` and how many keys the State level must have."""
  specs = []
  for k, c in entries:
    reader, has = _fused(c)
    specs.append((k, reader, has))
  specs = tuple(specs)
  return specs, sum(1 for _, _, has in specs if has)


def _read_children(level, specs, expected, trace) -> dict:
  if expected and (type(level) not in _BRANCHES or len(level) != expected):
    raise NoFit
  return {k: f(level[k] if has else None, trace) for k, f, has in specs}


def _fused_node(d):
  cls, aux, attrs = d[1], d[2], d[3]
  specs, expected = _child_specs(attrs)
  inline = tuple((k, c[1], f) if c[0] == VAR else (k, None, f)
                 for (k, f, _), (_, c) in zip(specs, attrs))
  empty = tuple((k, f) for k, f, has in specs if not has)
  filled = tuple(spec for spec, (_, _, has) in zip(inline, specs) if has)
  values, kinds, mutable, hook = node_template(cls, aux)
  snapshot = _structure.snapshot
  new = object.__new__

  def read_node(level, trace):
    if expected and (type(level) not in _BRANCHES or len(level) != expected):
      raise NoFit
    obj = new(cls)
    od = values.copy()
    od['_arbax_kinds'] = kinds.copy()
    for k, v in mutable:
      od[k] = snapshot(v)
    for k, var_cls, f in filled:
      entry = level[k]
      od[k] = entry if type(entry) is var_cls else f(entry, trace)
    for k, f in empty:
      od[k] = f(None, trace)
    set_dict(obj, '__dict__', od)
    set_trace(obj, trace)
    set_seen(obj, False)
    if hook is not None:
      hook(obj)
    return obj
  return read_node, expected > 0

