"""Writing the block declarations of common Flax layouts with normalization layers.

``infer_blocks`` reads a params tree's module names and shapes (never its
pytree order: JAX sorts dict keys, and Linen's jit'd init returns sorted dicts)
and writes the blocks of docs/math.md (normalization layers, "Where the blocks
go") for a plain CNN with BatchNorm, a ResNet with BatchNorm, or the
feed-forward blocks of a pre-LN transformer. A tree that does not fit the layout
raises rather than guessing: such a model is declared by hand with
:class:`gsgd_jax.Block`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optax

from gsgd_jax._src import pytree, structure
from gsgd_jax._src.declaration import Block
from gsgd_jax._src.pytree import PROBE, Path

LAYOUTS = ("plainnet", "resnet", "preln")

_NUMBERED = re.compile(r"^(.*?)(\d+)$")
# One letter after a separator (``conv_a``, ``bn-b``); ``proj`` or ``wi`` is no letter index.
_LETTERED = re.compile(r"^(.+[_\-.])([A-Za-z])$")
# Names of attention projections: a sub-tree holding one is never a feed-forward block, even
# when it happens to hold two dense layers of chaining shapes.
_ATTENTION = frozenset(
  {"query", "key", "value", "q", "k", "v", "qkv", "q_proj", "k_proj", "v_proj", "qkv_proj"}
  | {"in_proj", "c_attn"}
)
# Name parts that tell the first dense layer of a feed-forward block from the second once a
# common prefix and suffix are stripped (``wi``/``wo``, ``fc_in``/``fc_out``,
# ``up_proj``/``down_proj``, GPT-2's ``c_fc``/``c_proj``).
_FIRST_SECOND = frozenset({("i", "o"), ("in", "out"), ("up", "down"), ("fc", "proj")})
# Names that mark a pre-LN block's feed-forward norm among several candidates.
_FF_NORM_WORDS = ("ffn", "mlp", "ff", "final")
_LISTED = 40  # layers named in a message before it says how many more there are


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A layer found in the tree: a ``kernel`` sub-tree, or a norm's ``scale`` (no kernel).

  A stacked layer (Flax ``nn.scan`` / ``nnx.vmap``) holds ``stack`` copies on axis 0 of
  its leaves; its kind and widths are those of one copy. A norm's ``(S, C)`` scale is
  stacked as found; a kernel is read as a stack only where the layout asks (``_as_stack``).
  """

  path: Path
  shape: tuple[int, ...]  # the kernel's shape, or ``(C,)`` for a norm (``(S, ...)`` stacked)
  norm: bool
  stack: int | None = None
  beside: tuple[tuple[int, ...], ...] = ()  # the shapes of its bias and scale probe, if any

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def copy_shape(self) -> tuple[int, ...]:
    return self.shape if self.stack is None else self.shape[1:]

  @property
  def kind(self) -> str:
    if self.norm:
      kind = "norm"
    else:
      kind = "dense" if len(self.copy_shape) == 2 else "conv"
    return kind if self.stack is None else f"stacked {kind}"

  @property
  def stacked_bias(self) -> bool:
    """A bias or probe of shape ``(S, n_out)``: the kernel's first axis is a stack."""
    return len(self.shape) >= 3 and (self.shape[0], self.shape[-1]) in self.beside

  @property
  def n_in(self) -> int:
    return self.copy_shape[0] if self.norm else self.copy_shape[-2]

  @property
  def n_out(self) -> int:
    return self.shape[-1]

  def describe(self) -> str:
    return f"{self.name} ({self.kind} {self.shape})"


def _index(name: str) -> tuple[str, str, int] | None:
  """``(stem, 'number' or 'letter', index)`` of a name ordered by its end, else None."""
  match = _NUMBERED.match(name)
  if match is not None:
    return match.group(1), "number", int(match.group(2))
  match = _LETTERED.match(name)
  if match is not None:
    return match.group(1), "letter", ord(match.group(2).lower()) - ord("a")
  return None


