"""The serving path: the prefix-reading decode kernel, the fused fresh prefill, row-chunked
prefill, the per-layer weight layout, and the throughput benchmark end to end (CPU: the Pallas
kernel runs in interpret mode)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax import checkpoint
from lckv_jax import generation as gen_lib
from lckv_jax.kernels.reference import dot_product_attention
from lckv_jax.generation import Generator, generate
from lckv_jax.kernels.decode import block_size, prefix_attention
from lckv_jax.model import relayout
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


def test_decode_kernel_block_sizes():
  assert block_size(4096) == 128 and block_size(48) == 16 and block_size(96) == 32
  assert block_size(40) is None
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


def test_sink_cache_decoding_with_the_kernel_equals_xla(tiny_model):
  ps = prompts([5, 3], seed=4)
  kw = dict(layer_types=PRESETS["lckv"], max_position_embeddings=64)
  ref = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="dense"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True)
  out = generate(tiny_model(std=0.1, sliding_window=3, **kw, decode_attention="pallas"), ps,
                 max_new_tokens=20, sink=(2, 14), return_logits=True)
  assert out.tokens == ref.tokens
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


# -- prefill: fused fresh chunks, row chunks, last-token logits ---------------------------------


@pytest.mark.parametrize("name", ["lckv", "yoco"])
def test_fresh_prefill_takes_the_fused_kernel_and_equals_the_masked_one(name, tiny_model):
  # attention_impl='xla' is jax.nn.dot_product_attention's causal path on the CPU: the same
  # formulation (causal by index, shifted diagonal, local window) as cuDNN on a GPU.
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS[name], attention_impl="xla")
  t, pos, seg, _ = gen_lib.pad_prompts(prompts([10, 10], seed=5), 64)
  outs = []
  for fresh in (False, True):
    cache = gen_lib.cache_lib.init_cache(model.config, 2, 16)
    logits, cache = gen_lib.prefill(model, t, pos, seg, cache, jnp.zeros(2, jnp.int32),
                                    all_logits=True, fresh=fresh)
    outs.append((logits, cache))
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefill_in_row_chunks_equals_one_prefill(tiny_model):
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS["lckv"])
  ps = prompts([7, 3, 5, 7, 2], seed=6)
  whole = Generator(model, max_new_tokens=4, max_len=16, return_logits=True)
  chunked = Generator(model, max_new_tokens=4, max_len=16, return_logits=True, prefill_batch=2)
  a, b = whole.decode(whole.start(ps)), chunked.decode(chunked.start(ps))
  assert whole.results(a) == chunked.results(b)
  np.testing.assert_allclose(b.logits, a.logits, atol=1e-5)
  with pytest.raises(ValueError, match="prefill_batch"):
    Generator(model, max_new_tokens=4, prefill_batch=0)


# -- weight layout ------------------------------------------------------------------------------


def test_relayout_keeps_the_function_and_loads_unstacked(tmp_path, tiny_model):
  # CLA: one scanned run of 2-layer blocks
  model = tiny_model(std=0.1, sliding_window=3, layer_types="0_0_2_2")
  assert model.config.scan_layers and len(model.runs) == 1
  flat = relayout(model, scan_layers=False)
  assert not flat.config.scan_layers and len(flat.runs) == 4
  tokens = jnp.asarray(prompts([12, 12], seed=7))
  np.testing.assert_allclose(flat(tokens), model(tokens), atol=1e-5)
  np.testing.assert_allclose(relayout(flat, scan_layers=True)(tokens), model(tokens), atol=1e-5)
  # Generator(unstack=True) decodes the same tokens from the per-layer copy.
  ps = prompts([6, 3], seed=8)
  assert (Generator(model, max_new_tokens=5, unstack=True).model.config.scan_layers is False)
  assert generate(model, ps, max_new_tokens=5).tokens == generate(flat, ps, max_new_tokens=5).tokens
  # A stacked checkpoint loads straight into the per-layer layout.
  checkpoint.save_model(str(tmp_path / "m"), model)
  loaded = checkpoint.load_model(str(tmp_path / "m"), scan_layers=False)
  assert not loaded.config.scan_layers
  np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-5)


# -- the throughput benchmark -------------------------------------------------------------------


def test_find_max_batch_doubles_then_bisects():
  import benchmarks.throughput as tp
  for cap in (1, 37, 100, 1000, 4097):
    probes = []

    def fits(b, cap=cap):
      probes.append(b)
      return b <= cap

    for start in (1, 32, 5000):
      probes.clear()
      assert tp.find_max_batch(fits, start=start, resolution=0) == cap
      assert len(probes) < 40
  assert tp.find_max_batch(lambda b: False, start=8) == 0


def test_throughput_smoke(tmp_path):
  import benchmarks.throughput as tp
  path = tp.main(["--smoke", "--layer_types", "llama", "lckv", "--out", str(tmp_path)])
  records = json.load(open(path))
  assert [r["label"] for r in records] == ["tiny llama", "tiny lckv"]
  for r in records:
    assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["roofline_decode_s"] > 0 and r["prefill_flop_s"] > 0
    assert r["cache_bytes"] > 0 and r["batch"] == 2
  assert records[1]["cache_bytes"] < records[0]["cache_bytes"]  # LCKV caches 3 of 4 layers


def test_start_hands_the_cache_through_without_a_copy(tiny_model):
  # `_first` (the first token) donates the decode state: its cache is the prefill's buffer, not
  # a copy, so a large batch never holds two caches at the start.
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS["lckv"])
  gen = Generator(model, max_new_tokens=4, max_len=32)
  state = gen.start(prompts([5, 5], seed=9))
  analysis = gen_lib._first.lower(gen.settings, state, jnp.zeros((2, 64)),
                                  jax.random.key(0)).compile().memory_analysis()
  cache = sum(x.nbytes for x in jax.tree.leaves(state.cache))
  assert analysis.alias_size_in_bytes >= cache


def test_decode_profile_runs_and_reads_the_decode_loop_memory(tmp_path):
  # On the CPU the trace has no GPU kernels; the timing and XLA's memory analysis still run.
  import benchmarks.decode_profile as dp
  out = tmp_path / "p.jsonl"
  dp.main(["--shape=tiny", "--layer_types=lckv", "--batch=2", "--prompt=8", "--gen=12",
           "--steps=4", f"--out={out}"])
  record = json.loads(out.read_text().splitlines()[0])
  assert record["kernels_per_token"] == 0 and len(record["wall_ms_per_token"]) == 2
  assert record["decode_alias_bytes"] >= record["cache_bytes"] > 0
  kernels = [("b", 10, 4), ("a", 0, 6), ("a", 20, 6)]
  s = dp.summarize(sorted(kernels, key=lambda k: k[1]), steps=2)
  assert s["kernels_per_token"] == 1.5 and s["largest"][0]["name"] == "a"
  assert s["idle_fraction"] == round(1 - 16 / 26, 3)
