"""nnx.ids: counter ids that are never reused; copies get fresh ones."""
import copy
import threading

from arbax import ids


def test_ids_are_distinct_increasing_and_hashable():
  a, b = ids.uuid(), ids.uuid()
  assert a != b and b.id > a.id
  assert a == ids.UUID(a.id) and hash(a) == hash(ids.UUID(a.id))
  assert len({a, b, ids.UUID(a.id)}) == 2
  assert repr(a) == f'UUID({a.id})'
  assert a != a.id  # only equal to UUIDs


def test_copies_are_new_ids():
  a = ids.uuid()
  assert copy.copy(a) != a and copy.deepcopy(a) != a
  held = {'key': a}
  assert copy.deepcopy(held)['key'] != a


def test_ids_are_unique_across_threads():
  manager = ids.UUIDManager()
  got = []

  def take():
    got.extend(manager() for _ in range(200))

  threads = [threading.Thread(target=take) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len({u.id for u in got}) == 800
