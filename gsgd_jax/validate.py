"""Checking that a model really has the rescaling symmetry its declared layers assume."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax.init import rescale
from gsgd_jax.structure import LayerPaths, build_structure


def verify_invariance(apply_fn: Callable[[Any, Any], Any], params: Any, layers: LayerPaths,
                      x: Any, *, key: jax.Array | None = None, rtol: float = 1e-3,
                      atol: float = 1e-5, log_range: float = 1.0) -> float:
  """Checks that rescaling the declared hidden nodes leaves the model's outputs unchanged.

  G-SGD is exact only if every hidden node of every declared block can be
  rescaled by a positive factor (incoming weights and bias times ``c``, outgoing
  weights divided by ``c``) without changing the function. This rescales one
  hidden level at a time by random factors ``exp(U(-log_range, log_range))``
  and compares ``apply_fn(params, x)``, so a failure names the first layer whose
  outputs may not be rescaled: a tanh or sigmoid after it, a normalisation or a
  residual addition inside a block, or layers declared out of order. Run it
  once on a new model before training with G-SGD.

  Args:
    apply_fn: ``apply_fn(params, x)`` returns the model's outputs (any pytree).
    params: the model's parameters.
    layers: the layers' key paths, one chain or several blocks.
    x: a batch of inputs.
    key: PRNG key of the factors (default ``jax.random.key(0)``).
    rtol: relative tolerance of the comparison (scaled by the output's size).
    atol: absolute tolerance.
    log_range: half-width of the distribution of ``log c``.

  Returns:
    The largest difference seen, relative to the largest output magnitude.

  Raises:
    ValueError: naming the layer (and block) whose output rescaling changed the
      outputs, and by how much.
  """
  key = jax.random.key(0) if key is None else key
  blocks, _, _ = build_structure(params, layers)
  reference = jax.tree.leaves(apply_fn(params, x))
  scale = max(float(jnp.max(jnp.abs(r))) for r in reference) or 1.0
  worst = 0.0
  for b, block in enumerate(blocks):
    for level in range(1, block.depth):
      key, sub = jax.random.split(key)
      n = block.layers[level - 1].n_out
      factors = [[None] * (other.depth + 1) for other in blocks]
      factors[b][level] = jnp.exp(jax.random.uniform(sub, (n,), jnp.float32,
                                                     -log_range, log_range))
      outputs = jax.tree.leaves(apply_fn(rescale(params, layers, factors), x))
      diff = max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32))))
                 for o, r in zip(outputs, reference))
      worst = max(worst, diff / scale)
      if not np.isfinite(diff) or diff > atol + rtol * scale:
        where = f" of block {b}" if len(blocks) > 1 else ""
        raise ValueError(
            f"rescaling the output nodes of layer {block.layers[level - 1].name!r}{where} "
            f"by positive factors changed the model's outputs (max difference {diff:.3g}, "
            f"output scale {scale:.3g}). G-SGD needs every declared hidden node to be "
            "positively rescalable: check for a non-ReLU activation (tanh, sigmoid), a "
            "normalisation or a residual addition after this layer inside the block, and "
            "that `layers` are in forward order.")
  return worst
