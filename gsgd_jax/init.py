"""Skeleton initialisation, skeleton masks and function-preserving rescaling."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gsgd_jax import basis as ps
from gsgd_jax.structure import LayerPaths, build_structure


def _map_layers(params: Any, layers: LayerPaths, kernel_fn, bias_fn, other_fn):
  """Rebuilds ``params`` with ``kernel_fn(block, k, struct, kernel)`` on each
  layer's kernel, ``bias_fn(block, k, struct, bias)`` on its bias and
  ``other_fn(leaf)`` elsewhere."""
  blocks, wheres, treedef = build_structure(params, layers)
  leaves = jax.tree.leaves(params)
  out = [other_fn(leaf) for leaf in leaves]
  for b, (struct, where) in enumerate(zip(blocks, wheres)):
    for k, spec in enumerate(struct.layers):
      kernel = leaves[where.kernel[k]]
      out[where.kernel[k]] = kernel_fn(b, k, struct, jnp.asarray(kernel))
      if where.bias[k] is not None:
        out[where.bias[k]] = bias_fn(b, k, struct, leaves[where.bias[k]])
  return treedef.unflatten(out)


def _skeleton(k, struct, which: str):
  spec = struct.layers[k]
  fixed = ps.fixed_mask(spec, struct.pi[k])
  mask = jnp.zeros(spec.kernel_shape, bool) if fixed is None else fixed
  if which == "all":
    out = ps.outgoing_mask(spec, struct.sigma[k])
    if out is not None:
      mask = mask | out
  elif which != "fixed":
    raise ValueError(f"`which` must be 'fixed' or 'all', got {which!r}")
  return jnp.broadcast_to(mask, spec.kernel_shape)


def skeleton_mask(params: Any, layers: LayerPaths, which: str = "fixed") -> Any:
  """Boolean pytree shaped like ``params`` marking skeleton edges.

  Args:
    params: parameter pytree.
    layers: ordered key paths of the layers.
    which: ``'fixed'`` marks the incoming skeleton edges F, which G-SGD never
      moves and whose basis-path value is reported as 0; ``'all'`` adds the
      outgoing skeleton edges (the paper's whole skeleton).

  Returns:
    A pytree of boolean arrays; biases and leaves outside ``layers`` are False.
  """
  false = lambda x: jnp.zeros(jnp.shape(x), bool)
  return _map_layers(params, layers, lambda _, k, s, w: _skeleton(k, s, which),
                     lambda _, k, s, b: false(b), false)


def set_skeleton(params: Any, layers: LayerPaths, value: float = 1.0) -> Any:
  """Sets every skeleton weight (incoming and outgoing) to ``value``.

  This is the authors' initialisation for G-SGD: with skeleton weights 1, basis
  path values start at the scale of single weights, which keeps ``dv / v``
  moderate in deep nets. It changes the network function, so apply it before
  training, to SGD's initialisation too when comparing the two.

  Args:
    params: parameter pytree.
    layers: ordered key paths of the layers.
    value: the value given to skeleton weights; must be nonzero.

  Returns:
    ``params`` with the skeleton weights replaced.
  """
  if value == 0:
    raise ValueError("set_skeleton: a zero skeleton weight makes every basis path "
                     "through it zero; use a nonzero value")
  return _map_layers(
      params, layers,
      lambda _, k, s, w: jnp.where(_skeleton(k, s, "all"), jnp.asarray(value, w.dtype), w),
      lambda _, k, s, b: b, lambda leaf: leaf)


def rescale(params: Any, layers: LayerPaths, factors) -> Any:
  """Applies the element of G with the given positive per-node factors.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.
    factors: ``factors[block][level]``: a vector of positive factors for the
      nodes of that level, or None to leave the level alone; levels run from 0
      (block inputs) to the block's depth (outputs), and only hidden levels
      ``1..depth-1`` may be rescaled without changing the function.

  Returns:
    ``params`` with every node ``j`` of a rescaled level multiplied on its
    incoming weights and bias, and divided on its outgoing weights.
  """

  def kernel_fn(b, k, s, w):
    ct = ps.compute_dtype(w.dtype)
    scaled = w.astype(ct)
    if factors[b][k + 1] is not None:
      scaled = scaled * ps.cols(jnp.asarray(factors[b][k + 1]).astype(ct))
    if factors[b][k] is not None:
      scaled = scaled / ps.rows(jnp.asarray(factors[b][k]).astype(ct), s.layers[k])
    return scaled.astype(w.dtype)

  def bias_fn(b, k, s, bias):
    if factors[b][k + 1] is None:
      return bias
    ct = ps.compute_dtype(bias.dtype)
    return (bias * jnp.asarray(factors[b][k + 1]).astype(ct)).astype(bias.dtype)

  return _map_layers(params, layers, kernel_fn, bias_fn, lambda leaf: leaf)


def random_rescale(params: Any, layers: LayerPaths, key: jax.Array,
                   log_range: float = 1.5) -> Any:
  """Rescales every hidden node by a random positive factor; the function is unchanged.

  Node ``j`` of each hidden level gets ``c_j = exp(U(-log_range, log_range))``:
  its incoming weights and bias are multiplied by ``c_j`` and its outgoing
  weights divided by it (an element of the group G of SPEC §1; for a
  convolution every tap, after a flatten every position). Basis-path values are
  unchanged. Inputs and outputs of each block are not rescaled.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.
    key: a JAX PRNG key.
    log_range: half-width of the uniform distribution of ``log c``.

  Returns:
    The rescaled params.
  """
  blocks, _, _ = build_structure(params, layers)
  factors = []
  for block, block_key in zip(blocks, jax.random.split(key, len(blocks))):
    keys = jax.random.split(block_key, max(block.depth - 1, 1))
    factors.append([None] + [
        jnp.exp(jax.random.uniform(keys[k], (spec.n_out,), jnp.float32,
                                   -log_range, log_range))
        for k, spec in enumerate(block.layers[:-1])] + [None])
  return rescale(params, layers, factors)
