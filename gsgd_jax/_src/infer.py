"""Inferring the layer order of a Flax MLP or plain CNN from its module names."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import optax

from gsgd_jax._src import pytree, structure
from gsgd_jax._src.declaration import Block
from gsgd_jax._src.pytree import PROBE

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_LISTED = 10  # norms named in a message before it says how many more there are


def norm_paths(shapes: dict[pytree.Path, tuple[int, ...]]) -> list[pytree.Path]:
  """The sub-trees of a params tree (leaf paths and shapes) that are norms: a ``scale``
  of rank 1 or more and no ``kernel`` beside it (BatchNorm, LayerNorm, GroupNorm,
  RMSNorm), or a BatchNorm's ``mean`` and ``var`` (an NNX state with its statistics)."""
  found = set()
  for path, shape in shapes.items():
    if not path:
      continue
    parent = path[:-1]
    scale = path[-1] == "scale" and bool(shape) and (*parent, "kernel") not in shapes
    statistics = path[-1] == "mean" and (*parent, "var") in shapes
    if scale or statistics:
      found.add(parent)
  return sorted(found)


@dataclasses.dataclass(frozen=True)
class _Found:
  """A layer found in the tree: its kernel's shape and its bias's and probe's, if any."""

  number: int
  path: pytree.Path
  shape: tuple[int, ...]
  beside: tuple[tuple[int, ...], ...]  # shapes of the bias and scale probe present

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def stacked(self) -> bool:
    """A bias or probe of shape ``(S, n_out)``: the layer is a Flax stack on axis 0."""
    return len(self.shape) >= 3 and (self.shape[0], self.shape[-1]) in self.beside


def _show(members: list[_Found]) -> str:
  return ", ".join(f"{m.name!r} {m.shape}" for m in members)


def _stack_length(members: list[_Found]) -> int | None:
  """The length ``S`` of the stack a numbered group of layers is, or None when the group
  is not stacked.

  A group is a stack (Flax ``nn.scan`` / ``nnx.vmap`` with its copies on axis 0) when a
  layer's bias or probe is ``(S, n_out)`` and every kernel of the group carries the same
  leading ``S`` beside its own axes: the layers of one scanned sub-tree are all stacked.
  """
  if not any(m.stacked for m in members):
    # Without a bias a rank-3 kernel reads two ways, as a stacked dense layer or as a 1-D
    # convolution, whose symmetry groups differ: guessing would train one as the other.
    silent = [m for m in members if len(m.shape) == 3 and not m.beside]
    if silent:
      raise ValueError(
        f"infer_layers: layers {_show(silent)} have rank-3 kernels and no bias to tell "
        "whether each is a stacked dense layer (nn.scan / nnx.vmap: S copies of an (in, "
        "out) kernel on axis 0) or a 1-D convolution (width, in, out); the two have "
        "different symmetry groups. For a stack, declare its block explicitly: "
        "layers=[gsgd_jax.Block([...], stack_axis=0)], its layers in forward order "
        "(stack_axis=1 for the (in, S, out) layout). 1-D convolutions are not supported."
      )
    return None
  length = next(m.shape[0] for m in members if m.stacked)
  # A layer of the stack has a kernel (S, ..., n_out) and, if any, a bias (S, n_out).
  odd = [
    m for m in members if len(m.shape) < 3 or m.shape[0] != length or (m.beside and not m.stacked)
  ]
  if odd:
    raise ValueError(
      f"infer_layers: layers {_show([m for m in members if m.stacked])} carry a stack "
      f"of {length} copies on axis 0 (nn.scan / nnx.vmap), but {_show(odd)} beside them "
      "do not; the layers of a stack all carry it. Declare the blocks explicitly: "
      "gsgd_jax.Block([...], stack_axis=0) for the stack, gsgd_jax.Block([...]) for the "
      "others."
    )
  return length


