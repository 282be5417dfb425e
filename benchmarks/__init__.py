"""Experiment scripts and their dataset loading for gsgd_jax."""
