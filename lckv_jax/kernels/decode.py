"""Decode-step attention that reads only each row's valid cache prefix (Pallas, Triton on GPU).

One new query token per row attends to the slots [start, end) of its row's cache buffer (slot x at
index x % slots, so a ring buffer's window may wrap). The XLA path reads the whole buffer
(`max_len` slots) at every step whatever the row's length; this kernel loops over blocks of
`block_k` slots from `start` to `end` only, so a step's bytes are those of the valid prefix (the
decode roofline of `lckv_jax.roofline`). Flash-decoding: the slots are cut into `k_splits`
parallel slices (enough programs to fill the GPU at small batch), each keeps an online softmax,
and the slices are merged in XLA.

The cache keeps its `[batch, slots, kv_heads, head_dim]` layout: each program reads the strided
`[slots, heads * head_dim]` view of one row's `heads` adjacent kv heads (1, or 2 for GQA groups
under 16 q heads: `heads_per_program`), so no transposed copy of the cache is made. The q heads
of its kv heads are the rows of one block-diagonal query tile (row r's query in the columns of
its own kv head), so one product per block gives every row its own kv head's scores.

A quantized cache (int8 or fp8 K and V, one float32 scale per slot and kv head, stored
`[batch, kv_heads, slots]` so that a block's scales are one contiguous load, `lckv_jax.quant`) is
read as stored: each block's K and V are converted to the queries' dtype
(exact: int8 and e4m3 values are bf16 values) and the scales applied in float32, to the scores
(`(q . k_q) * k_scale[slot]`) and to the probabilities before the value product
(`(p * v_scale[slot]) . v_q`). No dequantized copy of the cache is made. A 1-byte cache of more
than 2^31 elements must be read as int16 words of byte pairs (`needs_packing`: Pallas Triton's
32-bit offsets would wrap), each block as two half-width products; every 1-byte cache is, by
default.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_MIN_BLOCK = 16  # Triton's smallest matrix-multiply tile
# Bytes of one K (or V) block. Triton keeps a few stages of the K and V blocks in shared memory
# (227 KiB per block on Hopper): 128 slots of float32 at head_dim 128 (64 KiB each) asked for
# 272 KiB on the H200, so wider elements or heads get fewer slots per block.
_BLOCK_BYTES = 32 * 1024
_PROGRAMS = 512  # programs that fill a GPU's ~132 SMs (`slices`)
_MAX_WIDTH = 256  # elements of K a program reads per slot (`heads_per_program`)
# KV heads a program may read: 1 or 2. A sweep with 4 (1b, int8) ended in an illegal memory access
# on the H200; if it ran at the 4,541-row max-batch shape (as the numbers of its commit, 49c1380,
# did), the likely cause is the int8 cache's wrapped 32-bit offsets past 2^31 elements
# (`needs_packing`), found later. 4 has not been measured since.
_HEADS = (1, 2)
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) = 0 without inf - inf = NaN


def block_size(slots: int, block_k: int = 128) -> int | None:
  """The largest power-of-two block <= block_k that divides `slots`, or None (kernel unusable)."""
  b = block_k
  while b >= _MIN_BLOCK:
    if slots % b == 0:
      return b
    b //= 2
  return None


def block_cap(head_dim: int, itemsize: int, block_k: int = 128) -> int:
  """`block_k`, halved until a block of K is at most `_BLOCK_BYTES` (not under 16 slots)."""
  while block_k > _MIN_BLOCK and block_k * head_dim * itemsize > _BLOCK_BYTES:
    block_k //= 2
  return block_k


def slices(batch: int, kv_heads: int, slots: int, block_k: int,
           target_programs: int = _PROGRAMS) -> tuple[int, int]:
  """(slots per slice, slices) of the slot axis, a slice a whole number of blocks: enough
  programs for a GPU's ~132 SMs at small batch, one slice at large."""
  blocks = slots // block_k
  k_splits = max(1, min(blocks, math.ceil(target_programs / (batch * kv_heads))))
  split = math.ceil(blocks / k_splits) * block_k
  return split, math.ceil(slots / split)


