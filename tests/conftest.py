import atexit
import contextlib
import os
import shutil
import tempfile

import pytest

# Float32 matmuls at full precision on every backend, so reference comparisons are meaningful.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# The tests' models are tiny, so a test's time is XLA compiling, not running: without XLA's
# optimization passes the suite needs about half the CPU time (2 cores: 193 -> 100 s for two of
# its slowest files). The numerics under test (masks, iteration plan, caches, references) do not
# depend on them; the benchmarks and every real run keep XLA's defaults. Tests that measure
# XLA's own memory use turn them back on (`xla_optimizations`).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One XLA compilation cache for the whole run, shared by the test processes (pytest-xdist
# workers, inherited through the environment) and the train.py / generate.py subprocesses that
# many tests start: they compile the same tiny train step, eval step and decode loop again and
# again. Set in the environment before jax is imported; a run starts with an empty cache, so no
# result depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lckv-jax-tests-xla-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # The process that made it removes it at exit, after the threads that may still write to it
  # (a Trainer compiles its step in the background) have been joined.
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` run on a GPU only: elsewhere they are skipped, with the reason."""
  marked = [item for item in items if item.get_closest_marker("gpu")]
  if not marked:
    return
  import jax
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason=f"needs a GPU (this backend: {jax.default_backend()}); run "
                                 "`pytest -m gpu` on one")
  for item in marked:
    item.add_marker(skip)


@contextlib.contextmanager
def xla_optimizations():
  """XLA optimizes as it does outside the tests, inside this context (memory measurements)."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


# The tiny model (tests/tiny.py) as factory fixtures: `def test_x(tiny_model): tiny_model(...)`.
# Imported in the fixtures, so that jax is imported after the settings above.


@pytest.fixture(name="tiny_config")
def _tiny_config():
  """tiny_config(**overrides) -> ModelConfig of tests.tiny.TINY with the overrides."""
  from tests import tiny
  return tiny.tiny_config


@pytest.fixture(name="tiny_model")
def _tiny_model():
  """tiny_model(seed=0, std=None, draw="jax", **overrides) -> Transformer (tests/tiny.py)."""
  from tests import tiny
  return tiny.tiny_model


@pytest.fixture(name="tiny_train_config")
def _tiny_train_config():
  """tiny_train_config(**overrides) -> a train.py config of the tiny model (tests/tiny.py)."""
  from tests import tiny
  return tiny.tiny_train_config
