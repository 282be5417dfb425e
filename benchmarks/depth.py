"""Cost against depth: compile time and step time of one long chain, as ratios to SGD and Adam.

Models, each declared as one chain: ReLU MLPs of width 16 and 256 (batch 256) at
depths 10 to 200, and PlainNet-like CNNs of 34 and 110 3x3 convolutions (16
channels on 8x8 images, batch 32; global average pool and dense). For each model
it compiles the jitted train step (forward, backward, update, apply) of SGD,
G-SGD, Adam, G-Adam and Path-SGD in turn, ``--compiles`` times (compile time: the
median), and times the steps over interleaved rounds, so all optimizers see the
same machine state. Ratios: G-SGD and Path-SGD to SGD, G-Adam to Adam. It prints,
per width, the log-log slope of compile time against depth (1 is linear), the
compile time each optimizer adds per layer, and how much each ratio grows from
the shallowest model to each deeper one.

    python -m benchmarks.depth [--depths 10,25,50,100,200] [--widths 16,256]
                               [--cnn-depths 34,110] [--rounds 9] [--compiles 3]
                               [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np
import optax

import gsgd_jax
from benchmarks import speed

OPTIMIZERS = ("SGD", "G-SGD", "Adam", "G-Adam", "Path-SGD")
BASELINE = {"G-SGD": "SGD", "G-Adam": "Adam", "Path-SGD": "SGD"}  # ratio -> to what
MLP_BATCH, CNN_BATCH, CNN_SIDE, CNN_CHANNELS = 256, 32, 8, 16


def make_optimizer(name: str, layers) -> optax.GradientTransformation:
  return {
    "SGD": lambda: optax.sgd(1e-3),
    "G-SGD": lambda: gsgd_jax.gsgd(1e-3, layers=layers),
    "Adam": lambda: optax.adam(1e-4),
    "G-Adam": lambda: gsgd_jax.g_adam(1e-4, layers=layers),
    "Path-SGD": lambda: gsgd_jax.path_sgd(1e-3, layers=layers),
  }[name]()


def model(kind: str, depth: int, width: int):
  """Params, layers, forward function, inputs and labels of one chain of ``depth`` layers."""
  key = jax.random.key(0)
  if kind == "mlp":
    params, layers = speed.mlp_params(key, width, (width,) * (depth - 1), 10)
    x = jax.random.normal(jax.random.key(1), (MLP_BATCH, width))
    forward = speed.forward
  else:  # depth - 1 convolutions and the dense head
    spec = (CNN_SIDE, 3, depth - 1, width, 10, None)
    params, layers = speed.cnn_params(key, *spec)
    x = jax.random.normal(jax.random.key(1), (CNN_BATCH, CNN_SIDE, CNN_SIDE, 3))
    forward = speed.cnn_forward
  y = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 10)
  return params, layers, forward, x, y


def lower_train_step(problem, name: str):
  """The jitted train step (forward, backward, update, apply) of optimizer ``name`` on
  ``problem`` (what ``model`` returns), lowered, and the optimizer state it starts from."""
  params, layers, forward, x, y = problem
  tx = make_optimizer(name, layers)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(forward(p, layers, x), y).mean()

  def train_step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  return jax.jit(train_step).lower(params, state), state


def bench(
  kind: str, depth: int, width: int, *, rounds: int, min_seconds: float, compiles: int
) -> dict[str, Any]:
  problem = model(kind, depth, width)
  params = problem[0]

  # Each compile starts from a fresh lowering (a compiled program is cached per
  # lowering), the optimizers interleaved, so all see the same machine state.
  compile_times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
  programs = {}
  for _ in range(compiles):
    for name in OPTIMIZERS:
      low, state = lower_train_step(problem, name)
      start = time.perf_counter()
      compiled = low.compile()
      compile_times[name].append(time.perf_counter() - start)
      programs[name] = (compiled, (params, state))
  compile_s = {name: float(np.median(t)) for name, t in compile_times.items()}
  step_s, _ = speed.interleaved_times(programs, rounds=rounds, min_seconds=min_seconds)

  row: dict[str, Any] = {
    "model": kind,
    "depth": depth,
    "width": width,
    "parameters": int(sum(p.size for p in jax.tree.leaves(params))),
    "compile_s": compile_s,
    "step_ms": {name: 1e3 * float(np.median(t)) for name, t in step_s.items()},
    "compile_ratio": {},
    "step_ratio": {},
  }
  for name, base in BASELINE.items():
    row["compile_ratio"][name] = compile_s[name] / compile_s[base]
    per_round = [t / b for t, b in zip(step_s[name], step_s[base], strict=True)]
    row["step_ratio"][name] = float(np.median(per_round))
  return row


def _growth(series, key: str) -> dict[str, dict[str, float]]:
  """Per optimizer, ``key``'s ratio at each deeper model over the shallowest's."""
  first = series[0]
  return {
    name: {str(r["depth"]): r[key][name] / first[key][name] for r in series[1:]}
    for name in BASELINE
  }


def depth_summary(rows) -> list[dict[str, Any]]:
  """Per (model, width) series: log-log slope of compile time against depth and
  compile time added per layer, per optimizer; and each ratio (compile time,
  step time) at every depth over its value at the shallowest."""
  out = []
  for kind, width in dict.fromkeys((r["model"], r["width"]) for r in rows):
    series = sorted(
      (r for r in rows if (r["model"], r["width"]) == (kind, width)), key=lambda r: r["depth"]
    )
    if len(series) < 2:
      continue
    depths = np.log([r["depth"] for r in series])
    slope = {
      name: float(np.polyfit(depths, np.log([r["compile_s"][name] for r in series]), 1)[0])
      for name in OPTIMIZERS
    }
    first, last = series[0], series[-1]
    layers = last["depth"] - first["depth"]
    per_layer_ms = {
      name: 1e3 * (last["compile_s"][name] - first["compile_s"][name]) / layers
      for name in OPTIMIZERS
    }

    out.append(
      {
        "model": kind,
        "width": width,
        "depths": [r["depth"] for r in series],
        "compile_slope": slope,
        "compile_ms_per_layer": per_layer_ms,
        "compile_ratio_growth": _growth(series, "compile_ratio"),
        "step_ratio_growth": _growth(series, "step_ratio"),
      }
    )
  return out


def table(rows, summary) -> str:
  ratios = list(BASELINE)
  lines = [
    "| model | depth | width | params | compile s: "
    + " / ".join(OPTIMIZERS)
    + " | compile ratio: "
    + " / ".join(ratios)
    + " | step ms SGD / Adam | step ratio: "
    + " / ".join(ratios)
    + " |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['depth']} | {r['width']} | {r['parameters'] / 1e6:.2f}M | "
      + " / ".join(f"{r['compile_s'][n]:.2f}" for n in OPTIMIZERS)
      + " | "
      + " / ".join(f"{r['compile_ratio'][n]:.1f}" for n in ratios)
      + f" | {r['step_ms']['SGD']:.2f} / {r['step_ms']['Adam']:.2f} | "
      + " / ".join(f"{r['step_ratio'][n]:.2f}" for n in ratios)
      + " |"
    )
  for s in summary:
    first, later = s["depths"][0], s["depths"][1:]

    def growth(key: str, s=s) -> str:
      return ", ".join(
        f"{n} " + " / ".join(f"{v:.2f}" for v in by_depth.values())
        for n, by_depth in s[key].items()
      )

    lines.append(
      f"\n{s['model']} width {s['width']}, depth {first} to {s['depths'][-1]}: "
      "log-log slope of compile time against depth "
      + ", ".join(f"{n} {v:.2f}" for n, v in s["compile_slope"].items())
      + "; compile time added per layer "
      + ", ".join(f"{n} {v:.1f} ms" for n, v in s["compile_ms_per_layer"].items())
      + f"; at depth {' / '.join(map(str, later))}, the compile-time ratio over its value at "
      f"depth {first}: {growth('compile_ratio_growth')}; the step-time ratio likewise: "
      + growth("step_ratio_growth")
      + "."
    )
  return "\n".join(lines)


def ints(text: str) -> list[int]:
  """The integers of a comma-separated command-line list (empty: none)."""
  return [int(v) for v in text.split(",") if v]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="10,25,50,100,200", help="MLP depths (layers)")
  parser.add_argument("--widths", default="16,256", help="MLP widths")
  parser.add_argument("--cnn-depths", default="34,110", help="CNN depths (convolutions)")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--compiles", type=int, default=3, help="compiles per optimizer (median)")
  parser.add_argument("--min-seconds", type=float, default=0.3, help="time per variant per round")
  parser.add_argument("--out", help="directory for depth.json and depth.md")
  args = parser.parse_args(argv)
  jobs = [("mlp", d, w) for w in ints(args.widths) for d in ints(args.depths)]
  jobs += [("cnn", d + 1, CNN_CHANNELS) for d in ints(args.cnn_depths)]
  rows = []
  for kind, depth, width in jobs:
    rows.append(
      bench(
        kind, depth, width, rounds=args.rounds, min_seconds=args.min_seconds, compiles=args.compiles
      )
    )
    r = rows[-1]
    print(
      f"{kind} depth {depth} width {width}: compile "
      + ", ".join(f"{n} {r['compile_s'][n]:.2f}s" for n in OPTIMIZERS)
      + "; step ratio "
      + ", ".join(f"{n} {v:.2f}" for n, v in r["step_ratio"].items()),
      flush=True,
    )
  summary = depth_summary(rows)
  settings = (
    f"{args.rounds} interleaved rounds; compile: median of {args.compiles} interleaved "
    "lower().compile() of the jitted train step; step ratio: median over rounds"
  )
  speed.publish(args.out, "depth", settings, table(rows, summary), rows=rows, summary=summary)


if __name__ == "__main__":
  main()
