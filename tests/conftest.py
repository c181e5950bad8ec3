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

# One XLA compilation cache for the whole run, for the train.py / generate.py subprocesses that
# many tests start (inherited through the environment): they compile the same tiny train step,
# eval step and decode loop again and again. A run starts with an empty cache, so no result
# depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lckv-jax-tests-xla-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # The process that made it removes it at exit, after the threads that may still write to it
  # (a Trainer compiles its step in the background) have been joined.
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# The test processes themselves, and the servers they start (NO_XLA_CACHE in their environment),
# compile without it: their programs are rarely compiled twice, and each would be serialized and
# written. JAX decides once per process, at its first compilation, whether it uses the cache, so
# this comes before any.
import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_compilation_cache", False)
NO_XLA_CACHE = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


# Every program XLA compiles for the CPU keeps about 8 memory mappings of its code until it is
# freed, and a process may hold at most vm.max_map_count of them (65,530 by default; raising it
# needs root). A pytest worker runs hundreds of tests, each compiling its own tiny programs; the
# programs stay in JAX's caches, so a worker reached 64,000 mappings at 84% of the suite and died
# inside XLA, wherever it next mapped code (segfaults compiling, an abort serializing an
# executable; CI hung after one). So the compiled programs are dropped after each test file, and
# after any test that leaves too many mapped.
_MAPPINGS_LIMIT = 30_000


def _mappings() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


def _drop_compiled_programs():
  import gc
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module", autouse=True)
def _compiled_programs_live_one_file():
  yield
  _drop_compiled_programs()


def pytest_runtest_teardown(item, nextitem):
  if _mappings() > _MAPPINGS_LIMIT:
    _drop_compiled_programs()


def pytest_collection_modifyitems(config, items):
  """Tests marked `gpu` run on a GPU only: elsewhere they are skipped, with the reason."""
  marked = [item for item in items if item.get_closest_marker("gpu")]
  if not marked:
    return
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason=f"needs a GPU (this backend: {jax.default_backend()}); run "
                                 "`pytest -m gpu` on one")
  for item in marked:
    item.add_marker(skip)


@contextlib.contextmanager
def xla_optimizations():
  """XLA optimizes as it does outside the tests, inside this context (memory measurements)."""
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