def _natural(path: Sequence[str]) -> tuple[tuple[tuple[int, int | str], ...], ...]:
  """Sort key of a path that orders ``block2`` before ``block10`` (numbers compare as
  numbers)."""
  return tuple(
    tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", key))
    for key in path
  )


def _collect(params: Any) -> list[_Layer]:
  """Every layer of the tree, in natural path order (for stable messages only)."""
  paths, leaves, _ = pytree.leaf_paths(params)
  shapes = {p: tuple(int(d) for d in np.shape(leaf)) for p, leaf in zip(paths, leaves, strict=True)}
  layers = []
  for path, shape in shapes.items():
    if not path:
      continue
    if path[-1] == "kernel":
      beside = tuple(shapes[(*path[:-1], x)] for x in ("bias", PROBE) if (*path[:-1], x) in shapes)
      layers.append(_Layer(path[:-1], shape, norm=False, beside=beside))
    # A norm's scale is per channel, (C,), or (S, C) for a stack of S norms; a kernel beside
    # a 'scale' makes the sub-tree a layer with an extra leaf, not a norm.
    elif path[-1] == "scale" and len(shape) in (1, 2) and (*path[:-1], "kernel") not in shapes:
      layers.append(
        _Layer(path[:-1], shape, norm=True, stack=shape[0] if len(shape) == 2 else None)
      )
  return sorted(layers, key=lambda layer: _natural(layer.path))


def _listing(layers: Iterable[_Layer]) -> str:
  described = [layer.describe() for layer in layers]
  if len(described) > _LISTED:
    described = [*described[:_LISTED], f"... ({len(described) - _LISTED} more)"]
  return ", ".join(described) or "none"


def _names(layers: Iterable[_Layer]) -> str:
  return ", ".join(repr(layer.name) for layer in layers)


class _Refusal(ValueError):
  """Why a layout does not fit; ``infer_blocks`` adds the layers found and the way out."""


def _ordered(layers: Sequence[_Layer], what: str) -> list[_Layer]:
  """``layers``, of one kind, as one group ordered by the number or letter ending their
  last key (one layer needs no index)."""
  if len(layers) <= 1:
    return list(layers)
  groups: dict[tuple[Path, str, str], list[tuple[int, _Layer]]] = {}
  for layer in layers:
    index = _index(layer.path[-1])
    if index is None:
      raise _Refusal(
        f"the {what} {_names(layers)} cannot be ordered: {layer.name!r} ends in no number "
        "or single letter"
      )
    stem, style, i = index
    groups.setdefault((layer.path[:-1], stem, style), []).append((i, layer))
  if len(groups) > 1:
    heads = ", ".join(repr("/".join((*parent, stem)) + "*") for parent, stem, _ in groups)
    raise _Refusal(f"the {what} {_names(layers)} form several groups ({heads}): which comes first?")
  (members,) = groups.values()
  members.sort(key=lambda member: member[0])
  if len({i for i, _ in members}) != len(members):
    raise _Refusal(f"two of the {what} {_names(layers)} carry the same index")
  return [layer for _, layer in members]


def _check_chain(convs: Sequence[_Layer], norms: Sequence[_Layer]) -> None:
  """Conv ``i`` feeds norm ``i`` (its width) and conv ``i + 1`` (its input channels)."""
  for conv, norm in zip(convs, norms, strict=False):
    if norm.n_in != conv.n_out:
      raise _Refusal(
        f"norm {norm.name!r} has width {norm.n_in} but pairs with {conv.name!r}, which has "
        f"{conv.n_out} outputs (kernel {conv.shape})"
      )
  for before, after in itertools.pairwise(convs):
    if after.n_in != before.n_out:
      raise _Refusal(
        f"{after.name!r} takes {after.n_in} input channels (kernel {after.shape}) but "
        f"{before.name!r} before it has {before.n_out} outputs (kernel {before.shape}): "
        "shapes do not chain in the order of the names"
      )


