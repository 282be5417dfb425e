"""Rescaling invariance (docs/math.md, why any elementwise optimizer stays invariant) of every
optimizer of the table and of two compositions; the fallback; float32; the train step's memory."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import USER_PIPELINE, train_scan
from problems import OPTIMIZERS, make_optimizer, mlp

import gsgd_jax

# A chain of unequal widths; skeleton set, 32 samples, random targets.
WIDTHS = (6, 9, 7, 8, 3)
_mlp = functools.partial(mlp, WIDTHS, skeleton=True)
STEPS = 25


def _train(tx, params, loss, steps=STEPS, observe=None):
  (params, state), trace = train_scan(tx, params, loss, steps, observe)
  return params, state, trace


# Every optimizer of the table, and path-space compositions the table does not hold: a
# schedule, and a chain whose clipping reads the global norm of the path gradients.
MAKERS = {
  **{name: functools.partial(make_optimizer, name) for name in OPTIMIZERS},
  "gsgd_schedule": lambda layers: gsgd_jax.gsgd(
    optax.exponential_decay(0.05, 5, 0.7), layers=layers
  ),
  "g_clipped_sgd": lambda layers: gsgd_jax.path_space(
    optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05)), layers=layers
  ),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_rescaling_invariance(name):
  params, layers, loss, forward, x, *_ = _mlp()
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(7))
  tx = MAKERS[name](layers)
  outputs = lambda p: forward(p, x)
  final, state_a, out_a = _train(tx, params, loss, observe=outputs)
  _, state_b, out_b = _train(tx, rescaled, loss, observe=outputs)
  if name != "path_sgd":  # Path-SGD steps in weight space: it has no ratio guard
    assert int(state_a.total_clipped_ratios) == int(state_b.total_clipped_ratios) == 0
  # Training really changed the function, and both runs agree at every step.
  assert float(loss(final)) < 0.9 * float(loss(params))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)


def test_plain_sgd_is_not_invariant():
  params, layers, loss, forward, x, *_ = _mlp()
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(7))
  outputs = lambda p: forward(p, x)
  np.testing.assert_allclose(outputs(params), outputs(rescaled), rtol=1e-12, atol=1e-12)
  _, _, out_a = _train(optax.sgd(0.05), params, loss, observe=outputs)
  _, _, out_b = _train(optax.sgd(0.05), rescaled, loss, observe=outputs)
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 0.1


def test_gsgd_is_path_space_sgd():
  params, layers, loss, forward, x, *_ = _mlp()
  outputs = lambda p: forward(p, x)
  a = _train(gsgd_jax.gsgd(0.05, layers=layers), params, loss, observe=outputs)[2]
  b = _train(gsgd_jax.path_space(optax.sgd(0.05), layers=layers), params, loss, observe=outputs)[2]
  np.testing.assert_array_equal(a, b)


def test_leaves_outside_layers_follow_the_fallback():
  params, layers, loss, *_ = _mlp()
  params["scale"] = jnp.ones(3)
  full_loss = lambda p: loss(p) + jnp.sum((p["scale"] - 2.0) ** 2)
  grads = jax.grad(full_loss)(params)
  chain_only = {k: v for k, v in params.items() if k != "scale"}
  tx = gsgd_jax.gsgd(0.05, layers=layers)
  want, _ = tx.update({k: grads[k] for k in chain_only}, tx.init(chain_only), chain_only)

  # Default: the inner transformation (here SGD at 0.05) on the ordinary gradient.
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["scale"], -0.05 * grads["scale"], rtol=1e-14)
  frozen = gsgd_jax.gsgd(0.05, layers=layers, fallback=optax.set_to_zero())
  updates_frozen, _ = frozen.update(grads, frozen.init(params), params)
  np.testing.assert_array_equal(updates_frozen["scale"], 0.0)
  for got in (updates, updates_frozen):
    chex.assert_trees_all_close(want, {k: got[k] for k in chain_only}, rtol=1e-14)

  # optax.partition routes the same way.
  labels = {k: ("chain" if k.startswith("Dense") else "rest") for k in params}
  routed = optax.partition({"chain": tx, "rest": optax.sgd(0.1)}, labels)
  updates, _ = routed.update(grads, routed.init(params), params)
  np.testing.assert_allclose(updates["scale"], -0.1 * grads["scale"])
  chex.assert_trees_all_close(want, {k: updates[k] for k in chain_only}, rtol=1e-14)


def test_float32_update_matches_float64():
  params, layers, loss, *_ = _mlp()
  tx = gsgd_jax.gsgd(0.05, layers=layers)
  grads = jax.grad(loss)(params)
  want, _ = tx.update(grads, tx.init(params), params)
  to32 = functools.partial(jax.tree.map, lambda a: a.astype(jnp.float32))
  got, _ = tx.update(to32(grads), tx.init(to32(params)), to32(params))
  scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(want))
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def _step_temp_bytes(tx, params, loss):
  """Bytes of temporaries XLA allots to one jitted train step."""

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, compiler_options=USER_PIPELINE)
  compiled = step.lower(params, tx.init(params)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _conv_net(head):
  """Wide convolutions on small images, so that kernels outweigh activations: two
  3x3 convolutions of 256 channels and global pooling (``head='pool'``), or one of
  32 channels flattened into a dense layer of 512 (``head='flatten'``)."""
  keys = jax.random.split(jax.random.key(0), 3)
  channels = (8, 256, 256) if head == "pool" else (8, 32)
  convs = [f"Conv_{k}" for k in range(len(channels) - 1)]
  params = {
    name: {"kernel": jax.random.normal(keys[0], (3, 3, c_in, c_out)) / 30, "bias": jnp.zeros(c_out)}
    for name, c_in, c_out in zip(convs, channels, channels[1:], strict=False)
  }
  dense = [256, 10] if head == "pool" else [4 * 4 * 32, 512, 10]
  for k, (n_in, n_out) in enumerate(itertools.pairwise(dense)):
    params[f"Dense_{k}"] = {"kernel": jax.random.normal(keys[k + 1], (n_in, n_out)) / n_in}
  layers = [(name,) for name in (*convs, *(f"Dense_{k}" for k in range(len(dense) - 1)))]
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))

  def loss(p):
    h = x
    for name in convs:
      h = jax.lax.conv_general_dilated(
        h, p[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      h = jax.nn.relu(h + p[name]["bias"])
    h = h.mean(axis=(1, 2)) if head == "pool" else h.reshape(len(h), -1)
    for k in range(len(dense) - 1):
      h = h @ p[f"Dense_{k}"]["kernel"]
      h = jax.nn.relu(h) if k < len(dense) - 2 else h
    return jnp.mean(h**2)

  return gsgd_jax.set_skeleton(params, layers), layers, loss


# Every optimizer of the table but g_rmsprop, which keeps one kernel-sized temporary: XLA
# materialises rsqrt(nu), which both the skeleton-edge gather and the kernel pass read.
IN_PLACE = sorted(set(OPTIMIZERS) - {"g_rmsprop"})


@pytest.mark.parametrize("name", IN_PLACE)
@pytest.mark.parametrize("net", ["mlp", "mlp2", "cnn", "flatten"])
def test_train_step_holds_no_kernel_sized_temporary(name, net):
  # The update reads each gradient once, elementwise and in its own shape, so XLA
  # can write the new kernel into the gradient's buffer, as it does for SGD; one
  # more kernel-sized temporary than SGD's would mean an extra allocation (and,
  # for big kernels, fresh pages) every step.
  if net.startswith("mlp"):
    # Three layers: per-node vectors in tables; two: in lists (basis.LISTED_LEVELS).
    widths = (64, 512, 512, 10) if net == "mlp" else (64, 512, 256)
    params, layers, loss, *_ = mlp(widths, dtype=jnp.float32, skeleton=True)
  else:
    params, layers, loss = _conv_net("pool" if net == "cnn" else "flatten")
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
  sgd_temp = _step_temp_bytes(optax.sgd(0.1), params, loss)
  temp = _step_temp_bytes(make_optimizer(name, layers), params, loss)
  assert temp < sgd_temp + largest / 2, (temp, sgd_temp, largest)


@pytest.mark.parametrize("model", ["relu", "llama"])
def test_scanned_transformer_step_holds_no_kernel_sized_temporary_beyond_adamw(model):
  # path_space(AdamW) on the stacked feed-forward blocks of a scanned transformer (and on the
  # gated blocks and the multi-axis value/output chains of a LLaMA-style one): the vmapped
  # update still reads each stacked kernel once, in its own shape.
  from benchmarks import transformer_speed as ts

  c = ts.Config(depth=2, dim=64, hidden=256, heads=2, vocab=32, seq=8, batch=2, model=model)
  params, _ = ts.problem(c)
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
  adamw, path = (
    ts.temp_bytes(ts.compiled_step(name, c, USER_PIPELINE)[0]) for name in ts.OPTIMIZERS
  )
  assert path < adamw + largest / 2, (path, adamw, largest)


@pytest.mark.slow  # the LLaMA decoder's memory test above runs in `make test`
def test_grouped_query_decoder_step_holds_no_kernel_sized_temporary_beyond_adamw():
  # Grouped-query attention: the passes over the grouped output and query kernels still
  # read each kernel once, in its own shape.
  import corpus

  config = corpus.LlamaConfig(d=64, heads=8, kv_heads=2, hidden=128)
  model, tokens = corpus.Llama(config, scanned=True), jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  blocks = gsgd_jax.infer_blocks(params, "llama", query_key="half", head_dim=config.head_dim)
  params = gsgd_jax.set_skeleton(params, blocks)
  loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
  adamw = optax.adamw(1e-3)
  path = _step_temp_bytes(gsgd_jax.path_space(adamw, layers=blocks, fallback=adamw), params, loss)
  assert path < _step_temp_bytes(adamw, params, loss) + largest / 2, (path, largest)
