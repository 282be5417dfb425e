"""The README's picture: SGD and G-SGD trained from a start and from a positive rescaling of it.

A ReLU MLP computes the same function after any positive rescaling of its hidden
nodes (``gsgd_jax.random_rescale``). Both optimizers train twice on the same
batches: from the start, and from the rescaled start. SGD's two loss curves
differ, because SGD's steps depend on how the weights are scaled; G-SGD's
coincide, because it moves basis-path values, which the rescaling leaves alone.

Data: scikit-learn's bundled 8x8 digits (``benchmarks.data.load_digits``), so it
runs with no download; a few seconds on a 2-core CPU.

    python -m benchmarks.invariance_plot [--out docs/_static/invariance.png] [--steps 300]

``--model vit`` makes the same comparison for a transformer: the small Vision Transformer of
``benchmarks.loop.ViT`` (scanned pre-LN layers), whose feed-forward hidden units (each layer's
``ln_ff`` channels and ``fc1`` outputs, every layer with its own factors) are rescaled, trained
with AdamW and with ``path_space(AdamW)`` (AdamW on everything outside the feed-forward
blocks). Its data is Fashion-MNIST (Debian's dataset-fashion-mnist, cut into ``side / 4``
patches: 16 tokens of 7x7) when installed, else the digits (16 tokens of 2x2); ``--dataset``
picks one. About 1.5 minutes on a 2-core CPU. In float32, path space's two curves drift
apart slowly (measured at the defaults: 1e-4 after 10 steps, 1e-2 after 300, against AdamW's
5e-2 from the first step): Adam divides each coordinate's step by that coordinate's gradient
size, so the round-off of a small gradient becomes part of a step of size ``lr``. ``--x64``
runs in float64, where they agree to about 1e-15.

    python -m benchmarks.invariance_plot --model vit [--x64] [--out PNG] [--steps 300]

(``--out`` defaults to benchmarks/results/invariance_vit/invariance_vit.png there.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.loop import MLP, ViT, init_variables, make_train_chunk
from benchmarks.train import as_images

DEFAULTS = {
  "mlp": {"out": "docs/_static/invariance.png", "lr": 0.1, "dataset": "digits"},
  "vit": {
    "out": "benchmarks/results/invariance_vit/invariance_vit.png",
    "lr": 1e-3,
    "dataset": "fashion-mnist",
  },
}
"""Per ``--model``: the defaults of ``--out``, ``--lr`` and ``--dataset``."""


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(DEFAULTS), default="mlp")
  parser.add_argument(
    "--out", help="PNG to write (default docs/_static/invariance.png; vit: benchmarks/results/...)"
  )
  parser.add_argument("--widths", default="128,128", help="mlp: hidden widths, comma separated")
  parser.add_argument("--lr", type=float, help="learning rate of both (default mlp 0.1, vit 1e-3)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log-range", type=float, default=1.5, help="rescaling: log c ~ U(-r, r)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--dataset",
    choices=("digits", "fashion-mnist"),
    help="default mlp: digits; vit: Fashion-MNIST, or the digits when it is not installed",
  )
  parser.add_argument("--weight-decay", type=float, default=1e-4, help="vit: AdamW's decay")
  parser.add_argument("--patch", type=int, help="vit: patch side (default: image side / 4)")
  parser.add_argument("--dim", type=int, default=64, help="vit: token width")
  parser.add_argument("--hidden", type=int, default=128, help="vit: feed-forward width")
  parser.add_argument("--depth", type=int, default=4, help="vit: scanned layers")
  parser.add_argument("--heads", type=int, default=4, help="vit: attention heads")
  parser.add_argument(
    "--x64", action="store_true", help="vit: float64 (float32 round-off is amplified by Adam)"
  )
  args = parser.parse_args(argv)
  if args.x64 and args.model != "vit":
    parser.error("--x64 applies to --model vit")
  for key, value in DEFAULTS[args.model].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def predict(model: nn.Module, params: Any, x: Any) -> jax.Array:
  """The model's outputs (``apply`` returns them alone when no collection is mutable)."""
  return cast(jax.Array, model.apply(params, x))


