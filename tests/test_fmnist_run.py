"""`make run`'s script end to end on a tiny IDX dataset written by the test."""

import json

from test_data import write_dataset

from benchmarks import fmnist


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
