"""Models and the jitted training loop shared by the experiment scripts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gsgd_jax


class MLP(nn.Module):
  """ReLU MLP: hidden widths, then a linear read-out."""

  widths: tuple[int, ...]
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class PlainCNN(nn.Module):
  """PlainNet-style CNN: stages of 3x3 ReLU convolutions, 2x2 max pooling between
  stages, global average pooling and a dense read-out. One plain ReLU chain."""

  stages: tuple[tuple[int, ...], ...]
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for s, stage in enumerate(self.stages):
      if s:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for channels in stage:
        x = nn.relu(nn.Conv(channels, (3, 3), use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x.mean(axis=(1, 2)))


class ResidualBlock(nn.Module):
  """``relu(shortcut(x) + conv_b(relu(conv_a(x))))``; conv_a -> conv_b is one ReLU chain."""

  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.channels, (3, 3), self.strides, name="conv_a")(x))
    y = nn.Conv(self.channels, (3, 3), name="conv_b")(y)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), self.strides, name="shortcut")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet: a stem convolution, stages of ``(channels, blocks)``
  residual blocks (stride 2 entering every stage after the first), global average
  pooling and a dense head. Each residual branch is one G-space block (as the
  authors did); stem, shortcuts and head are outside the blocks."""

  stages: tuple[tuple[int, int], ...]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.stages[0][0], (3, 3), name="stem")(x))
    for s, (channels, blocks) in enumerate(self.stages):
      for b in range(blocks):
        x = ResidualBlock(channels, 2 if s and not b else 1, name=f"stage{s}_block{b}")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

  def gsgd_blocks(self) -> list[list[tuple[str, ...]]]:
    """The ``layers`` argument for gsgd_jax: one block per residual branch."""
    return [
      [("params", f"stage{s}_block{b}", "conv_a"), ("params", f"stage{s}_block{b}", "conv_b")]
      for s, (_, blocks) in enumerate(self.stages)
      for b in range(blocks)
    ]


def gsgd_layers(model: nn.Module, params) -> list:
  """The layers (or blocks) of ``model`` for gsgd_jax: declared by the model, or
  inferred from a plain chain's names."""
  if hasattr(model, "gsgd_blocks"):
    return model.gsgd_blocks()
  return gsgd_jax.infer_layers(params)


def make_train_chunk(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """A jitted function running a chunk of training steps with ``lax.scan``."""

  def loss_fn(params, x, y):
    # apply returns the outputs alone when no collection is mutable.
    logits = cast(jax.Array, model.apply(params, x))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def chunk(params, state, xs, ys):
    (params, state), losses = jax.lax.scan(step, (params, state), (xs, ys))
    return params, state, losses

  return chunk


def accuracy(model, params, x, y, batch=2048) -> float:
  apply = jax.jit(model.apply)
  hits = sum(
    int(jnp.sum(jnp.argmax(apply(params, x[i : i + batch]), -1) == y[i : i + batch]))
    for i in range(0, len(x), batch)
  )
  return hits / len(x)


def total_clipped(state) -> int | None:
  """Clipped path ratios so far, wherever a ``PathSpaceState`` sits in ``state``."""
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, gsgd_jax.PathSpaceState))
    if isinstance(s, gsgd_jax.PathSpaceState)
  ]
  return sum(int(s.total_clipped_ratios) for s in found) if found else None


def train(
  name: str,
  tx: optax.GradientTransformation,
  model: nn.Module,
  params,
  train_xy: Sequence[np.ndarray],
  test_xy: Sequence[np.ndarray],
  *,
  epochs: int,
  batch_size: int,
  seed: int,
  chunk_steps: int = 100,
  progress: bool = True,
):
  """Trains with shuffled mini-batches; returns per-epoch metrics and final params.

  The batch order depends only on ``seed`` and the epoch, so runs are
  deterministic per seed and every optimizer sees the same batches.
  """
  x_train, y_train = train_xy
  chunk = make_train_chunk(model, tx)
  state = tx.init(params)
  steps = len(x_train) // batch_size
  if steps == 0:
    raise ValueError(f"batch size {batch_size} exceeds the {len(x_train)} training examples")
  history = []
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(x_train))
    order = order[: steps * batch_size].reshape(steps, batch_size)
    losses, start = [], time.perf_counter()
    with tqdm(
      total=steps,
      desc=f"{name:>12} epoch {epoch + 1}/{epochs}",
      unit="step",
      leave=False,
      disable=not progress,
    ) as bar:
      for first in range(0, steps, chunk_steps):
        idx = order[first : first + chunk_steps]
        params, state, chunk_losses = chunk(params, state, x_train[idx], y_train[idx])
        losses.append(np.asarray(chunk_losses))
        bar.update(len(idx))
    seconds = time.perf_counter() - start
    entry = {
      "epoch": epoch + 1,
      "train_loss": float(np.concatenate(losses).mean()),
      "test_accuracy": accuracy(model, params, *test_xy),
      "seconds": seconds,
    }
    clipped = total_clipped(state)
    if clipped is not None:
      entry["clipped_ratios"] = clipped
    history.append(entry)
    if progress:
      tqdm.write(
        f"{name:>12} epoch {epoch + 1}: loss {entry['train_loss']:.4f}  "
        f"test acc {entry['test_accuracy']:.4f}  {seconds:.1f}s"
      )
  return history, params


def seconds_per_epoch(history) -> float:
  """Mean epoch time, leaving out the first epoch (it includes compilation)."""
  times = [h["seconds"] for h in history]
  return float(np.mean(times[1:] if len(times) > 1 else times))
