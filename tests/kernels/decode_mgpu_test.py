"""The Mosaic GPU decode kernel (lckv_jax.kernels.decode_mgpu) against the dense reference, alone
and through generation. On the CPU the kernel runs in Mosaic GPU's interpreter (which simulates
its shared memory, TMA copies and barriers) and is lowered for the GPU without one (which checks
its register layouts and shared-memory budget); `-m gpu` compiles and runs it on a Hopper GPU."""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax import quant
from lckv_jax.generation import generate
from lckv_jax.kernels import decode_mgpu
from lckv_jax.kernels.decode_mgpu import block_size, prefix_attention
from lckv_jax.kernels.reference import dot_product_attention
from tests.generation_test import PRESETS, prompts

_INTERPRETER = "jax._src.pallas.mosaic_gpu.interpret"


def _has_interpreter() -> bool:
  try:
    return importlib.util.find_spec(_INTERPRETER) is not None
  except ImportError:
    return False


interpreted = pytest.mark.skipif(not _has_interpreter(),
                                 reason=f"this JAX has no Mosaic GPU interpreter ({_INTERPRETER})")


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  # The interpreter keeps its simulated GPU between kernels; after a kernel that raised, it must
  # be reset before the next.
  yield
  if _has_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    interpret_pallas_call.reset_gpu_interpret_mode_state()


def _span_mask(start, end, slots):
  """[batch, 1, slots]: buffer index x is visible where x holds a slot of [start, end)."""
  x = jnp.arange(slots)
  n = jnp.clip(end - start, 0, slots)
  return (((x[None] - start[:, None]) % slots) < n[:, None])[:, None, :]


def _reference(q, k, v, start, end):
  """The dense float32 attention over the span, of float32 (or dequantized) q, k, v."""
  return dot_product_attention(q[:, None].astype(jnp.float32), k.astype(jnp.float32),
                               v.astype(jnp.float32), _span_mask(start, end, k.shape[1]))[:, 0]


def _random(seed, b, heads, kv_heads, slots, d, dtype):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, heads, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, kv_heads, d)), dtype) for _ in range(2))
  return q, k, v


# -- the kernel, interpreted ---------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("heads,kv_heads,slots,dtype", [
    (4, 2, 128, jnp.bfloat16), (3, 3, 64, jnp.float16), (8, 1, 64, jnp.bfloat16)])
def test_decode_kernel_equals_attention_over_the_span(heads, kv_heads, slots, dtype):
  # Rows of different spans (two blocks, a partial block each side, one slot, none) and GQA groups
  # of 2, 1 and 8 q heads.
  q, k, v = _random(heads, 4, heads, kv_heads, slots, 64, dtype)
  start = jnp.asarray([0, 3, slots // 2, 5])
  end = jnp.asarray([slots, slots // 2 + 1, slots // 2 + 1, 5])  # the last row sees nothing
  out = prefix_attention(q, k, v, start, end, interpret=True)
  assert out.dtype == dtype
  # Only p rounds to 16 bits before the value product (2^-9 relative in bf16, 2^-12 in f16).
  np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, start, end),
                             atol=1e-2 if dtype == jnp.bfloat16 else 2e-3)
  assert float(jnp.abs(out[3].astype(jnp.float32)).max()) == 0.0


@interpreted
def test_decode_kernel_reads_a_ring_buffer_window_that_wraps():
  # Slot x lives at index x % slots: absolute spans past the buffer's end wrap around. 64-slot
  # blocks of a 128-slot ring: a full ring (its wrapped part and its start share block 0), a
  # wrapped span, one inside, a full ring - 1.
  q, k, v = _random(7, 4, 4, 2, 128, 64, jnp.bfloat16)
  start = jnp.asarray([160, 100, 256, 200])
  end = jnp.asarray([288, 150, 270, 327])
  out = prefix_attention(q, k, v, start, end, block_k=64, interpret=True)
  np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, start, end), atol=1e-2)


