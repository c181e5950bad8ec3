"""The prefix-reading decode kernel (lckv_jax.kernels.decode) against the dense reference, alone
and through generation (CPU: the Pallas kernel runs in interpret mode)."""

import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.kernels.reference import dot_product_attention
from lckv_jax.generation import generate
from lckv_jax.kernels.decode import block_cap, block_size, heads_per_program, prefix_attention
from tests.generation_test import PRESETS, prompts


# -- the kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,slots", [(4, 2, 64), (3, 3, 48), (8, 1, 32)])
def test_decode_kernel_equals_attention_over_the_span(heads, kv_heads, slots):
  rng = np.random.default_rng(heads)
  b, d = 4, 16
  q = jnp.asarray(rng.normal(size=(b, heads, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, kv_heads, d)), jnp.float32) for _ in range(2))
  start = jnp.asarray([0, 3, slots // 2, 5])
  end = jnp.asarray([slots, slots // 2 + 1, slots - 1, 5])  # the last row sees nothing
  out = prefix_attention(q, k, v, start, end, block_k=16, interpret=True)
  idx = jnp.arange(slots)
  mask = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None]))[:, None, :]
  ref = dot_product_attention(q[:, None], k, v, mask)[:, 0]
  np.testing.assert_allclose(out, ref, atol=2e-6)
  assert float(jnp.abs(out[3]).max()) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_the_compiled_kernel_equals_attention_over_the_span(dtype, atol, heads):
  # Compiled for the GPU (Triton), not interpreted, with one and two kv heads a program: rows of
  # different spans, a ring window that wraps, and a row that sees nothing.
  rng = np.random.default_rng(7)
  b, q_heads, kv_heads, d, slots = 6, 32, 8, 128, 1024
  q = jnp.asarray(rng.normal(size=(b, q_heads, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, kv_heads, d)), dtype) for _ in range(2))
  start = jnp.asarray([0, 0, 100, 900, 5, 512])
  end = jnp.asarray([1, slots, 700, 1200, 5, 1024])  # row 3 wraps past the end
  out = prefix_attention(q, k, v, start, end, heads=heads)
  x = jnp.arange(2 * slots)
  seen = (x[None] >= start[:, None]) & (x[None] < end[:, None])  # slot x at x % slots
  mask = jnp.zeros((b, slots), bool).at[:, x % slots].max(seen)[:, None, :]
  ref = dot_product_attention(q[:, None].astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), mask)[:, 0]
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=atol)
  assert float(jnp.abs(out[4].astype(jnp.float32)).max()) == 0.0


def test_decode_kernel_reads_a_ring_buffer_window_that_wraps():
  # Slot x lives at index x % slots: absolute spans past the buffer's end wrap around.
  rng = np.random.default_rng(7)
  b, slots, d = 4, 32, 16
  q = jnp.asarray(rng.normal(size=(b, 4, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, 2, d)), jnp.float32) for _ in range(2))
  start = jnp.asarray([40, 17, 64, 50])
  end = jnp.asarray([72, 45, 70, 81])  # a full ring, a wrapped span, one inside, a full ring - 1
  out = prefix_attention(q, k, v, start, end, block_k=16, interpret=True)
  idx = jnp.arange(slots)
  mask = (((idx[None] - start[:, None]) % slots) < (end - start)[:, None])[:, None, :]
  ref = dot_product_attention(q[:, None], k, v, mask)[:, 0]
  np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize("pack,heads", [(False, None), (None, 1), (None, 2)])
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_reads_a_quantized_cache_as_its_dequantized_values(name, dtype, pack, heads):
  # int8 / fp8 K and V with one scale per slot and kv head, read as stored (scores scaled by
  # k_scale, probabilities by v_scale): the dense attention over the dequantized buffers, also
  # over a ring's wrapped span; read as int16 words of byte pairs (the default, and a must past
  # 2^31 elements), one or two kv heads a program, and as bytes (pack=False).
  from lckv_jax import quant
  rng = np.random.default_rng(11)
  b, slots, d = 4, 32, 16
  q = jnp.asarray(rng.normal(size=(b, 4, d)), dtype)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, 2, d)) * rng.uniform(0.1, 10, (b, slots, 2, 1)),
                      jnp.float32) for _ in range(2))
  (kq, ks), (vq, vs) = (quant.quantize(x, quant.cache_dtype(name)) for x in (k, v))
  start = jnp.asarray([0, 17, 64, 5])
  end = jnp.asarray([32, 45, 70, 5])  # a full buffer, a wrapped span, one inside, nothing
  out = prefix_attention(q, kq, vq, start, end, k_scale_BxKxS=ks.swapaxes(1, 2),
                         v_scale_BxKxS=vs.swapaxes(1, 2), block_k=16, heads=heads, pack=pack,
                         interpret=True)
  assert out.dtype == dtype
  idx = jnp.arange(slots)
  mask = (((idx[None] - start[:, None]) % slots) < (end - start)[:, None])[:, None, :]
  # In float32: bf16 queries meet the int8 / e4m3 values exactly, scores and scales are float32;
  # only p * v_scale and the output round to bf16 (2^-9 relative).
  ref = dot_product_attention(q[:, None].astype(jnp.float32), quant.dequantize(kq, ks, jnp.float32),
                              quant.dequantize(vq, vs, jnp.float32), mask)[:, 0]
  # Packed, a score is the sum of two half-width products: float32 rounds in another order.
  tol = (2e-6 if pack is False else 2e-5) if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=tol, rtol=tol)
  assert float(jnp.abs(out[3].astype(jnp.float32)).max()) == 0.0
  with pytest.raises(ValueError, match="both k_scale and v_scale"):
    prefix_attention(q, kq, vq, start, end, k_scale_BxKxS=ks.swapaxes(1, 2), interpret=True)


