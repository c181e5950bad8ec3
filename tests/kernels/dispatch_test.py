"""The attention dispatch: which kernel each kind of call gets, and every kernel it can pick on a
CPU agrees with the dense reference on the calls it is picked for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.attention import KV
from lckv_jax.kernels import dispatch
from lckv_jax.kernels.reference import make_mask
from lckv_jax.mode import Mode

P, D, F, E = Mode.TRAIN, Mode.DECODE, Mode.PREFILL, Mode.PREFILL_EMPTY
PLAIN, ZERO = dispatch.Mask(True, None), dispatch.Mask(True, None, zero_key=True)
MOSAIC = {"decode_attention": "mosaic", "dtype": "bfloat16", "head_dim": 64}


@pytest.mark.parametrize("backend,knobs,chunk,mask,own_keys,contiguous,slots,kernel", [
    ("cpu", {}, P, PLAIN, True, False, 0, "dense"),
    ("gpu", {"dtype": "bfloat16"}, P, PLAIN, True, False, 0, "cudnn"),
    ("gpu", {}, P, PLAIN, True, False, 0, "dense"),  # cuDNN's fused kernel wants 16-bit
    ("tpu", {}, P, PLAIN, True, False, 0, "splash"),
    ("cpu", {"attention_impl": "xla"}, P, PLAIN, True, False, 0, "xla"),
    ("gpu", {"dtype": "bfloat16"}, E, PLAIN, True, True, 128, "cudnn"),  # an unpadded prefill
    ("gpu", {"dtype": "bfloat16"}, F, PLAIN, False, True, 128, "cudnn_masked"),  # a filled cache
    ("gpu", {"dtype": "bfloat16"}, F, PLAIN, False, False, 128, "cudnn_masked"),  # any layout
    ("gpu", {"dtype": "bfloat16"}, E, PLAIN, False, True, 128, "cudnn_masked"),  # padded, unsorted
    ("gpu", {}, F, PLAIN, False, True, 128, "dense"),  # float32: no fused kernel
    ("gpu", {"dtype": "bfloat16", "attention_impl": "dense"}, F, PLAIN, False, True, 128, "dense"),
    ("cpu", {}, F, PLAIN, False, True, 128, "dense"),
    ("cpu", {"attention_impl": "xla"}, F, PLAIN, False, True, 128, "xla_masked"),
    ("tpu", {}, F, PLAIN, False, True, 128, "dense"),  # splash takes no dense mask
    ("gpu", {"dtype": "bfloat16"}, F, ZERO, False, True, 128, "dense"),
    ("gpu", {}, D, PLAIN, False, True, 128, "pallas"),
    ("gpu", {}, D, PLAIN, False, True, 40, "dense"),  # not whole blocks of the kernel
    ("gpu", {}, D, PLAIN, False, False, 128, "dense"),  # rows not contiguous
    ("gpu", {}, D, ZERO, False, True, 128, "dense"),  # the reference's decoding
    ("gpu", {"decode_attention": "dense"}, D, PLAIN, False, True, 128, "dense"),
    ("cpu", {}, D, PLAIN, False, True, 128, "dense"),
    ("cpu", {"decode_attention": "pallas"}, D, PLAIN, False, True, 128, "pallas"),
    ("gpu", MOSAIC, D, PLAIN, False, True, 128, "mosaic"),
    ("cpu", MOSAIC, D, PLAIN, False, True, 128, "mosaic"),  # interpreted
    ("gpu", MOSAIC, D, PLAIN, False, True, 96, "dense"),  # not whole 64-slot blocks
    ("gpu", {**MOSAIC, "dtype": "float32"}, D, PLAIN, False, True, 128, "dense"),  # 16-bit wgmma
    ("gpu", {**MOSAIC, "head_dim": 8}, D, PLAIN, False, True, 128, "dense"),
    ("gpu", MOSAIC, D, ZERO, False, True, 128, "dense"),
])
def test_each_call_gets_its_kernel(monkeypatch, backend, knobs, chunk, mask, own_keys,
                                   contiguous, slots, kernel, tiny_config):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  config = tiny_config(**knobs)
  assert dispatch.choose(config, chunk, mask, own_keys=own_keys, contiguous=contiguous,
                         slots=slots) == kernel
  assert kernel in dispatch.KERNELS


def test_one_name_per_kernel_in_both_knobs(tiny_config):
  # 'xla' once meant the dense path for decode steps and XLA's fused op for chunks.
  assert tiny_config(decode_attention="xla").decode_attention == "dense"
  with pytest.raises(ValueError, match=r"decode_attention must be one of \('auto', 'pallas', "
                                       r"'mosaic', 'dense'\)"):
    tiny_config(decode_attention="cudnn")


def _random(seed, b=2, t=16, heads=4, kv_heads=2, d=8):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, heads, d))
  k = jax.random.normal(ks[1], (b, t, kv_heads, d))
  v = jax.random.normal(ks[2], (b, t, kv_heads, d))
  return q, k, v


@pytest.mark.parametrize("kernel", ["xla", "splash"])
@pytest.mark.parametrize("diag_masked,window,packed", [
    (False, None, False), (True, None, False), (True, 5, False), (False, 4, True),
    (True, None, True)])
def test_chunk_kernels_equal_the_dense_reference(kernel, diag_masked, window, packed):
  q, k, v = _random(1)
  b, t = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  if packed:  # two documents per row, positions restarting, the second row's tail padding
    seg = jnp.array([[1] * 7 + [2] * 9, [1] * 10 + [2] * 3 + [0] * 3], jnp.int32)
    pos = jnp.array([list(range(7)) + list(range(9)), list(range(10)) + list(range(3)) + [0] * 3])
  mask = dispatch.Mask(diag_masked, window, packed)
  kv = KV(k, v, pos, seg)
  dense = dispatch.attend(dispatch.Plan(P, "dense", mask), q, kv, dispatch.Inputs(
      dense_mask=make_mask(pos, seg, pos, seg, diag_masked=diag_masked, window=window)))
  got = dispatch.attend(dispatch.Plan(P, kernel, mask), q, kv,
                        dispatch.Inputs(segment_ids=seg if packed else None))
  real = np.asarray(seg != 0)[:, :, None, None]  # padding queries: zeros from both, not compared
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, dense, 0), atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("diag_masked,window,packed", [
    (False, None, False), (True, None, False), (True, 64, False), (False, None, True)])
def test_cudnn_equals_the_dense_reference_on_a_gpu(diag_masked, window, packed):
  q, k, v = (x.astype(jnp.bfloat16) for x in _random(4, b=2, t=256, heads=8, kv_heads=4, d=64))
  b, t = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  if packed:
    seg = jnp.concatenate([jnp.ones((b, 100), jnp.int32), 2 * jnp.ones((b, t - 100), jnp.int32)],
                          1)
    pos = jnp.concatenate([jnp.arange(100), jnp.arange(t - 100)])[None].repeat(b, 0)
  mask = dispatch.Mask(diag_masked, window, packed)
  kv = KV(k, v, pos, seg)
  dense = dispatch.attend(dispatch.Plan(P, "dense", mask), q.astype(jnp.float32),
                          KV(k.astype(jnp.float32), v.astype(jnp.float32), pos, seg),
                          dispatch.Inputs(dense_mask=make_mask(pos, seg, pos, seg,
                                                               diag_masked=diag_masked,
                                                               window=window)))
  got = dispatch.attend(dispatch.Plan(P, "cudnn", mask), q, kv,
                        dispatch.Inputs(segment_ids=seg if packed else None))
  rows = slice(1, None) if diag_masked else slice(None)  # a masked diagonal: token 0 sees none
  np.testing.assert_allclose(np.asarray(got, np.float32)[:, rows], np.asarray(dense)[:, rows],
                             atol=3e-2)


def _filled_cache_chunk(seed, *, diag_masked, window, b=2, t=8, slots=24, heads=4, kv_heads=2,
                        d=8, dtype=jnp.float32):
  """A chunk of t queries after what a cache of `slots` holds, with the chunk's own KV written
  at its slots: row 0 a prompt from slot 0, row 1 left-padded (its first chunk's padding, masked)
  and ending earlier; slots past each row's chunk are unwritten (segment 0)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, heads, d), dtype)
  k = jax.random.normal(ks[1], (b, slots, kv_heads, d), dtype)
  v = jax.random.normal(ks[2], (b, slots, kv_heads, d), dtype)
  start = jnp.array([10, 6])  # each row's chunk occupies slots [start, start + t)
  pad = jnp.array([0, 3])  # row 1's first 3 slots are padding
  slot = jnp.arange(slots)[None]
  seg = ((slot >= pad[:, None]) & (slot < (start + t)[:, None])).astype(jnp.int32)
  pos = jnp.maximum(slot - pad[:, None], 0) * seg
  q_slot = start[:, None] + jnp.arange(t)[None]
  q_pos = q_slot - pad[:, None]
  q_seg = jnp.ones((b, t), jnp.int32)
  dense_mask = make_mask(q_pos, q_seg, pos, seg, diag_masked=diag_masked, window=window)
  return q, KV(k, v, pos, seg), dense_mask


@pytest.mark.parametrize("diag_masked,window", [(False, None), (True, None), (True, 5),
                                                (False, 4)])
def test_masked_chunk_kernel_equals_the_dense_reference(diag_masked, window):
  # A prefill chunk into a filled cache: jax's fused attention reading the dense mask.
  q, kv, dense_mask = _filled_cache_chunk(6, diag_masked=diag_masked, window=window)
  mask = dispatch.Mask(diag_masked, window)
  inputs = dispatch.Inputs(dense_mask=dense_mask)
  dense = dispatch.attend(dispatch.Plan(F, "dense", mask), q, kv, inputs)
  got = dispatch.attend(dispatch.Plan(F, "xla_masked", mask), q, kv, inputs)
  np.testing.assert_allclose(got, dense, atol=2e-5)


def test_masked_chunk_kernel_gives_zeros_to_a_query_that_sees_nothing():
  q, kv, dense_mask = _filled_cache_chunk(7, diag_masked=True, window=None)
  dense_mask = dense_mask.at[1, :2].set(False)  # two queries of row 1 see no key
  inputs = dispatch.Inputs(dense_mask=dense_mask)
  plan = dispatch.Plan(F, "xla_masked", PLAIN)
  got = np.asarray(dispatch.attend(plan, q, kv, inputs))
  assert np.all(got[1, :2] == 0) and np.all(np.abs(got[1, 2:]).sum(-1) > 0)
  np.testing.assert_allclose(got, dispatch.attend(dispatch.Plan(F, "dense", PLAIN), q, kv, inputs),
                             atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("diag_masked,window,t,slots", [(False, None, 256, 1024),
                                                        (True, None, 256, 1024),
                                                        (True, 64, 64, 512), (False, None, 7, 97)])
def test_cudnn_masked_equals_the_dense_reference_on_a_gpu(diag_masked, window, t, slots):
  q, kv, dense_mask = _filled_cache_chunk(8, diag_masked=diag_masked, window=window, t=t,
                                          slots=slots + 300, heads=8, kv_heads=4, d=64,
                                          dtype=jnp.bfloat16)
  kv = kv._replace(k=kv.k[:, :slots], v=kv.v[:, :slots], pos=kv.pos[:, :slots],
                   seg=kv.seg[:, :slots])
  dense_mask = dense_mask[:, :, :slots]
  mask = dispatch.Mask(diag_masked, window)
  inputs = dispatch.Inputs(dense_mask=dense_mask)
  dense = dispatch.attend(dispatch.Plan(F, "dense", mask), q.astype(jnp.float32),
                          kv._replace(k=kv.k.astype(jnp.float32), v=kv.v.astype(jnp.float32)),
                          inputs)
  got = dispatch.attend(dispatch.Plan(F, "cudnn_masked", mask), q, kv, inputs)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dense), atol=3e-2)


