"""Sphinx configuration of the gsgd_jax site (`make docs` builds it into site/)."""

import importlib.metadata

project = "gsgd_jax"
author = "The gsgd_jax authors"
copyright = "2026, The gsgd_jax authors"
release = importlib.metadata.version("gsgd_jax")
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  # MathJax from the built site's _static/mathjax (a registry package), not from a CDN:
  # the site renders its formulas offline (checked by tests/test_docs.py).
  "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Formulas: $...$, $$...$$ and amsmath environments in the Markdown pages.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # `page.md#heading` links resolve to the heading's anchor

# The docstrings are Google style (Args:, Returns:, Raises:, Example:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# No intersphinx: the build runs without network. Types that belong to other
# projects cannot resolve here; only those are ignored. Every gsgd_jax name
# must resolve (`make docs` runs with -n and -W).
nitpick_ignore_regex = [
  ("py:.*", r"(jax|jaxlib|optax|flax|nnx|nn|numpy|np|chex)(\..*)?"),
  ("py:.*", r"(typing|collections\.abc|types)\..*"),
  ("py:.*", r"(Any|Callable|Sequence|Hashable|NamedTuple|TypeAlias|Iterable)"),
]

html_theme = "furo"
html_title = f"gsgd_jax {release}"
html_static_path = ["_static"]
# The page contents stay in view at 1280 px (Furo hides them below 1312 px).
html_css_files = ["layout.css"]

# Signatures keep the names of type aliases instead of spelling them out;
# `gsgd_jax.LayerPaths` is documented on the API page.
autodoc_type_aliases = {
  "LayerPaths": "~gsgd_jax.LayerPaths",
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
  "optax.Params": "optax.Params",
  "optax.OptState": "optax.OptState",
}
# Summary tables only: every entry is documented on its topic's page.
autosummary_generate = False