def merge_slices(o, l, m):
  """The slices' online softmaxes merged: o [k_splits, ..., rows, head_dim] unnormalised, l and
  m [k_splits, ..., rows] -> [..., rows, head_dim] normalised.

  A slice that saw no slot has l = 0 and m = _NEG; a row that saw none gets zeros.
  """
  m_all = m.max(axis=0)
  weight = jnp.exp(m - m_all[None])
  l_all = (l * weight).sum(axis=0)
  return (o * weight[..., None]).sum(axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]


def heads_per_program(groups: int, kv_heads: int, head_dim: int, batch: int) -> int:
  """KV heads one program reads: 2 for GQA whose q heads leave rows of Triton's 16-row tile
  empty (1b: 8 q heads per kv head, so 2 kv heads fill it) at a batch whose rows fill the GPU
  without cutting the slots into slices; 1 for MHA, wide groups and small batches.

  The kv heads' slots sit side by side in the cache (`[..., kv_heads, head_dim]`), so a program's
  row of K is one contiguous read of 2 * head_dim elements (at 1b in int8: 128 bytes, a whole
  memory line, where one head's row is half of one), and the softmax runs once for both heads'
  rows. H200, 1b at 4,541 rows: the int8 kernel 1,291 -> 997 us (its rows past 4,096 read with
  the wrapped offsets of `needs_packing`: the same bytes, some from the wrong place), bf16
  1,324 -> 1,268 us; but at batch 32 (slices of the slots fill the GPU) bf16 60 -> 65 us, so
  small batches keep one head.
  At most `_MAX_WIDTH` elements a slot (the program's output [16, 2 * head_dim] stays in
  registers).
  """
  padded = 1 << (groups - 1).bit_length()  # a group's rows, a power of two
  if (padded == 1 or padded >= _MIN_BLOCK or kv_heads % 2 or 2 * head_dim > _MAX_WIDTH
      or batch * kv_heads < _PROGRAMS):
    return 1
  return 2


def _unpack(words, value_dtype):
  """[n, w] int16 words of byte pairs -> ([n, w] even bytes, [n, w] odd bytes) as `value_dtype`
  (int8 or float8_e4m3fn): the word holds its even element in its low byte (little-endian, as
  XLA's bitcast lays them out)."""
  pair = (words.astype(jnp.int8), (words >> 8).astype(jnp.int8))  # truncation keeps the low byte
  if value_dtype == jnp.int8:
    return pair
  return tuple(jax.lax.bitcast_convert_type(x, value_dtype) for x in pair)


