"""Normalization layers in path space (docs/math.md, normalization layers): affine layers
(a norm's scale and bias) first in a block, normalized blocks (outputs feeding a BatchNorm,
path gradients scaled by N^2), their invariance in training mode, and the errors."""

from __future__ import annotations

import itertools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx
from helpers import orbax_roundtrip, train_scan
from problems import (
  ALLOW_ONE_LAYER,
  NNXPlainNetBN,
  PlainNetBN,
  PreLNFeedForward,
  ResNetBN,
  linen_norm,
  mlp,
  nnx_norm,
  plainnet_bn_blocks,
  preln_blocks,
  resnet_bn_blocks,
)

import gsgd_jax
from gsgd_jax import probes
from gsgd_jax._src import basis
from gsgd_jax._src.structure import UnsupportedLayerError, build_structure

# ----------------------------------------------------------------------------
# An affine layer against the reference: the same chain with the affine layer written as a
# dense layer whose kernel is diag(scale). Its off-diagonal edges are zero, so they own
# paths of value 0 and leave every other path's value and gradient as the affine chain has
# them.

C, HIDDEN, OUT, BATCH, SIDE = 3, 4, 2, 5, 4


def _affine_chain(next_kind, bias, seed):
  """Params, layer names, reference views and centres of ``norm -> next -> ReLU -> head``."""
  rng = np.random.default_rng(seed)
  signed = lambda shape: rng.uniform(0.4, 1.6, shape) * rng.choice([-1.0, 1.0], shape)
  window = (3, 3) if next_kind == "conv" else ()
  params = {
    "norm": {"scale": rng.uniform(0.5, 2.0, C), "bias": rng.normal(0, 0.5, C)},
    "next": {"kernel": signed((*window, C, HIDDEN))},
    "head": {"kernel": signed((HIDDEN, OUT))},
  }
  if bias:
    params["next"]["bias"] = rng.normal(0, 0.5, HIDDEN)
    params["head"]["bias"] = rng.normal(0, 0.5, OUT)
  taps = int(np.prod(window)) if window else 1
  centres = (0, (taps // 2) if window else 0, 0)
  return params, taps, centres


def _views(params, taps):
  """(taps, n_in, n_out) views of the chain's layers, the affine one as diag(scale)."""
  views = [
    jnp.diag(params["norm"]["scale"])[None],
    params["next"]["kernel"].reshape(taps, C, HIDDEN),
    params["head"]["kernel"][None],
  ]
  return views, [params[n].get("bias") for n in ("norm", "next", "head")]


def _tail(h, next_kernel, next_bias, head_kernel, head_bias):
  """``next -> ReLU -> (global average pool) -> head`` on the affine layer's outputs."""
  if next_kernel.ndim == 4:
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(h, next_kernel, (1, 1), "SAME", dimension_numbers=dims)
  else:
    h = h @ next_kernel
  h = jax.nn.relu(h + (0 if next_bias is None else next_bias))
  if next_kernel.ndim == 4:
    h = h.mean(axis=(1, 2))
  return h @ head_kernel + (0 if head_bias is None else head_bias)


def _reference_forward(views, biases, x, act, kernel_shape):
  """The chain on reference views: the affine layer as a product with diag(scale)."""
  h = x @ views[0][0] + biases[0]
  h = jax.nn.relu(h) if act == "relu" else h
  return _tail(h, views[1].reshape(kernel_shape), biases[1], views[2][0], biases[2])


def _library_forward(p, x, act):
  """The chain as a model computes it: the affine layer elementwise."""
  h = x * p["norm"]["scale"] + p["norm"]["bias"]
  h = jax.nn.relu(h) if act == "relu" else h
  nxt, head = p["next"], p["head"]
  return _tail(h, nxt["kernel"], nxt.get("bias"), head["kernel"], head.get("bias"))


NAMES = ("norm", "next", "head")


def _library_icr(struct, params, grads):
  weights = lambda tree: [tree[n].get("kernel", tree[n].get("scale")) for n in NAMES]
  biases = lambda tree: [tree[n].get("bias") for n in NAMES]
  return basis.inverse_chain_rule(
    struct, weights(params), biases(params), weights(grads), biases(grads)
  )


def _output_norms(values, bias_values, widths):
  """N^2 per output node by explicit loops: the squared values of the owned paths whose
  forward skeleton chain ends there."""
  depth = len(widths) - 1

  def end(level, node):
    while level < depth:
      node, level = node % widths[level + 1], level + 1
    return node

  norms = np.zeros(widths[-1])
  for k, v in enumerate(values):
    for t, i, j in itertools.product(*map(range, v.shape)):
      norms[end(k + 1, j)] += float(v[t, i, j]) ** 2
    if bias_values[k] is not None:
      for j, b in enumerate(bias_values[k]):
        norms[end(k + 1, j)] += float(b) ** 2
  return norms, end


CASES = [
  ("dense", True, "identity", False),
  ("dense", False, "relu", False),
  ("conv", True, "relu", False),
  ("conv", False, "identity", False),
  ("dense", True, "identity", True),
  ("conv", True, "relu", True),
]


@pytest.mark.parametrize("next_kind, bias, act, normalized", CASES)
def test_affine_chain_icr_equals_autodiff(next_kind, bias, act, normalized):
  """Path gradients of a chain that starts with an affine layer equal autodiff through the
  reference's reconstruction of the weights from basis values (times N^2 of each path's
  output node when the block is normalized); the scale's path gradients are 0 (F)."""
  params, taps, centres = _affine_chain(next_kind, bias, seed=3 + len(next_kind))
  widths = (C, C, HIDDEN, OUT)
  x_shape = (BATCH, SIDE, SIDE, C) if next_kind == "conv" else (BATCH, C)
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=x_shape), rng.normal(size=(BATCH, OUT))
  block = gsgd_jax.Block(["norm", "next", "head"], normalized=normalized)
  (struct,) = build_structure(params, [block])

  loss = lambda out: 0.5 * jnp.mean((out - y) ** 2)
  views, biases = _views(params, taps)
  values, bias_values = ref.basis_values_taps(views, biases, widths, centres)
  kernel_shape = params["next"]["kernel"].shape

  @jax.jit
  def program(params, values, bias_values):
    def loss_of_values(v, vb):
      rebuilt = ref.reconstruct_taps(v, vb, views, widths, centres)
      return loss(_reference_forward(*rebuilt, x, act, kernel_shape))

    want = jax.grad(loss_of_values, argnums=(0, 1))(values, bias_values)
    grads = jax.grad(lambda p: loss(_library_forward(p, x, act)))(params)
    pg = _library_icr(struct, params, grads)
    return want, pg.kernels, pg.biases

  (want, want_b), got, got_b = jax.device_get(program(params, values, bias_values))
  factor = [np.ones(n) for n in widths]
  if normalized:
    norms, end = _output_norms(values, bias_values, widths)
    factor = [np.array([norms[end(level, j)] for j in range(n)]) for level, n in enumerate(widths)]
  tol = 1e-10 * max(np.max(np.abs(w)) * np.max(f) for w, f in zip(want, factor[1:], strict=True))
  np.testing.assert_array_equal(got[0], 0, err_msg="an affine layer's scale is in F")
  fixed = ref.fixed_masks(views, widths, centres)
  for k in (1, 2):
    expected = np.asarray(want[k]) * factor[k + 1]
    g = np.reshape(got[k], expected.shape)
    np.testing.assert_allclose(g[~fixed[k]], expected[~fixed[k]], rtol=1e-8, atol=tol)
  for k in range(3):
    if want_b[k] is not None:
      np.testing.assert_allclose(
        got_b[k], np.asarray(want_b[k]) * factor[k + 1], rtol=1e-8, atol=tol
      )


@pytest.mark.parametrize("normalized", [False, True])
def test_affine_chain_weight_allocation_lands_and_scale_never_moves(normalized):
  """One path-space SGD step moves every basis path of an affine-first chain to
  ``v - lr * gv`` (the reference's values of the new weights agree), and no scale entry.
  (Without renormalization, which then rescales a normalized chain's outputs: tested in
  test_renormalization_undoes_the_growth_and_changes_no_training_mode_output.)"""
  params, taps, centres = _affine_chain("conv", True, seed=11)
  widths = (C, C, HIDDEN, OUT)
  x = np.random.default_rng(1).normal(size=(BATCH, SIDE, SIDE, C))
  block = gsgd_jax.Block(["norm", "next", "head"], normalized=normalized)
  (struct,) = build_structure(params, [block])

  loss = lambda p: jnp.mean(_library_forward(p, x, "relu") ** 2)
  lr = 1e-3
  tx = gsgd_jax.path_space(optax.sgd(lr), layers=[block], ratio_clip=None, renormalize=False)
  grads = jax.grad(loss)(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  pg = _library_icr(struct, params, grads)
  np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])
  before = gsgd_jax.basis_path_values(params, [block])
  after = gsgd_jax.basis_path_values(new, [block])
  ref_v, ref_b = ref.basis_values_taps(*_views(new, taps), widths, centres)
  fixed = ref.fixed_masks(_views(params, taps)[0], widths, centres)
  assert np.any(np.abs(np.asarray(pg.biases[0])) > 0)
  for k, name in enumerate(NAMES):
    target_b = np.asarray(before[name]["bias"]) - lr * np.asarray(pg.biases[k])
    np.testing.assert_allclose(after[name]["bias"], target_b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref_b[k], target_b, rtol=1e-9, atol=1e-12)
    if k:
      target = np.asarray(before[name]["kernel"]) - lr * np.asarray(pg.kernels[k])
      np.testing.assert_allclose(after[name]["kernel"], target, rtol=1e-9, atol=1e-12)
      view_target = target.reshape(ref_v[k].shape)
      free = ~fixed[k]
      np.testing.assert_allclose(ref_v[k][free], view_target[free], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------
# Invariance of training, in training mode (batch statistics), from a start rescaled by
# random G factors on the hidden nodes and S1 factors on the outputs of normalized blocks.

STEPS = 20
RESNET = ResNetBN(3, (3, 4))
MODELS = {
  "plainnet": (
    PlainNetBN((4, 5, 4)),
    lambda normalized=True: plainnet_bn_blocks(3, normalized),
    (6, 5, 5, 2),
  ),
  "resnet": (RESNET, lambda normalized=True: resnet_bn_blocks(RESNET, normalized), (6, 6, 6, 2)),
}
SCHEDULE = optax.exponential_decay(0.05, transition_steps=5, decay_rate=0.7)
INVARIANT = {
  "gsgd": lambda layers: gsgd_jax.gsgd(0.05, layers=layers),
  "gsgd_momentum": lambda layers: gsgd_jax.gsgd(0.02, momentum=0.9, layers=layers),
  "path_space_sgd_schedule": lambda layers: gsgd_jax.path_space(optax.sgd(SCHEDULE), layers=layers),
  "gsgd_implicit_decay": lambda layers: gsgd_jax.gsgd(0.3, layers=layers, implicit_decay=True),
  "gsgd_momentum_implicit_decay": lambda layers: gsgd_jax.gsgd(
    0.1, momentum=0.9, layers=layers, implicit_decay=True
  ),
}


def _hidden_only(params, layers, key):
  """``params`` with the hidden nodes of every block rescaled at random (the group G),
  but not the outputs of normalized blocks."""
  blocks = build_structure(params, layers)
  keys = iter(jax.random.split(key, sum(b.depth for b in blocks)))
  factors = [
    [None]
    + [
      jnp.exp(jax.random.uniform(next(keys), (spec.n_out,), minval=-1.5, maxval=1.5))
      for spec in block.layers[:-1]
    ]
    + [None]
    for block in blocks
  ]
  return gsgd_jax.rescale(params, layers, factors)


def _trajectory_gap(problem, layers, make, seed=5, rescale=gsgd_jax.random_rescale):
  """Largest output difference over ``STEPS`` steps of ``make(layers)`` from the params and
  from a randomly rescaled copy (declared blocks of ``problem``; by default their hidden
  nodes and normalized outputs), relative to the outputs, and how far training moved the
  outputs. Both runs are one program (vmapped over the two starts), compiled for speed."""
  start = problem.params
  rescaled = rescale(start, problem.layers, jax.random.key(seed))
  tx = make(layers)

  def run(params):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(problem.loss)(p), s, p)
      p = optax.apply_updates(p, updates)
      return (p, s), problem.forward(p, problem.x)

    return jax.lax.scan(step, (params, tx.init(params)), length=STEPS)[1]

  starts = jax.tree.map(lambda a, b: jnp.stack([a, b]), start, rescaled)
  a, b = jax.jit(jax.vmap(run))(starts)
  moved = float(jnp.max(jnp.abs(a[-1] - problem.forward(start, problem.x))))
  return float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(a))), moved


