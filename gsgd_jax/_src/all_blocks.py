"""The inverse chain rule and weight allocation of every declared block at once.

Each block's per-node work ends in a division, and XLA:CPU compiles a division that
several passes over kernels read as a program of its own, each costing about as much to
compile as the next (benchmarks/RESULTS.md, speed of the LLaMA-style decoder). The blocks
with one hidden level (``basis.one_hidden_level``: a transformer's feed-forward and
attention chains) are the common case, and their divisions have the same quantities:
here they are done together, one division for all of them per step of the update (per
dtype and number of copies, ``basis.divide_together``), so that a model's blocks add two
such programs to compiling its train step instead of two per block. Every other block
runs as declared alone (``basis.inverse_chain_rule``, ``basis.weight_allocation``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from gsgd_jax._src import basis
from gsgd_jax._src.pytree import LayerArrays
from gsgd_jax._src.structure import ChainStructure

Array = jax.Array


def _together(blocks: Sequence[ChainStructure]) -> list[int]:
  """The blocks whose divisions are done together."""
  return [b for b, block in enumerate(blocks) if basis.one_hidden_level(block)]


def inverse_chain_rules(
  blocks: Sequence[ChainStructure],
  params: Sequence[LayerArrays],
  grads: Sequence[LayerArrays],
  probe_sums: Sequence[Sequence[Array | None] | None],
  rate_norms: Sequence[Array | None],
) -> list[basis.PathGradients]:
  """``basis.inverse_chain_rule`` of every block (``params[b]``, ``grads[b]``,
  ``probe_sums[b]``, ``rate_norms[b]``), in order."""
  together = _together(blocks)
  requests = [
    basis.hidden_level_quotients(
      blocks[b],
      params[b].kernels,
      params[b].biases,
      grads[b].kernels,
      grads[b].biases,
      probe_sums[b],
    )
    for b in together
  ]
  quotients = dict(zip(together, basis.divide_together(requests)[0], strict=True))
  out = []
  for b, block in enumerate(blocks):
    if b in quotients:
      out.append(basis.path_gradients_from(block, grads[b].kernels, grads[b].biases, quotients[b]))
    else:
      out.append(
        basis.inverse_chain_rule(
          block,
          params[b].kernels,
          params[b].biases,
          grads[b].kernels,
          grads[b].biases,
          probe_sums[b],
          rate_norms[b],
        )
      )
  return out


def weight_allocations(
  blocks: Sequence[ChainStructure],
  params: Sequence[LayerArrays],
  steps: Sequence[LayerArrays],
  products: Sequence[basis.SkeletonProducts],
  ratio_clip: tuple[float, float] | None,
  target_norms: Sequence[Array | None],
) -> tuple[list[tuple[list[Array], list[Array | None], Array | None]], list[Array]]:
  """``basis.weight_allocation`` of every block (``params[b]``, ``steps[b]``,
  ``products[b]``, ``target_norms[b]``), in order.

  Returns:
    Per block, its ``(kernel_updates, bias_updates, landed_norms)``; and the clipped
    ratios of all blocks: tables ``(..., quantities)`` whose last quantity holds a 1 per
    clipped ratio and zeros (one per other node, or more), to be summed (the divided
    tables of the blocks done together, whole: read alone, their last quantity would cost
    a program of its own; every other block's vector, as a table of one quantity).
  """
  together = _together(blocks)
  requests = [
    basis.allocation_quotients(blocks[b], steps[b].kernels, products[b], ratio_clip)
    for b in together
  ]
  columns, tables = basis.divide_together(requests)
  quotients = dict(zip(together, columns, strict=True))
  allocated, clipped = [], []
  for b, block in enumerate(blocks):
    if b in quotients:
      updates, bias_updates = basis.allocation_from(
        block,
        params[b].kernels,
        params[b].biases,
        steps[b].kernels,
        steps[b].biases,
        quotients[b],
      )
      allocated.append((updates, bias_updates, None))
      continue
    updates, bias_updates, moved, landed = basis.weight_allocation(
      block,
      params[b].kernels,
      params[b].biases,
      steps[b].kernels,
      steps[b].biases,
      products[b],
      ratio_clip,
      target_norms[b],
    )
    allocated.append((updates, bias_updates, landed))
    clipped.append(moved[:, None])
  if ratio_clip is not None:  # else the tables hold no clipped ratios
    clipped += tables
  return allocated, clipped
