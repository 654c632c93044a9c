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

import jax
import jax.numpy as jnp

from arbax.module import Module
from arbax.pytree import Pytree
from arbax.variables import Variable


class RngState(Variable):
  """Base kind of the Variables an RngStream holds."""
  _arbax_display_kind = 'RngState'


class RngKey(RngState):
  """A stream's base key (a typed ``key<fry>`` array)."""


class RngCount(RngState):
  """How many keys a stream has produced (uint32)."""


def _as_key(seed) -> jax.Array:
  if isinstance(seed, Variable):
    seed = seed.get_value()
  if isinstance(seed, (int,)) or (hasattr(seed, 'dtype') and jnp.issubdtype(seed.dtype, jnp.integer)
                                  and getattr(seed, 'shape', ()) == ()):
    return jax.random.key(seed)
  if hasattr(seed, 'dtype') and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
    return seed
  if hasattr(seed, 'shape') and seed.shape[-1:] == (2,):  # raw uint32 key data
    return jax.random.wrap_key_data(seed)
  raise TypeError(f'Rngs expects an int seed or a JAX PRNG key, got {type(seed).__name__}')


_DISTRIBUTIONS = frozenset(
    name for name in dir(jax.random)
    if not name.startswith('_') and name not in (
        'key', 'PRNGKey', 'split', 'fold_in', 'key_data', 'wrap_key_data', 'key_impl', 'clone',
        'default_prng_impl', 'threefry_2x32', 'threefry2x32_key', 'rbg_key', 'unsafe_rbg_key',
        'KeyArray', 'PRNGKeyArray', 'random_wrap', 'random_unwrap', 'random_bits', 'bits')
    and callable(getattr(jax.random, name)))


class _Distributions:
  """``stream.normal(shape)`` == ``jax.random.normal(stream(), shape)`` for every distribution."""

  def __getattr__(self, name):
    if name in _DISTRIBUTIONS:
      fn = getattr(jax.random, name)

      @functools.wraps(fn)
      def draw(*args, **kwargs):
        return fn(self(), *args, **kwargs)

      return draw
    raise AttributeError(f'{type(self).__name__} has no attribute {name!r}')


class RngStream(_Distributions, Module):
  """One named stream: a base key and a counter. Calling it returns a new key."""

  def __init__(self, key, *, tag: str):
    self.tag = tag
    self.key = RngKey(_as_key(key), tag=tag)
    self.count = RngCount(jnp.array(0, dtype=jnp.uint32), tag=tag)

  def __call__(self) -> jax.Array:
    count = self.count[...]
    key = jax.random.fold_in(self.key[...], count)
    self.count[...] = count + 1
    return key

  def fork(self, *, split: int | tuple[int, ...] | None = None) -> 'RngStream':
    """A new stream seeded from a fresh key of this one (``split=n`` gives n keys stacked)."""
    key = self()
    if split is not None:
      key = jax.random.split(key, split)
    return type(self)(key, tag=self.tag)

  def split(self, k: int | tuple[int, ...]) -> 'RngStream':
    """This stream with its key split ``k`` ways (for vmap); the counter is copied per key."""
    key = jax.random.split(self(), k)
    new = type(self)(key, tag=self.tag)
    new.count[...] = jnp.zeros(key.shape, jnp.uint32)
    return new

  def reseed(self, seed) -> None:
    self.key[...] = _as_key(seed)
    self.count[...] = jnp.zeros_like(self.count[...])