def test_a_1_byte_cache_of_more_than_2_31_elements_is_read_as_words():
  # Pallas Triton's 32-bit offsets (for operands up to 2^32 bytes) wrap past 2^31 elements: 1b
  # int8 at 2,048 slots past 4,096 rows read outside its buffer on the H200. Wider caches are
  # within JAX's own switch to 64-bit offsets.
  import jax
  from lckv_jax.kernels.decode import needs_packing
  cache = lambda rows, dtype: jax.ShapeDtypeStruct((rows, 2048, 4, 64), dtype)  # noqa: E731
  assert not needs_packing(cache(4096, jnp.int8)) and needs_packing(cache(4097, jnp.int8))
  assert needs_packing(cache(4097, jnp.float8_e4m3fn)) and needs_packing(cache(9000, jnp.int8))
  assert not needs_packing(cache(9000, jnp.bfloat16))
  q = jnp.ones((1, 4, 16), jnp.bfloat16)
  kv = jnp.ones((1, 16, 2, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="pack needs a 1-byte cache"):
    prefix_attention(q, kv, kv, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), pack=True,
                     interpret=True)
  # Read as bytes past 2^31 elements: refused when traced (shapes only, nothing allocated).
  rows = 4097
  big, scale = cache(rows, jnp.int8), jax.ShapeDtypeStruct((rows, 4, 2048), jnp.float32)
  row = jax.ShapeDtypeStruct((rows,), jnp.int32)
  with pytest.raises(ValueError, match="must be read packed"):
    jax.eval_shape(lambda *a: prefix_attention(*a[:5], k_scale_BxKxS=a[5], v_scale_BxKxS=a[6],
                                               pack=False),
                   jax.ShapeDtypeStruct((rows, 32, 64), jnp.bfloat16), big, big, row, row, scale,
                   scale)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4096, 4200])
