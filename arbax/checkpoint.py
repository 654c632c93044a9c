"""Checkpoints of any object's State through Orbax that never lose data.

    >>> import arbax as nnx, tempfile, os
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> nnx.checkpoint.save(path, model)
    >>> restored = nnx.checkpoint.restore(path, nnx.Linear(2, 3, rngs=nnx.Rngs(1)))  # in place
    >>> nnx.checkpoint.save(path, model, overwrite=True)  # without: DestinationExistsError

``save`` stores ``nnx.to_pure_dict(nnx.state(obj))``: plain nested dicts of
arrays, an ordinary Orbax checkpoint that any JAX user reads. It guarantees:

- *Nothing is lost.* The checkpoint is written into a hidden sibling
  (``.<name>.arbax-save-...``) and moved to ``path`` in one rename once it is
  complete, so ``path`` holds either the old checkpoint or the new one, never a
  mix or nothing: not after a failed save, not after ``kill -9`` mid-save (the
  next save on that machine removes the sibling it leaves). Replacing uses
  Linux's atomic exchange; elsewhere two renames leave an instant without one.
- *Nothing is overwritten by default*, as in Orbax: a file, directory or
  checkpoint already at ``path`` raises ``DestinationExistsError`` (both a
  ``FileExistsError`` and the ``ValueError`` Orbax raises). ``overwrite=True``
  (or Orbax's spelling ``force=True``) replaces it. Of two processes saving to
  one new path, one finishes and the other gets ``DestinationExistsError``.
- *Damage is found, not restored.* ``save`` records every file's size and
  SHA-256 in ``_ARBAX_MANIFEST``; ``restore`` checks them first (reading each
  file once more) and raises ``ValueError`` naming the truncated, altered or
  missing file.
  ``FileNotFoundError`` means there is no checkpoint at ``path`` at all.

``restore`` reads the checkpoint's metadata first and refuses (ValueError
naming the first differing path) when structure, shape or dtype differ from the
target, so a failed restore leaves the target untouched. Pass an abstract
target (``nnx.eval_shape(lambda: Model(...))``) to ``restore`` and it returns a
new, concrete object instead.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import uuid

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from arbax import api
from arbax.errors import format_path
from arbax.sharding import leaf_shardings
from arbax.state import flat_dict, from_flat_state, restore_int_paths, to_pure_dict

__all__ = ['save', 'restore', 'load_pure_dict', 'DestinationExistsError', 'MANIFEST']

MANIFEST = '_ARBAX_MANIFEST'
"""The file in every checkpoint ``save`` writes: each other file's size and SHA-256 (JSON)."""


class DestinationExistsError(FileExistsError, ValueError):
  """``save`` found something at its path and was not told to replace it.

  A ``FileExistsError``, and the ``ValueError`` Orbax raises in this case, so
  either ``except`` catches it. Pass ``overwrite=True`` to replace the old one.
  """


def _checkpointer():
  import orbax.checkpoint as ocp  # heavy: imported on first use, not with arbax
  return ocp.StandardCheckpointer()


# -- save ----------------------------------------------------------------------------------------

def save(path: str | os.PathLike, obj, *, overwrite: bool = False, force: bool = False) -> None:
  """Write the State of ``obj`` (a model, ``(model, optimizer)``, any pytree) to ``path``.

  ``path`` appears only once the checkpoint is complete; a save that fails or
  is killed leaves whatever was there before.

    >>> import arbax as nnx, tempfile, os
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> nnx.checkpoint.save(path, model)
    >>> nnx.checkpoint.save(path, model)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    arbax.checkpoint.DestinationExistsError: ...
    >>> nnx.checkpoint.save(path, model, overwrite=True)

  Args:
    path: the checkpoint directory to create.
    obj: the object(s) whose State is stored.
    overwrite: replace what is at ``path`` (a checkpoint or anything else) in
      one atomic step instead of raising.
    force: Orbax's name for ``overwrite``; either one replaces.

  Raises:
    DestinationExistsError: ``path`` exists, or another process saved there
      while this save was writing, and neither ``overwrite`` nor ``force`` is set.
    ValueError: the State holds something a checkpoint cannot store; nothing
      was written.
  """
  path = _absolute(path)
  replace = overwrite or force
  pure = to_pure_dict(api.state(obj, graph=True))
  _check_savable(pure)
  if not replace and os.path.lexists(path):
    raise DestinationExistsError(_exists_message(path))
  staging = _begin_staging(path)
  try:
    new = os.path.join(staging, 'checkpoint')
    with _checkpointer() as checkpointer:
      checkpointer.save(new, _stringify_keys(pure),
                        custom_metadata={'arbax': {'manifest': MANIFEST}})
      checkpointer.wait_until_finished()
    _on_process_0(lambda: _commit(new, path, replace), path)
  finally:
    if jax.process_index() == 0:
      shutil.rmtree(staging, ignore_errors=True)


