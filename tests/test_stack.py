"""Stacked blocks (docs/math.md, stacked layers): S copies of a chain on one axis of every
leaf of its layers (Flax ``nn.scan``, ``nnx.vmap``), updated as S blocks declared one by one,
in one vectorised program; pre-LN feed-forward stacks on tokens ``(batch, seq, d)``."""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import USER_PIPELINE, orbax_roundtrip, train_nnx, train_scan
from problems import NORM_EPSILON, OPTIMIZERS, linen_norm, make_optimizer, shift_biases

import gsgd_jax
from gsgd_jax import probes
from gsgd_jax._src import basis
from gsgd_jax._src.structure import UnsupportedLayerError, build_structure

COPIES, D, HIDDEN, BATCH, SEQ = 3, 4, 6, 2, 5
TOKENS = (BATCH, SEQ, D)

# ----------------------------------------------------------------------------
# Models: a pre-LN feed-forward stack x + fc2(relu(fc1(LN(x)))) on tokens, in Linen
# (nn.scan, the stack on axis 0 or 1) and NNX (nnx.vmap + nnx.scan), and a scanned residual
# block of convolutions with BatchNorm.


class _FeedForward(nn.Module):
  dense: type = nn.Dense  # of fc1: or probes.Dense
  norm: bool = True

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(epsilon=NORM_EPSILON, name="ln")(x) if self.norm else x
    y = nn.relu(self.dense(HIDDEN, name="fc1")(y))
    return x + nn.Dense(D, name="fc2")(y), None


class ScannedFeedForward(nn.Module):
  """``COPIES`` feed-forward blocks by ``nn.scan``, their params stacked on ``axis``."""

  axis: int = 0
  dense: type = nn.Dense
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      _FeedForward,
      variable_axes={"params": self.axis},
      split_rngs={"params": True},
      length=COPIES,
      in_axes=nn.broadcast,
    )
    x, _ = stack(self.dense, self.norm, name="layers")(x, None)
    return nn.Dense(2, name="head")(x)


def scanned_blocks(model: ScannedFeedForward):
  names = ["layers/ln", "layers/fc1", "layers/fc2"] if model.norm else ["layers/fc1", "layers/fc2"]
  return [gsgd_jax.Block(names, stack_axis=model.axis)]


class _NNXFeedForward(nnx.Module):
  def __init__(self, rngs):
    dtype = {"param_dtype": jnp.float64}
    self.ln = nnx.LayerNorm(D, epsilon=NORM_EPSILON, rngs=rngs, **dtype)
    self.fc1 = nnx.Linear(D, HIDDEN, rngs=rngs, **dtype)
    self.fc2 = nnx.Linear(HIDDEN, D, rngs=rngs, **dtype)

  def __call__(self, x):
    return x + self.fc2(nnx.relu(self.fc1(self.ln(x))))