def infer_layers(params: optax.Params) -> list[tuple[str | int, ...]] | list[Block]:
  """Infers the ordered layer paths of a Flax MLP or plain CNN from its names.

  Recognises layers numbered in their last key: Linen's ``Dense_0, Dense_1,
  ...``, ``nn.Sequential``'s ``layers_0, layers_2, ...`` and NNX lists
  ``layers/0, layers/1, ...`` (and names like ``fc1, fc2``), ordered numerically
  (``Dense_10`` after ``Dense_2``), never by pytree order. A CNN may have one
  numbered group of convolutions and one of dense layers (``Conv_0, Conv_1,
  Dense_0, ...``; or NNX ``convs/0, ..., head/0``): the convolutions come first.
  One numbered group may also hold both kinds (``nn.Sequential([Conv, relu,
  flatten, Dense])``) when its numbers put every convolution first.

  A Flax stack (``nn.scan`` with ``variable_axes={'params': 0}``, layers made by
  ``nnx.vmap``: ``S`` copies of each layer on axis 0 of every leaf, kernels
  ``(S, in, out)``) is recognised by its biases (or scale probes) of shape
  ``(S, out)`` beside kernels that all carry the same leading ``S``; the result
  is then one stacked block, ``[gsgd_jax.Block(paths, stack_axis=0)]``. A
  rank-3 kernel without a bias may be a stacked dense layer or a 1-D
  convolution and is refused; so is a tree holding a stack beside unstacked
  layers (a scanned body between an embedding and a head), whose blocks cannot
  chain through the stack. Declare those blocks explicitly with
  :class:`gsgd_jax.Block`.

  Args:
    params: a parameter pytree (dict, ``FrozenDict`` or ``nnx.State``).

  Returns:
    A list of key paths, one per layer, in forward order; or, for a Flax stack,
    a list of one :class:`gsgd_jax.Block` declared with ``stack_axis=0``. Pass
    it as ``layers=`` to the transformations of this package.

  Raises:
    ValueError: when the tree holds norms (a ``scale`` without a kernel, or
      BatchNorm statistics): a chain cannot run through a norm, and names do
      not say where one stands (use :func:`gsgd_jax.infer_blocks`); when the
      order cannot be decided (names without numbers,
      repeated numbers, two groups of the same kind, a group whose numbers put a
      dense layer before a convolution, or shapes that do not chain), when a
      rank-3 kernel has no bias to tell a stack from a 1-D convolution, when a
      stack stands beside unstacked layers or another stack, or when a layer is
      of a kind G-SGD does not support. Then pass ``layers`` explicitly.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> gsgd_jax.infer_layers(params)
    [('params', 'layers_0'), ('params', 'layers_2'), ('params', 'layers_4')]

    Three copies of a two-layer ReLU body, scanned (Linen numbers modules as
    they are built: build each before calling the next):

    >>> class Body(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, h, _):
    ...     h = nn.relu(nn.Dense(8)(h))
    ...     return nn.relu(nn.Dense(4)(h)), None
    >>> scanned = dict(variable_axes={'params': 0}, split_rngs={'params': True})
    >>> Stack = nn.scan(Body, length=3, **scanned)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), jnp.ones((1, 4)), None)
    >>> params['params']['Dense_0']['kernel'].shape
    (3, 4, 8)
    >>> gsgd_jax.infer_layers(params)
    [Block(['params/Dense_0', 'params/Dense_1'], stack_axis=0)]
  """
  paths, leaves, _ = pytree.leaf_paths(params)
  shapes = {p: tuple(int(d) for d in np.shape(leaf)) for p, leaf in zip(paths, leaves, strict=True)}
  found = [(p[:-1], shape) for p, shape in shapes.items() if p and p[-1] == "kernel"]
  if not found:
    raise ValueError("infer_layers: no sub-tree with a 'kernel' leaf in params")
  norms = norm_paths(shapes)
  if norms:
    listed = ", ".join(repr("/".join(p)) for p in norms[:_LISTED])
    more = f" and {len(norms) - _LISTED} more" if len(norms) > _LISTED else ""
    raise ValueError(
      f"infer_layers: params hold norms ({listed}{more}) beside their kernels. A chain "
      "cannot run through a norm (its normalization breaks the rescaling symmetry of the "
      "layers before it), and names alone do not say where a norm stands. Write the "
      "blocks with gsgd_jax.infer_blocks(params, layout) ('plainnet', 'resnet', "
      "'preact' or 'preln'), or declare them with gsgd_jax.Block; then check them with "
      "gsgd_jax.verify_invariance."
    )
  listing = ", ".join("/".join(p) for p, _ in found)

  def ambiguous(why: str) -> ValueError:
    return ValueError(
      f"infer_layers cannot decide the layer order ({why}); found layers: "
      f"{listing}. Pass `layers=[...]` explicitly, in forward order."
    )

  groups: dict[tuple[Any, ...], list[_Found]] = {}
  for path, shape in found:
    match = _NUMBERED.match(path[-1])
    if match is None:
      raise ambiguous(f"{path[-1]!r} carries no number")
    beside = tuple(shapes[(*path, leaf)] for leaf in ("bias", PROBE) if (*path, leaf) in shapes)
    layer = _Found(int(match.group(2)), path, shape, beside)
    groups.setdefault((path[:-1], match.group(1)), []).append(layer)
  head = lambda key: "/".join((*key[0], key[1])) + "*"
  stacks = {key: _stack_length(members) for key, members in groups.items()}
  stacked = {key: length for key, length in stacks.items() if length is not None}
  if stacked and (len(stacked) < len(groups) or len(set(stacked.values())) > 1):
    stacks_found = ", ".join(f"{head(key)} ({length} copies)" for key, length in stacked.items())
    alone = ", ".join(head(key) for key in groups if key not in stacked) or "each other"
    raise ValueError(
      f"infer_layers: the stacks {stacks_found} (nn.scan / nnx.vmap) stand beside {alone}; "
      "they are separate blocks, whose order and bounds the names do not give. Declare the "
      "blocks explicitly: gsgd_jax.Block([...], stack_axis=0) for each stack, "
      "gsgd_jax.Block([...]) for each chain of unstacked layers."
    )
  # A stack's layers are ordered and checked as one copy of it: its leaves less axis 0.
  copy = lambda layer: layer.shape[1:] if stacked else layer.shape
  kind = lambda layer: "conv" if len(copy(layer)) > 2 else "dense"
  by_kind: dict[str, list[list[_Found]]] = {}
  for (parent, stem), unordered in groups.items():
    members = sorted(unordered, key=lambda layer: layer.number)
    if len({m.number for m in members}) != len(members):
      raise ambiguous("two layers carry the same number")
    kinds = [kind(m) for m in members]
    if kinds != sorted(kinds, key=lambda k: k != "conv"):
      raise ambiguous(
        f"group {'/'.join((*parent, stem))}* numbers a dense layer before a convolution"
      )
    by_kind.setdefault("mixed" if len(set(kinds)) > 1 else kinds[0], []).append(members)
  if any(len(g) > 1 for g in by_kind.values()) or ("mixed" in by_kind and len(by_kind) > 1):
    raise ambiguous("several groups of layers of the same kind; cannot tell which comes first")
  ordered = [member for key in ("mixed", "conv", "dense") for member in by_kind.get(key, [[]])[0]]
  try:
    structure.chain_structure(tuple((m.path, copy(m), False, False, None) for m in ordered))
  except structure.UnsupportedLayerError as err:
    raise structure.UnsupportedLayerError(f"infer_layers: unsupported layer kind: {err}") from None
  except ValueError as err:
    raise ambiguous(f"shapes do not chain: {err}") from None
  if stacked:
    blocks = [Block([m.path for m in ordered], stack_axis=0)]
    structure.build_structure(params, blocks)  # the biases and probes carry the stack too
    return blocks
  return [tuple(int(k) if k.isdigit() else k for k in m.path) for m in ordered]