def _kernel(q_ref, k_ref, v_ref, *refs, block_k: int, split: int, scale: float,
            quantized: bool, group_rows: int, packed_dtype=None):
  """One (row, group of kv heads, slice): online softmax of their q heads over its slots.

  q_ref [rows, heads * head_dim]: the q heads of each kv head of the group (`group_rows` rows a
  kv head, zeros past its q heads), block-diagonal: row r holds its query in the columns of its
  kv head (r // group_rows) and zeros elsewhere, so one product with a block of K (the group's
  kv heads side by side) gives every row the scores of its own kv head.
  k_ref, v_ref [slots, heads * head_dim]; with `quantized`, k_scale_ref, v_scale_ref
  [heads, slots] (contiguous); then start_ref, end_ref scalars.
  Writes the slice's unnormalised output o [rows, heads * head_dim] (f32; row r's own kv head's
  columns are its output), its softmax denominator l and running max m [rows].

  `packed_dtype` (the dtype of a 1-byte cache, or None): k_ref and v_ref hold int16 words of byte
  pairs, [slots, heads * head_dim / 2], and q's and o's columns are the even elements, then the
  odd ones (`_pair_columns`); each block is two products of half the width.
  """
  if quantized:
    k_scale_ref, v_scale_ref, start_ref, end_ref, o_ref, l_ref, m_ref = refs
  else:
    start_ref, end_ref, o_ref, l_ref, m_ref = refs
  j = pl.program_id(2)
  slots = k_ref.shape[0]
  rows, width = q_ref.shape
  head_of_row = jnp.arange(rows) // group_rows
  parts = 2 if packed_dtype else 1
  cols = width // parts  # q's columns per part: the evens, then the odds where packed
  qs = [q_ref[:, pl.ds(c * cols, cols)] for c in range(parts)] if packed_dtype else [q_ref[...]]

  def load(ref, i):
    """A block of K or V, [block_k, cols] per part, in q's dtype where quantized."""
    x = ref[pl.ds(i * block_k, block_k), :]
    xs = _unpack(x, packed_dtype) if packed_dtype else (x,)
    # int8 / e4m3 values are exact in q's dtype; the scales apply in float32
    return [y.astype(q_ref.dtype) for y in xs] if quantized else list(xs)

  def per_row(scale_ref, i):
    """[rows, block_k] float32: each row's kv head's scales of block i."""
    out = None
    for g in range(scale_ref.shape[0]):
      x = scale_ref[g, pl.ds(i * block_k, block_k)][None, :]
      out = x if out is None else jnp.where((head_of_row == g)[:, None], x, out)
    return out

  def body(lo, hi, i, carry):
    os, l, m = carry
    idx = i * block_k + jnp.arange(block_k)
    valid = (idx >= lo) & (idx < hi)
    ks, vs = load(k_ref, i), load(v_ref, i)
    s = functools.reduce(operator.add, (
        jax.lax.dot_general(qc, kc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        for qc, kc in zip(qs, ks))) * scale  # [rows, block_k]
    if quantized:
      s = s * per_row(k_scale_ref, i)
    s = jnp.where(valid[None, :], s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None]) * valid[None, :]
    correction = jnp.exp(m - m_new)
    pv = p * per_row(v_scale_ref, i) if quantized else p
    os = tuple(o * correction[:, None]
               + jnp.dot(pv.astype(v.dtype), v, preferred_element_type=jnp.float32)
               for o, v in zip(os, vs))
    return os, l * correction + p.sum(axis=1), m_new

  carry = (tuple(jnp.zeros((rows, cols), jnp.float32) for _ in range(parts)),
           jnp.zeros((rows,), jnp.float32), jnp.full((rows,), _NEG, jnp.float32))
  # Slot x lives at x % slots: [start, end) is one range of the buffer, or two where it wraps
  # around the end of a ring buffer.
  start, end = start_ref[()], end_ref[()]
  n = jnp.clip(end - start, 0, slots)
  first = start % slots
  ranges = ((first, jnp.minimum(first + n, slots)), (0, jnp.maximum(first + n - slots, 0)))
  for r_lo, r_hi in ranges:
    lo = jnp.maximum(r_lo, j * split)
    hi = jnp.minimum(r_hi, (j + 1) * split)
    # Only the blocks that overlap [lo, hi): the slots past a row's end are never read.
    b0 = lo // block_k
    b1 = jnp.where(hi > lo, (hi + block_k - 1) // block_k, b0)
    carry = jax.lax.fori_loop(b0, b1, functools.partial(body, lo, hi), carry)
  os, l, m = carry
  if packed_dtype:
    for c, o in enumerate(os):
      o_ref[:, pl.ds(c * cols, cols)] = o
  else:
    o_ref[...] = os[0]
  l_ref[...] = l
  m_ref[...] = m


def needs_packing(x: jax.Array) -> bool:
  """Whether a 1-byte cache buffer must reach the kernel as int16 words of byte pairs: Pallas
  Triton (JAX 0.10-0.11, `_compute_offsets_from_indices`) computes a block's element offsets in
  32 bits for an operand of at most 2^32 *bytes*, so a 1-byte operand of more than 2^31 elements
  (1b at 2,048 slots: past 4,096 rows) gets offsets that wrap negative: on the H100 and H200 a
  read outside the buffer (CUDA_ERROR_ILLEGAL_ADDRESS), or of other memory where the wrapped
  address lands inside another allocation. Word offsets stay under 2^31 up to 2^32 bytes, past
  which JAX's offsets are 64-bit.

  Every 1-byte cache is packed by default, not only these: one code path at every size, and it
  was the faster one (H100, 1b lckv's int8 shape, 2 kv heads a program, half-full rows: 494 vs
  507 us at 2,048 rows, 947 vs 964 us at 4,096)."""
  return x.dtype.itemsize == 1 and x.size > 2**31


def _pair_columns(x, undo: bool = False):
  """[..., w] -> its even columns, then its odd ones (the order of a packed kernel's q and o);
  `undo`: back."""
  w = x.shape[-1]
  if undo:
    return jnp.swapaxes(x.reshape(*x.shape[:-1], 2, w // 2), -1, -2).reshape(x.shape)
  return jnp.swapaxes(x.reshape(*x.shape[:-1], w // 2, 2), -1, -2).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("block_k", "heads", "pack", "interpret"))
def prefix_attention(q_BxHxD, k_BxSxKxD, v_BxSxKxD, start_B, end_B, *, k_scale_BxKxS=None,
                     v_scale_BxKxS=None, block_k: int = 128, heads: int | None = None,
                     pack: bool | None = None, interpret: bool = False) -> jax.Array:
  """Softmax attention of one query per row over the cache slots [start, end) of that row.

  Args:
    q_BxHxD: [batch, heads, head_dim] queries (GQA: head h reads kv head h // (heads/kv_heads)).
    k_BxSxKxD, v_BxSxKxD: [batch, slots, kv_heads, head_dim] cache buffers.
    start_B, end_B: [batch] int32 first and one-past-last visible slot (0 <= start,
      end - start <= slots); a row with end <= start sees nothing and gets zeros
      (docs/spec.md §3.5).
      Slot x is read at buffer index x % slots, so a ring buffer's window may wrap around.
    k_scale_BxKxS, v_scale_BxKxS: [batch, kv_heads, slots] float32 scales of a quantized cache
      (k, v int8 or float8_e4m3fn: the values are k * k_scale); None for a float cache.
    block_k: slots per inner step (halved until it divides `slots` and a block of K fits
      `_BLOCK_BYTES`; see `block_size` and `block_cap`).
    heads: kv heads per program, 1 or 2 (dividing kv_heads); None: `heads_per_program`.
    pack: read a 1-byte cache as int16 words of byte pairs; None: a 1-byte cache is
      (`needs_packing`). False past 2^31 elements is an error.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    [batch, heads, head_dim] in the dtype of v (of q for a quantized cache).
  """
  b, h, d = q_BxHxD.shape
  _, slots, kv_heads, _ = k_BxSxKxD.shape
  groups = h // kv_heads
  hg = heads_per_program(groups, kv_heads, d, b) if heads is None else heads
  if hg not in _HEADS or kv_heads % hg:
    raise ValueError(f"prefix_attention: heads (kv heads per program) must be one of {_HEADS} "
                     f"and divide the {kv_heads} kv heads, got {hg}")
  bk = block_size(slots, block_cap(hg * d, k_BxSxKxD.dtype.itemsize, block_k))
  if bk is None:
    raise ValueError(f"prefix_attention: {slots} cache slots is not a multiple of {_MIN_BLOCK}")
  n = kv_heads // hg  # programs per row and slice
  split, k_splits = slices(b, n, slots, bk)
  # Each kv head's q heads, padded with zero rows to a power of two, and to Triton's 16-row
  # minimum for the whole program (MHA: 1 real row of 16).
  gp = max(1 << (groups - 1).bit_length(), -(-_MIN_BLOCK // hg))
  rows = hg * gp
  quantized = k_scale_BxKxS is not None
  if quantized != (v_scale_BxKxS is not None):
    raise ValueError("prefix_attention: give both k_scale and v_scale (a quantized cache), or "
                     "neither")
  out_dtype = q_BxHxD.dtype if quantized else v_BxSxKxD.dtype
  q = q_BxHxD.reshape(b, n, hg, groups, d)
  q = q if quantized else q.astype(k_BxSxKxD.dtype)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, gp - groups), (0, 0)))
  if hg > 1:  # block-diagonal: row (g, r) holds its query in the columns of kv head g
    q = jnp.einsum("bnhrd,hk->bnhrkd", q, jnp.eye(hg, dtype=q.dtype))
  q = q.reshape(b, n, rows, hg * d)
  k, v = (x.reshape(b, slots, n, hg * d) for x in (k_BxSxKxD, v_BxSxKxD))
  packed = k_BxSxKxD.dtype.itemsize == 1 if pack is None else pack
  if packed and k_BxSxKxD.dtype.itemsize != 1:
    raise ValueError(f"prefix_attention: pack needs a 1-byte cache, got {k_BxSxKxD.dtype}")
  if not packed and needs_packing(k_BxSxKxD):
    raise ValueError(f"prefix_attention: a 1-byte cache of {k_BxSxKxD.size} elements (more "
                     "than 2^31) must be read packed (pack=None or True): Pallas Triton's "
                     "32-bit offsets would wrap")
  width = hg * d // 2 if packed else hg * d
  if packed:  # free relabellings of the same bytes, and q's columns in the words' order
    k, v = (jax.lax.bitcast_convert_type(x.reshape(b, slots, n, width, 2), jnp.int16)
            for x in (k, v))
    q = _pair_columns(q)
  kernel = functools.partial(_kernel, block_k=bk, split=split, scale=1.0 / math.sqrt(d),
                             quantized=quantized, group_rows=gp,
                             packed_dtype=k_BxSxKxD.dtype if packed else None)
  kv_spec = pl.BlockSpec((None, slots, None, width), lambda i, k, j: (i, 0, k, 0))
  scale_spec = pl.BlockSpec((None, None, hg, slots), lambda i, k, j: (i, k, 0, 0))
  row_spec = pl.BlockSpec((None,), lambda i, k, j: (i,))
  scales = tuple(x.astype(jnp.float32).reshape(b, n, hg, slots)
                 for x in (k_scale_BxKxS, v_scale_BxKxS)) if quantized else ()
  o, l, m = pl.pallas_call(
      kernel,
      grid=(b, n, k_splits),
      in_specs=[pl.BlockSpec((None, None, rows, hg * d), lambda i, k, j: (i, k, 0, 0)),
                kv_spec, kv_spec, *((scale_spec,) * len(scales)), row_spec, row_spec],
      out_specs=[pl.BlockSpec((None, None, None, rows, hg * d), lambda i, k, j: (j, i, k, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda i, k, j: (j, i, k, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda i, k, j: (j, i, k, 0))],
      out_shape=[jax.ShapeDtypeStruct((k_splits, b, n, rows, hg * d), jnp.float32),
                 jax.ShapeDtypeStruct((k_splits, b, n, rows), jnp.float32),
                 jax.ShapeDtypeStruct((k_splits, b, n, rows), jnp.float32)],
      interpret=interpret,
      name="lckv_decode_attention",
  )(q, k, v, *scales, start_B.astype(jnp.int32), end_B.astype(jnp.int32))
  o = merge_slices(o, l, m)
  o = (_pair_columns(o, undo=True) if packed else o).reshape(b, n, hg, gp, hg, d)
  if hg > 1:  # row (g, r)'s output is in the columns of its own kv head g: the diagonal blocks
    o = jnp.moveaxis(jnp.diagonal(o, axis1=2, axis2=4), -1, 2)  # [b, n, hg, gp, d]
  return o.reshape(b, n, hg, gp, d)[:, :, :, :groups].reshape(b, h, d).astype(out_dtype)
