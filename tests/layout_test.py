"""The tests mirror the code, so that whoever changes a module finds its tests:

  lckv_jax/<path>/<name>.py  ->  tests/<path>/<name>_test.py
  benchmarks/<name>.py       ->  tests/benchmarks/<name>_test.py
  <name>.py (the scripts)    ->  tests/<name>_py_test.py

A test file that mirrors none of these, and a module of lckv_jax without a test file, is listed
below with its reason.
"""

import glob
import os

from tests import ROOT

TESTS = os.path.join(ROOT, "tests")

# Test files of something other than one module.
OTHER_TEST_FILES = {
    "imports_test.py": "the import graph of lckv_jax and benchmarks",
    "layout_test.py": "this file: the layout of tests/",
    "notebook_test.py": "notebooks/quickstart.ipynb",
}

# Modules of lckv_jax without a test file of their own, and where they are tested.
UNTESTED_MODULES = {
    "attention.py": "through model_test (against HuggingFace and tests/reference.py), "
                    "cache_test (RoPE) and the kernel tests",
    "hf.py": "the safetensors and config files of convert: through convert_test",
    "mode.py": "an enum; what each mode does, through cache_test (step's checks), "
               "kernels/dispatch_test (the kernel of each mode) and generation_test (an "
               "unpadded PREFILL_EMPTY equals PREFILL)",
    "serve/__main__.py": "the server's command line: serve/api_test starts it as users do and "
                         "talks to it with the openai client",
    "kernels/fused.py": "through kernels/dispatch_test (every chunk kernel against the dense "
                        "reference) and model_test (the fused path through the model)",
    "train/metrics.py": "through train/trainer_test (metrics.jsonl, TensorBoard) and "
                        "train/checkpointing_test (one row per step after a resume)",
    "train/optim.py": "through train/step_test and the optimizer settings of "
                      "train/checkpointing_test",
    "train/workdir.py": "the workdir lock and targets, through the Trainer in "
                        "train/checkpointing_test (which shares its compiled trainer)",
}


def _relative(paths, root):
  return sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in paths)


def test_every_test_file_mirrors_a_module_or_says_what_it_tests():
  files = _relative(glob.glob(os.path.join(TESTS, "**", "*_test.py"), recursive=True), TESTS)
  orphans = []
  for f in files:
    name = f[:-len("_test.py")] + ".py"
    if f in OTHER_TEST_FILES:
      continue
    if f.startswith("benchmarks/"):
      target = os.path.join(ROOT, name)
    elif "/" not in f and name.endswith("_py.py"):
      target = os.path.join(ROOT, name[:-len("_py.py")] + ".py")
    else:
      target = os.path.join(ROOT, "lckv_jax", name)
    if not os.path.isfile(target):
      orphans.append(f)
  assert orphans == [], (f"{orphans}: no module of that name; move each test to the file of the "
                         "module it tests, or list the file in OTHER_TEST_FILES with a reason")
  assert all(f in files for f in OTHER_TEST_FILES), sorted(set(OTHER_TEST_FILES) - set(files))


def test_every_module_has_a_test_file_or_a_reason():
  package = os.path.join(ROOT, "lckv_jax")
  modules = [m for m in _relative(glob.glob(os.path.join(package, "**", "*.py"), recursive=True),
                                  package) if os.path.basename(m) != "__init__.py"]
  untested = [m for m in modules
              if not os.path.isfile(os.path.join(TESTS, m[:-len(".py")] + "_test.py"))]
  assert sorted(untested) == sorted(UNTESTED_MODULES), (
      f"without a test file: {sorted(set(untested) - set(UNTESTED_MODULES))}; listed in "
      f"UNTESTED_MODULES but tested or gone: {sorted(set(UNTESTED_MODULES) - set(untested))}")
