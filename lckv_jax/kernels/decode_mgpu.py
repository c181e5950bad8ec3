"""Decode-step attention that reads only each row's valid cache prefix (Pallas, Mosaic GPU).

The same computation as `lckv_jax.kernels.decode` (the Triton kernel, whose Pallas backend JAX
deprecates), written for Hopper GPUs (H100, H200) with Pallas's Mosaic GPU backend: one new query
token per row attends to the slots [start, end) of its row's cache buffer (slot x at index
x % slots, so a ring buffer's window may wrap), and only the blocks of `block_k` slots that
overlap [start, end) are read. Flash-decoding: the slots are cut into `k_splits` slices, one
program per (row, kv head, slice), each keeps an online softmax, and the slices are merged in XLA.

Each program streams its blocks from HBM into shared memory with TMA copies of the strided
`[block_k, head_dim]` view of one (row, kv head) (no transposed copy of the cache), `_STAGES`
blocks in flight (double buffering on barriers), and multiplies on the tensor cores (wgmma): the
q heads of a kv head's group are the rows of a 64-row tile (wgmma's M; the rows past the group
are zeros), scores `q . k^T` and the value product `p . v` are two wgmmas per block. Decode is
memory-bound: the padded rows cost tensor-core time the GPU has to spare, not bytes.

wgmma transposes an operand (here B = K^T) of 16-bit values only (float32 would also round to
tf32), so the queries are bf16 or f16: a float32 model keeps the Triton kernel or the dense path
(`supports`). A quantized cache (int8 or
fp8 K and V, one float32 scale per slot and kv head, `lckv_jax.quant`) is read as stored and
converted block by block in shared memory to the queries' dtype (exact: int8 and e4m3 values are
bf16 and f16 values); the scales apply in float32, to the scores (`(q . k_q) * k_scale[slot]`)
and to the probabilities before the value product (`(p * v_scale[slot]) . v_q`), as in the
Triton kernel. The scales are stored `[batch, kv_heads, slots]`, so a block's scales of one kv
head are contiguous; they are read with plain loads one block ahead.

`interpret=True` runs the kernel in Mosaic GPU's interpreter on the CPU (the tests). The
interpreter's wgmma takes no transposed operand, so there the scores are one `jnp.dot` of the
same shared-memory tiles; everything else (copies, barriers, masks, softmax, scales) is the
code that runs on the GPU.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lckv_jax.kernels import decode

_ROWS = 64  # wgmma's M: the q heads of one kv head's group, zero-padded
_BLOCKS = (128, 64)  # slots per block: a multiple of 64 (a [block_k] vector's tiled layout)
_STAGES = 2  # blocks in flight; 2 x (K + V) bf16 blocks of 128 x 128 = 128 KB of shared memory
_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) = 0 without inf - inf = NaN
_DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma's 16-bit operands


def block_size(slots: int, block_k: int = 128) -> int | None:
  """The largest block of `_BLOCKS` <= block_k that divides `slots`, or None (kernel unusable)."""
  return next((b for b in _BLOCKS if b <= max(block_k, _BLOCKS[-1]) and slots % b == 0), None)


def supports(slots: int, dtype, head_dim: int, groups: int) -> bool:
  """Whether the kernel runs a cache of `slots` slots for queries of `dtype`, `head_dim` and
  `groups` q heads per kv head."""
  return _unsupported(slots, dtype, head_dim, groups) is None


def _unsupported(slots: int, dtype, head_dim: int, groups: int) -> str | None:
  """Why the kernel cannot run these shapes, or None."""
  if block_size(slots) is None:
    return f"{slots} cache slots is not a multiple of {_BLOCKS[-1]}"
  if jnp.dtype(dtype) not in map(jnp.dtype, _DTYPES):
    return (f"wgmma multiplies 16-bit operands (bfloat16, float16), got {jnp.dtype(dtype).name}; "
            "use the Triton kernel (decode_attention='pallas') or 'dense' for it")
  if head_dim % 64:
    return f"head_dim must be a multiple of 64, got {head_dim}"
  if groups > _ROWS:
    return f"at most {_ROWS} q heads per kv head, got {groups}"
  return None


def _swizzled(dtype, minor: int) -> tuple:
  """Shared-memory tiling and swizzle of a [rows, minor] tile, as TMA and wgmma read it."""
  swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _visits(start, end, j, *, split: int, slots: int, block_k: int):
  """Which blocks slice j reads: (steps, block of a step, first valid slot index, valid count).

  The valid buffer indices are [first, first + n) modulo `slots`: one range, or two where a
  ring's window wraps ([0, wrapped) and [first, slots)). Each block of the slice that overlaps
  them is read once, the wrapped range's blocks first; a block shared by both ranges is read in
  the first, the mask taking both.
  """
  n = jnp.clip(end - start, 0, slots)
  first = jax.lax.rem(start, slots)
  lo_j, hi_j = j * split, (j + 1) * split

  def blocks(lo, hi):
    lo, hi = jnp.maximum(lo, lo_j), jnp.minimum(hi, hi_j)
    b0 = jnp.where(hi > lo, lo // block_k, 0)
    return b0, jnp.where(hi > lo, (hi + block_k - 1) // block_k, 0)

  w0, w1 = blocks(0, jnp.maximum(first + n - slots, 0))  # the wrapped part
  a0, a1 = blocks(first, jnp.minimum(first + n, slots))
  a0 = jnp.maximum(a0, w1)
  wrapped = w1 - w0
  steps = wrapped + jnp.maximum(a1 - a0, 0)
  block = lambda s: jnp.where(s < wrapped, w0 + s, a0 + s - wrapped)
  return steps, block, first, n


def _layout(x, layout, interpret: bool):
  """x in a register layout (a hint to the Mosaic GPU compiler; nothing to the interpreter)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _load_plain(ref, layout, interpret: bool):
  """A [block_k] vector in global memory, read with plain loads (no TMA), in `layout`."""
  if interpret:
    return ref[...]
  # plgpu.load took the index apart from the ref before JAX 0.11.
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)


