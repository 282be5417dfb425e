"""The divisions of every block with one hidden level done together (``all_blocks``,
``basis.divide_together``): the update each block gets alone, with its clipped ratios
counted."""

from __future__ import annotations

import chex
import corpus
import jax
import jax.numpy as jnp
import optax
import pytest
import reference as ref
from problems import make_mlp

import gsgd_jax
from gsgd_jax._src import all_blocks, basis


def _mixed_problem():
  """Blocks of every kind side by side: a one-layer LLaMA's chains (one hidden level, one
  copy, float32), a T5's scanned ones (copies on axis 1, float64), and a three-layer MLP
  (two hidden levels, divided alone)."""
  tokens = jnp.arange(16).reshape(2, 8) % 40
  llama = corpus.Llama(corpus.LlamaConfig(layers=1))
  t5 = corpus.ScannedT5(corpus.T5Config(layers=2, gated=True))
  llama_params = llama.init(jax.random.key(0), tokens)["params"]
  t5_params = t5.init(jax.random.key(1), tokens)["params"]
  t5_params = jax.tree.map(lambda x: x.astype(jnp.float64), t5_params)
  mlp, mlp_layers = make_mlp(jax.random.key(2), (3, 5, 4, 2), layer_names=["m0", "m1", "m2"])
  params = {**llama_params, **t5_params, **mlp}
  blocks = [
    *corpus.llama_blocks(llama),
    *gsgd_jax.infer_blocks(t5_params, "llama"),
    mlp_layers,
  ]
  x = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)

  def loss(p):
    def own(q, names):
      return {name: q[name] for name in names}

    lm = jnp.mean(llama.apply({"params": own(p, llama_params)}, tokens) ** 2)
    encoder = jnp.mean(t5.apply({"params": own(p, t5_params)}, tokens) ** 2)
    regression = jnp.mean(ref.forward(own(p, mlp), mlp_layers, x) ** 2)
    return lm + encoder + regression

  return gsgd_jax.set_skeleton(params, blocks), blocks, loss


@pytest.fixture(scope="module")
def mixed():
  return _mixed_problem()


def _train(params, blocks, loss, steps=3):
  # Tight bounds, so that some ratios are clipped and counted.
  tx = gsgd_jax.path_space(optax.adam(0.05), layers=blocks, ratio_clip=(0.95, 1.05))
  state = tx.init(params)
  step = jax.jit(tx.update)
  counts = []
  for _ in range(steps):
    updates, state = step(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    counts.append(int(state.clipped_ratios))
  return params, counts


def test_divided_together_the_blocks_take_the_steps_they_take_alone(mixed, monkeypatch):
  params, blocks, loss = mixed
  together = basis.divide_together
  batches = []

  def recording(requests):
    batches.append(len(requests))
    return together(requests)

  monkeypatch.setattr(basis, "divide_together", recording)
  joined, joined_counts = _train(params, blocks, loss)
  # The LLaMA's two chains and the T5's two, in one call for the ICR and one for the WA
  # (each dividing float32 and float64 apart); the MLP's divisions are its own.
  assert batches == [4, 4]
  monkeypatch.setattr(all_blocks, "_together", lambda _blocks: [])
  alone, alone_counts = _train(params, blocks, loss)
  assert 1 in batches and 4 not in batches[2:]
  assert joined_counts == alone_counts and sum(joined_counts) > 0, joined_counts
  chex.assert_trees_all_close(joined, alone, rtol=1e-6, atol=1e-7)
  # Three steps moved the params: the comparison is not of two starts.
  assert float(optax.tree.norm(optax.tree.sub(alone, params))) > 1e-2


def test_divide_together_groups_by_dtype_and_copies():
  def request(shape, dtype, value):
    numerators = [jnp.full(shape, value, dtype), jnp.full(shape, 1.0, dtype)]
    return numerators, [jnp.full(shape, 2.0, dtype)] * 2

  requests = [
    request((5,), jnp.float32, 1.0),
    request((3, 4), jnp.float32, 3.0),  # copies on a leading axis
    request((2,), jnp.float64, 5.0),
    request((6,), jnp.float32, 7.0),
  ]
  columns, tables = basis.divide_together(requests)
  # One table per dtype and leading shape: float32 single copies (5 + 6 nodes), float32
  # three copies, float64.
  assert sorted((t.shape, str(t.dtype)) for t in tables) == sorted(
    [((11, 2), "float32"), ((3, 4, 2), "float32"), ((2, 2), "float64")]
  )
  for (numerators, divisors), got in zip(requests, columns, strict=True):
    want = [n / d for n, d in zip(numerators, divisors, strict=True)]
    chex.assert_trees_all_equal(got, want)
  # Requests of different numbers of quantities are divided apart.
  short = ([jnp.ones(4)], [jnp.full(4, 4.0)])
  columns, tables = basis.divide_together([requests[0], short])
  assert [t.shape for t in tables] == [(5, 2), (4, 1)]
  chex.assert_trees_all_equal(columns[1], [jnp.full(4, 0.25)])
