"""AdamW in path space on a LLaMA-style decoder: gated feed-forward blocks, RoPE.

What it shows: a byte-level decoder built like LLaMA 3 (RMSNorm, rotary position
embeddings, causal grouped-query attention, SwiGLU feed-forward blocks, no biases,
Hugging Face's names ``self_attn/{q,k,v,o}_proj`` and ``mlp/{gate,up,down}_proj``),
its layers under ``nn.scan``, trained with ``path_space(optax.adamw(...))``. There is
no ReLU in it, yet it holds exact rescaling symmetries, and ``infer_blocks(params,
"llama", query_key="half", head_dim=...)`` declares them, per layer and stacked on the
scan axis:

- ``[up_proj, down_proj]``: the gate only multiplies each hidden unit of that chain;
- ``[v_proj, o_proj]``: a chain through the value dimensions of every key-value head;
  each serves two query heads (grouped-query attention), so ``o_proj`` groups its
  query heads two by two (``kv_heads``);
- ``[q_proj, k_proj^T]``: the attention logits stay put when a query dimension is
  multiplied by ``c`` and the matching key dimension divided by ``c``; RoPE rotates
  pairs of dimensions, so each pair shares one factor, and the names cannot say which
  dimensions pair up: ``query_key="half"`` (Hugging Face's ``rotate_half``, as here)
  or ``"interleaved"`` (Meta's and GPT-J's adjacent pairs); ``q_proj`` groups its
  query heads as ``o_proj`` does.

AdamW takes the rest: the gate, the norms, the embedding and the read-out.

Why: AdamW on the weights trains differently from a start whose chains were rescaled
(the same function); AdamW on the basis-path values does not. The script checks both
claims, and shows ``verify_invariance`` refusing the wrong RoPE pairing before any
training: the mistake that names alone cannot catch.

The text: the Python standard library's own ``.py`` files, read as bytes (every
machine that runs this has them), every tenth file held out for validation.

    python examples/llama_decoder.py           # 300 steps: a minute or two
    python examples/llama_decoder.py --tiny    # a smoke run, as CI runs it
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax


def load_text() -> dict[str, np.ndarray]:
  """The bytes of the standard library's top-level ``.py`` files, split by file."""
  files = sorted(pathlib.Path(os.__file__).parent.glob("*.py"))
  splits = {"train": [], "validation": []}
  for i, path in enumerate(files):
    splits["validation" if i % 10 == 0 else "train"].append(path.read_bytes())
  return {k: np.frombuffer(b"\n".join(v), np.uint8) for k, v in splits.items()}


def rope(x: jax.Array) -> jax.Array:
  """Rotary position embeddings of ``(batch, seq, heads, head_dim)``, Hugging Face's
  ``rotate_half`` form: dimension ``j`` turns with ``j + head_dim / 2``."""
  seq, dim = x.shape[1], x.shape[-1]
  angles = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(0, dim, 2) / dim)
  angles = np.concatenate([angles, angles], -1)[None, :, None, :]
  cos, sin = jnp.asarray(np.cos(angles), x.dtype), jnp.asarray(np.sin(angles), x.dtype)
  rotated = jnp.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
  return x * cos + rotated * sin


class Attention(nn.Module):
  heads: int
  kv_heads: int  # grouped-query attention: each key-value head serves heads // kv_heads
  head_dim: int

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, use_bias=False)
    split = lambda y: y.reshape(*y.shape[:-1], -1, self.head_dim)
    # Query head h reads key-value head h // (heads // kv_heads) (Hugging Face's
    # repeat_kv).
    shared = lambda y: jnp.repeat(y, self.heads // self.kv_heads, axis=-2)
    q = rope(split(dense(self.heads * self.head_dim, name="q_proj")(x)))
    k = shared(rope(split(dense(self.kv_heads * self.head_dim, name="k_proj")(x))))
    v = shared(split(dense(self.kv_heads * self.head_dim, name="v_proj")(x)))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:-1], -1)
    return nn.Dense(x.shape[-1], use_bias=False, name="o_proj")(mixed)