@pytest.mark.parametrize(
  "model, name",
  [
    ("plainnet", "gsgd"),
    ("plainnet", "path_space_sgd_schedule"),
    ("plainnet", "gsgd_implicit_decay"),
    ("resnet", "gsgd"),
    ("resnet", "gsgd_momentum"),
    ("resnet", "gsgd_momentum_implicit_decay"),
  ],
)
def test_bn_training_is_invariant_under_g_and_output_rescaling(model, name):
  module, blocks, shape = MODELS[model]
  problem = linen_norm(module, blocks(), shape)
  gap, moved = _trajectory_gap(problem, problem.layers, INVARIANT[name])
  assert moved > 0.1, "training did not move the outputs"
  assert gap < 1e-9, gap


@ALLOW_ONE_LAYER  # the one-layer blocks declared without normalized=True
@pytest.mark.parametrize(
  "model, baseline",
  [("plainnet", "sgd"), ("plainnet", "gsgd_without_n2"), ("resnet", "gsgd_without_n2")],
)
def test_bn_training_without_the_n2_scaling_is_not_invariant(model, baseline):
  """The same rescaled start: plain SGD, and G-SGD on the same blocks declared without
  ``normalized=True``, follow another trajectory."""
  module, blocks, shape = MODELS[model]
  problem = linen_norm(module, blocks(), shape)
  if baseline == "sgd":
    layers, make = problem.layers, lambda _layers: optax.sgd(0.05)
  else:
    layers, make = blocks(normalized=False), INVARIANT["gsgd"]
  gap, _ = _trajectory_gap(problem, layers, make)
  assert gap > 1e-2, gap


