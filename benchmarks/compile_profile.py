"""Where XLA:CPU spends the compile time of a train step, against depth.

For each optimizer and depth it compiles the jitted train step of one MLP chain (the
models of ``benchmarks.depth``) under ``jax.profiler.trace`` and reads the compiler's
own trace events: its whole compile (``PjRtCpuClient::Compile``; ``wall_ms`` is the
whole ``compile()`` call, JAX's own work included), the HLO passes (through and after
layout assignment), the backend (code generation), and the fused kernels the backend
compiles (``FusionCompiler::Compile``: identical fused computations are compiled
once). It also counts the HLO instructions before optimization and the fused
computations after. Each program is compiled ``--repeats`` times, interleaved, and
each column is the median. The summary gives, per optimizer, what each layer adds
from the shallowest depth to the deepest.

The event names are XLA:CPU's; on another backend the phases read 0.

    python -m benchmarks.compile_profile [--optimizers SGD,G-SGD,Adam,G-Adam,Path-SGD]
                                         [--depths 10,100] [--width 16] [--repeats 3]
                                         [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np

from benchmarks import depth, speed

# Trace events summed per phase (an event counts when its name starts with one).
PHASES = {
  "compile_ms": ("PjRtCpuClient::Compile",),
  "hlo_passes_ms": ("HLO passes through layout assignment", "HLO passes after layout assignment"),
  "backend_ms": ("CpuCompiler::RunBackend",),
}
KERNEL_EVENT = "FusionCompiler::Compile"
COLUMNS = (
  "hlo_instructions",
  "fusions",
  "kernels",
  "wall_ms",
  "compile_ms",
  "hlo_passes_ms",
  "backend_ms",
)


def _trace_events(directory: str) -> list[dict[str, Any]]:
  (path,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X"]


def entry_fusions(compiled) -> int:
  """Fused computations the entry computation of a compiled program calls (those
  inside loop bodies not counted)."""
  text = compiled.as_text()
  return text[text.index("\nENTRY") :].count(" fusion(")


def profile(lowered, compiler_options=None) -> dict[str, float]:
  """Compile ``lowered`` under the profiler; its phases (ms) and program sizes."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      start = time.perf_counter()
      compiled = lowered.compile(compiler_options)
      wall_ms = 1e3 * (time.perf_counter() - start)
    events = _trace_events(directory)
  totals: dict[str, float] = collections.defaultdict(float)
  for event in events:
    for phase, prefixes in PHASES.items():
      if event["name"].startswith(prefixes):
        totals[phase] += event.get("dur", 0) / 1e3  # microseconds
  return {
    "hlo_instructions": len(re.findall(r" = \S+ [a-z][\w-]*\(", lowered.as_text(dialect="hlo"))),
    "fusions": entry_fusions(compiled),
    "kernels": sum(e["name"] == KERNEL_EVENT for e in events),
    "wall_ms": wall_ms,
    **{phase: totals[phase] for phase in PHASES},
  }


def per_layer(rows) -> dict[str, dict[str, float]]:
  """Per optimizer, what each layer adds to every column, from the shallowest to the deepest."""
  out = {}
  for name in dict.fromkeys(r["optimizer"] for r in rows):
    series = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: r["depth"])
    first, last = series[0], series[-1]
    layers = last["depth"] - first["depth"]
    if layers:
      out[name] = {c: (last[c] - first[c]) / layers for c in COLUMNS}
  return out


def table(rows, added) -> str:
  lines = [
    "| optimizer | depth | " + " | ".join(COLUMNS) + " |",
    "|---|---|" + "---|" * len(COLUMNS),
  ]
  for r in rows:
    lines.append(
      f"| {r['optimizer']} | {r['depth']} | " + " | ".join(f"{r[c]:.0f}" for c in COLUMNS) + " |"
    )
  lines.append("\nAdded per layer, shallowest to deepest:\n")
  lines.append("| optimizer | " + " | ".join(COLUMNS) + " |")
  lines.append("|---|" + "---|" * len(COLUMNS))
  for name, values in added.items():
    lines.append(f"| {name} | " + " | ".join(f"{values[c]:.1f}" for c in COLUMNS) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizers", default=",".join(depth.OPTIMIZERS))
  parser.add_argument("--depths", default="10,100", help="MLP depths (layers)")
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3, help="compiles per program (median)")
  parser.add_argument("--out", help="directory for compile_profile.json and .md")
  args = parser.parse_args(argv)
  problems = {d: depth.model("mlp", d, args.width) for d in depth.ints(args.depths)}
  names = args.optimizers.split(",")
  # Every program compiled --repeats times, interleaved (each from a fresh lowering, as
  # a compiled program is cached per lowering); each column is the median.
  runs = collections.defaultdict(list)
  for _ in range(args.repeats):
    for name in names:
      for d, problem in problems.items():
        lowered, _ = depth.lower_train_step(problem, name)
        runs[name, d].append(profile(lowered))
  rows = [
    {
      "optimizer": name,
      "depth": d,
      **{c: float(np.median([r[c] for r in runs[name, d]])) for c in COLUMNS},
    }
    for name in names
    for d in problems
  ]
  added = per_layer(rows)
  settings = (
    f"MLP of width {args.width}; median of {args.repeats} interleaved compiles of the jitted "
    "train step, under jax.profiler.trace"
  )
  speed.publish(
    args.out, "compile_profile", settings, table(rows, added), rows=rows, per_layer=added
  )


if __name__ == "__main__":
  main()
