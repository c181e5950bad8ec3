"""lckv-jax: cross-layer KV sharing (LCKV, CLA, YOCO, ...) for Llama-style models in JAX/Flax."""

import importlib

# Imported on first use: `python -m lckv_jax.layer_types` (or any submodule) then runs without
# runpy's warning that the module was imported before it was executed.
_EXPORTS = {"ModelConfig": "lckv_jax.config", "Transformer": "lckv_jax.model",
            "count_params": "lckv_jax.model", "generate": "lckv_jax.generation"}

__all__ = ["ModelConfig", "Transformer", "count_params", "generate", "layer_types"]


def __getattr__(name):
  if name == "layer_types":
    return importlib.import_module("lckv_jax.layer_types")
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'lckv_jax' has no attribute {name!r}")