predict_compiled = jax.jit(predict, static_argnums=0)
""":func:`predict` compiled once per model and input shape (the ViT's six evaluations;
op by op, its scanned layers dispatch slowly)."""


def train_losses(model: nn.Module, tx, params: Any, xs: np.ndarray, ys: np.ndarray, chunk=None):
  """Trains on the batches ``xs[t], ys[t]`` in order; returns every step's loss
  and the final params. ``chunk``: ``make_train_chunk(model, tx)``, made anew if None
  (pass one to compile it once for several runs)."""
  chunk = make_train_chunk(model, tx) if chunk is None else chunk
  params, _, losses = chunk(params, tx.init(params), xs, ys)
  return losses, params


def smooth(x: np.ndarray, window: int = 10) -> np.ndarray:
  """Running mean over ``window`` steps (mini-batch losses are noisy)."""
  kernel = np.ones(window) / window
  return np.convolve(x, kernel, mode="valid")


def same_batches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int):
  """``steps`` batches drawn without replacement within each batch, for every run alike."""
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(len(x), batch_size, replace=False) for _ in range(steps)])
  return x[idx], y[idx]


def compare(
  model, optimizers, params, rescaled, xs, ys, x_test, y_test, outputs_of=predict
) -> dict[str, list]:
  """Trains every optimizer from ``params`` and from ``rescaled`` on the batches ``xs, ys``;
  prints a line per optimizer and returns its two loss curves. ``outputs_of(model, params,
  x)`` evaluates the trained models on ``x_test``."""
  curves = {}
  for name, tx in optimizers.items():
    chunk = make_train_chunk(model, tx)  # one compilation for both starts
    runs = [train_losses(model, tx, p, xs, ys, chunk) for p in (params, rescaled)]
    curves[name] = [np.asarray(losses) for losses, _ in runs]
    outputs = [outputs_of(model, p, x_test) for _, p in runs]
    accuracy = [float(jnp.mean(jnp.argmax(o, -1) == y_test)) for o in outputs]
    print(
      f"{name:>5}: final loss {curves[name][0][-10:].mean():.4f} (start) "
      f"{curves[name][1][-10:].mean():.4f} (rescaled start); test accuracy "
      f"{accuracy[0]:.4f} / {accuracy[1]:.4f}; largest test-output difference between "
      f"the two runs {float(jnp.max(jnp.abs(outputs[0] - outputs[1]))):.1e}"
    )
  return curves


def plot(curves: dict[str, list], out: str, title: str) -> None:
  """One panel per optimizer: its loss curves from the start and from the rescaled start."""
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
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  if os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


def main(argv=None) -> dict[str, float] | None:
  """Runs the comparison of ``--model``; for ``vit``, returns each optimizer's largest
  difference between its two loss curves."""
  args = parse_args(argv)
  if args.model == "vit":
    return main_vit(args)
  ds = datasets.load_digits() if args.dataset == "digits" else datasets.load_dataset()
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
  xs, ys = same_batches(ds.x_train, ds.y_train, args.batch_size, args.steps, args.seed)

  print(
    f"data: {ds.source}, {len(ds.x_train)} train / {len(ds.x_test)} test; model "
    f"{ds.x_train.shape[1]}-{'-'.join(map(str, widths))}-{ds.num_classes} ReLU MLP, skeleton "
    f"weights 1; lr {args.lr}, batch {args.batch_size}, {args.steps} steps; hidden nodes "
    f"rescaled by exp(U(-{args.log_range:g}, {args.log_range:g})) (test outputs change by "
    f"{start_gap:.1e})"
  )
  optimizers = {"SGD": optax.sgd(args.lr), "G-SGD": gsgd_jax.gsgd(args.lr, layers=layers)}
  curves = compare(model, optimizers, params, rescaled, xs, ys, x_test, ds.y_test)
  plot(
    curves,
    args.out,
    "Same network function at the start (hidden nodes positively rescaled): "
    "SGD's runs differ, G-SGD's coincide",
  )
  return None


