"""The layers a params tree holds, read from its names and shapes, for ``infer_blocks``.

A layer is a sub-tree with a ``kernel`` (rank 2: dense; rank 3 to 5: a convolution, or a
stack of dense layers where a layout reads it so), or a norm: a sub-tree with a ``scale``
and no kernel (Flax ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``). Nothing here
depends on pytree order: JAX sorts dict keys, and Linen's jit'd init returns sorted dicts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gsgd_jax._src import pytree
from gsgd_jax._src.pytree import PROBE, Path

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
# One letter after a separator (``conv_a``, ``bn-b``); ``proj`` or ``wi`` is no letter index.
_LETTERED = re.compile(r"^(.+[_\-.])([A-Za-z])$")
_LISTED = 40  # layers named in a message before it says how many more there are

# What a norm's name says it is, by the words in its last key (``BatchNorm_0``, ``bn_init``,
# ``gn1``, ``pre_mlp_layer_norm``, ``RMSNorm_0``): the kinds whose statistics run over the
# batch (one channel at a time) and those that mix a sample's channels.
BATCH, GROUP, LAYER, RMS = "BatchNorm", "GroupNorm", "LayerNorm", "RMSNorm"
_NORM_WORDS = {
  BATCH: ({"batchnorm", "bn", "batch"}, ()),
  GROUP: ({"groupnorm", "gn", "group"}, ()),
  LAYER: ({"layernorm", "ln"}, ({"layer", "norm"},)),
  RMS: ({"rmsnorm", "rms"}, ()),
}
# A norm with no batch statistics where they were looked for: a GroupNorm, LayerNorm or
# another norm that mixes channels.
NO_STATISTICS = "a norm without batch statistics"


def _words(name: str) -> set[str]:
  """The lower-case words of a name: split at separators, digits and camel case."""
  return {w.lower() for w in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+", name)}


def named_norm_kind(path: Path) -> str | None:
  """The kind of norm a path's last named key says, or None when it says none or several
  (``norm_proj``, ``norms/0``)."""
  names = [key for key in path if not key.isdigit()]
  if not names:
    return None
  words = _words(names[-1])
  kinds = [
    kind
    for kind, (single, together) in _NORM_WORDS.items()
    if words & single or any(group <= words for group in together)
  ]
  return kinds[0] if len(kinds) == 1 else None


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer found in the tree: a ``kernel`` sub-tree, or a norm's ``scale`` (no kernel).

  A stacked layer (Flax ``nn.scan`` / ``nnx.vmap``) holds ``stack`` copies on axis
  ``axis`` of its leaves; its kind and widths are those of one copy. A kernel or a norm is
  read as a stack only where a layout asks (``as_stack``, ``norm_as_stack``).
  """

  path: Path
  shape: tuple[int, ...]  # the kernel's shape, or the norm's scale's
  norm: bool
  stack: int | None = None
  axis: int | None = None  # where the copies of a stack are
  beside: tuple[tuple[int, ...], ...] = ()  # the shapes of its bias and scale probe, if any
  norm_kind: str | None = None  # BATCH, GROUP, LAYER, RMS, NO_STATISTICS, or None: unknown

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def copy_shape(self) -> tuple[int, ...]:
    if self.stack is None or self.axis is None:
      return self.shape
    return self.shape[: self.axis] + self.shape[self.axis + 1 :]

  @property
  def kind(self) -> str:
    if self.norm:
      # A scale of rank 2 read as no stack yet, or of rank 3 or more (broadcast, as
      # (1, 1, 1, C)), is no per-channel norm of one copy.
      kind = "norm" if len(self.copy_shape) == 1 else "norm of another shape"
    else:
      kind = "dense" if len(self.copy_shape) == 2 else "conv"
    return kind if self.stack is None else f"stacked {kind}"

  def stack_proven(self) -> bool:
    """A bias or probe that carries the same stack as the kernel: ``(S, n_out)`` for a
    stack on axis 0, ``(n_out, S)`` on axis 1."""
    if self.stack is None or self.axis is None:
      return False
    proof = (self.stack, self.n_out) if self.axis == 0 else (self.n_out, self.stack)
    return proof in self.beside

  @property
  def n_in(self) -> int:
    return self.copy_shape[0] if self.norm else self.copy_shape[-2]

  @property
  def n_out(self) -> int:
    return self.copy_shape[-1]

  def describe(self) -> str:
    kind = self.kind if self.norm_kind is None else f"{self.kind}, {self.norm_kind}"
    return f"{self.name} ({kind} {self.shape})"


def as_stack(layer: Layer, axis: int) -> Layer | None:
  """A rank-3 kernel read as stacked dense layers (Flax ``nn.scan`` / ``nnx.vmap``, copies
  on ``axis``); None for other layers and for a kernel whose bias ``(n_out,)`` makes it a
  1-D convolution."""
  if layer.norm or len(layer.shape) != 3 or (layer.shape[-1],) in layer.beside:
    return None
  return dataclasses.replace(layer, stack=layer.shape[axis], axis=axis)


