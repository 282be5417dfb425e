"""Static structure of a ReLU chain: layer specs, skeleton and per-node index tables.

Everything here is derived from key paths and shapes only (never from values or
pytree order), so it is identical in ``init`` and ``update`` and under every tree
form optax and Flax hand a transformation (dicts, ``FrozenDict``, ``nnx.State``
with or without ``Variable`` wrappers).

Conventions (SPEC §1-2). Layers are numbered ``k = 0..L-1``; layer ``k`` maps node
level ``k`` to level ``k + 1``; level 0 holds the inputs, level ``L`` the outputs and
levels ``1..L-1`` the hidden nodes. ``taps`` parallel edges join each pair of
nodes of adjacent levels and tap ``centre`` is the skeleton one. The layer kinds
(kernels are used in their own shape, see ``basis.py``):

  * dense ``(n_in, n_out)``: one tap;
  * convolution ``(*window, c_in, c_out)`` (1-D, 2-D, 3-D): channels are nodes, one
    tap per window position, the centre ``(k // 2, ...)`` is the skeleton tap;
  * dense after a flatten of ``(S positions, C channels)`` (NHWC order, row
    ``s * C + c``): recognised when a dense kernel with ``S * C`` rows follows a
    convolution with ``C`` output channels; S taps, skeleton position ``S // 2``.

Several independent chains (blocks) may be declared; nothing crosses a block
boundary, so the inputs and outputs of each block are not hidden nodes.

Skeleton, per hidden node:
  * incoming edge of node ``j`` of level ``k + 1``: from node ``pi[k][j] = j mod n_in``;
  * outgoing edge of node ``a`` of level ``k``: to node ``sigma[k][a] = a mod n_out``
    of layer ``k``.
The incoming skeleton edges form the fixed set F that G-SGD never moves.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KeyPath = tuple[Hashable, ...]
LayerPaths = Sequence[KeyPath | str] | Sequence[list[KeyPath | str]]

# Name of the optional per-node scale probe next to a layer's kernel and bias
# (see gsgd_jax.probes): its gradient replaces one reduction of the update.
PROBE = "scale_probe"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a chain, as seen by the path-space algorithm."""

  path: tuple[str, ...]  # normalised key path of the layer's sub-tree
  kind: str  # 'dense', 'conv' or 'flatten' (a dense layer after a flatten)
  kernel_shape: tuple[int, ...]
  has_bias: bool
  taps: int  # parallel edges per (input node, output node) pair
  centre: int  # index of the skeleton tap in [0, taps)
  n_in: int
  n_out: int

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def centre_index(self) -> tuple[int, ...]:
    """A convolution's skeleton tap as a position in its window axes (() otherwise)."""
    if self.kind != "conv":
      return ()
    return tuple(int(i) for i in np.unravel_index(self.centre, self.kernel_shape[:-2]))

  @property
  def centre_row(self) -> int:
    """First kernel row of a flatten layer's skeleton tap (0 otherwise)."""
    return self.centre * self.n_in if self.kind == "flatten" else 0


@dataclasses.dataclass(frozen=True, eq=False)
class ChainStructure:
  """Skeleton and index tables of one chain of layers (see module docstring).

  Attributes:
    layers: the ``L`` layer specs in order.
    pi: ``pi[k]`` (for ``k < L-1``): source of the incoming skeleton edge of each
      node of level ``k + 1``.
    sigma: ``sigma[k]`` (for ``k >= 1``; ``sigma[0]`` is ``None``): target of the
      outgoing skeleton edge of each node of level ``k``.
    out_fixed: ``out_fixed[k][a]`` (for ``k >= 1``): the outgoing skeleton edge
      of node ``a`` of level ``k`` is itself in F.
    loops_back: ``loops_back[k][j]`` (for ``1 <= k < L-1``): the incoming
      skeleton edge of node ``j`` of level ``k + 1`` is also the outgoing
      skeleton edge of its source, i.e. ``sigma[k][pi[k][j]] == j``.
  """

  layers: tuple[LayerSpec, ...]
  pi: tuple[np.ndarray | None, ...]
  sigma: tuple[np.ndarray | None, ...]
  out_fixed: tuple[np.ndarray | None, ...]
  loops_back: tuple[np.ndarray | None, ...]

  @property
  def depth(self) -> int:
    return len(self.layers)

  @property
  def num_hidden(self) -> int:
    """H: the number of hidden nodes, i.e. the dimension of the group G."""
    return sum(spec.n_out for spec in self.layers[:-1])

  @property
  def num_weights(self) -> int:
    """m: weights plus biases (biases count as edges from a constant node)."""
    return sum(
        int(np.prod(s.kernel_shape)) + (s.n_out if s.has_bias else 0)
        for s in self.layers
    )

  @property
  def num_basis_paths(self) -> int:
    """m - H: the dimension of the positively scale-invariant space."""
    return self.num_weights - self.num_hidden


