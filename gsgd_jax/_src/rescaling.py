"""Function-preserving rescaling of hidden nodes: the group G acting on params."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gsgd_jax._src import basis, structure
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays, map_layers
from gsgd_jax._src.stacking import STACK, per_copy


def rescale(
  params: optax.Params, layers: LayerPaths, factors: Sequence[Sequence[jax.typing.ArrayLike | None]]
) -> optax.Params:
  """Applies the element of G with the given positive per-node factors.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.
    factors: ``factors[block][level]``: a vector of positive factors for the
      nodes of that level, or None to leave the level alone; levels run from 0
      (block inputs) to the block's depth (outputs), and only hidden levels
      ``1..depth-1`` may be rescaled without changing the function (and the
      outputs of a normalized block, whose BatchNorm absorbs their scale). For
      a stacked block, an ``(S, n)`` array rescales each copy by its own row
      (a vector: every copy alike).

  Returns:
    ``params`` with every node ``j`` of a rescaled level multiplied on its
    incoming weights and bias, and divided on its outgoing weights.

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((2, 3))}, 'l1': {'kernel': jnp.ones((3, 1))}}
    >>> factors = [[None, jnp.array([2.0, 4.0, 0.5]), None]]  # one block: levels 0, 1, 2
    >>> params = gsgd_jax.rescale(params, ['l0', 'l1'], factors)
    >>> params['l0']['kernel'].tolist(), params['l1']['kernel'].tolist()
    ([[2.0, 4.0, 0.5], [2.0, 4.0, 0.5]], [[0.5], [0.25], [2.0]])
  """
  blocks = structure.build_structure(params, layers)

  def as_factor(b: int, level: int) -> jax.Array | None:
    f = factors[b][level]
    if f is None:
      return None
    block = blocks[b]
    n = block.layers[level - 1].n_out if level else block.layers[0].n_in
    f = jnp.asarray(f)
    # A stacked block: one row of factors per copy (one vector: the same for all).
    return f if block.stack is None else jnp.broadcast_to(f, (block.copies, n))

  def rescaled(b: int, arrays: LayerArrays):
    block_factors = [as_factor(b, level) for level in range(blocks[b].depth + 1)]
    return per_copy(blocks[b], _rescale_chain, (STACK, STACK, 0), (STACK, STACK))(
      arrays.kernels, arrays.biases, block_factors
    )

  return map_layers(params, structure.block_paths(blocks), rescaled)


def _rescale_chain(
  struct: structure.ChainStructure,
  kernels: Sequence[jax.Array],
  biases: Sequence[jax.Array | None],
  factors: Sequence[jax.Array | None],
) -> tuple[list[jax.Array], list[jax.Array | None]]:
  """One chain's kernels and biases with its levels rescaled by ``factors[level]``."""
  new_kernels, new_biases = [], []
  for k, spec in enumerate(struct.layers):
    w, bias = jnp.asarray(kernels[k]), biases[k]
    dtype = basis.compute_dtype(w.dtype)
    incoming, outgoing = (
      None if f is None else f.astype(dtype) for f in (factors[k + 1], factors[k])
    )
    scaled = w.astype(dtype)
    diagonal = spec.kind == "affine"  # a norm's scale: the edges o -> o
    if incoming is not None:
      scaled = scaled * (incoming if diagonal else basis.cols(incoming, spec))
    if outgoing is not None:
      scaled = scaled / (outgoing if diagonal else basis.rows(outgoing, spec))
    new_kernels.append(scaled.astype(w.dtype))
    if bias is not None and incoming is not None:
      bias = (bias * basis.at_bias(incoming, spec)).astype(bias.dtype)
    new_biases.append(bias)
  return new_kernels, new_biases


def random_rescale(
  params: optax.Params, layers: LayerPaths, key: jax.Array, log_range: float = 1.5
) -> optax.Params:
  """Rescales every hidden node by a random positive factor; the function is unchanged.

  Node ``j`` of each hidden level gets ``c_j = exp(U(-log_range, log_range))``:
  its incoming weights and bias are multiplied by ``c_j`` and its outgoing
  weights divided by it (an element of the group G, docs/math.md; for a
  convolution every tap, after a flatten every position; every copy of a
  stacked block by its own factors). Basis-path values are
  unchanged. Inputs and outputs of each block are not rescaled, except the
  outputs of a normalized block (``gsgd_jax.Block(..., normalized=True)``):
  their incoming weights and bias are multiplied by random factors too, which
  the BatchNorm after them absorbs in training mode (their basis-path values
  then change by the same factors).

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.
    key: a JAX PRNG key.
    log_range: half-width of the uniform distribution of ``log c``.

  Returns:
    The rescaled params.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> layers = gsgd_jax.infer_layers(params)
    >>> rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(1))
    >>> bool(jnp.allclose(model.apply(rescaled, x), model.apply(params, x), atol=1e-5))
    True
    >>> bool(jnp.allclose(rescaled['params']['layers_0']['kernel'],
    ...                   params['params']['layers_0']['kernel']))
    False
  """
  blocks = structure.build_structure(params, layers)
  factors = []
  for block, block_key in zip(blocks, jax.random.split(key, len(blocks)), strict=True):
    rescaled = block.layers if block.normalized else block.layers[:-1]
    keys = jax.random.split(block_key, max(len(rescaled), 1))
    factors.append(
      [None]
      + [
        jnp.exp(jax.random.uniform(keys[k], shape, jnp.float32, -log_range, log_range))
        for k, spec in enumerate(rescaled)
        for shape in [(spec.n_out,) if block.stack is None else (block.copies, spec.n_out)]
      ]
      + ([] if block.normalized else [None])
    )
  return rescale(params, layers, factors)