def _norm_chain(convs: Sequence[_Layer], norms: Sequence[_Layer], what: str) -> list[Block]:
  """``[conv_0]`` and ``[norm_i, conv_{i+1}]``, all normalized, of one ``conv -> norm ->
  ReLU`` chain; the last norm starts no block here."""
  if len(convs) != len(norms):
    raise _Refusal(
      f"{what}: {len(convs)} convolutions ({_names(convs)}) but {len(norms)} norms "
      f"({_names(norms) or 'none'}); each convolution must feed one norm"
    )
  _check_chain(convs, norms)
  return [
    Block([convs[0].path], normalized=True),
    *(
      Block([norm.path, conv.path], normalized=True)
      for norm, conv in zip(norms, convs[1:], strict=False)
    ),
  ]


def _plainnet(layers: Sequence[_Layer]) -> list[Block]:
  convs = _ordered([x for x in layers if x.kind == "conv"], "convolutions")
  norms = _ordered([x for x in layers if x.kind == "norm"], "norms")
  dense = _ordered([x for x in layers if x.kind == "dense"], "dense layers")
  if not convs:
    raise _Refusal("a plainnet has convolutions (kernels of rank 3 to 5); found none")
  if not dense:
    raise _Refusal("a plainnet ends in a dense head (a kernel of rank 2); found none")
  blocks = _norm_chain(convs, norms, "plainnet")
  head = [norms[-1].path, *(x.path for x in dense)]
  return [*blocks, Block(head)]


def _largest_group(layers: Sequence[_Layer], where: str, what: str) -> list[_Layer]:
  """The largest group (two or more) of ``layers`` numbered or lettered alike, ordered."""
  groups: dict[tuple[str, str], list[_Layer]] = {}
  for layer in layers:
    index = _index(layer.path[-1])
    if index is not None:
      groups.setdefault(index[:2], []).append(layer)
  sizes = sorted((len(g) for g in groups.values()), reverse=True)
  if not sizes or sizes[0] < 2:
    raise _Refusal(
      f"residual block {where!r}: no two {what} of the main branch numbered or lettered "
      f"alike among {_names(layers)}"
    )
  if len(sizes) > 1 and sizes[1] == sizes[0]:
    raise _Refusal(
      f"residual block {where!r}: two groups of {sizes[0]} {what} among {_names(layers)}; "
      "which is the main branch?"
    )
  (largest,) = (g for g in groups.values() if len(g) == sizes[0])
  return _ordered(largest, f"{what} of {where!r}")


def _residual(where: Path, members: Sequence[_Layer]) -> list[Block]:
  """The blocks of one residual block: its main branch chained like a plainnet (the last
  norm left out) and its projection shortcut, if any, alone."""
  name = "/".join(where)
  direct = [x for x in members if x.path[:-1] == where]
  main = _largest_group([x for x in direct if x.kind == "conv"], name, "convolutions")
  main_norms = _largest_group([x for x in direct if x.kind == "norm"], name, "norms")
  blocks = _norm_chain(main, main_norms, f"residual block {name!r}, main branch")
  others = [x for x in members if x not in main and x not in main_norms and x.kind != "dense"]
  projections = [x for x in others if x.kind == "conv"]
  projection_norms = [x for x in others if x.kind == "norm"]
  if len(projections) > 1 or len(projection_norms) != len(projections):
    raise _Refusal(
      f"residual block {name!r}: main branch {_names(main)} with norms {_names(main_norms)}; "
      f"the other convolutions ({_names(projections) or 'none'}) and norms "
      f"({_names(projection_norms) or 'none'}) are not one projection shortcut and its norm"
    )
  if projections:
    (projection,), (norm,) = projections, projection_norms
    if projection.n_out != main[-1].n_out or projection.n_in != main[0].n_in:
      raise _Refusal(
        f"residual block {name!r}: projection {projection.name!r} (kernel {projection.shape}) "
        f"does not map the block's input ({main[0].n_in} channels, {main[0].name!r}) to its "
        f"output ({main[-1].n_out} channels, {main[-1].name!r})"
      )
    _check_chain([projection], [norm])
    blocks.append(Block([projection.path], normalized=True))
  return blocks