def _absolute(path) -> str:
  return os.path.abspath(os.fspath(path))


def _stringify_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _stringify_keys(v) for k, v in tree.items()}
  return tree


def _storable(value) -> bool:
  """What Orbax stores: arrays, real Python numbers, None (not str, bytes or complex numbers)."""
  if value is None or isinstance(value, (bool, int, float, jax.Array)):
    return True
  return isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind not in 'OSU'


def _check_savable(pure: dict) -> None:
  """ValueError naming the first leaf Orbax cannot store, before anything is written."""
  for p, value in flat_dict(pure).items():
    if isinstance(value, jax.ShapeDtypeStruct):
      raise ValueError(f'save: {format_path(p)} is abstract (a ShapeDtypeStruct), it has no '
                       'values to store. Save a concrete object, e.g. one restore returned.')
    if _storable(value):
      continue
    raise ValueError(f'save: {format_path(p)} holds {type(value).__name__} {value!r:.60}, which a '
                     'checkpoint cannot store (arrays and real numbers only). Keep it as a plain '
                     'attribute instead of a Variable, or store jnp.asarray(...) of it.')


def _exists_message(path: str) -> str:
  if not os.path.isdir(path):
    found = 'a file'
  elif _looks_like_checkpoint(path):
    found = 'a checkpoint'
  else:
    entries = sorted(os.listdir(path))
    found = (f'a directory that is not a checkpoint (holding {", ".join(entries[:3])}'
             f'{", ..." if len(entries) > 3 else ""})' if entries else 'an empty directory')
  if found == 'a checkpoint':
    fix = 'Pass overwrite=True (Orbax: force=True) to replace it, or choose another path.'
  else:
    fix = 'Choose another path; overwrite=True would replace it, deleting what it holds.'
  return f"save: destination '{path}' already exists: it is {found}. {fix}"


def _looks_like_checkpoint(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f))
             for f in (MANIFEST, '_METADATA', '_CHECKPOINT_METADATA'))


# Each save writes into its own hidden sibling, named after the process that owns it so
# a later save can tell a dead save's leftovers from a save still running.
def _pid_namespace() -> str:
  try:  # containers on one host may share its name but not its process ids
    return str(os.stat('/proc/self/ns/pid').st_ino)
  except OSError:
    return ''


_HOST = hashlib.sha256(f'{socket.gethostname()}/{_pid_namespace()}'.encode()).hexdigest()[:8]
_STAGING = re.compile(
    r'\.(?P<name>.+)\.arbax-save-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}')


def _begin_staging(path: str) -> str:
  """Create (on process 0) the empty sibling directory this save writes into."""
  parent, name = os.path.split(path)
  host, pid, token = (int(v) for v in _from_process_0(
      np.array([int(_HOST, 16), os.getpid(), uuid.uuid4().int & 0xFFFFFFFF], np.int64)))
  staging = os.path.join(parent, f'.{name}.arbax-save-{host:08x}-{pid}-{token:08x}')
  if jax.process_index() == 0:
    os.makedirs(parent, exist_ok=True)
    for leftover in _staging_siblings(path, dead_only=True):
      shutil.rmtree(leftover, ignore_errors=True)
    os.mkdir(staging)
  return staging


def _staging_siblings(path: str, *, dead_only: bool) -> list[str]:
  """Saves into ``path`` running or interrupted; ``dead_only``: those of gone local processes."""
  parent, name = os.path.split(path)
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  out = []
  for entry in sorted(entries):
    m = _STAGING.fullmatch(entry)
    if not m or m['name'] != name:
      continue
    if dead_only and (m['host'] != _HOST or _process_alive(int(m['pid']))):
      continue
    out.append(os.path.join(parent, entry))
  return out


