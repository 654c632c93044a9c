"""Rngs: named streams of PRNG keys that live in Variables.

    >>> import arbax as nnx
    >>> rngs = nnx.Rngs(0, dropout=1)
    >>> k1, k2 = rngs(), rngs.dropout()      # fresh keys: fold_in(key, count), count += 1
    >>> rngs.normal((2, 3)).shape             # every jax.random distribution, key supplied
    (2, 3)
    >>> int(rngs.default.count[...])
    2

An unknown stream name falls back to ``default``. Keys and counts are
Variables (``RngKey``, ``RngCount``), so ``split``, ``state`` and the
transforms carry them like any other state.
"""
from __future__ import annotations

import functools
import typing as tp
import warnings

import jax
import jax.numpy as jnp

from arbax import _settings, abstract_init, api, filters as filterlib
from arbax.errors import format_path
from arbax.pytree import Pytree
from arbax.variables import Variable

_MISSING = object()

__all__ = ['RngState', 'RngKey', 'RngCount', 'RngStream', 'Rngs', 'reseed', 'split_rngs',
           'fork_rngs', 'with_rngs', 'restore_rngs', 'SplitBackups', 'stream_predicate']


class RngState(Variable):
  """Base kind of the Variables an RngStream holds: the filter for all random state.

      >>> import arbax as nnx
      >>> sorted(nnx.state(nnx.Rngs(0), nnx.RngState)['default'])
      ['count', 'key']
  """
  _arbax_display_kind = 'RngState'


class RngKey(RngState):
  """A stream's base key (a typed ``key<fry>`` array), tagged with the stream's name.

      >>> import arbax as nnx
      >>> key = nnx.Rngs(dropout=0).dropout.key
      >>> type(key).__name__, key.tag, str(key[...].dtype)
      ('RngKey', 'dropout', 'key<fry>')
  """


class RngCount(RngState):
  """How many keys a stream has drawn (uint32, one counter per key), tagged with the stream's name.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(0)
      >>> _ = rngs(); _ = rngs()
      >>> int(rngs.default.count[...])
      2
  """


def _as_key(seed) -> jax.Array:
  if isinstance(seed, Variable):
    seed = seed.get_value()
  if isinstance(seed, int) and not isinstance(seed, bool):
    return jax.random.key(seed)
  dtype = getattr(seed, 'dtype', None)
  # Past the int case only an array can pass the dtype checks below (a bool has no dtype).
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return tp.cast(jax.Array, seed)
  if dtype == jnp.uint32 and getattr(seed, 'shape', ())[-1:] == (2,):  # raw key data (PRNGKey)
    return jax.random.wrap_key_data(tp.cast(jax.Array, seed))
  if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and getattr(seed, 'shape', None) == ():
    return jax.random.key(seed)
  raise ValueError(f'Invalid rng seed {seed!r} of type {type(seed).__name__}: expected an int or '
                   'a JAX PRNG key (jax.random.key(...)).')


# Everything in jax.random that draws samples from a key (first argument).
_NOT_DISTRIBUTIONS = frozenset({
    'key', 'PRNGKey', 'split', 'fold_in', 'key_data', 'wrap_key_data', 'key_impl', 'clone',
    'default_prng_impl', 'threefry_2x32', 'threefry2x32_key', 'rbg_key', 'unsafe_rbg_key',
    'KeyArray', 'PRNGKeyArray', 'random_wrap', 'random_unwrap', 'key_dtype', 'random_seed',
    'random_split', 'random_fold_in', 'random_bits'})
_DISTRIBUTIONS = frozenset(
    name for name in dir(jax.random)
    if not name.startswith('_') and name not in _NOT_DISTRIBUTIONS
    and callable(getattr(jax.random, name)) and not isinstance(getattr(jax.random, name), type))

# Initializer constructors that become keyless: ``rngs.lecun_normal()(shape)``. Names that
# clash with a distribution (normal, uniform, ...) stay distributions.
_INITIALIZERS = frozenset({
    'delta_orthogonal', 'glorot_normal', 'glorot_uniform', 'he_normal', 'he_uniform',
    'kaiming_normal', 'kaiming_uniform', 'lecun_normal', 'lecun_uniform', 'variance_scaling',
    'xavier_normal', 'xavier_uniform'})


