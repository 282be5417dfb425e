"""The experiment runner: outputs, determinism, resuming, learning-rate grid, CIFAR batches."""

import functools
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsgd_jax
from benchmarks import data as datasets
from benchmarks import loop, train

# SGD and G-SGD at lr 0.1: the optimizers of the small configs below.
SGD_AND_GSGD = """
[[optimizers]]
name = "SGD"
kind = "sgd"
lr = 0.1

[[optimizers]]
name = "G-SGD"
kind = "gsgd"
lr = 0.1
"""

SMALL = (
  """
description = "test"
dataset = "digits"
epochs = 2
batch_size = 64
seeds = [0]
train_subset = 640

[model]
kind = "mlp"
widths = [16, 16]

[sweep]
width = [8, 16]
"""
  + SGD_AND_GSGD
)


def _config(tmp_path, text=SMALL, **overrides):
  path = tmp_path / "c.toml"
  path.write_text(text)
  return train.load_config(str(path), overrides)


def test_sweep_writes_results_summary_and_plots(tmp_path):
  out = tmp_path / "out"
  _config(tmp_path)
  train.main(["--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"])
  results = json.loads((out / "results.json").read_text())
  assert len(results["runs"]) == 4  # 2 optimizers x 2 widths x 1 seed
  for run in results["runs"]:
    assert len(run["history"]) == 2
    assert {"train_loss", "test_accuracy", "seconds"} <= set(run["history"][0])
  assert all("clipped_ratios" in r["history"][-1] for r in results["runs"] if r["kind"] == "gsgd")
  summary = (out / "summary.md").read_text()
  assert "| G-SGD | width=16 |" in summary and "Gap G-SGD minus SGD, paired by seed" in summary
  assert (out / "curves.png").stat().st_size > 1000 and (out / "gap.png").stat().st_size > 1000


def test_runs_are_deterministic_per_seed(tmp_path):
  config = _config(tmp_path)
  a = train.run_experiment(config, tmp_path / "a", progress=False)
  b = train.run_experiment(config, tmp_path / "b", progress=False)
  for ra, rb in zip(a["runs"], b["runs"], strict=True):
    assert [h["train_loss"] for h in ra["history"]] == [h["train_loss"] for h in rb["history"]]
    assert [h["test_accuracy"] for h in ra["history"]] == [
      h["test_accuracy"] for h in rb["history"]
    ]


def test_resume_skips_finished_runs(tmp_path):
  out = tmp_path / "out"
  train.run_experiment(_config(tmp_path), out, progress=False)
  results = json.loads((out / "results.json").read_text())
  results["runs"][0]["history"][-1]["test_accuracy"] = -1.0  # a marker a rerun would overwrite
  (out / "results.json").write_text(json.dumps(results))
  resumed = train.run_experiment(_config(tmp_path, seeds=[0, 1]), out, progress=False)
  assert len(resumed["runs"]) == 8
  assert resumed["runs"][0]["history"][-1]["test_accuracy"] == -1.0
  assert sorted({r["seed"] for r in resumed["runs"]}) == [0, 1]
  # An optimizer added, or one changed, runs alone; the other's runs stay.
  text = SMALL.replace(
    'name = "G-SGD"\nkind = "gsgd"\nlr = 0.1', 'name = "G-SGD"\nkind = "gsgd"\nlr = 0.2'
  )
  text += '\n[[optimizers]]\nname = "Adam"\nkind = "adam"\nlr = 0.01\n'
  changed = train.run_experiment(_config(tmp_path, text, seeds=[0, 1]), out, progress=False)
  assert len(changed["runs"]) == 12
  assert changed["runs"][0]["history"][-1]["test_accuracy"] == -1.0  # SGD's, kept
  assert {r["lr"] for r in changed["runs"] if r["optimizer"] == "G-SGD"} == {0.2}
  # Changed settings start afresh.
  fresh = train.run_experiment(_config(tmp_path, epochs=1), out, progress=False)
  assert len(fresh["runs"]) == 4 and all(len(r["history"]) == 1 for r in fresh["runs"])