def main_vit(args: argparse.Namespace) -> dict[str, float]:
  """AdamW and path_space(AdamW) on the ViT, from a start and from a rescaling of its
  feed-forward hidden units; returns each optimizer's largest loss-curve difference."""
  with jax.enable_x64(True) if args.x64 else contextlib.nullcontext():
    return _vit_comparison(args, jnp.float64 if args.x64 else jnp.float32)


def _vit_comparison(args: argparse.Namespace, dtype) -> dict[str, float]:
  ds = datasets.load_digits() if args.dataset == "digits" else datasets.load_dataset()
  x_train, x_test = as_images(ds.x_train), jnp.asarray(as_images(ds.x_test), dtype)
  side = x_train.shape[1]
  patch = args.patch or side // 4
  model = ViT(ds.num_classes, patch, args.dim, args.hidden, args.depth, args.heads)
  # One compiled program: op by op, every initialiser of the scanned layers compiles alone.
  params = init_variables(model, jax.random.key(args.seed), jnp.asarray(x_train[:1], dtype))
  params = jax.tree.map(lambda w: w.astype(dtype), params)  # Flax keeps float32 params
  blocks = model.gsgd_blocks()  # the feed-forward blocks only: the symmetry being rescaled
  params = gsgd_jax.set_skeleton(params, blocks)  # as the experiment runner's runs start
  rescaled = gsgd_jax.random_rescale(
    params, blocks, jax.random.key(args.seed + 1), log_range=args.log_range
  )
  start_gap = float(
    jnp.max(
      jnp.abs(predict_compiled(model, rescaled, x_test) - predict_compiled(model, params, x_test))
    )
  )
  xs, ys = same_batches(x_train, ds.y_train, args.batch_size, args.steps, args.seed)
  xs = xs.astype(dtype)
  print(
    f"data: {ds.source}, {len(x_train)} train / {len(x_test)} test, {side}x{side} images in "
    f"{(side // patch) ** 2} patches of {patch}x{patch}; model ViT (dim {args.dim}, "
    f"feed-forward {args.hidden}, {args.depth} scanned pre-LN layers, {args.heads} heads, "
    f"{jnp.dtype(dtype).name}), skeleton weights of the feed-forward blocks 1; lr {args.lr}, "
    f"weight decay {args.weight_decay:g}, batch {args.batch_size}, {args.steps} steps; "
    f"feed-forward hidden units rescaled by exp(U(-{args.log_range:g}, {args.log_range:g})) "
    f"(test outputs change by {start_gap:.1e})"
  )

  def adamw():
    return optax.adamw(args.lr, weight_decay=args.weight_decay)

  optimizers = {
    "AdamW": adamw(),
    "path_space(AdamW)": gsgd_jax.path_space(adamw(), layers=blocks, fallback=adamw()),
  }
  curves = compare(
    model, optimizers, params, rescaled, xs, ys, x_test, ds.y_test, outputs_of=predict_compiled
  )
  gaps = {name: float(np.max(np.abs(a - b))) for name, (a, b) in curves.items()}
  for name, (a, b) in curves.items():
    early = float(np.max(np.abs(a[:10] - b[:10])))
    print(
      f"{name}: largest difference between the two loss curves {gaps[name]:.1e} "
      f"(first 10 steps {early:.1e})"
    )
  plot(
    curves,
    args.out,
    "Same ViT function at the start (feed-forward hidden units positively rescaled): "
    "AdamW's runs differ, path_space(AdamW)'s coincide",
  )
  return gaps


if __name__ == "__main__":
  main()