class NNXScannedFeedForward(nnx.Module):
  """The same stack in NNX: blocks made by ``nnx.vmap``, run by ``nnx.scan``."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=COPIES)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXFeedForward(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 2, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(x, self.blocks))


NNX_BLOCKS = [gsgd_jax.Block(["blocks/ln", "blocks/fc1", "blocks/fc2"], stack_axis=0)]


class _ConvBlock(nn.Module):
  """``x + BN(conv2(relu(BN(conv1(x)))))`` in training mode."""

  @nn.compact
  def __call__(self, x, _):
    norm = functools.partial(nn.BatchNorm, use_running_average=False, epsilon=NORM_EPSILON)
    y = norm(name="bn1")(nn.Conv(3, (3, 3), name="conv1")(x))
    y = norm(name="bn2")(nn.Conv(3, (3, 3), name="conv2")(nn.relu(y)))
    return x + y, None


class ScannedConvBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      _ConvBlock,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True},
      length=COPIES,
      in_axes=nn.broadcast,
    )
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


CONV_BN_BLOCKS = [
  gsgd_jax.Block(["layers/conv1"], normalized=True, stack_axis=0),
  gsgd_jax.Block(["layers/bn1", "layers/conv2"], normalized=True, stack_axis=0),
]


def _nnx_problem(seed=0):
  """The NNX stack as a NormProblem-like tuple on pure dicts: (params, layers, loss)."""
  model = NNXScannedFeedForward(nnx.Rngs(seed))
  graphdef, state = nnx.split(model, nnx.Param)
  params = shift_biases(
    gsgd_jax.set_skeleton(nnx.to_pure_dict(state), NNX_BLOCKS)  # type: ignore[arg-type]
  )
  x = jax.random.normal(jax.random.key(seed + 1), TOKENS, jnp.float64)
  y = jax.random.normal(jax.random.key(seed + 2), (BATCH, SEQ, 2), jnp.float64)

  def loss(p):
    nnx.replace_by_pure_dict(state, p)
    return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)

  return params, NNX_BLOCKS, loss


PROBLEMS = {
  "linen": lambda: linen_norm(ScannedFeedForward(), scanned_blocks(ScannedFeedForward()), TOKENS),
  "linen_axis1": lambda: linen_norm(
    ScannedFeedForward(axis=1), scanned_blocks(ScannedFeedForward(axis=1)), TOKENS
  ),
  "linen_probes": lambda: linen_norm(
    ScannedFeedForward(dense=probes.Dense), scanned_blocks(ScannedFeedForward()), TOKENS
  ),
  "linen_dense": lambda: linen_norm(
    ScannedFeedForward(norm=False), scanned_blocks(ScannedFeedForward(norm=False)), TOKENS
  ),
  "conv_bn": lambda: linen_norm(ScannedConvBN(), CONV_BN_BLOCKS, (4, 5, 5, 3)),
  "nnx": lambda: _nnx_problem()[:3],
}

# ----------------------------------------------------------------------------
# Stacked against unrolled: each copy of every stacked layer taken out into a tree of its own
# (`copy{i}/...`), declared as one block per copy.


def _stacked_leaves(blocks):
  """``{leaf path: stack axis}`` of every leaf of the stacked blocks' layers."""
  return {
    layer: block.stack_axis
    for block in blocks
    for layer in block.layers
    if block.stack_axis is not None
  }


def _owner(path, stacked):
  return next((layer for layer in stacked if path[: len(layer)] == layer), None)


def unroll(params, blocks):
  """``params`` with every stacked layer split into its copies, under ``copy{i}``."""
  stacked = _stacked_leaves(blocks)
  flat, out = flatten_dict(params), {}
  for path, leaf in flat.items():
    layer = _owner(path, stacked)
    if layer is None:
      out[("rest", *path)] = leaf
      continue
    for i in range(leaf.shape[stacked[layer]]):
      out[(f"copy{i}", *path)] = jnp.take(leaf, i, axis=stacked[layer])
  return unflatten_dict(out)


def restack(unrolled, blocks):
  """The inverse of :func:`unroll`."""
  stacked = _stacked_leaves(blocks)
  flat, out, copies = flatten_dict(unrolled), {}, {}
  for (top, *path), leaf in flat.items():
    if top == "rest":
      out[tuple(path)] = leaf
    else:
      copies.setdefault(tuple(path), []).append((int(top[4:]), leaf))
  for path, entries in copies.items():
    axis = stacked[_owner(path, stacked)]
    out[path] = jnp.stack([leaf for _, leaf in sorted(entries, key=lambda e: e[0])], axis=axis)
  return unflatten_dict(out)


def unrolled_blocks(params, blocks):
  """One block per copy of each stacked block, in the unrolled tree."""
  out = []
  for block in blocks:
    if block.stack_axis is None:
      out.append(gsgd_jax.Block([("rest", *p) for p in block.layers], normalized=block.normalized))
      continue
    flat = flatten_dict(params)
    first = next(leaf for path, leaf in flat.items() if _owner(path, [block.layers[0]]))
    for i in range(first.shape[block.stack_axis]):
      out.append(
        gsgd_jax.Block([(f"copy{i}", *p) for p in block.layers], normalized=block.normalized)
      )
  return out


def _path_space_adamw(layers):
  adamw = optax.adamw(3e-3, weight_decay=0.1)  # the transformer feed-forward recipe
  return gsgd_jax.path_space(adamw, layers=layers, fallback=adamw)


