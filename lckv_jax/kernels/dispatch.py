"""One attention dispatch: every attention call is described by a typed plan, and one table maps
the plan's kernel to the function that runs it.

A `Plan` says in which forward mode the call attends (`lckv_jax.mode.Mode`: whole sequences
without a cache, a prefill chunk written into an empty or a filled cache, one decode token per
row), what it may see (`Mask`: causal always;
diagonal masked, sliding window, packed documents, the reference's zero key) and which kernel runs
it. `choose` picks the kernel from the config's two knobs, one per kind of call:

- `attention_impl`, chunks attending to their own keys (training, an unpadded prefill into an
  empty cache): `dense`
  (the reference, `kernels/reference.py`), `xla` or `cudnn` (`jax.nn.dot_product_attention`,
  `kernels/fused.py`), `splash` (TPU, `kernels/tpu.py`); `auto` is cudnn on a GPU in 16-bit,
  splash on a TPU, dense otherwise;
- `decode_attention`, decode steps: `pallas` (reads each row's valid cache prefix only,
  `kernels/decode.py`, Pallas's Triton backend), `mosaic` (the same on Pallas's Mosaic GPU
  backend for Hopper, `kernels/decode_mgpu.py`: 16-bit queries, head_dim and slots multiples
  of 64) or `dense`; `auto` is pallas on a GPU (on the H200, 1.30 ms against mosaic's 1.48 ms
  per 1b decode step at batch 32).

A prefill chunk into a filled cache (a long prompt's later chunks, a server's chunked prefill)
takes the same knob's fused kernel with a dense mask ([batch, T, slots], read by cuDNN as a bias:
`cudnn_masked`, `xla_masked`), or the dense reference where that knob resolves to dense or
splash. The reference's zero-key decoding, and every call the kernels above cannot run, take the
dense reference, which runs any mask. Adding a kernel: one file in `kernels/`, one row in
`KERNELS`, its name among the knob's values (`lckv_jax.config`), and a test against `dense`.

A quantized cache buffer (`KV.quantized`: int8 or fp8 K and V with per-token, per-head scales,
`lckv_jax.quant`) is read as stored by the kernels of `READS_QUANTIZED` (the decode kernels);
every other kernel gets it dequantized to the queries' dtype here, at the boundary (`attend`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax

from lckv_jax.kernels import decode, fused, reference, tpu
from lckv_jax.mode import Mode


@dataclasses.dataclass(frozen=True)
class Mask:
  """What a query may see, beyond causality (docs/spec.md §3)."""
  diag_masked: bool  # not its own position
  window: int | None  # only the query and the window - 1 keys before it
  packed: bool = False  # only keys of its own document (segment ids of packed rows)
  zero_key: bool = False  # also one always-visible all-zero key (the reference's decoding, §5)


@dataclasses.dataclass(frozen=True)
class Plan:
  mode: Mode
  kernel: str  # a key of KERNELS
  mask: Mask


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The arrays a kernel may need beside q and the KV: each kernel reads its own."""
  dense_mask: jax.Array | None = None  # [batch, q, slots] visibility (dense)
  segment_ids: jax.Array | None = None  # [batch, q] packed documents (fused kernels)
  span: tuple[jax.Array, jax.Array] | None = None  # [batch] first, one-past-last slot (READS_SPAN)


