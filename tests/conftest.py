"""Test session set-up: four simulated CPU devices, so data parallelism is exercised here, and
the fixtures several test modules share."""

import os

# Must happen before JAX creates its CPU backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A tfds data_dir with the digits built once for the whole session (tests only read it)."""
  import helpers  # pylint: disable=g-import-not-at-top (after the XLA flags above)
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.get_builder(helpers.dataset_config("digits", data_dir))
  return data_dir
