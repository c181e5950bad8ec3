"""The tests: tests/<path>/<name>_test.py tests lckv_jax/<path>/<name>.py (tests/layout_test.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
