"""Speed of path_space(AdamW) on a scanned transformer's chains against AdamW.

Two decoders in plain JAX whose layers run under ``lax.scan``, so their params
hold a stack axis, as Flax ``nn.scan`` stores them (``--model``):

* ``relu``: a pre-LN decoder, per layer causal multi-head attention and a ReLU
  feed-forward block ``LN -> fc1 -> ReLU -> fc2``, declared as one stacked block,
  ``gsgd_jax.Block([ln_ff, fc1, fc2], stack_axis=0)``;
* ``llama``: a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, no biases) with t5x's
  multi-axis attention kernels, queries, keys and values ``(d, heads, head_dim)``
  and outputs ``(heads, head_dim, d)``; per layer the gated block's ``[up, down]``
  and the attention's ``[value, out]`` and ``[query, key^T]`` (``gsgd_jax.Layer``;
  the key read transposed, RoPE's half-split pairs as nodes), all stacked.

AdamW runs in path space on the blocks and on the weights of everything else
(the gate, norms, embedding, read-out).

It reports, as ratios to AdamW measured in one run:

* the jitted train step's time (forward, backward, update, apply), the two
  optimizers alternating round by round (``speed.interleaved_times``);
* the compile time of the train step for several depths, and its growth with
  depth (the stacked update is vmapped over the layers, so it should not grow):
  ``--compile-repeats`` rounds, each compiling the two at a depth one after the
  other; the ratio is the median of the rounds' pairs;
* the bytes of temporaries XLA allots to the compiled step.

With ``--per-block`` it reports instead what each declared block adds to compiling
the step: ``path_space(AdamW)`` over the first ``k`` blocks, from ``k = 0`` (AdamW
alone) to all of them, with the fused computations of each compiled program (XLA:CPU
compiles each one separately), and the kernels and lines of optimized LLVM IR it compiles
them into (``llvm_ir``: measures that do not vary from run to run).

    python -m benchmarks.transformer_speed [--model relu|llama] [--depths 3,6,12,24]
        [--rounds 7] [--compile-repeats 3] [--per-block] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import re
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks.lm import rotary
from benchmarks.speed import device_name, interleaved_times, write_report

BLOCKS = [gsgd_jax.Block(["layers/ln_ff", "layers/fc1", "layers/fc2"], stack_axis=0)]
LLAMA_BLOCKS = [
  gsgd_jax.Block(["layers/up", "layers/down"], stack_axis=0),
  gsgd_jax.Block(
    [gsgd_jax.Layer("layers/value", input_axes=1), gsgd_jax.Layer("layers/out", input_axes=2)],
    stack_axis=0,
  ),
  gsgd_jax.Block(
    [
      gsgd_jax.Layer("layers/query", input_axes=1, pairs="half"),
      gsgd_jax.Layer("layers/key", input_axes=1, transposed=True, pairs="half"),
    ],
    stack_axis=0,
  ),
]
OPTIMIZERS = ("AdamW", "path_space(AdamW)")
MODELS = ("relu", "llama")


class Config(NamedTuple):
  depth: int = 6
  dim: int = 256
  hidden: int = 1024
  heads: int = 4
  vocab: int = 256
  seq: int = 64
  batch: int = 16
  model: str = "relu"

  @property
  def blocks(self) -> list[gsgd_jax.Block]:
    return LLAMA_BLOCKS if self.model == "llama" else BLOCKS


def init_params(key: jax.Array, c: Config) -> dict[str, Any]:
  """Scaled-normal kernels, unit norm scales, zero biases; stacked layers on axis 0."""
  if c.model == "llama":
    return init_llama(key, c)
  keys = iter(jax.random.split(key, 8))
  normal = lambda *shape: jax.random.normal(next(keys), shape) / np.sqrt(shape[-2])
  norm = lambda: {"scale": jnp.ones((c.depth, c.dim)), "bias": jnp.zeros((c.depth, c.dim))}
  layers = {
    "ln_attn": norm(),
    "attn": {
      "qkv": {"kernel": normal(c.depth, c.dim, 3 * c.dim)},
      "out": {"kernel": normal(c.depth, c.dim, c.dim)},
    },
    "ln_ff": norm(),
    "fc1": {"kernel": normal(c.depth, c.dim, c.hidden), "bias": jnp.zeros((c.depth, c.hidden))},
    "fc2": {"kernel": normal(c.depth, c.hidden, c.dim), "bias": jnp.zeros((c.depth, c.dim))},
  }
  return {
    "embed": jax.random.normal(next(keys), (c.vocab, c.dim)),
    "layers": layers,
    "ln_out": {"scale": jnp.ones(c.dim), "bias": jnp.zeros(c.dim)},
    "head": {"kernel": normal(c.dim, c.vocab)},
  }


def init_llama(key: jax.Array, c: Config) -> dict[str, Any]:
  """The LLaMA-style decoder's params: kernels scaled by their inputs, unit RMSNorm scales."""
  keys = iter(jax.random.split(key, 12))
  head_dim = c.dim // c.heads
  normal = lambda fan_in, *shape: jax.random.normal(next(keys), (c.depth, *shape)) / np.sqrt(fan_in)
  layers = {
    "attn_norm": {"scale": jnp.ones((c.depth, c.dim))},
    **{n: {"kernel": normal(c.dim, c.dim, c.heads, head_dim)} for n in ("query", "key", "value")},
    "out": {"kernel": normal(c.dim, c.heads, head_dim, c.dim)},
    "mlp_norm": {"scale": jnp.ones((c.depth, c.dim))},
    "gate": {"kernel": normal(c.dim, c.dim, c.hidden)},
    "up": {"kernel": normal(c.dim, c.dim, c.hidden)},
    "down": {"kernel": normal(c.hidden, c.hidden, c.dim)},
  }
  return {
    "embed": jax.random.normal(next(keys), (c.vocab, c.dim)),
    "layers": layers,
    "final_norm": {"scale": jnp.ones(c.dim)},
    "head": {"kernel": jax.random.normal(next(keys), (c.dim, c.vocab)) / np.sqrt(c.dim)},
  }


