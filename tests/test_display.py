"""display: reprs with per-kind counts and bytes (as NNX prints them), treescope."""
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

import arbax as nnx

display_lib = importlib.import_module('arbax.display')  # `arbax.display` the name is the function


class Layer(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((2, 5)))
    self.n = 3
    self.c = nnx.BatchStat(jnp.zeros(2))
    self.items = nnx.List([nnx.Param(jnp.ones(1)), 5])


LAYER_REPR = """Layer( # BatchStat: 2 (8 B), Param: 11 (44 B), Total: 13 (52 B)
  w=Param( # 10 (40 B)
    value=Array(shape=(2, 5), dtype=dtype('float32'))
  ),
  n=3,
  c=BatchStat( # 2 (8 B)
    value=Array(shape=(2,), dtype=dtype('float32'))
  ),
  items=List([
    Param( # 1 (4 B)
      value=Array([1.], dtype=float32)
    ),
    5
  ])
)"""


def test_pytree_repr_has_per_kind_counts_bytes_and_abbreviated_arrays():
  assert repr(Layer()) == LAYER_REPR


def test_header_counts_kinds_in_key_order_and_totals():
  class M(nnx.Module):
    def __init__(self):
      self.a = nnx.Param(jnp.ones(1))
      self.z = nnx.BatchStat(jnp.ones(1))
      self.m = nnx.Intermediate(jnp.ones(3))
  assert repr(M()).splitlines()[0] == (
      'M( # Param: 1 (4 B), Intermediate: 3 (12 B), BatchStat: 1 (4 B), Total: 5 (20 B)')


def test_large_counts_use_thousands_separators_and_kb():
  text = repr(nnx.Param(jnp.ones(1000)))
  assert text.splitlines()[0] == 'Param( # 1,000 (4.0 KB)'
  assert _summary_line(nnx.Param(jnp.ones(2_000_000))) == 'Param( # 2,000,000 (8.0 MB)'


def _summary_line(v):
  return repr(v).splitlines()[0]


def test_top_level_variable_repr_shows_the_value_and_metadata():
  assert repr(nnx.Param(jnp.array([1.0, 2.0]), tag='x')) == (
      "Param( # 2 (8 B)\n  value=Array([1., 2.], dtype=float32),\n  tag='x'\n)")


def test_python_values_are_not_counted():
  assert repr(nnx.Variable(3)) == 'Variable(\n  value=3\n)'

  class M(nnx.Module):
    def __init__(self):
      self.v = nnx.Variable(3)
      self.p = nnx.Param(jnp.ones(1))
  assert repr(M()).splitlines()[0] == 'M( # Param: 1 (4 B)'


def test_empty_and_container_reprs():
  class Empty(nnx.Module):
    pass

  class Holder(nnx.Module):
    def __init__(self):
      self.d = nnx.Dict(a=nnx.Param(jnp.ones(1)))
      self.e = nnx.List([])
      self.t = nnx.data((nnx.Param(jnp.ones(1)), 2))

  assert repr(Empty()) == 'Empty()'
  text = repr(Holder())
  assert "  d=Dict({\n    'a': Param( # 1 (4 B)" in text
  assert '  e=List([]),' in text
  assert '  t=(Param( # 1 (4 B)\n    value=Array([1.], dtype=float32)\n  ), 2)' in text


def test_shared_pytree_is_printed_once():
  class Inner(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(1))

  class Outer(nnx.Module):
    def __init__(self):
      self.x = Inner()
      self.y = self.x
  text = repr(Outer())
  assert '  y=Inner(...)' in text and text.count('w=Param') == 1


def test_cycles_do_not_recurse_forever():
  class Node(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(1))
  a = Node()
  a.me = nnx.data(a)
  assert 'me=Node(...)' in repr(a)


def test_state_repr_shows_full_arrays():
  text = repr(nnx.state(Layer()))
  assert text.startswith('State({')
  assert 'value=Array([[1., 1., 1., 1., 1.],' in text
  assert "  'items': {\n    0: Param( # 1 (4 B)" in text


def test_display_prints_the_repr_outside_notebooks(capsys):
  layer = Layer()
  nnx.display(layer, nnx.Param(jnp.ones(1)))
  out = capsys.readouterr().out
  assert out.startswith(LAYER_REPR + '\n') and out.endswith('Param( # 1 (4 B)\n'
                                                            '  value=Array([1.], dtype=float32)\n'
                                                            ')\n')


def test_display_uses_treescope_in_notebooks(monkeypatch, capsys):
  import treescope
  shown = []
  monkeypatch.setattr(display_lib, 'in_notebook', lambda: True)
  monkeypatch.setattr(treescope, 'display', shown.append)
  layer = Layer()
  nnx.display(layer)
  assert shown == [layer] and capsys.readouterr().out == ''


