"""Public optax transformations: any optimizer run in basis-path space, and G-SGD."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax import basis as ps
from gsgd_jax.structure import (LayerPaths, build_structure, is_placeholder, leaf_paths,
                                locate_blocks, zero_probes)

DEFAULT_RATIO_CLIP = ps.DEFAULT_RATIO_CLIP


class PathSpaceState(NamedTuple):
  """State of :func:`path_space`.

  Attributes:
    inner_state: state of the inner transformation, which runs on path-space
      gradients shaped like params.
    clipped_ratios: number of skeleton path ratios clipped in the last update.
    total_clipped_ratios: the same, summed over all updates so far.
  """

  inner_state: optax.OptState
  clipped_ratios: chex.Array
  total_clipped_ratios: chex.Array


def _layer_arrays(leaves, where):
  kernels = [leaves[i] for i in where.kernel]
  biases = [None if i is None else leaves[i] for i in where.bias]
  return kernels, biases


def _probe_sums(params, grads, where, grad_where):
  """Per layer, the probe's ``s * dL/ds`` (``sum_i w g + b g_b``), or None."""
  def product(s, g):
    ct = ps.compute_dtype(s.dtype)
    return s.astype(ct) * g.astype(ct)
  return [None if i is None or j is None else product(params[i], grads[j])
          for i, j in zip(where.probe, grad_where.probe)]


def _put(out, where, kernels, biases):
  """Writes one block's kernel and bias arrays into the flat list ``out``."""
  for i, value in zip(where.kernel, kernels):
    out[i] = value
  for i, value in zip(where.bias, biases):
    if i is not None:
      out[i] = value


def basis_path_values(params: Any, layers: LayerPaths) -> Any:
  """Basis-path values of ``params``, in a pytree shaped like ``params``.

  Each weight and bias outside the fixed skeleton F holds the value of the one
  basis path it owns, ``v_e = B[i] w_e F[j]`` (SPEC §2); entries on F, scale
  probes and leaves outside ``layers`` hold 0. These values are invariant under
  positive rescaling of hidden nodes and, with the signs of F, determine the
  network function.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks (see
      :func:`path_space`).

  Returns:
    A pytree shaped like ``params``.
  """
  blocks, wheres, treedef = build_structure(params, layers)
  return _path_space_params(params, blocks, wheres, treedef, outside=jnp.zeros_like)


def _check_skeleton(params, blocks, wheres) -> None:
  """Raises if a skeleton weight is zero, subnormal or not finite, naming the layer and node.

  Every basis path divides by products of skeleton weights, so a zero one would
  make path gradients infinite (in ``update`` such paths take no step; see
  ``basis.reciprocal``). Weight allocation never moves F and keeps the
  outgoing skeleton weights' signs (clipped ratios), so a start without zeros
  stays without zeros. Skipped when ``params`` are traced (``init`` under jit).
  """
  leaves = jax.tree.leaves(params)
  for block, where in zip(blocks, wheres):
    kernels = [leaves[i] for i in where.kernel]
    if any(isinstance(w, jax.core.Tracer) for w in kernels):
      return
    for k, spec in enumerate(block.layers):
      kernel = jnp.asarray(kernels[k])
      entries = []
      if block.pi[k] is not None:
        entries.append(("incoming", "output", ps.incoming_skeleton(kernel, spec, block.pi[k])))
      if block.sigma[k] is not None:
        entries.append(("outgoing", "input", ps.outgoing_skeleton(kernel, spec, block.sigma[k])))
      tiny = float(jnp.finfo(ps.compute_dtype(kernel.dtype)).tiny)
      for kind, side, values in entries:
        magnitude = np.abs(np.asarray(values, np.float64))
        bad = np.flatnonzero(~np.isfinite(magnitude) | (magnitude < tiny))
        if bad.size:
          raise ValueError(
              f"layer {spec.name!r}: the {kind} skeleton weight of {side} node {int(bad[0])} "
              f"is {float(values[bad[0]])} ({bad.size} such); basis paths divide by "
              "skeleton weights. Call gsgd_jax.set_skeleton(params, layers) first.")
    _warn_extreme_chains(block, [jnp.asarray(w) for w in kernels])


# Skeleton-chain products outside this range make G-SGD's weight steps, which
# scale as 1/(B F)^2, explode or vanish.
CHAIN_RANGE = (1e-3, 1e3)


def _warn_extreme_chains(block, kernels) -> None:
  """Warns when some hidden node's skeleton-chain product ``B F`` is extreme."""
  if block.depth < 2:
    return
  ch = ps.chains(block, kernels, jnp.float64 if jax.config.x64_enabled else jnp.float32)
  products = np.concatenate([np.abs(np.asarray(ch.back[k] * ch.forward[k], np.float64))
                             for k in range(1, block.depth)])
  low, high = float(products.min()), float(products.max())
  if low < CHAIN_RANGE[0] or high > CHAIN_RANGE[1]:
    warnings.warn(
        f"G-SGD: skeleton-chain products B*F of the hidden nodes of the block starting at "
        f"{block.layers[0].name!r} span [{low:.3g}, {high:.3g}]; weight steps scale as "
        "1/(B F)^2, so training may diverge. Call gsgd_jax.set_skeleton(params, layers) "
        "before training, as the authors do.", stacklevel=4)