class GatedFeedForward(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, use_bias=False)
    gate = dense(self.hidden, name="gate_proj")(x)
    up = dense(self.hidden, name="up_proj")(x)
    return dense(x.shape[-1], name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  heads: int
  kv_heads: int
  head_dim: int
  hidden: int

  @nn.compact
  def __call__(self, x, _):
    y = nn.RMSNorm(name="input_layernorm")(x)
    x = x + Attention(self.heads, self.kv_heads, self.head_dim, name="self_attn")(y)
    y = nn.RMSNorm(name="post_attention_layernorm")(x)
    return x + GatedFeedForward(self.hidden, name="mlp")(y), None


class Decoder(nn.Module):
  """Byte-level decoder; logits ``(batch, seq, 256)``."""

  dim: int
  heads: int
  kv_heads: int
  hidden: int
  depth: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.dim, name="embed_tokens")(tokens)
    layers = nn.scan(
      DecoderLayer,
      variable_axes={"params": 0},  # every layer's parameters stacked on axis 0
      split_rngs={"params": True},
      length=self.depth,
    )
    head_dim = self.dim // self.heads
    layer = layers(self.heads, self.kv_heads, head_dim, self.hidden, name="layers")
    x, _ = layer(x, None)
    x = nn.RMSNorm(name="norm")(x)
    return nn.Dense(256, use_bias=False, name="lm_head")(x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
  args = parser.parse_args(argv)
  dim, heads, hidden, depth = (32, 2, 64, 2) if args.tiny else (64, 4, 176, 4)
  kv_heads = heads // 2
  # Bytes per window, windows per batch, training steps, steps of the rescaling check.
  seq, batch, steps, short = (32, 8, 30, 10) if args.tiny else (128, 16, 300, 20)
  head_dim = dim // heads

  text = load_text()
  rng = np.random.default_rng(0)

  def windows(split: str, count: int) -> jax.Array:
    """``count`` windows of ``seq + 1`` bytes at random offsets of ``split``."""
    starts = rng.integers(0, len(text[split]) - seq - 1, count)
    return jnp.asarray(text[split][starts[:, None] + np.arange(seq + 1)])

  model = Decoder(dim, heads, kv_heads, hidden, depth)
  sample = windows("train", batch)[:, :-1]
  # One compiled init instead of one small program per parameter.
  params = jax.jit(model.init)(jax.random.key(0), sample)["params"]
  # The projections keep all heads on one axis, (dim, heads * head_dim): head_dim
  # tells where each head's RoPE pairs lie, and which query heads share a key-value
  # head.
  declare = functools.partial(gsgd_jax.infer_blocks, params, "llama", head_dim=head_dim)
  blocks = declare(query_key="half")
  for block in blocks:
    print(block)

  apply = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
  worst = gsgd_jax.verify_invariance(apply, params, blocks, sample[:2])
  print(f"verify_invariance: largest output change {worst:.1e}")
  wrong = declare(query_key="interleaved")  # Meta's adjacent pairs: not this model's
  try:
    gsgd_jax.verify_invariance(apply, params, wrong, sample[:2])
  except ValueError as refusal:
    print(f"with query_key='interleaved' instead: {str(refusal).split('. ')[0]}")
  else:
    raise AssertionError("verify_invariance accepted RoPE pairs this model lacks")
  # From Flax's init every path value is a product of two small weights, and AdamW
  # in path space, whose steps on them are of the size of its rate, barely trains.
  params = gsgd_jax.set_skeleton(params, blocks)

  def loss_fn(p, tokens):
    logits = apply(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def make_train(tx):
    """A function that trains params with ``tx`` on batches, stepping under jit."""

    @jax.jit
    def step(p, state, tokens):
      value, grads = jax.value_and_grad(loss_fn)(p, tokens)
      updates, state = tx.update(grads, state, p)  # params are required
      return optax.apply_updates(p, updates), state, value

    def train(params, batches):
      state = tx.init(params)
      losses = []
      for tokens in batches:
        params, state, value = step(params, state, tokens)
        losses.append(float(value))
      return params, np.asarray(losses)

    return train

  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)
  adamw = optax.adamw(schedule, weight_decay=0.01)
  path_adamw = gsgd_jax.path_space(adamw, layers=blocks, fallback=adamw)
  # AdamW on the weights only for the rescaling check below.
  trainers = {"path_space(AdamW)": make_train(path_adamw), "AdamW": make_train(adamw)}
  batches = [windows("train", batch) for _ in range(steps)]
  validation = windows("validation", 4 * batch)
  evaluate = jax.jit(loss_fn)
  before = float(evaluate(params, validation))

  start = time.perf_counter()
  trained, losses = trainers["path_space(AdamW)"](params, batches)
  seconds = time.perf_counter() - start
  after = float(evaluate(trained, validation))
  curve = ", ".join(f"{c.mean():.3f}" for c in np.array_split(losses, 4))
  print(
    f"path_space(AdamW), {steps} steps of {batch} x {seq} bytes ({seconds:.1f} s with "
    f"compilation):\n  train loss by quarter {curve}; validation {before:.3f} -> "
    f"{after:.3f} nats per byte ({after / np.log(2):.2f} bits)"
  )
  first, last = losses[:10].mean(), losses[-10:].mean()
  assert last < first and after < before, (first, last, before, after)

  # The same function: every hidden node of every chain rescaled by its own factor.
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(1))
  gaps = {}
  for name, train in trainers.items():
    few = batches[:short]
    a, b = (apply(train(p, few)[0], validation[:, :-1]) for p in (params, rescaled))
    gaps[name] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    print(
      f"{name}, {short} steps from the start and from a rescaled start: logits "
      f"{gaps[name]:.0e} apart (relative)"
    )
  # Float32 rounding grows over the steps too, but far slower than a dependence.
  assert gaps["path_space(AdamW)"] < 1e-2, gaps
  assert gaps["AdamW"] > 30 * gaps["path_space(AdamW)"], gaps


if __name__ == "__main__":
  main()
