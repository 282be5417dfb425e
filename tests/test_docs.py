"""The examples in docstrings, the README and docs/ run and do what they say; so does the
script behind the README's picture.

Every ```python block of README.md and docs/*.md runs: the blocks of a page run in order in one
namespace, as one script, and the tests below check what the text around them claims. A block
that is not meant to run says so: a ```text or ```sh block, or ```python notest. ``PAGES`` counts
each page's blocks, so that a page cannot lose an example without a test noticing.
"""

import ast
import doctest
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from gsgd_jax import probes
from gsgd_jax._src import (
  alias,
  declaration,
  infer,
  layouts,
  path_norm,
  rescaling,
  skeleton,
  transform,
  validate,
)

ROOT = Path(__file__).parent.parent

# Runnable ```python blocks per page (none is marked notest today).
PAGES = {
  "README.md": 1,
  "docs/index.md": 1,
  "docs/getting_started.md": 0,
  "docs/examples.md": 0,
  "docs/glossary.md": 0,
  "docs/api/optimizers.md": 0,
  "docs/api/path_sgd.md": 0,
  "docs/api/declaring.md": 0,
  "docs/api/skeleton.md": 0,
  "docs/api/checks.md": 0,
  "docs/api/probes.md": 0,
  "docs/guide.md": 21,
  "docs/probes.md": 1,
  "docs/math.md": 0,
  "docs/troubleshooting.md": 0,
  "docs/api.md": 0,
  "docs/results.md": 0,
}
# Fences a page may use besides ```python: shell commands, program output, MyST directives.
OTHER_FENCES = {"sh", "text", "{toctree}", "{eval-rst}", "{include}", "{literalinclude}"}
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)


def _fences(page: str) -> list[tuple[str, str]]:
  """``(info string, body)`` of every fenced block of a page, in order."""
  return [(info.strip(), body) for info, body in _FENCE.findall((ROOT / page).read_text())]


def _python_blocks(page: str) -> list[str]:
  return [body for info, body in _fences(page) if info == "python"]