def _process_alive(pid: int) -> bool:
  if os.name != 'posix':
    return True  # no harmless probe there: keep the directory
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _from_process_0(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process (``value`` itself with one process)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _on_process_0(fn, path: str) -> None:
  """Run ``fn`` on process 0; every process returns when it is done, or raises if it failed."""
  if jax.process_count() == 1:
    return fn()
  failure = None
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - re-raised below once every process knows
      failure = e
  status = int(_from_process_0(np.array(
      0 if failure is None else 2 if isinstance(failure, DestinationExistsError) else 1, np.int32)))
  if failure is not None:
    raise failure
  if status == 2:
    raise DestinationExistsError(f"save: another save created '{path}' first; see process 0.")
  if status == 1:
    raise RuntimeError(f"save: process 0 failed to finish '{path}'; its error says why.")


def _commit(new: str, path: str, replace: bool) -> None:
  """Record the finished checkpoint's files, then move it to ``path`` in one step."""
  _write_manifest(new)
  try:
    _move_into_place(new, path, replace)
  except FileExistsError:
    raise DestinationExistsError(
        f"save: destination '{path}' was created by another save while this one was writing; "
        'that checkpoint is kept and this one discarded. Pass overwrite=True to replace it.'
    ) from None
  _fsync_dir(os.path.dirname(path))


def _write_manifest(root: str) -> None:
  files = _files_under(root)
  digests = _parallel(lambda rel: _sha256(os.path.join(root, rel)), files)
  listing = {rel: {'bytes': os.path.getsize(os.path.join(root, rel)), 'sha256': digest}
             for rel, digest in zip(files, digests)}
  with open(os.path.join(root, MANIFEST), 'w') as f:
    json.dump({'format': 'arbax checkpoint manifest', 'version': 1, 'files': listing}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  _fsync_dir(root)


def _files_under(root: str) -> list[str]:
  out = []
  for folder, _, names in os.walk(root):
    for name in names:
      out.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, '/'))
  return sorted(f for f in out if f != MANIFEST)


def _sha256(file: str) -> str:
  with open(file, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _parallel(fn, items: list) -> list:
  """``[fn(x) for x in items]`` on threads (hashing releases the GIL)."""
  if len(items) < 2:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(min(8, len(items))) as pool:
    return list(pool.map(fn, items))


def _fsync_dir(folder: str) -> None:
  """Make renames and new entries in ``folder`` survive a power cut (POSIX only)."""
  if os.name != 'posix':
    return
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _move_into_place(new: str, path: str, replace: bool) -> None:
  """Rename the finished checkpoint ``new`` to ``path`` in one step.

  Without ``replace``, FileExistsError if anything is at ``path``, which stays
  as it is. With it, ``path`` and ``new`` trade places: what ``path`` held ends
  up beside ``new``, in the staging directory the caller deletes.
  """
  if replace:
    try:
      return _exchange(new, path)
    except FileNotFoundError:
      pass  # nothing at path to replace
  _rename_noreplace(new, path)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


@functools.cache
def _libc_renameat2():
  """glibc's ``renameat2`` (Linux), or None."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError, TypeError):
    return None
  fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
  fn.restype = ctypes.c_int
  return fn


def _renameat2(src: str, dst: str, flags: int) -> bool:
  """Rename with Linux's atomic ``flags``; False where the system or filesystem lacks them."""
  fn = _libc_renameat2()
  if fn is None:
    return False
  if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), dst)  # EEXIST/ENOENT arrive as FileExists/FileNotFoundError


def _exchange(new: str, path: str) -> None:
  """Swap ``new`` and ``path`` atomically; FileNotFoundError if ``path`` is gone."""
  if _renameat2(new, path, _RENAME_EXCHANGE):
    return
  # No atomic exchange here: for an instant between these renames nothing is at path.
  aside = os.path.join(os.path.dirname(new), 'replaced')
  os.rename(path, aside)
  try:
    os.rename(new, path)
  except OSError:
    os.rename(aside, path)
    raise


