"""The seam between ``__repr__`` of the low layers and ``arbax.display``, which renders.

Variables, Pytrees and States are defined below ``arbax.display`` (it needs
them to render), so they must not import it. Their methods call this module
instead::

    def __repr__(self):
      return reprhook.render(self)

    def __treescope_repr__(self, path, subtree_renderer):
      return reprhook.render_treescope(self, path, subtree_renderer)

``arbax.display`` installs the real renderers when it is imported (``import
arbax`` always imports it); until then objects show as ``<Type object>``.
"""
from __future__ import annotations

import typing as tp

__all__ = ['install', 'render', 'render_treescope']


def _plain(obj) -> str:
  return f'<{type(obj).__name__} object>'


def _no_treescope(obj, path, subtree_renderer):
  return NotImplemented  # treescope falls back to its default rendering


_renderers: list[tp.Callable] = [_plain, _no_treescope]


def install(render: tp.Callable[[tp.Any], str], render_treescope: tp.Callable) -> None:
  """Set the functions ``render`` / ``render_treescope`` forward to (done by ``arbax.display``)."""
  _renderers[:] = [render, render_treescope]


def render(obj) -> str:
  """The repr of a Variable, Pytree or State."""
  return _renderers[0](obj)


def render_treescope(obj, path, subtree_renderer):
  """The treescope rendering of a Variable, Pytree or State."""
  return _renderers[1](obj, path, subtree_renderer)
