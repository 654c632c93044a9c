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

from arbax import filters as filterlib
from arbax.pytree import Pytree
from arbax.variables import Variable

_MISSING = object()

__all__ = ['RngState', 'RngKey', 'RngCount', 'RngStream', 'Rngs', 'reseed', 'split_rngs',
           'fork_rngs', 'with_rngs', 'restore_rngs']


class RngState(Variable):
  """Base kind of the Variables an RngStream holds."""
  _arbax_display_kind = 'RngState'


class RngKey(RngState):
  """A stream's base key (a typed ``key<fry>`` array)."""


class RngCount(RngState):
  """How many keys a stream has produced (uint32, one counter per key)."""


def _as_key(seed) -> jax.Array:
  if isinstance(seed, Variable):
    seed = seed.get_value()
  if isinstance(seed, int) and not isinstance(seed, bool):
    return jax.random.key(seed)
  dtype = getattr(seed, 'dtype', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return seed
  if dtype == jnp.uint32 and getattr(seed, 'shape', ())[-1:] == (2,):  # raw key data (PRNGKey)
    return jax.random.wrap_key_data(seed)
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

  def __getattr__(self, name):
    if name in _DISTRIBUTIONS or name in _INITIALIZERS:
      return _random_method(self, name)
    raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

  def __dir__(self):
    return sorted({*super().__dir__(), *_DISTRIBUTIONS, *_INITIALIZERS})


def _shape(k: int | tuple[int, ...]) -> tuple[int, ...]:
  return (k,) if isinstance(k, int) else tuple(k)


class RngStream(_RandomMethods, Pytree):
  """One named stream: a base key and a counter. Calling it returns a new key."""

  def __init__(self, key, *, tag: str):
    key = _as_key(key)
    self.tag = tag
    self.key = RngKey(key, tag=tag)
    # One counter per key, so a split stream (keys of shape (n,)) stays vmappable.
    self.count = RngCount(jnp.zeros(key.shape, dtype=jnp.uint32), tag=tag)

  def __call__(self) -> jax.Array:
    count = self.count[...]
    key = jax.random.fold_in(self.key[...], count)
    self.count[...] = count + 1
    return key

  def split(self, k: int | tuple[int, ...]) -> 'RngStream':
    """A new stream whose key is a fresh key of this one split ``k`` ways (for vmap)."""
    return type(self)(jax.random.split(self(), k), tag=self.tag)

  def fork(self, *, split: int | tuple[int, ...] | None = None) -> 'RngStream':
    """A new stream seeded with a fresh key of this one (``split=`` is the deprecated ``split()``)."""
    if split is not None:
      warnings.warn("The 'split' argument of 'fork' is deprecated; use the 'split' method instead.",
                    DeprecationWarning, stacklevel=2)
      return self.split(split)
    return type(self)(self(), tag=self.tag)

  def broadcast(self, k: int | tuple[int, ...]) -> 'RngStream':
    """A new stream whose key is one fresh key repeated to shape ``k`` (every copy draws alike)."""
    key = self()
    return type(self)(jnp.broadcast_to(key, _shape(k) + key.shape), tag=self.tag)


def _per_stream(spec, default=None) -> tp.Callable[[RngStream], tp.Any]:
  """Turn ``k`` or ``{filter: k, ...}`` into ``stream -> k`` (first matching filter wins)."""
  if not isinstance(spec, tp.Mapping):
    return lambda stream: spec
  rules = [(filterlib.to_predicate(f), v) for f, v in spec.items()]

  def lookup(stream):
    for predicate, value in rules:
      # String filters match tags: the stream's own tag, like its Variables'.
      if predicate((), stream) or predicate((), stream.key):
        return value
    return default

  return lookup


class Rngs(_RandomMethods, Pytree):
  """A set of named RngStreams: ``nnx.Rngs(0)``, ``nnx.Rngs(0, params=1)``, ``nnx.Rngs(params=key)``.

  The positional seed is the ``default`` stream, used by ``rngs()`` and by any
  stream name that was not given.
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

  def __getattr__(self, name: str):
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
    return ((k, v) for k, v in list(self.__dict__.items()) if isinstance(v, RngStream))

  def split(self, k) -> 'Rngs':
    """New Rngs whose streams' keys are split ``k`` ways.

    ``k`` is a size/shape for every stream, or ``{filter: size_or_None, ...}``
    (``None``: keep that stream's key as it is).
    """
    sizes = _per_stream(k)
    new = {}
    for name, stream in self.items():
      n = sizes(stream)
      new[name] = stream if n is None else stream.split(n)
    return Rngs(**new)

  def broadcast(self, k) -> 'Rngs':
    """New Rngs whose streams hold one fresh key each, repeated to shape ``k`` (or a filter map)."""
    sizes = _per_stream(k)
    new = {}
    for name, stream in self.items():
      n = sizes(stream)
      new[name] = stream if n is None else stream.broadcast(n)
    return Rngs(**new)

  def fork(self, /, *, split=None) -> 'Rngs':
    """New Rngs whose streams are seeded with a fresh key of each stream here."""
    if split is not None:
      warnings.warn("The 'split' argument of 'fork' is deprecated; use the 'split' method instead.",
                    DeprecationWarning, stacklevel=2)
      sizes = _per_stream(split)
      return Rngs(**{name: stream.fork() if sizes(stream) is None else stream.split(sizes(stream))
                     for name, stream in self.items()})
    return Rngs(**{name: stream.fork() for name, stream in self.items()})


def _scalars_only(path, key, shape):
  if shape != ():
    from arbax.errors import format_path
    raise ValueError(
        f'Cannot reseed the stream at {format_path(path)}: its key has shape {shape} (it was split). '
        "Pass policy='match_shape' to split the new key to that shape, or a callable "
        '(path, key, shape) -> key.')
  return key


def _match_shape(path, key, shape):
  return key if shape == () else jax.random.split(key, shape)


_POLICIES = {'scalars_only': _scalars_only, 'match_shape': _match_shape}


def reseed(node, /, *, graph: bool | None = None, policy='scalars_only', **stream_keys) -> None:
  """Give every RngStream in ``node`` whose tag is in ``stream_keys`` a new key and a zero count.

  The new key is the first key of ``nnx.Rngs(tag=seed)``, so reseeding with the seed
  a model was built with makes it draw the same keys as a model built with it
  after construction. ``policy`` handles split (non-scalar) keys: ``'scalars_only'``
  raises, ``'match_shape'`` splits the new key to the old key's shape, or a callable
  ``(path, key, shape) -> key``.
  """
  from arbax.api import iter_graph
  if isinstance(policy, str) and policy in _POLICIES:
    policy = _POLICIES[policy]
  elif not callable(policy):
    raise ValueError(f"policy must be 'scalars_only', 'match_shape' or a callable, got {policy!r}")
  seeds = Rngs(**stream_keys)
  for path, obj in list(iter_graph(node, graph=True)):
    if isinstance(obj, RngStream) and obj.tag in stream_keys:
      key = policy(path, seeds[obj.tag](), obj.key.get_value().shape)
      obj.key.set_value(key)
      obj.count.set_value(jnp.zeros(key.shape, dtype=jnp.uint32))


def split_rngs_state(node, splits: int | tuple[int, ...], only: tp.Any = ...) -> list:
  """Split the keys of every RngStream in ``node`` (matching ``only``) in place.

  Returns the backups ``[(stream, key, count), ...]`` that ``restore_rngs`` puts back.
  """
  from arbax.api import iter_graph
  predicate = filterlib.to_predicate(only)
  backups = []
  for path, obj in list(iter_graph(node, graph=True)):
    if isinstance(obj, RngStream) and (predicate(path, obj) or predicate(path, obj.key)):
      key = jax.random.split(obj(), splits)  # consumes a key: the count stays advanced, as in NNX
      backups.append((obj, obj.key.get_value(), obj.count.get_value()))
      obj.key.set_value(key)
      obj.count.set_value(jnp.zeros(key.shape, jnp.uint32))
  return backups


def restore_rngs(backups: tp.Iterable[tuple], /) -> None:
  """Put back the keys (and counts) saved by an in-place ``nnx.split_rngs(node, splits=...)``.

  Each backup is ``(stream, key)`` or ``(stream, key, count)``.
  """
  for backup in backups:
    stream, key = backup[0], backup[1]
    stream.key.set_value(key)
    if len(backup) == 3:
      stream.count.set_value(backup[2])


class split_rngs:
  """Split Rngs inside the arguments before a call (so ``vmap`` gives each item its own keys).

      @nnx.split_rngs(splits=4)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs): ...

  Also usable as ``with nnx.split_rngs(rngs, splits=4): ...`` and
  ``nnx.split_rngs(rngs, splits=4)`` (in place, returns a restore function).
  """

  def __init__(self, node=None, /, *, splits, only: tp.Any = ..., squeeze: bool = False):
    self.node = node
    self.splits = splits
    self.only = only
    self._backups = []
    if node is not None:
      self._backups = split_rngs_state(node, splits, only)

  def __iter__(self):
    """The backups of an in-place split, for ``nnx.restore_rngs``."""
    return iter(self._backups)

  def __enter__(self):
    return self.node

  def __exit__(self, *exc):
    restore_rngs(self._backups)
    self._backups = []
    return False

  def __call__(self, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      backups = [split_rngs_state(a, self.splits, self.only)
                 for a in (*args, *kwargs.values()) if _holds_rngs(a)]
      try:
        return fn(*args, **kwargs)
      finally:
        for b in reversed(backups):
          restore_rngs(b)
    return wrapper


def _holds_rngs(x) -> bool:
  if isinstance(x, (Rngs, RngStream)):
    return True
  if isinstance(x, Pytree):
    from arbax.api import iter_graph
    return any(isinstance(o, RngStream) for _, o in iter_graph(x, graph=True))
  return False


def fork_rngs(rngs: Rngs, *, split=None) -> Rngs:
  return rngs.fork(split=split)


def with_rngs(node: tp.Any = _MISSING, /, *, split=None, fork=None, broadcast=None,
              only: tp.Any = True, graph: bool | None = None, graph_updates: bool | None = None):
  """A copy of ``node`` whose RngStreams are split, forked or broadcast; ``node``'s own
  streams only have their counters advanced.

      new = nnx.with_rngs(rngs, split={'params': 4}, fork=...)   # params: 4 keys, rest forked

  ``split`` / ``broadcast``: a shape for every stream or ``{filter: shape}`` (first
  match wins); ``fork``: a filter (or list of filters) for the streams left. Other
  streams are copied unchanged. Without ``node`` it returns a decorator-ready partial.
  """
  if node is _MISSING:
    return functools.partial(with_rngs, split=split, fork=fork, broadcast=broadcast, only=only,
                             graph=graph, graph_updates=graph_updates)
  from arbax.api import recursive_map
  selected = filterlib.to_predicate(only)
  split_of = _per_stream(split if isinstance(split, tp.Mapping) or split is None else {...: split})
  bcast_of = _per_stream(broadcast if isinstance(broadcast, tp.Mapping) or broadcast is None
                         else {...: broadcast})
  forks = fork if isinstance(fork, (list, tuple)) else ([] if fork is None else [fork])
  fork_preds = [filterlib.to_predicate(f) for f in forks]

  def replace(path, x):
    # recursive_map hands over a rebuilt stream that shares the original's key and count
    # Variables, so drawing from it advances the original's counter.
    if not isinstance(x, RngStream) or not (selected(path, x) or selected(path, x.key)):
      return x
    if (k := split_of(x)) is not None:
      return x.split(k)
    if (k := bcast_of(x)) is not None:
      return x.broadcast(k)
    if any(p(path, x) or p(path, x.key) for p in fork_preds):
      return x.fork()
    return x

  return recursive_map(replace, node, graph=graph)