def _resnet(layers: Sequence[_Layer]) -> list[Block]:
  convs_norms = [x for x in layers if x.kind in ("conv", "norm")]
  children: dict[Path, list[_Layer]] = {}
  for layer in convs_norms:
    children.setdefault(layer.path[:-1], []).append(layer)
  residual = [
    parent
    for parent, direct in children.items()
    if parent
    and sum(x.kind == "conv" for x in direct) >= 2
    and sum(x.kind == "norm" for x in direct) >= 2
  ]
  if not residual:
    raise _Refusal(
      "a resnet has residual blocks (sub-trees holding two or more convolutions and two or "
      "more norms); found none"
    )

  def owner(layer: _Layer) -> Path | None:
    # The innermost residual block holding the layer: a shortcut nested in a sub-tree of its
    # block (``downsample/...``) still belongs to the block.
    holding = [p for p in residual if layer.path[: len(p)] == p and len(layer.path) > len(p)]
    return max(holding, key=len) if holding else None

  stem = [x for x in convs_norms if owner(x) is None]
  blocks: list[Block] = []
  if stem:
    convs = _ordered([x for x in stem if x.kind == "conv"], "stem convolutions")
    norms = _ordered([x for x in stem if x.kind == "norm"], "stem norms")
    if not convs:
      raise _Refusal(f"the stem's norms {_names(norms)} follow no convolution")
    blocks += _norm_chain(convs, norms, "stem")
  for where in sorted(residual, key=_natural):
    blocks += _residual(where, [x for x in convs_norms if owner(x) == where])
  return blocks


def _ff_order(a: _Layer, b: _Layer) -> tuple[_Layer, _Layer] | None:
  """The two dense layers of a feed-forward block in forward order by their names, or
  None when the names do not tell."""
  split = lambda name: re.split(r"(\d+)", name)
  parts_a, parts_b = split(a.path[-1]), split(b.path[-1])
  # Names alike but for their numbers (fc1/fc2, Dense_0/Dense_1, fc1_0/fc2_0): lower first.
  if len(parts_a) == len(parts_b) and parts_a[::2] == parts_b[::2]:
    numbers_a = [int(n) for n in parts_a[1::2]]
    numbers_b = [int(n) for n in parts_b[1::2]]
    if numbers_a != numbers_b:
      return (a, b) if numbers_a < numbers_b else (b, a)
  name_a, name_b = a.path[-1], b.path[-1]
  prefix = _common_prefix(name_a, name_b)
  suffix = _common_prefix(name_a[prefix:][::-1], name_b[prefix:][::-1])
  rest_a = name_a[prefix : len(name_a) - suffix].strip("_-").lower()
  rest_b = name_b[prefix : len(name_b) - suffix].strip("_-").lower()
  if (rest_a, rest_b) in _FIRST_SECOND:
    return a, b
  if (rest_b, rest_a) in _FIRST_SECOND:
    return b, a
  return None


def _common_prefix(a: str, b: str) -> int:
  """The length of the longest common prefix of ``a`` and ``b``."""
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


@dataclasses.dataclass(frozen=True)
class _FeedForward:
  """Two dense layers forming ``d -> h -> d``: a sub-tree's only kernels (``number`` None)
  or, in a flat scope, the pair sharing the ``number`` that ends their names; both stacked
  alike, or neither."""

  scope: Path
  number: int | None
  pair: tuple[_Layer, _Layer]

  @property
  def name(self) -> str:
    suffix = "" if self.number is None else f" (number {self.number})"
    return "/".join(self.scope) + suffix

  @property
  def stack(self) -> int | None:
    return self.pair[0].stack


