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

  Causal by index, the window as the kernel's local window (the query and W-1 keys before it).
  The masked diagonal (docs/spec.md §3) is a [1, 1, T, T] mask beside the causal one, which
  cuDNN reads as a bias; query 0 then sees nothing and gets zeros. (Shifting instead, queries
  1..T-1 over keys 0..T-2, made every call copy q, k and v into odd-length, padded arrays and
  the output back: 0.17 ms a layer pass of a 1b prefill of 32 x 512 tokens on the H200.)

  `segment_ids_BxT`: packed documents (0 = padding), positions +1 per token within a document
  (causal and window by index). Attention stays within a document through a [batch, 1, T, T]
  mask; a query that sees no key (a document's first token with the diagonal masked, padding)
  gets zeros, as in the dense path.
  """
  seg = segment_ids_BxT
  t = q_BxTxHxD.shape[1]
  q, k, v = q_BxTxHxD, k_BxTxKxD, v_BxTxKxD
  # cuDNN's fused kernels want an even length; padding at the end is invisible to earlier
  # queries under the causal mask, and the padded rows are dropped.
  pad = t % 2 if implementation == "cudnn" else 0
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  n = t + pad
  i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
  mask = None
  if seg is not None:
    s = jnp.pad(seg, ((0, 0), (0, pad)))
    mask = ((s[:, :, None] == s[:, None, :]) & (s[:, None, :] != 0))[:, None]
  if diag_masked:
    off_diagonal = (i != j)[None, None]
    mask = off_diagonal if mask is None else mask & off_diagonal
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation=implementation,
      local_window_size=None if window is None else (window - 1, 0))[:, :t]
  if mask is not None:  # the kernel's large negative bias leaves a blind query's row uniform
    visible = mask[:, 0, :t, :t] & (j[:t, :t] <= i[:t, :t])
    if window is not None:
      visible &= i[:t, :t] - j[:t, :t] < window
    out = jnp.where(visible.any(-1)[:, :, None, None], out, 0).astype(out.dtype)
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
