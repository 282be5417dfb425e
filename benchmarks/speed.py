"""Speed of G-SGD and Path-SGD against optax.sgd, as ratios measured in one interleaved run.

Models: ReLU MLPs from about 0.1M to 100M parameters, a PlainNet-like CNN
(7 convolutions of 64 channels, 3x3, on 16x16 images; global average pool; dense)
and a CNN whose largest layer is a flatten (one such convolution flattened into a
dense layer of 512: 8.4M parameters).
The whole train step is timed only up to ``--step-max-params`` (a 100M-parameter
step takes seconds on a CPU). The log-log slope of update time against parameter
count over the MLPs tells how the update scales (1 is linear).

For each model it times (a) the jitted update+apply alone (gradients given) and
(b) the whole jitted train step (forward, backward, update, apply), alternating
the optimizers round by round so all see the same machine state, and reports
median times and the median of the per-round ratios. ``G-SGD+probes`` is the
same G-SGD on the model with a scale probe on every hidden layer
(``gsgd_jax.probes``), which replaces the update's reduction over each kernel.

    python -m benchmarks.speed [--sizes small,medium,large] [--rounds 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from gsgd_jax.probes import PROBE

# name -> (input, hidden widths, outputs); parameter counts about 1M, 6M, 22M.
MLPS = {
  "mlp-0.1M": (256, (256, 128), 10),
  "mlp-1M": (784, (1024, 512), 10),
  "mlp-6M": (1024, (2048, 2048), 10),
  "mlp-22M": (1024, (3072, 3072, 3072), 10),
  "mlp-100M": (4096, (8192, 8192), 10),
}
# name -> (image side, input channels, conv layers, channels, classes, dense width after a
# flatten or None for global average pooling)
CNNS = {"plainnet-7": (16, 3, 7, 64, 10, None), "convflat-8M": (16, 3, 1, 64, 10, 512)}
# The same PlainNet with BatchNorm (training mode) after every convolution, declared as
# docs/math.md says: the first convolution and each [norm, next convolution] normalized
# blocks, the last norm with the head. Path-SGD does not take norms.
BN_CNNS = {"plainnet-bn-7": (16, 3, 7, 64, 10)}
MODELS = (*MLPS, *CNNS, *BN_CNNS)
CNN_BATCH = 32


def cnn_params(key, side, c_in, depth, channels, n_out, flatten_width):
  """``depth`` 3x3 SAME convolutions, then global average pool and dense, or
  flatten, dense of ``flatten_width`` and dense."""
  params, layers, c = {}, [], c_in
  for k in range(depth):
    key, sub = jax.random.split(key)
    params[f"Conv_{k}"] = {
      "kernel": jax.random.normal(sub, (3, 3, c, channels)) * np.sqrt(2 / (9 * c)),
      "bias": jnp.zeros(channels),
    }
    layers.append((f"Conv_{k}",))
    c = channels
  widths = (c, n_out) if flatten_width is None else (side * side * c, flatten_width, n_out)
  for k, (a, b) in enumerate(itertools.pairwise(widths)):
    key, sub = jax.random.split(key)
    params[f"Dense_{k}"] = {
      "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
      "bias": jnp.zeros(b),
    }
    layers.append((f"Dense_{k}",))
  return gsgd_jax.set_skeleton(params, layers), layers


def bn_cnn_params(key, side, c_in, depth, channels, n_out):
  """``depth`` 3x3 convolutions without bias, each followed by a BatchNorm's affine
  layer, and a dense head; the blocks of docs/math.md (normalization layers)."""
  del side  # (the model's input size)
  params, c = {}, c_in
  for k in range(depth):
    key, sub = jax.random.split(key)
    params[f"Conv_{k}"] = {
      "kernel": jax.random.normal(sub, (3, 3, c, channels)) * np.sqrt(2 / (9 * c))
    }
    params[f"BN_{k}"] = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
    c = channels
  params["Dense_0"] = {
    "kernel": jax.random.normal(key, (c, n_out)) / np.sqrt(c),
    "bias": jnp.zeros(n_out),
  }
  block = gsgd_jax.Block
  layers = [
    block(["Conv_0"], normalized=True),
    *(block([f"BN_{k}", f"Conv_{k + 1}"], normalized=True) for k in range(depth - 1)),
    block([f"BN_{depth - 1}", "Dense_0"]),
  ]
  return gsgd_jax.set_skeleton(params, layers), layers


def bn_cnn_forward(params, layers, x):
  """Convolution, BatchNorm with the batch's statistics, ReLU; pool; dense."""
  del layers
  k = 0
  while f"Conv_{k}" in params:
    conv = params[f"Conv_{k}"]
    x = jax.lax.conv_general_dilated(
      x, conv["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = _probe(conv, x)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    norm = params[f"BN_{k}"]
    x = jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * norm["scale"] + norm["bias"])
    k += 1
  head = params["Dense_0"]
  return x.mean(axis=(1, 2)) @ head["kernel"] + head["bias"]


def _probe(layer, z):
  """The layer's scale probe, where it has one (see gsgd_jax.probes)."""
  return gsgd_jax.probes.scale_probe(z, layer[PROBE]) if PROBE in layer else z


def with_probes(params, layers):
  """Params with a scale probe on every hidden layer (every convolution of a BatchNorm
  model)."""
  params = dict(params)
  if isinstance(layers[0], gsgd_jax.Block):
    names = [name for name in params if name.startswith("Conv_")]
  else:
    names = [name for (name,) in layers[:-1]]
  for name in names:
    params[name] = {**params[name], PROBE: jnp.ones(params[name]["kernel"].shape[-1])}
  return params


def cnn_forward(params, layers, x):
  convs = [name for (name,) in layers if name.startswith("Conv_")]
  for name in convs:
    x = jax.lax.conv_general_dilated(
      x, params[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = jax.nn.relu(_probe(params[name], x + params[name]["bias"]))
  dense = layers[len(convs) :]
  x = x.mean(axis=(1, 2)) if len(dense) == 1 else x.reshape(len(x), -1)
  return forward(params, dense, x)


def mlp_params(key, n_in, hidden, n_out):
  widths = (n_in, *hidden, n_out)
  params = {}
  for k, (a, b) in enumerate(itertools.pairwise(widths)):
    key, sub = jax.random.split(key)
    params[f"Dense_{k}"] = {
      "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
      "bias": jnp.zeros(b),
    }
  layers = [(f"Dense_{k}",) for k in range(len(widths) - 1)]
  return gsgd_jax.set_skeleton(params, layers), layers


def forward(params, layers, x):
  for k, (name,) in enumerate(layers):
    x = x @ params[name]["kernel"] + params[name]["bias"]
    if k < len(layers) - 1:
      x = _probe(params[name], jax.nn.relu(x))
  return x


def _time(fn, args, iters):
  """Seconds per call of ``fn`` and its last outputs, threaded back as inputs
  (where ``fn`` donates them, only the latest outputs are alive)."""
  start = time.perf_counter()
  for _ in range(iters):
    args = fn(*args)
  jax.block_until_ready(args)
  return (time.perf_counter() - start) / iters, args


def interleaved_times(programs, *, rounds, min_seconds):
  """Seconds per call of every program of ``programs`` (``{name: (fn, args)}``, ``fn``
  returning its next ``args``), one list per name over ``rounds`` rounds, and the
  calls per round.

  Each program starts on copies of its ``args`` and is warmed up once; in every round
  each runs in turn the same number of calls, enough for the slowest to take about
  ``min_seconds``, so all see the same machine state.
  """
  current, iters = {}, {}
  for name, (fn, args) in programs.items():  # warm up, size the inner loop
    copies = tuple(jax.tree.map(jnp.copy, a) for a in args)
    once, current[name] = _time(fn, fn(*copies), 1)
    iters[name] = max(1, int(min_seconds / max(once, 1e-6)))
  n = max(iters.values())
  times = {name: [] for name in programs}
  for _ in range(rounds):
    for name, (fn, _) in programs.items():
      seconds, current[name] = _time(fn, current[name], n)
      times[name].append(seconds)
  return times, n


def model_and_data(name, batch):
  """Params, layers, forward function and one batch for a named model."""
  if name in MLPS:
    spec = MLPS[name]
    params, layers = mlp_params(jax.random.key(0), *spec)
    x = jax.random.normal(jax.random.key(1), (batch, spec[0]))
    return params, layers, forward, x, spec[-1], batch
  if name in BN_CNNS:
    side, c_in, _, _, n_out = spec = BN_CNNS[name]
    params, layers = bn_cnn_params(jax.random.key(0), *spec)
    x = jax.random.normal(jax.random.key(1), (CNN_BATCH, side, side, c_in))
    return params, layers, bn_cnn_forward, x, n_out, CNN_BATCH
  side, c_in, _, _, n_out, _ = spec = CNNS[name]
  params, layers = cnn_params(jax.random.key(0), *spec)
  x = jax.random.normal(jax.random.key(1), (CNN_BATCH, side, side, c_in))
  return params, layers, cnn_forward, x, n_out, CNN_BATCH


OPTIMIZERS = ("SGD", "G-SGD", "G-SGD+probes", "Path-SGD")


def bench_model(name, *, rounds, batch, min_seconds, donate, step_max_params):
  params, layers, forward, x, n_out, batch = model_and_data(name, batch)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  y = jax.random.randint(jax.random.key(2), (batch,), 0, n_out)
  optimizers = {
    "SGD": optax.sgd(1e-3),
    "G-SGD": gsgd_jax.gsgd(1e-3, layers=layers),
    "G-SGD+probes": gsgd_jax.gsgd(1e-3, layers=layers),
    "Path-SGD": gsgd_jax.path_sgd(1e-3, layers=layers),
  }
  if name in BN_CNNS:  # Path-SGD has no term for norms
    del optimizers["Path-SGD"]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(forward(p, layers, x), y).mean()

  programs = {}
  plain_params = params
  for opt_name, tx in optimizers.items():
    # Only the probed variant's model multiplies hidden outputs by probes.
    params = with_probes(plain_params, layers) if opt_name == "G-SGD+probes" else plain_params
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)

    def update(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, g

    def train_step(p, s, tx=tx):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    state = tx.init(params)
    donated = (0, 1) if donate else ()
    programs[opt_name] = {
      "update": (jax.jit(update, donate_argnums=donated), (params, state, grads)),
      "step": (jax.jit(train_step, donate_argnums=donated), (params, state)),
    }
  results: dict[str, Any] = {"model": name, "parameters": int(n_params), "batch": batch}
  kinds = ("update", "step") if n_params <= step_max_params else ("update",)
  for kind in kinds:
    times, n = interleaved_times(
      {opt: prog[kind] for opt, prog in programs.items()}, rounds=rounds, min_seconds=min_seconds
    )
    results[kind] = {"iters_per_round": n}
    for opt in optimizers:
      ratios = [t / base for t, base in zip(times[opt], times["SGD"], strict=True)]
      results[kind][opt] = {
        "ms": 1e3 * float(np.median(times[opt])),
        "ratio": float(np.median(ratios)),
        "ratio_range": [float(np.min(ratios)), float(np.max(ratios))],
      }
  return results


SLOPE_MIN_PARAMS = 5e6  # below this, fixed per-call costs hide the scaling


def loglog_slopes(rows) -> dict[str, float]:
  """Slope of log(update time) against log(parameters) over the MLPs of at least
  ``SLOPE_MIN_PARAMS`` parameters, per optimizer."""
  mlps = [r for r in rows if r["model"] in MLPS and r["parameters"] >= SLOPE_MIN_PARAMS]
  if len(mlps) < 2:
    return {}
  n = np.log([r["parameters"] for r in mlps])
  return {
    opt: float(np.polyfit(n, np.log([r["update"][opt]["ms"] for r in mlps]), 1)[0])
    for opt in OPTIMIZERS
  }


def write_report(out_dir: str | None, stem: str, result: Any, text: str) -> None:
  """Writes ``result`` to ``out_dir/stem.json`` and ``text`` to ``out_dir/stem.md`` (nothing
  when ``out_dir`` is None): every benchmark's raw output beside its table."""
  if out_dir is None:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
    f.write(text + "\n")


def publish(out_dir: str | None, stem: str, settings: str, body: str, **fields: Any) -> None:
  """Prints a benchmark's report, a line naming the device, the jax version and
  ``settings`` over ``body``, and writes it with ``fields`` (beside the device and the
  jax version) through ``write_report``."""
  text = f"device: {device_name()}; jax {jax.__version__}; {settings}\n\n{body}"
  print("\n" + text)
  write_report(out_dir, stem, {"device": device_name(), "jax": jax.__version__, **fields}, text)


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return f"{dev.platform.upper()} {getattr(dev, 'device_kind', '')}".strip()


def table(rows) -> str:
  ratios = [opt for opt in OPTIMIZERS if opt != "SGD"]
  head = " | ".join(f"{opt} ratio" for opt in ratios)
  lines = [
    f"| model | params | update+apply SGD ms | {head} | train step (batch) SGD ms | {head} |",
    "|---|---|---|" + "---|" * len(ratios) + "---|" + "---|" * len(ratios),
  ]
  for r in rows:
    u = r["update"]
    cells = [
      r["model"],
      f"{r['parameters'] / 1e6:.1f}M",
      f"{u['SGD']['ms']:.2f}",
      *(f"{u[opt]['ratio']:.2f}" if opt in u else "–" for opt in ratios),
    ]
    if "step" in r:
      st = r["step"]
      cells += [
        f"({r['batch']}) {st['SGD']['ms']:.2f}",
        *(f"{st[opt]['ratio']:.2f}" if opt in st else "–" for opt in ratios),
      ]
    else:
      cells += ["not timed"] + [""] * len(ratios)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}"
  )
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--min-seconds", type=float, default=0.2, help="time per variant per round")
  parser.add_argument(
    "--step-max-params",
    type=float,
    default=3e7,
    help="time the whole train step only up to this many parameters",
  )
  parser.add_argument(
    "--donate", action="store_true", help="donate params and state to the jitted functions"
  )
  parser.add_argument("--out", help="directory for speed.json and speed.md")
  args = parser.parse_args(argv)
  rows = []
  for name in args.models.split(","):
    rows.append(
      bench_model(
        name,
        rounds=args.rounds,
        batch=args.batch,
        min_seconds=args.min_seconds,
        donate=args.donate,
        step_max_params=args.step_max_params,
      )
    )
    print(
      f"{name}: "
      + ", ".join(
        f"{kind} {opt} {rows[-1][kind][opt]['ratio']:.2f}"
        for kind in ("update", "step")
        if kind in rows[-1]
        for opt in OPTIMIZERS[1:3]
      ),
      flush=True,
    )
  settings = (
    f"{'donated' if args.donate else 'undonated'} buffers; "
    f"{args.rounds} interleaved rounds; ratio = time / SGD time (median over rounds)"
  )
  slopes = loglog_slopes(rows)
  md = table(rows)
  if slopes:
    md += (
      "\n\nLog-log slope of update time against parameters over the MLPs of at least "
      f"{SLOPE_MIN_PARAMS / 1e6:g}M parameters: "
      + ", ".join(f"{opt} {slope:.2f}" for opt, slope in slopes.items())
      + " (1 = linear)."
    )
  publish(args.out, "speed", settings, md, donate=args.donate, rows=rows, loglog_slopes=slopes)


if __name__ == "__main__":
  main()
