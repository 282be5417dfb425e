"""Inferring the layer order of a Flax MLP or plain CNN from its module names."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import optax

from gsgd_jax._src import pytree, structure

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def infer_layers(params: optax.Params) -> list[tuple[str | int, ...]]:
  """Infers the ordered layer paths of a Flax MLP or plain CNN from its names.

  Recognises layers numbered in their last key: Linen's ``Dense_0, Dense_1,
  ...``, ``nn.Sequential``'s ``layers_0, layers_2, ...`` and NNX lists
  ``layers/0, layers/1, ...`` (and names like ``fc1, fc2``), ordered numerically
  (``Dense_10`` after ``Dense_2``), never by pytree order. A CNN may have one
  numbered group of convolutions and one of dense layers (``Conv_0, Conv_1,
  Dense_0, ...``; or NNX ``convs/0, ..., head/0``): the convolutions come first.
  One numbered group may also hold both kinds (``nn.Sequential([Conv, relu,
  flatten, Dense])``) when its numbers put every convolution first.

  Args:
    params: a parameter pytree (dict, ``FrozenDict`` or ``nnx.State``).

  Returns:
    A list of key paths, one per layer, in forward order; pass it as
    ``layers=`` to the transformations of this package.

  Raises:
    ValueError: when the order cannot be decided (names without numbers,
      repeated numbers, two groups of the same kind, a group whose numbers put a
      dense layer before a convolution, or shapes that do not chain), or when a
      layer is of a kind G-SGD does not support. Then pass ``layers``
      explicitly.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> gsgd_jax.infer_layers(params)
    [('params', 'layers_0'), ('params', 'layers_2'), ('params', 'layers_4')]
  """
  paths, leaves, _ = pytree.leaf_paths(params)
  found = [
    (p[:-1], tuple(np.shape(leaf)))
    for p, leaf in zip(paths, leaves, strict=True)
    if p and p[-1] == "kernel"
  ]
  if not found:
    raise ValueError("infer_layers: no sub-tree with a 'kernel' leaf in params")
  listing = ", ".join("/".join(p) for p, _ in found)

  def ambiguous(why: str) -> ValueError:
    return ValueError(
      f"infer_layers cannot decide the layer order ({why}); found layers: "
      f"{listing}. Pass `layers=[...]` explicitly, in forward order."
    )

  groups: dict[tuple[Any, ...], list[tuple[int, pytree.Path, tuple[int, ...]]]] = {}
  for path, shape in found:
    match = _NUMBERED.match(path[-1])
    if match is None:
      raise ambiguous(f"{path[-1]!r} carries no number")
    groups.setdefault((path[:-1], match.group(1)), []).append((int(match.group(2)), path, shape))
  kind = lambda shape: "conv" if len(shape) > 2 else "dense"
  by_kind: dict[str, list[list[tuple[int, pytree.Path, tuple[int, ...]]]]] = {}
  for (parent, stem), unordered in groups.items():
    members = sorted(unordered)
    if len({n for n, *_ in members}) != len(members):
      raise ambiguous("two layers carry the same number")
    kinds = [kind(shape) for _, _, shape in members]
    if kinds != sorted(kinds, key=lambda k: k != "conv"):
      raise ambiguous(
        f"group {'/'.join((*parent, stem))}* numbers a dense layer before a convolution"
      )
    by_kind.setdefault("mixed" if len(set(kinds)) > 1 else kinds[0], []).append(members)
  if any(len(g) > 1 for g in by_kind.values()) or ("mixed" in by_kind and len(by_kind) > 1):
    raise ambiguous("several groups of layers of the same kind; cannot tell which comes first")
  ordered = [member for key in ("mixed", "conv", "dense") for member in by_kind.get(key, [[]])[0]]
  try:
    structure.chain_structure(tuple((path, shape, False, False) for _, path, shape in ordered))
  except structure.UnsupportedLayerError as err:
    raise structure.UnsupportedLayerError(f"infer_layers: unsupported layer kind: {err}") from None
  except ValueError as err:
    raise ambiguous(f"shapes do not chain: {err}") from None
  return [tuple(int(k) if k.isdigit() else k for k in path) for _, path, _ in ordered]