def _run_blocks(page: str, blocks: list[str], where: str) -> dict:
  """Runs ``blocks`` of ``page`` in order in one fresh namespace; returns the namespace.
  ``where`` names them in tracebacks."""
  ns: dict = {"__name__": f"docs_{Path(page).stem}"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{where} (python block {i})", "exec"), ns)
  return ns


def _run_page(page: str) -> dict:
  """Runs a page's Python blocks in order in one namespace, as one script."""
  return _run_blocks(page, _python_blocks(page), page)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _max_abs_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float64) - jnp.asarray(y, jnp.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# ---------------------------------------------------------------------------------------------
# Docstrings.


@pytest.mark.parametrize(
  "module, examples",
  [
    (transform, 20),
    (alias, 53),
    (path_norm, 16),
    (probes, 25),
    (infer, 9),
    (layouts, 11),
    (declaration, 5),
    (validate, 15),
    (skeleton, 9),
    (rescaling, 13),
  ],
  ids=lambda m: getattr(m, "__name__", ""),
)
def test_docstring_examples(module, examples):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= examples and result.failed == 0


# Public names without an example of their own: a module, a state container (the example of
# path_space prints its counter) and a constant.
# A module, a state type, a type alias and a constant: nothing to call, so no example.
_NO_EXAMPLE = {"probes", "PathSpaceState", "LayerPaths", "PROBE"}
_PUBLIC = sorted(
  {f"gsgd_jax.{name}" for name in gsgd_jax.__all__ if name not in _NO_EXAMPLE}
  | {f"gsgd_jax.probes.{name}" for name in probes.__all__ if name not in _NO_EXAMPLE}
)


def _public(qualified: str):
  module, name = qualified.rsplit(".", 1)
  return getattr(gsgd_jax if module == "gsgd_jax" else probes, name)


@pytest.mark.parametrize("name", _PUBLIC)
def test_public_examples_print_checked_values(name):
  doc = _public(name).__doc__
  assert "Example:" in doc, name
  examples = doctest.DocTestParser().get_examples(doc)
  # At least one example shows its output, which doctest then compares.
  assert any(example.want.strip() for example in examples), name


@pytest.mark.parametrize(
  "name",
  [
    "path_space",
    "gsgd",
    "g_momentum",
    "g_adam",
    "g_adamw",
    "g_rmsprop",
    "path_sgd",
    "scale_by_path_norm",
  ],
)
def test_public_docstrings_follow_optax_style(name):
  doc = getattr(gsgd_jax, name).__doc__
  summary = doc.strip().splitlines()[0]
  assert summary.endswith(".") and len(summary) < 90
  for section in ("Args:", "Returns:", ".. math::", "Example:"):
    assert section in doc, (name, section)
  if name != "scale_by_path_norm":
    assert "References:" in doc, name


# ---------------------------------------------------------------------------------------------
# Pages.


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_keep_their_examples(page):
  fences = _fences(page)
  assert sum(info == "python" for info, _ in fences) == PAGES[page]
  # Anything else is explicitly not Python to run (a ```py or ```python3 block would escape).
  others = {info for info, _ in fences if info != "python"}
  assert all(info == "python notest" or info.split()[0] in OTHER_FENCES for info in others), others


def test_every_page_is_counted():
  pages = {"README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))}
  assert pages == set(PAGES)


# The site shows about 90 columns of code at 1280 pixels; longer lines scroll sideways.
CODE_COLUMNS = 88


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_code_fits_the_site(page):
  long = [line for _, body in _fences(page) for line in body.splitlines()]
  assert [line for line in long if len(line) > CODE_COLUMNS] == []


def test_docstring_examples_fit_the_site():
  # A docstring's example lines, as the API pages show them (its indentation removed).
  long = []
  for path in sorted((ROOT / "gsgd_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
        doc = ast.get_docstring(node) or ""
        for example in doctest.DocTestParser().get_examples(doc):
          # As the page shows them: the source after its '>>> ' or '... ' prompt, then
          # the output, both at the example's indentation.
          shown = [*(f">>> {line}" for line in example.source.splitlines())]
          shown += example.want.splitlines()
          long += [
            f"{path.name}: {line}" for line in shown if example.indent + len(line) > CODE_COLUMNS
          ]
  assert long == []


def test_readme_quick_start_trains():
  ns = _run_page("README.md")
  layers = ns["layers"]
  assert layers == [("params", "layers_0"), ("params", "layers_2"), ("params", "layers_4")]
  # The page's own loop ran its five steps, and the loss it printed fell.
  assert ns["i"] == 4 and bool(jnp.isfinite(ns["value"]))
  first = optax.softmax_cross_entropy_with_integer_labels(
    ns["model"].apply(
      gsgd_jax.set_skeleton(ns["model"].init(jax.random.key(0), ns["x"]), layers), ns["x"]
    ),
    ns["y"],
  ).mean()
  assert float(ns["value"]) < float(first)
  # The train step runs, and moves the params, with both transformations the block defines.
  for tx in (gsgd_jax.gsgd(0.1, layers=layers), ns["tx"]):
    ns["tx"] = tx
    x, y = jnp.ones((4, 784)), jnp.arange(4)
    params, _, _ = ns["step"](ns["params"], tx.init(ns["params"]), x, y)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert _max_abs_diff(params, ns["params"]) > 0


def _sections(page: str) -> dict[str, list[str]]:
  """The Python blocks of each ``##`` section of a page (``###`` parts stay in theirs)."""
  sections: dict[str, list[str]] = {}
  for part in re.split(r"^## ", (ROOT / page).read_text(), flags=re.M)[1:]:
    title, _, text = part.partition("\n")
    sections[title.strip()] = [
      body for info, body in _FENCE.findall(text) if info.strip() == "python"
    ]
  return sections


def _run_section(page: str, title: str) -> dict:
  """Runs one section's Python blocks alone, as a reader copying that section would."""
  return _run_blocks(page, _sections(page)[title], f"{page}, {title!r}")


def _guide_checks():
  """What each guide section's text claims, checked on that section's own namespace
  (``None``: the section asserts its claims itself)."""
  return {
    "Declaring the layers": _check_declaration_and_training,
    "Blocks": _check_resnet_blocks_are_invariant,
    "Normalization layers": _check_normalization_layers,
    "Stacked layers and scanned transformers": _check_scanned_transformer,
    "Gated feed-forward blocks and attention": None,
    "The fallback and `optax.partition`": _check_fallback_and_partition,
    "Other optimizers": _check_optimizers_are_invariant_and_adam_on_weights_is_not,
    "JAX and Flax around it": _check_ecosystem,
  }


def test_every_guide_section_with_code_is_checked():
  sections = _sections("docs/guide.md")
  with_code = {title for title, blocks in sections.items() if blocks}
  assert with_code == set(_guide_checks())
  # Every block belongs to one section (none before the first heading, no title twice).
  assert sum(len(blocks) for blocks in sections.values()) == PAGES["docs/guide.md"]


def test_landing_page_code_runs():
  ns = _run_page("docs/index.md")
  assert ns["layers"] == [("params", "layers_0"), ("params", "layers_2"), ("params", "layers_4")]
  # The transformation it ends with takes a step from the state it built.
  grads = jax.tree.map(jnp.ones_like, ns["params"])
  updates, _ = ns["tx"].update(grads, ns["state"], ns["params"])
  assert _max_abs_diff(updates, jax.tree.map(jnp.zeros_like, updates)) > 0


def test_getting_started_shows_the_readme_quick_start():
  # The page includes the README's quick start (run by test_readme_quick_start_trains)
  # between two markers that must stay in the README.
  page = (ROOT / "docs/getting_started.md").read_text()
  readme = (ROOT / "README.md").read_text()
  for marker in ("<!-- quick-start -->", "<!-- /quick-start -->"):
    assert marker in page and readme.count(marker) == 1
  quoted = readme.split("<!-- quick-start -->")[1].split("<!-- /quick-start -->")[0]
  assert quoted.count("```python") == 1


# The slowest section (a BatchNorm ResNet and PlainNet, compiled several times) runs in
# `make test-all` only.
_SLOW_SECTIONS = {"Normalization layers"}


@pytest.mark.parametrize(
  "title",
  [
    pytest.param(title, marks=pytest.mark.slow) if title in _SLOW_SECTIONS else title
    for title, blocks in _sections("docs/guide.md").items()
    if blocks
  ],
)
def test_guide_section_runs_alone(title):
  # Each section runs in a namespace of its own: its first block imports and builds
  # everything it uses.
  section = _run_section("docs/guide.md", title)
  check = _guide_checks()[title]
  if check is not None:
    check(section)


def _check_normalization_layers(guide):
  assert bool(jnp.isfinite(guide["bn_loss"]))
  # Recalibration re-estimated the running statistics for the final weights.
  stale, fresh = guide["batch_stats"], guide["fresh_stats"]
  assert jax.tree.structure(fresh) == jax.tree.structure(stale)
  assert _max_abs_diff(fresh, stale) > 0
  assert bool(jnp.all(jnp.isfinite(guide["eval_logits"])))
  # The PlainNet's and the feed-forward block's optimizers take a step.
  for params, tx in (
    (guide["plain_params"], guide["plain_tx"]),
    (guide["ff_params"], guide["ff_tx"]),
  ):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def _check_scanned_transformer(guide):
  losses = guide["lm_losses"]
  assert losses[-1] < 0.9 * losses[0], losses
  layers = guide["lm_params"]["params"]["layers"]
  # The stacked LN scales in front of fc1 are skeleton edges (F): never moved, in any copy.
  np.testing.assert_array_equal(layers["ln_ff"]["scale"], 1.0)
  assert layers["ln_ff"]["scale"].shape == (3, 16)
  # AdamW (the fallback) moved the attention's norm.
  assert not np.allclose(layers["ln_attn"]["scale"], 1.0)


def _check_declaration_and_training(guide):
  layers = guide["layers"]
  assert layers == [("params", "layers_0"), ("params", "layers_2"), ("params", "layers_4")]
  # The 'a/b' strings the text calls the same chain are.
  same = ["params/layers_0", "params/layers_2", "params/layers_4"]
  params = guide["params"]
  values = [gsgd_jax.basis_path_values(params, declared) for declared in (same, layers)]
  assert _max_abs_diff(*values) == 0
  assert guide["loss"](guide["trained"]) < guide["loss"](params)


def _check_resnet_blocks_are_invariant(guide):
  model, params, blocks, tx = (
    guide["resnet"],
    guide["resnet_params"],
    guide["blocks"],
    guide["resnet_tx"],
  )
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float32)
  y = jnp.arange(4)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(2))
  np.testing.assert_allclose(model.apply(rescaled, x), model.apply(params, x), rtol=1e-4, atol=1e-5)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  runs = []
  for start in (params, rescaled):
    p, state = start, tx.init(start)
    for _ in range(5):
      p, state = step(p, state)
    runs.append(p)
  np.testing.assert_allclose(model.apply(runs[0], x), model.apply(runs[1], x), rtol=1e-3, atol=1e-4)
  # The stem is outside the blocks: plain SGD moved it identically in both runs.
  np.testing.assert_allclose(
    runs[0]["params"]["stem"]["kernel"], runs[1]["params"]["stem"]["kernel"], rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(runs[0]["params"]["stem"]["kernel"], params["params"]["stem"]["kernel"])


def _check_fallback_and_partition(guide):
  labels = guide["labels"]["params"]
  assert labels["layers_4"] == {"bias": "rest", "kernel": "rest"}
  assert labels["layers_0"] == {"bias": "path", "kernel": "path"}
  params = guide["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  for name in ("with_adam", "frozen", "partitioned"):
    tx = guide[name]
    updates, _ = tx.update(grads, tx.init(params), params)
    readout = updates["params"]["layers_4"]["kernel"]
    if name == "frozen":
      assert not np.any(readout)
    else:  # Adam's first step on the fallback: lr times the sign
      np.testing.assert_allclose(np.abs(readout), 1e-3, rtol=1e-4)
    # The declared chain moved.
    assert np.any(updates["params"]["layers_0"]["kernel"])


def _check_optimizers_are_invariant_and_adam_on_weights_is_not(guide):
  scale = float(jnp.max(jnp.abs(guide["model"].apply(guide["params"], guide["x"]))))
  for name, gap in guide["gaps"].items():
    if name == "adam on weights":
      assert gap > 1e-2 * scale, (name, gap)
    else:  # float32 params: rounding only
      assert gap < 1e-4 * scale, (name, gap)
  assert guide["gap"](guide["clip_paths"]) < 1e-4 * scale
  assert guide["gap"](guide["clip_weights"]) > 1e-2 * scale


def _check_ecosystem(guide):
  losses = np.asarray(guide["losses"])
  assert losses.shape == (10,) and losses[-1] < losses[0]
  assert float(guide["opt_state"].hyperparams["learning_rate"]) == 0.05
  trained = guide["train"](gsgd_jax.gsgd(0.1, layers=guide["layers"]), guide["params"])
  _assert_trees_close(guide["scanned"], trained)
  # MultiSteps applies one step every 4 calls.
  accumulated, params = guide["accumulated"], guide["params"]
  grads = jax.grad(guide["loss"])(params)
  state = accumulated.init(params)
  for call in range(4):
    updates, state = accumulated.update(grads, state, params)
    assert (_max_abs_diff(updates, jax.tree.map(jnp.zeros_like, updates)) > 0) == (call == 3)
  # Sharded training gives the single-device result.
  _assert_trees_close(guide["sharded_trained"], trained)
  # The checkpoint came back whole.
  assert _max_abs_diff(guide["restored"], guide["checkpoint"]) == 0
  assert jax.tree.structure(guide["restored"]) == jax.tree.structure(guide["checkpoint"])
  _check_nnx_trains_and_keeps_the_fixed_set(guide)


def _check_nnx_trains_and_keeps_the_fixed_set(guide):
  from flax import nnx

  model, layers = guide["nnx_model"], guide["nnx_layers"]
  assert layers == [("layers", 0), ("layers", 1)]
  state = nnx.state(model, nnx.Param)
  fixed = gsgd_jax.skeleton_mask(state, layers)
  # One step was taken, and the fixed set kept the value set_skeleton gave it.
  assert int(guide["optimizer"].step[...]) == 1
  kernel = np.asarray(model.layers[0].kernel[...])
  np.testing.assert_array_equal(kernel[np.asarray(fixed["layers"][0]["kernel"])], 1.0)


def test_probes_page_matches_plain_gsgd():
  ns = _run_page("docs/probes.md")
  params, tx, loss = ns["params"], ns["tx"], ns["loss"]
  assert all("scale_probe" in params["params"][name] for name in ("layers_0", "layers_2"))
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  strip = lambda t: {
    "params": {
      n: {k: v for k, v in layer.items() if k != "scale_probe"} for n, layer in t["params"].items()
    }
  }
  plain, _ = tx.update(strip(grads), tx.init(strip(params)), strip(params))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), strip(updates), plain
  )


# ---------------------------------------------------------------------------------------------
# The troubleshooting tables quote the library's own messages.


def _library_messages() -> list[str]:
  """Every string the library builds, f-strings with ``{}`` where a value goes."""
  messages = []
  for path in sorted((ROOT / "gsgd_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.JoinedStr):
        messages.append(
          "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        )
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        messages.append(node.value)
  return messages


def _quoted_messages() -> list[str]:
  """The code spans in the first column of the troubleshooting tables."""
  quoted = []
  for line in (ROOT / "docs/troubleshooting.md").read_text().splitlines():
    if not line.startswith("| ") or line.startswith("| message"):
      continue
    first_column = line.split(" | ")[0]
    spans = [span.strip() for _, span in re.findall(r"(`+)(.+?)\1", first_column)]
    quoted += [span for span in spans if " " in span]  # not `init`, `verify_probes`, ...
  return quoted


def test_troubleshooting_quotes_real_messages():
  messages = _library_messages()
  quoted = _quoted_messages()
  assert len(quoted) >= 39
  for text in quoted:
    # `…` stands for what varies; every literal piece must be in one of the library's strings.
    for piece in (p.strip(" '") for p in text.split("…")):
      if len(piece) >= 4:
        assert any(piece in message for message in messages), (text, piece)


# ---------------------------------------------------------------------------------------------
# The README's picture.


def test_invariance_plot_script_runs(tmp_path, capsys):
  from benchmarks import invariance_plot

  out = tmp_path / "invariance.png"
  invariance_plot.main(["--out", str(out), "--steps", "30", "--widths", "16,16"])
  assert out.stat().st_size > 0
  printed = capsys.readouterr().out
  gaps = dict(re.findall(r"(\S+): final loss .* between the two runs (\S+)", printed))
  assert float(gaps["G-SGD"]) < 1e-3 < float(gaps["SGD"]), printed


# ---------------------------------------------------------------------------------------------
# The site works offline.


def test_the_built_site_loads_nothing_from_the_network(tmp_path):
  """Built as `make docs` builds it, the site loads its scripts, styles and MathJax (with its
  fonts) from its own files: no page refers to a script or stylesheet elsewhere."""
  import subprocess
  import sys

  out = tmp_path / "site"
  flags = ["-E", "-W", "-n", "--keep-going", "-q", "-b", "html"]  # the Makefile's
  subprocess.run([sys.executable, "-m", "sphinx", *flags, str(ROOT / "docs"), str(out)], check=True)
  pages = sorted(out.rglob("*.html"))
  assert len(pages) >= 14
  external = re.compile(r'<(?:script|link)[^>]*(?:src|href)="(?:https?:)?//[^"]*"')
  for page in pages:
    html = page.read_text()
    assert not external.findall(html), (page.name, external.findall(html))
  # Every page loads the stylesheet that keeps its contents in view at 1280 pixels.
  layout = re.compile(r'href="(\.\./)*_static/layout\.css')
  assert all(layout.search(page.read_text()) for page in pages if "_static" not in page.parts)
  math = (out / "math.html").read_text()
  assert 'src="_static/mathjax/tex-chtml.js"' in math
  assert (out / "_static" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000
  assert list((out / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_hold_no_control_characters(page):
  # A formula written into a page from a Python string without a raw prefix loses its
  # backslashes to escapes: \top to a tab, \beta to a backspace, \frac to a form feed.
  text = (ROOT / page).read_text()
  assert [c for c in text if ord(c) < 32 and c != "\n"] == []
