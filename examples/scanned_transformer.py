"""AdamW in path space on a scanned pre-LN transformer with ReLU feed-forward blocks.

What it shows: a small byte-level language model whose layers run under ``nn.scan``,
so each parameter of a layer holds the copies of all layers on axis 0 (kernels
``(layers, in, out)``). Its path-space blocks are written from the parameter names and
shapes: ``infer_blocks(params, "preln")`` gives each layer's ``LayerNorm -> fc1 ->
ReLU -> fc2`` as one block stacked on axis 0, and ``infer_blocks(params, "llama")``
adds each attention's chain through the value dimensions of its heads (``[value,
out]``: Flax's ``MultiHeadDotProductAttention`` holds that symmetry with no ReLU at
all). ``path_space(optax.adamw(...))`` trains those blocks, all layers in one
vectorised update; AdamW trains everything else (embeddings, the attention's queries
and keys, the other norms, the read-out).

Why: inside those chains the function does not change when a hidden unit's incoming
weights are multiplied by ``c > 0`` and its outgoing weights divided by ``c``. AdamW
on the weights depends on such a rescaling of the start; AdamW on the basis-path
values does not. ``verify_invariance`` checks the declaration once before training:
it would catch, for instance, a GELU where the feed-forward block assumes a ReLU.

The text: the Python standard library's own ``.py`` files, read as bytes (every
machine that runs this has them), every tenth file held out for validation.

    python examples/scanned_transformer.py           # 300 steps each: 1-2 minutes
    python examples/scanned_transformer.py --tiny    # a smoke run, as CI runs it
"""

from __future__ import annotations

import argparse
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


class TransformerLayer(nn.Module):
  """Pre-LN: ``x + attn(LN(x))``, then ``x + fc2(relu(fc1(LN(x))))``."""

  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(name="ln_attn")(x)
    causal = nn.make_causal_mask(y[..., 0])
    attention = nn.MultiHeadDotProductAttention(self.heads, name="attn")
    x = x + attention(y, mask=causal)
    y = nn.relu(nn.Dense(self.hidden, name="fc1")(nn.LayerNorm(name="ln_ff")(x)))
    return x + nn.Dense(x.shape[-1], name="fc2")(y), None


class Transformer(nn.Module):
  """Byte-level causal language model; logits ``(batch, seq, 256)``."""

  dim: int
  heads: int
  hidden: int
  depth: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(256, self.dim, name="embed")(tokens)
    init = nn.initializers.normal(0.02)
    positions = self.param("positions", init, (self.context, self.dim))
    x = x + positions[: tokens.shape[1]]
    layers = nn.scan(
      TransformerLayer,
      variable_axes={"params": 0},  # every layer's parameters stacked on axis 0
      split_rngs={"params": True},
      length=self.depth,
    )
    x, _ = layers(self.heads, self.hidden, name="layers")(x, None)
    return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_out")(x))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
  args = parser.parse_args(argv)
  dim, heads, hidden, depth = (32, 2, 64, 2) if args.tiny else (64, 4, 256, 4)
  # Bytes per window, windows per batch, training steps, steps of the rescaling check.
  seq, batch, steps, short = (32, 8, 30, 10) if args.tiny else (128, 16, 300, 20)

  text = load_text()
  rng = np.random.default_rng(0)

  def windows(split: str, count: int) -> jax.Array:
    """``count`` windows of ``seq + 1`` bytes at random offsets of ``split``."""
    starts = rng.integers(0, len(text[split]) - seq - 1, count)
    return jnp.asarray(text[split][starts[:, None] + np.arange(seq + 1)])

  model = Transformer(dim, heads, hidden, depth, context=seq)
  sample = windows("train", batch)
  # One compiled init instead of one small program per parameter.
  params = jax.jit(model.init)(jax.random.key(0), sample[:, :-1])["params"]
  feed_forward = gsgd_jax.infer_blocks(params, "preln")  # LN -> fc1 -> ReLU -> fc2
  attention = gsgd_jax.infer_blocks(params, "llama")  # value -> out, through the heads
  blocks = feed_forward + attention
  for block in blocks:
    print(block)

  apply = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
  worst = gsgd_jax.verify_invariance(apply, params, blocks, sample[:2, :-1])
  print(f"verify_invariance: largest output change {worst:.1e}")
  # Flax's init makes every path value a product of small weights; from skeleton
  # weights 1 each starts at the size of one weight.
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
  optimizers = {
    "path_space(AdamW)": gsgd_jax.path_space(adamw, layers=blocks, fallback=adamw),
    "AdamW": adamw,  # for comparison, from the same start, on the same batches
  }
  batches = [windows("train", batch) for _ in range(steps)]
  validation = windows("validation", 4 * batch)
  evaluate = jax.jit(loss_fn)
  before = float(evaluate(params, validation))
  print(f"validation loss at the start: {before:.3f} nats per byte")
  # The same function: every hidden node of every block rescaled by its own factor.
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(1))
  gaps = {}
  for name, tx in optimizers.items():
    train = make_train(tx)
    start = time.perf_counter()
    trained, losses = train(params, batches)
    seconds = time.perf_counter() - start
    after = float(evaluate(trained, validation))
    curve = ", ".join(f"{c.mean():.3f}" for c in np.array_split(losses, 4))
    # A few steps from both starts: how far apart their predictions end.
    few = batches[:short]
    a, b = (apply(train(p, few)[0], validation[:, :-1]) for p in (params, rescaled))
    gaps[name] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    print(
      f"{name}: train loss by quarter {curve}; validation {after:.3f} nats per byte "
      f"({after / np.log(2):.2f} bits); {seconds:.1f} s with compilation\n"
      f"  {short} steps from the start and from a rescaled start: logits "
      f"{gaps[name]:.0e} apart (relative)"
    )
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < first and after < before, (name, first, last, before, after)
  # Float32 rounding grows over the steps too, but far slower than a dependence.
  assert gaps["path_space(AdamW)"] < 1e-2, gaps
  assert gaps["AdamW"] > 30 * gaps["path_space(AdamW)"], gaps


if __name__ == "__main__":
  main()