def _rename_noreplace(src: str, dst: str) -> None:
  if _renameat2(src, dst, _RENAME_NOREPLACE):
    return
  if os.path.lexists(dst):
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
  try:
    os.rename(src, dst)  # POSIX refuses a non-empty directory or a file at dst too
  except OSError as e:
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from e
    raise


# -- reading and checking a checkpoint -----------------------------------------------------------

def _read_metadata(path: str) -> dict:
  """The checkpoint's tree metadata, once ``path`` is known to hold an intact checkpoint."""
  _check_exists(path)
  verified = _verify_manifest(path)
  with _checkpointer() as checkpointer:
    meta = _orbax_read(path, lambda: checkpointer.metadata(path))
  custom = getattr(meta, 'custom_metadata', None) or {}
  if not verified and isinstance(custom.get('arbax'), dict):
    raise ValueError(_damaged(path, os.path.join(path, MANIFEST), 'is missing'))
  tree = meta.item_metadata if hasattr(meta, 'item_metadata') else getattr(meta, 'tree', meta)
  if tree is None:
    metadata_file = os.path.join(path, '_METADATA')
    raise ValueError(f"restore: '{path}' holds no readable checkpoint: '{metadata_file}', the "
                     'tree metadata every Orbax checkpoint has, is missing or unreadable. If a '
                     'checkpoint was saved here it is damaged; restore it from a copy or save '
                     'again.')
  return dict(tree)


def _check_exists(path: str) -> None:
  if not os.path.lexists(path):
    unfinished = _staging_siblings(path, dead_only=False)
    hint = (f' (a save to it started but has not finished: {os.path.basename(unfinished[0])!r})'
            if unfinished else '')
    raise FileNotFoundError(errno.ENOENT, f'restore: no checkpoint at this path, nothing exists '
                            f'there{hint}; nnx.checkpoint.save(path, obj) writes one', path)
  if not os.path.isdir(path):
    raise ValueError(f"restore: '{path}' is a file, not a checkpoint (a directory that "
                     'nnx.checkpoint.save writes). Check the path.')


def _damaged(path: str, file: str, problem: str, others: int = 0) -> str:
  more = f' (and {others} more damaged file{"s" * (others > 1)})' if others else ''
  return (f"restore: the checkpoint at '{path}' is damaged: '{file}' {problem}{more}. Nothing "
          'was loaded; restore the checkpoint from a copy or save it again.')


def _verify_manifest(path: str) -> bool:
  """Check every file against the manifest (ValueError naming a damaged one); False without one."""
  manifest = os.path.join(path, MANIFEST)
  try:
    with open(manifest, 'rb') as f:
      listing = _parse_manifest(f.read())
  except FileNotFoundError:
    return False
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(_damaged(path, manifest, f'cannot be read ({e!r})')) from None
  problems = {}
  for rel, record in listing.items():
    try:
      size = os.stat(os.path.join(path, rel)).st_size
    except FileNotFoundError:
      problems[rel] = 'is missing'
      continue
    if size != record['bytes']:
      problems[rel] = (f'has {size} bytes but had {record["bytes"]} when saved '
                       '(truncated or rewritten)')
  if not problems:
    intact = listing.keys()
    digests = _parallel(lambda rel: _sha256(os.path.join(path, rel)), list(intact))
    problems = {rel: 'has other bytes than when it was saved (its SHA-256 differs)'
                for rel, digest in zip(intact, digests) if digest != listing[rel]['sha256']}
  if problems:
    first = sorted(problems)[0]
    raise ValueError(_damaged(path, os.path.join(path, first), problems[first], len(problems) - 1))
  return True


def _parse_manifest(raw: bytes) -> dict:
  listing = json.loads(raw)['files']
  for rel, record in listing.items():
    well_formed = (isinstance(record, dict) and isinstance(record.get('bytes'), int)
                   and isinstance(record.get('sha256'), str))
    inside = not rel.startswith('/') and '..' not in rel.split('/')
    if not (well_formed and inside):
      raise ValueError(f'bad entry for {rel!r}')
  return listing


