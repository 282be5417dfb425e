"""The block declarations of today's decoder layers (docs/math.md, gated feed-forward blocks
and attention): per layer, the up and down projections of a gated feed-forward block and
the value and output projections of its attention, read from their names.

Names of the LLaMA family (Hugging Face ``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,
down}_proj``; Meta's ``attention/{wq,wk,wv,wo}``, ``feed_forward/{w1,w2,w3}``), of T5 v1.1,
t5x and MaxText (``attention/{query,key,value,out}``, ``mlp/{wi_0,wi_1,wo}``) and of Flax's
``MultiHeadDotProductAttention`` (``query``, ``key``, ``value``, ``out``). Kernels are
dense ``(d, n)`` or multi-axis (``DenseGeneral``: values ``(d, heads, head_dim)``, outputs
``(heads, head_dim, d)``), unstacked or scanned on axis 0 or 1. The gate is never in a
block, nor the norm in front of a block (it feeds the gate, or the queries and keys, too).
Whatever the names or shapes leave in doubt is refused, named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gsgd_jax._src.declaration import Block, Layer
from gsgd_jax._src.found_layers import Layer as Found
from gsgd_jax._src.found_layers import Refusal, names, natural
from gsgd_jax._src.pytree import Path

# The role of a kernel, by its name (lower case).
_GATE = frozenset({"gate_proj", "wi_0", "w1", "gate"})
_UP = frozenset({"up_proj", "wi_1", "w3", "up"})
_DOWN = frozenset({"down_proj", "wo", "w2", "down"})
_QUERY = frozenset({"q_proj", "query", "wq", "q"})
_KEY = frozenset({"k_proj", "key", "wk", "k"})
_VALUE = frozenset({"v_proj", "value", "wv", "v"})
_OUT = frozenset({"o_proj", "out", "wo", "o", "out_proj"})
_FUSED = frozenset({"qkv_proj", "qkv", "c_attn", "in_proj", "wqkv", "query_key_value"})
_FUSED_FFN = frozenset({"gate_up_proj", "w13", "wi"})
# The readings of a kernel: unstacked, or stacked on axis 0 or 1.
_AXES = (None, 0, 1)
# How the queries and keys of an attention are declared (infer_blocks' query_key).
QUERY_KEYS = ("plain", "half", "interleaved")


def _name(layer: Found) -> str:
  return layer.path[-1].lower()


def _copy(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...] | None:
  """One copy's shape of a kernel read as stacked on ``axis`` (None: unstacked)."""
  if axis is None:
    return shape
  if len(shape) < 3:
    return None
  return shape[:axis] + shape[axis + 1 :]


def _length(layers: Sequence[Found], axis: int | None) -> int | None:
  """The common stack length of ``layers`` read on ``axis``, or -1 where they differ."""
  if axis is None:
    return None
  lengths = {x.shape[axis] for x in layers}
  return lengths.pop() if len(lengths) == 1 else -1


@dataclasses.dataclass(frozen=True)
class _Reading:
  """A scope's chain as read: its stack axis and each layer's input axes (None: dense)."""

  axis: int | None
  input_axes: tuple[int | None, ...]
  # Grouped-query attention: the value's heads, shared by the output's query heads, and the
  # size of a head where the output keeps every head on one axis.
  kv_heads: int | None = None
  head_dim: int | None = None


def _ffn_readings(gate: Found, up: Found, down: Found) -> list[_Reading]:
  """The readings of a gated block's kernels as ``(d, h)``, ``(d, h)``, ``(h, d)`` per copy."""
  found = []
  for axis in _AXES:
    if _length((gate, up, down), axis) == -1:
      continue
    g, u, w = (_copy(x.shape, axis) for x in (gate, up, down))
    if g is None or u is None or w is None or len(u) != 2:
      continue
    if g == u and w == u[::-1]:
      found.append(_Reading(axis, (None, None)))
  return found


