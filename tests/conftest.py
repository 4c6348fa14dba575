"""Test session set-up: four simulated CPU devices, so data parallelism is exercised here, and
the fixtures several test modules share."""

import os
import shutil
import tempfile

# Must happen before JAX creates its CPU backend. The tests compile far more than they run
# (hundreds of programs, a few steps each, on tiny networks): XLA's LLVM backend at optimisation
# level 0 compiles them faster, and the commands the tests start inherit the flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One XLA compilation cache for the whole session, made here (by pytest's own process) and
# inherited by its workers and by the jaxkd commands the tests start: a step the tests compile
# again in another process (the same network, method and shapes) is read back, not rebuilt.
# Results do not change (the cache keeps the compiled program of the same computation); the
# folder is removed when the session ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxkd-tests-xla-cache-")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # pytest's own process made it.
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A tfds data_dir with the digits built once for the whole session (tests only read it)."""
  import helpers  # pylint: disable=g-import-not-at-top (after the XLA flags above)
  from jaxkd.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.get_builder(helpers.dataset_config("digits", data_dir))
  return data_dir
