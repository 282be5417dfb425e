"""``path_space``: any optax transformation run in the basis-path space of ReLU chains."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax._src import all_blocks, basis, declaration, pytree, structure, validate
from gsgd_jax._src.declaration import LayerPaths
from gsgd_jax._src.pytree import LayerArrays, Located

DEFAULT_RATIO_CLIP = basis.DEFAULT_RATIO_CLIP

NO_PARAMS_MSG = "{} needs the current params: call tx.update(grads, state, params)."


class PathSpaceState(NamedTuple):
  """State of :func:`path_space`.

  Attributes:
    inner_state: state of the inner transformation, which runs on path-space
      gradients shaped like params.
    clipped_ratios: number of skeleton path ratios clipped in the last update
      (``int32``, shape ``()``).
    total_clipped_ratios: the same, summed over all updates so far.
    output_norms: per block declared ``normalized=True``, in order, its ``N^2``
      per output node at ``init``: the norms that renormalization lands on
      (empty without normalized blocks or with ``renormalize=False``).
    rate_norms: with ``implicit_decay=True``, per normalized block, in order, its
      ``rho`` per output node: 1 at ``init``, multiplied by every step's growth
      of ``N^2`` before the renormalization (for a one-layer block and SGD from
      columns of norm 1, SGD's squared column norm); empty otherwise. Training
      state: a checkpoint keeps it.
  """

  inner_state: optax.OptState
  clipped_ratios: jax.Array
  total_clipped_ratios: jax.Array
  output_norms: tuple[jax.Array, ...] = ()
  rate_norms: tuple[jax.Array, ...] = ()


@functools.lru_cache(maxsize=64)
def _compiled(fn: Callable, blocks: tuple[structure.ChainStructure, ...]) -> Callable:
  """``fn(blocks, ...)`` jitted once per declaration. ``init`` runs eagerly, where every
  small operation of the per-node work would compile a program of its own (seconds for a
  ResNet-34); the structures are cached, so a model's later inits reuse the program."""
  return jax.jit(functools.partial(fn, blocks))


def _block_values(
  blocks: tuple[structure.ChainStructure, ...], arrays: list[LayerArrays]
) -> list[tuple[list[jax.Array], list[jax.Array | None]]]:
  """``basis.basis_values`` of every block."""
  pairs = zip(blocks, arrays, strict=True)
  return [basis.basis_values(block, a.kernels, a.biases) for block, a in pairs]


def _inner_params(
  located: Located,
  blocks: tuple[structure.ChainStructure, ...],
  products: list[basis.SkeletonProducts] | None = None,
  outside=lambda leaf: leaf,
) -> optax.Params:
  """Params (``located``) as ``inner`` sees them: basis-path values in the blocks, 0 on
  scale probes and ``outside(leaf)`` elsewhere (by default the values themselves)."""
  values = [
    basis.basis_values(block, a.kernels, a.biases, None if products is None else products[b])
    for b, (block, a) in enumerate(zip(blocks, located.arrays(), strict=True))
  ]
  return pytree.zero_probes(pytree.rebuilt(located, values, outside=outside))


def _starting_values(
  located: Located, blocks: tuple[structure.ChainStructure, ...]
) -> optax.Params:
  """``_inner_params`` for ``init``, the blocks' values computed by one compiled program."""
  values = _compiled(_block_values, blocks)(located.arrays())
  return pytree.zero_probes(pytree.rebuilt(located, values))


def basis_path_values(params: optax.Params, layers: LayerPaths) -> optax.Params:
  """Basis-path values of ``params``, in a pytree shaped like ``params``.

  Each weight and bias outside the fixed skeleton F holds the value of the one
  basis path it owns, ``v_e = B[i] w_e F[j]`` (docs/math.md); entries on F,
  scale probes and leaves outside ``layers`` hold 0. These values are invariant
  under positive rescaling of hidden nodes and, with the signs of F, determine
  the network function.

  Args:
    params: parameter pytree.
    layers: the layers' key paths, one chain or several blocks (see
      :func:`path_space`).

  Returns:
    A pytree shaped like ``params``.

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.full((1, 2), 2.0)},
    ...           'l1': {'kernel': jnp.array([[3.0], [5.0]])}}
    >>> values = gsgd_jax.basis_path_values(params, ['l0', 'l1'])
    >>> values['l0']['kernel'].tolist(), values['l1']['kernel'].tolist()
    ([[0.0, 0.0]], [[6.0], [10.0]])
  """
  blocks = structure.build_structure(params, layers)
  located = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
  return _inner_params(located, blocks, outside=jnp.zeros_like)


def block_labels(
  tree: Any, layers: LayerPaths, inside: str = "path", outside: str = "fallback"
) -> Any:
  """Labels each leaf of ``tree`` for ``optax.partition``.

  Kernels, biases and scale probes of the declared layers get ``inside``;
  every other leaf gets ``outside``. A declared layer's kernel and bias always
  share a label, as weight allocation needs.

  Args:
    tree: a params-shaped pytree.
    layers: the layers' key paths, one chain or several blocks.
    inside: the label of the declared layers' leaves.
    outside: the label of every other leaf.

  Returns:
    A pytree of labels shaped like ``tree``.

  Example:
    >>> import jax.numpy as jnp, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
    ...           'l1': {'kernel': jnp.ones((4, 2))}, 'norm': {'scale': jnp.ones(2)}}
    >>> labels = gsgd_jax.block_labels(params, ['l0', 'l1'])
    >>> labels['l0'], labels['norm']
    ({'bias': 'path', 'kernel': 'path'}, {'scale': 'fallback'})
  """
  if pytree.is_placeholder(tree):
    return inside
  blocks = structure.build_structure(tree, layers)
  leaves, treedef, slots = pytree.locate_blocks(tree, structure.block_paths(blocks), "params")
  labels = [outside] * len(leaves)
  for block_slots in slots:
    for i in (*block_slots.kernel, *block_slots.bias, *block_slots.probe):
      if i is not None:
        labels[i] = inside
  return treedef.unflatten(labels)


def _output_norms(
  blocks: tuple[structure.ChainStructure, ...], block_params: list[LayerArrays]
) -> tuple[jax.Array, ...]:
  """``N^2`` per output node (per copy of a stack) of every normalized block, in order."""
  return tuple(
    basis.normalized_norms(block, arrays.kernels, arrays.biases)
    for block, arrays in zip(blocks, block_params, strict=True)
    if block.normalized
  )


def _grown(rate: jax.Array, now: jax.Array, landed: jax.Array) -> jax.Array:
  """``rate`` times ``landed / now``, the factor a step grew ``N^2`` by (kept where
  either is zero or not finite); a ratio, so the same under the symmetries."""
  return (rate * basis.norm_ratio(landed, now)).astype(rate.dtype)


def _probe_sums(params: LayerArrays, grads: LayerArrays) -> list[jax.Array | None]:
  """Per layer, the probe's ``s * dL/ds`` (``sum_i w g + b g_b``), or None."""

  def product(s, g):
    dtype = basis.compute_dtype(s.dtype)
    return s.astype(dtype) * g.astype(dtype)

  return [
    None if s is None or g is None else product(s, g)
    for s, g in zip(params.probes, grads.probes, strict=True)
  ]


def _check_gradients(
  block: structure.ChainStructure, params: LayerArrays, grads: LayerArrays
) -> None:
  """Raises, naming the layer, when gradients do not have the params' structure."""
  for spec, w, g, b, gb in zip(
    block.layers, params.kernels, grads.kernels, params.biases, grads.biases, strict=True
  ):
    if w.shape != g.shape:
      raise ValueError(
        f"layer {spec.name!r}: gradient shape {g.shape} does not match kernel shape {w.shape}"
      )
    if (b is None) != (gb is None):
      has, lacks = ("params", "gradients") if gb is None else ("gradients", "params")
      raise ValueError(
        f"layer {spec.name!r}: the {has} have a bias and the {lacks} do "
        "not; pass the gradients of these params, with the same tree "
        "structure."
      )


def _check_state(
  state: PathSpaceState,
  blocks: tuple[structure.ChainStructure, ...],
  renormalize: bool,
  implicit_decay: bool,
) -> None:
  """Raises, naming the layer, when ``state`` was not made by this transformation's
  ``init`` on params of these shapes (another width, another declaration, or
  another ``renormalize`` or ``implicit_decay``)."""
  normalized = [block for block in blocks if block.normalized]
  for held, what, option, on in (
    (state.output_norms, "output", "renormalize", renormalize),
    (state.rate_norms, "rate", "implicit_decay", implicit_decay),
  ):
    if not on:
      continue
    if len(held) != len(normalized):
      raise ValueError(
        f"gsgd_jax.path_space: the state holds the {what} norms of {len(held)} "
        f"normalized blocks, but `layers` declares {len(normalized)} and {option}=True: "
        "the state was made by init of a transformation with another declaration or "
        f"with {option}=False. Build both with the same arguments, or call "
        "tx.init(params) again."
      )
    for block, norms in zip(normalized, held, strict=True):
      expected = (
        (block.layers[-1].n_out,) if block.stack is None else (block.copies, block.layers[-1].n_out)
      )
      if tuple(norms.shape) != expected:
        raise ValueError(
          f"layer {block.layers[-1].name!r}: the state holds {what} norms of shape "
          f"{tuple(norms.shape)} for its block, but the params give {expected}: the state "
          "was made by init on params of another width. Call tx.init(params) again."
        )


def _check_inner_state(
  inner: optax.GradientTransformation, inner_state: optax.OptState, params: optax.Params
) -> None:
  """Raises, naming the leaf, when the inner state does not have the shapes that
  ``inner.init`` gives for ``params`` (a state made on params of another width)."""
  expected = jax.eval_shape(inner.init, params)
  got_paths, got, got_def = pytree.leaf_paths(inner_state)
  _, want, want_def = pytree.leaf_paths(expected)
  if got_def != want_def:
    raise ValueError(
      "gsgd_jax.path_space: the optimizer state does not have the structure that init "
      "gives for these params: it was made by another transformation or on another "
      "params tree. Call tx.init(params) on these params."
    )
  for path, leaf, spec in zip(got_paths, got, want, strict=True):
    if tuple(np.shape(leaf)) != tuple(spec.shape):
      raise ValueError(
        f"gsgd_jax.path_space: the optimizer state holds {'/'.join(path)!r} of shape "
        f"{tuple(np.shape(leaf))}, but init gives {tuple(spec.shape)} for these params: "
        "the state was made by init on other params (another width?). Call "
        "tx.init(params) on these params."
      )


def _clipped(
  path_grads: optax.Updates,
  paths: list[tuple[pytree.Path, ...]],
  block_sq_norms: list[jax.Array],
  clip_norm: float,
) -> optax.Updates:
  """``path_grads`` times ``min(1, clip_norm / norm)``: ``norm`` sums the blocks' invariant
  squared norms and the squares of every other leaf but the scale probes."""
  leaves, _, slots = pytree.locate_blocks(path_grads, paths, "updates")
  paths_of_leaves, _, _ = pytree.leaf_paths(path_grads)
  in_blocks = {i for s in slots for i in (*s.kernel, *s.bias, *s.probe) if i is not None}
  outside = [
    jnp.sum(jnp.square(leaf.astype(basis.compute_dtype(leaf.dtype))))
    for i, (path, leaf) in enumerate(zip(paths_of_leaves, leaves, strict=True))
    if i not in in_blocks and not (path and path[-1] == pytree.PROBE)
  ]
  total = sum([*block_sq_norms, *outside], jnp.zeros((), jnp.float32))
  norm = jnp.sqrt(total)
  factor = jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1), 1)
  # A bound that is not positive (an inject_hyperparams array) gives NaN steps, not steps
  # silently reversed or zeroed.
  factor = jnp.where(jnp.asarray(clip_norm) > 0, factor, jnp.nan)
  return jax.tree.map(lambda g: (g * factor).astype(g.dtype), path_grads)


