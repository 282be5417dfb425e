"""The speed benchmark's models and its end-to-end run (its timings are not tested)."""

import json

import numpy as np
import pytest

from benchmarks import speed
from gsgd_jax._src.structure import build_structure


@pytest.mark.parametrize(
  "name, kinds",
  [
    ("mlp-0.1M", ["dense"] * 3),
    ("plainnet-7", ["conv"] * 7 + ["dense"]),
    ("convflat-8M", ["conv", "flatten", "dense"]),
  ],
)
def test_models_declare_their_layers_and_probes_change_nothing(name, kinds):
  params, layers, forward, x, n_out, batch = speed.model_and_data(name, 4)
  blocks = build_structure(params, layers)
  assert [spec.kind for spec in blocks[0].layers] == kinds
  out = forward(params, layers, x)
  assert out.shape == (batch, n_out)
  np.testing.assert_allclose(forward(speed.with_probes(params, layers), layers, x), out)


def test_main_writes_a_ratio_for_every_optimizer(tmp_path):
  speed.main(
    [
      "--models",
      "mlp-0.1M",
      "--rounds",
      "1",
      "--min-seconds",
      "0",
      "--batch",
      "8",
      "--out",
      str(tmp_path),
    ]
  )
  (row,) = json.loads((tmp_path / "speed.json").read_text())["rows"]
  for kind in ("update", "step"):
    assert row[kind]["SGD"]["ratio"] == 1
    for opt in speed.OPTIMIZERS:
      assert np.isfinite(row[kind][opt]["ratio"]) and row[kind][opt]["ratio"] > 0
  assert "| mlp-0.1M |" in (tmp_path / "speed.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["relu", "llama"])
def test_transformer_speed_reports_step_compile_and_memory_ratios(tmp_path, model):
  from benchmarks import transformer_speed

  argv = f"--model {model} --depth 2 --dim 8 --hidden 16 --seq 4 --batch 2 --depths 2"
  argv += " --compile-repeats 2"
  transformer_speed.main(
    [*argv.split(), "--rounds", "1", "--min-seconds", "0", "--out", str(tmp_path)]
  )
  result = json.loads((tmp_path / "transformer_speed.json").read_text())
  assert np.isfinite(result["step_ratio"]) and result["step_ratio"] > 0
  assert len(result["compile_ratio"]) == 1 and result["compile_ratio"][0] > 0
  # The ratio is the median of the repeats' pairs, not a ratio of two bests.
  (adamw,), (path,) = (result["compile_s_per_repeat"][n] for n in transformer_speed.OPTIMIZERS)
  assert len(adamw) == len(path) == 2
  assert result["compile_ratio"][0] == pytest.approx(np.median(np.divide(path, adamw)))
  assert result["compile_s"]["AdamW"] == [min(adamw)]
  # The first repeat compiled AdamW first, the second path_space(AdamW).
  first = result["compile_ratio_by_order"]
  assert first["AdamW compiled first"] == pytest.approx(path[0] / adamw[0])
  assert first["path_space(AdamW) compiled first"] == pytest.approx(path[1] / adamw[1])
  assert set(result["temp_bytes"]) == set(transformer_speed.OPTIMIZERS)
  assert "| layers | compile AdamW s (best) |" in (tmp_path / "transformer_speed.md").read_text()


def test_transformer_speed_alternates_the_order_of_each_compile_pair(monkeypatch):
  from benchmarks import transformer_speed

  compiled = []

  def fake_compile(name, c):
    compiled.append((name, c.depth))
    return None, 1.0, None

  monkeypatch.setattr(transformer_speed, "compiled_step", fake_compile)
  times = transformer_speed.compile_times([2, 3], transformer_speed.Config(), repeats=3)
  adamw, path = transformer_speed.OPTIMIZERS
  pair = lambda first, second, depth: [(first, depth), (second, depth)]
  assert compiled == [
    *pair(adamw, path, 2),
    *pair(adamw, path, 3),
    *pair(path, adamw, 2),
    *pair(path, adamw, 3),
    *pair(adamw, path, 2),
    *pair(adamw, path, 3),
  ]
  assert times == {name: [[1.0] * 3, [1.0] * 3] for name in transformer_speed.OPTIMIZERS}


@pytest.mark.slow
def test_transformer_speed_per_block_reports_what_each_block_adds(tmp_path):
  from benchmarks import transformer_speed

  argv = "--model llama --depth 2 --dim 8 --hidden 16 --seq 4 --batch 2 --per-block"
  transformer_speed.main([*argv.split(), "--compile-repeats", "2", "--out", str(tmp_path)])
  result = json.loads((tmp_path / "transformer_speed_blocks.json").read_text())
  assert result["blocks"] == ["none (AdamW)", "[up, down]", "[value, out]", "[query, key]"]
  times = np.asarray(result["compile_s_per_repeat"])  # [repeat][variant]
  assert times.shape == (2, 4) and result["compile_s"] == pytest.approx(times.min(axis=0))
  assert result["compile_ratio"] == pytest.approx(np.median(times / times[:, :1], axis=0))
  # Each block adds fused computations of its own to the compiled step, and code.
  assert np.all(np.diff(result["fusions"]) > 0), result["fusions"]
  assert np.all(np.diff(result["llvm_ir_lines"]) > 0), result["llvm_ir_lines"]
  assert np.all(np.diff(result["llvm_kernels"]) >= 0), result["llvm_kernels"]


@pytest.mark.slow
def test_compile_ab_compiles_another_revision_beside_the_working_tree(tmp_path):
  import gsgd_jax
  from benchmarks import compile_ab

  other = compile_ab.package_at("HEAD", str(tmp_path / "package"))
  assert other.__name__.startswith("gsgd_jax_at_") and other.path_space is not gsgd_jax.path_space
  blocks = compile_ab.declared(compile_ab.ts.LLAMA_BLOCKS, other)
  assert [repr(b) for b in blocks] == [repr(b) for b in compile_ab.ts.LLAMA_BLOCKS]
  assert all(isinstance(b, other.Block) for b in blocks)

  argv = "--against HEAD --depth 2 --dim 8 --hidden 16 --seq 4 --batch 2 --repeats 2"
  compile_ab.main([*argv.split(), "--out", str(tmp_path)])
  result = json.loads((tmp_path / "compile_ab.json").read_text())
  seconds = result["compile_s_per_repeat"]
  assert set(seconds) == {"AdamW", *compile_ab.VERSIONS}
  assert all(len(s) == 2 and min(s) > 0 for s in seconds.values())
  ratios = {n: np.median(np.divide(seconds[n], seconds["AdamW"])) for n in compile_ab.VERSIONS}
  assert result["compile_ratio"] == pytest.approx(ratios)
  between = np.divide(*(seconds[n] for n in reversed(compile_ab.VERSIONS)))
  assert result["working_tree_over_against_geometric_mean"] == pytest.approx(
    np.exp(np.mean(np.log(between)))
  )
  # Round 0 compiled the working tree after the other revision, round 1 before it.
  assert result["working_tree_over_against_by_order"] == pytest.approx(
    {"working tree compiled second": between[0], "working tree compiled first": between[1]}
  )
  assert all(result["llvm_ir_lines"][n] > result["llvm_ir_lines"]["AdamW"] for n in ratios)
