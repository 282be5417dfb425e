"""Skeleton masks and the authors' skeleton initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gsgd_jax._src import basis, stacking, structure
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays, map_layers


def _skeleton(block: structure.ChainStructure, k: int, which: str) -> jax.Array:
  """Boolean mask of layer ``k``'s skeleton edges, in the kernel's shape (of one copy)."""
  spec = block.layers[k]
  if spec.kind == "affine":  # a norm's scale: every entry is its node's incoming skeleton edge
    return jnp.full(spec.kernel_shape, block.pi[k] is not None)
  fixed = basis.fixed_mask(spec, block.pi[k])
  mask = jnp.zeros(spec.kernel_shape, bool) if fixed is None else fixed
  if which == "all":
    out = basis.outgoing_mask(spec, block.sigma[k])
    if out is not None:
      mask = mask | out
  return jnp.broadcast_to(mask, spec.kernel_shape)


def skeleton_mask(params: optax.Params, layers: LayerPaths, which: str = "fixed") -> optax.Params:
  """Boolean pytree shaped like ``params`` marking skeleton edges.

  Args:
    params: parameter pytree.
    layers: ordered key paths of the layers.
    which: ``'fixed'`` marks the incoming skeleton edges F, which G-SGD never
      moves and whose basis-path value is reported as 0; ``'all'`` adds the
      outgoing skeleton edges (the paper's whole skeleton).

  Returns:
    A pytree of boolean arrays; biases and leaves outside ``layers`` are False.

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((2, 3))}, 'l1': {'kernel': jnp.ones((3, 2))}}
    >>> fixed = gsgd_jax.skeleton_mask(params, ['l0', 'l1'])
    >>> fixed['l0']['kernel'].tolist(), fixed['l1']['kernel'].any().item()
    ([[True, False, True], [False, True, False]], False)
  """
  if which not in ("fixed", "all"):
    raise ValueError(f"`which` must be 'fixed' or 'all', got {which!r}")
  blocks = structure.build_structure(params, layers)

  def masks(b: int, arrays: LayerArrays):
    return (
      [
        jnp.broadcast_to(stacking.expand(blocks[b], _skeleton(blocks[b], k, which)), jnp.shape(w))
        for k, w in enumerate(arrays.kernels)
      ],
      [None if bias is None else jnp.zeros(jnp.shape(bias), bool) for bias in arrays.biases],
    )

  return map_layers(
    params,
    structure.block_paths(blocks),
    masks,
    outside=lambda leaf: jnp.zeros(jnp.shape(leaf), bool),
  )


def set_skeleton(params: optax.Params, layers: LayerPaths, value: float = 1.0) -> optax.Params:
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

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {
    ...   'l0': {'kernel': jnp.full((2, 3), 0.5)},
    ...   'l1': {'kernel': jnp.full((3, 2), 0.5)},
    ... }
    >>> params = gsgd_jax.set_skeleton(params, ['l0', 'l1'])
    >>> params['l0']['kernel'].tolist()  # incoming skeleton edges j mod 2 -> j
    [[1.0, 0.5, 1.0], [0.5, 1.0, 0.5]]
    >>> params['l1']['kernel'].tolist()  # outgoing skeleton edges a -> a mod 2
    [[1.0, 0.5], [0.5, 1.0], [1.0, 0.5]]
  """
  if value == 0:
    raise ValueError(
      "set_skeleton: a zero skeleton weight makes every basis path "
      "through it zero; use a nonzero value"
    )
  blocks = structure.build_structure(params, layers)

  def with_skeleton(b: int, arrays: LayerArrays):
    kernels = [
      jnp.where(
        stacking.expand(blocks[b], _skeleton(blocks[b], k, "all")), jnp.asarray(value, w.dtype), w
      )
      for k, w in enumerate(map(jnp.asarray, arrays.kernels))
    ]
    return kernels, arrays.biases

  return map_layers(params, structure.block_paths(blocks), with_skeleton)
