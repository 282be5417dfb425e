"""Path-SGD (Neyshabur et al., 2015): SGD preconditioned by the path norm (docs/math.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gsgd_jax._src import basis, declaration, pytree, structure
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays
from gsgd_jax._src.stacking import STACK, per_copy
from gsgd_jax._src.transform import NO_PARAMS_MSG

# Rows of the matrices the squared kernels multiply (see _chain_gammas).
_ROWS = 2


def _chain_gammas(struct, kernels, biases):
  """Per layer, ``(gamma_in of the input nodes, gamma_out of the output nodes)``.

  A forward and a backward pass of the squared-weight network on an all-ones
  input: ``gamma_in(j) = sum_{edges i -> j} gamma_in(i) w^2`` (a bias is an edge
  from a constant node with ``gamma_in = 1``) and ``gamma_out(a) = sum_{edges
  a -> j} w^2 gamma_out(j)``; every tap of a convolution is an edge.

  Each product of a vector with the squared kernel is taken as a product of the
  kernel with a matrix of two equal rows (``_ROWS``), and row 0 kept. XLA:CPU
  emits a matrix-vector product as a computation of its own, compiled for
  every layer, while a matrix product goes to a library kernel: the compile
  time Path-SGD's train step adds per layer fell from 21-24 ms to 13-18 ms
  (benchmarks/depth.py, widths 16 and 256). Written as reductions instead,
  XLA:CPU broadcast each vector to a kernel-sized temporary. The second row
  costs nothing that matters: the pass reads the kernel once either way.
  """
  ct = basis.compute_dtype(kernels[0].dtype)
  specs = struct.layers
  squares = [jnp.square(w.astype(ct)) for w in kernels]
  gamma_in = [jnp.ones(specs[0].n_in, ct)]
  for k, sq in enumerate(squares[:-1]):
    spec = specs[k]
    if spec.kind == "general":  # a multi-axis kernel: a reduction over its input axes
      g = basis.per_output(sq * basis.rows(gamma_in[k], spec), spec)
    else:
      rows = jnp.broadcast_to(basis.per_row(gamma_in[k], spec), (_ROWS, sq.shape[-2]))
      g = basis.replicated(jnp.einsum("...io,bi->bo", sq, rows, precision="highest")[0])
    if biases[k] is not None:
      g += basis.fold_outputs(jnp.square(biases[k].astype(ct)), spec)
    gamma_in.append(g)
  gamma_out = [None] * (struct.depth + 1)
  gamma_out[struct.depth] = jnp.ones(specs[-1].n_out, ct)
  for k in range(struct.depth - 1, 0, -1):
    spec = specs[k]
    if spec.kind == "general":  # a reduction over the output axes
      row_sums = basis.per_input(squares[k] * basis.cols(gamma_out[k + 1], spec), spec)
    else:
      cols = jnp.broadcast_to(gamma_out[k + 1], (_ROWS, squares[k].shape[-1]))
      row_sums = jnp.einsum("...io,bo->bi", squares[k], cols, precision="highest")[0]
    gamma_out[k] = basis.replicated(basis.fold_rows(row_sums, specs[k]))
  return gamma_in, gamma_out


def _path_sgd_blocks(params: Any, layers: Any) -> tuple[structure.ChainStructure, ...]:
  """The declared blocks; raises for the norms' blocks, which Path-SGD does not model."""
  blocks = structure.build_structure(params, layers)
  for block in blocks:
    affine = [spec.name for spec in block.layers if spec.kind == "affine"]
    if affine or block.normalized:
      what = f"affine layer {affine[0]!r}" if affine else "a normalized block"
      raise structure.UnsupportedLayerError(
        f"Path-SGD does not support {what} (block starting at "
        f"{block.layers[0].name!r}): its path norm has no term for a norm's scale or "
        "a normalization after the block. Declare such blocks for path_space or gsgd "
        "only, or leave these layers to the fallback."
      )
  return blocks


def _layer_scales(
  block: structure.ChainStructure, kernels: Sequence[jax.Array], biases: Sequence[jax.Array | None]
) -> tuple[list[jax.Array], list[jax.Array | None]]:
  """Per layer, the kernel's gammas ``gamma_in[i] * gamma_out[j]`` in its shape, and
  the bias's ``gamma_out`` (None without a bias); per copy of a stacked block."""
  if block.stack is not None:
    return per_copy(block, _layer_scales, (STACK, STACK), (STACK, STACK))(kernels, biases)
  gamma_in, gamma_out = _chain_gammas(block, kernels, biases)
  kernel_gammas = [
    jnp.broadcast_to(basis.rows(gamma_in[k], spec) * basis.cols(gamma_out[k + 1], spec), w.shape)
    for k, (spec, w) in enumerate(zip(block.layers, kernels, strict=True))
  ]
  bias_gammas = [
    None if b is None else basis.at_bias(gamma_out[k + 1], spec)
    for k, (spec, b) in enumerate(zip(block.layers, biases, strict=True))
  ]
  return kernel_gammas, bias_gammas