def _random_method(owner, name: str):
  """``owner.<name>`` for a distribution or initializer, drawing keys from ``owner()``."""
  if name in _DISTRIBUTIONS:
    fn = getattr(jax.random, name)

    @functools.wraps(fn)
    def draw(*args, **kwargs):
      return fn(owner(), *args, **kwargs)

    return draw
  make = getattr(jax.nn.initializers, name)

  @functools.wraps(make)
  def keyless(*args, **kwargs):
    init = make(*args, **kwargs)
    return lambda *shape_args, **shape_kwargs: init(owner(), *shape_args, **shape_kwargs)

  return keyless


class _RandomMethods:
  """Every jax.random distribution and the keyed initializers as methods, keys supplied."""

  def __getattr__(self, name) -> tp.Any:
    if name in _DISTRIBUTIONS or name in _INITIALIZERS:
      return _random_method(self, name)
    raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

  def __dir__(self):
    return sorted({*super().__dir__(), *_DISTRIBUTIONS, *_INITIALIZERS})


@functools.partial(jax.jit, inline=True)
def _next_key(key: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(fold_in(key, count), count + 1)``: a stream's next key and count.

  Jitted, so an eager draw is one dispatch rather than two, and under a
  transform its trace is reused; the numbers are the ops' own.
  """
  return jax.random.fold_in(key, count), count + 1


def _shape(k: int | tuple[int, ...]) -> tuple[int, ...]:
  return (k,) if isinstance(k, int) else tuple(k)


class RngStream(_RandomMethods, Pytree):
  """One named stream of keys: a base key and a counter. Calling it returns a new key.

  Each call returns ``fold_in(key, count)`` and increments the count, so the
  keys are deterministic and never repeat. Every ``jax.random`` distribution is
  a method with the key supplied (``stream.normal((2,))``), and the keyed
  initializers become keyless (``stream.lecun_normal()(shape)``).

      >>> import arbax as nnx
      >>> stream = nnx.RngStream(0, tag='dropout')
      >>> key = stream()
      >>> stream.uniform((3,)).shape             # draws with the next key
      (3,)
      >>> int(stream.count[...])
      2

  Args:
    key: an int seed or a JAX PRNG key (typed, or raw ``uint32[2]`` key data).
    tag: the stream's name; its key and count Variables carry it as ``tag``.
  """

  def __init__(self, key, *, tag: str):
    key = _as_key(key)
    self.tag = tag
    self.key = RngKey(key, tag=tag)
    # One counter per key, so a split stream (keys of shape (n,)) stays vmappable.
    self.count = RngCount(jnp.zeros(key.shape, dtype=jnp.uint32), tag=tag)

  def __call__(self) -> jax.Array:
    # Under nnx.eval_shape only the kind of key matters: one per key/count type is traced,
    # and a count handed back again is the one the stream holds already.
    old = self.count[...]
    key, count = abstract_init.reuse('rng', _next_key, self.key[...], old)
    if count is not old:
      self.count[...] = count
    return key

  def split(self, k: int | tuple[int, ...]) -> 'RngStream':
    """A new stream whose key is a fresh key of this one split ``k`` ways (to ``vmap`` over).

        >>> import arbax as nnx
        >>> nnx.RngStream(0, tag='params').split(4).key.shape
        (4,)

    Args:
      k: the number of keys, or a shape.

    Returns:
      The new stream (this one's count advances by one).
    """
    return type(self)(jax.random.split(self(), k), tag=self.tag)

  def fork(self, *, split: int | tuple[int, ...] | None = None) -> 'RngStream':
    """A new stream seeded with a fresh key of this one: independent keys, same tag.

        >>> import arbax as nnx
        >>> stream = nnx.RngStream(0, tag='params')
        >>> child = stream.fork()
        >>> child.tag, int(stream.count[...]), int(child.count[...])
        ('params', 1, 0)

    Args:
      split: deprecated; ``fork(split=k)`` is ``split(k)``.

    Returns:
      The new stream.
    """
    if split is not None:
      warnings.warn("The 'split' argument of 'fork' is deprecated; use the 'split' method instead.",
                    DeprecationWarning, stacklevel=2)
      return self.split(split)
    return type(self)(self(), tag=self.tag)

  def broadcast(self, k: int | tuple[int, ...]) -> 'RngStream':
    """A new stream whose key is one fresh key repeated to shape ``k``: every copy draws alike.

        >>> import arbax as nnx
        >>> nnx.RngStream(0, tag='params').broadcast(3).key.shape
        (3,)

    Args:
      k: the number of copies, or a shape.

    Returns:
      The new stream.
    """
    key = self()
    return type(self)(jnp.broadcast_to(key, _shape(k) + key.shape), tag=self.tag)


def stream_predicate(filter) -> tp.Callable[[tuple, RngStream], bool]:
  """``filter`` as a test of a whole RngStream found at ``path``.

  A stream matches when the filter accepts both its key and its count (seen at
  ``path + ('key',)`` and ``path + ('count',)``), so tags, Variable types, path
  filters and negations select streams as they select the streams' state:

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> not_params = stream_predicate(nnx.Not('params'))
      >>> [name for name, s in rngs.items() if not_params((name,), s)]
      ['dropout']

  Args:
    filter: any filter.

  Returns:
    A predicate ``(path, stream) -> bool``.
  """
  predicate = filterlib.to_predicate(filter)
  return lambda path, s: (predicate((*path, 'key'), s.key)
                          and predicate((*path, 'count'), s.count))


def _rules(spec) -> list[tuple[tp.Any, tp.Callable, tp.Any]]:
  """``k`` or ``{filter: k, ...}`` as ``[(filter, predicate, k), ...]``; ``k`` alone is for every stream."""
  if spec is None:
    return []
  if not isinstance(spec, tp.Mapping):
    spec = {...: spec}
  return [(f, stream_predicate(f), k) for f, k in spec.items()]


def _first_match(rules, path, stream):
  """The first rule (in the mapping's order) whose filter selects ``stream``, or None."""
  for rule in rules:
    if rule[1](path, stream):
      return rule
  return None


class Rngs(_RandomMethods, Pytree):
  """A set of named RngStreams: ``nnx.Rngs(0)``, ``nnx.Rngs(0, params=1)``, ``nnx.Rngs(params=k)``.

  Each stream is an attribute (``rngs.params``) and an item (``rngs['params']``);
  calling a stream draws a new key. The positional seed is the ``default``
  stream, used by ``rngs()`` and by any stream name that was not given, so a
  layer may ask for ``rngs.dropout`` without the user creating it. Every
  ``jax.random`` distribution is a method too (``rngs.normal(shape)``, keys
  from ``default``). The keys and counts are Variables, so ``nnx.split``,
  ``nnx.state`` and the transforms carry them like any other state.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(0, params=1)
      >>> sorted(rngs), 'dropout' in rngs
      (['default', 'params'], False)
      >>> k = rngs.params()                      # a new key from the params stream
      >>> rngs.dropout.tag                       # no dropout stream: default serves
      'default'
      >>> rngs.normal((2, 3)).shape
      (2, 3)

  Args:
    default: the seed of the ``default`` stream (an int or a key), or a mapping
      ``{name: seed}`` of streams.
    **streams: ``name=seed`` for each named stream (an int, a key, or an
      RngStream whose key is taken, its count restarting).
  """

  def __init__(self, default=None, /, **streams):
    if default is not None:
      if isinstance(default, tp.Mapping):
        streams = {**default, **streams}
      else:
        streams['default'] = default
    for tag, seed in streams.items():
      if isinstance(seed, RngStream):  # a new stream from its key: counts restart
        seed = seed.key.get_value()
      setattr(self, tag, RngStream(seed, tag=tag))

  def _stream(self, name: str, error: type[Exception]) -> RngStream:
    d = self.__dict__
    stream = d.get(name)
    if isinstance(stream, RngStream):
      return stream
    if isinstance(d.get('default'), RngStream):
      return d['default']
    raise error(f'No RngStream named {name!r} found in Rngs (streams: {list(self)}). Add it with '
                f'nnx.Rngs({name}=seed), or give a default seed: nnx.Rngs(0).')

  def __getattr__(self, name: str) -> tp.Any:
    # Reached only when normal lookup fails: random methods, then streams (default fallback).
    if name.startswith('__') or name.startswith('_arbax'):
      raise AttributeError(name)
    if name in _DISTRIBUTIONS or name in _INITIALIZERS:
      return _random_method(self, name)
    return self._stream(name, AttributeError)

  def __getitem__(self, name: str) -> RngStream:
    return self._stream(name, KeyError)

  def __call__(self) -> jax.Array:
    return self._stream('default', AttributeError)()

  def __iter__(self) -> tp.Iterator[str]:
    return (name for name, _ in self.items())

  def __len__(self) -> int:
    return sum(1 for _ in self.items())

  def __contains__(self, name) -> bool:
    return isinstance(self.__dict__.get(name), RngStream)

  def items(self) -> tp.Iterator[tuple[str, RngStream]]:
    """``(name, stream)`` for each RngStream, in creation order.

        >>> import arbax as nnx
        >>> [name for name, _ in nnx.Rngs(params=0, dropout=1).items()]
        ['params', 'dropout']

    Returns:
      An iterator of pairs.
    """
    return ((k, v) for k, v in list(self.__dict__.items()) if isinstance(v, RngStream))

  def split(self, k) -> 'Rngs':
    """New Rngs whose streams' keys are split ``k`` ways, to ``vmap`` over.

    ``k`` is a size/shape for every stream, or ``{filter: size_or_None, ...}``
    (first matching filter wins; ``None`` or no match: the stream is kept as it
    is). Each stream split gives one key, so this one's counters advance by one.

        >>> import arbax as nnx
        >>> split = nnx.Rngs(params=0, dropout=1).split({'params': 4})
        >>> split.params.key.shape, split.dropout.key.shape
        ((4,), ())

    Args:
      k: a size or shape, or a ``{filter: size_or_None}`` mapping.

    Returns:
      The new Rngs; streams kept as they are are the same RngStream objects.
    """
    return self._map_streams(k, RngStream.split, _same)

  def broadcast(self, k) -> 'Rngs':
    """New Rngs whose streams hold one fresh key each, repeated to shape ``k`` (or per filter).

        >>> import arbax as nnx
        >>> nnx.Rngs(params=0).broadcast(3).params.key.shape
        (3,)

    Args:
      k: a size or shape, or a ``{filter: size_or_None}`` mapping as for ``split``.

    Returns:
      The new Rngs.
    """
    return self._map_streams(k, RngStream.broadcast, _same)

  def fork(self, /, *, split=None) -> 'Rngs':
    """New Rngs whose streams are seeded with a fresh key of each stream here.

    The new streams draw keys independent of this Rngs' later keys: give one
    to each sub-computation that needs its own randomness.

        >>> import arbax as nnx
        >>> rngs = nnx.Rngs(params=0, dropout=1)
        >>> forked = rngs.fork()
        >>> sorted(forked), int(rngs.params.count[...])
        (['dropout', 'params'], 1)

    Args:
      split: deprecated (use ``split(k)``): a size or filter map; the streams it
        selects are split instead of forked.

    Returns:
      The new Rngs.
    """
    if split is not None:
      warnings.warn("The 'split' argument of 'fork' is deprecated; use the 'split' method instead.",
                    DeprecationWarning, stacklevel=2)
    return self._map_streams(split, RngStream.split, RngStream.fork)

  def _map_streams(self, spec, matched, unmatched) -> 'Rngs':
    rules = _rules(spec)
    new = {}
    for name, stream in self.items():
      rule = _first_match(rules, (name,), stream)
      new[name] = unmatched(stream) if rule is None or rule[2] is None else matched(stream, rule[2])
    return Rngs(**new)


def _same(stream):
  return stream


def _scalars_only(path, key, shape):
  if shape != ():
    raise ValueError(
        f'Cannot reseed the stream at {format_path(path)}: its key has shape {shape} (it was split). '
        "Pass policy='match_shape' to split the new key to that shape, or a callable "
        '(path, key, shape) -> key.')
  return key


def _match_shape(path, key, shape):
  return key if shape == () else jax.random.split(key, shape)


_POLICIES = {'scalars_only': _scalars_only, 'match_shape': _match_shape}


def reseed(node, /, *, graph: bool | None = None, policy='scalars_only', **stream_keys) -> None:
  """Give each RngStream in ``node`` whose tag is in ``stream_keys`` a new key and a zero count.

  The new key is the first key of ``nnx.Rngs(tag=seed)``, so reseeding with the
  seed a model was built with makes it draw the same keys as a model built with
  it after construction. ``policy`` handles split (non-scalar) keys.

      >>> import jax, arbax as nnx
      >>> rngs = nnx.Rngs(dropout=0)
      >>> nnx.reseed(rngs, dropout=7)
      >>> first = rngs.dropout()
      >>> nnx.reseed(rngs, dropout=7)            # the same keys again
      >>> bool((jax.random.key_data(rngs.dropout()) == jax.random.key_data(first)).all())
      True

  Args:
    node: any object or pytree holding RngStreams (a Module, an Rngs, ...).
    graph: how ``node`` is walked: graph mode, or tree mode (shared streams are
      an error); None uses ``nnx.set_graph_mode``.
    policy: for a split key: ``'scalars_only'`` raises a ValueError,
      ``'match_shape'`` splits the new key to the old key's shape, or a callable
      ``(path, key, shape) -> key``.
    **stream_keys: ``tag=seed`` (an int or a key) for each stream to reseed.
  """
  if isinstance(policy, str) and policy in _POLICIES:
    policy = _POLICIES[policy]
  elif not callable(policy):
    raise ValueError(f"policy must be 'scalars_only', 'match_shape' or a callable, got {policy!r}")
  seeds = Rngs(**stream_keys)
  for path, obj in list(api.iter_graph(node, graph=graph)):
    if isinstance(obj, RngStream) and obj.tag in stream_keys:
      key = policy(path, seeds[obj.tag](), obj.key.get_value().shape)
      obj.key.set_value(key)
      obj.count.set_value(jnp.zeros(key.shape, dtype=jnp.uint32))


# -- splitting and forking the streams of a whole graph ------------------------
class SplitBackups:
  """The streams an in-place ``split_rngs`` / ``fork_rngs`` changed, with their old keys.

  Iterate it for ``(stream, key, count)`` triples; ``nnx.restore_rngs(backups)``
  or leaving it as a ``with`` block puts the old keys and counts back:

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0)
      >>> with nnx.split_rngs(rngs, splits=4):
      ...   rngs.params.key.shape
      (4,)
      >>> rngs.params.key.shape
      ()

  Args:
    backups: the ``(stream, key, count)`` triples.
  """

  __slots__ = ('backups',)

  def __init__(self, backups: list):
    self.backups = backups

  def __iter__(self):
    return iter(self.backups)

  def __len__(self):
    return len(self.backups)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    restore_rngs(self)
    return False

  def __repr__(self):
    tags = ', '.join(repr(stream.tag) for stream, *_ in self.backups)
    return f'SplitBackups([{tags}])'


def restore_rngs(backups: tp.Iterable[tuple], /) -> None:
  """Put back the keys (and counts) an in-place ``split_rngs`` / ``fork_rngs`` replaced.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0)
      >>> backups = nnx.split_rngs(rngs, splits=4)
      >>> rngs.params.key.shape
      (4,)
      >>> nnx.restore_rngs(backups)
      >>> rngs.params.key.shape
      ()

  Args:
    backups: a ``SplitBackups``, or ``(stream, key)`` / ``(stream, key, count)`` tuples.
  """
  for backup in backups:
    stream, key = backup[0], backup[1]
    stream.key.set_value(key)
    if len(backup) == 3:
      stream.count.set_value(backup[2])


def _modes(graph, graph_updates) -> tuple[bool, bool]:
  return _settings.graph_mode(graph), _settings.graph_updates(graph_updates)


def _in_place(node, matches, new_key) -> SplitBackups:
  """Give every stream of ``node`` that ``matches`` the key ``new_key(stream)`` (drawn from it)
  and a zero count; the old key and the advanced count are kept for ``restore_rngs``."""
  backups = []
  for path, stream in list(api.iter_graph(node, graph=True)):
    if isinstance(stream, RngStream) and (key := matches(path, stream)) is not None:
      key = new_key(stream, key)
      backups.append((stream, stream.key.get_value(), stream.count.get_value()))
      stream.key.set_value(key)
      stream.count.set_value(jnp.zeros(key.shape, jnp.uint32))
  return SplitBackups(backups)


def _as_decorator(transform, graph: bool, graph_updates: bool):
  """A decorator applying ``transform((args, kwargs), graph=..., graph_updates=...)`` to the
  arguments of each call: in place and undone after the call with graph updates, else on copies."""
  def decorator(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if graph and graph_updates:
        with transform((args, kwargs), graph=True, graph_updates=True):
          return fn(*args, **kwargs)
      args, kwargs = transform((args, kwargs), graph=graph, graph_updates=False)
      return fn(*args, **kwargs)
    return wrapper
  return decorator


def _split_key(stream: RngStream, splits, squeeze: bool) -> jax.Array:
  keys = jax.random.split(stream(), splits)
  return keys[0] if squeeze else keys


def split_rngs(node: tp.Any = _MISSING, /, *, splits: int | tuple[int, ...], only: tp.Any = ...,
               squeeze: bool = False, graph: bool | None = None,
               graph_updates: bool | None = None):
  """Split the keys of the RngStreams in ``node`` (those matching ``only``) ``splits`` ways.

  With graph updates (graph mode's default) the streams of ``node`` are split in
  place and a ``SplitBackups`` comes back: pass it to ``nnx.restore_rngs`` or use
  it as a ``with`` block to put the old keys back. Otherwise (``graph=False`` or
  ``graph_updates=False``) ``node`` is left alone and a copy with split streams
  is returned. Each stream gives one key to be split, so its counter advances.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> nnx.split_rngs(rngs, splits=5, only='params', graph_updates=False).params.key.shape
      (5,)
      >>> with nnx.split_rngs(rngs, splits=5):        # in place, undone on exit
      ...   rngs.dropout.key.shape
      (5,)

  Without ``node`` it is a decorator that splits the streams in the arguments of
  each call (``@nnx.split_rngs(splits=4)`` above ``@nnx.vmap``).

  Args:
    node: any graph or pytree holding RngStreams (an ``Rngs``, a Module, a tuple...).
    splits: the shape the keys are split to.
    only: a filter selecting the streams (by tag, type or path).
    squeeze: with ``splits=1``, keep the key's shape (one fresh key, no new axis).
    graph: graph mode (shared references allowed); default ``nnx.set_graph_mode``.
    graph_updates: split in place; default ``nnx.set_graph_updates``.

  Returns:
    ``SplitBackups`` (in place), a copy of ``node``, or a decorator.
  """
  graph, graph_updates = _modes(graph, graph_updates)
  if node is _MISSING:
    return _as_decorator(functools.partial(split_rngs, splits=splits, only=only, squeeze=squeeze),
                         graph, graph_updates)
  if squeeze and splits != 1:
    raise ValueError(f'squeeze=True removes the split axis, so it needs splits=1; got '
                     f'splits={splits!r}. Drop squeeze=True or split 1 way.')
  selected = stream_predicate(only)
  if graph and graph_updates:
    return _in_place(node, lambda path, s: True if selected(path, s) else None,
                     lambda s, _: _split_key(s, splits, squeeze))

  def split_stream(path, x):
    if isinstance(x, RngStream) and selected(path, x):
      return type(x)(_split_key(x, splits, squeeze), tag=x.tag)
    return x

  return api.recursive_map(split_stream, node, graph=graph)


def fork_rngs(node: tp.Any = _MISSING, /, *, split=None, graph: bool | None = None,
              graph_updates: bool | None = None):
  """Give the RngStreams in ``node`` new keys drawn from themselves (and optionally split them).

  As with ``split_rngs``, graph updates change the streams in place and return
  a ``SplitBackups`` (for ``nnx.restore_rngs`` or a ``with`` block); otherwise
  a copy of ``node`` is returned. Without ``node`` it is a decorator for the
  arguments of each call.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> with nnx.fork_rngs(rngs, split={'params': 3}):
      ...   rngs.params.key.shape, rngs.dropout.key.shape
      ((3,), ())

  Args:
    node: any graph or pytree holding RngStreams (an ``Rngs``, a Module, a tuple...).
    split: ``None`` (fork every stream), a shape (fork and split every stream) or
      ``{filter: shape_or_None, ...}`` (only the matching streams; the first
      match wins, ``None`` forks without splitting).
    graph: graph mode (shared references allowed); default ``nnx.set_graph_mode``.
    graph_updates: change the streams in place; default ``nnx.set_graph_updates``.

  Returns:
    ``SplitBackups`` (in place), a copy of ``node``, or a decorator.
  """
  graph, graph_updates = _modes(graph, graph_updates)
  if node is _MISSING:
    return _as_decorator(functools.partial(fork_rngs, split=split), graph, graph_updates)
  rules = _rules({...: None} if split is None else split)

  def shape_of(path, stream):  # the rule's shape (or True to fork unsplit); None: untouched
    rule = _first_match(rules, path, stream)
    return None if rule is None else (True if rule[2] is None else rule[2])

  def new_key(stream, shape):
    key = stream()
    return key if shape is True else jax.random.split(key, shape)

  if graph and graph_updates:
    return _in_place(node, shape_of, new_key)

  def fork_stream(path, x):
    if isinstance(x, RngStream) and (shape := shape_of(path, x)) is not None:
      return type(x)(new_key(x, shape), tag=x.tag)
    return x

  return api.recursive_map(fork_stream, node, graph=graph)


def _selects_all(filter) -> bool:
  return filter is ... or filter is True or isinstance(filter, filterlib.Everything)


def with_rngs(node: tp.Any = _MISSING, /, *, split=None, fork=None, broadcast=None,
              only: tp.Any = True, graph: bool | None = None, graph_updates: bool | None = None):
  """A copy of ``node`` whose RngStreams are split, broadcast or forked.

  ``node``'s own streams only have their counters advanced (one key per stream
  that was used). A stream that several rules select is split, else broadcast,
  else forked; two rules with specific filters (not ``...``) selecting the same
  stream are a ValueError. Streams no rule selects are copied unchanged. It
  makes a copy, so it needs ``graph=False`` or ``graph_updates=False``
  (``split_rngs`` / ``fork_rngs`` change streams in place). Without ``node`` it
  is a decorator for the arguments of each call.

      >>> import arbax as nnx
      >>> rngs = nnx.Rngs(params=0, dropout=1)
      >>> new = nnx.with_rngs(rngs, split={'params': 4}, fork=..., graph_updates=False)
      >>> new.params.key.shape, new.dropout.key.shape     # params split, dropout forked
      ((4,), ())

  Args:
    node: any graph or pytree holding RngStreams.
    split: a shape for every stream, or ``{filter: shape}`` (first match wins).
    fork: a filter (or a list of filters) for the streams to fork.
    broadcast: as ``split``, for streams to broadcast.
    only: a filter: streams it does not select are left alone.
    graph: graph mode; default ``nnx.set_graph_mode``.
    graph_updates: must be False in graph mode (a NotImplementedError otherwise).

  Returns:
    The copy of ``node``, or a decorator.
  """
  graph, graph_updates = _modes(graph, graph_updates)
  if graph and graph_updates:
    raise NotImplementedError(
        'graph=True and graph_updates=True is not supported for `with_rngs`: it returns a new '
        'tree and cannot update the streams in place. Pass graph_updates=False (or graph=False), '
        'or use nnx.split_rngs / nnx.fork_rngs to change the streams in place.')
  if node is _MISSING:
    return _as_decorator(functools.partial(with_rngs, split=split, fork=fork, broadcast=broadcast,
                                           only=only), graph, graph_updates)
  selected = stream_predicate(only)
  forks = [] if fork is None else list(fork) if isinstance(fork, (list, tuple)) else [fork]
  kinds = (('split', _rules(split)), ('broadcast', _rules(broadcast)),
           ('fork', [(f, stream_predicate(f), None) for f in forks]))

  def replace(path, x):
    # recursive_map hands over a rebuilt stream that shares the original's key and count
    # Variables, so drawing from it advances the original's counter.
    if not isinstance(x, RngStream) or not selected(path, x):
      return x
    matched = {kind: rule for kind, rules in kinds if (rule := _first_match(rules, path, x))}
    specific = {kind: rule[0] for kind, rule in matched.items() if not _selects_all(rule[0])}
    if len(specific) > 1:
      found = ', '.join(f'{kind} (filter {f!r})' for kind, f in specific.items())
      raise ValueError(f'The RngStream at {format_path(path)} matches multiple rules of '
                       f'nnx.with_rngs: {found}. Each stream takes one rule: make the filters '
                       "disjoint, e.g. fork=nnx.Not('params') next to split={'params': 4}.")
    if 'split' in matched:
      shape = matched['split'][2]
      return x if shape is None else x.split(shape)
    if 'broadcast' in matched:
      shape = matched['broadcast'][2]
      return x if shape is None else x.broadcast(shape)
    if 'fork' in matched:
      return x.fork()
    return x

  return api.recursive_map(replace, node, graph=graph)
