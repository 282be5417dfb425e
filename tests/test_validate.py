"""verify_invariance: passes on ReLU chains, names the layer that breaks the symmetry."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from problems import cnn, make_mlp

import gsgd_jax


def test_relu_mlp_and_cnn_pass():
  params, layers = make_mlp(jax.random.key(0), (5, 8, 7, 3))
  x = jax.random.normal(jax.random.key(1), (16, 5))
  worst = gsgd_jax.verify_invariance(lambda p, x: ref.forward(p, layers, x), params, layers, x)
  assert worst < 1e-10
  problem = cnn("same-max-valid-flatten")
  x = jax.random.normal(jax.random.key(2), (4, *problem.x.shape[1:]))
  assert gsgd_jax.verify_invariance(problem.forward, problem.params, problem.layers, x) < 1e-10


def test_tanh_after_a_layer_is_named():
  params, layers = make_mlp(jax.random.key(0), (5, 8, 7, 3))

  def apply(p, x):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])  # not homogeneous
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]

  x = jax.random.normal(jax.random.key(1), (16, 5))
  with pytest.raises(ValueError, match=r"layer 'Dense_1'.*non-ReLU activation"):
    gsgd_jax.verify_invariance(apply, params, layers, x)


def test_wrong_order_and_normalisation_inside_a_block_fail():
  params, layers = make_mlp(jax.random.key(0), (6, 6, 6, 6))
  x = jax.random.normal(jax.random.key(1), (16, 6))
  forward = lambda p, x: ref.forward(p, layers, x)
  swapped = [layers[1], layers[0], layers[2]]  # shapes chain, order does not
  with pytest.raises(ValueError, match=r"rescaling the output nodes of layer 'Dense_1'"):
    gsgd_jax.verify_invariance(forward, params, swapped, x)

  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.LayerNorm(use_scale=False, use_bias=False)(nn.Dense(8)(x)))
      return nn.Dense(2)(x)

  model = Normed()
  p = jax.jit(model.init)(jax.random.key(2), x)
  with pytest.raises(ValueError, match=r"'params/Dense_0'"):
    gsgd_jax.verify_invariance(model.apply, p, gsgd_jax.infer_layers(p), x)


def test_blocks_name_the_block():
  a, _ = make_mlp(jax.random.key(0), (4, 5, 3), layer_names=["a0", "a1"])
  b, _ = make_mlp(jax.random.key(1), (3, 6, 2), layer_names=["b0", "b1"])
  params = {**a, **b}

  def apply(p, x):
    h = ref.forward(p, [("a0",), ("a1",)], x)
    h = jnp.sin(p["b0"]["kernel"].T @ h.T).T  # not ReLU inside block 1
    return h @ p["b1"]["kernel"]

  x = jax.random.normal(jax.random.key(2), (8, 4))
  with pytest.raises(ValueError, match=r"'b0' of block 1"):
    gsgd_jax.verify_invariance(apply, params, [["a0", "a1"], ["b0", "b1"]], x)


def test_rescale_with_explicit_factors():
  params, layers = make_mlp(jax.random.key(0), (3, 4, 2))
  factors = [[None, jnp.array([2.0, 1.0, 1.0, 0.5]), None]]
  new = gsgd_jax.rescale(params, layers, factors)
  np.testing.assert_allclose(new["Dense_0"]["kernel"][:, 0], 2 * params["Dense_0"]["kernel"][:, 0])
  np.testing.assert_allclose(new["Dense_0"]["bias"][3], 0.5 * params["Dense_0"]["bias"][3])
  np.testing.assert_allclose(new["Dense_1"]["kernel"][0], params["Dense_1"]["kernel"][0] / 2)


# verify_invariance at perturbed params: models whose symmetry holds at initialisation only.
X = jax.random.normal(jax.random.key(1), (16, 5))


class _Relu6(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="l1")(nn.relu6(nn.Dense(8, name="l0")(x)))


class _EvalBatchNorm(nn.Module):
  """A BatchNorm in evaluation mode inside the block: with fresh statistics (mean 0,
  variance 1) and bias 0 it is linear, and positively homogeneous, until trained."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="l0")(x)
    h = nn.BatchNorm(use_running_average=True, name="bn")(h)
    return nn.Dense(3, name="l1")(nn.relu(h))


