"""Property-based tests of the mathematics (docs/math.md) on random ReLU chains and conv/dense
mixes.

Hypothesis draws small networks: dense chains of depth 1-6 with widths 1-9 per
level (equal or unequal hidden widths), and 1-3 SAME convolutions on 4x4 or 5x3
NHWC images followed by a flatten or a global average pool and 1-2 dense layers.
Biases, weight signs (mixed, or a whole layer positive or negative) and the
skeleton (drawn away from zero, or set by ``gsgd_jax.set_skeleton``) vary too.
Each property is one test, run on both kinds of network, with the naive
reference in ``reference.py`` as the independent side:

  a. the inverse chain rule equals autodiff through a reconstruction of the
     weights from basis-path values;
  b. weight allocation lands on ``v + dv`` and leaves the fixed skeleton alone;
  c. G-SGD trains the same function from a randomly rescaled start;
  d. ``random_rescale`` keeps the function and the basis-path values.

Two hypothesis profiles, picked by ``GSGD_HYPOTHESIS_PROFILE``: ``ci`` (the
default: few derandomized examples, within the CI budget) and ``long`` (300
random examples per property, to run by hand)::

  GSGD_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_properties.py -n 0

``GSGD_HYPOTHESIS_MAX_EXAMPLES=N`` overrides the example count of either profile.
A failure prints the drawn ``NetSpec``; ``build(spec)`` rebuilds the network.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import ALLOW_CHAIN_RANGE, ALLOW_ONE_LAYER

import gsgd_jax
from gsgd_jax._src import basis
from gsgd_jax._src.structure import build_structure

settings.register_profile(
  "ci",
  max_examples=10,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
  print_blob=False,
)
settings.register_profile(
  "long",
  max_examples=300,
  deadline=None,
  derandomize=False,
  database=None,
  suppress_health_check=[HealthCheck.too_slow],
  print_blob=True,
)
PROFILE = os.environ.get("GSGD_HYPOTHESIS_PROFILE", "ci")
# Applied per test rather than loaded globally, so other test modules are untouched.
SETTINGS = settings(settings.get_profile(PROFILE))
if os.environ.get("GSGD_HYPOTHESIS_MAX_EXAMPLES"):
  SETTINGS = settings(SETTINGS, max_examples=int(os.environ["GSGD_HYPOTHESIS_MAX_EXAMPLES"]))

WINDOWS = [(1, 1), (2, 2), (3, 3), (3, 1), (1, 2)]
SIGNS = ["mixed", "+", "-"]  # per layer: random signs, or a whole layer of one sign
BATCH = 5


# ----------------------------------------------------------------------------
# Strategies: small printable specs; `build` turns one into arrays.


class NetSpec(NamedTuple):
  image: tuple[int, int] | None  # None: a dense chain on vectors
  in_width: int  # input units, or input channels
  ops: tuple  # ('conv', kh, kw, c_out), ('flatten',), ('gap',), ('dense', n_out)
  bias: tuple[bool, ...]  # per layer
  signs: tuple[str, ...]  # per layer, from SIGNS
  weights: str  # 'bounded': |w| in [0.3, 2]; 'normal': N(0, 1) off the skeleton
  skeleton: float | None  # set_skeleton(value), or None to keep the drawn weights
  seed: int


def _layer_options(draw, depth):
  bias_mode = draw(st.sampled_from(["all", "none", "per-layer"]))
  if bias_mode == "per-layer":
    bias = tuple(draw(st.lists(st.booleans(), min_size=depth, max_size=depth)))
  else:
    bias = (bias_mode == "all",) * depth
  signs = tuple(draw(st.lists(st.sampled_from(SIGNS), min_size=depth, max_size=depth)))
  return {
    "bias": bias,
    "signs": signs,
    "weights": draw(st.sampled_from(["bounded", "normal"])),
    "skeleton": draw(st.sampled_from([None, None, 1.0, -1.0, 0.5])),
    "seed": draw(st.integers(0, 2**20)),
  }


@st.composite
def chain_specs(draw):
  depth = draw(st.integers(1, 6))
  widths = draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1))
  if depth > 1 and draw(st.booleans()):  # the paper's case: equal hidden widths
    widths[1:-1] = [widths[1]] * (depth - 1)
  ops = tuple(("dense", n) for n in widths[1:])
  return NetSpec(image=None, in_width=widths[0], ops=ops, **_layer_options(draw, depth))


@st.composite
def conv_specs(draw):
  image = draw(st.sampled_from([(4, 4), (5, 3)]))
  ops = [
    ("conv", *draw(st.sampled_from(WINDOWS)), draw(st.integers(1, 5)))
    for _ in range(draw(st.integers(1, 3)))
  ]
  ops.append((draw(st.sampled_from(["flatten", "gap"])),))
  ops += [("dense", draw(st.integers(1, 5))) for _ in range(draw(st.integers(1, 2)))]
  depth = sum(op[0] in ("conv", "dense") for op in ops)
  return NetSpec(
    image=image, in_width=draw(st.integers(1, 5)), ops=tuple(ops), **_layer_options(draw, depth)
  )


SPECS = {"chain": chain_specs(), "conv": conv_specs()}


# ----------------------------------------------------------------------------
# Concrete networks.
#
# Every example has new shapes, so compiling is the cost: arrays stay on the
# host, and each property runs as one jitted program per example (compiled
# with the suite's fast-compile flags, see conftest.py).


def _program(fn):
  """``fn`` jitted; it returns host (numpy) arrays."""
  jitted = jax.jit(fn)
  return lambda *args: jax.device_get(jitted(*args))


class Net(NamedTuple):
  """A drawn network; arrays live on the host (numpy), so that nothing but the
  jitted programs below compiles for the example's shapes."""

  params: dict
  layers: tuple  # as passed to the library (key-path tuples or strings)
  names: tuple[str, ...]
  plan: tuple  # static forward program: (op, layer name or None)
  shapes: tuple  # kernel shapes
  taps: tuple[int, ...]
  centres: tuple[int, ...]
  widths: tuple[int, ...]  # nodes per level (units or channels)
  x: np.ndarray
  y: np.ndarray
  seed: int  # also seeds random_rescale

  def views(self, tree):
    """Kernels as (taps, n_in, n_out) views, and biases (None where absent)."""
    views = [
      tree[n]["kernel"].reshape(t, a, b)
      for n, t, a, b in zip(self.names, self.taps, self.widths, self.widths[1:], strict=False)
    ]
    return views, [tree[n].get("bias") for n in self.names]

  def tree(self, views, biases):
    return {
      n: {"kernel": v.reshape(s), **({} if b is None else {"bias": b})}
      for n, v, s, b in zip(self.names, views, self.shapes, biases, strict=True)
    }