def path_norm_scales(params: optax.Params, layers: LayerPaths) -> optax.Params:
  """The Path-SGD scales ``gamma_e = gamma_in(tail) * gamma_out(head)``, shaped like params.

  For a bias ``gamma = gamma_out(head)``. Leaves outside ``layers`` hold 1.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.

  Returns:
    A pytree shaped like ``params`` in the params' dtypes.

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'l1': {'kernel': jnp.ones((4, 2))}}
    >>> scales = gsgd_jax.path_norm_scales(params, ['l0', 'l1'])
    >>> l0, l1 = scales['l0'], scales['l1']
    >>> print(l0['kernel'][0], l1['kernel'][:, 0], l0['bias'])
    [2. 2. 2. 2.] [3. 3. 3. 3.] [2. 2. 2. 2.]
  """
  blocks = _path_sgd_blocks(params, layers)

  def scales(b: int, arrays: LayerArrays):
    cast = lambda gammas, like: [
      None if x is None else gamma.astype(x.dtype) for gamma, x in zip(gammas, like, strict=True)
    ]
    kernel_gammas, bias_gammas = _layer_scales(blocks[b], arrays.kernels, arrays.biases)
    return cast(kernel_gammas, arrays.kernels), cast(bias_gammas, arrays.biases)

  return pytree.map_layers(params, structure.block_paths(blocks), scales, outside=jnp.ones_like)


def scale_by_path_norm(
  layers: LayerPaths, min_scale: float = 1e-30
) -> optax.GradientTransformation:
  r"""Divides each weight's gradient by its path-norm scale :math:`\gamma_e`.

  .. math::
    g_e \leftarrow g_e / \max(\gamma_e, \epsilon), \qquad
    \gamma_e = \gamma_{in}(\text{tail}) \, \gamma_{out}(\text{head}),

  with :math:`\gamma_{in}` and :math:`\gamma_{out}` from a forward and a
  backward pass of the squared-weight network on an all-ones input (docs/math.md).
  For convolutions this runs on the channel graph, one edge per tap; it is not
  the path norm of the network unrolled over spatial positions, which would
  count every position's copy of an edge. Leaves outside ``layers`` pass through;
  every scale probe (:mod:`gsgd_jax.probes`) gets 0.

  Args:
    layers: the layers' key paths, one chain or several blocks.
    min_scale: lower bound :math:`\epsilon` of :math:`\gamma` (a node whose
      incoming weights are all zero has :math:`\gamma = 0`).

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))}, 'l1': {'kernel': jnp.ones((4, 2))}}
    >>> tx = gsgd_jax.scale_by_path_norm(['l0', 'l1'])
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> scaled, _ = tx.update(grads, tx.init(params), params)
    >>> # 1/2 and 1/3:
    >>> print(scaled['l0']['kernel'][0], scaled['l1']['kernel'][:, 0].round(4))
    [0.5 0.5 0.5 0.5] [0.3333 0.3333 0.3333 0.3333]
  """

  decl = declaration.as_declaration(layers)  # read once

  def init_fn(params):
    if not pytree.is_placeholder(params):  # (optax.tree_map_params passes a placeholder)
      _path_sgd_blocks(params, decl)  # raise structural errors at init
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format("gsgd_jax.scale_by_path_norm"))
    blocks = _path_sgd_blocks(params, decl)
    paths = structure.block_paths(blocks)
    located = pytree.locate_blocks(params, paths, "params")

    def divide(b: int, grads: LayerArrays):
      arrays = located.slots[b].take(located.leaves)
      kernel_gammas, bias_gammas = _layer_scales(blocks[b], arrays.kernels, arrays.biases)
      scaled = lambda grads, gammas: [
        None if g is None else (g / jnp.maximum(gamma, min_scale)).astype(g.dtype)
        for g, gamma in zip(grads, gammas, strict=True)
      ]
      return scaled(grads.kernels, kernel_gammas), scaled(grads.biases, bias_gammas)

    return pytree.zero_probes(pytree.map_layers(updates, paths, divide, what="updates")), state

  return optax.GradientTransformation(init_fn, update_fn)


def path_sgd(
  learning_rate: optax.ScalarOrSchedule,
  *,
  layers: LayerPaths,
  momentum: float | None = None,
  nesterov: bool = False,
  min_scale: float = 1e-30,
) -> optax.GradientTransformation:
  r"""Path-SGD: SGD with each gradient divided by its path-norm scale.

  .. math::
    w_e \leftarrow w_e - \eta_t \, \frac{\partial L / \partial w_e}{\gamma_e}

  (Neyshabur et al., 2015; docs/math.md). Like G-SGD it is invariant under positive
  rescaling of hidden nodes. Parameters outside ``layers`` get plain SGD.

  Args:
    learning_rate: a float or an optax schedule.
    layers: the layers' key paths, one chain or several blocks.
    momentum: optional momentum on the preconditioned gradients.
    nesterov: use Nesterov momentum.
    min_scale: lower bound of :math:`\gamma`.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'l1': {'kernel': jnp.ones((4, 2))}}
    >>> tx = gsgd_jax.path_sgd(0.1, layers=['l0', 'l1'])
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> print(updates['l0']['kernel'][0].round(4), updates['l1']['kernel'][:, 0].round(4))
    [-0.05 -0.05 -0.05 -0.05] [-0.0333 -0.0333 -0.0333 -0.0333]

  References:
    Neyshabur, Salakhutdinov and Srebro, `Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks <https://arxiv.org/abs/1506.02617>`_,
    NeurIPS 2015.
  """
  return optax.chain(
    scale_by_path_norm(layers, min_scale),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
