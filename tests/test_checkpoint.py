"""nnx.checkpoint: Orbax save/restore of model and optimizer State that never loses data."""
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import arbax as nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nnx.Module):
  def __init__(self, *, rngs, dout=2, layers=2, l1_dtype=jnp.float32):
    self.l1 = nnx.Linear(3, 4, param_dtype=l1_dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)          # holds an RngStream: a typed PRNG key
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(layers)])
    self.l2 = nnx.Linear(4, dout, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.l1(x))))
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.l2(x)


X = jnp.linspace(-1.0, 1.0, 15, dtype=jnp.float32).reshape(5, 3)
Y = jnp.stack([jnp.sin(X.sum(1)), jnp.cos(X[:, 0])], axis=1)


@nnx.jit
def train_step(model, optimizer):
  def loss_fn(model):
    return jnp.mean((model(X) - Y) ** 2)
  optimizer.update(model, nnx.grad(loss_fn)(model))


def trained(seed=0):
  model = Net(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  for _ in range(3):
    train_step(model, optimizer)
  return model, optimizer


def snapshot(obj) -> dict:
  """Every Variable's value as a host copy (PRNG keys as their raw data), by path."""
  out = {}
  for path, var in nnx.state(obj).flat_state():
    value = var.get_value()
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    out[path] = np.array(value)
  return out


def assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype, path
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A trained (model, optimizer) written to disk once; tests only read it."""
  model, optimizer = trained()
  path = tmp_path_factory.mktemp('ckpt') / 'model_and_opt'
  nnx.checkpoint.save(path, (model, optimizer))
  model_only = tmp_path_factory.mktemp('ckpt') / 'model'
  nnx.checkpoint.save(model_only, model)
  return {'pair': path, 'model': model_only, 'objects': (model, optimizer),
          'values': snapshot((model, optimizer)), 'model_values': snapshot(model)}


def test_round_trip_of_model_and_optimizer_is_bit_exact(saved):
  model, optimizer = trained(seed=1)          # other init, other optimizer moments
  assert int(optimizer.step[...]) == 3
  before = snapshot((model, optimizer))
  assert any(not np.array_equal(before[p], saved['values'][p]) for p in before)

  out = nnx.checkpoint.restore(saved['pair'], (model, optimizer))

  assert out[0] is model and out[1] is optimizer      # restored in place
  assert_same(snapshot((model, optimizer)), saved['values'])
  assert isinstance(model.drop.rngs.key.get_value(), jax.Array)
  assert jnp.issubdtype(model.drop.rngs.key.get_value().dtype, jax.dtypes.prng_key)


def test_restored_training_continues_exactly_like_the_original(saved):
  original, original_opt = trained()
  model, optimizer = trained(seed=1)
  nnx.checkpoint.restore(saved['pair'], (model, optimizer))
  # Adam's moments, its step count, BatchNorm stats and the dropout key all matter here.
  train_step(original, original_opt)
  train_step(model, optimizer)
  assert_same(snapshot((model, optimizer)), snapshot((original, original_opt)))
  assert int(optimizer.step[...]) == 4


def test_load_pure_dict_has_int_keys_for_lists(saved):
  pure = nnx.checkpoint.load_pure_dict(saved['model'])
  assert sorted(pure['layers']) == [0, 1]
  np.testing.assert_array_equal(pure['l2']['kernel'], saved['model_values'][('l2', 'kernel')])
  assert set(pure) == {'l1', 'bn', 'drop', 'layers', 'l2'}


@pytest.mark.parametrize('kwargs, culprit, words', [
    (dict(layers=3), '.layers[2]', ['nothing at', 'structure']),
    (dict(layers=1), '.layers[1]', ['lacks', 'structure']),
    (dict(dout=3), '.l2.bias', ['shape', '(2,)', '(3,)']),
    (dict(l1_dtype=jnp.bfloat16), '.l1.bias', ['dtype', 'float32', 'bfloat16']),
], ids=['target-has-more', 'target-has-less', 'shape', 'dtype'])
def test_incompatible_target_raises_naming_the_path_and_stays_untouched(saved, kwargs, culprit,
                                                                        words):
  target = Net(rngs=nnx.Rngs(7), **kwargs)
  before = snapshot(target)
  with pytest.raises(ValueError) as info:
    nnx.checkpoint.restore(saved['model'], target)
  message = str(info.value)
  assert culprit in message
  for word in words:
    assert word in message
  assert_same(snapshot(target), before)


def test_model_target_refuses_a_model_and_optimizer_checkpoint(saved):
  target = Net(rngs=nnx.Rngs(7))
  before = snapshot(target)
  with pytest.raises(ValueError, match='structure'):
    nnx.checkpoint.restore(saved['pair'], target)
  assert_same(snapshot(target), before)


def test_abstract_target_gives_a_new_concrete_model_equal_to_the_saved_one(saved):
  abstract = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0)))
  assert isinstance(abstract.l1.kernel.get_value(), jax.ShapeDtypeStruct)

  restored = nnx.checkpoint.restore(saved['model'], abstract)

  assert type(restored) is Net and restored is not abstract
  assert isinstance(restored.l1.kernel.get_value(), jax.Array)
  assert_same(snapshot(restored), saved['model_values'])
  model = saved['objects'][0]
  model.eval()
  restored.eval()
  np.testing.assert_array_equal(restored(X), model(X))


def test_abstract_model_and_optimizer_pair(saved):
  def build():
    model = Net(rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  model, optimizer = nnx.checkpoint.restore(saved['pair'], nnx.eval_shape(build))
  assert_same(snapshot((model, optimizer)), saved['values'])
  assert int(optimizer.step[...]) == 3


class Counter(nnx.Module):
  def __init__(self):
    self.calls = nnx.BatchStat(0)        # a plain Python int, not an array
    self.scale = nnx.Param(1.5)
    self.w = nnx.Param(jnp.arange(3.0))


def test_python_number_variables_round_trip(tmp_path):
  source = Counter()
  source.calls.set_value(7)
  source.scale.set_value(0.1)                  # not representable in float32
  nnx.checkpoint.save(tmp_path / 'c', source)
  target = Counter()
  nnx.checkpoint.restore(tmp_path / 'c', target)
  assert target.calls.get_value() == 7 and type(target.calls.get_value()) is int
  assert target.scale.get_value() == 0.1 and type(target.scale.get_value()) is float
  np.testing.assert_array_equal(target.w.get_value(), jnp.arange(3.0))


def test_python_number_target_accepts_a_counter_that_became_an_array(tmp_path):
  source = Counter()
  source.calls.set_value(jnp.array(5, jnp.int32))   # what a jitted `calls[...] += 1` leaves
  nnx.checkpoint.save(tmp_path / 'c', source)
  target = Counter()
  nnx.checkpoint.restore(tmp_path / 'c', target)
  assert int(target.calls.get_value()) == 5


def test_python_number_target_refuses_another_kind(tmp_path):
  source = Counter()
  source.calls.set_value(jnp.array(5.5))
  nnx.checkpoint.save(tmp_path / 'c', source)
  with pytest.raises(ValueError, match=r'\.calls'):
    nnx.checkpoint.restore(tmp_path / 'c', Counter())


def test_jitted_steps_do_not_compile_again_after_a_restore(saved, caplog):
  model, optimizer = trained(seed=1)       # train_step is compiled for these
  nnx.checkpoint.restore(saved['pair'], (model, optimizer))
  with jax.log_compiles(True), caplog.at_level('WARNING'):
    train_step(model, optimizer)
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]


def test_bfloat16_params_round_trip(tmp_path):
  source = Net(rngs=nnx.Rngs(0), l1_dtype=jnp.bfloat16)
  nnx.checkpoint.save(tmp_path / 'bf16', source)
  target = Net(rngs=nnx.Rngs(1), l1_dtype=jnp.bfloat16)
  nnx.checkpoint.restore(tmp_path / 'bf16', target)
  assert target.l1.kernel.get_value().dtype == jnp.bfloat16
  assert_same(snapshot(target), snapshot(source))


def test_saved_python_number_restores_into_an_array_counter(tmp_path):
  nnx.checkpoint.save(tmp_path / 'c', Counter())            # calls is the Python int 0
  target = Counter()
  target.calls.set_value(jnp.array(9, jnp.int32))
  nnx.checkpoint.restore(tmp_path / 'c', target)
  value = target.calls.get_value()
  assert isinstance(value, jax.Array) and value.dtype == jnp.int32 and int(value) == 0


# -- saving never loses data ---------------------------------------------------------------------

class Tiny(nnx.Module):
  """Two by three copies of `seed`: nothing to compile, so separate processes start fast."""
  def __init__(self, seed):
    self.w = nnx.Param(np.full((2, 3), seed, np.float32))


def restored_seed(path) -> float:
  w = np.asarray(nnx.checkpoint.restore(path, Tiny(99)).w.get_value())
  assert (w == w[0, 0]).all()
  return float(w[0, 0])


def leftovers(path):
  """Everything beside the checkpoint in its parent directory."""
  return sorted(set(os.listdir(os.path.dirname(path))) - {os.path.basename(path)})


def test_save_refuses_an_existing_checkpoint_and_keeps_it(tmp_path):
  path = str(tmp_path / 'ckpt')
  nnx.checkpoint.save(path, Tiny(0))
  with pytest.raises(nnx.checkpoint.DestinationExistsError) as info:
    nnx.checkpoint.save(path, Tiny(1))
  assert isinstance(info.value, FileExistsError)
  assert isinstance(info.value, ValueError)          # what Orbax raises here
  assert path in str(info.value) and 'a checkpoint' in str(info.value)
  assert 'overwrite=True' in str(info.value)
  assert restored_seed(path) == 0
  assert leftovers(path) == []


@pytest.mark.parametrize('keyword', ['overwrite', 'force'])
def test_overwrite_or_force_replaces_a_checkpoint(tmp_path, keyword):
  path = str(tmp_path / 'ckpt')
  nnx.checkpoint.save(path, Tiny(0))
  nnx.checkpoint.save(path, Tiny(1), **{keyword: True})
  assert restored_seed(path) == 1
  assert leftovers(path) == []          # the replaced checkpoint is gone, no temporary left


def make_file(path):
  path.write_text('notes')


def make_user_dir(path):
  path.mkdir()
  (path / 'notes.txt').write_text('keep me')


@pytest.mark.parametrize('make, found', [
    (make_file, 'a file'),
    (make_user_dir, 'a directory that is not a checkpoint (holding notes.txt)'),
    (lambda p: p.mkdir(), 'an empty directory'),
], ids=['file', 'directory-with-files', 'empty-directory'])
def test_save_refuses_what_is_not_a_checkpoint_and_leaves_it_alone(tmp_path, make, found):
  path = tmp_path / 'ckpt'
  make(path)
  with pytest.raises(nnx.checkpoint.DestinationExistsError) as info:
    nnx.checkpoint.save(path, Tiny(0))
  assert str(path) in str(info.value) and found in str(info.value)
  if path.is_file():
    assert path.read_text() == 'notes'
  else:
    assert [p.read_text() for p in path.iterdir()] == (['keep me'] if os.listdir(path) else [])
  nnx.checkpoint.save(path, Tiny(0), overwrite=True)      # explicitly asked: replaced
  assert restored_seed(path) == 0


def test_without_an_atomic_exchange_saves_still_refuse_and_replace(tmp_path, monkeypatch):
  monkeypatch.setattr(nnx.checkpoint, '_libc_renameat2', lambda: None)   # as on macOS, Windows
  path = str(tmp_path / 'ckpt')
  nnx.checkpoint.save(path, Tiny(0))
  with pytest.raises(nnx.checkpoint.DestinationExistsError):
    nnx.checkpoint.save(path, Tiny(1))
  assert restored_seed(path) == 0
  nnx.checkpoint.save(path, Tiny(1), overwrite=True)
  assert restored_seed(path) == 1
  assert leftovers(path) == []


class Tagged(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(np.ones((2, 3), np.float32))
    self.name = nnx.Variable('relu')                 # a str: no checkpoint can store it


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path):
  path = str(tmp_path / 'ckpt')
  nnx.checkpoint.save(path, Tiny(0))
  with pytest.raises(ValueError, match=r"\.name holds str 'relu'.*plain attribute"):
    nnx.checkpoint.save(path, Tagged(), overwrite=True)
  with pytest.raises(ValueError, match=r'\.w is abstract'):
    nnx.checkpoint.save(path, nnx.eval_shape(lambda: Tiny(1)), overwrite=True)
  assert restored_seed(path) == 0
  assert leftovers(path) == []


def test_checkpoint_is_an_ordinary_orbax_checkpoint(tmp_path):
  nnx.checkpoint.save(tmp_path / 'ckpt', Tiny(3))
  with ocp.StandardCheckpointer() as checkpointer:
    pure = checkpointer.restore(tmp_path / 'ckpt')
  np.testing.assert_array_equal(pure['w'], np.full((2, 3), 3.0))


# -- restoring names what is wrong ---------------------------------------------------------------

def test_restoring_a_missing_path_is_file_not_found_naming_it(tmp_path):
  path = str(tmp_path / 'nothing')
  for read in (lambda: nnx.checkpoint.restore(path, Tiny(0)),
               lambda: nnx.checkpoint.load_pure_dict(path)):
    with pytest.raises(FileNotFoundError) as info:
      read()
    assert info.value.filename == path and f"'{path}'" in str(info.value)


def test_restoring_a_file_names_it(tmp_path):
  (tmp_path / 'ckpt').write_text('x')
  with pytest.raises(ValueError, match='is a file, not a checkpoint'):
    nnx.checkpoint.restore(tmp_path / 'ckpt', Tiny(0))


def largest_file(root):
  files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
  return max(files, key=os.path.getsize)


def truncate(file):
  with open(file, 'r+b') as f:
    f.truncate(os.path.getsize(file) // 2)


def flip_a_bit(file):
  with open(file, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x10           # Orbax alone would load the altered value silently
    f.seek(0)
    f.write(data)


@pytest.mark.parametrize('damage, which, words', [
    (truncate, largest_file, 'truncated'),
    (flip_a_bit, largest_file, 'SHA-256'),
    (os.remove, lambda root: os.path.join(root, '_METADATA'), 'missing'),
    (os.remove, lambda root: os.path.join(root, nnx.checkpoint.MANIFEST), 'missing'),
], ids=['truncated', 'bit-flip', 'metadata-deleted', 'manifest-deleted'])
def test_damaged_checkpoint_is_a_value_error_naming_the_file(saved, tmp_path, damage, which,
                                                              words):
  path = str(tmp_path / 'copy')
  shutil.copytree(saved['model'], path)
  file = which(path)
  damage(file)
  target = Net(rngs=nnx.Rngs(7))
  before = snapshot(target)
  with pytest.raises(ValueError) as info:
    nnx.checkpoint.restore(path, target)
  assert f"'{file}'" in str(info.value) and words in str(info.value)
  assert 'damaged' in str(info.value)
  assert_same(snapshot(target), before)
  with pytest.raises(ValueError, match='damaged'):
    nnx.checkpoint.load_pure_dict(path)


def test_plain_orbax_checkpoint_restores_and_names_its_missing_metadata(tmp_path):
  path = str(tmp_path / 'orbax')
  with ocp.StandardCheckpointer() as checkpointer:   # no arbax manifest: nothing to verify against
    checkpointer.save(path, nnx.to_pure_dict(nnx.state(Tiny(4))))
  assert restored_seed(path) == 4
  os.remove(os.path.join(path, '_METADATA'))
  with pytest.raises(ValueError, match=re.escape(f"'{path}/_METADATA'") + '.* missing or unreadable'):
    nnx.checkpoint.restore(path, Tiny(0))


# -- killed and concurrent saves: separate processes ---------------------------------------------

# Saves Tiny(seed) to `path`. `mode` picks where the process stops: it kills itself at that
# point of the save, or waits there until the other racer arrives, so what the test sees does
# not depend on timing.
CHILD = r"""
import os, signal, sys, time
import numpy as np
import arbax as nnx
import orbax.checkpoint as ocp

class Tiny(nnx.Module):
  def __init__(self, seed):
    self.w = nnx.Param(np.full((2, 3), seed, np.float32))

path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
move = nnx.checkpoint._move_into_place
orbax_save = ocp.StandardCheckpointer.save

def die(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)

def orbax_save_then_die(self, *args, **kwargs):
  orbax_save(self, *args, **kwargs)   # arrays written; Orbax's commit runs in the background
  die()

def move_then_die(*args):
  move(*args)
  die()

def meet_then_move(*args):
  barrier = mode.split(':', 1)[1]
  open(os.path.join(barrier, str(seed)), 'w').close()
  deadline = time.time() + 60
  while len(os.listdir(barrier)) < 2:
    if time.time() > deadline:
      sys.exit(4)
    time.sleep(0.01)
  move(*args)

if mode == 'kill-while-orbax-writes':
  ocp.StandardCheckpointer.save = orbax_save_then_die
elif mode == 'kill-before-move':
  nnx.checkpoint._move_into_place = die
elif mode == 'kill-after-move':
  nnx.checkpoint._move_into_place = move_then_die
else:
  nnx.checkpoint._move_into_place = meet_then_move
try:
  nnx.checkpoint.save(path, Tiny(seed), overwrite=mode.startswith('kill'))
except nnx.checkpoint.DestinationExistsError as error:
  print(error)
  sys.exit(3)
"""


def start_child(path, seed, mode):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, '-c', CHILD, str(path), str(seed), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# scenario: (where the save of Tiny(1) is killed, the seed at the path before it or None)
KILLS = {'while-orbax-writes': ('kill-while-orbax-writes', 0),
         'before-move': ('kill-before-move', 0),
         'after-move': ('kill-after-move', 0),
         'first-save': ('kill-before-move', None)}


@pytest.fixture(scope='module')
def killed_saves(tmp_path_factory):
  """Per scenario: (path, exit code, stderr) of a save killed midway; all run at once."""
  paths, children = {}, {}
  for name, (mode, before) in KILLS.items():
    paths[name] = str(tmp_path_factory.mktemp(name) / 'ckpt')
    if before is not None:
      nnx.checkpoint.save(paths[name], Tiny(before))
    children[name] = start_child(paths[name], 1, mode)
  out = {}
  for name, child in children.items():
    _, stderr = child.communicate(timeout=120)
    out[name] = (paths[name], child.returncode, stderr[-2000:])
  return out


@pytest.mark.parametrize('name, survivor', [
    ('while-orbax-writes', 0), ('before-move', 0), ('after-move', 1)])
def test_save_killed_midway_leaves_a_whole_checkpoint(killed_saves, name, survivor):
  path, code, stderr = killed_saves[name]
  assert code == -signal.SIGKILL, stderr
  assert restored_seed(path) == survivor            # old before the move, new after it
  [_] = leftovers(path)                             # the killed save's temporary directory
  nnx.checkpoint.save(path, Tiny(2), overwrite=True)
  assert restored_seed(path) == 2
  assert leftovers(path) == []                      # ... which the next save removed


def test_first_save_killed_leaves_no_checkpoint_and_says_so(killed_saves):
  path, code, stderr = killed_saves['first-save']
  assert code == -signal.SIGKILL, stderr
  with pytest.raises(FileNotFoundError, match='started but has not finished'):
    nnx.checkpoint.restore(path, Tiny(0))
  nnx.checkpoint.save(path, Tiny(0))                # the stray temporary is no obstacle
  assert restored_seed(path) == 0
  assert leftovers(path) == []


def test_two_processes_saving_to_one_path_one_wins_the_other_fails_cleanly(tmp_path):
  path, barrier = tmp_path / 'ckpt', tmp_path / 'barrier'
  barrier.mkdir()
  # Both have written their checkpoint before either moves it into place.
  children = {seed: start_child(path, seed, f'race:{barrier}') for seed in (1, 2)}
  outcome = {seed: (*child.communicate(timeout=120), child.returncode)
             for seed, child in children.items()}
  assert sorted(code for _, _, code in outcome.values()) == [0, 3], outcome
  loser = next(seed for seed, (_, _, code) in outcome.items() if code == 3)
  assert str(path) in outcome[loser][0] and 'another save' in outcome[loser][0]
  assert restored_seed(path) == 3 - loser           # the winner's checkpoint, whole
  assert leftovers(path) == ['barrier']