class _SeparateBias(nn.Module):
  """A declared bias-free layer followed by a bias of its own, zero at initialisation."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, use_bias=False, name="l0")(x)
    h = h + self.param("shift", nn.initializers.zeros, (8,))
    return nn.Dense(3, name="l1")(nn.relu(h))


class _TanhGate(nn.Module):
  """``relu(h) + g * tanh(h)`` with the gate ``g`` zero at initialisation."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="l0")(x)
    h = nn.relu(h) + self.param("gate", nn.initializers.zeros, ()) * jnp.tanh(h)
    return nn.Dense(3, name="l1")(h)


LAYERS = [("params", "l0"), ("params", "l1")]


@pytest.mark.parametrize(
  "model",
  [_Relu6(), _EvalBatchNorm(), _SeparateBias(), _TanhGate()],
  ids=["relu6", "eval-batchnorm", "separate-zero-bias", "zero-gate-tanh"],
)
def test_symmetry_that_holds_at_init_only_is_caught(model):
  variables = model.init(jax.random.key(0), X)
  # At the initial params every model passes factors of 1/2 and 2 (relu6 fails
  # factors of 4 there already): that is why the check perturbs them.
  gsgd_jax.verify_invariance(model.apply, variables, LAYERS, X, perturb=False, max_exponent=1)
  with pytest.raises(ValueError, match=r"layer 'params/l0'.*at randomly perturbed params"):
    gsgd_jax.verify_invariance(model.apply, variables, LAYERS, X, max_exponent=1)


def test_relu_model_passes_at_perturbed_params():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(3)])
  params = model.init(jax.random.key(0), X)
  assert gsgd_jax.verify_invariance(model.apply, params, gsgd_jax.infer_layers(params), X) < 1e-6


def test_bfloat16_relu_mlp_reproduces_its_outputs_bit_for_bit():
  """Power-of-two factors rescale exactly in every format: no rounding to tolerate."""
  model = nn.Sequential(
    [
      nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
      nn.relu,
      nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
      nn.relu,
      nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
    ]
  )
  x = X.astype(jnp.bfloat16)
  params = model.init(jax.random.key(0), x)
  worst = gsgd_jax.verify_invariance(model.apply, params, gsgd_jax.infer_layers(params), x)
  assert worst == 0.0
  # The same model with a tanh still fails at that tolerance.
  tanh = nn.Sequential(
    [
      nn.Dense(16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
      nn.tanh,
      nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
    ]
  )
  with pytest.raises(ValueError, match=r"layers_0"):
    gsgd_jax.verify_invariance(
      tanh.apply,
      tanh.init(jax.random.key(0), x),
      [("params", "layers_0"), ("params", "layers_2")],
      x,
    )


# Wrong declarations on a BatchNorm-style PlainNet, in float32 and float64 with default
# arguments: a norm that mixes channels after a block declared normalized, a chain straight
# through the norms, a GELU. The right declaration on BatchNorm passes in both.


def _plainnet(norm, activation=nn.relu):
  class PlainNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(3):
        x = nn.Conv(6, (3, 3), use_bias=False, name=f"conv{i}")(x)
        x = activation(norm(name=f"bn{i}")(x))
      return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))

  return PlainNet()


BLOCKS = [
  gsgd_jax.Block(["conv0"], normalized=True),
  gsgd_jax.Block(["bn0", "conv1"], normalized=True),
  gsgd_jax.Block(["bn1", "conv2"], normalized=True),
  gsgd_jax.Block(["bn2", "head"]),
]
NORMS = {
  "batch": lambda name: nn.BatchNorm(use_running_average=False, name=name),
  "layer": lambda name: nn.LayerNorm(name=name),
  "group": lambda name: nn.GroupNorm(3, name=name),
  "rms": lambda name: nn.RMSNorm(name=name),
}


