"""Checks: the model has the symmetry its declared layers assume; probes and skeleton are sound."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax._src import basis, pytree, rescaling, structure
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays
from gsgd_jax._src.stacking import STACK, per_copy

# Skeleton-chain products outside this range make G-SGD's weight steps, which
# scale as 1/(B F)^2, explode or vanish.
PRODUCT_RANGE = (1e-3, 1e3)

# Where verify_invariance checks: the params as given, then params moved at
# random (multiplicative and additive noise, so zero-initialised biases and
# gates move) with inputs scaled up, so activations leave the range where
# relu6, tanh or a norm's statistics look homogeneous.
_INPUT_SCALE = 10.0


def _default_rtol(dtype: Any) -> float:
  bits = jnp.finfo(dtype).bits
  return 1e-8 if bits == 64 else 1e-4 if bits == 32 else 3e-2


def _perturbed(params: Any, key: jax.Array, log_range: float) -> Any:
  """Every floating leaf times ``exp(U(-log_range, log_range))`` elementwise plus
  Gaussian noise of half its RMS (0.1 for an all-zero leaf); leaves named
  ``var`` (BatchNorm's running variance) only multiplied, so they stay positive.

  The draws come from NumPy, seeded from ``key``: a check that runs once needs no
  compiled random-number program per leaf shape.
  """
  paths, leaves, treedef = pytree.leaf_paths(params)
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key) if typed else key).ravel())
  out = []
  for path, leaf in zip(paths, leaves, strict=True):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      out.append(leaf)
      continue
    wide = np.asarray(leaf, np.float64)
    moved = wide * np.exp(rng.uniform(-log_range, log_range, wide.shape))
    if not (path and path[-1] == "var"):
      rms = float(np.sqrt(np.mean(np.square(wide)))) if wide.size else 0.0
      moved = moved + (0.5 * rms if rms > 0 else 0.1) * rng.standard_normal(wide.shape)
    out.append(jnp.asarray(moved, jnp.result_type(leaf)))
  return treedef.unflatten(out)


def verify_invariance(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  layers: LayerPaths,
  x: Any,
  *,
  key: jax.Array | None = None,
  rtol: float | None = None,
  atol: float | None = None,
  log_range: float = 1.0,
  perturb: bool = True,
) -> float:
  """Checks that rescaling the declared hidden nodes leaves the model's outputs unchanged.

  G-SGD is exact only if every hidden node of every declared block can be
  rescaled by a positive factor (incoming weights and bias times ``c``, outgoing
  weights divided by ``c``) without changing the function, and, in a block
  declared ``normalized=True``, every output node too (incoming weights and
  bias times ``c``: the BatchNorm after it absorbs ``c``). This rescales one
  level at a time by random factors ``exp(U(-log_range, log_range))`` and
  compares ``apply_fn(params, x)``, so a failure names the first layer whose
  outputs may not be rescaled: a tanh or sigmoid after it, a normalisation or a
  residual addition inside a block, a block declared normalized whose outputs
  feed no BatchNorm, or layers declared out of order. For models with
  BatchNorm, pass an ``apply_fn`` in training mode (batch statistics): that is
  the function G-SGD trains.

  A model can be invariant at its initial params and stop being so once
  trained (``relu6`` below 6, a zero-initialised bias or gate, BatchNorm in
  evaluation mode with fresh statistics). With ``perturb`` the check also runs
  at params moved at random (every floating leaf of ``params`` multiplied by
  ``exp(U(-1, 1))`` and given Gaussian noise; leaves named ``var`` only
  multiplied) on inputs scaled by 10. To check running statistics too, pass
  the whole variables (``{'params': ..., 'batch_stats': ...}``) as ``params``
  and an ``apply_fn`` that takes them. Run it once on a new model before
  training with G-SGD.

  Args:
    apply_fn: ``apply_fn(params, x)`` returns the model's outputs (any pytree).
    params: the model's parameters (or all its variables).
    layers: the layers' key paths, one chain or several blocks.
    x: a batch of inputs.
    key: PRNG key of the factors (default ``jax.random.key(0)``).
    rtol: tolerance relative to the largest output magnitude; default by the
      least precise dtype of the outputs and the declared kernels: 1e-8
      (float64), 1e-4 (float32), 3e-2 (16-bit).
    atol: absolute tolerance; default ``rtol`` times the smallest normal
      number's square root, i.e. negligible.
    log_range: half-width of the distribution of ``log c``.
    perturb: also check at randomly perturbed params and scaled inputs.

  Returns:
    The largest difference seen, relative to the largest output magnitude.

  Raises:
    ValueError: naming the layer (and block) whose output rescaling changed the
      outputs, by how much, and whether at the given or the perturbed params.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> x = jnp.ones((4, 3))
    >>> relu = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = relu.init(jax.random.key(0), x)
    >>> layers = gsgd_jax.infer_layers(params)
    >>> gsgd_jax.verify_invariance(relu.apply, params, layers, x) < 1e-4
    True
    >>> tanh = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
    >>> gsgd_jax.verify_invariance(tanh.apply, tanh.init(jax.random.key(0), x), layers, x)
    Traceback (most recent call last):
    ...
    ValueError: rescaling the output nodes of layer 'params/layers_0' ...
  """
  key = jax.random.key(0) if key is None else key
  blocks = structure.build_structure(params, layers)
  located = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
  kernels = [located.leaves[i] for slots in located.slots for i in slots.kernel]
  points = [("at the params given", params, x)]
  if perturb:
    key, sub = jax.random.split(key)
    scaled_x = jax.tree.map(lambda a: a * jnp.asarray(_INPUT_SCALE, jnp.result_type(a)), x)
    points.append(
      (
        "at randomly perturbed params on inputs scaled by "
        f"{_INPUT_SCALE:g} (the symmetry holds at the given params only: "
        "relu6 or another clipped activation, a zero-initialised bias or "
        "gate, or fixed normalisation statistics?)",
        _perturbed(params, sub, 1.0),
        scaled_x,
      )
    )
  worst = 0.0
  for where, point_params, point_x in points:
    reference = jax.tree.leaves(apply_fn(point_params, point_x))
    tol = (
      rtol
      if rtol is not None
      else max(_default_rtol(jnp.result_type(a)) for a in (*reference, *kernels))
    )
    floor = atol if atol is not None else tol * float(np.sqrt(np.finfo(np.float32).tiny))
    scale = max(float(jnp.max(jnp.abs(r.astype(jnp.float32)))) for r in reference) or 1.0
    for b, block in enumerate(blocks):
      # Hidden levels, and a normalized block's outputs (S1).
      for level in range(1, block.depth + block.normalized):
        key, sub = jax.random.split(key)
        shape = (block.layers[level - 1].n_out,)
        if block.stack is not None:  # every copy by its own factors
          shape = (block.copies, *shape)
        factors: list[list[Any]] = [[None] * (other.depth + 1) for other in blocks]
        factors[b][level] = jnp.exp(
          jax.random.uniform(sub, shape, jnp.float32, -log_range, log_range)
        )
        outputs = jax.tree.leaves(
          apply_fn(rescaling.rescale(point_params, layers, factors), point_x)
        )
        diff = max(
          float(jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32))))
          for o, r in zip(outputs, reference, strict=True)
        )
        worst = max(worst, diff / scale)
        if not np.isfinite(diff) or diff > floor + tol * scale:
          raise ValueError(_symmetry_failure(blocks, b, level, where, diff, scale))
  return worst


def _symmetry_failure(
  blocks: tuple[structure.ChainStructure, ...],
  b: int,
  level: int,
  where: str,
  diff: float,
  scale: float,
) -> str:
  """The message of a failed rescaling of level ``level`` of block ``b``."""
  block = blocks[b]
  spec = block.layers[level - 1]
  block_name = f" of block {b}" if len(blocks) > 1 else ""
  what = "affine layer" if spec.kind == "affine" else "layer"
  head = (
    f"rescaling the output nodes of {what} {spec.name!r}{block_name} by positive factors "
    f"changed the model's outputs {where} (max difference {diff:.3g}, output scale "
    f"{scale:.3g})."
  )
  if level == block.depth:  # the outputs of a normalized block
    return (
      f"{head} The block is declared normalized=True, so its outputs must feed a "
      "per-channel normalization (BatchNorm) that absorbs their scale: check that a "
      "BatchNorm follows this layer, that apply_fn runs it in training mode (batch "
      "statistics), and that its epsilon is small against the outputs' variance "
      "(epsilon makes the symmetry approximate: pass a larger rtol, or declare the "
      "block without normalized=True)."
    )
  return (
    f"{head} G-SGD needs every declared hidden node to be positively rescalable: "
    "check for a non-ReLU activation (tanh, sigmoid, relu6), a normalisation, a bias "
    "or a residual addition after this layer inside the block, and that `layers` are "
    "in forward order."
  )


def check_skeleton(params: optax.Params, blocks: tuple[structure.ChainStructure, ...]) -> None:
  """Raises if a skeleton weight is zero, subnormal or not finite, naming the layer and node.

  Every basis path divides by products of skeleton weights, so a zero one would
  make path gradients infinite (in ``update`` such paths take no step; see
  ``basis.reciprocal``). Weight allocation never moves F and keeps the
  outgoing skeleton weights' signs (clipped ratios), so a start without zeros
  stays without zeros. Skipped when ``params`` are traced (``init`` under jit).
  Warns when a hidden node's skeleton-chain product is extreme.
  """
  leaves, _, slots = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
  for block, block_slots in zip(blocks, slots, strict=True):
    kernels = block_slots.take(leaves).kernels
    if any(isinstance(w, jax.core.Tracer) for w in kernels):
      return
    kernels = [jnp.asarray(w) for w in kernels]
    for k, spec in enumerate(block.layers):
      entries = _skeleton_weights(block, k, kernels[k])
      tiny = float(jnp.finfo(basis.compute_dtype(kernels[k].dtype)).tiny)
      for kind, side, values in entries:
        magnitude = np.abs(np.asarray(values, np.float64))
        bad = np.argwhere(~np.isfinite(magnitude) | (magnitude < tiny))
        if bad.size:
          *copy, node = (int(i) for i in bad[0])
          of_copy = f" of copy {copy[0]} of the stack" if copy else ""
          raise ValueError(
            f"layer {spec.name!r}: the {kind} skeleton weight of {side} node {node}"
            f"{of_copy} is {float(values[tuple(bad[0])])} ({len(bad)} such); basis paths "
            "divide by skeleton weights. Call gsgd_jax.set_skeleton(params, layers) first."
          )
    _warn_extreme_products(block, kernels)


def _skeleton_weights(
  block: structure.ChainStructure, k: int, kernel: jax.Array
) -> list[tuple[str, str, jax.Array]]:
  """Layer ``k``'s incoming skeleton weights (per output node) and outgoing ones (per
  input node), where the chain has them: ``(kind, side, values)``, per copy of a stack."""
  spec, pi, sigma = block.layers[k], block.pi[k], block.sigma[k]
  entries = []
  if pi is not None:
    take = lambda _, w: basis.incoming_skeleton(w, spec, pi)
    entries.append(("incoming", "output", per_copy(block, take, STACK, 0)(kernel)))
  if sigma is not None:
    take = lambda _, w: basis.outgoing_skeleton(w, spec, sigma)
    entries.append(("outgoing", "input", per_copy(block, take, STACK, 0)(kernel)))
  return entries


def _warn_extreme_products(block: structure.ChainStructure, kernels: list[jax.Array]) -> None:
  """Warns when some hidden node's skeleton-chain product ``B F`` is extreme."""
  if block.depth < 2:
    return
  products = basis.skeleton_products(
    block, kernels, jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  )
  # (copies..., L + 1, W): the hidden nodes of every copy.
  node_products = np.abs(np.asarray(products.back * products.forward, np.float64))
  node_products = node_products[..., :-1, :][..., block.levels.hidden]
  low, high = float(node_products.min()), float(node_products.max())
  if low < PRODUCT_RANGE[0] or high > PRODUCT_RANGE[1]:
    warnings.warn(
      f"G-SGD: skeleton-chain products B*F of the hidden nodes of the block starting at "
      f"{block.layers[0].name!r} span [{low:.3g}, {high:.3g}]; weight steps scale as "
      "1/(B F)^2, so training may diverge. Call gsgd_jax.set_skeleton(params, layers) "
      "before training, as the authors do.",
      stacklevel=4,
    )


