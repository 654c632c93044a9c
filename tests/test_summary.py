"""summary: nnx.tabulate runs the model abstractly and tabulates its calls and its state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rich.text

import arbax as nnx

PLAIN = {'force_terminal': False, 'no_color': True, 'width': 300}


class Encoder(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def encode(self, x):
    return self.drop(self.norm(self.proj(x)))


class Model(nnx.Module):
  def __init__(self, rngs):
    self.enc = Encoder(rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.enc.encode(x))

  def features(self, x):
    return self.enc.encode(x)


def _rows(table: str) -> list[list[str]]:
  """The first line of each body row, split into stripped cells."""
  lines = table.splitlines()
  body = lines[lines.index(next(line for line in lines if line.startswith('┡'))) + 1:]
  starts = [0] + [i + 1 for i, line in enumerate(body) if line.startswith('├')]
  return [[c.strip() for c in body[i].split('│')[1:-1]] for i in starts
          if body[i].startswith('│')]


def _header(table: str) -> list[str]:
  line = next(row for row in table.splitlines() if row.startswith('┃'))
  return [c.strip() for c in line.split('┃')[1:-1]]


def test_one_row_per_call_in_call_order_with_paths_types_and_shapes():
  table = nnx.tabulate(Model(nnx.Rngs(0)), jnp.ones((3, 4)), console_kwargs=PLAIN)
  assert table.splitlines()[0].strip() == 'Model Summary'
  assert _header(table) == ['path', 'type', 'inputs', 'outputs', 'BatchStat', 'Param',
                            'RngState']
  rows = _rows(table)
  assert [r[:4] for r in rows[:-1]] == [
      ['', 'Model', 'float32[3,4]', 'float32[3,2]'],
      ['enc/encode', 'Encoder', 'float32[3,4]', 'float32[3,6]'],  # method name in the path
      ['enc/proj', 'Linear', 'float32[3,4]', 'float32[3,6]'],
      ['enc/norm', 'BatchNorm', 'float32[3,6]', 'float32[3,6]'],
      ['enc/drop', 'Dropout', 'float32[3,6]', 'float32[3,6]'],
      ['head', 'Linear', 'float32[3,6]', 'float32[3,2]'],
  ]
  # Totals per kind: Param 4*6+6 + 6+6 (norm scale, bias) + 6*2+2; BatchStat mean and var.
  assert rows[-1][3:] == ['Total', '12 (48 B)', '56 (224 B)', '2 (12 B)']
  assert 'Total Parameters: 70 (284 B)' in table


def test_kind_cells_list_own_variables_and_the_total_below_the_object():
  table = nnx.tabulate(Model(nnx.Rngs(0)), jnp.ones((3, 4)), console_kwargs=PLAIN)
  lines = table.splitlines()
  row = lines.index(next(line for line in lines if line.startswith('│ enc/proj')))
  param_column = [line.split('│')[6].strip() for line in lines[row:row + 4]]
  assert param_column == ['bias: float32[6]', 'kernel: float32[4,6]', '', '30 (120 B)']
  encoder_row = next(line for line in lines if line.startswith('│ enc/encode'))
  assert encoder_row.split('│')[5].strip() == '12 (48 B)'  # the BatchStats below Encoder


def test_metadata_beyond_the_required_is_listed_with_the_value():
  class Tagged(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 2)), sharding_names=('a', None), note='frozen')

    def __call__(self, x):
      return x @ self.w

  table = nnx.tabulate(Tagged(), jnp.ones((1, 2)), console_kwargs=PLAIN)
  for piece in ('w:', 'value: float32[2,2]', 'note: frozen', 'sharding_names:', '- a'):
    assert piece in table, piece
  assert 'hijax' not in table and 'eager_sharding' not in table


def _numpy(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.array(x)


def test_the_model_runs_abstractly_and_is_left_unchanged():
  model = Model(nnx.Rngs(0))
  seen = []
  original = Encoder.encode

  def spy(self, x):
    seen.append(type(x))
    return original(self, x)

  Encoder.encode = spy
  try:
    state_before = jax.tree.map(_numpy, nnx.state(model))
    nnx.tabulate(model, jnp.ones((3, 4)), console_kwargs=PLAIN)
  finally:
    Encoder.encode = original
  assert len(seen) == 1 and issubclass(seen[0], jax.core.Tracer)  # traced, never computed
  state_after = jax.tree.map(_numpy, nnx.state(model))  # BatchNorm stats, RNG counts untouched
  jax.tree.map(np.testing.assert_array_equal, state_before, state_after)
  assert 'encode' not in Model.__dict__ and Encoder.__dict__['encode'] is original
  assert 'sow' not in Encoder.__dict__  # inherited methods were patched and removed again


def test_methods_are_restored_when_the_model_raises():
  class Broken(nnx.Module):
    def __call__(self, x):
      raise RuntimeError('boom')

  call = Broken.__dict__['__call__']
  with pytest.raises(RuntimeError, match='boom'):
    nnx.tabulate(Broken(), jnp.ones(2))
  assert Broken.__dict__['__call__'] is call
  assert 'sow' not in Broken.__dict__


def test_depth_hides_deeper_rows_and_method_picks_the_entry_point():
  model = Model(nnx.Rngs(0))
  rows = _rows(nnx.tabulate(model, jnp.ones((3, 4)), depth=1, console_kwargs=PLAIN))
  assert [r[0] for r in rows[:-1]] == ['', 'head']
  rows = _rows(nnx.tabulate(model, jnp.ones((3, 4)), method='features', console_kwargs=PLAIN))
  assert [r[:2] for r in rows[:-1]] == [['features', 'Model'], ['enc/encode', 'Encoder'],
                                        ['enc/proj', 'Linear'], ['enc/norm', 'BatchNorm'],
                                        ['enc/drop', 'Dropout']]
  with pytest.raises(AttributeError, match="Model has no method 'predict'"):
    nnx.tabulate(model, jnp.ones((3, 4)), method='predict')


def test_a_shared_layer_called_twice_alike_is_one_row_and_counted_once():
  class Twice(nnx.Module):
    def __init__(self, rngs):
      shared = nnx.Linear(3, 3, rngs=rngs)
      self.a = shared
      self.b = shared

    def __call__(self, x):
      return self.b(self.a(x))

  table = nnx.tabulate(Twice(nnx.Rngs(0)), jnp.ones((1, 3)), console_kwargs=PLAIN)
  rows = _rows(table)
  assert [r[0] for r in rows[:-1]] == ['', 'a']  # its first path; the second call is the same
  assert rows[-1][-1] == '12 (48 B)'


def test_inputs_show_arrays_containers_keywords_none_and_empty_dicts():
  class Routes(nnx.Module):
    def route(self, x, table, *, mode=None):
      return {'out': x, 'n': 2}

    def __call__(self, x):
      self.route(x, {}, mode=None)
      return self.route((x, x[0]), {'k': jnp.int32(1)}, mode='fast')

  rows = nnx.tabulate(Routes(), jnp.ones((2, 5)), console_kwargs=PLAIN)
  text = rows.splitlines()
  first = text.index(next(line for line in text if line.startswith('│ route')))
  block = [line.split('│')[3].rstrip() for line in text[first:first + 3]]
  assert block == [' - float32[2,5]', ' - {}', ' mode: None']
  second = text.index(next(line for line in text[first + 3:] if line.startswith('│ route')))
  block = [line.split('│')[3].rstrip() for line in text[second:second + 4]]
  assert block == [' - - float32[2,5]', '   - float32[5]', ' - k: int32[]', ' mode: fast']
  assert [line.split('│')[4].strip() for line in text[first:first + 2]] == [
      'out: float32[2,5]', 'n: 2']
  assert [line.split('│')[4].strip() for line in text[second:second + 4]] == [
      'out:', '- float32[2,5]', '- float32[5]', 'n: 2']


def test_rng_stream_draws_are_hidden_by_the_default_row_filter():
  class Noisy(nnx.Module):
    def __init__(self, rngs):
      self.rngs = rngs

    def __call__(self, x):
      return x + jax.random.normal(self.rngs.noise(), x.shape)

  model = Noisy(nnx.Rngs(noise=0))
  assert [r[1] for r in _rows(nnx.tabulate(model, jnp.ones(3), console_kwargs=PLAIN))[:-1]] == [
      'Noisy']
  seen = []

  def keep_all(row):
    seen.append(row)
    return True

  rows = _rows(nnx.tabulate(model, jnp.ones(3), row_filter=keep_all, console_kwargs=PLAIN))
  assert [r[1] for r in rows[:-1]] == ['Noisy', 'RngStream']
  assert [(r.type, r.path) for r in seen] == [(Noisy, ()), (nnx.RngStream, ('rngs', 'noise'))]
  assert isinstance(seen[0], nnx.summary.CallInfo)
  assert rich.text.Text.from_markup(seen[0].outputs).plain == 'float32[3]'  # rich markup


def test_flops_columns_estimate_forward_and_backward_cost():
  class Dense(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((16, 16)))

    def __call__(self, x):
      return jnp.tanh(x @ self.w)

  table = nnx.tabulate(Dense(), jnp.ones((8, 16)), compute_flops=True, compute_vjp_flops=True,
                       console_kwargs=PLAIN)
  header = _header(table)
  assert header[:6] == ['path', 'type', 'inputs', 'outputs', 'flops', 'vjp_flops']
  row = _rows(table)[0]
  flops, vjp_flops = int(row[4]), int(row[5])
  assert flops >= 2 * 8 * 16 * 16  # at least the matmul's multiply-adds
  assert vjp_flops > flops  # the backward pass adds two more matmuls
  assert _rows(table)[-1][5] == 'Total'
  plain = nnx.tabulate(Dense(), jnp.ones((8, 16)), console_kwargs=PLAIN)
  assert 'flops' not in _header(plain)


def test_table_and_column_options_reach_rich():
  table = nnx.tabulate(Model(nnx.Rngs(0)), jnp.ones((3, 4)), table_kwargs={'title': 'Mine'},
                       column_kwargs={'justify': 'right'}, console_kwargs=PLAIN)
  assert table.splitlines()[0].strip() == 'Mine'
  assert 'Model Summary' not in table


def test_nnx_summary_is_this_module():
  assert nnx.summary.tabulate is nnx.tabulate


def test_flops_need_one_run_of_each_body_and_list_every_equal_layer():
  runs = []

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
      runs.append(self)
      return self.linear(x)

  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.blocks = nnx.List([Block(rngs) for _ in range(4)])

    def __call__(self, x):
      for block in self.blocks:
        x = block(x)
      return x

  model = Stack(nnx.Rngs(0))
  first = nnx.tabulate(model, jnp.ones((3, 2)), compute_flops=True, console_kwargs={'width': 200})
  assert len(runs) == 4  # each Block's body traced once: lowering and call share the trace
  for i in range(4):
    assert f'blocks/{i}/linear' in first  # equal layers are not merged into one trace
  again = nnx.tabulate(model, jnp.ones((3, 2)), compute_flops=True, console_kwargs={'width': 200})
  assert again == first and len(runs) == 8