def test_preln_feed_forward_is_invariant_with_adam_inside_and_adamw_outside():
  module = PreLNFeedForward()
  problem = linen_norm(module, preln_blocks(module), (5, 3, 4))
  path = lambda layers: gsgd_jax.path_space(
    optax.adam(1e-2), layers=layers, fallback=optax.adamw(1e-2, weight_decay=0.1)
  )
  gap, moved = _trajectory_gap(problem, problem.layers, path)
  assert moved > 0.1 and gap < 1e-9, (gap, moved)
  gap, _ = _trajectory_gap(problem, problem.layers, lambda _: optax.adamw(1e-2))
  assert gap > 1e-2, gap


# ----------------------------------------------------------------------------
# Gradient clipping and the two symmetries.

CLIP = 0.3  # below the path gradients' global norm at every step here: every step clips


def test_clip_norm_keeps_the_output_rescaling_invariance_a_global_norm_clip_breaks():
  """``optax.clip_by_global_norm`` inside ``path_space`` keeps G (the hidden nodes) but
  not S1 (a normalized block's outputs): its norm sums ``N_k^2``-scaled gradients whose
  scale moves with S1. ``clip_norm`` measures ``N_k dL/dv`` and keeps both."""
  module, blocks, shape = MODELS["plainnet"]
  problem = linen_norm(module, blocks(), shape)
  inside = lambda layers: gsgd_jax.path_space(
    optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(0.05)), layers=layers
  )
  broken, _ = _trajectory_gap(problem, problem.layers, inside)
  kept_g, _ = _trajectory_gap(problem, problem.layers, inside, rescale=_hidden_only)
  clipped = lambda layers: gsgd_jax.gsgd(0.05, layers=layers, clip_norm=CLIP)
  gap, moved = _trajectory_gap(problem, problem.layers, clipped)
  print(f"gaps: clip_by_global_norm {broken:.1e} (G only {kept_g:.1e}), clip_norm {gap:.1e}")
  assert broken > 1e-2 and kept_g < 1e-9, (broken, kept_g)
  assert gap < 1e-9 and moved > 0.1, (gap, moved)
  # And it clips: the trajectory is not the unclipped one.
  unclipped = gsgd_jax.gsgd(0.05, layers=problem.layers)
  (_, _), loss_a = train_scan(unclipped, problem.params, problem.loss, STEPS, problem.loss)
  (_, _), loss_b = train_scan(clipped(problem.layers), problem.params, problem.loss, STEPS,
                              problem.loss)  # fmt: skip
  assert float(jnp.max(jnp.abs(loss_a - loss_b))) > 1e-3


