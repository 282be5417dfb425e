"""Implementation modules of gsgd_jax; the public API is re-exported by ``gsgd_jax``."""