# ----------------------------------------------------------------------------
# Key paths.


def _key_name(entry: Any) -> str:
  """One entry of a JAX key path as a plain string."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def normalise_path(path: KeyPath | str) -> tuple[str, ...]:
  """A user's layer path (tuple of keys, or ``'a/b/c'``) as a tuple of strings."""
  if isinstance(path, str):
    parts = tuple(p for p in path.split("/") if p)
  elif isinstance(path, tuple):
    parts = tuple(_key_name(p) for p in path)
  else:
    raise TypeError(
        f"a layer path must be a tuple of keys or a 'a/b/c' string, got {path!r}"
    )
  if not parts:
    raise ValueError("a layer path must not be empty")
  return parts


def leaf_paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Flattens ``tree``; returns normalised leaf paths, leaves and the treedef.

  A trailing ``.value`` (an ``nnx.Variable`` wrapper) is dropped, so a leaf reads
  the same with or without Flax's Variable boxes.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = []
  for path, _ in with_path:
    names = tuple(_key_name(p) for p in path)
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
  return treedef.unflatten([jnp.zeros_like(leaf) if path and path[-1] == PROBE else leaf
                            for path, leaf in zip(paths, leaves)])


@dataclasses.dataclass(frozen=True)
class LayerLeaves:
  """Positions of each layer's kernel, bias and scale probe in one flattened tree."""

  kernel: tuple[int, ...]
  bias: tuple[int | None, ...]
  probe: tuple[int | None, ...]


def locate_layers(
    paths: Sequence[tuple[str, ...]], layers: Sequence[tuple[str, ...]],
    what: str = "params",
) -> LayerLeaves:
  """Finds each layer's ``kernel`` (required), ``bias`` and probe (optional) leaf."""
  index = {p: i for i, p in enumerate(paths)}
  kernels, biases, probes = [], [], []
  for layer in layers:
    k = index.get(layer + ("kernel",))
    if k is None:
      candidates = sorted("/".join(p[:-1]) for p in paths if p and p[-1] == "kernel")
      raise ValueError(
          f"layer {'/'.join(layer)!r} has no 'kernel' leaf in {what}. Layers with "
          f"a kernel: {candidates or 'none'}. Pass `layers` as key paths to "
          "sub-trees holding 'kernel' (e.g. ('params', 'Dense_0')), or use "
          "gsgd_jax.infer_layers(params)."
      )
    kernels.append(k)
    biases.append(index.get(layer + ("bias",)))
    probes.append(index.get(layer + (PROBE,)))
  return LayerLeaves(tuple(kernels), tuple(biases), tuple(probes))


def locate_blocks(tree: Any, blocks: Sequence[ChainStructure], what: str
                  ) -> tuple[list[Any], Any, list[LayerLeaves]]:
  """Leaves, treedef and per-block kernel/bias positions of ``blocks`` in ``tree``.

  Every tree (params, gradients, inner steps) is located on its own, so trees
  whose flattening orders differ still line up layer by layer.
  """
  paths, leaves, treedef = leaf_paths(tree)
  wheres = [locate_layers(paths, [spec.path for spec in block.layers], what=what)
            for block in blocks]
  return leaves, treedef, wheres


# ----------------------------------------------------------------------------
# Building the structure.


