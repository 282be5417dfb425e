"""G-SGD at the paper's learning rate in a deep PlainNet with BatchNorm: what its skeleton
paths do.

A PlainNet-BN (3x3 convolutions over three stages of 16, 32 and 64 channels, each followed
by BatchNorm and ReLU; docs/math.md, "Where the blocks go") trained on the first
``--train`` Fashion-MNIST images with batch 128, SGD, G-SGD (normalized blocks) and G-SGD
with the implicit decay (``implicit_decay=True``, its rate norms starting at
``--initial-rate-norm``) from the same start (skeleton weights 1), at each learning rate of
``--lrs``, for each seed. Besides
the loss, every run reports what the diagnosis of G-SGD at lr 1.0 turned on: how many
skeleton ratios the guard clipped, the smallest outgoing skeleton weight of a norm's node
relative to its convolution's column norm, and the largest BatchNorm bias (a norm's bias
owns the path ``t F``: where ``F``, that skeleton weight, nears 0, ``t`` grows as ``1 / F``).
Test accuracy on the first 5000 test images, in evaluation mode and with the BatchNorm
statistics recalibrated for the final weights.

    python -m benchmarks.bn_stability [--depth 32] [--lrs 1.0] [--seeds 0,1,2]
        [--optimizers SGD,G-SGD,G-SGD-decay] [--initial-rate-norm 1.0] [--steps 150]
        [--train 25600] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks import loop
from benchmarks.depth import ints
from benchmarks.speed import publish
from benchmarks.train import as_images

BATCH = 128
TEST = 5000
STAGES = (16, 32, 64)
CHECKPOINTS = (10, 50, 100, 150, 300, 600, 1000)
OPTIMIZERS = ("SGD", "G-SGD", "G-SGD-decay")
"""SGD, the exact G-SGD, and G-SGD with SGD's implicit decay on its normalized blocks
(``implicit_decay=True``)."""


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def stages(depth: int) -> tuple[tuple[int, int], ...]:
  """``depth`` convolutions over the three stages, as even as they go (8: 3+3+2)."""
  counts = [depth // 3 + (i < depth % 3) for i in range(3)]
  return tuple(zip(STAGES, counts, strict=True))


def skeleton_diagnostics(params: Any, depth: int) -> tuple[float, float]:
  """The smallest outgoing skeleton weight of a norm's node (the centre tap of ``conv{k}``,
  row ``i``, column ``i mod c_out``) over the RMS column norm of its kernel, and the
  largest BatchNorm bias."""
  smallest, largest = np.inf, 0.0
  for k in range(1, depth):
    w = np.asarray(params[f"conv{k}"]["kernel"])
    c_in, c_out = w.shape[-2:]
    skeleton = w[w.shape[0] // 2, w.shape[1] // 2, np.arange(c_in), np.arange(c_in) % c_out]
    column = np.sqrt(np.mean(np.sum(np.square(w), axis=(0, 1, 2))))
    smallest = min(smallest, float(np.min(np.abs(skeleton)) / column))
    largest = max(largest, float(np.max(np.abs(np.asarray(params[f"bn{k - 1}"]["bias"])))))
  return smallest, largest


def run(
  kind: str, lr: float, seed: int, depth: int, steps: int, ds, initial_rate_norm: float = 1.0
) -> dict[str, Any]:
  model = loop.PlainNetBN(stages(depth), 10)
  x_train = as_images(ds.x_train)
  variables = model.init(jax.random.key(seed), jnp.ones((2, *x_train.shape[1:])))
  params, model_state = loop.split_variables(variables)
  blocks = model.gsgd_blocks()
  params = gsgd_jax.set_skeleton(params, blocks)  # the same start for both optimizers
  if kind == "SGD":
    tx = optax.sgd(lr)
  else:
    decay = kind == "G-SGD-decay"
    start = initial_rate_norm if decay else 1.0
    tx = gsgd_jax.gsgd(lr, layers=blocks, implicit_decay=decay, initial_rate_norm=start)
  chunk = loop.make_chunk(model, tx, scan=loop.use_scan(model))
  state = tx.init(params)
  order = np.random.default_rng([seed, 7]).permutation(len(x_train))
  losses: list[float] = []
  for first in range(0, steps, 10):
    idx = [order[(s * BATCH) % len(order) :][:BATCH] for s in range(first, first + 10)]
    params, state, model_state, chunk_losses = chunk(
      params, state, model_state, x_train[np.stack(idx)], ds.y_train[np.stack(idx)], None
    )
    losses += [float(v) for v in np.asarray(chunk_losses)]
  x_test = as_images(ds.x_test)[:TEST]
  test_xy = (x_test, ds.y_test[:TEST])
  smallest, largest = skeleton_diagnostics(params, depth)
  return {
    "optimizer": kind,
    "lr": lr,
    "seed": seed,
    "loss": {c: float(np.mean(losses[c - 10 : c])) for c in CHECKPOINTS if c <= steps},
    "finite": bool(np.all(np.isfinite(losses))),
    "clipped_ratios": loop.total_clipped(state),
    "smallest_skeleton": smallest,
    "largest_bn_bias": largest,
    "test_accuracy": loop.accuracy(model, params, *test_xy, model_state=model_state),
    "test_accuracy_recalibrated": loop.recalibrated_accuracy(
      model, params, model_state, x_train, test_xy, batch_size=BATCH, seed=seed
    ),
  }


def report(runs: list[dict[str, Any]], steps: int) -> str:
  checkpoints = [c for c in CHECKPOINTS if c <= steps]
  head = " | ".join(f"loss {c}" for c in checkpoints)
  lines = [
    f"| optimizer | lr | seed | {head} | clipped | min skeleton / column | max BN bias | "
    "test acc (eval) | test acc (recalibrated) |",
    "|---|---|---|" + "---|" * len(checkpoints) + "---|---|---|---|---|",
  ]
  for r in runs:
    losses = " | ".join(f"{r['loss'][c]:.3f}" for c in checkpoints)
    clipped = "-" if r["clipped_ratios"] is None else r["clipped_ratios"]
    lines.append(
      f"| {r['optimizer']} | {r['lr']:g} | {r['seed']} | {losses} | {clipped} | "
      f"{r['smallest_skeleton']:.2g} | {r['largest_bn_bias']:.3g} | "
      f"{r['test_accuracy']:.4f} | {r['test_accuracy_recalibrated']:.4f} |"
    )
  means = []
  for kind in dict.fromkeys(r["optimizer"] for r in runs):
    for lr in dict.fromkeys(r["lr"] for r in runs):
      group = [r for r in runs if r["optimizer"] == kind and r["lr"] == lr]
      if group:
        last = [r["loss"][checkpoints[-1]] for r in group]
        recalibrated = np.mean([r["test_accuracy_recalibrated"] for r in group])
        means.append(
          f"- {kind} at lr {lr:g}: loss at step {checkpoints[-1]} "
          f"{np.mean(last):.3f} ± {np.std(last):.3f} over {len(group)} seeds; "
          f"recalibrated test accuracy {recalibrated:.4f}"
        )
  return "\n".join([*lines, "", *means])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=32)
  parser.add_argument("--lrs", type=floats, default=[1.0])
  parser.add_argument("--seeds", type=ints, default=[0, 1, 2])
  parser.add_argument(
    "--optimizers", type=lambda t: t.split(","), default=list(OPTIMIZERS), help=",".join(OPTIMIZERS)
  )
  parser.add_argument(
    "--initial-rate-norm", type=float, default=1.0, help="where G-SGD-decay's rate norms start"
  )
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--train", type=int, default=25600, help="first N training images")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.steps % 10:
    parser.error("--steps must be a multiple of 10")
  if (
    not args.optimizers
    or set(args.optimizers) - set(OPTIMIZERS)
    or len(set(args.optimizers)) < len(args.optimizers)
  ):
    parser.error(f"--optimizers: a comma-separated subset of {','.join(OPTIMIZERS)}, each once")
  ds = datasets.load_dataset(args.data_dir)
  ds = dataclasses.replace(ds, x_train=ds.x_train[: args.train], y_train=ds.y_train[: args.train])
  runs = [
    run(kind, lr, seed, args.depth, args.steps, ds, args.initial_rate_norm)
    for lr in args.lrs
    for seed in args.seeds
    for kind in args.optimizers
  ]
  settings = (
    f"PlainNet-BN depth {args.depth} {stages(args.depth)}, {ds.name}, first {args.train} "
    f"training images, batch {BATCH}, {args.steps} steps, skeleton weights 1"
  )
  if "G-SGD-decay" in args.optimizers:
    settings += f"; G-SGD-decay's rate norms start at {args.initial_rate_norm:g}"
  publish(args.out, "bn_stability", settings, report(runs, args.steps), runs=runs)


if __name__ == "__main__":
  main()