def _smaller_steps(name, divisor):
  """``OPTIMIZERS[name]`` at its learning rate over ``divisor``: the residual stacks start
  at a loss of 20 to 200, where the table's rates diverge within 20 steps."""
  learning_rate = OPTIMIZERS[name].hyper["learning_rate"] / divisor
  return functools.partial(make_optimizer, name, learning_rate=learning_rate)


FACTORIES = {
  **{name: _smaller_steps(name, 100 if name == "path_sgd" else 10) for name in OPTIMIZERS},
  "path_space_adamw": _path_space_adamw,
  # Steps large enough that the rate norms move away from 1 (by up to 6% in the 4 steps).
  "gsgd_implicit_decay": functools.partial(
    make_optimizer, "gsgd", learning_rate=0.3, implicit_decay=True
  ),
}

# Every optimizer of the table on some stack, the transformer recipe on the Linen one.
CASES = [
  *(("linen", name) for name in ("gsgd", "g_adam", "g_adamw", "path_space_adamw")),
  ("linen_axis1", "g_adam"),
  ("linen_probes", "gsgd"),
  ("linen_dense", "path_sgd"),
  ("linen_dense", "g_rmsprop"),
  ("conv_bn", "g_momentum"),
  ("conv_bn", "gsgd_implicit_decay"),
  ("nnx", "g_nesterov"),
]


@pytest.mark.parametrize("problem, optimizer", CASES)
def test_stacked_updates_equal_the_unrolled_model(problem, optimizer):
  """Four steps of a stacked declaration give, to 1e-12, the params of the same steps on
  the model unrolled into one block per copy (the loss is the same function of both)."""
  params, blocks, loss = PROBLEMS[problem]()[:3]
  factory = FACTORIES[optimizer]
  unrolled = unroll(params, blocks)
  tx, unrolled_tx = factory(blocks), factory(unrolled_blocks(params, blocks))
  unrolled_loss = lambda u: loss(restack(u, blocks))

  @jax.jit
  def program(params, unrolled):
    final = lambda tx, p, loss: train_scan(tx, p, loss, 4, lambda _: 0)[0][0]
    return final(tx, params, loss), final(unrolled_tx, unrolled, unrolled_loss)

  got, want = program(params, unrolled)
  want = restack(want, blocks)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, params)
  assert max(jax.tree.leaves(moved)) > 1e-4, moved


def test_nnx_optimizer_trains_a_vmapped_stack():
  model = NNXScannedFeedForward(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, gsgd_jax.set_skeleton(state, NNX_BLOCKS))
  x = jax.random.normal(jax.random.key(1), TOKENS, jnp.float64)
  loss = lambda m: jnp.mean((m(x) - 1.0) ** 2)
  scales = np.asarray(model.blocks.ln.scale[...])
  start, end = train_nnx(model, gsgd_jax.g_adam(1e-3, layers=NNX_BLOCKS), loss, 3)
  assert end < start
  # The stacked LN scales are skeleton edges: no copy's moved.
  np.testing.assert_array_equal(model.blocks.ln.scale[...], scales)


# ----------------------------------------------------------------------------
# Invariance: a scanned model rescaled at random, every copy by its own factors.

STEPS = 20


def _rescaled_gap(tx, problem, key):
  """Largest difference of the outputs after ``STEPS`` steps from the params and from the
  params rescaled by random per-copy factors (float64, one program)."""
  rescaled = gsgd_jax.random_rescale(problem.params, problem.layers, key)

  @jax.jit
  def program(starts):
    run = lambda p: train_scan(tx, p, problem.loss, STEPS, lambda _: 0)[0][0]
    return jax.vmap(lambda p: problem.forward(run(p), problem.x))(starts)

  starts = jax.tree.map(lambda *a: jnp.stack(a), problem.params, rescaled)
  outputs = program(starts)
  return float(jnp.max(jnp.abs(outputs[0] - outputs[1])) / jnp.max(jnp.abs(outputs[0])))