def _check(model, layers, dtype):
  x = jax.random.uniform(jax.random.key(1), (4, 6, 6, 2), dtype)
  variables = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), x))
  state = {k: v for k, v in variables.items() if k != "params"}
  apply = jax.jit(lambda p, x: model.apply({"params": p, **state}, x, mutable=list(state))[0])
  return gsgd_jax.verify_invariance(apply, variables["params"], layers, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_wrong_declarations_fail_and_the_right_one_passes(dtype):
  assert _check(_plainnet(NORMS["batch"]), BLOCKS, dtype) == 0.0
  for kind in ("layer", "group", "rms"):  # declared normalized before a norm that mixes
    with pytest.raises(ValueError, match=r"'conv0' of block 0 .*declared normalized=True"):
      _check(_plainnet(NORMS[kind]), BLOCKS, dtype)
  with pytest.raises(ValueError, match=r"layer 'conv0' .*a normalisation"):  # a chain
    _check(_plainnet(NORMS["batch"]), ["conv0", "conv1", "conv2"], dtype)
  with pytest.raises(ValueError, match=r"affine layer 'bn0' of block 1"):  # a GELU
    _check(_plainnet(NORMS["batch"], nn.gelu), BLOCKS, dtype)


class _ActivationBeforeNorm(nn.Module):
  """``dense -> act -> BatchNorm -> ReLU -> dense``, the first layer declared normalized."""

  act: Any
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    h = self.act(nn.Dense(16, name="d0", dtype=self.dtype)(x))
    h = nn.relu(nn.BatchNorm(use_running_average=False, name="bn", dtype=self.dtype)(h))
    return nn.Dense(3, name="d1", dtype=self.dtype)(h).astype(jnp.float32)


def _before_norm(act, dtype=None):
  model = _ActivationBeforeNorm(act, dtype)
  x = jax.random.normal(jax.random.key(1), (32, 8), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  stats = variables["batch_stats"]
  apply = jax.jit(
    lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])[0]
  )
  return apply, variables["params"], x


@pytest.mark.parametrize(
  "act", [jnp.tanh, nn.gelu, nn.relu6, nn.silu, nn.sigmoid], ids=lambda f: f.__name__
)
def test_an_activation_between_a_normalized_block_and_its_norm_is_caught(act):
  """At the common lift of 2**30 a saturating or GELU-like activation looks homogeneous:
  the lift itself must not move the outputs by more than an epsilon can."""
  apply, params, x = _before_norm(act)
  with pytest.raises(ValueError, match=r"lifting the outputs of layer 'd0' .*not positively"):
    gsgd_jax.verify_invariance(apply, params, [gsgd_jax.Block(["d0"], normalized=True)], x)


def test_float16_compute_with_float32_params_falls_back_to_a_smaller_lift():
  apply, params, x = _before_norm(lambda h: h, jnp.float16)
  block = [gsgd_jax.Block(["d0"], normalized=True)]
  assert gsgd_jax.verify_invariance(apply, params, block, x, rtol=3e-2) < 3e-2


def test_narrow_levels_are_never_rescaled_by_one_common_factor():
  """A common factor is what a LayerNorm absorbs too: on outputs two wide, every key must
  still catch a LayerNorm after a block declared normalized."""

  class Narrow(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.LayerNorm(name="ln")(nn.Dense(2, name="d0")(x)))
      return nn.Dense(3, name="d1")(h)

  model = Narrow()
  params = model.init(jax.random.key(0), X)
  for seed in range(12):
    with pytest.raises(ValueError, match=r"layer 'params/d0'"):
      gsgd_jax.verify_invariance(
        model.apply, params, [gsgd_jax.Block(["params/d0"], normalized=True)], X,
        key=jax.random.key(seed), perturb=False,
      )  # fmt: skip