def test_resume_chooses_again_the_rate_of_a_changed_optimizer_whose_name_another_begins(
  tmp_path,
):
  """ "G-SGD" and "G-SGD (x)" both choose from a grid; changing the second's grid makes it
  choose again, and "G-SGD"'s choice stays."""
  text = SMALL.replace("[sweep]\nwidth = [8, 16]\n", "").replace("lr = 0.1", "lr_grid = [0.1]")
  text += '\n[[optimizers]]\nname = "G-SGD (x)"\nkind = "gsgd"\nlr_grid = [0.1]\n'
  out = tmp_path / "out"
  first = train.run_experiment(_config(tmp_path, text, epochs=1), out, progress=False)
  assert first["lr_choices"]["G-SGD (x)"]["lr"] == 0.1
  changed = text.replace(
    '"G-SGD (x)"\nkind = "gsgd"\nlr_grid = [0.1]', '"G-SGD (x)"\nkind = "gsgd"\nlr_grid = [0.05]'
  )
  again = train.run_experiment(_config(tmp_path, changed, epochs=1), out, progress=False)
  assert again["lr_choices"]["G-SGD (x)"]["lr"] == 0.05
  assert again["lr_choices"]["G-SGD"] == first["lr_choices"]["G-SGD"]
  assert [r["lr"] for r in again["runs"] if r["optimizer"] == "G-SGD (x)"] == [0.05]


def test_learning_rate_grid_picks_by_validation(tmp_path):
  text = SMALL.replace(
    'lr = 0.1\n\n[[optimizers]]\nname = "G-SGD"',
    'lr_grid = [1e-6, 0.1]\n\n[[optimizers]]\nname = "G-SGD"',
  )
  text = text.replace("[sweep]\nwidth = [8, 16]\n", "")
  results = train.run_experiment(_config(tmp_path, text), tmp_path / "out", progress=False)
  choice = results["lr_choices"]["SGD"]
  assert choice["lr"] == 0.1
  assert choice["validation_accuracy"]["0.1"] > choice["validation_accuracy"]["1e-06"]
  assert results["runs"][0]["lr"] == 0.1