def _count(tables: list[jax.Array]) -> jax.Array:
  """The number of ones in the last quantity of ``tables``, arrays ``(..., quantities)``
  whose last quantity holds zeros and ones (the clipped ratios of
  ``all_blocks.weight_allocations``), as an ``int32``.

  Summed in their floating-point type, exactly while every partial sum is an integer the
  type holds (below ``2^24`` in float32; longer columns are summed as integers). XLA:CPU
  hands a float sum to its reduction library, one program that compiles no code of its
  own, where an integer sum is a tree of windowed sums, a program each. A table of several
  quantities is summed whole, per quantity: its last column read alone, with a stride, is
  a program of its own. Tables of one quantity (the flags of one block each) are
  concatenated, behind a barrier that keeps XLA from splitting their sum into one per
  block; replicated first where sharded over Explicit axes (a stack sharded over its copies
  shards its flags).
  """
  flags = [basis.replicated(t).reshape(-1) for t in tables if t.shape[-1] == 1]
  parts = [t for t in tables if t.shape[-1] > 1]
  if flags:
    parts.append(jax.lax.optimization_barrier(jnp.concatenate(flags))[:, None])
  total = jnp.zeros((), jnp.int32)
  for table in parts:
    if table.size // table.shape[-1] > 2 ** (jnp.finfo(table.dtype).nmant + 1):  # might round
      total += jnp.sum(table[..., -1], dtype=jnp.int32)
    else:
      total += jnp.sum(table, axis=tuple(range(table.ndim - 1)))[-1].astype(jnp.int32)
  return total