def _attention_readings(
  value: Found, out: Found, head_dim: int | None
) -> tuple[list[_Reading], str | None]:
  """The readings of a value and an output kernel that chain ``d -> nodes -> d``: dense
  ``(d, n)`` and ``(n, d)``, or multi-axis ``(d, *nodes)`` and ``(*nodes, d)``; or, with
  grouped-query attention, whose output takes a multiple of the value's heads, ``(d, kv *
  head_dim)`` and ``(heads * head_dim, d)`` (given ``head_dim``), or ``(d, kv, head_dim)``
  and ``(heads, head_dim, d)``. With why a grouped reading needs what is missing."""
  found, why = [], None
  for axis in _AXES:
    if _length((value, out), axis) == -1:
      continue
    v, o = _copy(value.shape, axis), _copy(out.shape, axis)
    if v is None or o is None or len(v) < 2 or len(v) != len(o) or v[0] != o[-1]:
      continue
    axes = (None if len(v) == 2 else 1, None if len(o) == 2 else len(o) - 1)
    if o[:-1] == v[1:]:
      found.append(_Reading(axis, axes))
    elif len(v) == 2 and o[0] > v[1] and o[0] % v[1] == 0:
      if head_dim is None or v[1] % head_dim:
        why = (
          f"the output kernel {names([out])} takes {o[0] // v[1]} times the value "
          f"dimensions of {names([value])} (one copy {o} and {v}): grouped-query attention, "
          "whose value heads each feed several query heads. Pass head_dim, the size of one "
          "head, to group them"
          + ("" if head_dim is None else f" (head_dim={head_dim} does not divide {v[1]})")
        )
        continue
      found.append(_Reading(axis, (None, 1), v[1] // head_dim, head_dim))
    elif len(v) == 3 and v[2] == o[1] and o[0] > v[1] and o[0] % v[1] == 0:
      found.append(_Reading(axis, axes, v[1]))
  return found, why


def _pick(
  readings: list[_Reading],
  scope: Path,
  members: Sequence[Found],
  axis_hint,
  why: str | None = None,
) -> _Reading:
  where = "/".join(scope)
  if len(readings) > 1 and axis_hint is not None:
    readings = [r for r in readings if r.axis == axis_hint.axis] or readings
  if not readings and why is not None:
    raise Refusal(f"in {where!r}, {why}")
  if not readings:
    raise Refusal(
      f"the kernels {names(members)} in {where!r} do not chain d -> nodes -> d (shapes "
      f"{', '.join(str(x.shape) for x in members)}) unstacked or stacked on axis 0 or 1, "
      "nor as grouped-query attention (an output taking a multiple of the value's heads)"
    )
  if len(readings) > 1:
    raise Refusal(
      f"the kernels {names(members)} in {where!r} read several ways (unstacked, or stacked "
      f"on axis 0 or 1: {[r.axis for r in readings]}); their shapes do not tell"
    )
  return readings[0]


def _block(layers: Sequence[Found], reading: _Reading) -> Block:
  entries: list[str | Layer] = [
    "/".join(x.path) if axes is None else Layer(x.path, input_axes=axes)
    for x, axes in zip(layers, reading.input_axes, strict=True)
  ]
  if reading.kv_heads is not None:  # the output's query heads, grouped
    out = layers[-1]
    entries[-1] = Layer(
      out.path,
      input_axes=reading.input_axes[-1] or 1,
      head_dim=reading.head_dim,
      kv_heads=reading.kv_heads,
    )
  return Block(entries, stack_axis=reading.axis)


def _roles(scope: Path, members: Sequence[Found]) -> dict[str, Found]:
  """The kernels of a scope by role (query ... down), refusing what cannot be read. A scope
  may hold an attention, a gated block or both (a layer whose kernels are not grouped)."""
  where = "/".join(scope) or "the top level"
  fused = [x for x in members if _name(x) in _FUSED]
  if fused:
    raise Refusal(
      f"{names(fused)} in {where!r} is a fused query-key-value kernel: its value columns "
      "cannot be declared apart from the queries and keys. Split it into three kernels, or "
      "leave the attention to the fallback"
    )
  table = {"query": _QUERY, "key": _KEY, "value": _VALUE, "out": _OUT}
  table |= {"gate": _GATE, "up": _UP, "down": _DOWN}
  candidates = {role: [x for x in members if _name(x) in words] for role, words in table.items()}
  # A scope is an attention where it holds a value, a gated block where it holds a gate or an
  # up projection; other names ('out' of a head, T5 1.0's wi/wo) then play no role in it.
  attention = bool(candidates["value"])
  feed_forward = bool(candidates["gate"] or candidates["up"])
  for role in table:
    if not (attention if role in ("query", "key", "value", "out") else feed_forward):
      candidates[role] = []
  # A name of two roles ('wo': Meta's attention output, T5's down projection) takes the one
  # the scope's other names leave open.
  for x in members:
    roles = [role for role, hits in candidates.items() if x in hits]
    if len(roles) < 2:
      continue
    keep = [role for role in roles if not [y for y in candidates[role] if y is not x]]
    if len(keep) != 1:
      raise Refusal(
        f"{names([x])} in {where!r} may be the {' or the '.join(roles)} projection: the names "
        "beside it do not tell"
      )
    for role in roles:
      if role != keep[0]:
        candidates[role].remove(x)
  found: dict[str, Found] = {}
  for role, hits in candidates.items():
    if len(hits) > 1:
      raise Refusal(f"{names(hits)} in {where!r} all read as the {role} projection")
    if hits:
      found[role] = hits[0]
  left = [x for x in members if x not in found.values()]
  if found and left:
    raise Refusal(
      f"{names(left)} in {where!r} stand beside {names(found.values())} and have no role "
      "in a gated feed-forward block or an attention"
    )
  return found


def _query_key(
  roles: dict[str, Found], scope: Path, reading: _Reading, query_key: str, head_dim: int | None
) -> Block:
  """``Block([Layer(query), Layer(key, transposed=True)])``, stacked as the attention's value
  chain, with RoPE's pairs where ``query_key`` names them."""
  where = "/".join(scope)
  if "query" not in roles or "key" not in roles:
    raise Refusal(f"the attention in {where!r} has no query or no key projection to declare")
  query, key = roles["query"], roles["key"]
  q_copy, k_copy = _copy(query.shape, reading.axis) or (), _copy(key.shape, reading.axis) or ()
  kv_heads = None
  if q_copy != k_copy:  # grouped-query attention: fewer key heads than query heads
    kv_heads = _key_heads(q_copy, k_copy, head_dim)
    if kv_heads is None:
      raise Refusal(
        f"the query and key kernels {names([query, key])} in {where!r} have shapes "
        f"{q_copy} and {k_copy} (one copy) that are not grouped-query attention's (d, "
        "heads, head_dim) and (d, kv_heads, head_dim), or (d, heads * head_dim) and (d, "
        "kv_heads * head_dim) with head_dim given, query heads a multiple of key heads"
      )
  if any(key.beside):
    raise Refusal(
      f"the key {names([key])} in {where!r} has a bias (or scale probe), which cannot join the "
      "query-key chain (a key's bias changes no attention weight): build the keys without "
      "one, or leave query_key=None"
    )
  pairs = None if query_key == "plain" else query_key
  one_axis = len(q_copy) == 2  # (d, heads * head_dim)
  if pairs is not None and one_axis and head_dim is None:
    raise Refusal(
      f"the query kernel {names([query])} in {where!r} keeps every head on one axis "
      f"{q_copy}: pass head_dim, the size of one head, for RoPE's pairs"
    )
  if one_axis and head_dim is not None and q_copy[-1] % head_dim:
    raise Refusal(
      f"head_dim={head_dim} does not divide the query kernel {names([query])} in {where!r} "
      f"(one copy {q_copy}): it is the size of one of its heads"
    )
  if not one_axis and head_dim is not None and head_dim != q_copy[-1]:
    raise Refusal(
      f"head_dim={head_dim} does not apply to the query kernel {names([query])} in {where!r} "
      f"(one copy {q_copy}, query_key={query_key!r}), whose heads are {q_copy[-1]} wide"
    )
  # head_dim where one axis holds every head: for the pairs of both, and the query's groups.
  head = head_dim if one_axis else None
  entries = [
    Layer(
      query.path,
      input_axes=1,
      pairs=pairs,
      head_dim=head if pairs is not None or kv_heads is not None else None,
      kv_heads=kv_heads,
    ),
    Layer(
      key.path,
      input_axes=1,
      transposed=True,
      pairs=pairs,
      head_dim=head if pairs is not None else None,
    ),
  ]
  return Block(entries, stack_axis=reading.axis)


def _key_heads(query: tuple[int, ...], key: tuple[int, ...], head_dim: int | None) -> int | None:
  """The key heads of grouped-query attention's query and key kernels (one copy each), or
  None where their shapes are not such a pair."""
  if len(query) == 3 and len(key) == 3 and query[0::2] == key[0::2]:
    heads, kv = query[1], key[1]
  elif len(query) == 2 and len(key) == 2 and query[0] == key[0] and head_dim is not None:
    if query[1] % head_dim or key[1] % head_dim:
      return None
    heads, kv = query[1] // head_dim, key[1] // head_dim
  else:
    return None
  return kv if heads > kv and heads % kv == 0 else None


def gated(
  layers: Sequence[Found], query_key: str | None = None, head_dim: int | None = None
) -> list[Block]:
  """Per decoder layer, ``Block([up, down])`` of its gated feed-forward block and
  ``Block([value, out])`` of its attention (multi-axis kernels as :class:`Layer`), and with
  ``query_key``, ``Block([query, key^T])``."""
  scopes: dict[Path, list[Found]] = {}
  for layer in layers:
    if not layer.norm:
      scopes.setdefault(layer.path[:-1], []).append(layer)
  norms = [layer for layer in layers if layer.norm]
  ffn: dict[Path, tuple[list[Found], _Reading]] = {}
  attention: dict[Path, tuple[list[Found], tuple[list[_Reading], str | None], dict]] = {}
  for scope, members in scopes.items():
    if len(members) < 2:  # an embedding's read-out, a head: the fallback's
      continue
    roles = _roles(scope, members)
    where = "/".join(scope) or "the top level"
    if "value" in roles or "out" in roles:
      if "value" not in roles or "out" not in roles:
        raise Refusal(f"the attention in {where!r} has no value or no output projection")
      chain = [roles["value"], roles["out"]]
      attention[scope] = (chain, _attention_readings(chain[0], chain[1], head_dim), roles)
    if {"gate", "up", "down"} & set(roles):
      missing = [r for r in ("gate", "up", "down") if r not in roles]
      fused = [x for x in members if _name(x) in _FUSED_FFN]
      if missing:
        raise Refusal(
          f"the feed-forward block in {where!r} ({names(members)}) has no {' or '.join(missing)} "
          "projection: a ReLU block (the 'preln' layout reads those) or a fused gate and up "
          f"kernel{' ' + names(fused) if fused else ''}, whose halves cannot be declared apart"
        )
      chain = [roles["up"], roles["down"]]
      ffn[scope] = (chain, _pick(_ffn_readings(roles["gate"], *chain), scope, members, None))
  blocks = [(scope, _block(chain, reading)) for scope, (chain, reading) in ffn.items()]
  for scope, (chain, readings, roles) in attention.items():
    # A layer's feed-forward block tells the stack where the attention's shapes do not.
    siblings = [r for s, (_, r) in ffn.items() if s == scope or s[:-1] == scope[:-1]]
    hint = siblings[0] if len(siblings) == 1 else None
    reading = _pick(readings[0], scope, chain, hint, readings[1])
    if query_key is not None:
      # A norm of the queries or keys (q_norm, k_norm: Gemma 3, MaxText) rescales per head,
      # not per dimension: the chain would not hold.
      inside = [x for x in norms if x.path[: len(scope)] == scope]
      if inside:
        raise Refusal(
          f"the attention in {'/'.join(scope)!r} holds norms {names(inside)}: a norm of the "
          "queries or keys breaks the query-key chain; leave query_key=None"
        )
      blocks.append((scope, _query_key(roles, scope, reading, query_key, head_dim)))
    blocks.append((scope, _block(chain, reading)))
  if not blocks:
    raise Refusal(
      "no gated feed-forward block (gate, up and down projections) and no attention (value "
      "and output projections) found by name"
    )
  return [block for _, block in sorted(blocks, key=lambda item: natural(item[0]))]