def test_rescaling_draws_factors_per_copy():
  problem = PROBLEMS["linen"]()
  rescaled = gsgd_jax.random_rescale(problem.params, problem.layers, jax.random.key(3))
  # The hidden nodes' biases carry their factors: one row per copy, rows differ.
  factors = rescaled["layers"]["fc1"]["bias"] / problem.params["layers"]["fc1"]["bias"]
  assert factors.shape == (COPIES, HIDDEN) and not np.allclose(factors[0], factors[1])
  np.testing.assert_allclose(
    problem.forward(rescaled, problem.x), problem.forward(problem.params, problem.x), rtol=1e-10
  )


@pytest.mark.parametrize(
  "optimizer, invariant",
  [("path_space_adamw", True), ("g_momentum", True), ("adamw", False)],
)
def test_scanned_training_is_invariant_under_per_copy_rescaling(optimizer, invariant):
  """From a start rescaled copy by copy (the LN scales of every copy, its hidden units),
  path space follows the same function for 20 steps; AdamW on the weights does not."""
  problem = PROBLEMS["linen"]()
  if optimizer == "adamw":
    tx = optax.adamw(3e-3, weight_decay=0.1)
  else:
    tx = FACTORIES[optimizer](problem.layers)
  gap = _rescaled_gap(tx, problem, jax.random.key(7))
  if invariant:
    assert gap < 1e-9, gap
  else:
    assert gap > 1e-3, gap


# ----------------------------------------------------------------------------
# The inverse chain rule of a feed-forward stack on tokens (batch, seq, d) against autodiff
# through the reference's reconstruction of each copy's weights from its basis-path values
# (the LN's affine layer as a dense layer with kernel diag(scale), as in test_norm).

WIDTHS = (D, D, HIDDEN, D)
CENTRES = (0, 0, 0)


def _layer_norm(x):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + NORM_EPSILON)


def _stack_forward(copies, x):
  """``x + fc2(relu(fc1(LN(x) @ V0 + b0)))`` per copy; each copy ``(views, biases)``."""
  for views, biases in copies:
    h = _layer_norm(x) @ views[0][0] + biases[0]
    h = jax.nn.relu(h @ views[1][0] + biases[1])
    x = x + h @ views[2][0] + biases[2]
  return x


def _copy_views(params, i):
  layer = lambda name: jax.tree.map(lambda a: a[i], params[name])
  ln, fc1, fc2 = layer("ln"), layer("fc1"), layer("fc2")
  views = [jnp.diag(ln["scale"])[None], fc1["kernel"][None], fc2["kernel"][None]]
  return views, [ln["bias"], fc1["bias"], fc2["bias"]]


def test_feed_forward_stack_icr_on_tokens_equals_autodiff():
  rng = np.random.default_rng(5)
  signed = lambda *shape: rng.uniform(0.4, 1.6, shape) * rng.choice([-1.0, 1.0], shape)
  params = {
    "ln": {"scale": rng.uniform(0.5, 2.0, (COPIES, D)), "bias": rng.normal(0, 0.5, (COPIES, D))},
    "fc1": {"kernel": signed(COPIES, D, HIDDEN), "bias": rng.normal(0, 0.5, (COPIES, HIDDEN))},
    "fc2": {"kernel": signed(COPIES, HIDDEN, D), "bias": rng.normal(0, 0.5, (COPIES, D))},
  }
  x, y = rng.normal(size=TOKENS), rng.normal(size=TOKENS)
  loss = lambda out: 0.5 * jnp.mean((out - y) ** 2)
  block = gsgd_jax.Block(["ln", "fc1", "fc2"], stack_axis=0)
  (struct,) = build_structure(params, [block])
  copies = [_copy_views(params, i) for i in range(COPIES)]
  values = [ref.basis_values_taps(*copy, WIDTHS, CENTRES) for copy in copies]

  @jax.jit
  def program(params, values):
    def loss_of_values(values):
      rebuilt = [
        ref.reconstruct_taps(v, vb, views, WIDTHS, CENTRES)
        for (v, vb), (views, _) in zip(values, copies, strict=True)
      ]
      return loss(_stack_forward(rebuilt, x))

    def library_forward(p):
      layers = [(p[n]["kernel"] if n != "ln" else p[n]["scale"]) for n in ("ln", "fc1", "fc2")]
      views = lambda i: ([jnp.diag(layers[0][i])[None], layers[1][i][None], layers[2][i][None]])
      biases = lambda i: [p[n]["bias"][i] for n in ("ln", "fc1", "fc2")]
      return loss(_stack_forward([(views(i), biases(i)) for i in range(COPIES)], x))

    grads = jax.grad(library_forward)(params)
    names = ("ln", "fc1", "fc2")
    weights = lambda tree: [tree[n].get("kernel", tree[n].get("scale")) for n in names]
    biases = lambda tree: [tree[n]["bias"] for n in names]
    pg = basis.inverse_chain_rule(
      struct, weights(params), biases(params), weights(grads), biases(grads)
    )
    return jax.grad(loss_of_values)(values), pg.kernels, pg.biases

  want, got, got_b = jax.device_get(program(params, values))
  fixed = ref.fixed_masks(copies[0][0], WIDTHS, CENTRES)
  np.testing.assert_array_equal(got[0], 0, err_msg="the LN scales are in F")
  for i, (want_v, want_b) in enumerate(want):
    tol = 1e-10 * max(np.max(np.abs(w)) for w in want_v)
    for k in (1, 2):
      free = ~fixed[k][0]
      np.testing.assert_allclose(got[k][i][free], want_v[k][0][free], rtol=1e-8, atol=tol)
    for k in range(3):
      np.testing.assert_allclose(got_b[k][i], want_b[k], rtol=1e-8, atol=tol)