def _rms_norm(x, p):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * p["scale"]


def _llama_layer(x, p):
  y = _rms_norm(x, p["attn_norm"])
  q, k, v = (jnp.einsum("bsd,dhe->bshe", y, p[n]["kernel"]) for n in ("query", "key", "value"))
  q, k = rotary(q), rotary(k)
  logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
  weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
  mixed = jnp.einsum("bhqk,bkhe->bqhe", weights, v)
  x = x + jnp.einsum("bqhe,hed->bqd", mixed, p["out"]["kernel"])
  y = _rms_norm(x, p["mlp_norm"])
  h = jax.nn.silu(y @ p["gate"]["kernel"]) * (y @ p["up"]["kernel"])
  return x + h @ p["down"]["kernel"], None


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(x, p, heads):
  batch, seq, dim = x.shape
  q, k, v = jnp.split(x @ p["qkv"]["kernel"], 3, axis=-1)
  split = lambda t: t.reshape(batch, seq, heads, dim // heads)
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(dim // heads)
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(x.shape) @ p["out"]["kernel"]


def forward(params, tokens, heads):
  """Logits ``(batch, seq, vocab)`` of a pre-LN decoder; the layers run under ``lax.scan``."""
  if "final_norm" in params:  # the LLaMA-style decoder
    x, _ = jax.lax.scan(_llama_layer, params["embed"][tokens], params["layers"])
    return _rms_norm(x, params["final_norm"]) @ params["head"]["kernel"]

  def layer(x, p):
    x = x + _attention(_layer_norm(x, p["ln_attn"]), p["attn"], heads)
    h = jax.nn.relu(_layer_norm(x, p["ln_ff"]) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return x + h @ p["fc2"]["kernel"] + p["fc2"]["bias"], None

  x, _ = jax.lax.scan(layer, params["embed"][tokens], params["layers"])
  return _layer_norm(x, params["ln_out"]) @ params["head"]["kernel"]


def loss_fn(params, tokens, heads):
  logits = forward(params, tokens[:, :-1], heads)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def optimizer(name: str, c: Config, lr: float = 1e-3) -> optax.GradientTransformation:
  adamw = optax.adamw(lr, weight_decay=0.01)
  if name == "AdamW":
    return adamw
  return gsgd_jax.path_space(adamw, layers=c.blocks, fallback=adamw)


def problem(c: Config):
  """Params (skeleton weights set to 1) and one batch of tokens."""
  params = gsgd_jax.set_skeleton(init_params(jax.random.key(0), c), c.blocks)
  tokens = jax.random.randint(jax.random.key(1), (c.batch, c.seq + 1), 0, c.vocab)
  return params, tokens


def train_step(tx, heads):
  def step(params, state, tokens):
    grads = jax.grad(loss_fn)(params, tokens, heads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, tokens

  return step


def compiled_step(name: str, c: Config, compiler_options: dict | None = None):
  """The train step of ``name`` on ``c``, compiled (with XLA ``compiler_options``,
  if any); with its seconds to compile."""
  params, tokens = problem(c)
  tx = optimizer(name, c)
  state = tx.init(params)
  start = time.perf_counter()
  step = jax.jit(train_step(tx, c.heads), compiler_options=compiler_options)
  compiled = step.lower(params, state, tokens).compile()
  return compiled, time.perf_counter() - start, (params, state, tokens)


def temp_bytes(compiled) -> int:
  """Bytes of temporaries XLA allots to a compiled program."""
  return int(compiled.memory_analysis().temp_size_in_bytes)


def compile_times(depths, c: Config, repeats: int) -> dict[str, list[list[float]]]:
  """Compile seconds per optimizer, depth and repeat (``[depth][repeat]``), variants
  interleaved: each repeat compiles every variant at a depth one after the other, so
  that the ratio of a repeat's pair is measured under the same load.

  The order of the pair alternates (AdamW first in even repeats, ``path_space`` first in
  odd ones): on the 2-core machine of benchmarks/RESULTS.md the order moved the ratio by
  a few hundredths, about its distance to its target, and the report gives its median for
  each order. Garbage is collected before each compile, so that neither pays for the
  other's.
  """
  times: dict[str, list[list[float]]] = {name: [[] for _ in depths] for name in OPTIMIZERS}
  for repeat in range(repeats):
    for i, depth in enumerate(depths):
      for name in OPTIMIZERS if repeat % 2 == 0 else OPTIMIZERS[::-1]:
        jax.clear_caches()
        gc.collect()
        _, seconds, _ = compiled_step(name, c._replace(depth=depth))
        times[name][i].append(seconds)
  return times


def step_times(c: Config, rounds: int, min_seconds: float):
  """Seconds per train step of each optimizer over ``rounds`` interleaved rounds, and the
  bytes of temporaries of each compiled step."""
  programs = {}
  for name in OPTIMIZERS:
    compiled, _, args = compiled_step(name, c)
    programs[name] = (compiled, args)
  times, _ = interleaved_times(programs, rounds=rounds, min_seconds=min_seconds)
  return times, {name: temp_bytes(compiled) for name, (compiled, _) in programs.items()}


def llvm_ir(lowered, compiler_options: dict | None = None) -> tuple[int, int]:
  """Kernels and lines of optimized LLVM IR that XLA:CPU compiles ``lowered`` into (with
  XLA ``compiler_options``, if any; 0 and 0 on other backends). Unlike seconds, they do
  not vary from run to run. Generating that code is the largest phase of XLA:CPU's
  compile in its profile, but the seconds do not follow the lines closely: cutting a
  fifth of the code the blocks add left the LLaMA-style decoder's compile time as it
  was, within a percent (benchmarks/RESULTS.md)."""
  with tempfile.TemporaryDirectory() as directory:
    lowered.compile({**(compiler_options or {}), "xla_dump_to": directory})
    files = glob.glob(os.path.join(directory, "*.ir-with-opt.ll"))
    lines = 0
    for path in files:
      with open(path) as f:
        lines += sum(1 for _ in f)
  return len(files), lines


def step_llvm_ir(
  tx, params, tokens, heads: int, compiler_options: dict | None = None
) -> tuple[int, int]:
  """``llvm_ir`` of the train step of ``tx``, compiled afresh (caches cleared)."""
  jax.clear_caches()
  lowered = jax.jit(train_step(tx, heads)).lower(params, tx.init(params), tokens)
  return llvm_ir(lowered, compiler_options)


def block_costs(c: Config, repeats: int) -> tuple[dict[str, Any], str]:
  """Compile seconds (best of ``repeats``, variants interleaved; ratios to AdamW the median
  of the repeats') and fused computations of the train step with ``path_space(AdamW)``
  over the first ``k`` of ``c.blocks``."""
  params, tokens = problem(c)
  adamw = optax.adamw(1e-3, weight_decay=0.01)
  variants = [adamw] + [
    gsgd_jax.path_space(adamw, layers=c.blocks[:k], fallback=adamw)
    for k in range(1, len(c.blocks) + 1)
  ]
  fusions, tracing = [0] * len(variants), [np.inf] * len(variants)
  per_repeat: list[list[float]] = []
  for _ in range(repeats):
    per_repeat.append([])
    for k, tx in enumerate(variants):
      jax.clear_caches()
      state = tx.init(params)
      gc.collect()
      start = time.perf_counter()
      lowered = jax.jit(train_step(tx, c.heads)).lower(params, state, tokens)
      traced = time.perf_counter()
      compiled = lowered.compile()
      per_repeat[-1].append(time.perf_counter() - start)
      tracing[k] = min(tracing[k], traced - start)
      text = compiled.as_text() or ""
      fusions[k] = len(re.findall(r" fusion\(", text))  # every fusion instruction
  # Once, after the timed rounds: the dump is not timed.
  code = [step_llvm_ir(tx, params, tokens, c.heads) for tx in variants]
  times = np.asarray(per_repeat)  # [repeat][variant]
  seconds = [float(t) for t in times.min(axis=0)]
  ratios = [float(r) for r in np.median(times / times[:, :1], axis=0)]
  names = ["none (AdamW)", *(_block_name(block) for block in c.blocks)]
  lines = [
    f"device: {device_name()}; jax {jax.__version__}; scanned {c.model} decoder "
    f"{c._asdict()}; path_space(AdamW) over the blocks up to each row, seconds the best of "
    f"{repeats}, ratios the median of the {repeats} rounds' ratios",
    "",
    "| blocks up to | compile s | ratio to AdamW | of which tracing s | fused computations "
    "| LLVM kernels | LLVM IR lines |",
    "|---|---|---|---|---|---|---|",
    *(
      f"| {name} | {t:.2f} | {r:.2f} | {tr:.2f} | {n} | {k} | {lines} |"
      for name, t, r, tr, n, (k, lines) in zip(
        names, seconds, ratios, tracing, fusions, code, strict=True
      )
    ),
  ]
  result = {"device": device_name(), "jax": jax.__version__, "config": c._asdict()}
  result |= {"blocks": names, "compile_s": seconds, "compile_ratio": ratios}
  result |= {"compile_s_per_repeat": per_repeat, "tracing_s": tracing, "fusions": fusions}
  result |= {"llvm_kernels": [k for k, _ in code], "llvm_ir_lines": [n for _, n in code]}
  return result, "\n".join(lines)


def _block_name(block: gsgd_jax.Block) -> str:
  """``[up, down]``: the last key of each layer's path."""
  paths = (getattr(layer, "path", layer) for layer in block.layers)
  last = lambda path: path.rsplit("/", 1)[-1] if isinstance(path, str) else str(path[-1])
  return "[" + ", ".join(last(path) for path in paths) + "]"


def report(c: Config, depths, steps, compiles, temps) -> tuple[dict[str, Any], str]:
  ratios = np.asarray(steps[OPTIMIZERS[1]]) / np.asarray(steps[OPTIMIZERS[0]])
  # Seconds: the best of the repeats. Ratios: the median of each repeat's pair, which a
  # slower moment of the machine (a neighbour's load, a collection) moves less than it
  # moves the best of either.
  best = {name: [float(np.min(t)) for t in compiles[name]] for name in OPTIMIZERS}
  paired = np.asarray(compiles[OPTIMIZERS[1]]) / np.asarray(compiles[OPTIMIZERS[0]])
  compile_ratio = [float(r) for r in np.median(paired, axis=1)]
  quartiles = [float(q) for q in np.percentile(paired, [25, 75])]
  # compile_times alternates the order of each pair: AdamW first in even repeats.
  by_order = {
    f"{first} compiled first": float(np.median(pairs)) if pairs.size else None
    for first, pairs in zip(OPTIMIZERS, (paired[:, 0::2], paired[:, 1::2]), strict=True)
  }
  slope = {  # over two depths or more
    name: float(np.polyfit(np.log(depths), np.log(best[name]), 1)[0])
    for name in OPTIMIZERS
    if len(depths) > 1
  }
  params = sum(x.size for x in jax.tree.leaves(problem(c)[0]))
  result = {
    "device": device_name(),
    "jax": jax.__version__,
    "config": c._asdict(),
    "parameters": int(params),
    "step_ms": {name: float(np.median(t) * 1e3) for name, t in steps.items()},
    "step_ratio": float(np.median(ratios)),
    "depths": list(depths),
    "compile_s": best,
    "compile_s_per_repeat": compiles,
    "compile_ratio": compile_ratio,
    "compile_ratio_all_depths": float(np.median(paired)),
    "compile_ratio_quartiles": quartiles,
    "compile_ratio_by_order": by_order,
    "compile_loglog_slope": slope,
    "temp_bytes": temps,
  }
  lines = [
    f"device: {result['device']}; jax {jax.__version__}; scanned {c.model} decoder "
    f"{c._asdict()}, "
    f"{params / 1e6:.2f}M parameters; ratio = path_space(AdamW) / AdamW",
    "",
    "| train step AdamW ms | path_space(AdamW) ms | ratio (median of rounds) | "
    "temporaries AdamW MB | path_space(AdamW) MB |",
    "|---|---|---|---|---|",
    f"| {result['step_ms']['AdamW']:.1f} | {result['step_ms'][OPTIMIZERS[1]]:.1f} | "
    f"{result['step_ratio']:.3f} | {temps['AdamW'] / 2**20:.1f} | "
    f"{temps[OPTIMIZERS[1]] / 2**20:.1f} |",
    "",
    "| layers | compile AdamW s (best) | path_space(AdamW) s (best) | ratio (median of "
    "pairs) | ratios of the pairs |",
    "|---|---|---|---|---|",
    *(
      f"| {d} | {a:.2f} | {p:.2f} | {r:.2f} | {', '.join(f'{x:.2f}' for x in pairs)} |"
      for d, a, p, r, pairs in zip(
        depths, best["AdamW"], best[OPTIMIZERS[1]], compile_ratio, paired, strict=True
      )
    ),
    "",
    f"Median ratio of all {paired.size} pairs: {result['compile_ratio_all_depths']:.2f} "
    f"(middle half {quartiles[0]:.2f}-{quartiles[1]:.2f})"
    + "".join(f"; {first} {r:.2f}" for first, r in by_order.items() if r is not None)
    + ".",
  ]
  if slope:
    lines += [
      "",
      "Log-log slope of compile time against depth: "
      + ", ".join(f"{name} {s:.2f}" for name, s in slope.items())
      + " (0 = flat).",
    ]
  return result, "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=MODELS, default="relu")
  parser.add_argument("--depth", type=int, default=6, help="layers of the timed step")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--depths", default="3,6,12,24", help="layers of the compile-time sweep")
  parser.add_argument("--compile-repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--min-seconds", type=float, default=0.5, help="time per variant per round")
  parser.add_argument("--per-block", action="store_true", help="what each block adds to compiling")
  parser.add_argument("--out", help="directory for transformer_speed.json and .md")
  args = parser.parse_args(argv)
  c = Config(args.depth, args.dim, args.hidden, seq=args.seq, batch=args.batch, model=args.model)
  if args.per_block:
    result, md = block_costs(c, args.compile_repeats)
    print(md)
    write_report(args.out, "transformer_speed_blocks", result, md)
    return
  depths = [int(d) for d in args.depths.split(",")]
  compiles = compile_times(depths, c, args.compile_repeats)
  steps, temps = step_times(c, args.rounds, args.min_seconds)
  result, md = report(c, depths, steps, compiles, temps)
  print(md)
  write_report(args.out, "transformer_speed", result, md)


if __name__ == "__main__":
  main()
