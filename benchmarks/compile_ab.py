"""Compile cost of path_space(AdamW) at another revision against this one, in one run.

The compile-time ratio of ``benchmarks.transformer_speed`` moves by several hundredths
between runs on a shared machine, about as much as one change to the compiled program
moves it; two runs on two days cannot tell a change from the weather. This benchmark
compiles the decoder's train step with AdamW, with ``path_space(AdamW)`` from the package
at git revision ``--against`` and with it from the working tree, one after the other in
each round (the order reversed every other round, garbage collected before each
compile), so that both are measured under the same load. The other revision's package
is read with ``git archive`` into a temporary folder and imported under another name;
its blocks are the same declarations, rebuilt from their ``repr``.

It reports, for each version, the median over the rounds of its compile time over
AdamW's in the same round; the rounds' ratio of the two versions (median, middle half,
geometric mean, and the median for each order, which moves it by a few hundredths); and
the kernels and lines of optimized LLVM IR of each compiled step
(``transformer_speed.llvm_ir``, counts that do not vary from run to run).

    python -m benchmarks.compile_ab --against REV [--model relu|llama] [--depth 6]
                                    [--repeats 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from types import ModuleType
from typing import Any

import jax
import numpy as np
import optax

import gsgd_jax
from benchmarks import transformer_speed as ts
from benchmarks.speed import device_name, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("at --against", "working tree")


def package_at(rev: str, folder: str) -> ModuleType:
  """The ``gsgd_jax`` package at git revision ``rev``, imported as another module (its
  own imports renamed), extracted into ``folder``."""
  sha = subprocess.run(
    ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
  ).stdout.strip()
  name = f"gsgd_jax_at_{sha}"
  archive = subprocess.run(
    ["git", "archive", "--format=tar", rev, "gsgd_jax"], cwd=ROOT, check=True, capture_output=True
  ).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(folder, filter="data")
  os.rename(os.path.join(folder, "gsgd_jax"), os.path.join(folder, name))
  for directory, _, files in os.walk(os.path.join(folder, name)):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(directory, file)
        with open(path) as f:
          text = re.sub(r"\bgsgd_jax\b", name, f.read())
        with open(path, "w") as f:
          f.write(text)
  sys.path.insert(0, folder)
  return importlib.import_module(name)


def declared(blocks: list[gsgd_jax.Block], package: ModuleType) -> list[Any]:
  """``blocks`` declared with ``package``'s ``Block`` and ``Layer`` (from their repr)."""
  names = {"Block": package.Block, "Layer": package.Layer}
  return [eval(repr(block), names) for block in blocks]  # our own declarations' reprs


def compile_rounds(variants: dict[str, Any], c: ts.Config, repeats: int) -> dict[str, list]:
  """Compile seconds of each variant's train step per round, variants in order in even
  rounds and reversed in odd ones."""
  params, tokens = ts.problem(c)
  names = list(variants)
  seconds: dict[str, list[float]] = {name: [] for name in names}
  for repeat in range(repeats):
    for name in names if repeat % 2 == 0 else names[::-1]:
      tx = variants[name]
      jax.clear_caches()
      state = tx.init(params)
      gc.collect()
      start = time.perf_counter()
      jax.jit(ts.train_step(tx, c.heads)).lower(params, state, tokens).compile()
      seconds[name].append(time.perf_counter() - start)
  return seconds


def code(variants: dict[str, Any], c: ts.Config) -> dict[str, tuple[int, int]]:
  """Kernels and lines of optimized LLVM IR of each variant's compiled train step."""
  params, tokens = ts.problem(c)
  return {name: ts.step_llvm_ir(tx, params, tokens, c.heads) for name, tx in variants.items()}


def report(rev: str, c: ts.Config, seconds, llvm) -> tuple[dict[str, Any], str]:
  adamw = np.asarray(seconds["AdamW"])
  ratio = {name: float(np.median(np.asarray(seconds[name]) / adamw)) for name in VERSIONS}
  between = np.asarray(seconds[VERSIONS[1]]) / np.asarray(seconds[VERSIONS[0]])
  # Which of the two compiles first in a round moved their ratio by a few hundredths, in
  # either direction from run to run: it is also read apart for each order.
  by_order = {
    "working tree compiled second": float(np.median(between[0::2])),
    "working tree compiled first": float(np.median(between[1::2])) if len(between) > 1 else None,
  }
  result = {"device": device_name(), "jax": jax.__version__, "config": c._asdict()}
  result |= {"against": rev, "compile_s_per_repeat": seconds, "compile_ratio": ratio}
  result |= {"working_tree_over_against": float(np.median(between))}
  result |= {"working_tree_over_against_geometric_mean": float(np.exp(np.mean(np.log(between))))}
  result |= {"working_tree_over_against_by_order": by_order}
  result |= {"llvm_kernels": {n: k for n, (k, _) in llvm.items()}}
  result |= {"llvm_ir_lines": {n: lines for n, (_, lines) in llvm.items()}}
  lines = [
    f"device: {result['device']}; jax {jax.__version__}; scanned {c.model} decoder "
    f"{c._asdict()}; {len(adamw)} rounds, each compiling the three one after the other",
    "",
    "| optimizer | compile s (best) | ratio to AdamW (median of rounds) | LLVM kernels "
    "| LLVM IR lines |",
    "|---|---|---|---|---|",
    f"| AdamW | {adamw.min():.2f} | 1.00 | {llvm['AdamW'][0]} | {llvm['AdamW'][1]} |",
    *(
      f"| path_space(AdamW), {name} ({rev if name == VERSIONS[0] else 'now'}) | "
      f"{min(seconds[name]):.2f} | {ratio[name]:.3f} | {llvm[name][0]} | {llvm[name][1]} |"
      for name in VERSIONS
    ),
    "",
    f"Working tree over {rev}, median of the rounds' ratios: "
    f"{result['working_tree_over_against']:.3f} (middle half "
    + "-".join(f"{q:.3f}" for q in np.percentile(between, [25, 75]))
    + f"), geometric mean {result['working_tree_over_against_geometric_mean']:.3f}"
    + "".join(f"; {order} {r:.3f}" for order, r in by_order.items() if r is not None)
    + ".",
  ]
  return result, "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--against", required=True, help="git revision to compare with")
  parser.add_argument("--model", choices=ts.MODELS, default="llama")
  parser.add_argument("--depth", type=int, default=6)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=16)
  parser.add_argument("--out", help="directory for compile_ab.json and .md")
  args = parser.parse_args(argv)
  c = ts.Config(args.depth, args.dim, args.hidden, seq=args.seq, batch=args.batch, model=args.model)
  adamw = optax.adamw(1e-3, weight_decay=0.01)
  with tempfile.TemporaryDirectory() as folder:
    other = package_at(args.against, folder)
    variants = {
      "AdamW": adamw,
      VERSIONS[0]: other.path_space(adamw, layers=declared(c.blocks, other), fallback=adamw),
      VERSIONS[1]: gsgd_jax.path_space(adamw, layers=c.blocks, fallback=adamw),
    }
    seconds = compile_rounds(variants, c, args.repeats)
    llvm = code(variants, c)
  result, md = report(args.against, c, seconds, llvm)
  print(md)
  write_report(args.out, "compile_ab", result, md)


if __name__ == "__main__":
  main()
