"""nnx.transform_metadata: the mapped axis leaves the sharding annotations inside, comes back after."""
import jax.numpy as jnp
import pytest

import arbax as nnx


def annotated(names, value=0.0, **metadata):
  return nnx.Param(jnp.asarray(value), out_sharding=names, eager_sharding=False, **metadata)


def test_inputs_lose_the_axis_inside_and_outputs_gain_it_at_out_axes():
  v = annotated(('layers', 'din', 'dout'))
  seen = []

  @nnx.transform_metadata(in_axes=0, out_axes=1, partition='layers')
  def f(v):
    seen.append(v.out_sharding)
    v[...] += 1                                     # value writes stay
    return annotated(('dmid', 'dout'), 10.0)

  out = f(v)
  assert seen == [('din', 'dout')]
  assert v.out_sharding == ('layers', 'din', 'dout') and float(v[...]) == 1.0
  assert out.out_sharding == ('dmid', 'layers', 'dout') and float(out[...]) == 10.0


def test_partition_none_is_an_unnamed_axis():
  v = annotated((None, 'dout'))

  @nnx.transform_metadata(in_axes=0, out_axes=1, partition=None)
  def f(v):
    assert v.out_sharding == ('dout',)
    return annotated(('dmid', 'dout'))

  assert f(v).out_sharding == ('dmid', None, 'dout')
  assert v.out_sharding == (None, 'dout')


def test_in_axes_prefix_tree_and_keyword_arguments():
  a, b, c = annotated(('l', 'x')), annotated(('x', 'l')), annotated(('l', 'y'))
  inside = {}

  def f(pair, other, *, extra=None):
    inside.update(a=pair['a'].out_sharding, b=pair['b'].out_sharding,
                  c=other.out_sharding)
    return jnp.ones(2), {'new': annotated(('q',))}

  wrapped = nnx.transform_metadata(f, in_axes=({'a': 0, 'b': 1}, None), out_axes=(None, 0),
                                   partition='l')
  array, outs = wrapped({'a': a, 'b': b}, other=c)  # keywords are placed by the signature
  assert inside == {'a': ('x',), 'b': ('x',), 'c': ('l', 'y')}
  assert outs['new'].out_sharding == ('l', 'q') and array.shape == (2,)
  assert (a.out_sharding, b.out_sharding, c.out_sharding) == (('l', 'x'), ('x', 'l'), ('l', 'y'))


def test_modules_are_walked_and_shared_variables_moved_once_in_graph_mode():
  class Block(nnx.Module):
    def __init__(self):
      self.w = annotated(('layers', 'd'))
      self.tied = self.w

  block = Block()

  @nnx.transform_metadata(partition='layers')
  def f(block):
    assert block.w.out_sharding == ('d',) and block.tied is block.w
    block.extra = annotated(('e',))     # a new attribute stays: the Module is the caller's
    return None

  f(block)
  assert block.w.out_sharding == ('layers', 'd') and block.extra.out_sharding == ('e',)


def test_tree_mode_refuses_shared_variables():
  class Block(nnx.Module):
    def __init__(self):
      self.w = annotated(('layers', 'd'))
      self.tied = self.w

  f = nnx.transform_metadata(lambda b: None, partition='layers', graph=False)
  with pytest.raises(ValueError, match=r'\.tied|\.w'):
    f(Block())
  with nnx.set_graph_mode(False):  # graph=None: the mode when decorating decides
    g = nnx.transform_metadata(lambda b: None, partition='layers')
  with pytest.raises(ValueError, match=r'\.tied|\.w'):
    g(Block())


def test_a_failed_call_leaves_inputs_as_they_were():
  v = annotated(('layers', 'd'), 2.0)

  @nnx.transform_metadata(partition='layers')
  def f(v):
    v[...] = 7.0
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    f(v)
  assert v.out_sharding == ('layers', 'd') and float(v[...]) == 2.0


def test_a_wrong_partition_name_names_what_was_found_and_restores_the_rest():
  good, bad = annotated(('layers', 'd')), annotated(('d', 'layers'))
  f = nnx.transform_metadata(lambda a, b: None, partition='layers')
  with pytest.raises(ValueError, match="'layers' at index 0.*found 'd'"):
    f(good, bad)
  assert good.out_sharding == ('layers', 'd')


def test_returning_an_input_variable_is_a_value_error():
  v = annotated(('layers', 'd'))
  f = nnx.transform_metadata(lambda v: v, partition='layers')
  with pytest.raises(ValueError, match=r'output at <root> is the input Variable at \[0\]'):
    f(v)
  assert v.out_sharding == ('layers', 'd')


def test_axes_that_are_not_a_prefix_name_the_path():
  f = nnx.transform_metadata(lambda a, b: None, in_axes=(0,), partition='layers')
  with pytest.raises(ValueError, match=r'in_axes=\(0,\).*\[1\]'):
    f(annotated(('layers',)), annotated(('layers',)))
