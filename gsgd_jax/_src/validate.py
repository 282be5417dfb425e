"""Checks: the model has the symmetry its declared layers assume; probes and skeleton are sound."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
# gates move) with floating inputs scaled up, so activations leave the range
# where relu6, tanh or a norm's statistics look homogeneous.
_INPUT_SCALE = 10.0

# The outputs of a normalized block are checked from a common scale of 2**30
# (2**4 where that overflows, and in float16, whose range is small): a BatchNorm's
# sqrt(a^2 var + eps) equals a sqrt(var + eps) only up to eps / (2 var), and a
# weight standardization's (w - mean) / (std + eps) its own scale up to eps / std,
# which at the real scale can exceed float32's and float64's tolerances; lifted by
# 2**30, eps is below the rounding of a^2 var, and what is left is the symmetry.
# The lift itself may change the outputs by no more than an epsilon can: 1% of
# their scale. More means something between the block and its norm is not
# positively homogeneous (tanh, GELU, relu6 saturate or turn ReLU-like there).
_NORMALIZED_LIFTS = (2.0**30, 2.0**4)
_NORMALIZED_LIFTS_FLOAT16 = (2.0**4,)
_EPSILON_ALLOWANCE = 1e-2


def _default_rtol(dtype: Any) -> float:
  bits = jnp.finfo(dtype).bits
  return 1e-8 if bits == 64 else 1e-4 if bits == 32 else 3e-2


def _floating(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def _perturbed(params: Any, key: jax.Array, log_range: float) -> Any:
  """Every floating leaf times ``exp(U(-log_range, log_range))`` elementwise plus
  Gaussian noise of half its RMS (0.1 for an all-zero leaf); leaves named
  ``var`` (BatchNorm's running variance) only multiplied, so they stay positive.

  The draws come from NumPy, seeded from ``key``: a check that runs once needs no
  compiled random-number program per leaf shape.
  """
  paths, leaves, treedef = pytree.leaf_paths(params)
  rng = _numpy_rng(key)
  out = []
  for path, leaf in zip(paths, leaves, strict=True):
    if not _floating(jnp.result_type(leaf)):
      out.append(leaf)
      continue
    wide = np.asarray(leaf, np.float64)
    moved = wide * np.exp(rng.uniform(-log_range, log_range, wide.shape))
    if not (path and path[-1] == "var"):
      rms = float(np.sqrt(np.mean(np.square(wide)))) if wide.size else 0.0
      moved = moved + (0.5 * rms if rms > 0 else 0.1) * rng.standard_normal(wide.shape)
    out.append(jnp.asarray(moved, jnp.result_type(leaf)))
  return treedef.unflatten(out)


def _numpy_rng(key: jax.Array) -> np.random.Generator:
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  return np.random.default_rng(np.asarray(jax.random.key_data(key) if typed else key).ravel())


def _scaled_inputs(x: Any, input_scale: Any) -> Any:
  """``x`` with its floating leaves times ``input_scale`` (a number, or a pytree prefix
  of ``x`` of numbers); integer and boolean leaves (token ids, masks) as they are."""

  def scale(factor: Any, sub: Any) -> Any:
    def leaf(a: Any) -> Any:
      if factor is None or not _floating(jnp.result_type(a)):
        return a
      return a * jnp.asarray(factor, jnp.result_type(a))

    return jax.tree.map(leaf, sub)

  if input_scale is None or isinstance(input_scale, (int, float)):
    return scale(input_scale, x)
  return jax.tree.map(scale, input_scale, x, is_leaf=lambda f: f is None)


def _power_of_two_factors(rng: np.random.Generator, shape: tuple[int, ...], max_exponent: int):
  """Factors ``2**n``, ``n`` drawn uniformly from the nonzero integers in
  ``[-max_exponent, max_exponent]``: rescaling by them is exact in every binary
  floating-point format, so a model that has the symmetry reproduces its outputs
  to the last bit, and only a broken symmetry (or a norm's epsilon) shows."""
  magnitude = rng.integers(1, max_exponent + 1, shape)
  sign = rng.choice(np.array([-1, 1]), shape)
  exponents = sign * magnitude
  if shape[-1] >= 2:
    # Never all alike: a common factor is what a LayerNorm or RMSNorm absorbs too.
    exponents[..., 0] = -exponents[..., 1]
  return jnp.asarray(np.exp2(exponents), jnp.float32)


class _Outputs(NamedTuple):
  """A model's outputs as float64 NumPy arrays (compared in a precision at least the
  model's own), and their dtypes."""

  arrays: list[np.ndarray]
  dtypes: list[np.dtype]


def _outputs(apply_fn: Callable[[Any, Any], Any], params: Any, x: Any) -> _Outputs:
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(apply_fn(params, x))]
  return _Outputs([np.asarray(a, np.float64) for a in leaves], [a.dtype for a in leaves])


def _lifts(dtypes: Sequence[Any]) -> tuple[float, ...]:
  """The common factors a normalized block's outputs may be checked from, in order of
  preference (see ``_NORMALIZED_LIFTS``)."""
  if any(np.dtype(d) == np.float16 for d in dtypes):
    return _NORMALIZED_LIFTS_FLOAT16
  return _NORMALIZED_LIFTS


def _max_difference(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
  return max(
    (float(np.max(np.abs(o - r), initial=0.0)) for o, r in zip(outputs, reference, strict=True)),
    default=0.0,
  )


def _describe_scale(input_scale: Any) -> str:
  if input_scale is None or isinstance(input_scale, (int, float)):
    return f"{1 if input_scale is None else input_scale:g}"
  return "input_scale"


def _non_finite_outputs(where: str, given: bool) -> str:
  """The message when ``apply_fn`` returns NaN or inf before anything is rescaled."""
  if given:
    return (
      "verify_invariance: apply_fn returned NaN or infinite outputs at the params given, "
      "before any rescaling: check the model and its inputs first."
    )
  return (
    "verify_invariance: apply_fn returned NaN or infinite outputs "
    f"{where}, before any rescaling; this is not a failure of the "
    "symmetry. Integer inputs are never scaled; if floating inputs hold indices, "
    "positions or masks, pass input_scale as a pytree prefix of x with None (or 1) "
    "there, e.g. input_scale=(10.0, None) for x=(features, positions), or "
    "perturb=False."
  )


def _rescaled(
  params: Any,
  layers: LayerPaths,
  blocks: Sequence[structure.ChainStructure],
  b: int,
  level: int,
  factors: jax.Array,
) -> Any:
  """``params`` with level ``level`` of block ``b`` rescaled by ``factors``."""
  per_block: list[list[Any]] = [[None] * (block.depth + 1) for block in blocks]
  per_block[b][level] = factors
  return rescaling.rescale(params, layers, per_block)


def verify_invariance(
  apply_fn: Callable[[Any, Any], Any],
  params: Any,
  layers: LayerPaths,
  x: Any,
  *,
  key: jax.Array | None = None,
  rtol: float | None = None,
  atol: float | None = None,
  max_exponent: int = 2,
  perturb: bool = True,
  input_scale: Any = _INPUT_SCALE,
) -> float:
  """Checks that rescaling the declared hidden nodes leaves the model's outputs unchanged.

  G-SGD is exact only if every hidden node of every declared block can be
  rescaled by a positive factor (incoming weights and bias times ``c``, outgoing
  weights divided by ``c``) without changing the function, and, in a block
  declared ``normalized=True``, every output node too (incoming weights and
  bias times ``c``: the BatchNorm after it absorbs ``c``). This rescales one
  level at a time by random powers of two and compares ``apply_fn(params,
  x)``, so a failure names the first layer whose outputs may not be rescaled:
  a tanh, GELU or sigmoid after it, a normalisation or a residual addition
  inside a block, a block declared normalized whose outputs feed no BatchNorm
  (or a LayerNorm, GroupNorm or RMSNorm, which mix channels), or layers
  declared out of order. For models with BatchNorm, pass an ``apply_fn`` in
  training mode (batch statistics): that is the function G-SGD trains.

  Powers of two rescale exactly in every floating-point format, so a correct
  declaration reproduces the outputs to the last bit and the tolerance only
  has to absorb what a model computes differently for other reasons. A
  BatchNorm's epsilon makes its symmetry approximate (``sqrt(a^2 var + eps)``
  is ``a sqrt(var + eps)`` up to ``eps / (2 var)``); the outputs of a
  normalized block are therefore compared between two rescalings from a common
  factor of ``2**30`` (``2**4`` in float16 or where ``2**30`` overflows), where
  epsilon is below rounding; that common factor may itself move the outputs by
  no more than 1% of their scale, which an epsilon can but a tanh, GELU or
  relu6 between the block and its BatchNorm cannot. Outputs are compared in
  float64, whatever the model's dtype.

  A model can be invariant at its initial params and stop being so once
  trained (``relu6`` below 6, a zero-initialised bias or gate, BatchNorm in
  evaluation mode with fresh statistics). With ``perturb`` the check also runs
  at params moved at random (every floating leaf of ``params`` multiplied by
  ``exp(U(-1, 1))`` and given Gaussian noise; leaves named ``var`` only
  multiplied) on floating inputs scaled by ``input_scale``. Integer and
  boolean inputs (token ids, masks) are never scaled. To check running
  statistics too, pass the whole variables (``{'params': ..., 'batch_stats':
  ...}``) as ``params`` and an ``apply_fn`` that takes them. Run it once on a
  new model before training with G-SGD, and again after changing its
  architecture or its declaration.

  Args:
    apply_fn: ``apply_fn(params, x)`` returns the model's outputs (any pytree).
    params: the model's parameters (or all its variables).
    layers: the layers' key paths, one chain or several blocks.
    x: a batch of inputs (any pytree).
    key: PRNG key of the factors and perturbations (default
      ``jax.random.key(0)``).
    rtol: tolerance relative to the largest output magnitude; default by the
      least precise dtype of the outputs and the declared kernels: 1e-8
      (float64), 1e-4 (float32), 3e-2 (16-bit).
    atol: absolute tolerance; default ``rtol`` times the smallest normal
      float32 number's square root, i.e. negligible.
    max_exponent: factors are ``2**n`` with ``n`` drawn from the nonzero
      integers in ``[-max_exponent, max_exponent]``.
    perturb: also check at randomly perturbed params and scaled inputs.
    input_scale: the factor of the floating inputs at the perturbed params: a
      number, or a pytree prefix of ``x`` giving one per part (``None`` or 1
      where floating inputs hold indices, positions or masks that must not
      change).

  Returns:
    The largest difference seen, relative to the largest output magnitude.

  Raises:
    ValueError: naming the layer (and block) whose output rescaling changed the
      outputs, by how much, and whether at the given or the perturbed params;
      or, when ``apply_fn`` itself returns NaN or infinite outputs before any
      rescaling, saying so.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> x = jnp.ones((4, 3))
    >>> relu = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = relu.init(jax.random.key(0), x)
    >>> layers = gsgd_jax.infer_layers(params)
    >>> gsgd_jax.verify_invariance(relu.apply, params, layers, x)  # bit for bit
    0.0
    >>> gelu = nn.Sequential([nn.Dense(8), nn.gelu, nn.Dense(2)])
    >>> gsgd_jax.verify_invariance(gelu.apply, gelu.init(jax.random.key(0), x), layers, x)
    Traceback (most recent call last):
    ...
    ValueError: rescaling the output nodes of layer 'params/layers_0' ...
  """
  if isinstance(max_exponent, bool) or not isinstance(max_exponent, int) or max_exponent < 1:
    raise ValueError(
      f"verify_invariance: max_exponent must be an integer >= 1, got {max_exponent!r}"
    )
  key = jax.random.key(0) if key is None else key
  blocks = structure.build_structure(params, layers)
  located = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
  kernels = [located.leaves[i] for slots in located.slots for i in slots.kernel]
  # (where, what a failure there suggests, params, inputs)
  points = [("at the params given", "", params, x)]
  if perturb:
    key, sub = jax.random.split(key)
    points.append(
      (
        f"at randomly perturbed params on floating inputs scaled by {_describe_scale(input_scale)}",
        " (the symmetry holds at the given params only: relu6 or another clipped "
        "activation, a zero-initialised bias or gate, or fixed normalisation "
        "statistics?)",
        _perturbed(params, sub, 1.0),
        _scaled_inputs(x, input_scale),
      )
    )
  rng = _numpy_rng(key)
  kernel_dtypes = [jnp.result_type(w) for w in kernels]
  worst = 0.0
  for where, hint, point_params, point_x in points:
    reference = _outputs(apply_fn, point_params, point_x)
    if not all(np.all(np.isfinite(r)) for r in reference.arrays):
      raise ValueError(_non_finite_outputs(where, point_params is params))
    floating = [d for d in (*reference.dtypes, *kernel_dtypes) if _floating(d)]
    tol = rtol if rtol is not None else max(map(_default_rtol, floating), default=1e-8)
    floor = atol if atol is not None else tol * float(np.sqrt(np.finfo(np.float32).tiny))
    scale = max((float(np.max(np.abs(r))) for r in reference.arrays if r.size), default=0.0)
    scale = scale or 1.0
    lifts = _lifts([*reference.dtypes, *kernel_dtypes])
    for b, block in enumerate(blocks):
      # Hidden levels, and a normalized block's outputs (S1).
      for level in range(1, block.depth + block.normalized):
        shape = (block.layers[level - 1].n_out,)
        if block.stack is not None:  # every copy by its own factors
          shape = (block.copies, *shape)
        factors = _power_of_two_factors(rng, shape, max_exponent)
        compared = reference.arrays
        if level == block.depth:  # a normalized block's outputs, from a common lift
          lift, compared = _lifted_reference(
            apply_fn, (point_params, point_x), (layers, blocks, b), shape, lifts
          )
          lifted_by = _max_difference(compared, reference.arrays) / scale
          if lifted_by > max(_EPSILON_ALLOWANCE, tol):
            raise ValueError(_lift_failure(block, b, len(blocks), where + hint, lifted_by, lift))
          factors = factors * lift
        rescaled = _rescaled(point_params, layers, blocks, b, level, factors)
        diff = _max_difference(_outputs(apply_fn, rescaled, point_x).arrays, compared)
        worst = max(worst, diff / scale)
        if not np.isfinite(diff) or diff > floor + tol * scale:
          raise ValueError(_symmetry_failure(blocks, b, level, where + hint, diff, scale))
  return worst


def _lifted_reference(
  apply_fn: Callable[[Any, Any], Any],
  point: tuple[Any, Any],
  declared: tuple[LayerPaths, Sequence[structure.ChainStructure], int],
  shape: tuple[int, ...],
  lifts: Sequence[float],
) -> tuple[float, list[np.ndarray]]:
  """The first of ``lifts`` at which the outputs with block ``b``'s outputs lifted by it
  are finite, and those outputs; raises when they overflow at every lift."""
  params, x = point
  layers, blocks, b = declared
  for lift in lifts:
    lifted = _rescaled(params, layers, blocks, b, blocks[b].depth, jnp.full(shape, lift))
    outputs = _outputs(apply_fn, lifted, x).arrays
    if all(np.all(np.isfinite(o)) for o in outputs):
      return lift, outputs
  raise ValueError(
    f"verify_invariance: with the outputs of layer {blocks[b].layers[-1].name!r} (declared "
    f"normalized=True) lifted by {', '.join(map(_power, lifts))} in turn, the "
    "model's outputs overflowed each time: does the model compute in a format of small "
    "range (float16) where its params are float32? Check its outputs' normalization, or "
    "check in float32."
  )


def _power(lift: float) -> str:
  return f"2**{round(np.log2(lift))}"


def _lift_failure(
  block: structure.ChainStructure, b: int, count: int, where: str, lifted_by: float, lift: float
) -> str:
  """The message when lifting a normalized block's outputs moved the model's outputs by
  more than a norm's epsilon can."""
  of_block = f" of block {b}" if count > 1 else ""
  return (
    f"lifting the outputs of layer {block.layers[-1].name!r}{of_block} (declared "
    f"normalized=True) by a common factor of {_power(lift)} changed the model's outputs {where} by "
    f"{lifted_by:.3g} of their scale, more than a BatchNorm's epsilon can "
    f"({_EPSILON_ALLOWANCE:g}): something between this layer and the norm it feeds is not "
    "positively homogeneous (a tanh, GELU, sigmoid or relu6 before the BatchNorm), or no "
    "BatchNorm follows it. Declare the block without normalized=True, or move the "
    "activation after the norm."
  )


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
      "per-channel normalization (BatchNorm, or a weight standardization of this "
      "layer's own kernel) that absorbs each output's scale: check that a BatchNorm "
      "follows this layer and that apply_fn runs it in training mode (batch "
      "statistics). A LayerNorm, GroupNorm or RMSNorm mixes channels and absorbs no "
      "single channel's scale: declare the block without normalized=True."
    )
  query_key = any(layer.reading is not None and layer.reading.transposed for layer in block.layers)
  if query_key:  # a query-key chain: the likeliest mistake is the RoPE pairing
    pairs = spec.reading.pairs if spec.reading is not None else None
    head += (
      f" Its rotary pairs are declared pairs={pairs!r}: check that they are how the model "
      "rotates positions ('half' for Hugging Face's rotate_half, 'interleaved' for "
      "adjacent pairs as in Meta's and GPT-J's code, None without rotary embeddings)."
    )
  return (
    f"{head} G-SGD needs every declared hidden node to be positively rescalable: "
    "check for a non-ReLU activation (tanh, GELU, sigmoid, relu6), the gate of a gated "
    "block declared in place of its up projection (the chain is [up, down]), a query or "
    "key declared in place of an attention's value, grouped-query attention's heads "
    "grouped with another kv_heads or head_dim than the model's, a normalisation "
    "(a block cannot run through a norm: see gsgd_jax.infer_blocks), a weight-"
    "standardized convolution after it, a bias or a residual addition after this "
    "layer inside the block, and that `layers` are in forward order."
  )


def check_skeleton(params: optax.Params, blocks: tuple[structure.ChainStructure, ...]) -> None:
  """Raises if a skeleton weight is zero, subnormal or not finite, naming the layer and node.

  Every basis path divides by products of skeleton weights, so a zero one would
  make path gradients infinite (in ``update`` such paths take no step; see
  ``basis._usable``). Weight allocation never moves F and keeps the
  outgoing skeleton weights' signs (clipped ratios), so a start without zeros
  stays without zeros. Skipped when ``params`` are traced (``init`` under jit).
  Warns when a hidden node's skeleton-chain product is extreme.
  """
  leaves, _, slots = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
  kernels = [block_slots.take(leaves).kernels for block_slots in slots]
  if any(isinstance(w, jax.core.Tracer) for block_kernels in kernels for w in block_kernels):
    return
  # One compiled program for all blocks: run eagerly, each small operation would compile
  # a program of its own (about a second for an MLP's first init, ten for a ResNet-34).
  summaries = _compiled_summaries(blocks)([[jnp.asarray(w) for w in ws] for ws in kernels])
  for block, (weights, node_products) in zip(blocks, summaries, strict=True):
    for k, spec in enumerate(block.layers):
      for (kind, side), values in zip(_skeleton_kinds(block, k), weights[k], strict=True):
        tiny = float(jnp.finfo(basis.compute_dtype(values.dtype)).tiny)
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
    if node_products is not None:
      _warn_extreme_products(block, np.asarray(node_products, np.float64))


@functools.lru_cache(maxsize=64)
def _compiled_summaries(blocks: tuple[structure.ChainStructure, ...]):
  """``_skeleton_summary`` of every block, jitted as one program per declaration (the
  structures are cached, so a model's later inits reuse it)."""
  return jax.jit(
    lambda kernels: [_skeleton_summary(*pair) for pair in zip(blocks, kernels, strict=True)]
  )


def _skeleton_kinds(block: structure.ChainStructure, k: int) -> list[tuple[str, str]]:
  """``(kind, side)`` of the skeleton weights layer ``k`` holds: incoming ones (per output
  node) and outgoing ones (per input node), where the chain has them."""
  kinds = []
  if block.pi[k] is not None:
    kinds.append(("incoming", "output"))
  if block.sigma[k] is not None:
    kinds.append(("outgoing", "input"))
  return kinds


def _layer_skeleton_weights(
  block: structure.ChainStructure, k: int, kernel: jax.Array
) -> list[jax.Array]:
  """Layer ``k``'s skeleton weights, per copy of a stack, in the order of
  ``_skeleton_kinds``."""
  spec = block.layers[k]
  take = {
    "incoming": lambda _, w: basis.incoming_skeleton(w, spec, structure.defined(block.pi[k])),
    "outgoing": lambda _, w: basis.outgoing_skeleton(w, spec, structure.defined(block.sigma[k])),
  }
  return [per_copy(block, take[kind], STACK, 0)(kernel) for kind, _ in _skeleton_kinds(block, k)]


def _skeleton_summary(
  block: structure.ChainStructure, kernels: list[jax.Array]
) -> tuple[list[list[jax.Array]], jax.Array | None]:
  """Per layer, its skeleton weights in the order of ``_skeleton_kinds``, per copy of a
  stack; and every hidden node's skeleton-chain product ``|B F|`` (``None`` for a chain
  of one layer), ``(copies..., hidden nodes)``."""
  weights = [_layer_skeleton_weights(block, k, kernel) for k, kernel in enumerate(kernels)]
  if block.depth < 2:
    return weights, None
  products = basis.skeleton_products(
    block, kernels, jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
  )
  # (copies..., hidden nodes): the hidden nodes of every copy.
  node_products = basis.per_level(lambda b, f: jnp.abs(b * f), products.back, products.forward)
  return weights, basis.hidden_levels(node_products, block)


def _warn_extreme_products(block: structure.ChainStructure, node_products: np.ndarray) -> None:
  """Warns when some hidden node's skeleton-chain product ``B F`` is extreme (the
  products of its hidden nodes, every copy of a stack)."""
  low, high = float(node_products.min()), float(node_products.max())
  if low < PRODUCT_RANGE[0] or high > PRODUCT_RANGE[1]:
    warnings.warn(
      f"G-SGD: skeleton-chain products B*F of the hidden nodes of the block starting at "
      f"{block.layers[0].name!r} span [{low:.3g}, {high:.3g}]; weight steps scale as "
      "1/(B F)^2, so training may diverge. On a fresh initialisation, call "
      "gsgd_jax.set_skeleton(params, layers) before training, as the authors do; "
      "weights trained in weight space (which set_skeleton would change) are better "
      "fine-tuned with a weight-space optimizer.",
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
      sums = lambda s, w, g, b, gb, k=k: basis.node_sums(s.layers[k], w, g, b, gb, wide)
      expected = per_copy(block, sums, STACK, 0)(
        jnp.asarray(p.kernels[k]), jnp.asarray(g.kernels[k]), p.biases[k], g.biases[k]
      )
      probed = jnp.asarray(p.probes[k], wide) * jnp.asarray(g.probes[k], wide)
      if block.stack is not None:  # per copy, as `expected`
        probed = jnp.moveaxis(probed, block.stack.axis, 0)
      # A general kernel's probe has its output axes: its entries summed per node.
      fold = lambda s, x, k=k: basis.fold_outputs(x, s.layers[k])
      probed = per_copy(block, fold, 0, 0)(probed)
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