def test_treescope_renders_variables_and_pytrees():
  treescope = pytest.importorskip('treescope')
  text = treescope.render_to_text(Layer())
  assert text.startswith('Layer(') and 'w=Param(' in text and 'n=3' in text
  assert "tag='t'" in treescope.render_to_text(nnx.Param(jnp.ones(2), tag='t'))


def test_nnx_visualization_is_this_module_under_nnx_name():
  import arbax.visualization as visualization  # NNX's module name, importable as well
  assert visualization is display_lib is nnx.visualization
  assert nnx.visualization.display is nnx.display


# -- NNX's value formatting ------------------------------------------------------
def test_classes_print_by_name_in_layers_containers_and_metadata():
  layer = nnx.Linear(2, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  text = repr(layer)
  assert '  dtype=bfloat16,\n' in text and '  param_dtype=float32,\n' in text
  assert "dtype=float32\n)" in repr(nnx.Param(jnp.ones(2), dtype=jnp.float32))

  class Config(nnx.Module):
    def __init__(self):
      self.cfg = {'dtype': jnp.float32, 'kinds': (nnx.Param, nnx.BatchStat)}
      self.np_dtype = jnp.dtype('float32')  # a dtype instance keeps its repr
  text = repr(Config())
  assert "cfg={'dtype': float32, 'kinds': (Param, BatchStat)}" in text
  assert "np_dtype=dtype('float32')" in text


def test_arrays_in_full_in_nnx_containers_and_abbreviated_in_plain_ones():
  class Holder(nnx.Module):
    def __init__(self):
      self.tracked = nnx.List([nnx.Param(jnp.ones(2))])
      self.plain = nnx.data([jnp.ones(3), jnp.ones(1)])
      self.host = np.ones(3)
  text = repr(Holder())
  assert '    Param( # 2 (8 B)\n      value=Array([1., 1.], dtype=float32)\n    )' in text
  assert ("plain=[Array(shape=(3,), dtype=dtype('float32')), Array([1.], dtype=float32)]"
          in text)
  assert "host=Array(shape=(3,), dtype=dtype('float64'))" in text


def test_private_attributes_are_shown_only_when_they_are_data():
  class Private(nnx.Module):
    def __init__(self):
      self._w = nnx.Param(jnp.ones(1))
      self._cache_key = 'hidden'
  text = repr(Private())
  assert '_w=Param(' in text and '_cache_key' not in text


def test_a_variable_holding_a_dict_prints_it_inline():
  assert repr(nnx.Intermediate({'a': jnp.ones(2), 'b': (1, int)})) == (
      "Intermediate( # 2 (8 B)\n  value={'a': Array([1., 1.], dtype=float32), 'b': (1, int)}\n)")


def test_rng_keys_and_counts_are_counted_together_as_rng_state():
  text = repr(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
  assert text.splitlines()[0] == 'Dropout( # RngState: 2 (12 B)'


def test_switches_at_their_default_are_hidden():
  assert 'hijax' not in repr(nnx.Param(jnp.ones(1)))
  assert 'ref' not in repr(nnx.Param(jnp.ones(1)))
  assert repr(nnx.Param(jnp.ones(1), hijax=True)).endswith('  hijax=True\n)')


def test_a_shared_subtree_is_counted_once_in_every_header():
  class Inner(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(3))

  class Outer(nnx.Module):
    def __init__(self):
      self.x = Inner()
      self.y = self.x
  lines = repr(Outer()).splitlines()
  assert lines[0] == 'Outer( # Param: 3 (12 B)' and lines[1] == '  x=Inner( # Param: 3 (12 B)'


# -- the hook the lower layers call -----------------------------------------------
def test_display_installs_its_renderers_in_reprhook():
  from arbax import reprhook
  layer = Layer()
  assert reprhook.render(layer) == display_lib.object_repr(layer) == LAYER_REPR
  treescope = pytest.importorskip('treescope')

  class Private(nnx.Module):
    def __init__(self):
      self._w = nnx.Param(jnp.ones(1))
      self._cache_key = 'hidden'
  text = treescope.render_to_text(Private())  # the same attributes as the repr
  assert text.startswith('Private(') and '_w=Param(' in text and '_cache_key' not in text


def test_reprhook_forwards_to_what_is_installed(monkeypatch):
  from arbax import reprhook
  monkeypatch.setattr(reprhook, '_renderers', [lambda obj: 'R', lambda obj, p, r: 'T'])
  assert reprhook.render(object()) == 'R'
  assert reprhook.render_treescope(object(), None, None) == 'T'
  reprhook.install(lambda obj: 'S', lambda obj, p, r: 'U')
  assert reprhook.render(1) == 'S' and reprhook.render_treescope(1, None, None) == 'U'
