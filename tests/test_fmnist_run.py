"""`make run`'s script end to end on a tiny IDX dataset written by the test."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import write_dataset

from benchmarks import data, fmnist

ROOT = Path(__file__).parent.parent


def test_run_trains_both_optimizers_and_writes_results(tmp_path, capsys):
  write_dataset(tmp_path, n_train=96, n_test=20, side=6)
  out = tmp_path / "results.json"
  fmnist.main(
    [
      "--data-dir",
      str(tmp_path),
      "--epochs",
      "2",
      "--widths",
      "8,8",
      "--batch-size",
      "16",
      "--json",
      str(out),
    ]
  )
  printed = capsys.readouterr().out
  assert "| SGD |" in printed and "| G-SGD |" in printed
  results = json.loads(out.read_text())
  assert results["args"]["widths"] == "8,8"
  for name in ("SGD", "G-SGD"):
    history = results["results"][name]
    assert len(history) == 2
    assert all(0 <= h["test_accuracy"] <= 1 and h["train_loss"] > 0 for h in history)
  assert results["results"]["G-SGD"][-1]["clipped_ratios"] >= 0


def test_config_file_sets_defaults_and_flags_override(tmp_path):
  config = tmp_path / "c.toml"
  config.write_text("epochs = 3\nwidths = [16, 4]\nlr = 0.2\n")
  args = fmnist.parse_args(["--config", str(config), "--lr", "0.5"])
  assert (args.epochs, args.widths, args.lr) == (3, "16,4", 0.5)
  config.write_text("epoch = 3\n")
  try:
    fmnist.parse_args(["--config", str(config)])
  except SystemExit as err:
    assert err.code == 2
  else:
    raise AssertionError("an unknown config key must be refused")


_ROW = re.compile(r"^\| (SGD|G-SGD) \| ([0-9.]+) \| ([0-9.]+) \|", re.M)


@pytest.mark.slow
def test_readme_table_is_what_make_run_prints():
  """The README quotes `make run`'s table, and the run is deterministic: its accuracy and
  loss columns must be what the command prints now (seconds per epoch vary by machine)."""
  assert data.find_idx_dir(data.FASHION_MNIST_DIR), (
    "Fashion-MNIST is missing: `make test-all` installs Debian's dataset-fashion-mnist"
  )
  # As `make run` runs it: XLA's default flags, not the suite's fast-compile ones.
  env = {**os.environ, "XLA_FLAGS": ""}
  printed = subprocess.run(
    [sys.executable, "-m", "benchmarks.fmnist"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert len(_ROW.findall(printed)) == 2
  for page in ("README.md", "docs/results.md"):
    assert _ROW.findall((ROOT / page).read_text()) == _ROW.findall(printed), (page, printed)
