"""Splash attention (Pallas, Mosaic TPU) for unpacked and packed chunks.

`splash_attention` computes exactly what `lckv_jax.kernels.reference.dot_product_attention` computes
with `make_mask(pos, seg, pos, seg, diag_masked=..., window=...)` for a chunk attending to its own
keys (no cache), without a dense [T, T] mask: the causal / diagonal / window part is a static splash
mask evaluated inside the kernel (with block sparsity, so blocks above the diagonal or outside the
window are skipped), and the packed-document part is splash's segment ids.

Preconditions (not checked):
  - Causal by index. Queries and keys are the same T tokens, so "j <= t by index" is the causality.
  - Packed rows: every document's tokens are contiguous in the row and its positions increase by
    one from token to token (restarting per document is fine). Then causal-by-index within a
    segment equals causal-by-position, and `t - j` is the position difference used by the window.
    A segment id must not be reused by two separate runs of the same row.
  - `segment_ids == 0` marks padding: never attended; the output rows of padding queries are zeros.

Blocks: T is padded at the end to a multiple of 128 (splash needs kv blocks in multiples of the
128 lanes) and the block is the largest of 512/256/128 dividing the padded length. head_dim: any
in interpret mode (`interpret=True`, how the CPU tests run); on a real TPU (not verified here: no
TPU in the test setup) splash is designed for head_dim a multiple of 128.
The kernel is a single-device `pallas_call`: under a sharded jit, call it inside `shard_map`
(batch and head axes can be sharded; the sequence axis cannot).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

_LANES = 128  # splash needs kv blocks (and segment-id tiles) in multiples of the 128 lanes
_BLOCKS = (512, 256, 128)  # largest first; the block must divide the padded length


def _block_and_padded_len(t: int) -> tuple[int, int]:
  """Pads T only to the next multiple of 128, then takes the largest block dividing that."""
  t_pad = -(-t // _LANES) * _LANES
  block = next(b for b in _BLOCKS if t_pad % b == 0)
  return block, t_pad


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, t_pad: int, block: int, diag_masked: bool, window: int | None,
            interpret: bool) -> splash.SplashAttentionKernel:
  """Splash kernel for one batch element: q [H, t_pad, D], k/v [K, t_pad, D] with K | H.

  Built from static shapes only; the block-sparsity tables are numpy work at trace time, so the
  kernels are cached by shape. `ensure_compile_time_eval` keeps the tables concrete (constants)
  even when first built inside a jit trace, so the cache never holds tracers.

  The masked diagonal is expressed directly as a splash mask (causal with the diagonal removed:
  key j visible to query t iff j <= t - 1), rather than by the shift trick of
  `fused_causal_attention` (queries 1..T-1 over keys 0..T-2). The direct mask keeps q, k, v and
  the segment ids unshifted: no sliced copies of q/k/v, no concatenation of the output, and one
  segment-id array serves both sides. It is safe for the kernel: every block row still contains
  a non-empty block (the diagonal block holds key t-1 for every query t but the very first), so
  no query skips all its blocks (which would give 0/0); queries whose visible blocks contain no
  visible key (the first token of a document, padding) get a finite average of values, which
  `splash_attention` overwrites with zeros.
  """
  shape = (t_pad, t_pad)
  # LocalMask(window_size=(left, right)) keeps keys with t - left <= j <= t + right.
  right = -1 if diag_masked else 0
  if window is None:
    head_mask = mask_lib.CausalMask(shape, offset=right)
  else:
    # A window W covers the query and the W-1 keys before it: t - j <= W - 1. With the diagonal
    # masked the same left bound leaves W-1 keys (right = -1 drops j = t).
    head_mask = mask_lib.LocalMask(shape, window_size=(window - 1, right), offset=0)
  mask = mask_lib.MultiHeadMask([head_mask] * num_heads)
  block_sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():
    # MHA kernel with fewer kv heads is GQA: query head h reads kv head h // (H // K), the same
    # grouping as the reference's reshape (b, t, k, g, d), and KV is never repeated.
    return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, *, diag_masked: bool, window: int | None,
                     segment_ids_BxT=None, interpret: bool = False) -> jax.Array:
  """Causal GQA self-attention of one chunk through splash attention; [B, T, H, D], dtype of v.

  Query t attends key j iff j <= t, and j != t when `diag_masked`, and t - j < `window` when
  given, and (with `segment_ids_BxT`) seg[j] == seg[t] != 0. A query with no visible key outputs
  exactly zeros (the first token of each document when `diag_masked`, padding queries). Logits
  are scaled by 1/sqrt(head_dim) and the softmax runs in float32. Any T: the sequence is padded
  at the end to a multiple of 128 (padded keys come after every real query, so causality hides
  them) and the padded rows are dropped. See the module docstring for the preconditions.
  """
  b, t, h, d = q_BxTxHxD.shape
  kv_heads = k_BxTxKxD.shape[2]
  if h % kv_heads:
    raise ValueError(f"query heads {h} not a multiple of kv heads {kv_heads}")
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  out_dtype = v_BxTxKxD.dtype
  if t == 0 or (diag_masked and window is not None and window <= 1):
    # No query sees any key (a window of 1 with the diagonal masked is empty). Splash would
    # divide 0 by 0 for rows whose every block is empty, so don't call it.
    return jnp.zeros((b, t, h, d), out_dtype)

  block, t_pad = _block_and_padded_len(t)
  kernel = _kernel(h, t_pad, block, bool(diag_masked), window, bool(interpret))

  # Splash does not scale the logits: fold 1/sqrt(D) into q (in float32, one rounding).
  q = (q_BxTxHxD.astype(jnp.float32) / math.sqrt(d)).astype(q_BxTxHxD.dtype)
  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  # Heads-major layout [B, heads, T, D] per batch element.
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k_BxTxKxD, v_BxTxKxD))

  if segment_ids_BxT is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    # Padded slots get segment 0, like padding tokens: a real query (seg != 0) never matches
    # them, and the rows of seg-0 queries are zeroed below.
    seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, splash.SegmentIds(q=s1, kv=s1)))(
        q, k, v, seg)
  out = out[:, :, :t].transpose(0, 2, 1, 3).astype(out_dtype)  # [B, T, H, D]

  # Which queries see at least one key. Without the diagonal mask every real query sees itself.
  # With it, query t sees key t-1 iff t >= 1 and (packed) t-1 is in the same document (window
  # >= 2 here); by contiguity of documents no earlier key of its document exists otherwise.
  idx = jnp.arange(t)
  has_key = jnp.broadcast_to(idx >= 1 if diag_masked else jnp.ones((t,), bool), (b, t))
  if segment_ids_BxT is not None:
    seg = segment_ids_BxT
    has_key &= seg != 0
    if diag_masked:
      prev = jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
      has_key &= prev == seg
  return jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out_dtype))