def _layer_spec(path: tuple[str, ...], kernel_shape: tuple[int, ...], has_bias: bool,
                prev: LayerSpec | None) -> LayerSpec:
  name = "/".join(path)
  if len(kernel_shape) < 2 or min(kernel_shape) < 1:
    raise ValueError(f"layer {name!r}: kernel of shape {kernel_shape} is neither a dense "
                     "(in, out) kernel nor a convolution (*window, in, out) kernel")
  *window, n_in, n_out = kernel_shape
  if window:  # convolution: one tap per window position, the centre is the skeleton
    centre = int(np.ravel_multi_index(tuple(d // 2 for d in window), window))
    return LayerSpec(path, "conv", tuple(kernel_shape), has_bias, int(np.prod(window)),
                     centre, n_in, n_out)
  if prev is not None and prev.kind == "conv" and n_in != prev.n_out \
      and n_in % prev.n_out == 0:
    positions = n_in // prev.n_out  # flatten of (positions, channels), NHWC order
    return LayerSpec(path, "flatten", tuple(kernel_shape), has_bias, positions,
                     positions // 2, prev.n_out, n_out)
  return LayerSpec(path, "dense", tuple(kernel_shape), has_bias, 1, 0, n_in, n_out)


def _chain(signature: tuple[tuple[tuple[str, ...], tuple[int, ...], bool], ...]
           ) -> ChainStructure:
  """Specs and skeleton index tables of one chain of layers."""
  if not signature:
    raise ValueError("a block of `layers` is empty: declare at least one layer per block")
  specs = []
  for entry in signature:
    spec = _layer_spec(*entry, prev=specs[-1] if specs else None)
    if specs and spec.n_in != specs[-1].n_out:
      prev = specs[-1]
      raise ValueError(
          f"layer {spec.name!r} takes {spec.n_in} inputs (kernel {spec.kernel_shape}) "
          f"but the layer before it, {prev.name!r}, has {prev.n_out} outputs "
          f"(kernel {prev.kernel_shape}); are `layers` in forward order?"
      )
    specs.append(spec)
  specs = tuple(specs)
  depth = len(specs)
  pi = tuple(np.arange(s.n_out) % s.n_in if k < depth - 1 else None
             for k, s in enumerate(specs))
  sigma = tuple(np.arange(s.n_in) % s.n_out if k >= 1 else None
                for k, s in enumerate(specs))
  out_fixed = tuple(
      None if k == 0 else
      (pi[k][sigma[k]] == np.arange(s.n_in)) if k < depth - 1 else
      np.zeros(s.n_in, bool)
      for k, s in enumerate(specs))
  loops_back = tuple(
      (sigma[k][pi[k]] == np.arange(s.n_out)) if 1 <= k < depth - 1 else None
      for k, s in enumerate(specs))
  for table in (*pi, *sigma, *out_fixed, *loops_back):
    if table is not None:
      table.setflags(write=False)
  return ChainStructure(specs, pi, sigma, out_fixed, loops_back)


@functools.lru_cache(maxsize=256)
def _build(signatures) -> tuple[ChainStructure, ...]:
  if not signatures:
    raise ValueError("`layers` is empty: declare at least one layer")
  seen = set()
  for signature in signatures:
    for path, *_ in signature:
      if path in seen:
        raise ValueError(f"layer {'/'.join(path)!r} is declared twice in `layers`")
      seen.add(path)
  return tuple(_chain(signature) for signature in signatures)


def _is_path(entry: Any) -> bool:
  return isinstance(entry, (str, tuple))


def normalise_blocks(layers: Any) -> tuple[tuple[tuple[str, ...], ...], ...]:
  """``layers`` as blocks of normalised paths.

  ``layers`` is one chain (a sequence of paths: tuples of keys or ``'a/b'``
  strings) or several blocks (a sequence of lists of paths).
  """
  if isinstance(layers, str):
    raise TypeError(f"`layers` must be a sequence of layer paths, got the string {layers!r}")
  layers = list(layers)
  if layers and all(isinstance(block, list) for block in layers):
    blocks = layers
  elif all(_is_path(p) for p in layers):
    blocks = [layers]
  else:
    raise TypeError(
        "`layers` must be a sequence of layer paths (tuples of keys or 'a/b' strings) "
        "for one chain, or a sequence of lists of paths for several blocks; got "
        f"{layers!r}")
  for block in blocks:
    for path in block:
      if not _is_path(path):
        raise TypeError(f"a layer path must be a tuple of keys or an 'a/b' string, "
                        f"got {path!r} (a list inside `layers` is a block)")
  return tuple(tuple(normalise_path(p) for p in block) for block in blocks)


def build_structure(tree: Any, layers: Any
                    ) -> tuple[tuple[ChainStructure, ...], tuple[LayerLeaves, ...], Any]:
  """Structure of every block of ``layers`` in ``tree``, and where its leaves sit.

  Returns:
    ``(blocks, leaves, treedef)``: the (cached) chain structure of each block,
    the positions of each block's kernels/biases among
    ``jax.tree.leaves(tree)``, and the treedef of ``tree``.
  """
  blocks = normalise_blocks(layers)
  paths, leaves, treedef = leaf_paths(tree)
  wheres = tuple(locate_layers(paths, names) for names in blocks)
  signatures = []
  for names, where in zip(blocks, wheres):
    for name, k, b, s in zip(names, where.kernel, where.bias, where.probe):
      for i, what in ((k, "kernel"), (b, "bias"), (s, PROBE)):
        if i is not None and not jnp.issubdtype(jnp.result_type(leaves[i]), jnp.inexact):
          raise ValueError(
              f"layer {'/'.join(name)!r}: {what} has dtype "
              f"{jnp.result_type(leaves[i])}; G-SGD needs floating-point parameters")
      for i, what in ((b, "bias"), (s, PROBE)):
        if i is not None and np.shape(leaves[i]) != (np.shape(leaves[k])[-1],):
          raise ValueError(
              f"layer {'/'.join(name)!r}: {what} of shape {np.shape(leaves[i])} does not "
              f"match the kernel's {np.shape(leaves[k])[-1]} outputs")
    signatures.append(tuple(
        (name, tuple(int(d) for d in np.shape(leaves[k])), b is not None)
        for name, k, b in zip(names, where.kernel, where.bias)))
  return _build(tuple(signatures)), wheres, treedef


# ----------------------------------------------------------------------------
# Inferring the layer order from Flax names.

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def infer_layers(params: Any) -> list[tuple[str | int, ...]]:
  """Infers the ordered layer paths of a Flax MLP or plain CNN from its names.

  Recognises layers numbered in their last key: Linen's ``Dense_0, Dense_1,
  ...`` and NNX lists ``layers/0, layers/1, ...`` (and names like ``fc1, fc2``),
  ordered numerically (``Dense_10`` after ``Dense_2``), never by pytree order.
  A CNN may have one numbered group of convolutions and one of dense layers
  (``Conv_0, Conv_1, Dense_0, ...``; or NNX ``convs/0, ..., head/0``): the
  convolutions come first.

  Args:
    params: a parameter pytree (dict, ``FrozenDict`` or ``nnx.State``).

  Returns:
    A list of key paths, one per layer, in forward order; pass it as
    ``layers=`` to the transformations of this package.

  Raises:
    ValueError: when the order cannot be decided (names without numbers,
      repeated numbers, two groups of the same kind, a group mixing
      convolutions and dense layers, or shapes that do not chain). Then pass
      ``layers`` explicitly.
  """
  paths, leaves, _ = leaf_paths(params)
  found = [(p[:-1], tuple(np.shape(leaf))) for p, leaf in zip(paths, leaves)
           if p and p[-1] == "kernel"]
  if not found:
    raise ValueError("infer_layers: no sub-tree with a 'kernel' leaf in params")
  listing = ", ".join("/".join(p) for p, _ in found)

  def ambiguous(why: str) -> ValueError:
    return ValueError(
        f"infer_layers cannot decide the layer order ({why}); found layers: "
        f"{listing}. Pass `layers=[...]` explicitly, in forward order."
    )

  groups: dict[tuple, list] = {}
  for path, shape in found:
    match = _NUMBERED.match(path[-1])
    if match is None:
      raise ambiguous(f"{path[-1]!r} carries no number")
    groups.setdefault((path[:-1], match.group(1)), []).append(
        (int(match.group(2)), path, shape))
  by_kind: dict[str, list] = {}
  for (parent, stem), members in groups.items():
    kinds = {"conv" if len(shape) > 2 else "dense" for _, _, shape in members}
    if len(kinds) > 1:
      raise ambiguous(f"group {'/'.join(parent + (stem,))}* mixes convolutions and "
                      "dense layers")
    if len({n for n, *_ in members}) != len(members):
      raise ambiguous("two layers carry the same number")
    by_kind.setdefault(kinds.pop(), []).append(sorted(members))
  if any(len(g) > 1 for g in by_kind.values()):
    raise ambiguous("several groups of layers of the same kind; cannot tell which "
                    "comes first")
  ordered = by_kind.get("conv", [[]])[0] + by_kind.get("dense", [[]])[0]
  try:
    _chain(tuple((path, shape, False) for _, path, shape in ordered))
  except ValueError as err:
    raise ambiguous(f"shapes do not chain: {err}") from None
  return [tuple(int(k) if k.isdigit() else k for k in path) for _, path, _ in ordered]