def test_the_compiled_kernel_reads_an_int8_cache_past_2_31_elements(rows):
  # 1b lckv's int8 cache at 2,048 slots: 2^31 elements at 4,096 rows, past it at 4,200 (read
  # as bytes there, 32-bit offsets wrapped: CUDA_ERROR_ILLEGAL_ADDRESS on the H100). Rows from
  # the first to the last against the dense float32 attention over their dequantized slots.
  import jax
  from lckv_jax import quant
  slots, kv_heads, d, heads, seen = 2048, 4, 64, 32, 1000

  def draw(i, shape):  # 64 random rows, repeated: one draw of 2^31 elements would pass int32
    x = jax.random.randint(jax.random.key(i), (64, *shape), -127, 128, jnp.int32)
    return jnp.tile(x.astype(jnp.int8), (-(-rows // 64), 1, 1, 1))[:rows]

  k, v = draw(0, (slots, kv_heads, d)), draw(1, (slots, kv_heads, d))
  ks, vs = (jax.random.uniform(jax.random.key(i), (rows, kv_heads, slots), minval=0.01,
                               maxval=0.06) for i in (2, 3))
  q = jax.random.normal(jax.random.key(4), (rows, heads, d), jnp.bfloat16)
  start, end = jnp.zeros((rows,), jnp.int32), jnp.full((rows,), seen, jnp.int32)
  out = prefix_attention(q, k, v, start, end, k_scale_BxKxS=ks, v_scale_BxKxS=vs)
  for lo in (0, 4088, rows - 8):
    r = slice(lo, lo + 8)
    kd, vd = (quant.dequantize(x[r, :seen], s[r, :, :seen].swapaxes(1, 2), jnp.float32)
              for x, s in ((k, ks), (v, vs)))
    ref = dot_product_attention(q[r, None].astype(jnp.float32), kd, vd,
                                jnp.ones((8, 1, seen), bool))[:, 0]
    np.testing.assert_allclose(np.asarray(out[r], np.float32), ref, atol=3e-2, rtol=2e-2)
  del k, v


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["pallas", "pallas, 2 kv heads a program", "mosaic",
                                    "pallas, bytes", "pallas, 2 kv heads a program, bytes"])
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_the_compiled_kernels_read_a_quantized_cache_as_its_dequantized_values(name, kernel):
  # Both decode kernels (Triton, Mosaic GPU) compiled for the GPU over bf16 queries: int8 / e4m3
  # K and V with their float32 scales, a wrapped span and a row that sees nothing, against the
  # dense float32 attention over the dequantized buffers.
  import functools
  from lckv_jax import quant
  from lckv_jax.kernels import decode, decode_mgpu
  attend = {"pallas": decode.prefix_attention, "mosaic": decode_mgpu.prefix_attention,
            "pallas, 2 kv heads a program": functools.partial(decode.prefix_attention, heads=2),
            "pallas, bytes": functools.partial(decode.prefix_attention, pack=False),
            "pallas, 2 kv heads a program, bytes": functools.partial(decode.prefix_attention,
                                                                     heads=2, pack=False),
            }[kernel]
  rng = np.random.default_rng(13)
  b, heads, kv_heads, d, slots = 4, 32, 8, 128, 1024
  q = jnp.asarray(rng.normal(size=(b, heads, d)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(b, slots, kv_heads, d))
                      * rng.uniform(0.1, 10, (b, slots, kv_heads, 1)), jnp.float32)
          for _ in range(2))
  (kq, ks), (vq, vs) = (quant.quantize(x, quant.cache_dtype(name)) for x in (k, v))
  start = jnp.asarray([0, 100, 900, 5])
  end = jnp.asarray([slots, 700, 1200, 5])
  out = attend(q, kq, vq, start, end, k_scale_BxKxS=ks.swapaxes(1, 2),
               v_scale_BxKxS=vs.swapaxes(1, 2))
  x = jnp.arange(2 * slots)
  seen = (x[None] >= start[:, None]) & (x[None] < end[:, None])
  mask = jnp.zeros((b, slots), bool).at[:, x % slots].max(seen)[:, None, :]
  ref = dot_product_attention(q[:, None].astype(jnp.float32), quant.dequantize(kq, ks, jnp.float32),
                              quant.dequantize(vq, vs, jnp.float32), mask)[:, 0]
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)
  assert float(jnp.abs(out[3].astype(jnp.float32)).max()) == 0.0


def test_gqa_programs_read_their_kv_heads_side_by_side():
  # 1b: 8 q heads per kv head fill 16 rows with 2 kv heads (their K rows are one 128-element
  # read) at a large batch; MHA and groups of 16 keep one kv head a program, as do odd kv heads,
  # wide heads and a batch that needs slices of the slots to fill the GPU (1b at 32 rows).
  assert heads_per_program(8, 4, 64, 4541) == 2 and heads_per_program(8, 4, 128, 128) == 2
  assert heads_per_program(4, 8, 64, 64) == 2 and heads_per_program(6, 4, 64, 128) == 2
  assert heads_per_program(8, 4, 64, 32) == 1
  assert heads_per_program(1, 32, 128, 208) == 1 and heads_per_program(16, 2, 64, 512) == 1
  assert heads_per_program(8, 3, 64, 512) == 1 and heads_per_program(8, 4, 256, 512) == 1
  # Two kv heads a program give the attention one gives: over a wrapped ring span, on a quantized
  # cache, with a row that sees nothing.
  from lckv_jax import quant
  rng = np.random.default_rng(5)
  b, slots, d = 3, 32, 16
  q = jnp.asarray(rng.normal(size=(b, 12, d)), jnp.float32)  # 3 q heads per kv head, 4 kv heads
  k, v = (jnp.asarray(rng.normal(size=(b, slots, 4, d)), jnp.float32) for _ in range(2))
  (kq, ks), (vq, vs) = (quant.quantize(x, jnp.int8) for x in (k, v))
  start, end = jnp.asarray([20, 0, 7]), jnp.asarray([45, 32, 7])
  for kv, scales in (((k, v), {}), ((kq, vq), dict(k_scale_BxKxS=ks.swapaxes(1, 2),
                                                    v_scale_BxKxS=vs.swapaxes(1, 2)))):
    one = prefix_attention(q, *kv, start, end, heads=1, block_k=16, interpret=True, **scales)
    two = prefix_attention(q, *kv, start, end, heads=2, block_k=16, interpret=True, **scales)
    np.testing.assert_allclose(two, one, atol=2e-6)
    assert float(jnp.abs(two[2]).max()) == 0.0
  with pytest.raises(ValueError, match=r"must be one of \(1, 2\) and divide the 4 kv heads, got 4"):
    prefix_attention(q, k, v, start, end, heads=4, interpret=True)


