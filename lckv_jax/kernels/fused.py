"""Causal attention of a chunk over its own keys through `jax.nn.dot_product_attention`: cuDNN's
fused kernel on a GPU (`attention_impl="cudnn"`), XLA's own implementation elsewhere ("xla").
No dense mask: causal by index, the window as the kernel's local window, packed documents as a
segment mask beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def fused_masked_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, *,
                           implementation: str) -> jax.Array:
  """Attention of a chunk over a cache's slots through `jax.nn.dot_product_attention`, what each
  query sees given by a dense mask ([batch, T, slots]: `reference.make_mask`, any layout).

  A prefill chunk after the first (a long prompt, a server's chunked prefill) attends to the
  cache's earlier slots and its own; the dense reference holds the [batch, heads, T, slots]
  scores in float32 (at 7b, 4 x 256 queries over 1,024 slots: 134 MB a layer, written and read
  several times each pass), where cuDNN's fused kernel reads the mask as a [batch, 1, T, slots]
  bias and keeps the scores on chip. A query that sees no key (padding) gets zeros, as in the
  dense path.
  """
  t, s = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  # cuDNN's fused kernels want even lengths; padded queries are dropped, padded slots invisible.
  pt, ps = (t % 2, s % 2) if implementation == "cudnn" else (0, 0)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  q, k, v = pad(q_BxTxHxD, pt), pad(k_BxSxKxD, ps), pad(v_BxSxKxD, ps)
  mask = jnp.pad(mask_BxTxS, ((0, 0), (0, pt), (0, ps)))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                     implementation=implementation)[:, :t]
  seen = mask_BxTxS.any(-1)[:, :, None, None]  # the bias leaves a blind query's row uniform
  return jnp.where(seen, out, 0).astype(q_BxTxHxD.dtype)