def norm_as_stack(norm: Layer, axis: int | None, length: int | None) -> Layer | None:
  """A norm read as ``length`` stacked copies on ``axis`` (its scale of rank 2), or as one
  norm (``length`` None: its scale of rank 1); None when its shape does not allow that."""
  if length is None or axis is None:
    return norm if len(norm.shape) == 1 else None
  if len(norm.shape) != 2 or norm.shape[axis] != length:
    return None
  return dataclasses.replace(norm, stack=length, axis=axis)


def index(name: str) -> tuple[str, str, int] | None:
  """``(stem, 'number' or 'letter', index)`` of a name ordered by its end, else None."""
  match = _NUMBERED.match(name)
  if match is not None:
    return match.group(1), "number", int(match.group(2))
  match = _LETTERED.match(name)
  if match is not None:
    return match.group(1), "letter", ord(match.group(2).lower()) - ord("a")
  return None


def number(name: str) -> int | None:
  """The number ending a name, if any."""
  match = _NUMBERED.match(name)
  return None if match is None else int(match.group(2))


def natural(path: Sequence[str]) -> tuple[tuple[tuple[int, int | str], ...], ...]:
  """Sort key of a path that orders ``block2`` before ``block10`` (numbers compare as
  numbers)."""
  return tuple(
    tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key))
    for key in path
  )


def _shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
  paths, leaves, _ = pytree.leaf_paths(tree)
  return {p: tuple(int(d) for d in np.shape(leaf)) for p, leaf in zip(paths, leaves, strict=True)}


def collect(params: Any, batch_stats: Any = None) -> list[Layer]:
  """Every layer of the tree, in natural path order (for stable messages only).

  A norm's kind comes from its batch statistics where the tree holds them (an NNX state
  with its ``mean`` and ``var`` beside ``scale``) or ``batch_stats`` is given (Linen's
  collection: a norm absent from it has none), else from its name.
  """
  shapes = _shapes(params)
  statistics = None if batch_stats is None else _shapes(batch_stats)
  layers = []
  for path, shape in shapes.items():
    if not path:
      continue
    parent = path[:-1]
    if path[-1] == "kernel":
      beside = tuple(shapes[(*parent, x)] for x in ("bias", PROBE) if (*parent, x) in shapes)
      layers.append(Layer(parent, shape, norm=False, beside=beside))
    # A kernel beside a 'scale' makes the sub-tree a layer with an extra leaf, not a norm.
    elif path[-1] == "scale" and shape and (*parent, "kernel") not in shapes:
      if (*parent, "mean") in shapes and (*parent, "var") in shapes:
        kind: str | None = BATCH
      elif statistics is not None:
        kind = BATCH if (*parent, "mean") in statistics else NO_STATISTICS
      else:
        kind = named_norm_kind(parent)
      layers.append(Layer(parent, shape, norm=True, norm_kind=kind))
  return sorted(layers, key=lambda layer: natural(layer.path))


def listing(layers: Iterable[Layer]) -> str:
  described = [layer.describe() for layer in layers]
  if len(described) > _LISTED:
    described = [*described[:_LISTED], f"... ({len(described) - _LISTED} more)"]
  return ", ".join(described) or "none"


def names(layers: Iterable[Layer]) -> str:
  return ", ".join(repr(layer.name) for layer in layers)


class Refusal(ValueError):
  """Why a layout does not fit; ``infer_blocks`` adds the layers found and the way out."""


def ordered(layers: Sequence[Layer], what: str) -> list[Layer]:
  """``layers``, of one kind, as one group ordered by the number or letter ending their
  last key (one layer needs no index)."""
  if len(layers) <= 1:
    return list(layers)
  groups: dict[tuple[Path, str, str], list[tuple[int, Layer]]] = {}
  for layer in layers:
    found = index(layer.path[-1])
    if found is None:
      raise Refusal(
        f"the {what} {names(layers)} cannot be ordered: {layer.name!r} ends in no number "
        "or single letter"
      )
    stem, style, i = found
    groups.setdefault((layer.path[:-1], stem, style), []).append((i, layer))
  if len(groups) > 1:
    heads = ", ".join(repr("/".join((*parent, stem)) + "*") for parent, stem, _ in groups)
    raise Refusal(f"the {what} {names(layers)} form several groups ({heads}): which comes first?")
  (members,) = groups.values()
  members.sort(key=lambda member: member[0])
  if len({i for i, _ in members}) != len(members):
    raise Refusal(f"two of the {what} {names(layers)} carry the same index")
  return [layer for _, layer in members]