@pytest.mark.parametrize(
  "bad, message",
  [
    ("epoch = 3\n", "unknown keys"),
    ('[[optimizers]]\nname = "X"\nkind = "lbfgs"\nlr = 1\n', "kind 'lbfgs'"),
    ('[[optimizers]]\nname = "X"\nkind = "sgd"\n', "needs lr or lr_grid"),
    (
      '[[optimizers]]\nname = "X"\nkind = "sgd"\nlr = 1\nimplicit_decay = true\n',
      "implicit_decay applies to kinds gsgd and g_momentum, not sgd",
    ),
    (
      '[[optimizers]]\nname = "X"\nkind = "gsgd"\nlr = 1\nimplicit_decay = true\n',
      "implicit_decay acts on normalized blocks",  # SMALL's model is an MLP
    ),
    (
      '[[optimizers]]\nname = "X"\nkind = "gsgd"\nlr = 1\ninitial_rate_norm = 2.0\n',
      "initial_rate_norm is where implicit_decay's rate norms start",
    ),
  ],
)
def test_config_errors(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    _config(tmp_path, bad + ("" if "optimizers" in bad else SMALL))


def test_cnn_config_runs(tmp_path):
  text = SMALL.replace('kind = "mlp"\nwidths = [16, 16]', 'kind = "cnn"\nstages = [[4], [6]]')
  text = text.replace("[sweep]\nwidth = [8, 16]\n", "").replace("epochs = 2", "epochs = 1")
  results = train.run_experiment(_config(tmp_path, text), tmp_path / "out", progress=False)
  assert len(results["runs"]) == 2
  assert all(0 <= r["history"][-1]["test_accuracy"] <= 1 for r in results["runs"])


def _write_cifar(folder, variant, n=4):
  rng = np.random.default_rng(0)
  train_files, test_files, label_key, classes, _ = datasets.CIFAR_LAYOUTS[variant]
  written = {}
  for name in train_files + test_files:
    batch = {
      b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
      label_key: list(rng.integers(0, classes, n)),
    }
    with open(folder / name, "wb") as f:
      pickle.dump(batch, f)
    written[name] = batch
  return written


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_batches_load(tmp_path, variant):
  folder = tmp_path / datasets.CIFAR_LAYOUTS[variant][4]
  folder.mkdir()
  written = _write_cifar(folder, variant)
  ds = datasets.load_cifar(tmp_path, variant)  # finds the archive's sub-folder
  n_train = 4 * len(datasets.CIFAR_LAYOUTS[variant][0])
  assert ds.x_train.shape == (n_train, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  first = written[datasets.CIFAR_LAYOUTS[variant][0][0]]
  # Channel-major rows: pixel (row 0, col 1) of channel 2 sits at 2*1024 + 1.
  assert ds.x_train[0, 0, 1, 2] == pytest.approx(first[b"data"][0, 2 * 1024 + 1] / 255)
  label_key = datasets.CIFAR_LAYOUTS[variant][2]
  assert list(ds.y_train[:4]) == list(first[label_key])
  assert ds.num_classes == (10 if variant == "cifar10" else 100)


def test_cifar_errors(tmp_path):
  with pytest.raises(ValueError, match=r"missing cifar10 batches"):
    datasets.load_cifar(tmp_path, "cifar10")
  with pytest.raises(ValueError, match=r"unknown CIFAR variant"):
    datasets.load_cifar(tmp_path, "cifar5")
  _write_cifar(tmp_path, "cifar10")
  with open(tmp_path / "test_batch", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(ValueError, match=r"expected \(n, 3072\)"):
    datasets.load_cifar(tmp_path, "cifar10")


def test_every_config_loads():
  from pathlib import Path

  configs = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
  assert len(configs) >= 11
  assert {
    "fmnist_plainnet_bn.toml",
    "fmnist_resnet_bn.toml",
    "fmnist_plainnet_bn_depth.toml",
    "cifar10_plainnet34_bn.toml",
    "cifar10_resnet34_bn.toml",
    "fmnist_vit.toml",
  } <= {p.name for p in configs}
  for path in configs:
    if path.name == "fmnist_mlp.toml":  # `make run`'s flags, read by benchmarks.fmnist
      continue
    config = train.load_config(str(path), {})
    assert config["optimizers"] and config.get("description")


def test_smoke_config_runs(tmp_path):
  from pathlib import Path

  config = Path(__file__).parent.parent / "configs" / "smoke.toml"
  train.main(["--config", str(config), "--out", str(tmp_path), "--no-progress"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert {r["optimizer"] for r in results["runs"]} == {"SGD", "G-SGD", "Path-SGD", "G-Adam"}
  assert (tmp_path / "summary.md").exists() and (tmp_path / "curves.png").exists()


def test_resnet_config_runs_with_blocks(tmp_path):
  text = SMALL.replace(
    'kind = "mlp"\nwidths = [16, 16]', 'kind = "resnet"\nstages = [[4, 1], [6, 1]]'
  )
  text = text.replace("[sweep]\nwidth = [8, 16]\n", "").replace("epochs = 2", "epochs = 1")
  results = train.run_experiment(_config(tmp_path, text), tmp_path / "out", progress=False)
  assert [r["optimizer"] for r in results["runs"]] == ["SGD", "G-SGD"]
  assert "clipped_ratios" in results["runs"][1]["history"][-1]
  model = train.make_model(_config(tmp_path, text), {}, 10)
  assert model.gsgd_blocks()[1] == [
    ("params", "stage1_block0", "conv_a"),
    ("params", "stage1_block0", "conv_b"),
  ]


# ----------------------------------------------------------------------------
# BatchNorm models, depth sweep, augmentation, piecewise schedule.

BN_SMALL = (
  """
description = "test"
dataset = "digits"
epochs = 1
batch_size = 64
seeds = [0]
train_subset = 384

[model]
kind = "KIND"
stages = [[4, 1], [6, 1]]
"""
  + SGD_AND_GSGD
)


def _bn_config(tmp_path, kind, top="", tables="", **overrides):
  """BN_SMALL for model ``kind``, with top-level keys and tables added."""
  return _config(tmp_path, top + BN_SMALL.replace("KIND", kind) + tables, **overrides)


def _conv_kernels(tree) -> int:
  return sum(
    1
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if jax.tree_util.keystr(path).endswith("['kernel']") and len(leaf.shape) == 4
  )


ABLATION = """
[[optimizers]]
name = "G-SGD (not normalized)"
kind = "gsgd"
lr = 0.1
normalized = false
"""


@pytest.mark.parametrize("kind", ["plainnet_bn", "resnet_bn"])
def test_bn_config_runs_and_writes_results(tmp_path, kind):
  out = tmp_path / "out"
  # SGD and G-SGD here; the ablation in the other test of the pair (compilation is the cost).
  text = BN_SMALL.replace("KIND", kind)
  if kind == "resnet_bn":
    text = (
      text[: text.index("[[optimizers]]")] + text[text.index('[[optimizers]]\nname = "G-SGD"') :]
    )
    text += ABLATION
  (tmp_path / "c.toml").write_text(text)
  train.main(["--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"])
  results = json.loads((out / "results.json").read_text())
  names = ["SGD", "G-SGD"] if kind == "plainnet_bn" else ["G-SGD", "G-SGD (not normalized)"]
  assert [r["optimizer"] for r in results["runs"]] == names
  for run in results["runs"]:
    assert np.isfinite(run["history"][-1]["train_loss"])
    assert 0 <= run["history"][-1]["test_accuracy"] <= 1
    # BatchNorm: the accuracy with statistics re-estimated for the final weights too.
    assert 0 <= run["history"][-1]["test_accuracy_recalibrated"] <= 1
    assert ("clipped_ratios" in run["history"][-1]) == (run["kind"] == "gsgd")
  summary = (out / "summary.md").read_text()
  assert f"| {names[1]} | - |" in summary
  assert "| test accuracy | recalibrated test accuracy |" in summary
  assert (out / "curves.png").exists()


@pytest.mark.parametrize("kind", ["plainnet_bn", "resnet_bn"])
def test_not_normalized_blocks_are_the_ablation(kind):
  model = train.make_model({"model": {"kind": kind, "stages": [[4, 2], [6, 1]]}}, {}, 10)
  normalized, plain = model.gsgd_blocks(), model.gsgd_blocks(normalized=False)
  # The same chains without the N^2 scaling; one-layer blocks exist only when normalized.
  assert [b.layers for b in plain] == [b.layers for b in normalized if len(b.layers) > 1]
  assert not any(b.normalized for b in plain)


def test_stage_chains_are_the_authors_declaration_and_not_exact(tmp_path, monkeypatch):
  """declaration = "stage_chains": each stage's convolutions one chain through the norms;
  the skeleton pattern follows it (for SGD too); verify_invariance rejects it."""
  text = BN_SMALL.replace("KIND", "plainnet_bn").replace(
    "lr = 0.1\n", 'lr = 0.1\ndeclaration = "stage_chains"\n'
  )
  config = _config(tmp_path, text.replace("stages = [[4, 1], [6, 1]]", "stages = [[4, 2], [6, 2]]"))
  skeletons = []  # the layers each run's skeleton initialisation used
  set_skeleton = gsgd_jax.set_skeleton

  def recording(params, layers, value=1.0):
    skeletons.append(layers)
    return set_skeleton(params, layers, value)

  monkeypatch.setattr(gsgd_jax, "set_skeleton", recording)
  results = train.run_experiment(config, tmp_path / "out", progress=False)
  assert [r["optimizer"] for r in results["runs"]] == ["SGD", "G-SGD"]
  model = train.make_model(config, {}, 10)
  chains = model.stage_chains()
  assert skeletons == [chains, chains]
  assert chains == [["conv0", "conv1"], ["conv2", "conv3"]]
  assert loop.gsgd_layers(model, None, declaration="stage_chains") == chains
  x = jnp.asarray(train.as_images(datasets.load_digits().x_train[:16]))
  variables = model.init(jax.random.key(0), x[:1])

  def apply(params, x):
    out, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
    )
    return out

  with pytest.raises(ValueError, match="conv"):
    gsgd_jax.verify_invariance(apply, variables["params"], chains, x)
  gsgd_jax.verify_invariance(apply, variables["params"], model.gsgd_blocks(), x)
  with pytest.raises(ValueError, match="applies to PlainNetBN"):
    loop.gsgd_layers(loop.ResNetBN(((4, 1),), 10), None, declaration="stage_chains")
  with pytest.raises(ValueError, match="stage chains are never normalized"):
    _config(tmp_path, text.replace("lr = 0.1\n", "lr = 0.1\nnormalized = false\n", 1))


def test_loss_curves_over_steps_are_recorded_and_plotted(tmp_path):
  config = _bn_config(tmp_path, "plainnet_bn", batch_size=16)
  results = train.run_experiment(config, tmp_path / "out", progress=False)
  for run in results["runs"]:
    (entry,) = run["history"]
    curve = entry["train_loss_curve"]  # 24 steps: the means of steps 1-10 and 11-20
    assert len(curve) == 384 // 16 // train.CURVE_STEPS == 2
    assert np.all(np.isfinite(curve)) and curve[0] != curve[1]
  written = train.plot(results, str(tmp_path / "out"))
  assert os.path.basename(written[1]) == "steps.png" and os.path.getsize(written[1]) > 0
  summary = train.summarize(results)
  assert "| optimizer | setting | step 10 |\n" in summary
  first_window = results["runs"][1]["history"][0]["train_loss_curve"][0]
  assert f"| G-SGD | - | {first_window:.3f} |" in summary  # one seed: its own curve
  # Epochs of 24 steps: the second epoch's points end on steps 34 and 44, not 30 and 40.
  history = [{"train_loss_curve": [1.0, 1.0], "steps": 24}] * 2
  np.testing.assert_array_equal(train._curve_steps(history), [10, 20, 34, 44])


@pytest.mark.parametrize(
  "old, new, message",
  [
    ("width = [8, 16]", "depth = [2, 3]", "a depth sweep needs model kind plainnet_bn"),
    ("lr = 0.1\n", 'lr = 0.1\ndeclaration = "stage_chains"\n', "needs model kind plainnet_bn"),
    ("lr = 0.1\n", 'lr = 0.1\ndeclaration = "chains"\n', "declaration 'chains'"),
    ("[sweep]", "[grid]\nper_point = 1\n\n[sweep]", "per_point is true or false"),
    ("lr = 0.1\n", "lr = 0.1\nnormalized = false\n", "normalized = false needs a BatchNorm"),
    ("lr = 0.1\n", "lr = 0.1\nlr_boundaries = [4, 2]\n", "lr_boundaries must be increasing"),
    ("seeds = [0]", 'seeds = [0]\naugment = "mixup"', "unknown augment 'mixup'"),
    ('kind = "mlp"', 'kind = "vgg"', "unknown model kind 'vgg'"),
  ],
)
def test_new_config_errors(tmp_path, old, new, message):
  with pytest.raises(ValueError, match=message):
    _config(tmp_path, SMALL.replace(old, new, 1))


def test_plainnet_bn_blocks_and_names():
  model = loop.PlainNetBN(((4, 2), (6, 1)), 10)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  assert set(variables) == {"params", "batch_stats"}
  assert list(variables["params"]) == ["conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "head"]
  assert "bias" not in variables["params"]["conv1"]
  # Stride 2 entering the second stage only: 8x8 -> 4x4.
  _, captured = model.apply(
    variables,
    np.zeros((2, 8, 8, 1), np.float32),
    train=False,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  outputs = captured["intermediates"]
  assert outputs["conv1"]["__call__"][0].shape == (2, 8, 8, 4)
  assert outputs["conv2"]["__call__"][0].shape == (2, 4, 4, 6)
  blocks = model.gsgd_blocks()
  assert [b.layers for b in blocks] == [
    (("conv0",),),
    (("bn0",), ("conv1",)),
    (("bn1",), ("conv2",)),
    (("bn2",), ("head",)),
  ]
  assert [b.normalized for b in blocks] == [True, True, True, False]


def test_resnet_bn_blocks():
  model = loop.ResNetBN(((4, 2), (6, 1)), 10)
  params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
  # A projection only where the stride or the width changes.
  assert "proj" not in params["stage0_block0"] and "proj" in params["stage1_block0"]
  assert [b.layers for b in model.gsgd_blocks()] == [
    (("stem",),),
    (("stage0_block0", "conv_a"),),
    (("stage0_block0", "bn_a"), ("stage0_block0", "conv_b")),
    (("stage0_block1", "conv_a"),),
    (("stage0_block1", "bn_a"), ("stage0_block1", "conv_b")),
    (("stage1_block0", "conv_a"),),
    (("stage1_block0", "bn_a"), ("stage1_block0", "conv_b")),
    (("stage1_block0", "proj"),),
  ]
  assert all(b.normalized for b in model.gsgd_blocks())


def test_batch_stats_train_and_evaluate():
  ds = datasets.load_digits()
  x, y = train.as_images(ds.x_train[:256]), ds.y_train[:256]
  model = loop.PlainNetBN(((4, 1), (6, 1)), ds.num_classes)
  params, state = loop.split_variables(model.init(jax.random.key(0), x[:1]))
  assert set(state) == {"batch_stats"}
  blocks = loop.gsgd_layers(model, params)
  params = gsgd_jax.set_skeleton(params, blocks)
  tx = gsgd_jax.gsgd(0.1, layers=blocks)
  history, variables = loop.train(
    "G-SGD",
    tx,
    model,
    params,
    (x, y),
    (x, y),
    epochs=2,
    batch_size=64,
    seed=0,
    progress=False,
    model_state=state,
  )
  assert set(variables) == {"params", "batch_stats"}
  # Every running mean and variance moved away from its initial value.
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, b), variables["batch_stats"], state["batch_stats"]
  )
  assert all(jax.tree.leaves(moved))
  # The reported accuracy is the evaluation-mode one (running averages), not batch statistics.
  logits = model.apply(variables, x, train=False)
  assert history[-1]["test_accuracy"] == float(np.mean(np.argmax(logits, -1) == y))
  stale = {"params": variables["params"], "batch_stats": state["batch_stats"]}
  assert not np.allclose(model.apply(stale, x, train=False), logits)


def test_depth_sweep_gives_one_result_per_depth(tmp_path):
  config = _bn_config(tmp_path, "plainnet_bn", tables="\n[sweep]\ndepth = [2, 3]\n")
  results = train.run_experiment(config, tmp_path / "out", progress=False)
  assert [(r["optimizer"], r["point"]) for r in results["runs"]] == [
    ("SGD", {"depth": 2}),
    ("SGD", {"depth": 3}),
    ("G-SGD", {"depth": 2}),
    ("G-SGD", {"depth": 3}),
  ]
  assert [row[0] for row in train.gap_table(results)] == [2, 3]
  summary = train.summarize(results)
  assert (
    "| depth | test accuracy gap | recalibrated test accuracy gap | train loss gap |" in summary
  )
  assert "| 3 | " in summary
  assert train.make_model(config, {"depth": 3}, 10).stages == ((4, 2), (6, 1))
  assert len(train.plot(results, str(tmp_path / "out"))) == 2


def test_sweep_flag_runs_the_values_given(tmp_path):
  _config(tmp_path)
  out = tmp_path / "out"
  argv = ["--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"]
  train.main([*argv, "--sweep", "16"])
  results = json.loads((out / "results.json").read_text())
  assert [r["point"] for r in results["runs"]] == [{"width": 16}, {"width": 16}]
  (tmp_path / "flat.toml").write_text(SMALL.replace("[sweep]\nwidth = [8, 16]\n", ""))
  with pytest.raises(SystemExit):
    train.main(["--config", str(tmp_path / "flat.toml"), "--out", str(out), "--sweep", "8"])


def test_sweep_flag_adds_points_where_each_chooses_its_rates(tmp_path):
  """With [grid] per_point, --sweep 16 and then the whole config in the same directory
  keep the first call's runs and choices; the summary covers every point."""
  text = SMALL.replace("lr = 0.1\n", "lr_grid = [0.01, 0.1]\n") + "\n[grid]\nper_point = true\n"
  (tmp_path / "c.toml").write_text(text)
  out = tmp_path / "out"
  argv = ["--config", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"]
  train.main([*argv, "--sweep", "16"])
  first = json.loads((out / "results.json").read_text())
  assert first["config"]["sweep"] == {"width": [16]}
  (tmp_path / "c.toml").write_text(text.replace('description = "test"', 'description = "new"'))
  train.main(argv)
  results = json.loads((out / "results.json").read_text())
  assert results["runs"][:2] == first["runs"]  # kept, not rerun
  assert [r["point"]["width"] for r in results["runs"]] == [16, 16, 8, 8]
  assert results["config"]["sweep"] == {"width": [8, 16]}
  assert set(results["lr_choices"]) == {
    f"{n} (width={w})" for n in ("SGD", "G-SGD") for w in (8, 16)
  }
  assert "| 8 | " in (out / "summary.md").read_text()


def test_compare_picks_the_gap_tables_optimizers(tmp_path):
  text = SMALL + '\n[[optimizers]]\nname = "Third"\nkind = "sgd"\nlr = 0.3\n'
  config = _config(
    tmp_path, text.replace("train_subset = 640", 'compare = ["Third", "G-SGD"]\ntrain_subset = 640')
  )
  assert train.compared(config) == ("Third", "G-SGD")
  assert train.compared(_config(tmp_path, text)) == ("SGD", "G-SGD")
  with pytest.raises(ValueError, match="compare names two optimizers"):
    _config(
      tmp_path, text.replace("train_subset = 640", 'compare = ["SGD", "Adam"]\ntrain_subset = 640')
    )


@pytest.mark.slow
def test_learning_rates_chosen_at_every_depth(tmp_path, monkeypatch):
  """[grid] per_point: each depth trains with the rate chosen on that depth's model."""
  tables = "\n[sweep]\ndepth = [2, 3]\n\n[grid]\nvalidation = 0.25\nper_point = true\n"
  text = BN_SMALL.replace("KIND", "plainnet_bn").replace("lr = 0.1\n", "lr_grid = [0.01, 1.0]\n")
  config = _config(tmp_path, text + tables)
  trained = []  # (optimizer, depth, lr, on the validation split?) of every run_one
  run_one = train.run_one

  def recording(config, opt, point, seed, lr, ds, train_xy, test_xy, **kw):
    trained.append((opt["name"], point["depth"], lr, len(test_xy[0]) < 100))
    return run_one(config, opt, point, seed, lr, ds, train_xy, test_xy, **kw)

  monkeypatch.setattr(train, "run_one", recording)
  results = train.run_experiment(config, tmp_path / "out", progress=False)
  choices = results["lr_choices"]
  assert list(choices) == ["SGD (depth=2)", "SGD (depth=3)", "G-SGD (depth=2)", "G-SGD (depth=3)"]
  for run in results["runs"]:
    assert run["lr"] == choices[f"{run['optimizer']} (depth={run['point']['depth']})"]["lr"]
  grids = [(name, depth, lr) for name, depth, lr, validation in trained if validation]
  assert grids == [(n, d, lr) for n in ("SGD", "G-SGD") for d in (2, 3) for lr in (0.01, 1.0)]
  assert "- G-SGD (depth=3): " in train.summarize(results)


def test_spread_depth():
  stages = ((16, 2), (32, 2), (64, 2))
  assert train.spread_depth(8, stages) == ((16, 3), (32, 3), (64, 2))
  assert train.spread_depth(20, stages) == ((16, 7), (32, 7), (64, 6))
  assert train.spread_depth(32, stages) == ((16, 11), (32, 11), (64, 10))
  with pytest.raises(ValueError, match="less than the 3 stages"):
    train.spread_depth(2, stages)


def test_crop_flip_is_deterministic_and_changes_images():
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 3))
  key = jax.random.key(0)
  a, b = loop.crop_flip(key, x), loop.crop_flip(key, x)
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, x) and not np.allclose(a, loop.crop_flip(jax.random.key(2), x))
  # Every output is a shifted, maybe mirrored crop of the zero-padded input.
  padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for image, out in zip(padded, np.asarray(a), strict=True):
    crops = [
      c[:, ::-1] if flip else c
      for i in range(9)
      for j in range(9)
      for c in [image[i : i + 8, j : j + 8]]
      for flip in (False, True)
    ]
    assert any(np.array_equal(out, c) for c in crops)
  # Keys depend on (seed, epoch) alone.
  keys = jax.random.key_data(loop.augmentation_keys(0, 1, 5))
  np.testing.assert_array_equal(keys, jax.random.key_data(loop.augmentation_keys(0, 1, 5)))
  assert not np.array_equal(keys, jax.random.key_data(loop.augmentation_keys(1, 1, 5)))


def test_augmented_training_is_deterministic_per_seed(tmp_path):
  config = _bn_config(tmp_path, "plainnet_bn", top='augment = "crop_flip"\n')
  config["optimizers"] = config["optimizers"][:1]
  a = train.run_experiment(config, tmp_path / "a", progress=False)
  b = train.run_experiment(config, tmp_path / "b", progress=False)
  config.pop("augment")
  plain = train.run_experiment(config, tmp_path / "c", progress=False)
  a, b, plain = (r["runs"][0]["history"][-1]["train_loss"] for r in (a, b, plain))
  assert a == b != plain


def test_piecewise_schedule():
  opt = {"lr_boundaries": [2, 4], "lr_factor": 0.1}
  schedule = train.make_schedule(opt, 1.0, steps_per_epoch=10)
  lrs = [float(schedule(np.int32(count))) for count in (0, 19, 20, 39, 40, 100)]
  np.testing.assert_allclose(lrs, [1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  both = train.make_schedule({**opt, "lr_decay": 0.5}, 1.0, steps_per_epoch=10)
  np.testing.assert_allclose(float(both(np.int32(25))), 0.1 * np.exp(-1.0), rtol=1e-6)
  assert train.make_schedule({}, 0.3, 10) == 0.3
  # The optimizer follows it: SGD's update is -lr * gradient.
  tx = train.make_optimizer({"kind": "sgd", **opt}, 1.0, [], steps_per_epoch=1)
  state, grads = tx.init({"w": np.ones(1)}), {"w": np.ones(1)}
  steps = []
  for _ in range(5):
    updates, state = tx.update(grads, state)
    steps.append(float(-updates["w"][0]))
  np.testing.assert_allclose(steps, [1.0, 1.0, 0.1, 0.1, 0.01], rtol=1e-6)


@pytest.mark.parametrize(
  "name, convs, blocks",
  [
    # PlainNet-34: 33 convolutions and the head; one block per BN-conv pair plus [conv0].
    ("cifar10_plainnet34_bn.toml", 33, 34),
    # ResNet-34: stem + 16 basic blocks of 2 convolutions + 3 projections; blocks: the stem,
    # conv_a and [BN_a, conv_b] per basic block, the projections.
    ("cifar10_resnet34_bn.toml", 36, 1 + 2 * 16 + 3),
  ],
)
def test_cifar_bn_configs_build_the_authors_models(name, convs, blocks):
  from pathlib import Path

  config = train.load_config(str(Path(__file__).parent.parent / "configs" / name), {})
  assert config["dataset"] == "cifar10" and config["augment"] == "crop_flip"
  assert (config["epochs"], config["batch_size"]) == (160, 128)
  for opt in config["optimizers"]:
    assert opt["lr"] == 1.0 and opt["lr_boundaries"] == [80, 120] and "momentum" not in opt
  model = train.make_model(config, {}, 10)
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  assert _conv_kernels(variables["params"]) == convs
  assert len(model.gsgd_blocks()) == blocks
  if isinstance(model, loop.ResNetBN):
    assert len([k for k in variables["params"] if k.startswith("stage")]) == 16
  assert variables["params"]["head"]["kernel"].shape == (512, 10)
  # The declared blocks fit the parameters (checked when the optimizer state is built).
  state = jax.eval_shape(gsgd_jax.gsgd(1.0, layers=model.gsgd_blocks()).init, variables["params"])
  assert jax.tree.leaves(state)


@pytest.mark.parametrize("name", ["fmnist_init_study.toml", "cifar10_init_study.toml"])
def test_init_studies_cross_every_initialisation_with_every_declaration(name):
  from pathlib import Path

  config = train.load_config(str(Path(__file__).parent.parent / "configs" / name), {})
  variants = [
    (o["kind"], o.get("declaration", "blocks"), o.get("skeleton_init", True))
    + ((True,) if o.get("implicit_decay") else ())
    for o in config["optimizers"]
  ]
  assert sorted(variants) == sorted(
    [
      ("sgd", "blocks", False),
      ("sgd", "blocks", True),
      ("sgd", "stage_chains", True),
      *((k, d, i) for k in ["gsgd"] for d in ["blocks", "stage_chains"] for i in [False, True]),
      ("gsgd", "blocks", True, True),  # with SGD's implicit decay
    ]
  )
  assert all(o["lr_grid"] == [0.1, 0.3, 1.0] for o in config["optimizers"])
  point = train.sweep_points(config)[-1]
  model = train.make_model(config, point, 10)
  shape = (1, 32, 32, 3) if config["dataset"] == "cifar10" else (1, 28, 28, 1)
  variables = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)
  )
  chains = loop.gsgd_layers(model, variables["params"], declaration="stage_chains")
  assert [len(c) for c in chains] == [n for _, n in model.stages]
  for layers in (chains, model.gsgd_blocks()):
    params = jax.eval_shape(
      functools.partial(gsgd_jax.set_skeleton, layers=layers), variables["params"]
    )
    assert jax.tree.leaves(jax.eval_shape(gsgd_jax.gsgd(1.0, layers=layers).init, params))


@pytest.mark.parametrize("kind", ["gsgd", "g_momentum"])
def test_the_implicit_decays_start_reaches_the_state(kind):
  model = train.make_model({"model": {"kind": "plainnet_bn", "stages": [[4, 2]]}}, {}, 3)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 1)))["params"]
  opt = {"kind": kind, "implicit_decay": True, "initial_rate_norm": 2.5}
  tx = train.make_optimizer(opt, 0.1, model.gsgd_blocks(), steps_per_epoch=1)
  rates = tx.init(jax.tree.map(jnp.ones_like, params)).rate_norms
  assert len(rates) == 2 and all(bool(jnp.all(r == 2.5)) for r in rates), rates


