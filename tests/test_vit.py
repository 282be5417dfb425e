"""The ViT benchmark model: its stacked feed-forward blocks, the runner's ``vit`` model and
AdamW kinds, the ``fmnist_vit`` config and the ViT mode of the invariance picture."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from benchmarks import invariance_plot, loop, train

CONFIGS = Path(__file__).parent.parent / "configs"

# A tiny ViT on the 8x8 digits: 4x4 patches give 4 tokens.
TINY = {"patch": 4, "dim": 8, "hidden": 16, "depth": 2, "heads": 2}


def _images(n: int = 6) -> jax.Array:
  return jax.random.uniform(jax.random.key(3), (n, 8, 8, 1), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  """The tiny ViT and its variables, initialised once (compiled: op by op, the scanned
  layers' initialisers each compile alone)."""
  model = loop.ViT(10, **TINY)
  return model, loop.init_variables(model, jax.random.key(0), _images(1))


def test_vit_blocks_are_the_inferred_stacked_feed_forward_blocks(tiny):
  model, params = tiny
  layers = params["params"]["layers"]
  # nn.scan stacks every layer's parameters on axis 0, one copy per layer.
  assert layers["fc1"]["kernel"].shape == (2, 8, 16)
  assert layers["fc2"]["kernel"].shape == (2, 16, 8)
  assert layers["ln_ff"]["scale"].shape == (2, 8)
  assert set(layers) == {"ln_attn", "attn", "ln_ff", "fc1", "fc2"}
  assert params["params"]["pos"].shape == (4, 8)  # one position embedding per patch
  blocks = model.gsgd_blocks()
  assert blocks == gsgd_jax.infer_blocks(params, "preln")
  assert blocks == [
    gsgd_jax.Block(["params/layers/ln_ff", "params/layers/fc1", "params/layers/fc2"], stack_axis=0)
  ]
  assert loop.gsgd_layers(model, params) == blocks
  assert jax.eval_shape(model.apply, params, _images()).shape == (6, 10)


def test_vit_rescaling_of_the_blocks_leaves_the_function_unchanged(tiny):
  model, params = tiny
  blocks = model.gsgd_blocks()
  apply = jax.jit(model.apply)  # one compilation for the many rescaled params
  gsgd_jax.verify_invariance(apply, params, blocks, _images())
  # Every copy gets its own factors: both layers' fc1 kernels move, the outputs do not.
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(1), log_range=1.0)
  kernel, moved = (p["params"]["layers"]["fc1"]["kernel"] for p in (params, rescaled))
  assert not np.allclose(kernel[0], moved[0]) and not np.allclose(kernel[1], moved[1])
  np.testing.assert_allclose(
    apply(rescaled, _images()), apply(params, _images()), rtol=1e-5, atol=1e-5
  )


def test_vit_rejects_a_patch_that_does_not_divide_the_images():
  with pytest.raises(ValueError, match="patch 3 does not divide the 8x8 images"):
    loop.ViT(10, patch=3).init(jax.random.key(0), _images(1))


VIT_CONFIG = """
description = "test"
dataset = "digits"
epochs = 1
batch_size = 16
seeds = [0]
train_subset = 64
test_subset = 40

[model]
kind = "vit"
patch = 4
dim = 8
hidden = 16
depth = 2
heads = 2

[grid]
validation = 0.25
epochs = 1

[[optimizers]]
name = "AdamW"
kind = "adamw"
weight_decay = 1e-4
lr = 0.003

[[optimizers]]
name = "Path AdamW"
kind = "path_adamw"
weight_decay = 1e-4
lr = 0.003
"""


def test_vit_config_runs_end_to_end(tmp_path):
  (tmp_path / "c.toml").write_text(VIT_CONFIG)
  out = tmp_path / "out"
  train.main(["--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"])
  results = json.loads((out / "results.json").read_text())
  assert [r["optimizer"] for r in results["runs"]] == ["AdamW", "Path AdamW"]
  assert results["dataset"]["train"] == 64 and results["dataset"]["test"] == 40
  for run in results["runs"]:
    last = run["history"][-1]
    assert np.isfinite(last["train_loss"]) and 0 <= last["test_accuracy"] <= 1
    # Only the path-space run has path ratios to clip.
    assert ("clipped_ratios" in last) == (run["kind"] == "path_adamw")
  assert "| Path AdamW | - |" in (out / "summary.md").read_text()
  assert (out / "curves.png").stat().st_size > 1000


