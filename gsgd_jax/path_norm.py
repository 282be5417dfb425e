"""Path-SGD (Neyshabur et al., 2015): SGD preconditioned by the path norm (SPEC §7)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gsgd_jax import basis as ps
from gsgd_jax.structure import (LayerPaths, build_structure, is_placeholder, locate_blocks,
                                zero_probes)


def _chain_gammas(struct, kernels, biases):
  """Per layer, ``(gamma_in of the input nodes, gamma_out of the output nodes)``.

  A forward and a backward pass of the squared-weight network on an all-ones
  input: ``gamma_in(j) = sum_{edges i -> j} gamma_in(i) w^2`` (a bias is an edge
  from a constant node with ``gamma_in = 1``) and ``gamma_out(a) = sum_{edges
  a -> j} w^2 gamma_out(j)``; every tap of a convolution is an edge.
  """
  ct = ps.compute_dtype(kernels[0].dtype)
  specs = struct.layers
  squares = [jnp.square(w.astype(ct)) for w in kernels]
  gamma_in = [jnp.ones(specs[0].n_in, ct)]
  for k, sq in enumerate(squares[:-1]):
    g = ps.replicated(jnp.einsum("...io,i->o", sq, ps.per_row(gamma_in[k], specs[k]),
                                 precision="highest"))
    if biases[k] is not None:
      g += ps.replicated(jnp.square(biases[k].astype(ct)))
    gamma_in.append(g)
  gamma_out = [None] * (struct.depth + 1)
  gamma_out[struct.depth] = jnp.ones(specs[-1].n_out, ct)
  for k in range(struct.depth - 1, 0, -1):
    row_sums = jnp.einsum("...io,o->i", squares[k], gamma_out[k + 1], precision="highest")
    gamma_out[k] = ps.replicated(ps.fold_rows(row_sums, specs[k]))
  return gamma_in, gamma_out


def _block_scales(params, layers):
  """Per block: ``(block, positions in params, per-layer (kernel gamma, bias gamma))``.

  The kernel's gamma is returned as the broadcastable product
  ``gamma_in[i] * gamma_out[j]`` of shape ``(rows, n_out)``, which broadcasts
  against the kernel.
  """
  blocks, wheres, _ = build_structure(params, layers)
  leaves = jax.tree.leaves(params)
  for struct, where in zip(blocks, wheres):
    kernels = [leaves[i] for i in where.kernel]
    biases = [None if i is None else leaves[i] for i in where.bias]
    gamma_in, gamma_out = _chain_gammas(struct, kernels, biases)
    yield struct, where, [(ps.rows(gamma_in[k], spec) * ps.cols(gamma_out[k + 1]),
                           gamma_out[k + 1]) for k, spec in enumerate(struct.layers)]


def path_norm_scales(params: Any, layers: LayerPaths) -> Any:
  """The Path-SGD scales ``gamma_e = gamma_in(tail) * gamma_out(head)``, shaped like params.

  For a bias ``gamma = gamma_out(head)``. Leaves outside ``layers`` hold 1.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks.

  Returns:
    A pytree shaped like ``params`` in the params' dtypes.
  """
  leaves, treedef = jax.tree.flatten(params)
  out = [jnp.ones_like(leaf) for leaf in leaves]
  for struct, where, scales in _block_scales(params, layers):
    for k, (kernel_gamma, bias_gamma) in enumerate(scales):
      kernel = leaves[where.kernel[k]]
      out[where.kernel[k]] = jnp.broadcast_to(kernel_gamma, kernel.shape).astype(kernel.dtype)
      if where.bias[k] is not None:
        out[where.bias[k]] = bias_gamma.astype(leaves[where.bias[k]].dtype)
  return treedef.unflatten(out)


def scale_by_path_norm(layers: LayerPaths,
                       min_scale: float = 1e-30) -> optax.GradientTransformation:
  r"""Divides each weight's gradient by its path-norm scale :math:`\gamma_e`.

  .. math::
    g_e \leftarrow g_e / \max(\gamma_e, \epsilon), \qquad
    \gamma_e = \gamma_{in}(\text{tail}) \, \gamma_{out}(\text{head}),

  with :math:`\gamma_{in}` and :math:`\gamma_{out}` from a forward and a
  backward pass of the squared-weight network on an all-ones input (SPEC §7).
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
  """

  def init_fn(params):
    if not is_placeholder(params):  # (optax.tree_map_params passes a placeholder)
      build_structure(params, layers)  # raise structural errors at init
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("gsgd_jax.scale_by_path_norm needs the current params: call "
                       "tx.update(grads, state, params).")
    block_scales = list(_block_scales(params, layers))
    grads, treedef, grad_wheres = locate_blocks(
        updates, [struct for struct, _, _ in block_scales], "updates")
    out = list(grads)
    for (_, _, scales), where in zip(block_scales, grad_wheres):
      for k, (kernel_gamma, bias_gamma) in enumerate(scales):
        g = grads[where.kernel[k]]
        out[where.kernel[k]] = (g / jnp.maximum(kernel_gamma, min_scale)).astype(g.dtype)
        if where.bias[k] is not None:
          gb = grads[where.bias[k]]
          out[where.bias[k]] = (gb / jnp.maximum(bias_gamma, min_scale)).astype(gb.dtype)
    return zero_probes(treedef.unflatten(out)), state

  return optax.GradientTransformation(init_fn, update_fn)


def path_sgd(learning_rate: optax.ScalarOrSchedule, *, layers: LayerPaths,
             momentum: float | None = None, nesterov: bool = False,
             min_scale: float = 1e-30) -> optax.GradientTransformation:
  r"""Path-SGD: SGD with each gradient divided by its path-norm scale.

  .. math::
    w_e \leftarrow w_e - \eta_t \, \frac{\partial L / \partial w_e}{\gamma_e}

  (Neyshabur et al., 2015; SPEC §7). Like G-SGD it is invariant under positive
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

  References:
    Neyshabur, Salakhutdinov and Srebro, `Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks <https://arxiv.org/abs/1506.02617>`_,
    NeurIPS 2015.
  """
  return optax.chain(scale_by_path_norm(layers, min_scale),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