def test_clip_norm_with_the_implicit_decay_keeps_both_symmetries():
  """``clip_norm`` measures ``N_k dL/dv / rho_k^(1/2)`` with the implicit decay: rho is
  invariant, so the clipped steps are too."""
  module, blocks, shape = MODELS["plainnet"]
  problem = linen_norm(module, blocks(), shape)
  clipped = lambda layers: gsgd_jax.gsgd(0.3, layers=layers, clip_norm=CLIP, implicit_decay=True)
  gap, moved = _trajectory_gap(problem, problem.layers, clipped)
  assert gap < 1e-9 and moved > 0.1, (gap, moved)


def test_clip_norm_without_normalized_blocks_is_the_global_norm_clip_in_path_space():
  params, layers, loss, *_ = mlp((4, 7, 6, 3), skeleton=True, batch=16)
  grads = jax.grad(loss)(params)
  norm = float(optax.tree.norm(grads))
  for clip in (0.1 * norm, 10.0 * norm):  # clipping, and not
    want = gsgd_jax.path_space(
      optax.chain(optax.clip_by_global_norm(clip), optax.sgd(0.1)), layers=layers
    )
    got = gsgd_jax.gsgd(0.1, layers=layers, clip_norm=clip)
    chex.assert_trees_all_close(
      got.update(grads, got.init(params), params)[0],
      want.update(grads, want.init(params), params)[0],
      rtol=1e-12,
    )
  with pytest.raises(ValueError, match="clip_norm must be positive or None"):
    gsgd_jax.gsgd(0.1, layers=layers, clip_norm=0.0)
  # As a hyperparameter array it cannot be checked when built: a bound that is not positive
  # gives NaN updates, not steps reversed or zeroed without a word.
  tx = optax.inject_hyperparams(gsgd_jax.gsgd)(0.1, layers=layers, clip_norm=1.0)
  state = tx.init(params)
  state.hyperparams["clip_norm"] = jnp.asarray(-1.0)
  updates, _ = tx.update(grads, state, params)
  assert all(bool(jnp.any(jnp.isnan(u))) for u in jax.tree.leaves(updates))