def verify_probes(
  loss_fn: Callable[[Any], Any],
  params: Any,
  layers: LayerPaths,
  *,
  key: jax.Array | None = None,
  rtol: float | None = None,
) -> float:
  """Checks that every scale probe's gradient equals the sum it stands for.

  For a layer with a ``scale_probe`` leaf ``s`` (see :mod:`gsgd_jax.probes`),
  ``s * dL/ds`` must equal ``sum_{i, taps} w g + b g_b`` per output node, or
  :func:`gsgd_jax.path_space` would use wrong path gradients. It does when the
  probe multiplies the layer's outputs, bias included, with only positively
  homogeneous operations (ReLU, pooling) in between. The check runs at
  ``params`` with every declared bias shifted by random values, so that a
  probe applied before the bias add shows even where biases are still 0.
  Run it once on a new model.

  Args:
    loss_fn: ``loss_fn(params)`` returns a scalar loss (on a fixed batch).
    params: the model's parameters, with probes.
    layers: the layers' key paths, one chain or several blocks.
    key: PRNG key of the bias shifts (default ``jax.random.key(0)``).
    rtol: tolerance relative to the largest sum of each layer; default by the
      kernels' dtype: 1e-8 (float64), 1e-4 (float32), 3e-2 (16-bit).

  Returns:
    The largest difference seen, relative to each layer's largest sum.

  Raises:
    ValueError: when no declared layer has a probe, or naming the first layer
      whose probe gradient does not match.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> from gsgd_jax import probes
    >>> model = nn.Sequential([probes.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
    >>> gsgd_jax.verify_probes(loss, params, gsgd_jax.infer_layers(params)) < 1e-4
    True
  """
  key = jax.random.key(0) if key is None else key
  blocks = structure.build_structure(params, layers)
  paths = structure.block_paths(blocks)
  bias_keys = iter(jax.random.split(key, sum(block.depth for block in blocks)))

  def shift_biases(_: int, arrays: LayerArrays):
    shift = lambda bias, k: (
      bias + 0.1 * jax.random.normal(k, jnp.shape(bias), jnp.result_type(bias))
    )
    return arrays.kernels, [
      None if bias is None else shift(bias, next(bias_keys)) for bias in arrays.biases
    ]

  params = pytree.map_layers(params, paths, shift_biases)
  grads = jax.grad(loss_fn)(params)
  located_params = pytree.locate_blocks(params, paths, "params")
  located_grads = pytree.locate_blocks(grads, paths, "grads")
  wide = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  worst, checked = 0.0, 0
  for block, param_slots, grad_slots in zip(
    blocks, located_params.slots, located_grads.slots, strict=True
  ):
    p, g = param_slots.take(located_params.leaves), grad_slots.take(located_grads.leaves)
    for k, spec in enumerate(block.layers):
      if p.probes[k] is None or g.probes[k] is None:
        continue
      tol = rtol if rtol is not None else _default_rtol(jnp.result_type(p.kernels[k]))
      sums = lambda _, w, g, b, gb: basis.node_sums(w, g, b, gb, wide)
      expected = per_copy(block, sums, STACK, 0)(
        jnp.asarray(p.kernels[k]), jnp.asarray(g.kernels[k]), p.biases[k], g.biases[k]
      )
      probed = jnp.asarray(p.probes[k], wide) * jnp.asarray(g.probes[k], wide)
      if block.stack is not None:  # per copy, as `expected`
        probed = jnp.moveaxis(probed, block.stack.axis, 0)
      scale = float(jnp.max(jnp.abs(expected))) or 1.0
      diff = float(jnp.max(jnp.abs(probed - expected))) / scale
      worst, checked = max(worst, diff), checked + 1
      if not np.isfinite(diff) or diff > tol:
        raise ValueError(
          f"layer {spec.name!r}: scale_probe * its gradient differs from "
          f"sum(kernel * grad) + bias * bias_grad by {diff:.3g} (relative). Multiply "
          "the layer's outputs, bias included, by its probe "
          "(gsgd_jax.probes.scale_probe), with only ReLU or pooling before the next "
          "declared layer."
        )
  if not checked:
    raise ValueError("no declared layer has a 'scale_probe' leaf (see gsgd_jax.probes)")
  return worst