# ----------------------------------------------------------------------------
# Probes, Path-SGD's scales and set_skeleton with a stack axis.


def test_probes_on_a_stack_are_verified_per_copy():
  problem = PROBLEMS["linen_probes"]()
  assert problem.params["layers"]["fc1"][probes.PROBE].shape == (COPIES, HIDDEN)
  assert gsgd_jax.verify_probes(problem.loss, problem.params, problem.layers) < 1e-9


def test_set_skeleton_and_masks_act_on_every_copy():
  params = ScannedFeedForward(axis=1).init(jax.random.key(0), jnp.ones(TOKENS))["params"]
  blocks = scanned_blocks(ScannedFeedForward(axis=1))
  set_ = gsgd_jax.set_skeleton(params, blocks)
  mask = gsgd_jax.skeleton_mask(params, blocks, which="all")
  # Copy i's masks are those of the copy declared alone, as the chain fc1 -> fc2.
  one = jax.tree.map(lambda a: a[:, 0] if a.ndim == 3 else a[..., 0], params["layers"])
  want = gsgd_jax.skeleton_mask(one, ["ln", "fc1", "fc2"], which="all")
  for i in range(COPIES):
    for name in ("fc1", "fc2"):
      got = mask["layers"][name]["kernel"][:, i]
      np.testing.assert_array_equal(got, want[name]["kernel"])
      np.testing.assert_array_equal(set_["layers"][name]["kernel"][:, i][got], 1.0)


# ----------------------------------------------------------------------------
# The compiled update does not grow with the number of copies.


def _update_program_size(copies):
  params = {
    "fc1": {"kernel": jnp.ones((copies, D, HIDDEN)), "bias": jnp.ones((copies, HIDDEN))},
    "fc2": {"kernel": jnp.ones((copies, HIDDEN, D)), "bias": jnp.ones((copies, D))},
  }
  tx = gsgd_jax.g_adam(1e-3, layers=[gsgd_jax.Block(["fc1", "fc2"], stack_axis=0)])
  update = jax.jit(tx.update, compiler_options=USER_PIPELINE)
  lowered = update.lower(params, tx.init(params), params)
  text = lowered.compile().as_text()
  return len([line for line in text.splitlines() if " = " in line])


def test_compiled_update_does_not_grow_with_the_stack():
  # Compared at 48 and 96 copies, not from 2: XLA:CPU sums a long vector through a tree
  # of partial sums (reduce-windows before the reduce), a level deeper every few
  # doublings of its length, and the count of clipped ratios is one sum over every
  # copy's nodes (its tree appears between 2 and 8 copies here, and grows a level
  # between 96 and 480): a few instructions, not a copy's program. Unrolled copies
  # would double the program.
  sizes = [_update_program_size(c) for c in (48, 96)]
  assert max(sizes) - min(sizes) <= 0.02 * min(sizes), sizes


