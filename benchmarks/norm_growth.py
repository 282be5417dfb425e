"""Growth of the norms of normalized blocks, and what renormalization does about it.

In a block whose outputs feed a BatchNorm, every G-SGD step is orthogonal to the basis
paths' values, so the squared norm ``N_k^2`` of the paths ending at each output node grows
by ``1 + (lr G_k)^2`` per step (docs/math.md, normalization layers). At a large learning
rate a float32 run overflows. ``path_space(renormalize=True)`` (the default) rescales each
output node back to its norm at ``init`` after every step: an element of the symmetry the
BatchNorm absorbs, so no output changes in training mode.

The run: a ReLU MLP with BatchNorm on Fashion-MNIST (784 -> 64 -> BN -> ReLU -> 64 -> BN
-> ReLU -> 10), float32, its two hidden dense layers declared as normalized one-layer
blocks (the BatchNorms' affine layers and the head take plain SGD), G-SGD at a large
learning rate, from the same start three times: with renormalization, without, and
without from a start changed at rounding level only (the first layer times ``1 + 2^-20``,
an output rescaling its BatchNorm absorbs). Training is chaotic at this learning rate, so
rounding differences grow; the third run shows how fast, for comparison with the gap
between the first two. A shadowing check then restarts both variants from the
renormalized run's params every ``--shadow-every`` steps and compares them over
``--shadow-steps`` steps.

    python -m benchmarks.norm_growth [--steps 5000] [--lr 3.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.speed import write_report

CHECKPOINTS = (10, 100, 500, 1000, 2000, 3000, 4000, 5000)


class BNMLP(nn.Module):
  """Dense -> BatchNorm -> ReLU twice, dense read-out; training mode (batch statistics)."""

  width: int = 64
  epsilon: float = 1e-5  # BatchNorm's (Flax's default)

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(2):
      x = nn.Dense(self.width, use_bias=False, name=f"fc{i}")(x)
      x = nn.relu(nn.BatchNorm(not train, epsilon=self.epsilon, name=f"bn{i}")(x))
    return nn.Dense(10, name="head")(x)


# --blocks: the hidden dense layers as normalized one-layer blocks ("columns"), or this
# project's PlainNet declaration ("plainnet", skeleton weights set to 1: docs/math.md, "Where
# the blocks go"; exact, unlike the authors' chains straight through the norms).
BLOCKS = {
  "columns": [gsgd_jax.Block(["fc0"], normalized=True), gsgd_jax.Block(["fc1"], normalized=True)],
  "plainnet": [
    gsgd_jax.Block(["fc0"], normalized=True),
    gsgd_jax.Block(["bn0", "fc1"], normalized=True),
    gsgd_jax.Block(["bn1", "head"]),
  ],
}


def _column_norms(params) -> jax.Array:
  """``N^2`` of every output node of the normalized blocks (one-layer blocks without
  bias: the squared norms of the kernels' columns)."""
  return jnp.concatenate([jnp.sum(params[n]["kernel"] ** 2, axis=0) for n in ("fc0", "fc1")])


def _trainer(model, layers, x, y, lr, batch, steps):
  """A jitted function running ``steps`` G-SGD steps from ``(params, batch_stats)``;
  returns the trajectory of training-mode outputs on a probe batch and of the norms."""
  probe = x[:256]

  def run(params, batch_stats, start, renormalize):
    tx = gsgd_jax.path_space(optax.sgd(lr), layers=layers, renormalize=renormalize)

    def loss(p, bs, xb, yb):
      logits, new = model.apply({"params": p, "batch_stats": bs}, xb, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new

    def step(carry, t):
      p, bs, state = carry
      idx = (t * batch + jnp.arange(batch)) % len(x)
      grads, new = jax.grad(loss, has_aux=True)(p, bs, x[idx], y[idx])
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      outputs = model.apply({"params": p, "batch_stats": bs}, probe, mutable=["batch_stats"])[0]
      return (p, new["batch_stats"], state), (outputs, jnp.max(_column_norms(p)))

    carry = (params, batch_stats, tx.init(params))
    (params, batch_stats, _), trace = jax.lax.scan(step, carry, start + jnp.arange(steps))
    return params, batch_stats, trace

  return jax.jit(run, static_argnums=3)


def _relative_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per step, the largest output difference relative to the largest output."""
  return np.max(np.abs(a - b), axis=(1, 2)) / np.max(np.abs(b), axis=(1, 2))


def _first_non_finite(outputs: np.ndarray) -> int | None:
  finite = np.all(np.isfinite(outputs), axis=(1, 2))
  return None if finite.all() else int(np.argmin(finite))


def run(args) -> dict[str, Any]:
  ds = datasets.load_dataset(args.data_dir)
  x = jnp.asarray(ds.x_train[: args.train], jnp.float32).reshape(args.train, -1)
  y = jnp.asarray(ds.y_train[: args.train])
  model = BNMLP(epsilon=args.epsilon)
  variables = model.init(jax.random.key(args.seed), x[:2])
  params: dict[str, Any] = dict(variables["params"])
  batch_stats = variables["batch_stats"]
  layers = BLOCKS[args.blocks]
  if args.blocks == "plainnet":
    params = cast(dict[str, Any], gsgd_jax.set_skeleton(params, layers))
  fc0 = jnp.asarray(params["fc0"]["kernel"])
  perturbed = {**params, "fc0": {"kernel": fc0 * (1 + 2.0**-20)}}
  full = _trainer(model, layers, x, y, args.lr, args.batch, args.steps)
  start = time.perf_counter()
  _, _, (kept, kept_norms) = full(params, batch_stats, 0, True)
  _, _, (grown, grown_norms) = full(params, batch_stats, 0, False)
  _, _, (nudged, _) = full(perturbed, batch_stats, 0, False)
  kept, grown, nudged = (np.asarray(a, np.float64) for a in (kept, grown, nudged))
  overflow = _first_non_finite(grown)
  finite_until = overflow if overflow is not None else args.steps
  gaps = {
    "renormalized vs not": _relative_gap(kept[:finite_until], grown[:finite_until]),
    "not, start nudged by 2^-20 vs not": _relative_gap(nudged[:finite_until], grown[:finite_until]),
  }

  # Shadowing: both variants restarted from the renormalized run's params.
  short = _trainer(model, layers, x, y, args.lr, args.batch, args.shadow_steps)
  window = _trainer(model, layers, x, y, args.lr, args.batch, args.shadow_every)
  shadow, p, bs = [], params, batch_stats
  for first in range(0, args.steps, args.shadow_every):
    _, _, (a, _) = short(p, bs, first, True)
    _, _, (b, _) = short(p, bs, first, False)
    shadow.append(float(np.max(_relative_gap(np.asarray(a), np.asarray(b)))))
    p, bs, _ = window(p, bs, first, True)
  seconds = time.perf_counter() - start

  result = {
    "settings": vars(args),
    "device": jax.devices()[0].platform,
    "seconds": seconds,
    "overflow_step_without": overflow,
    "renormalized_finite": _first_non_finite(np.asarray(kept)) is None,
    "renormalized_non_finite_step": _first_non_finite(np.asarray(kept)),
    "max_norm_with": float(np.max(np.asarray(kept_norms))),
    "max_norm_without": float(np.nanmax(np.asarray(grown_norms)[:finite_until])),
    "initial_norm": float(np.max(np.asarray(_column_norms(params)))),
    "gaps": {
      name: {str(t): float(gap[t - 1]) for t in CHECKPOINTS if t <= len(gap)}
      for name, gap in gaps.items()
    },
    "shadow_max_gap": float(max(shadow)),
  }
  return result


def report(result: dict[str, Any]) -> str:
  s = result["settings"]
  overflow = result["overflow_step_without"]
  lines = [
    f"float32 G-SGD ({s['blocks']} blocks), lr {s['lr']}, batch {s['batch']}, {s['steps']} "
    f"steps, BatchNorm epsilon {s.get('epsilon', 1e-5):g}, on the first "
    f"{s['train']} Fashion-MNIST training images ({result['device']}, {result['seconds']:.0f} s)",
    "",
    f"- without renormalization: largest N^2 {result['max_norm_without']:.3g} (from "
    f"{result['initial_norm']:.3g}); "
    + (f"outputs not finite from step {overflow + 1}" if overflow is not None else "finite"),
    f"- with renormalization: largest N^2 {result['max_norm_with']:.3g}; outputs "
    + (
      "finite at every step"
      if result["renormalized_finite"]
      else f"not finite from step {result['renormalized_non_finite_step'] + 1}"
    ),
    f"- shadowing: restarted every {s['shadow_every']} steps from the renormalized run, the "
    f"two variants' training-mode outputs differ by at most {result['shadow_max_gap']:.2g} "
    f"(relative) over {s['shadow_steps']} steps",
    "",
    "| step | " + " | ".join(result["gaps"]) + " |",
    "|---|" + "---|" * len(result["gaps"]),
  ]
  steps = sorted({int(t) for gap in result["gaps"].values() for t in gap})
  for t in steps:
    cells = [f"{gap[str(t)]:.2g}" if str(t) in gap else "" for gap in result["gaps"].values()]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5000)
  parser.add_argument("--lr", type=float, default=3.0)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--train", type=int, default=4096, help="training images used")
  parser.add_argument("--shadow-every", type=int, default=500)
  parser.add_argument("--shadow-steps", type=int, default=10)
  parser.add_argument("--blocks", choices=sorted(BLOCKS), default="columns")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--epsilon",
    type=float,
    default=1e-5,
    help="BatchNorm's epsilon (it makes the output rescaling approximate)",
  )
  parser.add_argument("--data-dir", help="directory with the Fashion-MNIST idx files")
  parser.add_argument("--out", help="write result.json and result.md here")
  args = parser.parse_args(argv)
  result = run(args)
  text = report(result)
  print(text)
  write_report(args.out, "result", result, text)


if __name__ == "__main__":
  main()