def _as_stack(layer: _Layer) -> _Layer:
  """A rank-3 kernel read as ``S`` stacked dense layers (Flax ``nn.scan`` / ``nnx.vmap``,
  copies on axis 0), unless a bias of shape ``(n_out,)`` makes it a 1-D convolution; other
  layers as they are."""
  if layer.norm or len(layer.shape) != 3 or (layer.shape[-1],) in layer.beside:
    return layer
  return dataclasses.replace(layer, stack=layer.shape[0])


def _pairs(scope: Path, members: Sequence[_Layer], stacked: bool) -> list[_FeedForward]:
  """The feed-forward pairs among a scope's kernels, of unstacked or of stacked layers."""
  dense = [x for x in members if len(x.copy_shape) == 2 and (x.stack is not None) == stacked]
  if len(dense) < 2:
    return []
  if len(members) == 2 and len(dense) == 2:
    candidates = [(None, dense)]
  else:
    # A flat scope holding several blocks' layers (fc1_0, fc2_0, fc1_1, ...): the pairs
    # that share the number ending their names.
    by_number: dict[int, list[_Layer]] = {}
    for layer in dense:
      match = _NUMBERED.match(layer.path[-1])
      if match is not None:
        by_number.setdefault(int(match.group(2)), []).append(layer)
    candidates = [(n, pair) for n, pair in by_number.items() if len(pair) == 2]
  return [
    _FeedForward(scope, number, (a, b))
    for number, (a, b) in candidates
    if a.n_out == b.n_in and b.n_out == a.n_in and a.stack == b.stack
  ]


def _feed_forwards(layers: Sequence[_Layer]) -> list[_FeedForward]:
  kernels: dict[Path, list[_Layer]] = {}
  for layer in layers:
    if not layer.norm:
      kernels.setdefault(layer.path[:-1], []).append(layer)
  found = []
  for scope, members in kernels.items():
    attention = any(x.path[-1].lower() in _ATTENTION for x in members) or bool(
      scope and re.search("attn|attention", scope[-1], re.IGNORECASE)
    )
    if attention:
      continue
    # Where the kernels make no pair of rank 2, a scanned transformer's make one of rank 3:
    # in a feed-forward block the names say dense, so a rank 3 kernel is a stack of them.
    # (_preln still asks for a stacked bias or norm beside them: a 1-D convolution's
    # kernel has that shape too.)
    found += _pairs(scope, members, stacked=False) or _pairs(
      scope, [_as_stack(x) for x in members], stacked=True
    )
  return sorted(found, key=lambda ff: (_natural(ff.scope), ff.number or 0))


def _norms_in(norms: Sequence[_Layer], scope: Path, number: int | None) -> list[_Layer]:
  here = [x for x in norms if x.path[:-1] == scope]
  if number is None:
    return here
  return [x for x in here if (m := _NUMBERED.match(x.path[-1])) and int(m.group(2)) == number]


def _front_norms(ff: _FeedForward, norms: Sequence[_Layer]) -> list[_Layer]:
  """The candidate norms in front of a feed-forward block: those of width ``d`` or ``h`` in
  its own scope, else in the nearest ancestor holding norms."""
  widths = {ff.pair[0].n_in, ff.pair[0].n_out}
  # A stacked block's norm is stacked alike: S copies, one per copy of the block.
  norms = [x for x in norms if x.stack == ff.stack]
  here = [x for x in _norms_in(norms, ff.scope, ff.number) if x.n_in in widths]
  if here:
    return here
  for depth in range(len(ff.scope) - 1, -1, -1):
    # A flat scope's own norms carry other blocks' numbers: the search goes up from there.
    ancestor = [x for x in norms if x.path[:-1] == ff.scope[:depth]]
    if ancestor:
      return [x for x in ancestor if x.n_in in widths]
  return []