def _layout(spec):
  """Per layer ``(name, kernel shape, taps, skeleton tap)`` as docs/math.md states them
  (nodes, edges and levels; the skeleton), and the plan of the forward pass."""
  layout, plan = [], []
  c, flatten = spec.in_width, False
  positions = 1 if spec.image is None else spec.image[0] * spec.image[1]
  for op in spec.ops:
    if op[0] in ("flatten", "gap"):
      plan.append((op[0], None))
      flatten = op[0] == "flatten"
      continue
    if op[0] == "conv":
      _, kh, kw, n_out = op
      entry = (f"Conv_{len(layout)}", (kh, kw, c, n_out), kh * kw, (kh // 2) * kw + kw // 2)
    else:
      n_out, taps = op[1], positions if flatten else 1  # a flatten: one tap per position
      entry = (f"Dense_{len(layout)}", (taps * c, n_out), taps, taps // 2)
      flatten = False
    layout.append(entry)
    plan.append((op[0], entry[0]))
    c = n_out
  return layout, tuple(plan)


def build(spec: NetSpec) -> Net:
  rng = np.random.default_rng(spec.seed)
  layout, plan = _layout(spec)
  names, shapes, taps, centres = (tuple(col) for col in zip(*layout, strict=True))
  widths = (spec.in_width, *tuple(shape[-1] for shape in shapes))
  fixed, out = ref.skeleton_sets(widths, centres)
  params = {}
  for k, (name, shape, t, _) in enumerate(layout):
    view = _draw_view(rng, spec, k, (t, widths[k], widths[k + 1]), fixed[k] | out[k])
    params[name] = {"kernel": view.reshape(shape)}
    if spec.bias[k]:
      params[name]["bias"] = rng.normal(0, 0.5, widths[k + 1])
  # Conv nets name their layers by strings, chains by key-path tuples: both forms work.
  layers = names if spec.image is not None else tuple((n,) for n in names)
  if spec.skeleton is not None:
    params = _program(lambda p: gsgd_jax.set_skeleton(p, layers, spec.skeleton))(params)
  in_shape = (spec.in_width,) if spec.image is None else (*spec.image, spec.in_width)
  x = rng.normal(size=(BATCH, *in_shape))
  y = rng.normal(size=(BATCH, widths[-1]))
  return Net(params, layers, names, plan, shapes, taps, centres, widths, x, y, spec.seed)


def _draw_view(rng, spec, k, shape, skeleton):
  """One (taps, n_in, n_out) kernel view with the spec's magnitudes and signs.

  Skeleton edges (incoming and outgoing) get magnitudes in [0.3, 2] in every
  mode: every basis path divides by products of them.
  """
  bounded = rng.uniform(0.3, 2.0, shape)
  w = bounded if spec.weights == "bounded" else np.abs(rng.normal(size=shape))
  for idx in skeleton:
    w[idx] = bounded[idx]
  sign = {"mixed": rng.choice([-1.0, 1.0], shape), "+": 1.0, "-": -1.0}[spec.signs[k]]
  return w * sign


# ----------------------------------------------------------------------------
# A ReLU forward pass written from the layer kinds, and helpers of the programs.


def forward(params, x, plan):
  last = max(i for i, (op, _) in enumerate(plan) if op in ("conv", "dense"))
  for i, (op, name) in enumerate(plan):
    if op == "conv":
      x = jax.lax.conv_general_dilated(
        x, params[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    elif op == "dense":
      x = x @ params[name]["kernel"]
    elif op == "flatten":
      x = x.reshape(x.shape[0], -1)  # NHWC order: row s * C + c
    else:
      x = x.mean(axis=(1, 2))
    if name is not None and "bias" in params[name]:
      x = x + params[name]["bias"]
    if name is not None and i < last:
      x = jax.nn.relu(x)
  return x


def _loss(net, params):
  return 0.5 * jnp.mean((forward(params, net.x, net.plan) - net.y) ** 2)


def _icr(net, params):
  """The library's path gradients of the loss at ``params`` (kernel-shaped)."""
  grads = jax.grad(functools.partial(_loss, net))(params)
  (struct,) = build_structure(params, net.layers)
  pg = basis.inverse_chain_rule(
    struct,
    [params[n]["kernel"] for n in net.names],
    net.views(params)[1],
    [grads[n]["kernel"] for n in net.names],
    net.views(grads)[1],
  )
  return grads, pg


def _free_masks(net):
  return [~m for m in ref.fixed_masks(net.views(net.params)[0], net.widths, net.centres)]


def _outgoing_masks(net):
  """Outgoing skeleton edges that own a path (are not also in F)."""
  fixed, out = ref.skeleton_sets(net.widths, net.centres)
  masks = []
  for k, shape in enumerate(zip(net.taps, net.widths, net.widths[1:], strict=False)):
    m = np.zeros(shape, bool)
    for idx in out[k] - fixed[k]:
      m[idx] = True
    masks.append(m)
  return masks


def _stable_lr(net, params, pg, relative_step):
  """A learning rate (traced) whose step changes no outgoing skeleton path (the
  divisors of weight allocation) by more than ``relative_step`` of its value, and
  no path by more than ``relative_step`` of the largest path value. At most
  ``1000 * relative_step``, so that gradients at rounding level (dead units) do
  not become finite steps."""
  views, bias_values = net.views(gsgd_jax.basis_path_values(params, net.layers))
  grads = [jnp.reshape(g, v.shape) for g, v in zip(pg.kernels, views, strict=True)]
  present = lambda arrays: [a for a in arrays if a is not None]
  largest = lambda arrays: jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in present(arrays)]))
  worst = jnp.maximum(largest(grads + pg.biases) / largest(views + bias_values), 1e-3)
  for g, v, m in zip(grads, views, _outgoing_masks(net), strict=True):
    if m.any():
      worst = jnp.maximum(worst, jnp.max(jnp.where(m, jnp.abs(g), 0) / jnp.where(m, jnp.abs(v), 1)))
  return relative_step / worst


def _max_abs(arrays):
  return max(
    (float(np.max(np.abs(a))) for a in arrays if a is not None and np.size(a)), default=0.0
  )


CHECKS = {}  # every property, by name: test_depth.py runs them on a deep chain too


def _given(check):
  """A test running ``check(net)`` on hypothesis-drawn chains and conv nets."""
  CHECKS[check.__name__] = check

  def test(kind, data):
    check(build(data.draw(SPECS[kind], label="spec")))

  # Failures then name the property; derandomized draws differ per property.
  test.__name__ = test.__qualname__ = check.__name__
  test.__doc__ = check.__doc__
  test = SETTINGS(given(data=st.data())(test))
  # The draws include depth-1 chains (one layer: the edge case of every formula) and
  # skeletons left as drawn, whose chain products may leave the range init accepts
  # silently: the library's warnings for both are expected here.
  for allow in (ALLOW_ONE_LAYER, ALLOW_CHAIN_RANGE):
    test = allow(test)
  return pytest.mark.parametrize("kind", sorted(SPECS))(test)


# ----------------------------------------------------------------------------
# Properties.


@_given
def test_icr_equals_autodiff(net):
  """docs/math.md, the inverse chain rule: the library's path gradients are the gradients
  of the loss through the reference's reconstruction of the weights from basis values and F."""
  views, biases = net.views(net.params)
  values, bias_values = ref.basis_values_taps(views, biases, net.widths, net.centres)

  @_program
  def program(params, values, bias_values):
    def loss_of_values(v, vb):
      rebuilt = ref.reconstruct_taps(v, vb, views, net.widths, net.centres)
      return _loss(net, net.tree(*rebuilt)), rebuilt

    want, rebuilt = jax.grad(loss_of_values, argnums=(0, 1), has_aux=True)(values, bias_values)
    _, pg = _icr(net, params)
    return want, rebuilt, (pg.kernels, pg.biases)

  (want, want_b), rebuilt, (got, got_b) = program(net.params, values, bias_values)
  # The reconstruction inverts the basis-value map, so `want` is the gradient of
  # the same loss at the same point.
  for k in range(len(net.names)):
    np.testing.assert_allclose(rebuilt[0][k], views[k], rtol=1e-10, atol=1e-13)
    if biases[k] is not None:
      np.testing.assert_allclose(rebuilt[1][k], biases[k], rtol=1e-10, atol=1e-13)

  tol = 1e-10 * _max_abs(list(want) + list(want_b))
  for k, free in enumerate(_free_masks(net)):
    g = np.reshape(got[k], free.shape)
    np.testing.assert_allclose(
      g[free],
      np.asarray(want[k])[free],
      rtol=1e-8,
      atol=tol,
      err_msg=f"path gradients of layer {net.names[k]}",
    )
    assert np.all(g[~free] == 0), "path gradients on F must be 0"
    if biases[k] is not None:
      np.testing.assert_allclose(
        got_b[k],
        want_b[k],
        rtol=1e-8,
        atol=tol,
        err_msg=f"bias path gradients of layer {net.names[k]}",
      )


@_given
def test_weight_allocation_lands_on_v_plus_dv(net):
  """docs/math.md, weight allocation: one path-space SGD step moves every basis path to
  v - lr * gv, and only weights outside the fixed skeleton F."""

  @_program
  def program(params):
    grads, pg = _icr(net, params)
    lr = _stable_lr(net, params, pg, 0.2)
    tx = gsgd_jax.path_space(optax.sgd(lr), layers=net.layers, ratio_clip=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    return (
      lr,
      (pg.kernels, pg.biases),
      gsgd_jax.basis_path_values(params, net.layers),
      new,
      gsgd_jax.basis_path_values(new, net.layers),
      gsgd_jax.skeleton_mask(params, net.layers),
    )

  lr, (gv, gv_b), before, new, after, fixed = program(net.params)
  before_v, before_b = net.views(before)
  after_v, after_b = net.views(after)
  ref_v, ref_b = ref.basis_values_taps(*net.views(new), net.widths, net.centres)
  old_w, new_w = net.views(net.params)[0], net.views(new)[0]
  for k, free in enumerate(_free_masks(net)):
    np.testing.assert_array_equal(net.views(fixed)[0][k], ~free, err_msg="skeleton_mask is not F")
    target = np.asarray(before_v[k]) - float(lr) * np.reshape(gv[k], free.shape)
    tol = 1e-11 * (1 + _max_abs([before_v[k], target]))
    for got in (after_v[k], ref_v[k]):  # the library's and the reference's values
      np.testing.assert_allclose(
        np.asarray(got)[free],
        target[free],
        rtol=1e-9,
        atol=tol,
        err_msg=f"basis values of layer {net.names[k]}",
      )
    if before_b[k] is not None:
      target_b = np.asarray(before_b[k]) - float(lr) * np.asarray(gv_b[k])
      for got in (after_b[k], ref_b[k]):
        np.testing.assert_allclose(
          got, target_b, rtol=1e-9, atol=tol, err_msg=f"bias basis values of layer {net.names[k]}"
        )
    np.testing.assert_array_equal(
      np.asarray(new_w[k])[~free], np.asarray(old_w[k])[~free], err_msg="a weight of F moved"
    )


STEPS = 4


@_given
def test_rescaling_invariance_of_training(net):
  """docs/math.md, why any elementwise optimizer stays invariant: G-SGD from params and
  from a random rescaling of them gives the same network outputs after every step (no
  ratio clipped in either run)."""

  @_program
  def program(params, seed):
    rescaled = gsgd_jax.random_rescale(params, net.layers, jax.random.key(seed))
    grads, pg = _icr(net, params)
    # One learning rate for both runs, small enough that no ratio is clipped.
    tx = gsgd_jax.gsgd(_stable_lr(net, params, pg, 0.05), layers=net.layers)

    def run(p):
      def step(carry, _):
        p, state = carry
        updates, state = tx.update(jax.grad(functools.partial(_loss, net))(p), state, p)
        p = optax.apply_updates(p, updates)
        return (p, state), forward(p, net.x, net.plan)

      (_, state), outputs = jax.lax.scan(step, (p, tx.init(p)), length=STEPS)
      return outputs, state.total_clipped_ratios

    # lax.map runs both starts through the same compiled loop.
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, rescaled)
    largest_grad = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
    return forward(params, net.x, net.plan), largest_grad, jax.lax.map(run, stacked)

  start, largest_grad, ((out_a, out_b), clipped) = program(net.params, net.seed)
  assert np.all(clipped == 0)
  assert np.all(np.isfinite(out_a))
  scale = 1 + _max_abs([out_a])
  if largest_grad > 1e-6:  # training changed the function (unless every unit is dead)
    assert np.max(np.abs(out_a[-1] - start)) > 1e-12 * scale
  np.testing.assert_allclose(out_b, out_a, rtol=1e-9, atol=1e-10 * scale)


@_given
def test_random_rescale_keeps_basis_values_and_function(net):
  """random_rescale changes the weights, but neither the basis-path values (the
  library's, equal to the reference's) nor the network function."""

  @_program
  def program(params, seed):
    rescaled = gsgd_jax.random_rescale(params, net.layers, jax.random.key(seed))
    return rescaled, [
      (gsgd_jax.basis_path_values(p, net.layers), forward(p, net.x, net.plan))
      for p in (params, rescaled)
    ]

  rescaled, [(want, out), (got, out_rescaled)] = program(net.params, net.seed)
  if len(net.names) > 1:  # hidden nodes exist: the weights really changed
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), rescaled, net.params))
    assert max(moved) > 1e-3
  else:
    jax.tree.map(np.testing.assert_array_equal, rescaled, net.params)

  # Basis values are products, so each agrees to a relative rounding error.
  ref_a = ref.basis_values_taps(*net.views(net.params), net.widths, net.centres)
  ref_b = ref.basis_values_taps(*net.views(rescaled), net.widths, net.centres)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-300)
  jax.tree.map(close, got, want)
  jax.tree.map(close, ref_b, ref_a)
  jax.tree.map(close, tuple(net.views(want)), ref_a)  # library = reference

  np.testing.assert_allclose(out_rescaled, out, rtol=1e-10, atol=1e-12 * (1 + _max_abs([out])))
