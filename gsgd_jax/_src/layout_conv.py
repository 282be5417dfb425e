"""The block declarations of convolutional layouts with BatchNorm: plain CNNs, ResNets
(post-activation, the original) and pre-activation ResNets (docs/math.md, "Where the
blocks go").

A block declared ``normalized=True`` ends at a convolution whose outputs feed a
BatchNorm: its statistics run over the batch one channel at a time, so it absorbs each
output channel's scale. GroupNorm, LayerNorm and RMSNorm mix a sample's channels and
absorb no single channel's scale; a tree with them, or with norms whose kind neither
their batch statistics nor their names tell, is refused rather than guessed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from gsgd_jax._src.declaration import Block
from gsgd_jax._src.found_layers import (
  BATCH,
  NO_STATISTICS,
  Layer,
  Refusal,
  index,
  names,
  natural,
  ordered,
)
from gsgd_jax._src.pytree import Path

# What may be declared where the norms are not BatchNorms, for the refusal's message.
_NOT_BATCH = (
  "such norms mix the channels of a sample (or a group), so a convolution before one has no "
  "per-channel output symmetry and cannot end a block declared normalized=True. What can "
  "be declared there, by hand: a norm's affine layer (scale, bias of shape (C,)) starting a "
  "block of plain layers after it, Block([norm, conv, ...]) with only ReLU or pooling "
  "between them (the block not normalized where its outputs feed such a norm); with "
  "weight-standardized convolutions (BiT's StdConv, which standardizes its own kernel per "
  "output channel), each convolution alone, Block([conv], normalized=True), and no block "
  "through one (standardization mixes its input rows). Check the declaration with "
  "gsgd_jax.verify_invariance"
)
_NAMES_MAY_MISLEAD = (
  "(Their kinds were read from their names; where a name misleads, batch statistics decide: "
  "pass batch_stats=variables['batch_stats'] for Linen, or the whole nnx.state(model) for "
  "NNX.)"
)
_UNKNOWN = (
  "the names of the norms {norms} do not say whether they are BatchNorms (statistics over "
  "the batch, one channel at a time: each absorbs its channel's scale) or GroupNorms, "
  "LayerNorms or RMSNorms (which mix channels and absorb no single channel's scale). "
  "Pass the model's batch statistics: infer_blocks(variables['params'], layout, "
  "batch_stats=variables['batch_stats']) for Linen, or the whole nnx.state(model) (its "
  "BatchNorms hold mean and var) for NNX"
)


def check_batch_norms(norms: Sequence[Layer]) -> None:
  """Refuses, naming them, norms that are not BatchNorms or whose kind is unknown."""
  other = [x for x in norms if x.norm_kind is not None and x.norm_kind != BATCH]
  if other:
    kinds = sorted({x.norm_kind for x in other if x.norm_kind is not None})
    # Only statistics say NO_STATISTICS; every other kind was read from a name.
    named = "" if kinds == [NO_STATISTICS] else f" {_NAMES_MAY_MISLEAD}"
    raise Refusal(
      f"the norms {names(other)} are not BatchNorms ({', '.join(kinds)}): {_NOT_BATCH}{named}"
    )
  unknown = [x for x in norms if x.norm_kind is None]
  if unknown:
    raise Refusal(_UNKNOWN.format(norms=names(unknown)))


def _check_chain(convs: Sequence[Layer], norms: Sequence[Layer]) -> None:
  """Conv ``i`` feeds norm ``i`` (its width) and conv ``i + 1`` (its input channels)."""
  for conv, norm in zip(convs, norms, strict=False):
    if norm.n_in != conv.n_out:
      raise Refusal(
        f"norm {norm.name!r} has width {norm.n_in} but pairs with {conv.name!r}, which has "
        f"{conv.n_out} outputs (kernel {conv.shape})"
      )
  _check_convs(convs)


def _check_convs(convs: Sequence[Layer]) -> None:
  for before, after in itertools.pairwise(convs):
    if after.n_in != before.n_out:
      raise Refusal(
        f"{after.name!r} takes {after.n_in} input channels (kernel {after.shape}) but "
        f"{before.name!r} before it has {before.n_out} outputs (kernel {before.shape}): "
        "shapes do not chain in the order of the names"
      )


def _norm_chain(convs: Sequence[Layer], norms: Sequence[Layer], what: str) -> list[Block]:
  """``[conv_0]`` and ``[norm_i, conv_{i+1}]``, all normalized, of one ``conv -> norm ->
  ReLU`` chain; the last norm starts no block here."""
  if len(convs) != len(norms):
    raise Refusal(
      f"{what}: {len(convs)} convolutions ({names(convs)}) but {len(norms)} norms "
      f"({names(norms) or 'none'}); each convolution must feed one norm"
    )
  _check_chain(convs, norms)
  return [
    Block([convs[0].path], normalized=True),
    *(
      Block([norm.path, conv.path], normalized=True)
      for norm, conv in zip(norms, convs[1:], strict=False)
    ),
  ]


def _head(layers: Sequence[Layer]) -> list[Layer]:
  return ordered([x for x in layers if x.kind == "dense"], "dense layers")


def plainnet(layers: Sequence[Layer]) -> list[Block]:
  convs = ordered([x for x in layers if x.kind == "conv"], "convolutions")
  norms = ordered([x for x in layers if x.norm], "norms")
  dense = _head(layers)
  if not convs:
    raise Refusal("a plainnet has convolutions (kernels of rank 3 to 5); found none")
  if not dense:
    raise Refusal("a plainnet ends in a dense head (a kernel of rank 2); found none")
  blocks = _norm_chain(convs, norms, "plainnet")
  check_batch_norms(norms)
  head = [norms[-1].path, *(x.path for x in dense)]
  return [*blocks, Block(head)]


def _largest_group(layers: Sequence[Layer], where: str, what: str) -> list[Layer]:
  """The largest group (two or more) of ``layers`` numbered or lettered alike, ordered."""
  groups: dict[tuple[str, str], list[Layer]] = {}
  for layer in layers:
    found = index(layer.path[-1])
    if found is not None:
      groups.setdefault(found[:2], []).append(layer)
  sizes = sorted((len(g) for g in groups.values()), reverse=True)
  if not sizes or sizes[0] < 2:
    raise Refusal(
      f"residual block {where!r}: no two {what} of the main branch numbered or lettered "
      f"alike among {names(layers)}"
    )
  if len(sizes) > 1 and sizes[1] == sizes[0]:
    raise Refusal(
      f"residual block {where!r}: two groups of {sizes[0]} {what} among {names(layers)}; "
      "which is the main branch?"
    )
  (largest,) = (g for g in groups.values() if len(g) == sizes[0])
  return ordered(largest, f"{what} of {where!r}")


class _Residual:
  """One residual block: its main branch (the largest numbered group of convolutions and
  of norms directly in its sub-tree, in order) and every other convolution and norm in it
  (a projection shortcut and its norm)."""

  def __init__(self, where: Path, members: Sequence[Layer]):
    self.name = "/".join(where)
    direct = [x for x in members if x.path[:-1] == where]
    self.convs = _largest_group([x for x in direct if x.kind == "conv"], self.name, "convolutions")
    self.norms = _largest_group([x for x in direct if x.norm], self.name, "norms")
    others = [x for x in members if x not in self.convs and x not in self.norms]
    self.projections = [x for x in others if x.kind == "conv"]
    self.projection_norms = [x for x in others if x.norm]

  def preactivated(self) -> bool:
    """The widths pair norm ``i`` with the inputs of convolution ``i`` and not with its
    outputs, in some layer where the two differ: a pre-activation block."""
    pairs = list(zip(self.convs, self.norms, strict=False))
    return (
      len(self.convs) == len(self.norms)
      and all(norm.n_in == conv.n_in for conv, norm in pairs)
      and any(norm.n_in != conv.n_out for conv, norm in pairs)
    )

  def check_projection(self, projection: Layer) -> None:
    first, last = self.convs[0], self.convs[-1]
    if projection.n_out != last.n_out or projection.n_in != first.n_in:
      raise Refusal(
        f"residual block {self.name!r}: projection {projection.name!r} (kernel "
        f"{projection.shape}) does not map the block's input ({first.n_in} channels, "
        f"{first.name!r}) to its output ({last.n_out} channels, {last.name!r})"
      )


def _residual_blocks(layers: Sequence[Layer]) -> tuple[list[Layer], list[_Residual]]:
  """The layers outside residual blocks (the stem, a final norm) and the residual blocks
  (sub-trees holding two or more convolutions and two or more norms), in the numeric
  order of their paths."""
  convs_norms = [x for x in layers if x.kind == "conv" or x.norm]
  children: dict[Path, list[Layer]] = {}
  for layer in convs_norms:
    children.setdefault(layer.path[:-1], []).append(layer)
  residual = [
    parent
    for parent, direct in children.items()
    if parent and sum(x.kind == "conv" for x in direct) >= 2 and sum(x.norm for x in direct) >= 2
  ]
  if not residual:
    raise Refusal(
      "a resnet has residual blocks (sub-trees holding two or more convolutions and two or "
      "more norms); found none"
    )

  def owner(layer: Layer) -> Path | None:
    # The innermost residual block holding the layer: a shortcut nested in a sub-tree of its
    # block (``downsample/...``) still belongs to the block.
    holding = [p for p in residual if layer.path[: len(p)] == p and len(layer.path) > len(p)]
    return max(holding, key=len) if holding else None

  outside = [x for x in convs_norms if owner(x) is None]
  blocks = [
    _Residual(where, [x for x in convs_norms if owner(x) == where])
    for where in sorted(residual, key=natural)
  ]
  return outside, blocks


def resnet(layers: Sequence[Layer]) -> list[Block]:
  """Post-activation residual blocks (``conv -> BN -> ReLU -> ... -> conv -> BN``, then
  the sum with the shortcut): each main branch and the stem chain like a plainnet, all
  normalized, the last norm starting no block; a projection with its norm is a normalized
  block of its own."""
  outside, residual = _residual_blocks(layers)
  for block in residual:
    if block.preactivated():
      raise Refusal(
        f"residual block {block.name!r}: its norms {names(block.norms)} have the widths of "
        f"the inputs of its convolutions {names(block.convs)}, not of their outputs: a "
        "pre-activation block (norm -> ReLU -> conv). Use the layout 'preact'"
      )
  blocks: list[Block] = []
  if outside:
    convs = ordered([x for x in outside if x.kind == "conv"], "stem convolutions")
    norms = ordered([x for x in outside if x.norm], "stem norms")
    if not convs:
      raise Refusal(f"the stem's norms {names(norms)} follow no convolution")
    blocks += _norm_chain(convs, norms, "stem")
    check_batch_norms(norms)
  for block in residual:
    blocks += _norm_chain(block.convs, block.norms, f"residual block {block.name!r}, main branch")
    check_batch_norms(block.norms)
    if len(block.projections) > 1 or len(block.projection_norms) != len(block.projections):
      raise Refusal(
        f"residual block {block.name!r}: main branch {names(block.convs)} with norms "
        f"{names(block.norms)}; the other convolutions ({names(block.projections) or 'none'}) "
        f"and norms ({names(block.projection_norms) or 'none'}) are not one projection "
        "shortcut and its norm (a projection without a norm: a pre-activation block? Use "
        "the layout 'preact')"
      )
    if block.projections:
      (projection,), (norm,) = block.projections, block.projection_norms
      block.check_projection(projection)
      _check_chain([projection], [norm])
      check_batch_norms([norm])
      blocks.append(Block([projection.path], normalized=True))
  return blocks


def preact(layers: Sequence[Layer]) -> list[Block]:
  """Pre-activation residual blocks (``BN -> ReLU -> conv`` repeated, then the sum with the
  shortcut; He et al.'s v2): ``[BN_i affine, conv_i]`` for every ``i``, normalized but for
  the last (whose outputs join the residual sum), and ``[BN_final affine, *head]`` after
  the last block. A projection shortcut has no norm of its own and may read the first
  norm's output; in such a block the first convolution is declared alone,
  ``[conv_0]`` normalized, which holds either way. The stem's convolutions feed the
  residual stream and take the fallback."""
  outside, residual = _residual_blocks(layers)
  stem_norms = [x for x in outside if x.norm]
  blocks: list[Block] = []
  for block in residual:
    convs, norms = block.convs, block.norms
    where = f"residual block {block.name!r}"
    if len(convs) != len(norms):
      raise Refusal(
        f"{where}: {len(convs)} convolutions ({names(convs)}) but {len(norms)} norms "
        f"({names(norms)}); in a pre-activation block each convolution follows one norm"
      )
    for conv, norm in zip(convs, norms, strict=True):
      if norm.n_in != conv.n_in:
        raise Refusal(
          f"{where}: norm {norm.name!r} has width {norm.n_in} but stands before "
          f"{conv.name!r}, which takes {conv.n_in} input channels (kernel {conv.shape}); "
          "norms that match the convolutions' outputs make a post-activation block: use "
          "the layout 'resnet'"
        )
    _check_convs(convs)
    # Norm i > 0 receives a normalized block's outputs; norm 0 receives the residual
    # stream and only starts a block, which any per-channel affine layer may.
    check_batch_norms(norms[1:])
    if block.projection_norms:
      raise Refusal(
        f"{where}: the norms {names(block.projection_norms)} outside its main branch: a "
        "pre-activation block's projection has no norm of its own (with one, is it a "
        "post-activation block? Use the layout 'resnet')"
      )
    if len(block.projections) > 1:
      raise Refusal(f"{where}: several projections, {names(block.projections)}")
    for projection in block.projections:
      block.check_projection(projection)
    first = [convs[0].path] if block.projections else [norms[0].path, convs[0].path]
    blocks.append(Block(first, normalized=True))
    blocks += [
      Block([norm.path, conv.path], normalized=i < len(convs) - 1)
      for i, (conv, norm) in enumerate(zip(convs, norms, strict=True))
      if i > 0
    ]
  if len(stem_norms) > 1:
    raise Refusal(
      f"norms {names(stem_norms)} stand outside the residual blocks: a pre-activation "
      "ResNet has one, after its last block, before the head"
    )
  dense = _head(layers)
  if stem_norms and dense:
    (final,) = stem_norms
    blocks.append(Block([final.path, *(x.path for x in dense)]))
  return blocks
