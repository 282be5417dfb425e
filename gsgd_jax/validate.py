"""Checking that a model really has the rescaling symmetry its declared layers assume."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax.basis import node_sums
from gsgd_jax.init import rescale
from gsgd_jax.structure import LayerPaths, build_structure, locate_blocks


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


def verify_probes(loss_fn: Callable[[Any], Any], params: Any, layers: LayerPaths, *,
                  key: jax.Array | None = None, rtol: float | None = None) -> float:
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
  """
  key = jax.random.key(0) if key is None else key
  blocks, wheres, treedef = build_structure(params, layers)
  leaves = list(jax.tree.leaves(params))
  for where in wheres:
    for i in where.bias:
      if i is not None:
        key, sub = jax.random.split(key)
        leaves[i] = leaves[i] + 0.1 * jax.random.normal(sub, jnp.shape(leaves[i]),
                                                        jnp.result_type(leaves[i]))
  params = treedef.unflatten(leaves)
  grads = jax.grad(loss_fn)(params)
  grad_leaves, _, grad_wheres = locate_blocks(grads, blocks, "grads")
  wide = jnp.float64 if jax.config.x64_enabled else jnp.float32
  worst, checked = 0.0, 0
  for block, where, grad_where in zip(blocks, wheres, grad_wheres):
    for k, spec in enumerate(block.layers):
      if where.probe[k] is None or grad_where.probe[k] is None:
        continue
      kernel = leaves[where.kernel[k]]
      tol = rtol if rtol is not None else _default_rtol(jnp.result_type(kernel))
      bias = None if where.bias[k] is None else leaves[where.bias[k]]
      bias_grad = None if bias is None else grad_leaves[grad_where.bias[k]]
      expected = node_sums(jnp.asarray(kernel), jnp.asarray(grad_leaves[grad_where.kernel[k]]),
                           bias, bias_grad, wide)
      probed = (jnp.asarray(leaves[where.probe[k]], wide)
                * jnp.asarray(grad_leaves[grad_where.probe[k]], wide))
      scale = float(jnp.max(jnp.abs(expected))) or 1.0
      diff = float(jnp.max(jnp.abs(probed - expected))) / scale
      worst, checked = max(worst, diff), checked + 1
      if not np.isfinite(diff) or diff > tol:
        raise ValueError(
            f"layer {spec.name!r}: scale_probe * its gradient differs from "
            f"sum(kernel * grad) + bias * bias_grad by {diff:.3g} (relative). Multiply "
            "the layer's outputs, bias included, by its probe "
            "(gsgd_jax.probes.scale_probe), with only ReLU or pooling before the next "
            "declared layer.")
  if not checked:
    raise ValueError("no declared layer has a 'scale_probe' leaf (see gsgd_jax.probes)")
  return worst


def _default_rtol(dtype) -> float:
  bits = jnp.finfo(dtype).bits
  return 1e-8 if bits == 64 else 1e-4 if bits == 32 else 3e-2