def _checked_settings(
  ratio_clip: tuple[float, float] | None,
  clip_norm: float | None,
  renormalize: bool,
  implicit_decay: bool,
  initial_rate_norm: float,
) -> tuple[float, float] | None:
  """Refuses ``path_space``'s settings that cannot work, naming the fix; returns
  ``ratio_clip`` as two floats."""
  # A number is checked here; an array (optax.inject_hyperparams) is used as it is.
  if isinstance(clip_norm, (int, float)) and not clip_norm > 0:
    raise ValueError(f"clip_norm must be positive or None, got {pytree.short_repr(clip_norm)}")
  if ratio_clip is not None:
    low, high = (float(r) for r in ratio_clip)
    if not 0 < low <= 1 <= high:
      raise ValueError(f"ratio_clip must satisfy 0 < low <= 1 <= high, got {ratio_clip}")
    ratio_clip = (low, high)
  if implicit_decay and not renormalize:
    raise ValueError(
      "implicit_decay=True needs renormalize=True: the decay is measured by the growth "
      "of N^2 that the renormalization undoes"
    )
  if isinstance(initial_rate_norm, (int, float)):
    if not initial_rate_norm > 0:
      raise ValueError(
        f"initial_rate_norm must be positive, got {pytree.short_repr(initial_rate_norm)}"
      )
    if initial_rate_norm != 1 and not implicit_decay:
      raise ValueError(
        "initial_rate_norm is the starting value of the implicit decay's rate norms: "
        "pass implicit_decay=True with it"
      )
  return ratio_clip


