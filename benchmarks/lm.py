"""A LLaMA-style decoder trained byte by byte on real text: AdamW against AdamW in path space
over its gated feed-forward and attention value chains, and Muon.

The model: token embedding, ``depth`` decoder layers under ``nn.scan`` (parameters stacked on
axis 0) with Hugging Face's names (``layers/{input_layernorm, self_attn/{q,k,v,o}_proj,
post_attention_layernorm, mlp/{gate,up,down}_proj}``), RMSNorm, rotary position embeddings,
causal attention, SwiGLU, no biases, a final RMSNorm and an untied read-out. Its path-space
blocks are what ``gsgd_jax.infer_blocks(params, 'llama')`` writes: per layer ``[up_proj,
down_proj]`` and ``[v_proj, o_proj]``, and with ``query_key = "half"`` in the config
``[q_proj, k_proj^T]`` with RoPE's half-split pairs as nodes, all stacked; every other
parameter (the gate, the norms, the embedding, the read-out) takes the fallback.

The text: the Python standard library's own source files (``.py`` outside its test packages,
``site-packages`` excluded), which every machine running this code has offline. Files are
split by their sorted index: every tenth file (index 0 mod 10) is validation, index 5 mod 10 is
test, the rest training, so that no file is in two splits. The bytes differ between Python
versions; the results record the version and the size of each split.

Each optimizer's learning rate is chosen on the validation split from its grid (seed 0, the
full run, which is then seed 0's run); every seed starts all optimizers from the same
initialisation (with ``skeleton_init``, every skeleton weight of the blocks set to 1 for all of
them) and sees the same batches. Reported: training-loss curves (means of ``curve_every``
steps), validation loss during training and at the end, and test loss, in nats per byte (bits
per byte beside them).

    python -m benchmarks.lm --config configs/lm/stdlib_llama.toml [--out DIR] [--steps N]

``--invariance`` instead trains AdamW and AdamW in path space twice each, from the model's
start and from a random positive rescaling of the chains' hidden nodes (every up/down hidden
unit and every value dimension of every layer, ``gsgd_jax.random_rescale``), on the same
batches, in float32 and in float64, and reports how far the two runs of each end apart:

    python -m benchmarks.lm --config configs/lm/stdlib_llama.toml --invariance [--steps 100]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import sysconfig
import time
import tomllib
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax

OPTIMIZER_KINDS = ("adamw", "path_adamw", "muon")
_TEST_PACKAGES = {"test", "tests", "idle_test"}


# ----------------------------------------------------------------------------
# Text.


def stdlib_files(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """The standard library's ``.py`` files outside its test packages, sorted."""
  base = pathlib.Path(sysconfig.get_paths()["stdlib"] if root is None else root)
  return sorted(
    path
    for path in base.rglob("*.py")
    if "site-packages" not in path.parts and not _TEST_PACKAGES & set(path.relative_to(base).parts)
  )