def _orbax_read(path: str, read):
  """``read()``, with Orbax's and TensorStore's errors as a ValueError naming the checkpoint."""
  try:
    return read()
  except (ValueError, TypeError, KeyError, OSError) as e:
    raise ValueError(f"restore: reading the checkpoint at '{path}' failed: {e}. Files changed "
                     'since it was saved are the usual cause; restore it from a copy or save '
                     'again.') from e


def load_pure_dict(path: str | os.PathLike) -> dict:
  """The checkpoint as nested dicts of numpy-backed arrays (int keys restored)."""
  path = _absolute(path)
  _read_metadata(path)
  with _checkpointer() as checkpointer:
    return restore_int_paths(_orbax_read(path, lambda: checkpointer.restore(path)))


# A Variable may hold a plain Python number; Orbax keeps those as Python numbers.
_PY_SCALARS = (bool, int, float, complex)


def _load_on_host(path: str, raw_metadata: dict) -> dict:
  """The checkpoint as numpy arrays (PRNG keys as their raw data) and Python numbers.

  Left to itself Orbax puts arrays on a device *committed* to it, and jitted
  functions see committed inputs as a new signature: every jitted step would
  compile again after a restore. ``jnp.asarray`` of host data is uncommitted,
  like the arrays of a freshly built model.
  """
  def like(m):
    if _is_python_number(m):
      return np.zeros((), m.dtype).item()
    return np.empty(m.shape, m.dtype)

  with _checkpointer() as checkpointer:
    tree = jax.tree.map(like, raw_metadata)
    return restore_int_paths(_orbax_read(path, lambda: checkpointer.restore(path, tree)))


def _is_python_number(metadata) -> bool:
  import orbax.checkpoint as ocp
  return isinstance(metadata, ocp.metadata.ScalarMetadata)


def _key_impl(key):
  if isinstance(key, jax.Array):
    return jax.random.key_impl(key)
  found = []  # an abstract key: its impl is read while tracing
  jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key)
  return found[0]