def _path_space_params(params, blocks, wheres, treedef, chains=None,
                       outside=lambda leaf: leaf):
  """Params as ``inner`` sees them: basis-path values in the blocks, 0 on scale
  probes and ``outside(leaf)`` elsewhere (by default the values themselves)."""
  leaves = jax.tree.leaves(params)
  out = [outside(leaf) for leaf in leaves]
  for b, (block, where) in enumerate(zip(blocks, wheres)):
    ch = None if chains is None else chains[b]
    _put(out, where, *ps.basis_values(block, *_layer_arrays(leaves, where), ch))
  return zero_probes(treedef.unflatten(out))


def block_labels(tree: Any, layers: LayerPaths, inside: str = "path",
                 outside: str = "fallback") -> Any:
  """Labels each leaf of ``tree``: ``inside`` for kernels, biases and scale
  probes of the declared layers, ``outside`` for every other leaf (for
  ``optax.partition``)."""
  if is_placeholder(tree):
    return inside
  blocks, wheres, _ = build_structure(tree, layers)
  paths, leaves, treedef = leaf_paths(tree)
  labels = [outside] * len(leaves)
  for where in wheres:
    for i in (*where.kernel, *where.bias, *where.probe):
      if i is not None:
        labels[i] = inside
  return treedef.unflatten(labels)


