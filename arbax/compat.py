"""``nnx.compat``: the graph-mode spelling of the API, whatever the current default.

Every function here is the one of ``nnx`` with ``graph=True`` (and, for the
transforms, ``graph_updates=True``) as its default, so code written for graph
mode keeps working under ``nnx.set_graph_mode(False)``:

    >>> import arbax as nnx
    >>> class Pair(nnx.Module):
    ...   def __init__(self):
    ...     self.a = nnx.Param(1.0)
    ...     self.b = self.a                 # shared: only graph mode allows it
    >>> with nnx.set_graph_mode(False):
    ...   graphdef, state = nnx.compat.split(Pair())
    >>> list(state)
    ['a']

An explicit ``graph=`` / ``graph_updates=`` argument still wins.
"""
from __future__ import annotations

import functools
import inspect
import typing as tp

from arbax import api, module, rngs, spmd
from arbax import transforms
from arbax.transforms.shard_map import shard_map as shard_map_transform

__all__ = ['split', 'state', 'clone', 'graphdef', 'flatten', 'iter_graph', 'recursive_map',
           'view', 'view_info', 'iter_modules', 'iter_children', 'split_rngs', 'fork_rngs',
           'reseed', 'jit', 'shard_map', 'grad', 'value_and_grad', 'custom_vjp', 'vjp', 'jvp', 'remat', 'vmap',
           'scan', 'pmap', 'while_loop', 'fori_loop', 'eval_shape', 'cond', 'switch', 'checkify',
           'cached_partial', 'get_abstract_model']


def graph_default(fn: tp.Callable) -> tp.Callable:
  """``fn`` with ``graph=True`` (and ``graph_updates=True`` where it has one) as defaults."""
  params = inspect.signature(fn).parameters
  defaults = {name: True for name in ('graph', 'graph_updates') if name in params}
  return functools.partial(fn, **defaults) if defaults else fn


split = graph_default(api.split)
state = graph_default(api.state)
clone = graph_default(api.clone)
graphdef = graph_default(api.graphdef)
flatten = graph_default(api.flatten)
iter_graph = graph_default(api.iter_graph)
recursive_map = graph_default(api.recursive_map)

view = graph_default(module.view)
view_info = graph_default(module.view_info)
iter_modules = graph_default(module.iter_modules)
iter_children = graph_default(module.iter_children)

split_rngs = graph_default(rngs.split_rngs)
fork_rngs = graph_default(rngs.fork_rngs)
reseed = graph_default(rngs.reseed)

jit = graph_default(transforms.jit)
shard_map = graph_default(shard_map_transform)
grad = graph_default(transforms.grad)
value_and_grad = graph_default(transforms.value_and_grad)
custom_vjp = graph_default(transforms.custom_vjp)
vjp = graph_default(transforms.vjp)
jvp = graph_default(transforms.jvp)
remat = graph_default(transforms.remat)
vmap = graph_default(transforms.vmap)
scan = graph_default(transforms.scan)
pmap = graph_default(transforms.pmap)
while_loop = graph_default(transforms.while_loop)
fori_loop = graph_default(transforms.fori_loop)
eval_shape = graph_default(transforms.eval_shape)
cond = graph_default(transforms.cond)
switch = graph_default(transforms.switch)
checkify = graph_default(transforms.checkify)
cached_partial = graph_default(transforms.cached_partial)

get_abstract_model = graph_default(spmd.get_abstract_model)