def test_recalibrated_accuracy_scores_the_weights_not_stale_statistics():
  """Statistics that no longer fit the weights (here: zero variance and a shifted mean)
  spoil evaluation mode; recalibrated, the accuracy is that of fresh statistics."""
  model = train.make_model({"model": {"kind": "plainnet_bn", "stages": [[4, 2]]}}, {}, 3)
  x = np.asarray(jax.random.uniform(jax.random.key(0), (96, 8, 8, 1), jnp.float32))
  y = np.arange(96) % 3
  variables = model.init(jax.random.key(1), x[:2])
  params, model_state = loop.split_variables(variables)
  order = np.random.default_rng([0, 999]).permutation(96)  # the batches it draws (seed 0)
  fresh = gsgd_jax.recalibrate_batch_stats(
    lambda s, xb: loop._updated_stats(model, params, s, xb),
    model_state,
    [x[order[i : i + 32]] for i in range(0, 96, 32)],
  )
  stale = jax.tree.map(lambda a: a + 5.0, model_state)
  got = loop.recalibrated_accuracy(model, params, stale, x, (x, y), batch_size=32, seed=0)
  assert got == loop.accuracy(model, params, x, y, model_state=fresh)
  assert got == loop.recalibrated_accuracy(
    model, params, model_state, x, (x, y), batch_size=32, seed=0
  )