# ----------------------------------------------------------------------------
# Declarations that cannot be honoured exactly: refused at init, naming the layer.


def _plainnet_params():
  return linen_norm(*MODELS["plainnet"][:1], plainnet_bn_blocks(3), MODELS["plainnet"][2]).params


@pytest.mark.parametrize(
  "layers, match",
  [
    ([gsgd_jax.Block(["conv0", "bn0", "conv1"])], r"'bn0': a norm's affine layer .* inside"),
    ([gsgd_jax.Block(["bn0"])], "'bn0': a norm's affine layer alone is no block"),
    ([gsgd_jax.Block(["bn1"], normalized=True)], "'bn1': a norm's affine layer alone"),
    ([gsgd_jax.Block(["bn0", "conv2"])], r"'conv2' takes 5 inputs .* 'bn0', has 4 outputs"),
  ],
)
def test_declarations_through_or_around_a_norm_are_refused_at_init(layers, match):
  with pytest.raises(ValueError, match=match):
    gsgd_jax.gsgd(0.1, layers=layers).init(_plainnet_params())


def test_a_norm_without_scale_is_refused_at_init():
  model = nn.Sequential([nn.Dense(4), nn.BatchNorm(True, use_scale=False), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.ones((3, 2)))["params"]
  layers = [gsgd_jax.Block(["layers_1", "layers_3"])]
  message = r"'layers_1' has a 'bias' but .* \(BatchNorm\(use_scale=False\)\)"
  with pytest.raises(ValueError, match=message):
    gsgd_jax.gsgd(0.1, layers=layers).init(params)


def test_a_probe_on_an_affine_layer_is_refused_at_init():
  params = _plainnet_params()
  params["bn0"]["scale_probe"] = jnp.ones(4)
  with pytest.raises(ValueError, match="'bn0': a norm's affine layer has a 'scale_probe'"):
    gsgd_jax.gsgd(0.1, layers=plainnet_bn_blocks(3)).init(params)


@pytest.mark.parametrize("layers", [[gsgd_jax.Block(["bn0", "conv1"])], plainnet_bn_blocks(3)[:1]])
def test_path_sgd_refuses_norm_blocks_at_init(layers):
  with pytest.raises(UnsupportedLayerError, match="Path-SGD does not support"):
    gsgd_jax.path_sgd(0.1, layers=layers).init(_plainnet_params())


# ----------------------------------------------------------------------------
# verify_invariance in training mode.


def test_verify_invariance_accepts_the_bn_declarations_in_training_mode():
  for model in ("plainnet", "resnet"):
    module, blocks, shape = MODELS[model]
    problem = linen_norm(module, blocks(), shape)
    assert (
      gsgd_jax.verify_invariance(problem.forward, problem.params, problem.layers, problem.x) < 1e-8
    )


def test_verify_invariance_names_a_normalized_block_that_feeds_no_batchnorm():
  """Declared normalized, but the head's outputs feed no BatchNorm: the output rescaling
  changes the outputs, and the message says what normalized=True requires."""
  module, _, shape = MODELS["plainnet"]
  problem = linen_norm(module, plainnet_bn_blocks(3), shape)
  layers = [*plainnet_bn_blocks(3)[:-1], gsgd_jax.Block(["bn2", "head"], normalized=True)]
  with pytest.raises(
    ValueError, match=r"layer 'head' of block 3 .*declared normalized=True.*no BatchNorm"
  ):
    gsgd_jax.verify_invariance(problem.forward, problem.params, layers, problem.x)


def test_verify_invariance_names_a_block_running_through_a_norm():
  """``[conv0, conv1]`` across BN0: conv0's outputs are normalized, so dividing conv1's
  inputs by the factors changes the outputs."""
  module, _, shape = MODELS["plainnet"]
  problem = linen_norm(module, plainnet_bn_blocks(3), shape)
  with pytest.raises(ValueError, match="output nodes of layer 'conv0'"):
    gsgd_jax.verify_invariance(problem.forward, problem.params, [["conv0", "conv1"]], problem.x)


# ----------------------------------------------------------------------------
# Growth of the norms (docs/math.md): renormalization keeps N^2 and changes no output.


def _normalized_norms(params, layers):
  """N^2 per output node of every normalized block of ``layers`` at ``params``."""
  state = gsgd_jax.gsgd(0.1, layers=layers).init(params)
  return jnp.concatenate(state.output_norms)


def test_renormalization_undoes_the_growth_and_changes_no_training_mode_output():
  module, blocks, shape = MODELS["resnet"]
  problem = linen_norm(module, blocks(), shape)
  observe = lambda p: (problem.forward(p, problem.x), _normalized_norms(p, problem.layers))
  runs = {}
  for renormalize in (True, False):
    tx = gsgd_jax.path_space(optax.sgd(0.3), layers=problem.layers, renormalize=renormalize)
    _, runs[renormalize] = train_scan(tx, problem.params, problem.loss, STEPS, observe)
  start = _normalized_norms(problem.params, problem.layers)
  (kept_outputs, kept_norms), (grown_outputs, grown_norms) = runs[True], runs[False]
  # Without it the norms grow (never shrink: each step is orthogonal to the paths' values).
  assert np.all(grown_norms[-1] >= (1 - 1e-12) * start) and np.max(grown_norms[-1] / start) > 1.05
  # With it every update lands the norms on their value at init, exactly.
  np.testing.assert_allclose(kept_norms, np.broadcast_to(start, kept_norms.shape), rtol=1e-10)
  scale = float(jnp.max(jnp.abs(grown_outputs)))
  np.testing.assert_allclose(kept_outputs, grown_outputs, rtol=0, atol=1e-10 * scale)
  assert (
    float(jnp.max(jnp.abs(grown_outputs[-1] - problem.forward(problem.params, problem.x)))) > 0.1
  )


# ----------------------------------------------------------------------------
# The implicit decay (docs/math.md, normalization layers): the rate norms follow SGD's.


def _columns_of_norm(params, names, sq_norm=1.0):
  """``params`` with every output column of the kernels ``names`` scaled to the squared
  norm ``sq_norm``."""
  params = dict(params)
  for name in names:
    kernel = params[name]["kernel"]
    norms = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1))) / sq_norm)
    params[name] = {**params[name], "kernel": kernel / norms}
  return params