# ----------------------------------------------------------------------------
# inject_hyperparams and orbax.


def test_inject_hyperparams_and_orbax_resume_with_a_stack(tmp_path):
  problem = PROBLEMS["linen"]()
  injected = optax.inject_hyperparams(gsgd_jax.g_adam)(3e-3, layers=problem.layers)
  plain = gsgd_jax.g_adam(3e-3, layers=problem.layers)
  runs = [
    train_scan(tx, problem.params, problem.loss, 3, lambda _: 0)[0] for tx in (plain, injected)
  ]
  chex.assert_trees_all_close(runs[0][0], runs[1][0], rtol=1e-13, atol=1e-15)

  def step(p, s):
    updates, s = injected.update(jax.grad(problem.loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step)
  params, state = runs[1]
  restored = orbax_roundtrip(tmp_path, {"params": params, "state": state})
  straight, resumed = (params, state), (restored["params"], restored["state"])
  for _ in range(2):
    straight, resumed = step(*straight), step(*resumed)
  chex.assert_trees_all_equal(straight, resumed)


# ----------------------------------------------------------------------------
# Declarations the tree does not bear out.


def test_stack_axis_on_layers_without_a_stack_is_refused():
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  with pytest.raises(
    ValueError, match=r"layer 'b': kernel of shape \(4, 2\) has no stack of length 3"
  ):
    gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(["a", "b"], stack_axis=0)).init(params)


def test_stacks_of_different_lengths_are_refused():
  params = {"a": {"kernel": jnp.ones((3, 4, 5))}, "b": {"kernel": jnp.ones((2, 5, 2))}}
  with pytest.raises(
    ValueError, match=r"layer 'b': kernel of shape \(2, 5, 2\) has no stack of length 3 on axis 0"
  ):
    gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(["a", "b"], stack_axis=0)).init(params)


def test_a_stack_declared_on_the_wrong_axis_is_refused_naming_the_axis_it_is_on():
  # T5's and MaxText's layers are scanned on axis 1: (d, S, h) and (h, S, d).
  params = {"a": {"kernel": jnp.ones((4, 3, 6))}, "b": {"kernel": jnp.ones((6, 3, 4))}}
  message = (
    r"layer 'b': kernel of shape \(6, 3, 4\) has no stack of length 4 on axis 0, the copies "
    r"that the block's first layer 'a' \(shape \(4, 3, 6\)\) has there.*agree on axis 1 "
    r"\(length 3\): is the stack there \(stack_axis=1"
  )
  with pytest.raises(ValueError, match=message):
    gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(["a", "b"], stack_axis=0)).init(params)
  gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(["a", "b"], stack_axis=1)).init(params)


@pytest.mark.parametrize("axis", [0, 1])
def test_an_undeclared_stack_is_refused_naming_stack_axis(axis):
  model = ScannedFeedForward(axis=axis, norm=False)
  params = model.init(jax.random.key(0), jnp.ones(TOKENS))["params"]
  match = re.escape("layer 'layers/fc1'") + r".*carry a stack axis.*stack_axis"
  with pytest.raises(UnsupportedLayerError, match=match):
    gsgd_jax.g_adam(1e-3, layers=["layers/fc1", "layers/fc2"]).init(params)


def test_stack_axis_must_be_an_axis():
  for bad in (-1, 1.0, True, "0"):
    with pytest.raises(TypeError, match="stack_axis"):
      gsgd_jax.Block(["a", "b"], stack_axis=bad)


def test_a_zero_skeleton_weight_is_named_with_its_copy():
  params = {"a": {"kernel": jnp.ones((3, 2, 4))}, "b": {"kernel": jnp.ones((3, 4, 2))}}
  params["a"]["kernel"] = params["a"]["kernel"].at[1, 1, 3].set(0.0)  # copy 1: edge 1 -> 3
  match = r"layer 'a': the incoming skeleton weight of output node 3 of copy 1 of the stack is 0"
  with pytest.raises(ValueError, match=match):
    gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(["a", "b"], stack_axis=0)).init(params)
