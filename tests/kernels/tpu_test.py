"""Splash attention (lckv_jax.kernels.tpu) against the XLA reference, in Pallas interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.kernels.reference import dot_product_attention, make_mask
from lckv_jax.kernels.tpu import splash_attention

# One compilation per configuration (interpret-mode compiles dominate the run time).
_splash = jax.jit(splash_attention, static_argnames=("diag_masked", "window", "interpret"))


def _qkv(b, t, h, kv, d, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)  # numpy: jax.random's compiles cost seconds here
  return tuple(jnp.asarray(rng.standard_normal((b, t, n, d), np.float32)).astype(dtype)
               for n in (h, kv, kv))


def _packed(doc_lengths_per_row, t):
  """seg [B, T] (1, 2, ... per document, 0 for trailing padding), pos restarting per document."""
  seg = np.zeros((len(doc_lengths_per_row), t), np.int32)
  pos = np.zeros((len(doc_lengths_per_row), t), np.int32)
  for r, lengths in enumerate(doc_lengths_per_row):
    start = 0
    for i, n in enumerate(lengths):
      seg[r, start:start + n] = i + 1
      pos[r, start:start + n] = np.arange(n)
      start += n
    assert start <= t
  return jnp.asarray(seg), jnp.asarray(pos)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _reference(q, k, v, pos, seg, diag_masked, window):
  mask = make_mask(pos, seg, pos, seg, diag_masked=diag_masked, window=window)
  return dot_product_attention(q, k, v, mask)


# T=20 is not a multiple of the 128 block; GQA with 2 query heads per kv head.
# The other combinations are covered by the packed, bf16 and multi-block tests below.
@pytest.mark.parametrize("diag_masked,window", [(False, None), (True, 5), (False, 1)])
def test_unpacked_matches_reference(diag_masked, window):
  b, t = 2, 20
  q, k, v = _qkv(b, t, 4, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32)
  got = _splash(q, k, v, diag_masked=diag_masked, window=window, interpret=True)
  want = _reference(q, k, v, pos, seg, diag_masked, window)
  assert got.shape == want.shape and got.dtype == v.dtype
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  if diag_masked:
    assert (np.asarray(got[:, 0]) == 0).all()  # the first token sees nothing


def test_diag_masked_window_one_is_empty():
  q, k, v = _qkv(1, 6, 2, 1, 8)
  got = _splash(q, k, v, diag_masked=True, window=1, interpret=True)
  assert got.shape == (1, 6, 2, 8) and (np.asarray(got) == 0).all()


# Packed rows: documents of 1 token (sees nothing with the diagonal masked), padding at the end
# of a row (segment 0), and positions restarting per document for the reference.
_DOCS = [[5, 1, 7, 4], [1, 12, 4]]  # row 0: 3 padding slots, row 1: 3 padding slots
_T = 20


@pytest.mark.parametrize("diag_masked,window", [(True, None), (False, 3)])
def test_packed_matches_reference(diag_masked, window):
  seg, pos = _packed(_DOCS, _T)
  q, k, v = _qkv(2, _T, 4, 2, 16, seed=1)
  got = _splash(q, k, v, diag_masked=diag_masked, window=window, segment_ids_BxT=seg,
                         interpret=True)
  want = _reference(q, k, v, pos, seg, diag_masked, window)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  got = np.asarray(got)
  assert np.isfinite(got).all()
  assert (got[np.asarray(seg) == 0] == 0).all()  # padding rows zeroed
  if diag_masked:
    first = np.asarray(pos) == 0  # first token of every document (and the padding slots)
    assert (got[first] == 0).all()
    assert (np.abs(got[~first & (np.asarray(seg) != 0)]).sum(-1) > 0).all()


def test_bf16_packed_gqa():
  seg, pos = _packed(_DOCS, _T)
  q, k, v = _qkv(2, _T, 4, 1, 32, dtype=jnp.bfloat16, seed=2)  # MQA-like: 4 heads, 1 kv head
  got = _splash(q, k, v, diag_masked=True, window=6, segment_ids_BxT=seg,
                         interpret=True)
  want = _reference(q, k, v, pos, seg, True, 6)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2,
                             rtol=2e-2)
  assert (np.asarray(got.astype(np.float32))[np.asarray(pos) == 0] == 0).all()


def test_several_blocks_window_and_grad():
  """T=300 pads to 384 = 3 blocks of 128; the window of 100 skips block (q 2, kv 0) and crosses
  block edges. Gradients of the splash backward kernels against the reference's, with the
  zeroed rows (first tokens, padding) in the loss."""
  t = 300
  seg, pos = _packed([[130, 1, 120, 40]], t)  # 9 padding slots
  q, k, v = _qkv(1, t, 2, 1, 8, seed=3)
  cot = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape, np.float32))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cot)

  fused = lambda q, k, v: _splash(q, k, v, diag_masked=True, window=100, segment_ids_BxT=seg,
                                  interpret=True)
  ref = lambda q, k, v: _reference(q, k, v, pos, seg, True, 100)
  np.testing.assert_allclose(fused(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
  got = jax.grad(loss, argnums=(1, 2, 3))(fused, q, k, v)
  want = jax.grad(loss, argnums=(1, 2, 3))(ref, q, k, v)
  for g, w in zip(got, want):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_model_with_splash_equals_the_dense_mask_packed_and_unpacked(tiny_config):
  # attention_impl='splash' (what 'auto' picks on TPU) through the whole model, interpreted on
  # the CPU: packed documents (segment ids) and the iteration plan of an LCKV model.
  from flax import nnx

  from lckv_jax import Transformer
  cfg = tiny_config(intermediate_size=48, layer_types="0s_2_2_3", sliding_window=5,
                    forward_passes=2, backward_passes=1, attention_impl="dense")
  dense = Transformer(cfg, rngs=nnx.Rngs(0))
  splash_model = Transformer(cfg.replace(attention_impl="splash"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 20)))
  seg = jnp.asarray([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5])
  pos = jnp.asarray([list(range(8)) + list(range(12)), list(range(15)) + [0] * 5])
  np.testing.assert_allclose(splash_model(tokens), dense(tokens), atol=1e-4)
  valid = np.asarray(seg)[:, :, None] != 0
  np.testing.assert_allclose(np.where(valid, splash_model(tokens, pos, seg), 0),
                             np.where(valid, dense(tokens, pos, seg), 0), atol=1e-4)
