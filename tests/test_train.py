"""The experiment runner: outputs, determinism, resuming, learning-rate grid, CIFAR batches."""

import json
import pickle

import numpy as np
import pytest

from benchmarks import data as datasets
from benchmarks import train

SMALL = """
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

[[optimizers]]
name = "SGD"
kind = "sgd"
lr = 0.1

[[optimizers]]
name = "G-SGD"
kind = "gsgd"
lr = 0.1
"""


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
  # Changed settings start afresh.
  fresh = train.run_experiment(_config(tmp_path, epochs=1), out, progress=False)
  assert len(fresh["runs"]) == 4 and all(len(r["history"]) == 1 for r in fresh["runs"])


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
  assert len(configs) >= 6
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
