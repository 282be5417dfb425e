"""The block declarations of pre-LN transformer feed-forward blocks ``norm -> fc1 -> ReLU
-> fc2`` (docs/math.md, "Where the blocks go"), unstacked or scanned (Flax ``nn.scan`` and
``nnx.vmap`` stack on axis 0; t5x and MaxText scan with ``param_scan_axis=1``).

A sub-tree's dense kernels are read as feed-forward pairs only where nothing is left in
doubt: a gated block (a gate, an up and a down projection), a kernel beside a pair with
one of its shapes, or rank-3 kernels that may be 1-D convolutions are refused, named.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from gsgd_jax._src.declaration import Block
from gsgd_jax._src.found_layers import (
  Layer,
  Refusal,
  as_stack,
  index,
  names,
  natural,
  norm_as_stack,
  number,
)
from gsgd_jax._src.pytree import Path

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
# The readings of a sub-tree's kernels: unstacked, or stacked on axis 0 or 1.
_READINGS = (None, 0, 1)


def _ff_order(a: Layer, b: Layer) -> tuple[Layer, Layer] | None:
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
  pair: tuple[Layer, Layer]

  @property
  def name(self) -> str:
    suffix = "" if self.number is None else f" (number {self.number})"
    return "/".join(self.scope) + suffix

  @property
  def stack(self) -> int | None:
    return self.pair[0].stack

  @property
  def axis(self) -> int | None:
    return self.pair[0].axis


def _stack_note(axis: int | None) -> str:
  return "" if axis is None else f", stack_axis={axis}"


def _chains(a: Layer, b: Layer) -> bool:
  return a.n_out == b.n_in and b.n_out == a.n_in


def _gated(group: Sequence[Layer]) -> bool:
  """Three kernels, two ``d -> h`` (a gate and an up projection) and one ``h -> d``."""
  if len(group) != 3:
    return False
  shapes = [x.copy_shape for x in group]
  return any(
    shapes.count(shape) == 2 and shapes.count(shape[::-1]) == 1 and shape != shape[::-1]
    for shape in shapes
  )


def _gated_refusal(scope: Path, group: Sequence[Layer], axis: int | None) -> Refusal:
  return Refusal(
    f"the sub-tree {'/'.join(scope)!r} holds a gated feed-forward block, {names(group)} "
    "(two kernels d -> h, a gate and an up projection, and one h -> d, the down projection: "
    "SwiGLU, GeGLU). Its up and down projections form a chain (the gate's activation "
    "multiplies each hidden unit by a factor that does not depend on them), but names do not "
    "always say which of the two is the gate, and a norm in front cannot join the chain (it "
    "feeds the gate too). Declare it by hand, the gate left to the fallback: "
    f"gsgd_jax.Block([up, down]{_stack_note(axis)}), and check it with "
    "gsgd_jax.verify_invariance"
  )


def _scope_pairs(
  scope: Path, members: Sequence[Layer], axis: int | None
) -> tuple[list[_FeedForward], list[str]]:
  """The feed-forward pairs among a scope's kernels as read (unstacked, or stacked on
  ``axis``), and why its other dense kernels form none."""
  dense = [x for x in members if len(x.copy_shape) == 2]
  if len(dense) < 2:
    return [], []
  if len(dense) == len(members) == 3 and _gated(dense):
    raise _gated_refusal(scope, dense, axis)
  if len(dense) == len(members) == 2:
    groups: dict[int | None, list[Layer]] = {None: dense}
  else:
    # A flat scope holding several blocks' layers (fc1_0, fc2_0, fc1_1, ...): the pairs
    # that share the number ending their names.
    groups = {}
    for layer in dense:
      n = number(layer.path[-1])
      if n is not None:
        groups.setdefault(n, []).append(layer)
  pairs = []
  for n, group in groups.items():
    if len(group) == 2 and _chains(*group):
      pairs.append(_FeedForward(scope, n, (group[0], group[1])))
    elif _gated(group):
      raise _gated_refusal(scope, group, axis)
  where = "/".join(scope) or "the top level"
  notes = []
  if not pairs:
    notes.append(
      f"the dense kernels {names(dense)} in {where!r} form no pair d -> h -> d (two alone in "
      "their sub-tree, or two sharing the number ending their names in a flat one)"
    )
  claimed = [x for ff in pairs for x in ff.pair]
  shapes = {x.copy_shape for x in claimed} | {x.copy_shape[::-1] for x in claimed}
  left_out = [x for x in dense if x not in claimed and x.copy_shape in shapes]
  if left_out:
    raise Refusal(
      f"the kernels {names(left_out)} stand beside the feed-forward pairs "
      f"{', '.join(names(ff.pair) for ff in pairs)} in {where!r} with their shapes, but belong "
      "to none: a gate and an up projection (a gated block), or a third layer? Declare the "
      "blocks by hand with gsgd_jax.Block"
    )
  return pairs, notes


def _is_attention(scope: Path, members: Sequence[Layer]) -> bool:
  return any(x.path[-1].lower() in _ATTENTION for x in members) or bool(
    scope and re.search("attn|attention", scope[-1], re.IGNORECASE)
  )


def _feed_forwards(layers: Sequence[Layer]) -> tuple[list[_FeedForward], list[str]]:
  """Every feed-forward pair of the tree, and notes on the sub-trees that hold none."""
  kernels: dict[Path, list[Layer]] = {}
  for layer in layers:
    if not layer.norm:
      kernels.setdefault(layer.path[:-1], []).append(layer)
  found, notes = [], []
  for scope, members in kernels.items():
    if _is_attention(scope, members):
      continue
    # Where the kernels make no pair of rank 2, a scanned transformer's make one of rank 3
    # on axis 0 (nn.scan, nnx.vmap) or 1 (t5x, MaxText): in a feed-forward block the names
    # say dense, so a rank-3 kernel is a stack of them. (_preln still asks for a stacked
    # bias or norm beside them: a 1-D convolution's kernel has that shape too.)
    readings = {}
    for axis in _READINGS:
      if axis is None:
        read = list(members)
      else:
        read = [y for x in members if (y := as_stack(x, axis)) is not None]
      pairs, scope_notes = _scope_pairs(scope, read, axis)
      if pairs:
        readings[axis] = pairs
        if axis is None:
          break
      elif axis is None:
        notes += scope_notes
    if len(readings) > 1:
      raise Refusal(
        f"the rank-3 kernels {names(members)} in {'/'.join(scope)!r} chain as stacked dense "
        "layers with their copies on axis 0 and on axis 1: declare the block by hand, "
        "gsgd_jax.Block([...], stack_axis=0 or 1)"
      )
    for pairs in readings.values():
      found += pairs
  return sorted(found, key=lambda ff: (natural(ff.scope), ff.number or 0)), notes


def _norms_in(norms: Sequence[Layer], scope: Path, n: int | None) -> list[Layer]:
  here = [x for x in norms if x.path[:-1] == scope]
  return here if n is None else [x for x in here if number(x.path[-1]) == n]


def _front_norms(ff: _FeedForward, norms: Sequence[Layer]) -> list[Layer]:
  """The candidate norms in front of a feed-forward block: those of width ``d`` or ``h`` in
  its own scope, else in the nearest ancestor holding norms; a stacked block's norm is
  stacked alike (``S`` copies on the same axis), read so."""
  widths = {ff.pair[0].n_in, ff.pair[0].n_out}
  read = [y for x in norms if (y := norm_as_stack(x, ff.axis, ff.stack)) is not None]
  here = [x for x in _norms_in(read, ff.scope, ff.number) if x.n_in in widths]
  if here:
    return here
  for depth in range(len(ff.scope) - 1, -1, -1):
    # A flat scope's own norms carry other blocks' numbers: the search goes up from there.
    ancestor = [x for x in read if x.path[:-1] == ff.scope[:depth]]
    if ancestor:
      return [x for x in ancestor if x.n_in in widths]
  return []


def _pick_norm(ff: _FeedForward, candidates: Sequence[Layer]) -> Layer:
  """One norm of several: the one named for the feed-forward, else the highest-numbered one
  of a numbered group (pre-LN: the attention's norm comes first)."""
  if len(candidates) == 1:
    return candidates[0]
  named = [x for x in candidates if any(w in x.path[-1].lower() for w in _FF_NORM_WORDS)]
  if len(named) == 1:
    return named[0]
  pool = named or list(candidates)
  indices = [index(x.path[-1]) for x in pool]
  groups = {(x.path[:-1], *i[:2]) for x, i in zip(pool, indices, strict=True) if i is not None}
  if len(groups) == 1 and None not in indices:
    numbered = [(i[2], x) for x, i in zip(pool, indices, strict=True) if i is not None]
    if len({n for n, _ in numbered}) == len(numbered):
      return max(numbered, key=lambda member: member[0])[1]
  raise Refusal(
    f"feed-forward block {ff.name!r} ({names(ff.pair)}): several norms may stand in front of "
    f"it, {names(candidates)}, and neither a name (containing "
    f"{', '.join(map(repr, _FF_NORM_WORDS))}) nor a numbered group decides which"
  )


def _ff_block(ff: _FeedForward, candidates: Sequence[Layer], owners: dict[Path, str]) -> Block:
  """The block of one feed-forward pair: its layers in forward order, after the norm in front
  of it (recorded in ``owners``) if any."""
  a, b = ff.pair
  order = _ff_order(a, b)
  if order is None:
    # The names do not tell; the norm in front has width d, the first layer's input (when
    # d == h, every norm fits either order).
    orders = {(a, b) if x.n_in == a.n_in else (b, a) for x in candidates}
    if len(orders) != 1 or a.n_in == a.n_out:
      raise Refusal(
        f"feed-forward block {ff.name!r}: neither the names {names(ff.pair)} nor the "
        f"widths of the norms before it ({names(candidates) or 'none'}) tell which dense "
        "layer comes first"
      )
    (order,) = orders
  first, second = order
  fitting = [x for x in candidates if x.n_in == first.n_in]
  if candidates and not fitting:
    raise Refusal(
      f"feed-forward block {ff.name!r}: the names put {first.name!r} first, but the norms "
      f"before it ({names(candidates)}) have the width of its outputs, not of its inputs: "
      "do the names follow the forward order? (Linen numbers modules in the order they "
      "are built, not called)"
    )
  chain = [first.path, second.path]
  if fitting:
    norm = _pick_norm(ff, fitting)
    if norm.path in owners:
      raise Refusal(
        f"norm {norm.name!r} would stand in front of two feed-forward blocks, "
        f"{owners[norm.path]!r} and {ff.name!r}"
      )
    owners[norm.path] = ff.name
    chain.insert(0, norm.path)
  return Block(chain, stack_axis=ff.axis)


def preln(layers: Sequence[Layer]) -> list[Block]:
  norms = [x for x in layers if x.norm]
  blocks: list[Block] = []
  owners: dict[Path, str] = {}
  unproven: list[_FeedForward] = []
  found, notes = _feed_forwards(layers)
  for ff in found:
    candidates = _front_norms(ff, norms)
    if ff.stack is not None and not candidates and not any(x.stack_proven() for x in ff.pair):
      # Rank-3 kernels with neither a stacked bias nor a stacked norm beside them may be
      # 1-D convolutions: left out, as every rank-3 kernel was before stacks were read.
      unproven.append(ff)
      continue
    blocks.append(_ff_block(ff, candidates, owners))
  if not blocks:
    hints = [f"; {note}" for note in notes]
    if unproven:
      axes = sorted({ff.axis for ff in unproven if ff.axis is not None})
      hints.append(
        f"; the rank-3 kernels {names(x for ff in unproven for x in ff.pair)} may be "
        f"stacked dense layers (copies on axis {' or '.join(map(str, axes))}: nn.scan / "
        "nnx.vmap stack on axis 0, t5x and MaxText on axis 1) or 1-D convolutions, and with "
        "no stacked bias and no stacked norm in front of them their shapes do not tell: for "
        "a stack, declare gsgd_jax.Block([norm, first, second], stack_axis="
        f"{' or '.join(map(str, axes))})"
      )
    raise Refusal(
      "a pre-LN transformer has feed-forward blocks (a sub-tree holding exactly two dense "
      "kernels of rank 2 forming d -> h -> d, or, scanned, of rank 3 forming (S, d, h) -> "
      f"(S, h, d) or (d, S, h) -> (h, S, d)); found none{''.join(hints)}"
    )
  return blocks