class Rngs(_Distributions, Module):
  """A set of named RngStreams: ``nnx.Rngs(0)``, ``nnx.Rngs(0, params=1)``, ``nnx.Rngs(params=key)``."""

  def __init__(self, default=None, /, **streams):
    for name, seed in streams.items():
      if isinstance(seed, RngStream):
        setattr(self, name, seed)
      else:
        setattr(self, name, RngStream(seed, tag=name))
    if default is not None:
      if isinstance(default, (Rngs,)):
        for name, stream in default.streams():
          setattr(self, name, stream)
      elif isinstance(default, dict):
        for name, seed in default.items():
          setattr(self, name, RngStream(seed, tag=name))
      else:
        self.default = RngStream(default, tag='default')

  def __getattr__(self, name: str) -> RngStream:
    # Reached only when the stream does not exist: fall back to `default`.
    if name.startswith('_'):
      raise AttributeError(name)
    if name in _DISTRIBUTIONS:
      return _Distributions.__getattr__(self, name)
    streams = self.__dict__
    if 'default' in streams:
      return streams['default']
    raise AttributeError(
        f'Rngs has no stream {name!r} and no default stream; it has {[n for n, _ in self.streams()]}. '
        f'Create it with nnx.Rngs({name}=seed) or give a default seed: nnx.Rngs(0).')

  def __call__(self) -> jax.Array:
    return self.default()

  def __getitem__(self, name: str) -> RngStream:
    return getattr(self, name)

  def __contains__(self, name: str) -> bool:
    return isinstance(self.__dict__.get(name), RngStream)

  def streams(self) -> list[tuple[str, RngStream]]:
    return [(k, v) for k, v in self.__dict__.items() if isinstance(v, RngStream)]

  def items(self):
    return self.streams()

  def fork(self, *, split: int | tuple[int, ...] | dict | None = None) -> 'Rngs':
    """New Rngs whose streams are seeded from fresh keys of these (``split`` to stack keys)."""
    new = object.__new__(Rngs)
    new.__dict__['_arbax_kinds'] = {}
    new.__dict__['_arbax_cache'] = None
    for name, stream in self.streams():
      n = split.get(name) if isinstance(split, dict) else split
      setattr(new, name, stream.fork(split=n))
    return new

  def split(self, k: int | tuple[int, ...]) -> 'Rngs':
    return self.fork(split=k)

  def reseed(self, **seeds) -> None:
    for name, seed in seeds.items():
      getattr(self, name).reseed(seed)


def reseed(node, /, **seeds) -> None:
  """Reseed every RngStream named in ``seeds`` anywhere inside ``node``."""
  from arbax.api import iter_graph
  for _, obj in iter_graph(node):
    if isinstance(obj, RngStream) and obj.tag in seeds:
      obj.reseed(seeds[obj.tag])


def split_rngs_state(node, splits: int | tuple[int, ...], only: tp.Any = ...):
  """Split the keys of every RngStream in ``node`` (matching ``only``) in place; returns a restore function."""
  from arbax import filters as filterlib
  from arbax.api import iter_graph
  predicate = filterlib.to_predicate(only)
  backups = []
  for path, obj in list(iter_graph(node)):
    if isinstance(obj, RngStream) and predicate(path, obj.key):
      backups.append((obj, obj.key.get_value(), obj.count.get_value()))
      key = jax.random.split(obj(), splits)
      obj.key.set_value(key)
      obj.count.set_value(jnp.zeros(key.shape, jnp.uint32))

  def restore():
    for stream, key, count in backups:
      stream.key.set_value(key)
      stream.count.set_value(count)

  return restore


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
    self._restore = None
    if node is not None:
      self._restore = split_rngs_state(node, splits, only)

  def __enter__(self):
    return self.node

  def __exit__(self, *exc):
    if self._restore is not None:
      self._restore()
    return False

  def __call__(self, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      restores = [split_rngs_state(a, self.splits, self.only)
                  for a in (*args, *kwargs.values()) if _holds_rngs(a)]
      try:
        return fn(*args, **kwargs)
      finally:
        for r in reversed(restores):
          r()
    return wrapper


def _holds_rngs(x) -> bool:
  if isinstance(x, (Rngs, RngStream)):
    return True
  if isinstance(x, Pytree):
    from arbax.api import iter_graph
    return any(isinstance(o, RngStream) for _, o in iter_graph(x))
  return False


def fork_rngs(rngs: Rngs, *, split=None) -> Rngs:
  return rngs.fork(split=split)
