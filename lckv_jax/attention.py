"""Attention of one layer: RoPE, the projections, and the call into the attention dispatch.

Which KV a layer reads is decided by the model (`model.py`); which kernel attends, with which mask
(docs/spec.md §3), by `lckv_jax.kernels.dispatch`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lckv_jax import quant
from lckv_jax.config import ModelConfig
from lckv_jax.kernels import dispatch


class KV(NamedTuple):
  """Keys and values of one KV-computing layer, with the position and segment of each slot.

  k, v: [batch, slots, kv_heads, head_dim] (keys already rotated at their own positions).
  pos, seg: [batch, slots] int32; `seg == 0` marks an empty or padding slot, never attended.
  k_scale, v_scale: [batch, kv_heads, slots] float32 scales of a quantized cache buffer (k, v
    int8 or float8_e4m3fn: the values are `k * k_scale`, `lckv_jax.quant`); None otherwise.
    Slots last: the decode kernels read one kv head's scales of a block of slots as one
    contiguous load (in `[batch, slots, kv_heads]` they were kv_heads * 4 bytes apart, and the
    7b int8 decode kernel took 1.5x as long: 1,015 against 671 us on the H200).
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  seg: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  def map_slots(self, fn) -> KV:
    """`fn(x, axis)` applied to each array with its slot axis (1; 2 for the scales)."""
    return KV(*(None if x is None else fn(x, SLOT_AXIS[f]) for f, x in zip(self._fields, self)))

  def dequantized(self, dtype) -> KV:
    """The same KV with k and v in `dtype` (a quantized buffer read back through its scales)."""
    if not self.quantized:
      return self
    return KV(quant.dequantize(self.k, jnp.swapaxes(self.k_scale, 1, 2), dtype),
              quant.dequantize(self.v, jnp.swapaxes(self.v_scale, 1, 2), dtype), self.pos, self.seg)


SLOT_AXIS = {"k": 1, "v": 1, "pos": 1, "seg": 1, "k_scale": 2, "v_scale": 2}  # fields of KV


# ---------------------------------------------------------------------------------------------
# RoPE ("rotate half" convention of HF Llama).
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with linear or llama3 scaling applied."""
  d = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = config.rope_scaling_dict
  if scaling is None:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling["factor"])
  if kind == "linear":
    return inv_freq / factor
  # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle interpolated.
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  old_ctx = float(scaling["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
  smooth = (old_ctx / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(inv_freq: jax.Array, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin tables [batch, seq, head_dim] in float32 for the given positions."""
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxD: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
  cos, sin = (t[:, :, None, :] for t in cos_sin)
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxTxNxD.dtype)


# ---------------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------------


def param(rngs: nnx.Rngs, config: ModelConfig, shape, axes, *, init: str = "normal") -> nnx.Param:
  """A parameter with logical axis names (`out_sharding` metadata), mapped to a mesh by rules."""
  if init == "ones":
    value = jnp.ones(shape, config.weights_dtype)
  else:
    value = (config.initializer_range *
             jax.random.normal(rngs.params(), shape, jnp.float32)).astype(config.weights_dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Attention(nnx.Module):
  """GQA attention. K/V projections exist only when the layer computes KV (docs/spec.md §2)."""

  def __init__(self, config: ModelConfig, computes_kv: bool, *, rngs: nnx.Rngs):
    e, h, k, d = (config.hidden_size, config.num_heads, config.num_kv_heads,
                  config.resolved_head_dim)
    self.dtype = config.compute_dtype
    self.q_proj = param(rngs, config, (e, h, d), ("embed", "q_heads", "head_dim"))
    if computes_kv:
      self.k_proj = param(rngs, config, (e, k, d), ("embed", "kv_heads", "head_dim"))
      self.v_proj = param(rngs, config, (e, k, d), ("embed", "kv_heads", "head_dim"))
    self.o_proj = param(rngs, config, (h, d, e), ("q_heads", "head_dim", "embed"))

  def project_kv(self, x_BxTxE, cos_sin) -> tuple[jax.Array, jax.Array]:
    """This layer's keys (rotated) and values for the tokens of x: [batch, seq, kv_heads, head_dim]."""
    k = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.k_proj[...].astype(self.dtype))
    v = jnp.einsum("bte,ekd->btkd", x_BxTxE, self.v_proj[...].astype(self.dtype))
    return apply_rope(k, cos_sin), v

  def __call__(self, x_BxTxE, cos_sin, kv: KV, plan: dispatch.Plan,
               inputs: dispatch.Inputs) -> jax.Array:
    """Attends this layer's queries to `kv` (the KV of the layer it attends to) as `plan` says
    (`lckv_jax.kernels.dispatch`: the kind of call, its mask, the kernel)."""
    q = jnp.einsum("bte,ehd->bthd", x_BxTxE, self.q_proj[...].astype(self.dtype))
    q = apply_rope(q, cos_sin)
    out_BxTxHxD = dispatch.attend(plan, q, kv, inputs)
    return jnp.einsum("bthd,hde->bte", out_BxTxHxD, self.o_proj[...].astype(self.dtype))
