"""The registry of module-level caches: bounded, and cleared in one call."""
import arbax as nnx
from arbax import caches


def test_a_bounded_cache_drops_its_oldest_entry_when_full():
  cache = caches.bounded('test oldest', maxsize=3)
  for n in range(5):
    cache[n] = str(n)
  assert list(cache) == [2, 3, 4] and cache[4] == '4'
  cache[3] = 'again'  # replacing a key does not evict
  assert list(cache) == [2, 3, 4]


def test_clear_caches_empties_every_registered_cache():
  a, b = caches.bounded('test a', 4), caches.bounded('test b', 4)
  a[1] = b[2] = 'x'
  caches.clear_caches()
  assert not a and not b
  assert a in caches.registered() and b in caches.registered()


def test_clearing_caches_keeps_arbax_working():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  nnx.state(model)
  caches.clear_caches()
  assert set(nnx.state(model)) == {'kernel', 'bias'}


def test_clear_caches_is_offered_at_the_top_level():
  assert nnx.clear_caches is caches.clear_caches


def test_the_library_registers_its_caches():
  names = {c.name for c in caches.registered() if isinstance(c, caches.BoundedCache)}
  assert {'compiled GraphDef builders', 'flattenings of unchanged objects',
          'State key orders', 'interned Variable metadata', 'jitted initializers'} <= names
  assert all(c.maxsize for c in caches.registered() if isinstance(c, caches.BoundedCache))
