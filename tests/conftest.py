"""Test session set-up: four simulated CPU devices, so data parallelism is exercised here."""

import os

# Must happen before JAX creates its CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