def test_the_decode_kernel_equals_the_dense_reference():
  q, k, v = _random(2, t=32)
  b, slots = k.shape[:2]
  filled = jnp.array([20, 9])  # valid slots [0, filled) per row; this token's slot is filled - 1
  pos = jnp.broadcast_to(jnp.arange(slots), (b, slots))
  seg = (pos < filled[:, None]).astype(jnp.int32)
  kv = KV(k, v, pos, seg)
  q1 = q[:, :1]
  q_pos = (filled - 1)[:, None]
  mask = dispatch.Mask(True, None)
  dense = dispatch.attend(dispatch.Plan(D, "dense", mask), q1, kv, dispatch.Inputs(
      dense_mask=make_mask(q_pos, jnp.ones_like(q_pos), pos, seg, diag_masked=True, window=None)))
  got = dispatch.attend(dispatch.Plan(D, "pallas", mask), q1, kv,
                        dispatch.Inputs(span=(jnp.zeros(b, jnp.int32), filled - 1)))
  np.testing.assert_allclose(got, dense, atol=2e-5)


def test_the_mosaic_decode_kernel_equals_the_dense_reference():
  # Interpreted on a CPU; bf16 queries and head_dim 64, as the kernel takes; an int8 KV read as
  # stored.
  pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret", reason="no Mosaic GPU interpreter")
  from lckv_jax import quant
  q, k, v = _random(5, t=64, d=64)
  b, slots = k.shape[:2]
  filled = jnp.array([50, 9])
  pos = jnp.broadcast_to(jnp.arange(slots), (b, slots))
  seg = (pos < filled[:, None]).astype(jnp.int32)
  (kq, ks), (vq, vs) = (quant.quantize(x, quant.cache_dtype("int8")) for x in (k, v))
  kv = KV(kq, vq, pos, seg, ks.swapaxes(1, 2), vs.swapaxes(1, 2))  # scales: [b, kv_heads, slots]
  q1, q_pos = q[:, :1].astype(jnp.bfloat16), (filled - 1)[:, None]
  dense = dispatch.attend(dispatch.Plan(D, "dense", PLAIN), q1.astype(jnp.float32),
                          kv.dequantized(jnp.float32), dispatch.Inputs(dense_mask=make_mask(
                              q_pos, jnp.ones_like(q_pos), pos, seg, diag_masked=True,
                              window=None)))
  got = dispatch.attend(dispatch.Plan(D, "mosaic", PLAIN), q1, kv,
                        dispatch.Inputs(span=(jnp.zeros(b, jnp.int32), filled - 1)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), dense, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("kernel,mode", [("dense", P), ("xla", P), ("dense", D), ("pallas", D)])
def test_a_quantized_kv_reads_as_its_dequantized_values(kernel, mode, name):
  # Every kernel reads a quantized KV (int8 or fp8 with per-token, per-head scales) as the float
  # KV it stands for: the decode kernel reads it as stored, the others get it dequantized here.
  from lckv_jax import quant
  q, k, v = _random(4, t=32)
  b, slots = k.shape[:2]
  (kq, ks), (vq, vs) = (quant.quantize(x, quant.cache_dtype(name)) for x in (k, v))
  pos = jnp.broadcast_to(jnp.arange(slots), (b, slots))
  filled = jnp.array([slots, 17])
  seg = (pos < filled[:, None]).astype(jnp.int32)
  quantized = KV(kq, vq, pos, seg, ks.swapaxes(1, 2), vs.swapaxes(1, 2))
  assert quantized.quantized and not KV(k, v, pos, seg).quantized
  floats = quantized.dequantized(jnp.float32)
  assert floats.k.dtype == jnp.float32 and floats.k_scale is None
  if mode is D:
    q, q_pos = q[:, :1], (filled - 1)[:, None]
    inputs = dispatch.Inputs(span=(jnp.zeros(b, jnp.int32), filled - 1)) if kernel == "pallas" \
        else dispatch.Inputs(dense_mask=make_mask(q_pos, jnp.ones_like(q_pos), pos, seg,
                                                  diag_masked=True, window=None))
  else:
    seg = jnp.ones_like(seg)  # a whole chunk (the fused kernel: one unpadded sequence per row)
    quantized, floats = quantized._replace(seg=seg), floats._replace(seg=seg)
    inputs = dispatch.Inputs(dense_mask=make_mask(pos, seg, pos, seg, diag_masked=True,
                                                  window=None))
  plan = dispatch.Plan(mode, kernel, PLAIN)
  got = dispatch.attend(plan, q, quantized, inputs)
  assert got.dtype == q.dtype
  np.testing.assert_allclose(got, dispatch.attend(plan, q, floats, inputs), atol=2e-6)
  with pytest.raises(AssertionError):  # scales of another shape
    dispatch.attend(plan, q, quantized._replace(k_scale=ks[:, :, :1]), inputs)


def test_the_boundaries_refuse_shapes_that_do_not_fit(tiny_model):
  q, k, v = _random(3)
  b, t = q.shape[:2]
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  mask = dispatch.Mask(False, None)
  plan = dispatch.Plan(P, "dense", mask)
  inputs = dispatch.Inputs(dense_mask=make_mask(pos, seg, pos, seg, diag_masked=False, window=None))
  with pytest.raises(AssertionError):  # head_dim of the keys differs from the queries'
    dispatch.attend(plan, q, KV(k[..., :4], v[..., :4], pos, seg), inputs)
  with pytest.raises(AssertionError):  # 3 kv heads do not divide 4 query heads
    dispatch.attend(plan, q, KV(jnp.concatenate([k, k[:, :, :1]], 2),
                                jnp.concatenate([v, v[:, :, :1]], 2), pos, seg), inputs)
  # A model's cache of another batch size or layout is refused at `step`.
  from lckv_jax.cache import KVCache
  model = tiny_model(layer_types="lckv")
  cache = KVCache.create(model.config, 3, 16)
  with pytest.raises(AssertionError):
    model.step(jnp.ones((2, 1), jnp.int32), cache, jnp.zeros(2, jnp.int32))