@interpreted
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_decode_kernel_reads_a_quantized_cache_as_its_dequantized_values(name, dtype):
  # int8 / fp8 K and V with one scale per slot and kv head, read as stored (converted to the
  # queries' dtype in shared memory, scores scaled by k_scale, probabilities by v_scale): the
  # dense float32 attention over the dequantized buffers, also over a ring's wrapped span.
  rng = np.random.default_rng(11)
  b, slots, d = 4, 128, 64
  q = jnp.asarray(rng.normal(size=(b, 4, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, 2, d)) * rng.uniform(0.1, 10, (b, slots, 2, 1)),
                      jnp.float32) for _ in range(2))
  (kq, ks), (vq, vs) = (quant.quantize(x, quant.cache_dtype(name)) for x in (k, v))
  start = jnp.asarray([0, 100, 256, 5])
  end = jnp.asarray([128, 150, 270, 5])  # a full buffer, a wrapped span, one inside, nothing
  out = prefix_attention(q, kq, vq, start, end, k_scale_BxKxS=ks.swapaxes(1, 2),
                         v_scale_BxKxS=vs.swapaxes(1, 2), interpret=True)
  assert out.dtype == dtype
  ref = _reference(q, quant.dequantize(kq, ks, jnp.float32), quant.dequantize(vq, vs, jnp.float32),
                   start, end)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2, rtol=2e-2)
  assert float(jnp.abs(out[3].astype(jnp.float32)).max()) == 0.0


@interpreted
def test_the_kernel_has_no_data_race():
  # The interpreter's race detector over the double-buffered blocks, a quantized cache's
  # converted blocks and scales, and p, which every block rewrites.
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  q, k, v = _random(3, 2, 4, 2, 256, 64, jnp.float32)
  kq, ks = quant.quantize(k, quant.cache_dtype("int8"))
  vq, vs = quant.quantize(v, quant.cache_dtype("int8"))
  start, end = jnp.asarray([0, 200]), jnp.asarray([256, 400])
  out = prefix_attention(q.astype(jnp.bfloat16), kq, vq, start, end,
                         k_scale_BxKxS=ks.swapaxes(1, 2), v_scale_BxKxS=vs.swapaxes(1, 2),
                         block_k=64,
                         interpret=InterpretGPUParams(detect_races=True))
  jax.block_until_ready(out)
  assert not interpret_pallas_call.get_races().races_found


def test_decode_kernel_visits_each_block_of_the_span_once():
  # The blocks a slice reads: every valid slot of the slice in exactly one of them, none without
  # a valid slot (the bytes read are the span's), over random spans, wraps and slices.
  slots, bk, split = 512, 64, 192  # 8 blocks, slices of 3 blocks (the last one of 2)
  rng = np.random.default_rng(0)
  start = rng.integers(0, 3 * slots, 400)
  end = start + rng.integers(-2, slots + 1, 400)
  j = rng.integers(0, 3, 400)
  most = split // bk

  def plan(start, end, j):
    steps, block, first, n = decode_mgpu._visits(start, end, j, split=split, slots=slots,
                                                 block_k=bk)
    return steps, jax.vmap(block)(jnp.arange(most)), first, n

  steps, blocks, first, n = map(np.asarray, jax.jit(jax.vmap(plan))(start, end, j))
  for r in range(len(start)):
    x = np.arange(j[r] * split, min((j[r] + 1) * split, slots))
    valid = x[((x - first[r]) % slots) < n[r]]
    read = blocks[r, :steps[r]]
    assert len(set(read)) == len(read) <= most
    assert sorted(set(valid // bk)) == sorted(read), (start[r], end[r], j[r])


def test_what_the_kernel_runs():
  assert block_size(4096) == 128 and block_size(192) == 64 and block_size(4096, 64) == 64
  assert block_size(48) is None
  assert decode_mgpu.supports(1024, jnp.bfloat16, 128, 4)
  assert not decode_mgpu.supports(1024, jnp.float32, 128, 4)  # wgmma takes 16-bit operands
  assert not decode_mgpu.supports(96, jnp.bfloat16, 128, 4)
  assert not decode_mgpu.supports(1024, jnp.bfloat16, 8, 4)
  q, k, v = _random(0, 1, 2, 1, 64, 64, jnp.float32)
  z, o = jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)
  with pytest.raises(ValueError, match="16-bit operands"):
    prefix_attention(q, k, v, z, o, interpret=True)
  with pytest.raises(ValueError, match="multiple of 64"):
    prefix_attention(q[..., :16], k[:, :48, :, :16], v[:, :48, :, :16], z, o, interpret=True)
  kq, ks = quant.quantize(k, quant.cache_dtype("int8"))
  with pytest.raises(ValueError, match="both k_scale and v_scale"):
    prefix_attention(q.astype(jnp.bfloat16), kq, kq, z, o, k_scale_BxKxS=ks.swapaxes(1, 2),
                     interpret=True)


# -- the kernel, lowered for the GPU on any machine ----------------------------------------------


@pytest.mark.parametrize("name", [None, "int8", "fp8"])
def test_the_kernel_lowers_for_a_hopper_gpu(name):
  # Lowering to a Mosaic GPU module runs the compiler's checks of register layouts, tiled
  # shared-memory transfers and the shared-memory budget (227 KB), here without a GPU, at 1b's
  # shapes (32 heads, 8 kv heads, head_dim 128, 128-slot blocks).
  q, k, v = _random(0, 2, 32, 8, 1024, 128, jnp.bfloat16)
  kw = {}
  if name is not None:
    (k, ks), (v, vs) = (quant.quantize(x, quant.cache_dtype(name)) for x in (k, v))
    kw = dict(k_scale_BxKxS=ks.swapaxes(1, 2), v_scale_BxKxS=vs.swapaxes(1, 2))
  span = (jnp.zeros(2, jnp.int32), jnp.full(2, 700, jnp.int32))
  attend = jax.jit(functools.partial(prefix_attention, **kw))
  text = attend.trace(q, k, v, *span).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


# -- the kernel, compiled on a GPU ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 2e-2), (jnp.float16, 4e-3)])
def test_the_compiled_kernel_equals_attention_over_the_span(dtype, atol):
  # Compiled for the GPU (Mosaic GPU), not interpreted: 1b's heads, rows of different spans, a
  # ring window that wraps, and a row that sees nothing.
  b, heads, kv_heads, d, slots = 6, 32, 8, 128, 1024
  q, k, v = _random(7, b, heads, kv_heads, slots, d, dtype)
  start = jnp.asarray([0, 0, 100, 900, 5, 512])
  end = jnp.asarray([1, slots, 700, 1200, 5, 1024])  # row 3 wraps past the end
  out = prefix_attention(q, k, v, start, end)
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference(q, k, v, start, end),
                             atol=atol)
  assert float(jnp.abs(out[4].astype(jnp.float32)).max()) == 0.0


