"""The README's picture: SGD and G-SGD trained from a start and from a positive rescaling of it.

A ReLU MLP computes the same function after any positive rescaling of its hidden
nodes (``gsgd_jax.random_rescale``). Both optimizers train twice on the same
batches: from the start, and from the rescaled start. SGD's two loss curves
differ, because SGD's steps depend on how the weights are scaled; G-SGD's
coincide, because it moves basis-path values, which the rescaling leaves alone.

Data: scikit-learn's bundled 8x8 digits (``benchmarks.data.load_digits``), so it
runs with no download; a few seconds on a 2-core CPU.

    python -m benchmarks.invariance_plot [--out docs/_static/invariance.png] [--steps 300]
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.loop import MLP, make_train_chunk


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/_static/invariance.png", help="PNG to write")
  parser.add_argument("--widths", default="128,128", help="hidden widths, comma separated")
  parser.add_argument("--lr", type=float, default=0.1, help="learning rate of both")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log-range", type=float, default=1.5, help="rescaling: log c ~ U(-r, r)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def predict(model: nn.Module, params: Any, x: Any) -> jax.Array:
  """The model's outputs (``apply`` returns them alone when no collection is mutable)."""
  return cast(jax.Array, model.apply(params, x))


def train_losses(model: nn.Module, tx, params: Any, xs: np.ndarray, ys: np.ndarray):
  """Trains on the batches ``xs[t], ys[t]`` in order; returns every step's loss
  and the final params."""
  params, _, losses = make_train_chunk(model, tx)(params, tx.init(params), xs, ys)
  return losses, params


def smooth(x: np.ndarray, window: int = 10) -> np.ndarray:
  """Running mean over ``window`` steps (mini-batch losses are noisy)."""
  kernel = np.ones(window) / window
  return np.convolve(x, kernel, mode="valid")


def main(argv=None):
  args = parse_args(argv)
  ds = datasets.load_digits()
  widths = tuple(int(w) for w in args.widths.split(","))
  model = MLP(widths, ds.num_classes)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, ds.x_train.shape[1])))
  layers = gsgd_jax.infer_layers(params)
  params = gsgd_jax.set_skeleton(params, layers)  # the authors' initialisation, for both
  rescaled = gsgd_jax.random_rescale(
    params, layers, jax.random.key(args.seed + 1), log_range=args.log_range
  )
  x_test = jnp.asarray(ds.x_test)
  start_gap = float(
    jnp.max(jnp.abs(predict(model, rescaled, x_test) - predict(model, params, x_test)))
  )

  # The same batches, in the same order, for all four runs.
  rng = np.random.default_rng(args.seed)
  idx = np.stack(
    [rng.choice(len(ds.x_train), args.batch_size, replace=False) for _ in range(args.steps)]
  )
  xs, ys = ds.x_train[idx], ds.y_train[idx]

  print(
    f"data: {ds.source}, {len(ds.x_train)} train / {len(ds.x_test)} test; model "
    f"{ds.x_train.shape[1]}-{'-'.join(map(str, widths))}-{ds.num_classes} ReLU MLP, skeleton "
    f"weights 1; lr {args.lr}, batch {args.batch_size}, {args.steps} steps; hidden nodes "
    f"rescaled by exp(U(-{args.log_range:g}, {args.log_range:g})) (test outputs change by "
    f"{start_gap:.1e})"
  )
  optimizers = {"SGD": optax.sgd(args.lr), "G-SGD": gsgd_jax.gsgd(args.lr, layers=layers)}
  curves = {}
  for name, tx in optimizers.items():
    runs = [train_losses(model, tx, p, xs, ys) for p in (params, rescaled)]
    curves[name] = [np.asarray(losses) for losses, _ in runs]
    outputs = [predict(model, p, x_test) for _, p in runs]
    accuracy = [float(jnp.mean(jnp.argmax(o, -1) == ds.y_test)) for o in outputs]
    print(
      f"{name:>5}: final loss {curves[name][0][-10:].mean():.4f} (start) "
      f"{curves[name][1][-10:].mean():.4f} (rescaled start); test accuracy "
      f"{accuracy[0]:.4f} / {accuracy[1]:.4f}; largest test-output difference between "
      f"the two runs {float(jnp.max(jnp.abs(outputs[0] - outputs[1]))):.1e}"
    )

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
  for ax, (name, (plain, moved)) in zip(axes, curves.items(), strict=True):
    steps = np.arange(len(smooth(plain))) + 10
    ax.plot(steps, smooth(plain), color="C0", lw=2.5, label="from the start")
    ax.plot(steps, smooth(moved), color="C1", lw=1.2, ls="--", label="from a rescaled start")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("train loss (10-step mean)")
  axes[0].legend()
  fig.suptitle(
    "Same network function at the start (hidden nodes positively rescaled): "
    "SGD's runs differ, G-SGD's coincide",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
