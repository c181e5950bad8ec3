"""Attention of one layer: RoPE, the LCKV masks, the softmax kernel, and the projections.

Which KV a layer reads is decided by the model (`model.py`); this module only knows how to attend
queries to a given set of keys/values with positions and segment ids (docs/spec.md §3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lckv_jax.config import ModelConfig
from lckv_jax.kernels.decode import decode_attention
from lckv_jax.kernels.tpu import splash_attention

_MASKED = -1e30  # finite, so fully masked rows give exp(0) * 0 = 0 rather than NaN


class KV(NamedTuple):
  """Keys and values of one KV-computing layer, with the position and segment of each slot.

  k, v: [batch, slots, kv_heads, head_dim] (keys already rotated at their own positions).
  pos, seg: [batch, slots] int32; `seg == 0` marks an empty or padding slot, never attended.
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  seg: jax.Array


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
# Masks and the reference (XLA) attention kernel.
# ---------------------------------------------------------------------------------------------


def make_mask(q_pos_BxT, q_seg_BxT, k_pos_BxS, k_seg_BxS, *, diag_masked: bool,
              window: int | None) -> jax.Array:
  """Visibility [batch, q, k]: causal by position, same non-zero segment, optional diagonal/window.

  A window W covers the query's own position and the W-1 before it; with the diagonal masked the
  query's own key drops out as well (docs/spec.md §3.4).
  """
  qp, kp = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
  mask = (kp <= qp) & (q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
  if diag_masked:
    mask &= kp != qp
  if window is not None:
    mask &= qp - kp < window
  return mask


def dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, *,
                          zero_key: bool = False) -> jax.Array:
  """Softmax attention with GQA; a query with no visible key outputs zeros (docs/spec.md §3.5).

  Logits and softmax in float32. Returns [batch, q, heads, head_dim] in the dtype of v.
  `zero_key` adds one always-visible all-zero key and value (logit 0, value 0) to the softmax, as
  the reference code's decoding does (docs/spec.md §5, `decode_semantics='whynlp_main'`).
  """
  b, t, h, d = q_BxTxHxD.shape
  kv_heads = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  mask = mask_BxTxS[:, None, None, :, :]
  logits = jnp.where(mask, logits, _MASKED)
  logits_max = jnp.max(logits, axis=-1, keepdims=True)
  if zero_key:
    logits_max = jnp.maximum(logits_max, 0.0)
  logits_max = jax.lax.stop_gradient(logits_max)
  probs = jnp.exp(logits - logits_max) * mask
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  if zero_key:
    denom = denom + jnp.exp(-logits_max)
  probs = probs / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD)
  return out.reshape(b, t, h, d)


def fused_causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, *, diag_masked: bool,
                           window: int | None, implementation: str,
                           segment_ids_BxT: jax.Array | None = None) -> jax.Array:
  """Attention of one chunk through `jax.nn.dot_product_attention` (cuDNN on GPU).

  Causal by index, the window as the kernel's local window, and the masked diagonal by shifting
  (docs/spec.md §3): query t >= 1 attends causally over keys 0..t-1, which is the causal
  attention of queries 1..T-1 over keys 0..T-2; query 0 sees nothing and gets zeros. A window W
  covers the query and W-1 keys before it; with the diagonal masked, W-1 keys.

  `segment_ids_BxT`: packed documents (0 = padding), positions +1 per token within a document
  (causal and window by index). Attention stays within a document through a [batch, 1, T, T]
  mask, which cuDNN reads as a bias beside its causal mask; a query that sees no key (a
  document's first token with the diagonal masked, padding) gets zeros, as in the dense path.
  """
  seg = segment_ids_BxT
  if diag_masked:
    q, k, v = q_BxTxHxD[:, 1:], k_BxTxKxD[:, :-1], v_BxTxKxD[:, :-1]
    left = None if window is None else window - 2
    seg_q, seg_k = (None, None) if seg is None else (seg[:, 1:], seg[:, :-1])
  else:
    q, k, v = q_BxTxHxD, k_BxTxKxD, v_BxTxKxD
    left = None if window is None else window - 1
    seg_q = seg_k = seg
  # cuDNN's fused kernels want an even length; padding at the end is invisible to earlier
  # queries under the causal mask, and the padded rows are dropped.
  n = q.shape[1]
  if n == 0:  # a single diagonal-masked token sees nothing
    return jnp.zeros_like(q_BxTxHxD)
  pad = n % 2 if implementation == "cudnn" else 0
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  mask = None
  if seg is not None:
    sq, sk = (jnp.pad(x, ((0, 0), (0, pad))) for x in (seg_q, seg_k))
    mask = ((sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] != 0))[:, None]
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation=implementation,
      local_window_size=None if left is None else (left, 0))[:, :n]
  if seg is not None:  # the kernel's large negative bias leaves a blind query's row uniform
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    visible = mask[:, 0, :n, :n] & (j <= i) & (True if left is None else i - j <= left)
    out = jnp.where(visible.any(-1)[:, :, None, None], out, 0).astype(out.dtype)
  if diag_masked:
    out = jnp.concatenate([jnp.zeros_like(out[:, :1]), out], axis=1)
  return out


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

  def __call__(self, x_BxTxE, cos_sin, kv: KV, mask_BxTxS, *, zero_key: bool = False,
               fused: tuple | None = None, decode_span: tuple | None = None) -> jax.Array:
    """Attends this layer's queries to `kv` (the KV of the layer it attends to).

    `fused=(implementation, diag_masked, window, segment_ids)` takes a fused kernel instead of
    the dense mask: a chunk attending to its own keys, causal by index (`fused_causal_attention`
    for cuDNN/XLA, `kernels.tpu.splash_attention` on TPU; packed segment ids in both).
    `decode_span=(start_B, end_B, interpret)`: one token per row attends to the cache slots
    [start, end) through the prefix-reading decode kernel (`lckv_jax.kernels.decode`).
    """
    q = jnp.einsum("bte,ehd->bthd", x_BxTxE, self.q_proj[...].astype(self.dtype))
    q = apply_rope(q, cos_sin)
    if decode_span is not None:
      start, end, interpret = decode_span
      out_BxTxHxD = decode_attention(q[:, 0], kv.k, kv.v, start, end, interpret=interpret)[:, None]
    elif fused is not None:
      # The chunk's own keys: all of kv without a cache, slots 0..T-1 of a fresh cache.
      implementation, diag_masked, window, segment_ids = fused
      t = q.shape[1]
      if implementation == "splash":
        out_BxTxHxD = splash_attention(q, kv.k[:, :t], kv.v[:, :t], diag_masked=diag_masked,
                                       window=window, segment_ids_BxT=segment_ids,
                                       interpret=jax.default_backend() != "tpu")
      else:
        out_BxTxHxD = fused_causal_attention(q, kv.k[:, :t], kv.v[:, :t],
                                             diag_masked=diag_masked, window=window,
                                             implementation=implementation,
                                             segment_ids_BxT=segment_ids)
    else:
      out_BxTxHxD = dot_product_attention(q, kv.k, kv.v, mask_BxTxS, zero_key=zero_key)
    return jnp.einsum("bthd,hde->bte", out_BxTxHxD, self.o_proj[...].astype(self.dtype))