@pytest.mark.gpu
def test_the_compiled_kernel_equals_the_triton_kernel_at_long_spans():
  # 7b-like groups (4 q heads per kv head) over 8192 slots, several slices per row: the two
  # decode kernels agree.
  from lckv_jax.kernels import decode
  b, heads, kv_heads, d, slots = 8, 32, 8, 128, 8192
  q, k, v = _random(5, b, heads, kv_heads, slots, d, jnp.bfloat16)
  start = jnp.asarray([0, 17, 4000, 8000, 100, 0, 9000, 3])
  end = jnp.asarray([8192, 5000, 9000, 16000, 101, 8191, 9000, 4099])
  out = prefix_attention(q, k, v, start, end)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(decode.prefix_attention(q, k, v, start, end), np.float32),
                             atol=2e-2)


# -- generation through the kernel equals the dense path ----------------------------------------


# On the GPU only: in the CPU interpreter the two generations took 78 s of CI's time, and the
# kernel's numerics are tested above in the interpreter (Triton, not Mosaic, is the default).
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [None, "int8"])
def test_generation_with_the_mosaic_kernel_equals_dense(cache_dtype, tiny_model):
  # bf16 (the kernel's queries are 16-bit) and head_dim 64. Layer 0 reads a 64-slot ring
  # (window 64) that the 70-token row wraps, the others 128-slot buffers; rows of different
  # lengths (left padding). The kernel and the dense path round p and the logits to bf16 at
  # different places: the same tokens, logits within two bf16 ulps.
  kw = dict(layer_types=PRESETS["mixed"], sliding_window=64, max_position_embeddings=256,
            head_dim=64, dtype="bfloat16")
  ps = prompts([70, 3, 40], seed=9)
  run = dict(max_new_tokens=6, return_logits=True, cache_dtype=cache_dtype, max_len=128)
  ref = generate(tiny_model(std=0.1, **kw, decode_attention="dense"), ps, **run)
  out = generate(tiny_model(std=0.1, **kw, decode_attention="mosaic"), ps, **run)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(np.asarray(out.logits, np.float32),
                             np.asarray(ref.logits, np.float32), atol=4e-2, rtol=2e-2)
