"""Function-preserving rescaling of hidden nodes: the group G acting on params."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gsgd_jax._src import basis, structure
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays, map_layers


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
      outputs of a normalized block, whose BatchNorm absorbs their scale).

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

  def as_factor(b: int, level: int, dtype) -> jax.Array | None:
    f = factors[b][level]
    return None if f is None else jnp.asarray(f).astype(dtype)

  def rescaled(b: int, arrays: LayerArrays):
    kernels, biases = [], []
    for k, spec in enumerate(blocks[b].layers):
      w, bias = jnp.asarray(arrays.kernels[k]), arrays.biases[k]
      dtype = basis.compute_dtype(w.dtype)
      incoming, outgoing = as_factor(b, k + 1, dtype), as_factor(b, k, dtype)
      scaled = w.astype(dtype)
      diagonal = spec.kind == "affine"  # a norm's scale: the edges o -> o
      if incoming is not None:
        scaled = scaled * (incoming if diagonal else basis.cols(incoming))
      if outgoing is not None:
        scaled = scaled / (outgoing if diagonal else basis.rows(outgoing, spec))
      kernels.append(scaled.astype(w.dtype))
      if bias is not None and incoming is not None:
        bias = (bias * incoming).astype(bias.dtype)
      biases.append(bias)
    return kernels, biases

  return map_layers(params, structure.block_paths(blocks), rescaled)


def random_rescale(
  params: optax.Params, layers: LayerPaths, key: jax.Array, log_range: float = 1.5
) -> optax.Params:
  """Rescales every hidden node by a random positive factor; the function is unchanged.

  Node ``j`` of each hidden level gets ``c_j = exp(U(-log_range, log_range))``:
  its incoming weights and bias are multiplied by ``c_j`` and its outgoing
  weights divided by it (an element of the group G, docs/math.md; for a
  convolution every tap, after a flatten every position). Basis-path values are
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
        jnp.exp(jax.random.uniform(keys[k], (spec.n_out,), jnp.float32, -log_range, log_range))
        for k, spec in enumerate(rescaled)
      ]
      + ([] if block.normalized else [None])
    )
  return rescale(params, layers, factors)