@pytest.mark.parametrize(
  "lr, clip, start", [(0.3, None, 1.0), (1.0, None, 1.0), (1.0, CLIP, 1.0), (1.0, None, 2.5)]
)
def test_implicit_decay_on_one_layer_blocks_is_sgd_from_columns_of_the_rate_norm(lr, clip, start):
  """Every convolution of a PlainNet-BN declared as a one-layer normalized block: from any
  rescaling of the columns, G-SGD with the implicit decay follows SGD's outputs from the
  unit-norm columns exactly (the same angular steps, rho_k equal to SGD's squared column
  norm), where the exact G-SGD (no decay) and SGD from the rescaled columns do not. With
  ``clip_norm`` it is SGD after ``clip_by_global_norm``: the measure ``N dL/dv /
  rho^(1/2)`` is SGD's gradient norm at columns of squared norm rho. With
  ``initial_rate_norm`` it is SGD from columns of that squared norm."""
  module, _, shape = MODELS["plainnet"]
  convs = [f"conv{i}" for i in range(len(module.channels))]
  layers = [gsgd_jax.Block([name], normalized=True) for name in convs]
  problem = linen_norm(module, layers, shape)
  start_params = _columns_of_norm(problem.params, convs, start)
  rescaled = gsgd_jax.random_rescale(start_params, layers, jax.random.key(3))
  observe = lambda p: problem.forward(p, problem.x)
  sgd = optax.sgd(lr)
  if clip is not None:
    sgd = optax.chain(optax.clip_by_global_norm(clip), sgd)
  decayed = gsgd_jax.gsgd(
    lr, layers=layers, implicit_decay=True, clip_norm=clip, initial_rate_norm=start
  )
  (sgd_params, _), want = train_scan(sgd, start_params, problem.loss, STEPS, observe)
  (_, state), got = train_scan(decayed, rescaled, problem.loss, STEPS, observe)
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * scale)
  assert float(jnp.max(jnp.abs(want[-1] - observe(start_params)))) > 0.1 * scale, "nothing trained"
  # rho is SGD's squared column norm after the same steps.
  sgd_norms = [jnp.sum(jnp.square(sgd_params[n]["kernel"]), axis=(0, 1, 2)) for n in convs]
  chex.assert_trees_all_close(state.rate_norms, tuple(sgd_norms), rtol=1e-10)
  assert max(float(jnp.max(r)) for r in state.rate_norms) > 1.02 * start, "no norm grew"
  others = [(gsgd_jax.gsgd(lr, layers=layers, clip_norm=clip), rescaled), (sgd, rescaled)]
  if start != 1:  # the start matters: from rho = 1 it is SGD from unit columns instead
    others.append((gsgd_jax.gsgd(lr, layers=layers, implicit_decay=True), rescaled))
  if clip is not None:  # and the bound clips: unclipped SGD goes elsewhere
    others.append((optax.sgd(lr), start_params))
  for other, begin in others:
    _, trace = train_scan(other, begin, problem.loss, STEPS, observe)
    assert float(jnp.max(jnp.abs(trace - want))) > 1e-2 * scale