def _pick_norm(ff: _FeedForward, candidates: Sequence[_Layer]) -> _Layer:
  """One norm of several: the one named for the feed-forward, else the highest-numbered one
  of a numbered group (pre-LN: the attention's norm comes first)."""
  if len(candidates) == 1:
    return candidates[0]
  named = [x for x in candidates if any(w in x.path[-1].lower() for w in _FF_NORM_WORDS)]
  if len(named) == 1:
    return named[0]
  pool = named or list(candidates)
  indices = [_index(x.path[-1]) for x in pool]
  groups = {(x.path[:-1], *i[:2]) for x, i in zip(pool, indices, strict=True) if i is not None}
  if len(groups) == 1 and None not in indices:
    numbered = [(i[2], x) for x, i in zip(pool, indices, strict=True) if i is not None]
    if len({n for n, _ in numbered}) == len(numbered):
      return max(numbered, key=lambda member: member[0])[1]
  raise _Refusal(
    f"feed-forward block {ff.name!r} ({_names(ff.pair)}): several norms may stand in front of "
    f"it, {_names(candidates)}, and neither a name (containing "
    f"{', '.join(map(repr, _FF_NORM_WORDS))}) nor a numbered group decides which"
  )


def _ff_block(ff: _FeedForward, candidates: Sequence[_Layer], owners: dict[Path, str]) -> Block:
  """The block of one feed-forward pair: its layers in forward order, after the norm in front
  of it (recorded in ``owners``) if any."""
  a, b = ff.pair
  order = _ff_order(a, b)
  if order is None:
    # The names do not tell; the norm in front has width d, the first layer's input (when
    # d == h, every norm fits either order).
    orders = {(a, b) if x.n_in == a.n_in else (b, a) for x in candidates}
    if len(orders) != 1 or a.n_in == a.n_out:
      raise _Refusal(
        f"feed-forward block {ff.name!r}: neither the names {_names(ff.pair)} nor the "
        f"widths of the norms before it ({_names(candidates) or 'none'}) tell which dense "
        "layer comes first"
      )
    (order,) = orders
  first, second = order
  fitting = [x for x in candidates if x.n_in == first.n_in]
  if candidates and not fitting:
    raise _Refusal(
      f"feed-forward block {ff.name!r}: the names put {first.name!r} first, but the norms "
      f"before it ({_names(candidates)}) have the width of its outputs, not of its inputs: "
      "do the names follow the forward order? (Linen numbers modules in the order they "
      "are built, not called)"
    )
  chain = [first.path, second.path]
  if fitting:
    norm = _pick_norm(ff, fitting)
    if norm.path in owners:
      raise _Refusal(
        f"norm {norm.name!r} would stand in front of two feed-forward blocks, "
        f"{owners[norm.path]!r} and {ff.name!r}"
      )
    owners[norm.path] = ff.name
    chain.insert(0, norm.path)
  return Block(chain, stack_axis=None if ff.stack is None else 0)


def _preln(layers: Sequence[_Layer]) -> list[Block]:
  norms = [x for x in layers if x.norm]
  blocks: list[Block] = []
  owners: dict[Path, str] = {}
  unproven: list[_FeedForward] = []
  for ff in _feed_forwards(layers):
    candidates = _front_norms(ff, norms)
    if ff.stack is not None and not candidates and not any(x.stacked_bias for x in ff.pair):
      # Rank-3 kernels with neither a stacked bias nor a stacked norm beside them may be
      # 1-D convolutions: left out, as every rank-3 kernel was before stacks were read.
      unproven.append(ff)
      continue
    blocks.append(_ff_block(ff, candidates, owners))
  if not blocks:
    hint = ""
    if unproven:
      hint = (
        f"; the rank-3 kernels {_names(x for ff in unproven for x in ff.pair)} may be "
        "stacked dense layers (nn.scan / nnx.vmap, copies on axis 0) or 1-D convolutions, "
        "and with no bias (S, n_out) and no stacked norm (S, d) in front of them their "
        "shapes do not tell: for a stack, declare gsgd_jax.Block([norm, first, second], "
        "stack_axis=0)"
      )
    raise _Refusal(
      "a pre-LN transformer has feed-forward blocks (a sub-tree holding exactly two dense "
      "kernels of rank 2 forming d -> h -> d, or, scanned, of rank 3 forming (S, d, h) -> "
      f"(S, h, d)); found none{hint}"
    )
  return blocks