def path_space(
    inner: optax.GradientTransformation,
    *,
    layers: LayerPaths,
    fallback: optax.GradientTransformation | None = None,
    ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs an optax transformation in the basis-path space of ReLU chains.

  One update is the three steps of G-SGD (Meng et al., 2019):

  1. inverse chain rule: weight gradients :math:`g` become basis-path gradients
     :math:`\partial L / \partial v_p` (:math:`O(m)`, SPEC §3);
  2. ``inner`` maps them to path steps :math:`\Delta v`, seeing the basis-path
     values :math:`v` as its ``params``;
  3. weight allocation: weights move so that every basis path lands on
     :math:`v + \Delta v` while the incoming skeleton edges stay fixed:

  .. math::
    w_e \leftarrow \Big(w_e + \frac{\Delta v_e}{B_i F_j}\Big) \Big/ Q_j,
    \qquad Q_a = 1 + \frac{\Delta v_{a \to \sigma(a)}}{B_a F_a}.

  Path gradients and steps live in pytrees shaped like params (0 on the fixed
  skeleton edges), so any elementwise optax transformation (momentum, Adam,
  clipping, schedules) works unchanged, and the network's function follows the
  same trajectory from any positively rescaled initialisation.

  ``layers`` declares dense layers, convolutions (channels are nodes, the
  centre tap is the skeleton edge) and dense layers after a flatten. It is one
  chain, or several independent blocks (e.g. one per residual block); nothing
  crosses a block boundary. Every parameter outside the blocks (BatchNorm
  scales, shortcuts, embeddings, ...) is updated by ``fallback``.

  A layer may carry a ``scale_probe`` leaf (:mod:`gsgd_jax.probes`): its
  gradient then stands in for the one reduction over the kernel that the
  inverse chain rule needs, so the update reads the weights no more often than
  SGD's does. Every ``scale_probe`` leaf, in the blocks or not, gets a zero
  update.

  Args:
    inner: the transformation applied in path space, e.g. ``optax.sgd(0.1)`` or
      ``optax.adam(1e-3)``.
    layers: one chain: ordered key paths (tuples of dict keys / list indices,
      or ``'a/b'`` strings) to each layer's sub-tree holding ``kernel`` and
      optional ``bias``, input layer first, e.g. ``[('params', 'Dense_0'),
      ('params', 'Dense_1')]``; or several blocks: a sequence of lists of such
      paths. See :func:`gsgd_jax.infer_layers`.
    fallback: the transformation for parameters outside the blocks, applied to
      their ordinary gradients. ``None`` (default) applies ``inner`` itself to
      them, in the same state (so ``gsgd(lr)`` gives them plain SGD at ``lr``);
      ``optax.set_to_zero()`` freezes them.
    ratio_clip: ``(low, high)`` bounds for the ratios ``R`` of the outgoing
      skeleton paths, the only ratios used as divisors. A step asking for a
      ratio outside them (``R <= 0`` included) is clipped, NaN becomes 1, and
      the count is kept in the state. ``None`` disables the guard.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``
    and forwards extra keyword arguments to ``inner``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))},
    ...           'l1': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)},
    ...           'scale': jnp.ones(2)}
    >>> tx = gsgd_jax.path_space(optax.adam(1e-2), layers=['l0', 'l1'])
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  if ratio_clip is not None:
    low, high = (float(r) for r in ratio_clip)
    if not 0 < low <= 1 <= high:
      raise ValueError(f"ratio_clip must satisfy 0 < low <= 1 <= high, got {ratio_clip}")
    ratio_clip = (low, high)
  if fallback is not None:
    inner = optax.partition({"path": inner, "fallback": fallback},
                            lambda tree: block_labels(tree, layers))
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    if is_placeholder(params):  # optax.tree_map_params: the inner state's layout suffices
      return PathSpaceState(inner.init(params), zero, zero)
    blocks, wheres, treedef = build_structure(params, layers)
    _check_skeleton(params, blocks, wheres)
    return PathSpaceState(inner.init(_path_space_params(params, blocks, wheres, treedef)),
                          zero, zero)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "gsgd_jax.path_space needs the current params: call "
          "tx.update(grads, state, params).")
    blocks, wheres, treedef = build_structure(params, layers)
    leaves = jax.tree.leaves(params)
    grad_leaves, grad_treedef, grad_wheres = locate_blocks(updates, blocks, "updates")

    # Inverse chain rule per block; other leaves keep their ordinary gradients.
    path_grads, chains = list(grad_leaves), []
    for block, where, grad_where in zip(blocks, wheres, grad_wheres):
      kernels, biases = _layer_arrays(leaves, where)
      kernel_grads, bias_grads = _layer_arrays(grad_leaves, grad_where)
      for spec, w, g in zip(block.layers, kernels, kernel_grads):
        if w.shape != g.shape:
          raise ValueError(f"layer {spec.name!r}: gradient shape {g.shape} does not "
                           f"match kernel shape {w.shape}")
      pg = ps.inverse_chain_rule(block, kernels, biases, kernel_grads, bias_grads,
                                 _probe_sums(leaves, grad_leaves, where, grad_where))
      _put(path_grads, grad_where, pg.kernels, pg.biases)
      chains.append(pg.chains)
    path_params = _path_space_params(params, blocks, wheres, treedef, chains)

    # Probes anywhere (also on layers outside the blocks) are never trained.
    steps, inner_state = inner.update(zero_probes(grad_treedef.unflatten(path_grads)),
                                      state.inner_state, path_params, **extra_args)
    steps = zero_probes(steps)

    # Weight allocation per block; other leaves take the inner (or fallback) step.
    step_leaves, step_treedef, step_wheres = locate_blocks(steps, blocks, "inner updates")
    new_updates, clipped = list(step_leaves), jnp.zeros((), jnp.int32)
    for block, where, step_where, ch in zip(blocks, wheres, step_wheres, chains):
      new_kernels, new_biases, block_clipped = ps.weight_allocation(
          block, *_layer_arrays(leaves, where), *_layer_arrays(step_leaves, step_where),
          ch, ratio_clip)
      _put(new_updates, step_where, new_kernels, new_biases)
      clipped += block_clipped
    return step_treedef.unflatten(new_updates), PathSpaceState(
        inner_state, clipped, state.total_clipped_ratios + clipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gsgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layers: LayerPaths,
    momentum: float | None = None,
    nesterov: bool = False,
    fallback: optax.GradientTransformation | None = None,
    ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
) -> optax.GradientTransformationExtraArgs:
  r"""G-SGD: stochastic gradient descent on the basis-path values of a ReLU net.

  Plain G-SGD (Meng et al., 2019) takes, for every basis path :math:`p`,

  .. math::
    v_p \leftarrow v_p - \eta_t \, \frac{\partial L}{\partial v_p},

  computed from ordinary weight gradients by the inverse chain rule and turned
  back into weights by weight allocation. It equals
  ``path_space(optax.sgd(learning_rate, momentum, nesterov), layers=layers)``;
  parameters outside ``layers`` get plain SGD with the same settings.
  Outputs of the trained network do not depend on how the initial weights are
  positively rescaled per hidden node, unlike plain SGD.

  Use :func:`gsgd_jax.set_skeleton` on the initial params first, as the authors
  did: with skeleton weights 1, path values start at the scale of single
  weights.

  Args:
    learning_rate: a float or an optax schedule (a function of the step count).
    layers: ordered key paths of the layers (see :func:`path_space`).
    momentum: optional momentum (heavy ball) in path space.
    nesterov: use Nesterov momentum.
    fallback: the transformation for parameters outside ``layers``; by default
      the same SGD on their ordinary gradients (see :func:`path_space`).
    ratio_clip: bounds of the skeleton path ratios (see :func:`path_space`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> layers = gsgd_jax.infer_layers(params)
    >>> params = gsgd_jax.set_skeleton(params, layers)
    >>> tx = gsgd_jax.gsgd(0.1, layers=layers)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.mean(model.apply(p, jnp.ones((4, 8))) ** 2)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  return path_space(optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
                    layers=layers, fallback=fallback, ratio_clip=ratio_clip)
