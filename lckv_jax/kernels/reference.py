"""The reference attention: a dense visibility mask and a softmax in XLA.

Every mask of docs/spec.md §3 (causal by position, same non-zero segment, masked diagonal, sliding
window) is built as a [batch, q, k] boolean array, so this path runs any chunk against any keys:
training, prefill into a filled cache, decode steps, the reference's zero key. It is the portable
fallback and the oracle of every kernel's test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so fully masked rows give exp(0) * 0 = 0 rather than NaN


def make_mask(q_pos_BxT, q_seg_BxT, k_pos_BxS, k_seg_BxS, *, diag_masked: bool,
              window: int | None) -> jax.Array:
  """Visibility [batch, q, k]: causal by position, same non-zero segment, optional diagonal/window.

  A window W covers the query's own position and the W-1 before it; with the diagonal masked the
  query's own key drops out as well (docs/spec.md §3.4).
  """
  qp, kp = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
  same_segment = q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]
  mask = (kp <= qp) & same_segment & (k_seg_BxS[:, None, :] != 0)
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
