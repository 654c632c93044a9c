"""Cell: a mutable JAX value whose writes JAX carries out of jit, control flow and vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arbax.cell import (Cell, CellGradError, NoTypeStateError, cell_get, cell_set, is_cell,
                        new_cell)


def test_eager_cell_reads_and_writes_its_contents():
  c = new_cell(jnp.array(1.0))
  assert type(c) is Cell and is_cell(c)
  cell_set(c, cell_get(c) + 1)
  assert float(c.contents) == 2.0
  assert not is_cell(jnp.zeros(2))


def test_jit_argument_write_may_change_structure_and_dtype():
  c = Cell({'n': jnp.array(0)})

  @jax.jit
  def f(c):
    cell_set(c, {'n': cell_get(c)['n'] + 1, 'mean': jnp.array(0.5, jnp.float32)})

  f(c)
  f(c)
  assert sorted(c.contents) == ['mean', 'n']
  assert int(c.contents['n']) == 2 and c.contents['mean'].dtype == jnp.float32


def test_closure_writes_come_back_from_jit_cond_and_scan_bodies():
  c = Cell(jnp.array(1.0))
  jax.jit(lambda x: cell_set(c, cell_get(c) * x))(3.0)
  jax.lax.cond(True, lambda: cell_set(c, cell_get(c) + 1), lambda: None)

  def body(carry, x):
    cell_set(c, cell_get(c) + x)
    return carry, cell_get(c)

  _, seen = jax.lax.scan(body, None, jnp.arange(3.0))
  assert float(c.contents) == 7.0  # 1 * 3 + 1 + (0 + 1 + 2)
  np.testing.assert_allclose(seen, [4.0, 5.0, 7.0])


def test_vmap_reads_a_captured_cell_and_refuses_per_example_writes():
  c = Cell(jnp.array(2.0))
  out = jax.vmap(lambda x: x * cell_get(c))(jnp.arange(3.0))
  np.testing.assert_allclose(out, [0.0, 2.0, 4.0])
  jax.vmap(lambda x: cell_set(c, cell_get(c) + 1))(jnp.arange(3.0))  # same for every example
  assert float(c.contents) == 3.0
  with pytest.raises(ValueError, match='per-example.*reduce it first'):
    jax.vmap(lambda x: cell_set(c, x))(jnp.arange(3.0))
  assert float(c.contents) == 3.0


def test_cell_created_from_per_example_values_holds_them_stacked():
  def f(x):
    c = new_cell(x * 2)
    cell_set(c, cell_get(c) + 1)  # a per-example write into the per-example Cell
    return cell_get(c)

  np.testing.assert_allclose(jax.vmap(f)(jnp.arange(3.0)), [1.0, 3.0, 5.0])


def test_grad_ignores_a_captured_cell_but_refuses_a_differentiated_one():
  c = Cell(jnp.array(3.0))
  g = jax.grad(lambda x: x * cell_get(c))(2.0)
  assert float(g) == 3.0
  with pytest.raises(CellGradError, match='mutable=False'):
    jax.grad(lambda c: cell_get(c) ** 2)(c)


def test_a_loop_carry_or_scanned_input_is_refused_with_the_workarounds():
  c = Cell(jnp.array(1.0))
  with pytest.raises(NoTypeStateError, match='closure'):
    jax.lax.fori_loop(0, 2, lambda i, c: (cell_set(c, cell_get(c) * 2), c)[1], c)
  with pytest.raises(NoTypeStateError, match='scan over'):
    jax.lax.scan(lambda carry, c: (carry, None), None, c, length=2)
  assert float(c.contents) == 1.0


# -- Cells created inside a traced program ------------------------------------------
@pytest.mark.parametrize('make', [lambda: jnp.array(7, jnp.uint32), lambda: jnp.array(1.5),
                                  lambda: 2.0, lambda: np.arange(3.0)],
                         ids=['uint32', 'float', 'python-float', 'numpy-array'])
def test_cell_created_from_a_constant_inside_jit_is_updated_and_read(make):
  @jax.jit
  def f():
    c = new_cell(make())  # made while tracing: JAX keeps it as a literal
    cell_set(c, cell_get(c) + 1)
    return cell_get(c)

  out = f()
  np.testing.assert_allclose(out, np.asarray(make()) + 1)
  assert out.dtype == jnp.asarray(make()).dtype


def test_constants_written_into_a_cell_inside_jit_reach_later_operations():
  @jax.jit
  def f(x):
    c = new_cell(x)
    cell_set(c, {'scale': 2.0, 'shift': np.int32(4)})
    got = cell_get(c)
    return got['scale'] * x + got['shift']

  assert float(f(3.0)) == 10.0


def test_a_constant_made_cell_inside_jit_is_updated_by_nested_control_flow():
  @jax.jit
  def f(x):
    c = new_cell(jnp.array(1.0))
    jax.lax.cond(x > 0, lambda: cell_set(c, cell_get(c) + x), lambda: None)

    def body(carry, _):
      cell_set(c, cell_get(c) * 2)
      return carry, cell_get(c)

    _, seen = jax.lax.scan(body, None, None, length=2)
    jax.jit(lambda: cell_set(c, cell_get(c) - 1))()
    return cell_get(c), seen

  out, seen = f(2.0)
  assert float(out) == 11.0  # (1 + 2) * 2 * 2 - 1
  np.testing.assert_allclose(seen, [6.0, 12.0])


def test_cell_created_inside_vmap_is_per_example_even_from_a_constant():
  def f(x):
    c = new_cell(jnp.array(1.0))  # the same for every example...
    cell_set(c, cell_get(c) + x)  # ...then written per example
    return cell_get(c)

  for run in (jax.vmap(f), jax.jit(jax.vmap(f))):
    np.testing.assert_allclose(run(jnp.arange(3.0)), [1.0, 2.0, 3.0])


def test_returning_a_cell_from_jit_is_refused_with_the_alternatives():
  with pytest.raises(ValueError, match=r'cannot be returned from jax\.jit.*v\[\.\.\.\].*nnx\.jit'):
    jax.jit(lambda x: new_cell(x))(1.0)