def test_decode_kernel_block_sizes():
  assert block_size(4096) == 128 and block_size(48) == 16 and block_size(96) == 32
  assert block_size(40) is None
  # Shared memory: float32 at head_dim 128 in blocks of 128 slots asked the H200 for 272 KiB (it
  # has 227 KiB); bf16 keeps its 128 slots, float32 and wide heads get fewer.
  assert block_cap(128, 2) == 128 and block_cap(128, 1) == 128 and block_cap(64, 2) == 128
  assert block_cap(128, 4) == 64 and block_cap(256, 2) == 64 and block_cap(256, 4) == 32
  with pytest.raises(ValueError, match="multiple of 16"):
    prefix_attention(jnp.ones((1, 2, 4)), jnp.ones((1, 40, 2, 4)), jnp.ones((1, 40, 2, 4)),
                     jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), interpret=True)


# -- generation through the kernel equals the whole-buffer XLA path ----------------------------


@pytest.mark.parametrize("name", ["lckv", "mixed"])
def test_generation_with_the_decode_kernel_equals_xla(name, tiny_model):
  # Left padding (rows of different lengths), upward reads with the diagonal masked, sliding
  # windows over full buffers and rings: the kernel reads [first valid slot, write_index].
  kw = dict(layer_types=PRESETS[name], decode_attention="dense")
  ps = prompts([9, 4, 6], seed=3)
  ref = generate(tiny_model(std=0.1, sliding_window=3, **kw), ps, max_new_tokens=6,
                 return_logits=True)
  model = tiny_model(std=0.1, sliding_window=3, **{**kw, "decode_attention": "pallas"})
  out = generate(model, ps, max_new_tokens=6, return_logits=True)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,nodiag", [("mixed", False), ("yoco", False), ("lckv", True)])
def test_generation_with_the_decode_kernel_over_ring_buffers_equals_xla(name, nodiag, tiny_model):
  # Windows of 16 slots: the rings of layers read only through windows are 16-slot buffers that
  # the kernel reads, and they wrap. The 3-token row is left-padded by 17 slots, so its valid
  # slots in a ring are fewer than the window after the wrap. force_nodiag masks the diagonal of
  # layers whose source has written this token.
  kw = dict(layer_types=PRESETS[name], sliding_window=16, max_position_embeddings=64,
            force_nodiag=nodiag)
  ps = prompts([20, 3, 11], seed=9)
  ref = generate(tiny_model(std=0.1, **kw, decode_attention="dense"), ps, max_new_tokens=12,
                 return_logits=True)
  out = generate(tiny_model(std=0.1, **kw, decode_attention="pallas"), ps, max_new_tokens=12,
                 return_logits=True)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,preset,window", [("int8", "llama", 3), ("int8", "lckv", 3),
                                                ("int8", "cla", 3), ("int8", "mixed", 16),
                                                ("fp8", "mixed", 16)])
def test_generation_on_a_quantized_cache_with_the_decode_kernel_equals_xla(name, preset, window,
                                                                         tiny_model):
  # The kernel reads the quantized cache; the XLA path reads it dequantized: the same numbers,
  # so the same tokens. Windows of 16 slots make 16-slot rings that the kernel reads and wrap.
  # fp8 on the preset with every layout (the kernel tests read fp8 every way; CI's time).
  kw = dict(layer_types=PRESETS[preset], sliding_window=window, max_position_embeddings=64)
  ps = prompts([20, 3, 11], seed=9)
  ref = generate(tiny_model(std=0.1, **kw, decode_attention="dense"), ps, max_new_tokens=8,
                 return_logits=True, cache_dtype=name)
  out = generate(tiny_model(std=0.1, **kw, decode_attention="pallas"), ps, max_new_tokens=8,
                 return_logits=True, cache_dtype=name)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_quantized_sink_cache_decoding_with_the_kernel_equals_xla(name, tiny_model):
  ps = prompts([5, 3], seed=4)
  kw = dict(layer_types=PRESETS["lckv"], max_position_embeddings=64)
  ref = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="dense"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True, cache_dtype=name)
  out = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="pallas"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True, cache_dtype=name)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_sink_cache_decoding_with_the_kernel_equals_xla(tiny_model):
  ps = prompts([5, 3], seed=4)
  kw = dict(layer_types=PRESETS["lckv"], max_position_embeddings=64)
  ref = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="dense"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True)
  out = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="pallas"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


# -- the throughput benchmark -------------------------------------------------------------------