def test_implicit_decay_rates_grow_invariantly_and_change_the_blocks_steps():
  """On the PlainNet-BN blocks (two-layer blocks ``[BN affine, conv]`` among them) the
  rate norms grow, are the same from a rescaled start, and change the trajectory from the
  exact step's."""
  module, blocks, shape = MODELS["plainnet"]
  problem = linen_norm(module, blocks(), shape)
  tx = gsgd_jax.gsgd(1.0, layers=problem.layers, implicit_decay=True)
  observe = lambda p: problem.forward(p, problem.x)
  (_, state), got = train_scan(tx, problem.params, problem.loss, STEPS, observe)
  rates = np.concatenate([np.asarray(r) for r in state.rate_norms])
  assert np.all(rates >= 1 - 1e-12) and np.max(rates) > 1.5, rates
  # The rates are invariant: the same from a rescaled start.
  rescaled = gsgd_jax.random_rescale(problem.params, problem.layers, jax.random.key(4))
  (_, again), _ = train_scan(tx, rescaled, problem.loss, STEPS, lambda _: 0)
  chex.assert_trees_all_close(again.rate_norms, state.rate_norms, rtol=1e-9)
  exact = gsgd_jax.gsgd(1.0, layers=problem.layers)
  _, want = train_scan(exact, problem.params, problem.loss, STEPS, observe)
  assert float(jnp.max(jnp.abs(got - want))) > 1e-2 * float(jnp.max(jnp.abs(want)))


# ----------------------------------------------------------------------------
# The new blocks in NNX, with probes, inject_hyperparams and orbax.


