"""nnx.metrics: every result checked against numbers worked out by hand in the test."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arbax as nnx

metrics = nnx.metrics


# -- Average -----------------------------------------------------------------
def test_average_over_batches_and_scalars():
  avg = metrics.Average()
  avg.update(values=jnp.array([1.0, 2.0, 3.0]))
  avg.update(values=4)               # a scalar counts once
  avg.update(values=jnp.ones((2, 2)))  # every entry counts
  # (1 + 2 + 3 + 4 + 4 * 1) / (3 + 1 + 4) = 14 / 8
  assert float(avg.compute()) == pytest.approx(1.75)
  assert int(avg.count[...]) == 8 and float(avg.total[...]) == 14.0
  assert avg.total[...].dtype == jnp.float32 and avg.count[...].dtype == jnp.int32


def test_average_reads_its_argname_and_ignores_other_kwargs():
  avg = metrics.Average('loss')
  avg.update(loss=jnp.array([1.0, 3.0]), accuracy=jnp.array(0.0))
  assert float(avg.compute()) == 2.0
  with pytest.raises(TypeError, match="'loss'"):
    avg.update(values=jnp.array(1.0))


def test_average_mask_leaves_entries_out():
  avg = metrics.Average()
  avg.update(values=jnp.array([1.0, 2.0, 3.0, 10.0]), mask=jnp.array([True, True, False, True]))
  assert float(avg.compute()) == pytest.approx(13 / 3)
  avg.reset()
  # a (2, 1) mask broadcasts over the (2, 3) values in the total (the first row only), while
  # the count adds the mask's own sum, as NNX: here 1
  avg.update(values=jnp.array([[1.0, 2.0, 3.0], [7.0, 8.0, 9.0]]), mask=jnp.array([[1], [0]]))
  assert float(avg.total[...]) == 6.0 and int(avg.count[...]) == 1


def test_average_reset_and_empty_compute():
  avg = metrics.Average()
  total = avg.total
  avg.update(values=jnp.array([5.0]))
  avg.reset()
  assert avg.total is total  # reset writes in place: references stay valid
  assert int(avg.count[...]) == 0 and float(avg.total[...]) == 0.0
  assert np.isnan(avg.compute())


def test_average_inside_nnx_jit():
  avg = metrics.Average()

  @nnx.jit
  def step(avg, x):
    avg.update(values=x)

  step(avg, jnp.array([1.0, 2.0]))
  step(avg, jnp.array([6.0, 7.0]))
  assert float(avg.compute()) == 4.0
  assert int(avg.count[...]) == 4


def test_metric_state_kind_and_split():
  avg = metrics.Average()
  avg.update(values=jnp.array([2.0, 4.0]))
  state = nnx.state(avg)
  assert set(state) == {'total', 'count'}
  assert all(type(v) is metrics.MetricState for v in state.values())
  graphdef, st = avg.split(metrics.MetricState)
  assert set(st) == {'total', 'count'}
  rebuilt = nnx.merge(graphdef, st)
  assert isinstance(rebuilt, metrics.Average) and float(rebuilt.compute()) == 3.0


# -- Welford ------------------------------------------------------------------
def test_welford_matches_the_two_pass_formulas():
  w = metrics.Welford()
  w.update(values=jnp.array([1.0, 2.0]))
  w.update(values=jnp.array([4.0, 8.0, 9.0]))
  # all five values: mean 24/5 = 4.8; squared deviations 14.44 + 7.84 + 0.64 + 10.24 + 17.64 = 50.8
  stats = w.compute()
  assert isinstance(stats, metrics.Statistics)
  assert float(stats.mean) == pytest.approx(4.8)
  assert float(w.m2[...]) == pytest.approx(50.8, rel=1e-6)
  std = (50.8 / 5) ** 0.5
  assert float(stats.standard_deviation) == pytest.approx(std, rel=1e-6)
  assert float(stats.standard_error_of_mean) == pytest.approx(std / 5 ** 0.5, rel=1e-6)
  assert int(w.count[...]) == 5


def test_welford_scalar_matrix_reset_and_argname():
  w = metrics.Welford('loss')
  w.update(loss=3.0)
  stats = w.compute()
  assert float(stats.mean) == 3.0 and float(stats.standard_deviation) == 0.0
  w.update(loss=jnp.array([[3.0, 3.0], [7.0, 7.0]]))  # 3, 3, 3, 7, 7: mean 4.6
  assert float(w.compute().mean) == pytest.approx(4.6) and int(w.count[...]) == 5
  w.reset()
  stats = w.compute()
  assert float(stats.mean) == 0.0 and np.isnan(stats.standard_deviation)
  with pytest.raises(TypeError, match="'loss'"):
    w.update(values=1.0)


def test_welford_inside_nnx_jit():
  w = metrics.Welford()

  @nnx.jit
  def step(w, x):
    w.update(values=x)

  step(w, jnp.array([2.0, 4.0]))
  step(w, jnp.array([6.0, 8.0]))
  # 2, 4, 6, 8: mean 5, population variance (9 + 1 + 1 + 9) / 4 = 5
  assert float(w.compute().mean) == 5.0
  assert float(w.compute().standard_deviation) == pytest.approx(5 ** 0.5)


# -- Accuracy -----------------------------------------------------------------
def test_accuracy_multiclass():
  acc = metrics.Accuracy()
  logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # predicts 1, 0, 1
  acc.update(logits=logits, labels=jnp.array([1, 1, 1]))
  assert float(acc.compute()) == pytest.approx(2 / 3)
  acc.update(logits=jnp.array([[0.0, 1.0, 5.0]]), labels=jnp.array([2]))
  assert float(acc.compute()) == pytest.approx(3 / 4)
  acc.reset()
  acc.update(logits=logits, labels=np.array([1, 1, 1]), mask=jnp.array([True, False, True]))
  assert float(acc.compute()) == 1.0 and int(acc.count[...]) == 2


def test_accuracy_binary_threshold():
  acc = metrics.Accuracy(threshold=0.5)
  acc.update(logits=jnp.array([0.2, 0.7, 0.9, 0.4]), labels=jnp.array([0, 1, 0, 0]))
  assert float(acc.compute()) == pytest.approx(3 / 4)
  assert acc.threshold == 0.5 and acc.argname == 'values'


I32, F32 = jnp.int32, jnp.float32


@pytest.mark.parametrize('threshold, logits, labels, message', [
    (None, jnp.ones((3, 2)), jnp.ones((3, 2), I32), 'logits.ndim==labels.ndim\\+1, got 2 and 2'),
    (None, jnp.ones((3,)), jnp.ones((3,), I32), 'got 1 and 1'),
    (0.5, jnp.ones((3, 2)), jnp.ones((3,), I32), 'logits.ndim==labels.ndim, got 2 and 1'),
    (None, jnp.ones((3, 2)), jnp.ones((3,), F32), 'labels.dtype.*float32'),
])
def test_accuracy_errors(threshold, logits, labels, message):
  acc = metrics.Accuracy(threshold)
  with pytest.raises(ValueError, match=message):
    acc.update(logits=logits, labels=labels)
  assert int(acc.count[...]) == 0


def test_accuracy_shape_mismatch():
  acc = metrics.Accuracy()
  with pytest.raises(TypeError, match=r'shape \(3,\).*shape \(4,\)'):
    acc.update(logits=jnp.ones((3, 2)), labels=jnp.ones((4,), I32))


# -- MultiMetric ----------------------------------------------------------------
def test_multimetric_updates_computes_and_resets_all():
  mm = nnx.MultiMetric(accuracy=metrics.Accuracy(), loss=metrics.Average('loss'))
  mm.update(logits=jnp.array([[0.1, 0.9], [0.6, 0.4]]), labels=jnp.array([1, 1]),
            loss=jnp.array([2.0, 4.0]))
  mm.update(logits=jnp.array([[0.1, 0.9]]), labels=jnp.array([1]), loss=jnp.array(6.0))
  out = mm.compute()
  assert set(out) == {'accuracy', 'loss'}
  assert float(out['accuracy']) == pytest.approx(2 / 3)
  assert float(out['loss']) == pytest.approx(4.0)
  assert set(nnx.state(mm)) == {'accuracy', 'loss'}
  mm.reset()
  assert all(np.isnan(v) for v in mm.compute().values())


@pytest.mark.parametrize('graph', [True, False])
def test_multimetric_inside_nnx_jit(graph):
  mm = nnx.MultiMetric(loss=metrics.Average('loss'), spread=metrics.Welford('loss'))

  @nnx.jit
  def step(mm, loss):
    mm.update(loss=loss)

  with nnx.set_graph_mode(graph):  # graph mode (the default) and tree mode update alike
    step(mm, jnp.array([1.0, 3.0]))
    step(mm, jnp.array([5.0]))
  out = mm.compute()
  assert float(out['loss']) == 3.0
  assert float(out['spread'].standard_deviation) == pytest.approx((8 / 3) ** 0.5)


def test_train_state_subclass_updates_metrics_with_the_optimizer():
  class TrainState(nnx.ModelAndOptimizer):  # the NNX guide's pattern: metrics ride along
    def __init__(self, model, tx, metrics):
      self.metrics = metrics
      super().__init__(model, tx)

    def update(self, *, grads, **values):
      self.metrics.update(**values)
      super().update(grads)

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  state = TrainState(model, optax.sgd(0.1), metrics.Average('loss'))
  x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  losses = []

  @nnx.jit
  def step(state):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(state.model)
    state.update(grads=grads, loss=loss)
    return loss

  for _ in range(3):
    losses.append(float(step(state)))
  assert losses[2] < losses[0]
  assert float(state.metrics.compute()) == pytest.approx(sum(losses) / 3, rel=1e-6)
  assert int(state.step[...]) == 3


def test_multimetric_missing_argument():
  mm = nnx.MultiMetric(a=metrics.Average('a'), b=metrics.Average('b'))
  with pytest.raises(TypeError, match="'b'"):
    mm.update(a=1.0)


def test_multimetric_refuses_method_names_and_non_metrics():
  with pytest.raises(ValueError, match="'update'"):
    nnx.MultiMetric(update=metrics.Average())
  with pytest.raises(TypeError, match="'a' must be a Metric, got int"):
    nnx.MultiMetric(a=3)


# -- Metric base ----------------------------------------------------------------
def test_metric_base_methods_must_be_overridden():
  with pytest.raises(NotImplementedError, match='__init__'):
    nnx.Metric()
  avg = metrics.Average()
  for name in ('update', 'compute', 'reset'):
    with pytest.raises(NotImplementedError, match=name):
      getattr(nnx.Metric, name)(avg)


def test_custom_metric_subclass():
  class Max(nnx.Metric):
    def __init__(self):
      self.best = metrics.MetricState(jnp.array(-jnp.inf))

    def update(self, *, values, **_):
      self.best[...] = jnp.maximum(self.best[...], jnp.max(values))

    def compute(self):
      return self.best[...]

    def reset(self):
      self.best[...] = jnp.array(-jnp.inf)

  mm = nnx.MultiMetric(top=Max(), mean=metrics.Average())
  mm.update(values=jnp.array([1.0, 5.0, 2.0]))
  out = {k: float(v) for k, v in mm.compute().items()}
  assert out == {'top': 5.0, 'mean': pytest.approx(8 / 3)}


def test_only_metric_and_multimetric_are_top_level():
  assert nnx.Metric is metrics.Metric and nnx.MultiMetric is metrics.MultiMetric
  assert not hasattr(nnx, 'Average') and not hasattr(nnx, 'Welford')


def test_average_mask_weighs_values_and_needs_array_values():
  avg = nnx.metrics.Average('loss')
  avg.update(loss=jnp.array([2.0, 4.0, 8.0]), mask=jnp.array([1.0, 0.5, 0.0]))
  assert float(avg.total[...]) == 4.0 and int(avg.count[...]) == 1  # 2*1 + 4*0.5; sum 1.5 -> 1
  avg.update(loss=3)  # a Python number is one value
  assert float(avg.total[...]) == 7.0 and int(avg.count[...]) == 2
  with pytest.raises(ValueError, match='If mask is provided, loss should be a jax array'):
    avg.update(loss=3, mask=jnp.ones(1))


def test_multimetric_masks_by_name_and_skips_metrics_without_one():
  class Hits(nnx.metrics.Accuracy):
    def update(self, preds, truth, **_):  # takes no mask
      super().update(logits=preds, labels=truth)

  metrics = nnx.MultiMetric(hits=Hits(), loss=nnx.metrics.Average())
  logits = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  metrics.update(preds=logits, truth=jnp.array([1, 1, 1]), values=jnp.array([1.0, 2.0, 6.0]),
                 mask={'loss': jnp.array([True, True, False])})
  out = metrics.compute()
  assert np.isclose(out['hits'], 2 / 3) and float(out['loss']) == 1.5