def test_adamw_kinds_take_the_weight_decay():
  params, zero = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
  # With a zero gradient AdamW's step is the decoupled decay alone: -lr * decay * w.
  tx = train.make_optimizer({"kind": "adamw", "weight_decay": 0.5}, 0.1, [], 1)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-6)
  tx = train.make_optimizer({"kind": "adamw"}, 0.1, [], 1)  # default 1e-4
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-5, rtol=1e-5)
  # path_adamw: the same AdamW on the path values of the blocks and on everything else,
  # which is the library's g_adamw (a small chain with a parameter outside it suffices).
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "l0": {"kernel": jax.random.normal(keys[0], (3, 4)), "bias": jnp.full(4, 0.1)},
    "l1": {"kernel": jax.random.normal(keys[1], (4, 2))},
    "other": jax.random.normal(keys[2], (5,)),
  }
  grads = jax.tree.map(lambda w: jax.random.normal(keys[3], w.shape), params)
  opt = {"kind": "path_adamw", "weight_decay": 0.01}
  ours = train.make_optimizer(opt, 0.003, ["l0", "l1"], 1)
  alias = gsgd_jax.g_adamw(0.003, weight_decay=0.01, layers=["l0", "l1"])
  mine, _ = ours.update(grads, ours.init(params), params)
  theirs, _ = alias.update(grads, alias.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), mine, theirs)


@pytest.mark.parametrize(
  "old, new, message",
  [
    ("heads = 2", "heads = 3", "dim 8 is not a multiple of heads 3"),
    ('kind = "vit"', 'kind = "mlp"', r"\['depth', 'dim', 'heads', 'hidden', 'patch'\] apply to"),
    ('kind = "adamw"', 'kind = "sgd"', "weight_decay applies to kinds adamw and path_adamw"),
    ('kind = "path_adamw"', 'kind = "nadam"', "kind 'nadam'"),
  ],
)
def test_vit_config_errors(tmp_path, old, new, message):
  path = tmp_path / "c.toml"
  path.write_text(VIT_CONFIG.replace(old, new, 1))
  with pytest.raises(ValueError, match=message):
    train.load_config(str(path), {})


def test_fmnist_vit_config_builds_its_model_and_optimizers():
  config = train.load_config(str(CONFIGS / "fmnist_vit.toml"), {})
  assert config["dataset"] == "fashion-mnist" and len(config["seeds"]) == 3
  kinds = [o["kind"] for o in config["optimizers"]]
  assert kinds == ["adamw", "path_adamw", "sgd", "momentum", "gsgd", "g_momentum"]
  assert all(len(o["lr_grid"]) == 3 for o in config["optimizers"])
  model = train.make_model(config, {}, 10)
  assert isinstance(model, loop.ViT)
  assert (model.patch, model.dim, model.hidden, model.depth, model.heads) == (7, 64, 128, 4, 4)
  params = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  )
  assert params["params"]["pos"].shape == (16, 64)  # 7x7 patches of 28x28 images
  blocks = loop.gsgd_layers(model, params)
  assert blocks == gsgd_jax.infer_blocks(params, "preln")
  for opt in config["optimizers"]:  # every optimizer's state fits the parameters
    tx = train.make_optimizer(opt, opt["lr_grid"][0], blocks, 50)
    jax.eval_shape(tx.init, params)


def test_invariance_plot_vit_mode(tmp_path, capsys):
  out = tmp_path / "vit.png"
  flags = [f"--{k}={v}" for k, v in TINY.items()]
  gaps = invariance_plot.main(
    ["--model", "vit", "--dataset", "digits", "--out", str(out), "--steps", "12", *flags]
  )
  assert gaps is not None and out.stat().st_size > 1000
  # float32: path space's two runs agree to round-off; AdamW's differ at once.
  assert gaps["path_space(AdamW)"] < 1e-4 < gaps["AdamW"], gaps
  printed = capsys.readouterr().out
  assert "path_space(AdamW): largest difference between the two loss curves" in printed
  assert "4 patches of 4x4" in printed


def test_optax_adamw_is_what_the_runner_builds():
  # The runner's adamw kind is optax's, so the library's AdamW results compare directly.
  params, grads = {"w": jnp.arange(3.0)}, {"w": jnp.array([0.5, -1.0, 2.0])}
  ours = train.make_optimizer({"kind": "adamw", "weight_decay": 0.1}, 0.01, [], 1)
  theirs = optax.adamw(0.01, weight_decay=0.1)
  a, _ = ours.update(grads, ours.init(params), params)
  b, _ = theirs.update(grads, theirs.init(params), params)
  np.testing.assert_array_equal(a["w"], b["w"])