def test_nnx_plainnet_bn_training_is_invariant():
  model = NNXPlainNetBN(2, (4, 5, 4), nnx.Rngs(0))
  problem = nnx_norm(model, (6, 5, 5, 2))
  gap, moved = _trajectory_gap(problem, problem.layers, INVARIANT["gsgd_momentum"])
  assert moved > 0.1 and gap < 1e-9, (gap, moved)
  gap, _ = _trajectory_gap(problem, problem.layers, lambda _: optax.sgd(0.02, momentum=0.9))
  assert gap > 1e-2, gap


def test_probes_after_an_affine_layer_give_the_same_updates():
  """A probe on the pre-LN block's hidden layer (fc1, after the LayerNorm's affine layer)
  stands in for its reduction: the same trajectory, on (batch, sequence, features) tokens."""
  module = PreLNFeedForward()
  plain = linen_norm(module, preln_blocks(module), (5, 3, 4))
  probed = linen_norm(PreLNFeedForward(dense=probes.Dense), preln_blocks(module), (5, 3, 4))
  params = {**plain.params}
  for i in range(module.blocks):
    params[f"fc1_{i}"] = {**plain.params[f"fc1_{i}"], "scale_probe": jnp.ones(module.hidden)}
  assert gsgd_jax.verify_probes(probed.loss, params, probed.layers) < 1e-8
  tx = INVARIANT["gsgd_momentum"](plain.layers)
  _, want = train_scan(tx, plain.params, plain.loss, 5, lambda p: plain.forward(p, plain.x))
  _, got = train_scan(tx, params, probed.loss, 5, lambda p: probed.forward(p, probed.x))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("decay", [False, True])
def test_inject_hyperparams_and_orbax_resume_with_normalized_blocks(tmp_path, decay):
  """With the implicit decay the rate norms are kept by the checkpoint too (a resumed run
  without them would take other steps); their start, injected as an array, is used as the
  number is."""
  module, blocks, shape = MODELS["resnet"]
  problem = linen_norm(module, blocks(), shape)
  settings = {"momentum": 0.9, "layers": problem.layers, "implicit_decay": decay}
  if decay:
    settings["initial_rate_norm"] = 2.0
  injected = optax.inject_hyperparams(gsgd_jax.gsgd)(0.05, **settings)
  plain = gsgd_jax.gsgd(0.05, **settings)
  runs = [
    train_scan(tx, problem.params, problem.loss, 4, lambda p: p)[0] for tx in (plain, injected)
  ]
  chex.assert_trees_all_close(runs[0][0], runs[1][0], rtol=1e-13, atol=1e-15)

  step = jax.jit(lambda p, s: _apply_step(injected, problem.loss, p, s))
  params, state = runs[1]
  restored = orbax_roundtrip(tmp_path, {"params": params, "state": state})
  assert jax.tree.structure(restored["state"]) == jax.tree.structure(state)
  straight, resumed = (params, state), (restored["params"], restored["state"])
  for _ in range(3):
    straight, resumed = step(*straight), step(*resumed)
  chex.assert_trees_all_equal(straight, resumed)


def _apply_step(tx, loss, params, state):
  updates, state = tx.update(jax.grad(loss)(params), state, params)
  return optax.apply_updates(params, updates), state


def test_norm_growth_benchmark_writes_its_report(tmp_path):
  from benchmarks import norm_growth

  argv = ["--steps", "40", "--lr", "3.0", "--train", "512", "--shadow-every", "20"]
  norm_growth.main([*argv, "--shadow-steps", "5", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["renormalized_finite"] and result["max_norm_with"] < result["max_norm_without"]
  assert result["shadow_max_gap"] < 1e-3
  assert "| 10 |" in (tmp_path / "result.md").read_text()


@pytest.mark.slow
def test_bn_stability_benchmark_writes_its_report(tmp_path):
  from benchmarks import bn_stability

  argv = ["--depth", "3", "--steps", "10", "--seeds", "0", "--train", "512"]
  bn_stability.main([*argv, "--optimizers", "G-SGD,SGD,G-SGD-decay", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "bn_stability.json").read_text())
  assert [r["optimizer"] for r in result["runs"]] == ["G-SGD", "SGD", "G-SGD-decay"]
  with pytest.raises(SystemExit):
    bn_stability.main([*argv, "--optimizers", "Adam"])
  for r in result["runs"]:
    assert r["finite"] and 0 <= r["test_accuracy_recalibrated"] <= 1
    assert r["smallest_skeleton"] > 0 and np.isfinite(r["largest_bn_bias"])
  assert "| G-SGD | 1 | 0 |" in (tmp_path / "bn_stability.md").read_text()