def load_text(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """Train, validation and test bytes (``uint8``), split by file (module docstring)."""
  splits: dict[str, list[bytes]] = {"train": [], "validation": [], "test": []}
  for i, path in enumerate(stdlib_files(root)):
    split = "validation" if i % 10 == 0 else "test" if i % 10 == 5 else "train"
    splits[split].append(path.read_bytes())
  return {name: np.frombuffer(b"\n".join(parts), np.uint8) for name, parts in splits.items()}


def random_windows(data: np.ndarray, rng: np.random.Generator, count: int, length: int):
  """``count`` windows of ``length`` bytes starting at random offsets, ``(count, length)``."""
  starts = rng.integers(0, len(data) - length, count)
  return data[starts[:, None] + np.arange(length)]


def fixed_windows(data: np.ndarray, count: int, length: int) -> np.ndarray:
  """The first ``count`` non-overlapping windows of ``length`` bytes (fewer if short)."""
  count = min(count, len(data) // length)
  return data[: count * length].reshape(count, length)


# ----------------------------------------------------------------------------
# The model.


class RMSNorm(nn.Module):
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.epsilon) * scale


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embeddings on ``(batch, seq, heads, head_dim)`` (half-split pairs)."""
  seq, dim = x.shape[1], x.shape[-1]
  angles = np.arange(seq)[:, None] / (10000 ** (np.arange(0, dim, 2) / dim))[None, :]
  both = np.concatenate([angles, angles], -1)
  cos, sin = (jnp.asarray(f(both), x.dtype)[None, :, None, :] for f in (np.cos, np.sin))
  rotated = jnp.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
  return x * cos + rotated * sin


class Attention(nn.Module):
  dim: int
  heads: int
  kv_heads: int | None = None  # grouped-query attention: key-value heads (None: heads)

  @nn.compact
  def __call__(self, y):
    dense = functools.partial(nn.Dense, use_bias=False)
    head_dim = self.dim // self.heads
    kv_heads = self.heads if self.kv_heads is None else self.kv_heads
    split = lambda z: z.reshape(*z.shape[:-1], -1, head_dim)
    # Each key-value head serves heads // kv_heads consecutive query heads (Hugging Face's
    # repeat_kv).
    shared = lambda z: jnp.repeat(z, self.heads // kv_heads, axis=-2)
    q = rotary(split(dense(self.dim, name="q_proj")(y)))
    k = shared(rotary(split(dense(kv_heads * head_dim, name="k_proj")(y))))
    v = shared(split(dense(kv_heads * head_dim, name="v_proj")(y)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    causal = np.tril(np.ones((y.shape[1], y.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(y.shape)
    return dense(self.dim, name="o_proj")(mixed)


class GatedMlp(nn.Module):
  dim: int
  hidden: int

  @nn.compact
  def __call__(self, y):
    dense = functools.partial(nn.Dense, use_bias=False)
    gate = dense(self.hidden, name="gate_proj")(y)
    up = dense(self.hidden, name="up_proj")(y)
    return dense(self.dim, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  dim: int
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x, _):
    x = x + Attention(self.dim, self.heads, name="self_attn")(RMSNorm(name="input_layernorm")(x))
    y = RMSNorm(name="post_attention_layernorm")(x)
    return x + GatedMlp(self.dim, self.hidden, name="mlp")(y), None


class Decoder(nn.Module):
  """Byte-level LLaMA-style decoder; logits ``(batch, seq, 256)``."""

  dim: int = 64
  heads: int = 4
  hidden: int = 176
  depth: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.dim, name="embed_tokens")(tokens)
    layers = nn.scan(
      DecoderLayer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.depth,
    )
    x, _ = layers(self.dim, self.heads, self.hidden, name="layers")(x, None)
    return nn.Dense(256, use_bias=False, name="lm_head")(RMSNorm(name="norm")(x))


def decoder_blocks(config: dict, params) -> list[gsgd_jax.Block]:
  """The path-space blocks: ``infer_blocks(params, 'llama')``, with the queries and keys
  (their RoPE pairs the decoder's half-split ones) where the config's ``query_key`` is
  ``'half'``."""
  query_key = config.get("query_key")
  m = config["model"]
  head_dim = m["dim"] // m["heads"] if query_key in ("half", "interleaved") else None
  return gsgd_jax.infer_blocks(params, "llama", query_key=query_key, head_dim=head_dim)


def loss_fn(model: Decoder, params, windows: jax.Array) -> jax.Array:
  """Mean next-byte cross entropy (nats per byte) of ``(batch, seq + 1)`` windows."""
  logits = cast(jax.Array, model.apply({"params": params}, windows[:, :-1]))
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


# ----------------------------------------------------------------------------
# Optimizers.


def _muon_dimensions(params):
  """Muon on the stacked matrices of the decoder layers (``(depth, in, out)``: the stack a
  batch axis), Adam on the embedding, the read-out and the norms."""
  spec = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  return {
    name: jax.tree.map(lambda a: spec if a.ndim == 3 else None, sub) if name == "layers" else None
    for name, sub in params.items()
  }


def make_optimizer(kind: str, lr: float, steps: int, spec: dict, blocks):
  """``kind`` with a warm-up and cosine decay to 0 over ``steps``."""
  warmup = int(spec.get("warmup", 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), steps)
  decay = float(spec.get("weight_decay", 0.0))
  if kind == "muon":
    return optax.contrib.muon(
      schedule,
      weight_decay=decay,
      adam_weight_decay=decay,
      muon_weight_dimension_numbers=_muon_dimensions,
    )
  adamw = optax.adamw(schedule, weight_decay=decay)
  if kind == "adamw":
    return adamw
  return gsgd_jax.path_space(adamw, layers=blocks, fallback=adamw)


# ----------------------------------------------------------------------------
# Training.


def make_model(config: dict) -> Decoder:
  m = config["model"]
  return Decoder(m["dim"], m["heads"], m["hidden"], m["depth"])


def starting_params(config: dict, model: Decoder, seed: int, sample: jax.Array):
  """The params every optimizer starts from (with ``skeleton_init``, the blocks' skeleton
  weights set to 1) and the path-space blocks."""
  params = model.init(jax.random.key(seed), sample)["params"]
  blocks = decoder_blocks(config, params)
  if config.get("skeleton_init", False):
    params = gsgd_jax.set_skeleton(params, blocks)
  return params, blocks


def scan_steps(loss, tx, params, state, windows):
  """One step of ``tx`` per batch of ``windows`` (stacked on axis 0), under ``lax.scan``;
  returns ``((params, state), losses)``."""

  def step(carry, batch_windows):
    p, s = carry
    value, grads = jax.value_and_grad(loss)(p, batch_windows)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), value

  return jax.lax.scan(step, (params, state), windows)


def train_run(config: dict, opt: dict, lr: float, seed: int, text, steps: int | None = None):
  """One run; returns its curves, final validation and test losses and timing."""
  t = config["training"]
  model = make_model(config)
  steps = int(steps or t["steps"])
  seq, batch, chunk = int(t["seq"]), int(t["batch"]), int(t["curve_every"])
  rng = np.random.default_rng(seed)
  sample = jnp.asarray(random_windows(text["train"], rng, 1, seq + 1))
  params, blocks = starting_params(config, model, seed, sample)
  tx = make_optimizer(opt["kind"], lr, steps, opt, blocks)
  state = tx.init(params)
  loss = functools.partial(loss_fn, model)

  @jax.jit
  def run_chunk(params, state, windows):
    (params, state), values = scan_steps(loss, tx, params, state, windows)
    return params, state, values.mean()

  evaluate = jax.jit(loss)
  eval_windows = int(t["eval_windows"])
  val = jnp.asarray(fixed_windows(text["validation"], eval_windows, seq + 1))
  curve, val_curve = [], []
  start = time.perf_counter()
  for done in range(0, steps, chunk):
    n = min(chunk, steps - done)
    windows = random_windows(text["train"], rng, n * batch, seq + 1).reshape(n, batch, seq + 1)
    params, state, mean = run_chunk(params, state, jnp.asarray(windows))
    curve.append(float(mean))
    if (done + n) % int(t["eval_every"]) == 0 or done + n == steps:
      val_curve.append((done + n, float(evaluate(params, val))))
  seconds = time.perf_counter() - start
  test = jnp.asarray(fixed_windows(text["test"], eval_windows, seq + 1))
  return {
    "train_curve": curve,
    "validation_curve": val_curve,
    "validation_loss": val_curve[-1][1],
    "test_loss": float(evaluate(params, test)),
    "finite": bool(np.isfinite(curve[-1])),
    "seconds": seconds,
  }


def choose_lr(config, opt, text, steps, progress) -> tuple[float, dict[str, float], dict]:
  """The rate of ``opt``'s grid with the lowest final validation loss (seed 0), the grid's
  losses, and the chosen rate's run (which is seed 0's)."""
  losses, runs = {}, {}
  for lr in opt["lr_grid"]:
    runs[lr] = train_run(config, opt, lr, 0, text, steps)
    losses[str(lr)] = runs[lr]["validation_loss"] if runs[lr]["finite"] else float("inf")
    if progress:
      print(f"  {opt['name']} lr {lr}: validation {losses[str(lr)]:.4f}", flush=True)
  best = min(opt["lr_grid"], key=lambda lr: losses[str(lr)])
  return float(best), losses, runs[best]


def run_experiment(config: dict, out_dir: str | None, *, steps=None, progress=True) -> dict:
  text = load_text(config.get("text_root"))
  results: dict[str, Any] = {
    "config": config,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "bytes": {name: len(b) for name, b in text.items()},
    "optimizers": {},
  }
  for opt in config["optimizers"]:
    lr, grid, first = choose_lr(config, opt, text, steps, progress)
    runs = [
      first if seed == 0 else train_run(config, opt, lr, seed, text, steps)
      for seed in config["seeds"]
    ]
    results["optimizers"][opt["name"]] = {"lr": lr, "grid": grid, "runs": runs}
    if progress:
      losses = [r["validation_loss"] for r in runs]
      print(f"{opt['name']} lr {lr}: validation {np.mean(losses):.4f}", flush=True)
  summary = summarize(results)
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
      f.write(summary + "\n")
    plot(results, os.path.join(out_dir, "curves.png"))
  print(summary)
  return results


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} ± {values.std():.4f}"


def summarize(results: dict) -> str:
  """The table of final losses per optimizer, and paired differences from the first."""
  opts = results["optimizers"]
  names = list(opts)
  lines = [
    f"Python {results['python']} standard library, bytes {results['bytes']}; jax "
    f"{results['jax']}. Losses in nats per byte (bits per byte = nats / ln 2), mean ± std over "
    f"{len(opts[names[0]]['runs'])} seeds.",
    "",
    "| optimizer | lr (grid: validation loss) | validation loss | test loss | bits per byte "
    "(test) | seconds per run |",
    "|---|---|---|---|---|---|",
  ]
  for name in names:
    o = opts[name]
    runs = o["runs"]
    grid = ", ".join(f"{lr}: {loss:.3f}" for lr, loss in o["grid"].items())
    tests = [r["test_loss"] for r in runs]
    lines.append(
      f"| {name} | {o['lr']} ({grid}) | {_mean_std([r['validation_loss'] for r in runs])} | "
      f"{_mean_std(tests)} | {np.mean(tests) / np.log(2):.3f} | "
      f"{np.mean([r['seconds'] for r in runs]):.0f} |"
    )
  base = names[0]
  lines += ["", f"Paired differences from {base} (same seeds, same init, same batches):", ""]
  for name in names[1:]:
    diff = [
      a["test_loss"] - b["test_loss"]
      for a, b in zip(opts[name]["runs"], opts[base]["runs"], strict=True)
    ]
    lines.append(f"- {name} − {base}, test loss: {_mean_std(diff)}")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  every = int(results["config"]["training"]["curve_every"])
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for name, o in results["optimizers"].items():
    curves = np.asarray([r["train_curve"] for r in o["runs"]])
    steps = every * (np.arange(curves.shape[1]) + 1)
    left.plot(steps, curves.mean(0), label=f"{name} (lr {o['lr']})")
    val = np.asarray([[v for _, v in r["validation_curve"]] for r in o["runs"]])
    val_steps = [s for s, _ in o["runs"][0]["validation_curve"]]
    right.plot(val_steps, val.mean(0), marker="o", label=name)
  left.set(xlabel="step", ylabel="training loss (nats/byte)", yscale="log")
  right.set(xlabel="step", ylabel="validation loss (nats/byte)")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def invariance(config: dict, steps: int, dtype, lr: float = 3e-3) -> dict[str, dict[str, float]]:
  """Per optimizer, the largest differences between its runs from the start and from the
  rescaled start: of the training-loss curves, and of the validation logits at the end."""
  t = config["training"]
  text = load_text(config.get("text_root"))
  model = make_model(config)
  seq, batch = int(t["seq"]), int(t["batch"])
  rng = np.random.default_rng(0)
  windows = jnp.asarray(random_windows(text["train"], rng, steps * batch, seq + 1))
  windows = windows.reshape(steps, batch, seq + 1)
  val = jnp.asarray(fixed_windows(text["validation"], 16, seq + 1))
  params, blocks = starting_params(config, model, 0, windows[0])  # as the experiment's runs start
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(1))
  loss = functools.partial(loss_fn, model)
  adamw = optax.adamw(lr, weight_decay=0.01)
  found = {}
  for name, tx in (
    ("AdamW", adamw),
    ("path_space(AdamW)", gsgd_jax.path_space(adamw, layers=blocks, fallback=adamw)),
  ):

    @jax.jit
    def train(p, tx=tx):
      (p, _), values = scan_steps(loss, tx, p, tx.init(p), windows)
      return values, model.apply({"params": p}, val[:, :-1])

    (curve_a, logits_a), (curve_b, logits_b) = train(params), train(rescaled)
    found[name] = {
      "loss_curve_gap": float(jnp.max(jnp.abs(curve_a - curve_b))),
      "logit_gap": float(jnp.max(jnp.abs(logits_a - logits_b))),
      "final_loss": float(curve_a[-10:].mean()),
    }
  return found


def main_invariance(config: dict, steps: int, out_dir: str | None) -> str:
  lines = [
    f"{steps} steps of AdamW (lr 3e-3) from the decoder's start and from a random positive "
    "rescaling of its chains' hidden nodes, same batches; largest differences between the "
    "two runs:",
    "",
    "| precision | optimizer | loss curves | validation logits at the end | final loss |",
    "|---|---|---|---|---|",
  ]
  for dtype, name in ((jnp.float32, "float32"), (jnp.float64, "float64")):
    with jax.enable_x64(dtype == jnp.float64):
      for opt, gap in invariance(config, steps, dtype).items():
        lines.append(
          f"| {name} | {opt} | {gap['loss_curve_gap']:.1e} | {gap['logit_gap']:.1e} | "
          f"{gap['final_loss']:.3f} |"
        )
  text = "\n".join(lines)
  print(text)
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "invariance.md"), "w") as f:
      f.write(text + "\n")
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", help="directory for results.json, summary.md and curves.png")
  parser.add_argument("--steps", type=int, help="override the config's steps (smoke runs)")
  parser.add_argument("--invariance", action="store_true", help="the rescaling comparison")
  args = parser.parse_args(argv)
  with open(args.config, "rb") as f:
    config = tomllib.load(f)
  if args.invariance:
    main_invariance(config, args.steps or 100, args.out)
  else:
    run_experiment(config, args.out, steps=args.steps)


if __name__ == "__main__":
  sys.exit(main())
