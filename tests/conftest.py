import os
import tempfile

# Float32 matmuls at full precision on every backend, so reference comparisons are meaningful.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One XLA compilation cache for the whole run, shared by the test processes (pytest-xdist
# workers, inherited through the environment) and the train.py / generate.py subprocesses that
# many tests start: they compile the same tiny train step, eval step and decode loop again and
# again. Set in the environment before jax is imported; a run starts with an empty cache, so no
# result depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lckv-jax-tests-xla-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  _MADE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _MADE_CACHE = None


def pytest_unconfigure(config):
  if _MADE_CACHE and not hasattr(config, "workerinput"):  # the process that made it removes it
    import shutil
    shutil.rmtree(_MADE_CACHE, ignore_errors=True)
