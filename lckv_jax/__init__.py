"""lckv-jax: cross-layer KV sharing (LCKV, CLA, YOCO, ...) for Llama-style models in JAX/Flax."""

from lckv_jax import layer_types
from lckv_jax.config import ModelConfig
from lckv_jax.generation import generate
from lckv_jax.model import Transformer, count_params

__all__ = ["ModelConfig", "Transformer", "count_params", "generate", "layer_types"]
