"""Static structure of a ReLU chain: layer specs, skeleton and per-node index tables.

Everything here is derived from key paths and shapes only (never from values or
pytree order), so it is identical in ``init`` and ``update`` and under every tree
form optax and Flax hand a transformation (dicts, ``FrozenDict``, ``nnx.State``
with or without ``Variable`` wrappers).

Conventions (SPEC §1-2). Layers are numbered ``k = 0..L-1``; layer ``k`` maps node
level ``k`` to level ``k + 1``; level 0 holds the inputs, level ``L`` the outputs and
levels ``1..L-1`` the hidden nodes. A kernel is viewed as ``(taps, n_in, n_out)``:
``taps`` parallel edges join each node pair and tap ``centre`` is the skeleton one
(a dense kernel has a single tap).

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
import numpy as np

KeyPath = tuple[Hashable, ...]
LayerPaths = Sequence[KeyPath | str]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a chain, as seen by the path-space algorithm."""

  path: tuple[str, ...]  # normalised key path of the layer's sub-tree
  kernel_shape: tuple[int, ...]
  has_bias: bool
  taps: int  # parallel edges per (input node, output node) pair
  centre: int  # index of the skeleton tap in [0, taps)
  n_in: int
  n_out: int

  @property
  def name(self) -> str:
    return "/".join(self.path)


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
  elif isinstance(path, (tuple, list)):
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


@dataclasses.dataclass(frozen=True)
class LayerLeaves:
  """Positions of each layer's kernel and bias in one flattened tree."""

  kernel: tuple[int, ...]
  bias: tuple[int | None, ...]


def locate_layers(
    paths: Sequence[tuple[str, ...]], layers: Sequence[tuple[str, ...]],
    what: str = "params",
) -> LayerLeaves:
  """Finds each layer's ``kernel`` (required) and ``bias`` (optional) leaf."""
  index = {p: i for i, p in enumerate(paths)}
  kernels, biases = [], []
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
  return LayerLeaves(tuple(kernels), tuple(biases))


# ----------------------------------------------------------------------------
# Building the structure.


def _layer_spec(path: tuple[str, ...], kernel_shape: tuple[int, ...],
                has_bias: bool) -> LayerSpec:
  if len(kernel_shape) != 2:
    raise ValueError(
        f"layer {'/'.join(path)!r}: kernel of shape {kernel_shape} is not a dense "
        "(in, out) kernel; only dense layers are supported so far."
    )
  n_in, n_out = kernel_shape
  if n_in < 1 or n_out < 1:
    raise ValueError(f"layer {'/'.join(path)!r}: empty kernel of shape {kernel_shape}")
  return LayerSpec(path, tuple(kernel_shape), has_bias, taps=1, centre=0,
                   n_in=n_in, n_out=n_out)


@functools.lru_cache(maxsize=256)
def _build(signature: tuple[tuple[tuple[str, ...], tuple[int, ...], bool], ...]
           ) -> ChainStructure:
  if not signature:
    raise ValueError("`layers` is empty: declare at least one layer")
  specs = tuple(_layer_spec(*entry) for entry in signature)
  seen = set()
  for spec in specs:
    if spec.path in seen:
      raise ValueError(f"layer {spec.name!r} is declared twice in `layers`")
    seen.add(spec.path)
  for prev, spec in zip(specs, specs[1:]):
    if spec.n_in != prev.n_out:
      raise ValueError(
          f"layer {spec.name!r} takes {spec.n_in} inputs (kernel {spec.kernel_shape}) "
          f"but the layer before it, {prev.name!r}, has {prev.n_out} outputs "
          f"(kernel {prev.kernel_shape}); are `layers` in forward order?"
      )
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


def build_structure(tree: Any, layers: LayerPaths) -> tuple[ChainStructure, LayerLeaves, Any]:
  """Structure of ``layers`` in ``tree``, plus where their leaves sit in it.

  Returns:
    ``(structure, leaves, treedef)``: the (cached) chain structure, the
    positions of each layer's kernel/bias among ``jax.tree.leaves(tree)``, and
    the treedef of ``tree``.
  """
  names = tuple(normalise_path(p) for p in layers)
  paths, leaves, treedef = leaf_paths(tree)
  where = locate_layers(paths, names)
  signature = tuple(
      (name, tuple(int(d) for d in np.shape(leaves[k])), b is not None)
      for name, k, b in zip(names, where.kernel, where.bias))
  for name, k, b in zip(names, where.kernel, where.bias):
    if b is not None and np.shape(leaves[b]) != (np.shape(leaves[k])[-1],):
      raise ValueError(
          f"layer {'/'.join(name)!r}: bias of shape {np.shape(leaves[b])} does not "
          f"match the kernel's {np.shape(leaves[k])[-1]} outputs"
      )
  return _build(signature), where, treedef


# ----------------------------------------------------------------------------
# Inferring the layer order from Flax names.

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def infer_layers(params: Any) -> list[tuple[str | int, ...]]:
  """Infers the ordered layer paths of a Flax MLP from its parameter names.

  Recognises sibling layers numbered in their last key: Linen's ``Dense_0,
  Dense_1, ...`` and NNX lists ``layers/0, layers/1, ...`` (and names like
  ``fc1, fc2``), ordered numerically (``Dense_10`` after ``Dense_2``), never by
  pytree order.

  Args:
    params: a parameter pytree (dict, ``FrozenDict`` or ``nnx.State``).

  Returns:
    A list of key paths, one per layer, in forward order; pass it as
    ``layers=`` to the transformations of this package.

  Raises:
    ValueError: when the order cannot be decided (layers in different
      sub-trees, names without a common numbered stem, repeated numbers, or
      shapes that do not chain). Then pass ``layers`` explicitly.
  """
  paths, leaves, _ = leaf_paths(params)
  found = [(p[:-1], np.shape(leaf)) for p, leaf in zip(paths, leaves)
           if p and p[-1] == "kernel"]
  if not found:
    raise ValueError("infer_layers: no sub-tree with a 'kernel' leaf in params")
  listing = ", ".join("/".join(p) for p, _ in found)

  def ambiguous(why: str) -> ValueError:
    return ValueError(
        f"infer_layers cannot decide the layer order ({why}); found layers: "
        f"{listing}. Pass `layers=[...]` explicitly, in forward order."
    )

  parents = {p[:-1] for p, _ in found}
  if len(parents) != 1:
    raise ambiguous("layers sit in different sub-trees")
  keyed = []
  for path, shape in found:
    match = _NUMBERED.match(path[-1])
    if match is None:
      raise ambiguous(f"{path[-1]!r} carries no number")
    keyed.append((match.group(1), int(match.group(2)), path, shape))
  if len({stem for stem, *_ in keyed}) != 1:
    raise ambiguous("layer names have different stems")
  if len({n for _, n, *_ in keyed}) != len(keyed):
    raise ambiguous("two layers carry the same number")
  keyed.sort(key=lambda item: item[1])
  for (_, _, prev, prev_shape), (_, _, path, shape) in zip(keyed, keyed[1:]):
    if len(shape) != 2 or len(prev_shape) != 2 or shape[0] != prev_shape[1]:
      raise ambiguous(
          f"{'/'.join(path)} {shape} does not follow {'/'.join(prev)} {prev_shape}")
  return [tuple(int(k) if k.isdigit() else k for k in path) for *_, path, _ in keyed]
