"""Pytree plumbing: key paths, and the declared layers' leaves in a flattened tree.

Layers are found by key path, never by pytree order, so the same declaration
reads the same in every tree form optax and Flax hand a transformation (dicts,
``FrozenDict``, ``nnx.State`` with or without ``Variable`` wrappers), and trees
whose flattening orders differ (params, gradients, an inner transformation's
steps) still line up layer by layer: each tree is located on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

KeyPath = tuple[Hashable, ...]
Path = tuple[str, ...]  # a normalised key path: one string per key

# Name of the optional per-node scale probe next to a layer's kernel and bias
# (see gsgd_jax.probes): its gradient replaces one reduction of the update.
PROBE = "scale_probe"


def key_name(entry: Any) -> str:
  """One entry of a JAX key path (or a user's key) as a plain string."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


# The longest repr of a user's argument that an error message repeats.
REPR_LIMIT = 200


class _ArrayStandIn:
  """Shows an array as its shape and dtype in a repr (see ``short_repr``)."""

  def __init__(self, array: Any):
    kind = "Array" if isinstance(array, jax.Array) else type(array).__name__
    self.text = f"{kind}(shape={tuple(array.shape)}, dtype={array.dtype})"

  def __repr__(self) -> str:
    return self.text


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
  """``repr(value)`` for an error message: arrays shown by shape and dtype, the whole
  cut to ``limit`` characters, so a params tree passed by mistake does not flood the
  message."""
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  try:
    shown = jax.tree.map(lambda x: _ArrayStandIn(x) if is_array(x) else x, value)
  except Exception:  # not a pytree JAX can map: show it as it is
    shown = value
  text = repr(shown)
  return text if len(text) <= limit else f"{text[: limit - 5]} ...{text[-1]}"


def leaf_paths(tree: Any) -> tuple[list[Path], list[Any], Any]:
  """Flattens ``tree``; returns normalised leaf paths, leaves and the treedef.

  A trailing ``.value`` (an ``nnx.Variable`` wrapper) is dropped, so a leaf reads
  the same with or without Flax's Variable boxes.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = []
  for path, _ in with_path:
    names = tuple(key_name(p) for p in path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
      names = names[:-1]
    paths.append(names)
  return paths, [leaf for _, leaf in with_path], treedef


def is_placeholder(tree: Any) -> bool:
  """True for an opaque stand-in for a whole params tree (no array inside).

  ``optax.tree_map_params`` calls ``init`` with such a placeholder to find
  where params-shaped trees sit in the state.
  """
  return jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)) and not hasattr(tree, "shape")


def zero_probes(tree: Any) -> Any:
  """``tree`` with every ``scale_probe`` leaf zeroed, inside the declared layers
  or not: probes are never trained (see ``gsgd_jax.probes``)."""
  paths, leaves, treedef = leaf_paths(tree)
  return treedef.unflatten(
    [
      jnp.zeros_like(leaf) if path and path[-1] == PROBE else leaf
      for path, leaf in zip(paths, leaves, strict=True)
    ]
  )


class LayerArrays(NamedTuple):
  """One block's per-layer arrays, in forward order (``None`` where absent).

  An affine layer (a norm's ``scale`` and ``bias``) has its ``scale`` where other
  layers have their kernel.
  """

  kernels: list[Any]
  biases: list[Any | None]
  probes: list[Any | None]


@dataclasses.dataclass(frozen=True)
class LayerSlots:
  """Positions of each layer's kernel, bias and scale probe among a tree's leaves."""

  kernel: tuple[int, ...]
  bias: tuple[int | None, ...]
  probe: tuple[int | None, ...]

  def take(self, leaves: Sequence[Any]) -> LayerArrays:
    """The block's arrays from ``leaves``."""
    pick = lambda slots: [None if i is None else leaves[i] for i in slots]
    return LayerArrays([leaves[i] for i in self.kernel], pick(self.bias), pick(self.probe))

  def put(self, out: list[Any], kernels: Sequence[Any], biases: Sequence[Any | None]) -> None:
    """Writes the block's kernels and biases into the flat list ``out``."""
    for i, value in zip(self.kernel, kernels, strict=True):
      out[i] = value
    for i, value in zip(self.bias, biases, strict=True):
      if i is not None:
        out[i] = value


def locate_layers(
  paths: Sequence[Path], layers: Sequence[Path], what: str = "params"
) -> LayerSlots:
  """Finds each layer's ``kernel`` (or, for an affine layer, ``scale``; required),
  ``bias`` and probe (optional) leaf."""
  index = {p: i for i, p in enumerate(paths)}
  kernels, biases, probes = [], [], []
  for layer in layers:
    k = index.get((*layer, "kernel"), index.get((*layer, "scale")))
    if k is None:
      name = "/".join(layer)
      if (*layer, "bias") in index:
        raise ValueError(
          f"layer {name!r} has a 'bias' but neither a 'kernel' nor a 'scale' leaf in "
          f"{what}: a norm without a scale (BatchNorm(use_scale=False))? Its bias "
          "alone owns no basis path G-SGD can use; keep use_scale=True, or leave "
          "the layer out of `layers` (it then takes the fallback)."
        )
      candidates = sorted("/".join(p[:-1]) for p in paths if p and p[-1] in ("kernel", "scale"))
      raise ValueError(
        f"layer {name!r} has no 'kernel' (or norm 'scale') leaf in {what}. Layers "
        f"with one: {candidates or 'none'}. Pass `layers` as key paths to "
        "sub-trees holding 'kernel' (e.g. ('params', 'Dense_0')), or use "
        "gsgd_jax.infer_layers(params)."
      )
    kernels.append(k)
    biases.append(index.get((*layer, "bias")))
    probes.append(index.get((*layer, PROBE)))
  return LayerSlots(tuple(kernels), tuple(biases), tuple(probes))


class Located(NamedTuple):
  """A flattened tree with the slots of every declared block's leaves."""

  leaves: list[Any]
  treedef: Any
  slots: tuple[LayerSlots, ...]

  def arrays(self) -> list[LayerArrays]:
    """Each block's arrays, in order."""
    return [slots.take(self.leaves) for slots in self.slots]


def locate_blocks(tree: Any, blocks: Sequence[Sequence[Path]], what: str) -> Located:
  """Leaves, treedef and per-block slots of the layers ``blocks`` name in ``tree``."""
  paths, leaves, treedef = leaf_paths(tree)
  return Located(leaves, treedef, tuple(locate_layers(paths, block, what=what) for block in blocks))


def map_layers(
  tree: Any,
  blocks: Sequence[Sequence[Path]],
  fn: Callable[[int, LayerArrays], tuple[Sequence[Any], Sequence[Any | None]]],
  *,
  outside: Callable[[Any], Any] = lambda leaf: leaf,
  what: str = "params",
) -> Any:
  """Rebuilds ``tree`` block by block.

  ``fn(b, arrays)`` gets block ``b``'s :class:`LayerArrays` and returns its new
  ``(kernels, biases)``; every other leaf (scale probes included) becomes
  ``outside(leaf)``.
  """
  located = locate_blocks(tree, blocks, what)
  return rebuilt(located, [fn(b, a) for b, a in enumerate(located.arrays())], outside=outside)


def rebuilt(
  located: Located,
  layers: Sequence[tuple[Sequence[Any], Sequence[Any | None]]],
  *,
  outside: Callable[[Any], Any] = lambda leaf: leaf,
) -> Any:
  """The located tree with each block's kernels and biases replaced by ``layers[b]``
  (``(kernels, biases)``) and every other leaf by ``outside(leaf)``."""
  out = [outside(leaf) for leaf in located.leaves]
  for slots, (kernels, biases) in zip(located.slots, layers, strict=True):
    slots.put(out, kernels, biases)
  return located.treedef.unflatten(out)