_WRITERS = {"plainnet": _plainnet, "resnet": _resnet, "preln": _preln}


def infer_blocks(params: optax.Params, layout: str) -> list[Block]:
  """Writes the block declaration of a common Flax layout with normalization layers.

  Reads the module names and shapes of ``params``, never its pytree order, and
  declares the blocks of docs/math.md (normalization layers, "Where the blocks
  go"). A layer is a sub-tree with a ``kernel`` (rank 2: dense; rank 3 to 5:
  convolution) or a norm: a sub-tree with a ``scale`` of rank 1 and no kernel
  (Flax ``BatchNorm``, ``LayerNorm``, ``RMSNorm``; of rank 2, ``(S, C)``, for a
  stack of ``S`` norms, which ``'preln'`` reads). Layers of a kind are
  ordered by the number or single letter ending their last key (``Conv_0``,
  ``conv1``, ``conv_a``, NNX lists ``convs/0``); Linen numbers modules in the
  order they are built, so build each before calling the next. Layouts:

  * ``'plainnet'``: ``conv -> norm -> ReLU`` repeated, then a dense head (one
    layer, or one numbered group): ``Block([conv_0], normalized=True)``,
    ``Block([norm_i, conv_{i+1}], normalized=True)`` and ``Block([norm_last,
    *head])``, in forward order.
  * ``'resnet'``: a stem (the convolutions and norms outside residual blocks:
    ``stem``/``stem_bn``, ``conv_init``/``bn_init``), residual blocks (sub-trees
    holding two or more convolutions and two or more norms; the main branch is
    the largest numbered or lettered group of each, basic or bottleneck; one
    other convolution is the projection shortcut, with its norm) and a dense
    head. The stem and each main branch chain like a plainnet, all normalized,
    but their last norm starts no block; the projection is a normalized block
    of its own; the head, the last norms and the projection's norm are left to
    the fallback. Order: the stem, then the residual blocks in the numeric
    order of their paths (``block2`` before ``block10``), each main branch
    before its projection.
  * ``'preln'``: pre-LN transformer feed-forward blocks ``LN -> fc1 -> ReLU ->
    fc2``: every sub-tree whose only kernels are two dense ones forming ``d ->
    h -> d`` (or, in a flat sub-tree, the pairs whose names end in the same
    number: ``fc1_0``/``fc2_0``), ordered by their names (``fc1`` before
    ``fc2``, ``wi`` before ``wo``) or else by the norm's width, with the norm of
    width ``d`` in front: in the same sub-tree (a flat sub-tree's norm carries
    the pair's number), else in the nearest ancestor holding norms. Of several,
    the one whose name contains ``ffn``, ``mlp``, ``ff`` or ``final``, else the
    highest-numbered (the attention's norm comes first, as lm1b's
    ``LayerNorm_0`` before ``LayerNorm_1``). ``Block([ln, fc1, fc2])`` per
    feed-forward block (``Block([fc1, fc2])`` when no norm is found), in the
    numeric order of their paths. Attention projections (``query``, ``key``,
    ``value``, ``q_proj``, ..., rank-3 ``DenseGeneral`` kernels) and sub-trees
    named for attention are never feed-forward blocks. A scanned transformer
    (Linen ``nn.scan`` with ``variable_axes={'params': 0}``, NNX ``nnx.vmap``)
    holds ``S`` copies of each layer on axis 0 of its leaves: where a sub-tree's
    kernels make no pair of rank 2, two of rank 3 forming ``(S, d, h)``, ``(S,
    h, d)`` are a stacked pair when biases ``(S, h)``, ``(S, d)`` or a stacked
    norm ``(S, d)`` in front say so (T5's ``wi``/``wo`` have no biases), and
    give ``Block([ln, fc1, fc2], stack_axis=0)``, one per feed-forward location,
    with the stacked norm of the same ``S`` in front. A rank-3 pair with neither,
    or with a bias ``(h,)`` (1-D convolutions), is no feed-forward block.

  Every declaration written is checked against ``params`` as the
  transformations check it at init. Run :func:`gsgd_jax.verify_invariance` on
  it once too: names cannot show a residual addition or an activation that is
  not ReLU.

  Args:
    params: the model's parameters, ``variables['params']`` (dict,
      ``FrozenDict`` or ``nnx.State``; shapes are enough, as
      ``jax.eval_shape(model.init, ...)`` gives).
    layout: ``'plainnet'``, ``'resnet'`` or ``'preln'``.

  Returns:
    A list of :class:`gsgd_jax.Block`, to pass as ``layers=``; like every
    ``Block``, they hold their paths as strings (an NNX list index ``0`` as
    ``'0'``), which name the same layers.

  Raises:
    ValueError: for an unknown layout; and, naming the layers found, when the
      tree does not fit the layout: names that do not order the layers,
      convolutions and norms that do not pair, shapes that do not chain, several
      candidate norms in front of a feed-forward block, or a declaration the
      params refuse. Then declare ``layers`` explicitly with
      :class:`gsgd_jax.Block`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for c in (4, 8):
    ...       x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(c, (3, 3))(x)))
    ...     return nn.Dense(2)(x.mean(axis=(1, 2)))
    >>> variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> for block in gsgd_jax.infer_blocks(variables['params'], 'plainnet'):
    ...   print(block)
    Block(['Conv_0'], normalized=True)
    Block(['BatchNorm_0', 'Conv_1'], normalized=True)
    Block(['BatchNorm_1', 'Dense_0'])

    A pre-LN feed-forward block, its norm found by name among two:

    >>> class FeedForward(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = x + nn.LayerNorm(name='attn_norm')(x)  # the attention, left out here
    ...     y = nn.relu(nn.Dense(16, name='fc1')(nn.LayerNorm(name='ffn_norm')(x)))
    ...     return x + nn.Dense(4, name='fc2')(y)
    >>> params = jax.eval_shape(FeedForward().init, jax.random.key(0), jnp.ones((1, 3, 4)))
    >>> gsgd_jax.infer_blocks(params['params'], 'preln')
    [Block(['ffn_norm', 'fc1', 'fc2'])]

    Three copies of it scanned, their parameters stacked on axis 0: one
    stacked block.

    >>> class Layer(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return FeedForward()(x), None
    >>> Stack = nn.scan(Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), jnp.ones((1, 3, 4)), None)
    >>> gsgd_jax.infer_blocks(params['params'], 'preln')
    [Block(['FeedForward_0/ffn_norm', 'FeedForward_0/fc1', 'FeedForward_0/fc2'], stack_axis=0)]
  """
  if not isinstance(layout, str) or layout not in _WRITERS:
    raise ValueError(
      f"infer_blocks: unknown layout {layout!r}; accepted layouts: "
      f"{', '.join(map(repr, LAYOUTS))}. Declare other models' `layers` explicitly with "
      "gsgd_jax.Block"
    )
  layers = _collect(params)
  advice = (
    f"Layers found (kernels and norms): {_listing(layers)}. Declare `layers` explicitly with "
    "gsgd_jax.Block([...], normalized=...) (docs/math.md, normalization layers)."
  )
  try:
    blocks = _WRITERS[layout](layers)
  except _Refusal as err:
    raise ValueError(f"infer_blocks({layout!r}) cannot write the blocks: {err}. {advice}") from None
  try:
    structure.build_structure(params, blocks)
  except ValueError as err:
    raise ValueError(
      f"infer_blocks({layout!r}) wrote blocks that the params refuse, {blocks}: {err} {advice}"
    ) from None
  return blocks
