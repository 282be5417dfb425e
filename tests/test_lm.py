"""The language-model experiment (benchmarks/lm.py) on tiny settings: its text splits, its
runs and report, and its rescaling comparison."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsgd_jax
from benchmarks import lm

TINY = {
  "seeds": [0, 1],
  "skeleton_init": True,
  "model": {"dim": 8, "heads": 2, "hidden": 16, "depth": 2},
  "training": {
    "steps": 4, "batch": 2, "seq": 8, "curve_every": 2, "eval_every": 2, "eval_windows": 2,
  },
  "optimizers": [
    {"name": "AdamW", "kind": "adamw", "weight_decay": 0.01, "warmup": 1, "lr_grid": [1e-3, 1e-2]},
    {"name": "Path AdamW", "kind": "path_adamw", "warmup": 1, "lr_grid": [1e-2]},
    {"name": "Muon", "kind": "muon", "lr_grid": [1e-2]},
  ],
}  # fmt: skip


@pytest.fixture
def text_root(tmp_path):
  """Twenty small 'modules' and a test package the split leaves out."""
  for i in range(20):
    (tmp_path / f"module_{i:02d}.py").write_text(f"def f{i}(x):\n  return x * {i}\n" * 8)
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "test_x.py").write_text("assert True\n")
  return tmp_path


def test_text_is_split_by_file_and_leaves_test_packages_out(text_root):
  files = lm.stdlib_files(text_root)
  assert len(files) == 20 and all("test" not in f.parts for f in files)
  text = lm.load_text(text_root)
  sizes = {name: len(b) for name, b in text.items()}
  # Files 0 and 10 are validation, 5 and 15 test, the other sixteen training (joined by
  # newlines).
  size = lambda indices: sum(len(files[i].read_bytes()) for i in indices) + len(indices) - 1
  assert sizes["validation"] == size([0, 10]) and sizes["test"] == size([5, 15])
  assert sizes["train"] == size([i for i in range(20) if i % 5])
  assert bytes(text["validation"][: len(files[0].read_bytes())]) == files[0].read_bytes()


@pytest.mark.slow
def test_the_experiment_runs_reports_and_shares_its_starts(text_root, tmp_path):
  config = {**TINY, "text_root": str(text_root)}
  out = tmp_path / "out"
  results = lm.run_experiment(config, str(out), progress=False)
  opts = results["optimizers"]
  assert list(opts) == ["AdamW", "Path AdamW", "Muon"]
  assert set(opts["AdamW"]["grid"]) == {"0.001", "0.01"}
  for o in opts.values():
    assert len(o["runs"]) == 2 and all(r["finite"] for r in o["runs"])
    assert len(o["runs"][0]["train_curve"]) == 2
    assert [s for s, _ in o["runs"][0]["validation_curve"]] == [2, 4]
  # Same seed, same start and batches: the first half-curve before any step differs only by
  # the optimizers' first steps, so the seeds' losses are not all equal across seeds.
  assert opts["AdamW"]["runs"][0]["train_curve"] != opts["AdamW"]["runs"][1]["train_curve"]
  saved = json.loads((out / "results.json").read_text())
  assert saved["bytes"]["train"] > 0
  summary = (out / "summary.md").read_text()
  assert "| Path AdamW |" in summary and "Path AdamW − AdamW, test loss" in summary
  assert (out / "curves.png").stat().st_size > 0


def test_the_invariance_comparison_separates_path_space_from_adamw(text_root):
  config = {**TINY, "text_root": str(text_root)}
  gaps = lm.invariance(config, steps=3, dtype=jnp.float64)
  assert gaps["path_space(AdamW)"]["logit_gap"] < 1e-9, gaps
  assert gaps["AdamW"]["logit_gap"] > 1e-4, gaps


def test_the_decoder_blocks_are_the_llama_layouts():
  model = lm.Decoder(8, 2, 16, 2)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert gsgd_jax.infer_blocks(params, "llama") == [
    gsgd_jax.Block(["layers/mlp/up_proj", "layers/mlp/down_proj"], stack_axis=0),
    gsgd_jax.Block(["layers/self_attn/v_proj", "layers/self_attn/o_proj"], stack_axis=0),
  ]
  assert np.shape(params["layers"]["mlp"]["up_proj"]["kernel"]) == (2, 8, 16)


def test_the_config_builds_its_decoder_and_blocks():
  import tomllib
  from pathlib import Path

  path = Path(__file__).parent.parent / "configs" / "lm" / "stdlib_llama.toml"
  config = tomllib.loads(path.read_text())
  assert [o["kind"] for o in config["optimizers"]] == list(lm.OPTIMIZER_KINDS)
  m = config["model"]
  model = lm.make_model(config)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  blocks = lm.decoder_blocks(config, params)
  # Per layer (stacked): the gated block, the query-key chain with RoPE's halves, the values.
  assert len(blocks) == 3 and all(b.stack_axis == 0 for b in blocks)
  assert (
    blocks[1].readings[1]
    == gsgd_jax.Layer(
      "k", input_axes=1, transposed=True, pairs="half", head_dim=m["dim"] // m["heads"]
    ).reading
  )
