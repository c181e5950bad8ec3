"""The KV cache: buffers for the KV-computing layers only (LCKV.md §5, §8).

A cache is a plain dict `{('layer', j): KV}` over the layers that compute KV, each buffer
`[batch, max_len, kv_heads, head_dim]` with the position and segment of every slot (`seg == 0`
marks an empty slot, never attended). For LCKV `0_20_..._20_21` that is 3 buffers of 22 layers.
"""

from __future__ import annotations

import jax.numpy as jnp

from lckv_jax.attention import KV
from lckv_jax.config import ModelConfig


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty cache for `batch` sequences of up to `max_len` tokens."""
  if batch < 1 or max_len < 1:
    raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
  dtype = dtype or config.compute_dtype
  shape = (batch, max_len, config.num_kv_heads, config.resolved_head_dim)
  slots = jnp.zeros((batch, max_len), jnp.int32)
  return {("layer", j): KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), slots, slots)
          for j in config.layer_spec.kv_layers}


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
  """Bytes of the K and V buffers of `init_cache` (LCKV.md §8), before allocating them."""
  itemsize = jnp.dtype(dtype or config.compute_dtype).itemsize
  return batch * max_len * config.layer_spec.kv_bytes_per_token(
      config.num_kv_heads, config.resolved_head_dim, itemsize)