def _kernel(q_gmem, k_gmem, v_gmem, *refs, block_k: int, split: int, rows_out: int,
            scale: float, quantized: bool, interpret: bool):
  """One (row, kv head, slice): online softmax of the q heads of the group over its blocks.

  q_gmem [batch, kv_heads, 64, head_dim] (the group's heads, zero rows after);
  k_gmem, v_gmem [batch, slots, kv_heads, head_dim]; with `quantized`, k_scale, v_scale
  [batch, kv_heads, slots]; then start, end [batch].
  Writes the slice's unnormalised output o [rows_out, head_dim] (f32), its softmax denominator l
  and running max m [rows_out], of outputs [k_splits, batch, kv_heads, ...].
  """
  scales, (start_gmem, end_gmem, o_gmem, l_gmem, m_gmem, smem) = (
      (refs[:2], refs[2:]) if quantized else ((), refs))
  i, h, j = (jax.lax.axis_index(a) for a in ("row", "kv_head", "split"))
  slots = k_gmem.shape[1]
  iota = jax.lax.broadcasted_iota if interpret else plgpu.broadcasted_iota
  wgmma_layout = {} if interpret else {"layout": plgpu.Layout.WGMMA}
  steps, block, first, n = _visits(start_gmem[i], end_gmem[i], j, split=split, slots=slots,
                                   block_k=block_k)
  col = plgpu.Layout.WGMMA.reduce(0)  # a [block_k] vector along the scores' slot axis
  rowwise = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector along the q rows

  def fetch(s):
    """Starts the TMA copies of step s's K and V blocks into its stage."""
    at = (i, pl.ds(block(s) * block_k, block_k), h)
    stage = jax.lax.rem(s, _STAGES)
    plgpu.copy_gmem_to_smem(k_gmem.at[at], smem["k"].at[stage], smem["k_ready"].at[stage])
    plgpu.copy_gmem_to_smem(v_gmem.at[at], smem["v"].at[stage], smem["v_ready"].at[stage])

  def load_scales(s):
    """Step s's k and v scales [block_k] (plain loads, issued a step ahead of their use)."""
    at = (i, h, pl.ds(jnp.clip(block(s), 0, slots // block_k - 1) * block_k, block_k))
    return tuple(_load_plain(x.at[at], rowwise, interpret) for x in scales)

  def along_slots(x, buf):
    """A [block_k] vector in the scores' column layout (through shared memory, for the GPU)."""
    if interpret:
      return x
    buf[...] = x
    plgpu.commit_smem()
    return _layout(buf[...], col, interpret)

  def step(s, carry):
    o, l, m, *scales_s = carry
    stage = jax.lax.rem(s, _STAGES)

    @pl.when(s + _STAGES - 1 < steps)
    def _():  # into the stage of step s - 1, whose blocks are consumed
      fetch(s + _STAGES - 1)

    scales_next = load_scales(s + 1) if quantized else ()
    plgpu.barrier_wait(smem["k_ready"].at[stage])
    k = _as_queries(smem["k"].at[stage], smem.get("k16"))
    logits = _scores(smem["q"], k, block_k, interpret) * scale
    if quantized:
      logits = logits * jax.lax.broadcast_in_dim(
          along_slots(scales_s[0], smem["scale"].at[0]), logits.shape, [1])
    # Buffer index x is valid where (x - first) mod slots < n.
    x = block(s) * block_k + iota(jnp.int32, logits.shape, 1, **wgmma_layout) - first
    valid = jnp.where(x < 0, x + slots, x) < n
    logits = jnp.where(valid, logits, _NEG)
    m_new = jnp.maximum(m, logits.max(axis=1))
    p = jnp.exp(logits - jax.lax.broadcast_in_dim(m_new, logits.shape, [0]))
    p = jnp.where(valid, p, 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=1)
    if quantized:
      p = p * jax.lax.broadcast_in_dim(along_slots(scales_s[1], smem["scale"].at[1]), p.shape,
                                       [1])
    smem["p"][...] = p.astype(smem["p"].dtype)
    plgpu.barrier_wait(smem["v_ready"].at[stage])
    v = _as_queries(smem["v"].at[stage], smem.get("v16"))
    plgpu.commit_smem()  # p visible to the tensor cores
    o = o * jax.lax.broadcast_in_dim(correction, o.shape, [0]) + _product(smem["p"], v, o.shape)
    return (o, l, m_new, *scales_next)

  plgpu.copy_gmem_to_smem(q_gmem.at[i, h], smem["q"], smem["q_ready"].at[0])
  for s in range(_STAGES - 1):
    pl.when(s < steps)(functools.partial(fetch, s))
  head_dim = q_gmem.shape[-1]
  carry = (_layout(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA, interpret),
           _layout(jnp.zeros((_ROWS,), jnp.float32), rowwise, interpret),
           _layout(jnp.full((_ROWS,), _NEG, jnp.float32), rowwise, interpret),
           *(load_scales(0) if quantized else ()))
  plgpu.barrier_wait(smem["q_ready"].at[0])
  o, l, m, *_ = jax.lax.fori_loop(0, steps, step, carry)
  _write(o, l, m, smem, (o_gmem, l_gmem, m_gmem), (j, i, h), rows_out)


def _as_queries(kv_smem, converted):
  """A K or V block in the queries' dtype: as stored, or converted (a quantized cache)."""
  if converted is None:
    return kv_smem
  # fp8 -> bf16 goes through float32 on Hopper's converters; int8 takes the same path.
  converted[...] = kv_smem[...].astype(jnp.float32).astype(converted.dtype)
  plgpu.commit_smem()  # the whole block written, and visible to the tensor cores
  return converted


def _scores(q_smem, k_smem, block_k: int, interpret: bool):
  """q . k^T [64, block_k] in float32 (wgmma; the interpreter's wgmma takes no transposed B)."""
  if interpret:
    return jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)

  def qk(acc):
    plgpu.wgmma(acc, q_smem, k_smem.transpose((1, 0)))
    return acc[...]
  return pl.run_scoped(qk, plgpu.ACC((_ROWS, block_k), jnp.float32))


def _product(p_smem, v_smem, shape):
  """p . v [64, head_dim] in float32 (wgmma from shared memory, which the interpreter runs)."""
  def pv(acc):
    plgpu.wgmma(acc, p_smem, v_smem)
    return acc[...]
  return pl.run_scoped(pv, plgpu.ACC(shape, jnp.float32))


def _write(o, l, m, smem, outs, at, rows_out: int):
  """Stores the first `rows_out` rows of o, l, m (the group's heads) to their outputs."""
  smem["o"][...] = o
  smem["l"][...] = l
  smem["m"][...] = m
  plgpu.commit_smem()
  for name, out in zip("olm", outs):
    plgpu.copy_smem_to_gmem(smem[name].at[pl.ds(0, rows_out)], out.at[at])
  plgpu.wait_smem_to_gmem(0)


def _scratch(dtype, kv_dtype, block_k: int, head_dim: int, quantized: bool) -> dict:
  """The kernel's shared memory: q, the staged K and V blocks, p, the outputs, the barriers."""
  kv = (_STAGES, block_k, head_dim)
  scratch = dict(
      q=plgpu.SMEM((_ROWS, head_dim), dtype, transforms=_swizzled(dtype, head_dim)),
      k=plgpu.SMEM(kv, kv_dtype, transforms=_swizzled(kv_dtype, head_dim)),
      v=plgpu.SMEM(kv, kv_dtype, transforms=_swizzled(kv_dtype, head_dim)),
      p=plgpu.SMEM((_ROWS, block_k), dtype, transforms=_swizzled(dtype, block_k)),
      o=plgpu.SMEM((_ROWS, head_dim), jnp.float32, transforms=_swizzled(jnp.float32, head_dim)),
      l=plgpu.SMEM((_ROWS,), jnp.float32),
      m=plgpu.SMEM((_ROWS,), jnp.float32),
      q_ready=plgpu.Barrier(num_barriers=1),
      k_ready=plgpu.Barrier(num_barriers=_STAGES),
      v_ready=plgpu.Barrier(num_barriers=_STAGES),
  )
  if quantized:
    block = (block_k, head_dim)
    scratch.update(
        k16=plgpu.SMEM(block, dtype, transforms=_swizzled(dtype, head_dim)),
        v16=plgpu.SMEM(block, dtype, transforms=_swizzled(dtype, head_dim)),
        scale=plgpu.SMEM((2, block_k), jnp.float32))
  return scratch


def _interpret_params(interpret):
  """The interpreter's parameters for `interpret` (True: the defaults), or None (compile)."""
  if not interpret:
    return None
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams() if interpret is True else interpret


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def prefix_attention(q_BxHxD, k_BxSxKxD, v_BxSxKxD, start_B, end_B, *, k_scale_BxKxS=None,
                     v_scale_BxKxS=None, block_k: int = 128, interpret=False) -> jax.Array:
  """Softmax attention of one query per row over the cache slots [start, end) of that row.

  Args:
    q_BxHxD: [batch, heads, head_dim] queries (GQA: head h reads kv head h // (heads/kv_heads)),
      at most 64 heads per kv head.
    k_BxSxKxD, v_BxSxKxD: [batch, slots, kv_heads, head_dim] cache buffers, bf16 or f16 (the
      queries are cast to their dtype), or int8 / float8_e4m3fn with scales (bf16 or f16
      queries); slots a multiple of 64.
    start_B, end_B: [batch] int32 first and one-past-last visible slot (0 <= start,
      end - start <= slots); a row with end <= start sees nothing and gets zeros
      (docs/spec.md §3.5).
      Slot x is read at buffer index x % slots, so a ring buffer's window may wrap around.
    k_scale_BxKxS, v_scale_BxKxS: [batch, kv_heads, slots] float32 scales of a quantized cache
      (k, v int8 or float8_e4m3fn: the values are k * k_scale); None for a float cache.
    block_k: slots per block (128 or 64; the largest that divides `slots`, see `block_size`).
    interpret: run the kernel in Mosaic GPU's interpreter on the CPU (the tests): True, or an
      `InterpretGPUParams`.
  Returns:
    [batch, heads, head_dim] in the dtype of v (of q for a quantized cache).
  """
  b, h, d = q_BxHxD.shape
  _, slots, kv_heads, _ = k_BxSxKxD.shape
  groups = h // kv_heads
  quantized = k_scale_BxKxS is not None
  if quantized != (v_scale_BxKxS is not None):
    raise ValueError("prefix_attention: give both k_scale and v_scale (a quantized cache), or "
                     "neither")
  dtype = q_BxHxD.dtype if quantized else k_BxSxKxD.dtype
  if (reason := _unsupported(slots, dtype, d, groups)) is not None:
    raise ValueError(f"prefix_attention (Mosaic GPU): {reason}")
  bk = block_size(slots, block_k)
  split, k_splits = decode.slices(b, kv_heads, slots, bk)
  rows_out = 8 * math.ceil(groups / 8)  # whole 8-row tiles of the output
  q = q_BxHxD.astype(dtype).reshape(b, kv_heads, groups, d)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, _ROWS - groups), (0, 0)))
  scales = (k_scale_BxKxS.astype(jnp.float32), v_scale_BxKxS.astype(jnp.float32)) if quantized \
      else ()
  kernel = functools.partial(_kernel, block_k=bk, split=split, rows_out=rows_out,
                             scale=1.0 / math.sqrt(d), quantized=quantized,
                             interpret=bool(interpret))
  o, l, m = plgpu.kernel(
      lambda *refs, **smem: kernel(*refs, smem),
      out_type=(jax.ShapeDtypeStruct((k_splits, b, kv_heads, rows_out, d), jnp.float32),
                jax.ShapeDtypeStruct((k_splits, b, kv_heads, rows_out), jnp.float32),
                jax.ShapeDtypeStruct((k_splits, b, kv_heads, rows_out), jnp.float32)),
      scratch_types=_scratch(dtype, k_BxSxKxD.dtype, bk, d, quantized),
      grid=(b, kv_heads, k_splits),
      grid_names=("row", "kv_head", "split"),
      kernel_name="lckv_decode_attention_mgpu",
      interpret=_interpret_params(interpret),
  )(q, k_BxSxKxD, v_BxSxKxD, *scales, start_B.astype(jnp.int32), end_B.astype(jnp.int32))
  out_dtype = q_BxHxD.dtype if quantized else v_BxSxKxD.dtype
  return decode.merge_slices(o, l, m)[:, :, :groups].reshape(b, h, d).astype(out_dtype)