def path_space(
  inner: optax.GradientTransformation,
  *,
  layers: LayerPaths,
  fallback: optax.GradientTransformation | None = None,
  ratio_clip: tuple[float, float] | None = DEFAULT_RATIO_CLIP,
  renormalize: bool = True,
  clip_norm: float | None = None,
  implicit_decay: bool = False,
  initial_rate_norm: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs an optax transformation in the basis-path space of ReLU chains.

  One update is the three steps of G-SGD (Meng et al., 2019):

  1. inverse chain rule: weight gradients :math:`g` become basis-path gradients
     :math:`\partial L / \partial v_p` (:math:`O(m)`, see the mathematics page, docs/math.md);
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
  centre tap is the skeleton edge), dense layers after a flatten and, first in
  a block, a norm's affine layer (its ``scale`` and ``bias``). It is one chain,
  or several independent blocks (e.g. one per residual branch, see
  :class:`gsgd_jax.Block`; ``normalized=True`` for a block whose outputs feed a
  BatchNorm); nothing crosses a block boundary. Every parameter outside the
  blocks (the norms at the residual stream, embeddings, ...) is updated by
  ``fallback``.

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
      paths or of :class:`gsgd_jax.Block` declarations. See
      :func:`gsgd_jax.infer_layers`.
    fallback: the transformation for parameters outside the blocks, applied to
      their ordinary gradients. ``None`` (default) applies ``inner`` itself to
      them, in the same state (so ``gsgd(lr)`` gives them plain SGD at ``lr``);
      ``optax.set_to_zero()`` freezes them.
    ratio_clip: ``(low, high)`` bounds for the magnitude of the ratios ``R`` of
      the outgoing skeleton paths, the only ratios used as divisors. A step
      asking for a ratio whose magnitude lies outside them is clipped, its
      sign kept (a path may cross zero, but not land near it), and the count
      is kept in the state; a NaN or infinite ratio (a non-finite gradient) is
      not, so the update is not finite either. ``None`` disables the guard.
    renormalize: for blocks declared ``normalized=True``: with every step,
      also multiply each output node's incoming weights and bias so that
      ``N^2``, the squared norm of the basis paths ending there, lands on its
      value at ``init`` exactly (the sums of the values the paths land on: one
      more reduction per kernel of a normalized block). The BatchNorm after
      the block absorbs this rescaling, so no output changes in training
      mode, and the scale of the pre-normalization activations, which its
      running statistics average, stays put. Without renormalization the
      norms grow by ``1 + (lr G)^2`` every step and long runs at large
      learning rates overflow (docs/math.md, normalization layers). The inner
      state (a momentum buffer) is not rescaled with the weights.
    clip_norm: clip every gradient ``inner`` receives (the blocks' path
      gradients and the other leaves' ordinary ones) by one factor, so that
      their global norm is at most ``clip_norm``, with each normalized
      block's paths ending at output node ``k`` measured as ``N_k dL/dv``
      instead of the ``N_k^2 dL/dv`` that ``inner`` gets. That measure does
      not change under the output rescaling a BatchNorm absorbs, so training
      stays invariant under it; ``optax.clip_by_global_norm`` inside ``inner``
      keeps the hidden nodes' invariance only (docs/guide.md, gradient
      clipping). Without normalized blocks and without ``fallback`` the two
      clip alike (with a ``fallback``, ``inner`` sees the blocks' leaves only,
      ``clip_norm`` measures every leaf). A positive number; an array that is
      not positive (``optax.inject_hyperparams``) gives NaN updates. ``None``
      (default): no clipping here.
    implicit_decay: for blocks declared ``normalized=True``: give their steps
      the learning-rate decay that SGD gets from the growth of weights before a
      BatchNorm, invariantly. SGD's step on such weights turns them by an angle
      ``lr G / |w|^2`` (``G`` the invariant gradient norm) and grows ``|w|^2``,
      so its effective rate falls as training goes on; the exact step turns
      them by ``lr G`` at any norm, with no such decay, and trails SGD at large
      learning rates (the paper's 1.0) in deep BatchNorm nets. With
      ``implicit_decay=True`` the gradients of the paths ending at output node
      ``k`` are also divided by ``rho_k``, which starts at 1 and is multiplied
      by every step's ``N'^2 / N^2`` (the factor the step, before the
      renormalization, grows ``N_k^2`` by). On a one-layer block (its bias in
      the column) with ``inner`` plain SGD this is SGD from columns of norm 1,
      exactly (docs/math.md, normalization layers); the first step is the
      exact step, ``N^2`` times SGD's from the same start. ``rho`` is
      invariant, so training stays invariant. Needs ``renormalize=True``;
      ``clip_norm`` then measures ``N_k dL/dv / rho_k^(1/2)``. ``False``
      (default): the exact step.
    initial_rate_norm: with ``implicit_decay=True``, the value every ``rho_k``
      starts at (default 1): on a one-layer block with plain SGD inside, SGD from
      columns of squared norm ``initial_rate_norm``. Give it the ``N^2`` of the
      start (``state.output_norms``; about 2 after :func:`gsgd_jax.set_skeleton`
      on LeCun-normal kernels) for SGD's first steps instead of ``N^2`` times
      them. A positive constant, so training stays invariant.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``
    and forwards extra keyword arguments to ``inner``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsgd_jax
    >>> params = {'l0': {'kernel': jnp.ones((3, 4))},
    ...           'l1': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)},
    ...           'scale': jnp.ones(2)}
    >>> layers = ['l0', 'l1']
    >>> tx = gsgd_jax.path_space(optax.adam(1e-2), layers=layers)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> v, new_v = (gsgd_jax.basis_path_values(p, layers) for p in (params, new_params))
    >>> step = jnp.abs(new_v['l1']['kernel'] - v['l1']['kernel'])
    >>> # Adam's first step: lr on every path
    >>> print(step.min().round(6), step.max().round(6))
    0.01 0.01
    >>> # 'scale' took Adam's step on weights:
    >>> print(new_params['scale'].round(6), int(state.clipped_ratios))
    [0.99 0.99] 0

  References:
    Meng et al., `G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space <https://arxiv.org/abs/1802.03713>`_, ICLR 2019.
  """
  decl = declaration.as_declaration(layers)  # read once: later changes to `layers` do nothing
  ratio_clip = _checked_settings(
    ratio_clip, clip_norm, renormalize, implicit_decay, initial_rate_norm
  )
  if fallback is not None:
    inner = optax.partition(
      {"path": inner, "fallback": fallback}, lambda tree: block_labels(tree, decl)
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    if pytree.is_placeholder(params):  # optax.tree_map_params: the state's layout suffices
      normalized = sum(block.normalized for block in decl.readings[0])
      rates = (zero,) * (normalized if implicit_decay else 0)
      return PathSpaceState(
        inner.init(params), zero, zero, (zero,) * (normalized if renormalize else 0), rates
      )
    blocks = structure.build_structure(params, decl)
    validate.check_skeleton(params, blocks)
    located = pytree.locate_blocks(params, structure.block_paths(blocks), "params")
    norms = _compiled(_output_norms, blocks)(located.arrays()) if renormalize else ()
    rates = tuple(jnp.full_like(n, initial_rate_norm) for n in norms) if implicit_decay else ()
    start = _starting_values(located, blocks)
    return PathSpaceState(inner.init(start), zero, zero, norms, rates)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format("gsgd_jax.path_space"))
    blocks = structure.build_structure(params, decl)
    paths = structure.block_paths(blocks)
    located: Located = pytree.locate_blocks(params, paths, "params")
    block_params = located.arrays()
    _check_state(state, blocks, renormalize, implicit_decay)
    _check_inner_state(inner, state.inner_state, params)

    # Inverse chain rule per block; other leaves keep their ordinary gradients.
    located_grads = pytree.locate_blocks(updates, paths, "updates")
    grads = located_grads.arrays()
    for block, arrays, block_grads in zip(blocks, block_params, grads, strict=True):
      _check_gradients(block, arrays, block_grads)
    held_rates, targets = iter(state.rate_norms), iter(state.output_norms)
    rates = [next(held_rates) if implicit_decay and b.normalized else None for b in blocks]
    renormalize_to = [next(targets) if renormalize and b.normalized else None for b in blocks]
    with basis.inlined(updates, params):  # our per-node work; the inner optimizer's is its own
      probe_sums = [_probe_sums(p, g) for p, g in zip(block_params, grads, strict=True)]
      path_grads = all_blocks.inverse_chain_rules(blocks, block_params, grads, probe_sums, rates)
      products = [g.products for g in path_grads]
      path_tree = pytree.rebuilt(located_grads, [(g.kernels, g.biases) for g in path_grads])
      path_params = _inner_params(located, blocks, products)
      if clip_norm is not None:
        sq_norms = [
          basis.invariant_sq_norm(block, g.kernels, g.biases, g.end_norms)
          for block, g in zip(blocks, path_grads, strict=True)
        ]
        path_tree = _clipped(path_tree, paths, sq_norms, clip_norm)

    # Probes anywhere (also on layers outside the blocks) are never trained.
    steps, inner_state = inner.update(
      pytree.zero_probes(path_tree), state.inner_state, path_params, **extra_args
    )

    # Weight allocation per block; other leaves take the inner (or fallback) step.
    with basis.inlined(updates, params):
      located_steps = pytree.locate_blocks(pytree.zero_probes(steps), paths, "inner updates")
      block_steps = located_steps.arrays()
      allocated, clipped = all_blocks.weight_allocations(
        blocks, block_params, block_steps, products, ratio_clip, renormalize_to
      )
      new_updates = pytree.rebuilt(located_steps, [(k, b) for k, b, _ in allocated])
      new_rates = []
      for rate, g, (_, _, landed) in zip(rates, path_grads, allocated, strict=True):
        if rate is not None:  # a normalized block, renormalized: both norms are at hand
          assert g.output_norms is not None and landed is not None
          new_rates.append(_grown(rate, g.output_norms, landed))
      clipped_now = _count(clipped)
    return new_updates, PathSpaceState(
      inner_state,
      clipped_now,
      state.total_clipped_ratios + clipped_now,
      state.output_norms,
      tuple(new_rates) if implicit_decay else state.rate_norms,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
