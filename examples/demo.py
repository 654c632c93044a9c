"""The main job: train a small CNN on scikit-learn's 8x8 handwritten digits with arbax.

    make demo                                   # full run: ~20 epochs, figure + checkpoint
    .venv/bin/python examples/demo.py --epochs 1 --out /tmp/demo   # quick run

What it shows, end to end: a Module built from Conv, BatchNorm, Dropout and
Linear; ``nnx.Optimizer`` (optax Adam) and ``nnx.MultiMetric`` inside one
``nnx.jit`` train step; ``model.train()`` / ``model.eval()``; a progress bar per
epoch; a figure of the learning curves; an Orbax checkpoint of
``nnx.state(model)`` restored into an abstract model made by ``nnx.eval_shape``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import optax
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import arbax as nnx


class CNN(nnx.Module):
  """Two conv blocks (Conv -> BatchNorm -> relu), average pooling, a dropout MLP head."""

  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 10):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(32, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(64, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.linear1 = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
    self.linear2 = nnx.Linear(128, num_classes, rngs=rngs)

  def __call__(self, x):                                     # x: (batch, 8, 8, 1)
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # (batch, 4, 4, 64)
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)))
    return self.linear2(x)


def load_digits_split(seed: int = 0):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  return train_test_split(images, digits.target.astype(np.int32), test_size=0.2,
                          random_state=seed, stratify=digits.target)


def loss_fn(model: CNN, images, labels):
  logits = model(images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, images, labels):
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, images, labels)
  optimizer.update(model, grads)
  metrics.update(loss=loss, logits=logits, labels=labels)


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, images, labels):
  loss, logits = loss_fn(model, images, labels)
  metrics.update(loss=loss, logits=logits, labels=labels)


def evaluate(model, metrics, images, labels, batch_size):
  model.eval()
  metrics.reset()
  for start in range(0, len(images), batch_size):
    eval_step(model, metrics, images[start:start + batch_size], labels[start:start + batch_size])
  return {k: float(v) for k, v in metrics.compute().items()}


def plot_curves(history: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401  (MaxNLocator below)
  epochs = np.arange(1, len(history['train_loss']) + 1)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(epochs, history['train_loss'], 'o-', label='train')
  ax_loss.plot(epochs, history['test_loss'], 's-', label='test')
  ax_loss.set(title='Loss (cross-entropy)', xlabel='epoch', ylabel='loss')
  ax_acc.plot(epochs, 100 * np.array(history['train_accuracy']), 'o-', label='train')
  ax_acc.plot(epochs, 100 * np.array(history['test_accuracy']), 's-', label='test')
  ax_acc.set(title='Accuracy', xlabel='epoch', ylabel='accuracy (%)')
  for ax in (ax_loss, ax_acc):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('arbax CNN on sklearn digits (8x8)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description='Train a CNN on the 8x8 digits with arbax.')
  parser.add_argument('--epochs', type=int, default=20)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--lr', type=float, default=2e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='out/demo')
  parser.add_argument('--max-steps', type=int, default=None, help='stop each epoch early (tests)')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)

  x_train, x_test, y_train, y_test = load_digits_split(args.seed)
  model = CNN(rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
  metrics = nnx.MultiMetric(loss=nnx.metrics.Average('loss'), accuracy=nnx.metrics.Accuracy())
  history = {k: [] for k in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')}
  rng = np.random.default_rng(args.seed)
  steps = len(x_train) // args.batch_size
  if args.max_steps is not None:
    steps = min(steps, args.max_steps)

  with Progress(TextColumn('{task.description}'), BarColumn(), TextColumn('{task.completed}/{task.total}'),
                TextColumn('{task.fields[status]}'), TimeElapsedColumn()) as progress:
    for epoch in range(1, args.epochs + 1):
      task = progress.add_task(f'epoch {epoch:2d}/{args.epochs}', total=steps, status='')
      model.train()
      metrics.reset()
      order = rng.permutation(len(x_train))
      for step in range(steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        train_step(model, optimizer, metrics, x_train[idx], y_train[idx])
        progress.advance(task)
      train = {k: float(v) for k, v in metrics.compute().items()}
      test = evaluate(model, metrics, x_test, y_test, 256)
      for split, values in (('train', train), ('test', test)):
        for k, v in values.items():
          history[f'{split}_{k}'].append(v)
      progress.update(task, status=f'loss {train["loss"]:.3f}  train {100 * train["accuracy"]:.1f}%  '
                                   f'test {100 * test["accuracy"]:.1f}%')

  figure = os.path.join(args.out, 'curves.png')
  plot_curves(history, figure)

  # Checkpoint: save the trained state, restore it into an abstract model, evaluate again.
  ckpt = os.path.join(os.path.abspath(args.out), 'checkpoint')
  nnx.checkpoint.save(ckpt, model, overwrite=True)  # re-running replaces the last run's
  abstract = nnx.eval_shape(lambda: CNN(rngs=nnx.Rngs(0)))
  restored = nnx.checkpoint.restore(ckpt, abstract)
  again = evaluate(restored, metrics, x_test, y_test, 256)
  final = history['test_accuracy'][-1]
  assert again['accuracy'] == final, (again, final)

  wall = time.perf_counter() - start
  print(f'figure: {figure}')
  print(f'checkpoint: {ckpt} (restored into nnx.eval_shape model: test accuracy {100 * again["accuracy"]:.1f}%)')
  print(f'test accuracy: {100 * final:.1f}%')
  print(f'wall time: {wall:.1f} s')
  return {'test_accuracy': final, 'restored_accuracy': again['accuracy'], 'wall_time': wall,
          'history': history}


if __name__ == '__main__':
  main()