def _as_target_value(loaded, target_value):
  """A loaded leaf as a value of the target's kind: Python number, array or typed PRNG key."""
  if isinstance(loaded, _PY_SCALARS):
    return loaded if isinstance(target_value, _PY_SCALARS) else jax.numpy.asarray(
        loaded, target_value.dtype)
  data = jax.numpy.asarray(loaded)
  wants_key = (not isinstance(target_value, _PY_SCALARS)
               and jnp.issubdtype(target_value.dtype, jax.dtypes.prng_key))
  if wants_key and not jnp.issubdtype(data.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(data, impl=_key_impl(target_value))
  return data


_KINDS = {'b': np.bool_, 'i': np.integer, 'u': np.integer, 'f': np.floating,
          'c': np.complexfloating}


def _dtype_fits(got: np.dtype, value, want: np.dtype, saved_python_number: bool) -> bool:
  # A Python number's dtype is only its kind: a counter saved as 0 may be int32 after training.
  if isinstance(value, _PY_SCALARS) or saved_python_number:
    return np.issubdtype(got, _KINDS.get(want.kind, np.number)) and np.issubdtype(
        want, _KINDS.get(got.kind, np.number))
  return got == want


def _stored_shape_dtype(value) -> tuple[tuple, np.dtype]:
  if isinstance(value, _PY_SCALARS):
    return (), np.dtype(type(value))
  # Orbax writes a typed PRNG key (an Rngs stream's key) as its raw key data, so
  # the metadata describes that data, not the key<impl> dtype.
  if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    value = jax.eval_shape(jax.random.key_data, value)
  return tuple(np.shape(value)), np.dtype(value.dtype)


def _check_compatible(saved: dict, target_state) -> None:
  saved_flat = flat_dict(saved)
  target_flat = {p: v for p, v in flat_dict(target_state).items()}
  for p in target_flat:
    if p not in saved_flat:
      raise ValueError(f'restore: the checkpoint has nothing at {format_path(p)}, which the target '
                       'has. It was saved from a model of another structure.')
  for p in saved_flat:
    if p not in target_flat:
      raise ValueError(f'restore: the checkpoint has {format_path(p)}, which the target lacks. '
                       'It was saved from a model of another structure.')
  for p, leaf in target_flat.items():
    value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf
    want_shape, want_dtype = _stored_shape_dtype(value)
    got = saved_flat[p]
    got_shape, got_dtype = tuple(got.shape), np.dtype(got.dtype)
    if got_shape != want_shape:
      raise ValueError(f'restore: {format_path(p)} has shape {got_shape} in the checkpoint but '
                       f'{want_shape} in the target. Build the target with the saved configuration.')
    if not _dtype_fits(got_dtype, value, want_dtype, _is_python_number(got)):
      raise ValueError(f'restore: {format_path(p)} has dtype {got_dtype} in the checkpoint but '
                       f'{want_dtype} in the target. Build the target with param_dtype={got_dtype}.')


def _is_abstract(state) -> bool:
  leaves = [v.get_value() if hasattr(v, 'get_value') else v for v in flat_dict(state).values()]
  return any(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)


def _placements(target_state, shardings) -> dict:
  """Per path of the target: the sharding to restore onto (None: default device)."""
  flat = flat_dict(target_state)
  if shardings is not None:
    placed = leaf_shardings(shardings, list(flat), list(flat.values()), 'restore shardings')
    return dict(zip(flat, placed))
  out = {}
  for p, leaf in flat.items():
    value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf
    sharding = getattr(value, 'sharding', None)
    out[p] = sharding if isinstance(sharding, NamedSharding) else None
  return out


def _load_sharded(path: str, raw_metadata: dict, target_state, shardings) -> dict:
  """The checkpoint as nested dicts; Orbax reads each array straight onto its sharding."""
  placements = _placements(target_state, shardings)
  if all(s is None for s in placements.values()):
    return _load_on_host(path, raw_metadata)
  saved = flat_dict(restore_int_paths(raw_metadata))
  fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = from_flat_state({
      p: jax.ShapeDtypeStruct(tuple(saved[p].shape), saved[p].dtype, sharding=s or fallback)
      for p, s in placements.items()})
  tree = _stringify_keys(to_pure_dict(abstract))
  with _checkpointer() as checkpointer:
    return restore_int_paths(_orbax_read(path, lambda: checkpointer.restore(path, tree)))


def restore(path: str | os.PathLike, target, *, shardings=None):
  """Load ``path`` into ``target``: in place for a concrete target; a new object for an abstract one.

  Every file is checked against the checkpoint's manifest and the saved
  structure, shapes and dtypes against the target's before anything is loaded,
  so a failed restore leaves ``target`` untouched.

    >>> import arbax as nnx, tempfile, os
    >>> saved = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> nnx.checkpoint.save(path, saved)
    >>> abstract = nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
    >>> model = nnx.checkpoint.restore(path, abstract)  # a new Linear holding the saved arrays
    >>> bool((model.kernel[...] == saved.kernel[...]).all())
    True

  Args:
    path: a checkpoint directory ``save`` (or Orbax) wrote.
    target: a concrete object to fill in place, or an abstract one to build from.
    shardings: where arrays land: one sharding, an ``nnx.StateSharding`` or a
      tree shaped like the target's State. By default, the sharding the
      target's arrays or ShapeDtypeStructs carry (``nnx.get_abstract_model``),
      whatever mesh saved them.

  Returns:
    The restored object (``target`` itself when it was concrete).

  Raises:
    FileNotFoundError: nothing exists at ``path``.
    ValueError: the checkpoint is damaged (names the file), or its structure,
      shapes or dtypes differ from the target's (names the path).
  """
  path = _absolute(path)
  graphdef, target_state = api.split(target, graph=True)
  raw_metadata = _read_metadata(path)
  _check_compatible(restore_int_paths(raw_metadata), target_state)
  pure = _load_sharded(path, raw_metadata, target_state, shardings)
  loaded = flat_dict(pure)
  values = {p: _as_target_value(loaded[p], leaf.get_value() if hasattr(leaf, 'get_value') else leaf)
            for p, leaf in flat_dict(target_state).items()}
  if _is_abstract(target_state):
    fresh = {p: (leaf.replace(values[p]) if hasattr(leaf, 'replace') else values[p])
             for p, leaf in flat_dict(target_state).items()}
    return api.merge(graphdef, from_flat_state(fresh))
  api.update(target, from_flat_state(values))
  return target