def resolve_attention_impl(impl: str, dtype: str, backend: str | None = None) -> str:
  """The kernel `attention_impl` names on this backend (`auto` resolved)."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  low = dtype in ("bfloat16", "float16")
  return {"gpu": "cudnn" if low else "dense", "tpu": "splash"}.get(backend, "dense")


def choose(config, mode: Mode, mask: Mask, *, own_keys: bool, contiguous: bool,
           slots: int) -> str:
  """The kernel of one call.

  own_keys: the chunk attends to its own keys only, causal by index (no cache, or an unpadded
    prefill into an empty cache), which the fused kernels need.
  contiguous: each row's cache is one sequence in contiguous slots (`KVCache.contiguous`),
    which the prefix-reading decode kernel needs.
  slots: the cache buffer's length (the decode kernels need whole blocks).
  """
  backend = jax.default_backend()
  if mode is Mode.DECODE and contiguous and not mask.zero_key:
    impl = config.decode_attention
    # auto: the kernel on a GPU, at any buffer length. At 4096 slots one layer's attention
    # takes 65-72 us against XLA's 198 us (H100, 1b, batch 32); at 768 slots both decode at the
    # same speed, but XLA keeps the whole cache in a second, transposed layout inside the decode
    # loop (its temporary buffers equal the cache: 554 of 558 MB; the kernel's: 7 MB).
    if (impl == "pallas" or (impl == "auto" and backend == "gpu")) and decode.block_size(slots):
      return "pallas"
    # Asked for by name only, until measured against the Triton kernel on a Hopper GPU.
    if impl == "mosaic" and _decode_mgpu().supports(
        slots, config.dtype, config.resolved_head_dim, config.num_heads // config.num_kv_heads):
      return "mosaic"
  if mask.zero_key:
    return "dense"
  impl = resolve_attention_impl(config.attention_impl, config.dtype, backend)
  if own_keys:
    return impl
  if mode is not Mode.DECODE and impl in ("cudnn", "xla"):
    return f"{impl}_masked"
  return "dense"


def _dense(q, kv, plan: Plan, inputs: Inputs):
  return reference.dot_product_attention(q, kv.k, kv.v, inputs.dense_mask,
                                         zero_key=plan.mask.zero_key)


def _fused(implementation: str):
  def run(q, kv, plan: Plan, inputs: Inputs):
    t = q.shape[1]  # the chunk's own keys: all of kv without a cache, slots 0..T-1 of an empty one
    return fused.fused_causal_attention(q, kv.k[:, :t], kv.v[:, :t],
                                        diag_masked=plan.mask.diag_masked, window=plan.mask.window,
                                        implementation=implementation,
                                        segment_ids_BxT=inputs.segment_ids)
  return run


def _fused_masked(implementation: str):
  def run(q, kv, plan: Plan, inputs: Inputs):
    return fused.fused_masked_attention(q, kv.k, kv.v, inputs.dense_mask,
                                        implementation=implementation)
  return run


def _splash(q, kv, plan: Plan, inputs: Inputs):
  t = q.shape[1]
  return tpu.splash_attention(q, kv.k[:, :t], kv.v[:, :t], diag_masked=plan.mask.diag_masked,
                              window=plan.mask.window, segment_ids_BxT=inputs.segment_ids,
                              interpret=jax.default_backend() != "tpu")


def _decode_mgpu():
  # Imported when asked for: Mosaic GPU's modules add 0.2 s to every import of the model.
  from lckv_jax.kernels import decode_mgpu
  return decode_mgpu


def _prefix(module: Callable):
  """A decode kernel of `READS_SPAN`: `module()` is its module, whose `prefix_attention` reads
  each row's span of slots (interpreted off a GPU)."""
  def run(q, kv, plan: Plan, inputs: Inputs):
    start, end = inputs.span
    return module().prefix_attention(q[:, 0], kv.k, kv.v, start, end, k_scale_BxKxS=kv.k_scale,
                                     v_scale_BxKxS=kv.v_scale,
                                     interpret=jax.default_backend() != "gpu")[:, None]
  return run


# kernel name -> fn(q [batch, q, heads, head_dim], kv (k, v: [batch, slots, kv_heads, head_dim]),
# plan, inputs) -> [batch, q, heads, head_dim]
# Kernels that read a quantized KV (its k, v and scales) as it is; the others get it dequantized.
READS_QUANTIZED = frozenset({"pallas", "mosaic"})
# Decode kernels that read each row's span of slots (`Inputs.span`), not a dense mask.
READS_SPAN = frozenset({"pallas", "mosaic"})
# Kernels that read a dense mask (`Inputs.dense_mask`); the others need none made.
READS_MASK = frozenset({"dense", "xla_masked", "cudnn_masked"})
KERNELS: dict[str, Callable] = {
    "dense": _dense,
    "xla": _fused("xla"),
    "cudnn": _fused("cudnn"),
    "xla_masked": _fused_masked("xla"),
    "cudnn_masked": _fused_masked("cudnn"),
    "splash": _splash,
    "pallas": _prefix(lambda: decode),
    "mosaic": _prefix(_decode_mgpu),
}


def attend(plan: Plan, q_BxTxHxD, kv, inputs: Inputs):
  """Runs the plan's kernel: [batch, q, heads, head_dim] attention outputs."""
  # The boundary every kernel shares, checked once while tracing (no cost in the compiled step).
  chex.assert_rank([q_BxTxHxD, kv.k, kv.v, kv.pos, kv.seg], [4, 4, 4, 2, 2])
  chex.assert_equal_shape([kv.k, kv.v])
  chex.assert_equal_shape_prefix([q_BxTxHxD, kv.k, kv.pos], 1)  # batch
  chex.assert_equal(q_BxTxHxD.shape[-1], kv.k.shape[-1])  # head_dim
  chex.assert_equal(q_BxTxHxD.shape[2] % kv.k.shape[2], 0)  # GQA: kv heads divide heads
  if plan.mode is Mode.DECODE:
    chex.assert_axis_dimension(q_BxTxHxD, 1, 1)
  if kv.quantized:
    b, slots, kv_heads = kv.k.shape[:3]
    chex.assert_shape([kv.k_scale, kv.v_scale], (b, kv_heads, slots))
    if plan.kernel not in READS_QUANTIZED:
      kv = kv.dequantized(q_BxTxHxD.dtype)
  out = KERNELS[plan.kernel](q_BxTxHxD, kv, plan, inputs)
  chex.assert_equal_shape([out, q_BxTxHxD])
  return out
