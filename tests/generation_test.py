"""Prefill + decoding against the sequential mode, HF Llama, padding, insertion, CLI, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax import ModelConfig
from lckv_jax import generation as gen_lib
from lckv_jax.cache import KVCache
from lckv_jax.generation import Generator, PrefillJob, generate
from lckv_jax.sampling import Sampling
from lckv_jax.mode import Mode
from tests import ROOT as REPO, reference
from tests.checkpoint_test import LIMITED, VOCAB

PRESETS = {"llama": "0_1_2_3", "lckv": "0_2_2_3", "cla": "0_0_2_2", "yoco": "0s_1s_2_2",
           "mixed": "0s_3_3s_3"}


def prompts(lengths, seed=0, vocab=64):
  rs = np.random.RandomState(seed)
  return [rs.randint(0, vocab, n).tolist() for n in lengths]


# -- exactness: prefill + decode = the sequential mode ---------------------------------------------


@pytest.mark.parametrize("name,mode,window", [
    ("llama", "auto", 3), ("lckv", "auto", 3), ("lckv", "parallel", 3), ("cla", "auto", 3),
    ("yoco", "auto", 3), ("mixed", "parallel", 3),
    # Windows longer than the prompts: the prefill's ring buffers hold the whole prompt, and
    # wrap during decoding.
    ("yoco", "auto", 8), ("mixed", "parallel", 8)])
def test_prefill_and_decode_give_the_sequential_logits(name, mode, window, tiny_model):
  model = tiny_model(std=0.1, layer_types=PRESETS[name], sliding_window=window)
  ps = prompts([7, 4])
  new = 5
  # Parallel prefill with iterations >= prompt length is the exact model (docs/spec.md §4).
  g = generate(model, ps, max_new_tokens=new, return_logits=True, prefill_mode=mode,
               prefill_iterations=7 if mode == "parallel" else None)
  # The oracle: the sequential mode on the left-padded prompt + generated tokens.
  full, positions, segs, lengths = gen_lib.pad_prompts(
      [p + t for p, t in zip(ps, g.tokens)], 64)
  seq = np.asarray(model.sequential(jnp.asarray(full), jnp.asarray(positions), jnp.asarray(segs)))
  for r, p in enumerate(ps):
    start = full.shape[1] - lengths[r] + len(p) - 1
    np.testing.assert_allclose(g.logits[r], seq[r, start:start + new], atol=1e-4, rtol=1e-4)
    assert g.tokens[r] == np.argmax(seq[r, start:start + new], -1).tolist()
  if mode == "parallel":  # the prompt logits of the prefill too (row 0 has no padding)
    cache = KVCache.create(model.config, 1, 12)
    t, pos, sg, _ = gen_lib.pad_prompts(ps[:1], 64)
    logits, _ = gen_lib.prefill(model, t, pos, sg, cache, jnp.zeros(1, jnp.int32),
                                prefill_mode=mode, iterations=7, all_logits=True)
    np.testing.assert_allclose(logits[0], seq[0, :7], atol=1e-4, rtol=1e-4)


def test_short_prefill_is_the_approximation_of_the_plan(tiny_model):
  # With fewer iterations than tokens a cyclic model's prefill is the plan (m = 2, b = 1).
  model = tiny_model(std=0.1, sliding_window=3, layer_types="3_3_3_3")
  p = jnp.asarray(prompts([10]))
  cache = KVCache.create(model.config, 1, 10)
  logits, _ = gen_lib.prefill(model, p, jnp.arange(10)[None], jnp.ones_like(p), cache,
                              jnp.zeros(1, jnp.int32), iterations=3, all_logits=True)
  np.testing.assert_allclose(logits, model(p, forward_passes=2, backward_passes=1), atol=1e-5)


# -- HuggingFace greedy generation -----------------------------------------------------------------


def test_llama_greedy_tokens_match_huggingface_generate():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
      max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.1)
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
                    max_position_embeddings=64)
  model = reference.model_from_hf(hf, cfg)
  p = prompts([6], seed=3, vocab=96)[0]
  with torch.no_grad():
    ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                      max_new_tokens=10, do_sample=False)[0, 6:].tolist()
  assert len(ref) == 10 and len(set(ref)) > 2
  assert generate(model, [p], max_new_tokens=10).tokens[0] == ref


# -- batching --------------------------------------------------------------------------------------


def test_mixed_length_batch_eos_and_insertion(tiny_model):
  # Left padding, ring buffers (layer 0) and a cycle (layers 1-3) in one model.
  model = tiny_model(std=0.1, sliding_window=3, layer_types="0s_3_3s_3")
  gen = Generator(model, max_new_tokens=6, max_len=16)
  a, b, c = prompts([5, 3, 7], seed=4)
  alone = [gen.results(gen.decode(gen.start([p])))[0] for p in (a, b, c)]
  assert gen.results(gen.decode(gen.start([a, b, c]))) == alone
  # Per-row EOS: each row stops at its first EOS.
  eos = alone[0][2]
  stopped = generate(model, [a, b, c], max_new_tokens=6, max_len=16, eos_id=eos).tokens
  assert stopped == [t[:t.index(eos) + 1] if eos in t else t for t in alone]
  # Continuous batching: row 0 finishes early (budget 2), `c` is inserted there.
  state = gen.decode(gen.start([a, b], max_new_tokens=[2, 6]), num_steps=3)
  assert bool(state.done[0]) and not bool(state.done[1])
  assert gen.results(state)[0] == alone[0][:2]
  state = gen.decode(gen.insert(state, 0, gen.start([c])))
  assert gen.results(state) == [alone[2], alone[1]]


# -- sampling, text, errors ------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_text_prompts_use_a_tokenizer(tiny_model):
  model = tiny_model(std=0.1, sliding_window=3, layer_types="cla", vocab_size=256)
  tok = gen_lib.ByteTokenizer()
  kw = dict(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, tokenizer=tok)
  g1, g2 = generate(model, "héllo", seed=3, **kw), generate(model, "héllo", seed=3, **kw)
  g3 = generate(model, "héllo", seed=4, **kw)
  assert g1.tokens == g2.tokens and g1.tokens != g3.tokens
  assert isinstance(g1.texts[0], str) and g1.texts[0] == tok.decode(g1.tokens[0])


def test_bad_inputs_raise_clear_errors(tiny_model):
  model = tiny_model(std=0.1, sliding_window=3)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(model, [[1, 2], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="longer than the cache"):
    generate(model, [list(range(10))], max_new_tokens=2, max_len=8)
  with pytest.raises(ValueError, match="max_len=8"):
    generate(model, [list(range(6))], max_new_tokens=4, max_len=8)
  with pytest.raises(ValueError, match="temperature"):
    generate(model, [[1]], temperature=-0.5)
  for top_p in (0.0, 1.5):
    with pytest.raises(ValueError, match="top_p"):
      generate(model, [[1]], temperature=1.0, top_p=top_p)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(model, [[1, 999]])
  with pytest.raises(ValueError, match="tokenizer"):
    generate(model, "text without a tokenizer")
  with pytest.raises(ValueError, match="longer than the sink cache"):
    generate(model, [list(range(10))], sink=(2, 4))


# -- the command line ------------------------------------------------------------------------------


def _run(args, **kw):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, **kw)


# -- sharded inference -----------------------------------------------------------------------------

_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    import json, jax, numpy as np
    from tests.generation_test import prompts
    from tests.tiny import tiny_model
    from lckv_jax.generation import Generator, generate
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    ps = prompts([5, 3, 6, 2], seed=5)
    out = {}
    for name in ("0s_2_2s_3",):
      ref = generate(tiny_model(std=0.1, sliding_window=3, layer_types=name, num_kv_heads=4), ps,
                     max_new_tokens=5, return_logits=True)
      model = tiny_model(std=0.1, sliding_window=3, layer_types=name, num_kv_heads=4)
      got = generate(model, ps, max_new_tokens=5, return_logits=True, mesh=mesh)
      q = model.blocks[0].layers[0].attn.q_proj[...]
      out[name] = dict(same=got.tokens == ref.tokens,
                       err=float(np.abs(got.logits - ref.logits).max()),
                       q_shards=len(q.sharding.device_set), q_spec=str(q.sharding.spec))
      # The per-layer copy that Generator(unstack=True) decodes with is the one sharded.
      gen = Generator(tiny_model(std=0.1, sliding_window=3, layer_types=name, num_kv_heads=4),
                      max_new_tokens=5, mesh=mesh, unstack=True, return_logits=True)
      state = gen.decode(gen.start(ps))
      q = gen.model.blocks[0].layers[0].attn.q_proj[...]
      out[name + " unstacked"] = dict(
          same=gen.results(state) == ref.tokens,
          err=float(np.abs(np.asarray(state.logits) - ref.logits).max()),
          q_shards=len(q.sharding.device_set), q_spec=str(q.sharding.spec))
    print(json.dumps(out))
""")


def test_sharded_decode_matches_single_device():
  out = _run(["-c", _SHARDED])
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  for name, r in res.items():
    assert r["same"], (name, r)
    assert r["err"] < 1e-4, (name, r)
    assert r["q_shards"] == 8 and "tensor" in r["q_spec"], (name, r)


# -- prefill: unpadded chunks into an empty cache, row chunks, the first token --------------------------------------


@pytest.mark.parametrize("name", ["lckv", "yoco"])
def test_unpadded_empty_prefill_takes_the_fused_kernel_and_equals_the_masked_one(name, tiny_model):
  # attention_impl='xla' is jax.nn.dot_product_attention's causal path on the CPU: the same
  # formulation (causal by index, shifted diagonal, local window) as cuDNN on a GPU.
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS[name], attention_impl="xla")
  t, pos, seg, _ = gen_lib.pad_prompts(prompts([10, 10], seed=5), 64)
  outs = []
  # Positions and segments given: the dense mask; none (no padding) into an empty cache: the
  # fused kernel, causal by index.
  for inputs, mode in (((pos, seg), Mode.PREFILL), ((None, None), Mode.PREFILL_EMPTY)):
    cache = KVCache.create(model.config, 2, 16)
    logits, cache = gen_lib.prefill(model, t, *inputs, cache, jnp.zeros(2, jnp.int32),
                                    mode=mode, all_logits=True)
    outs.append((logits, cache))
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["lckv", "yoco", "llama"])
def test_left_padded_empty_prefill_takes_the_fused_kernel_and_equals_the_masked_one(
    name, tiny_model, monkeypatch):
  # Left padding: positions rise by one within the prompt, so causal by index is causal by
  # position there, and the fused kernel runs the chunk with the segments as its mask.
  from lckv_jax.kernels import fused
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS[name], attention_impl="xla")
  t, pos, seg, _ = gen_lib.pad_prompts(prompts([10, 6, 3, 1], seed=7), 64)
  calls = []
  real = fused.fused_causal_attention
  spy = lambda *a, **k: calls.append(k["segment_ids_BxT"] is not None) or real(*a, **k)  # noqa
  monkeypatch.setattr(fused, "fused_causal_attention", spy)
  outs = []
  for mode in (Mode.PREFILL, Mode.PREFILL_EMPTY):  # the dense mask, then the fused kernel
    cache = KVCache.create(model.config, 4, 16)
    logits, cache = gen_lib.prefill(model, t, pos, seg, cache, jnp.zeros(4, jnp.int32),
                                    mode=mode, all_logits=True)
    outs.append((logits, cache))
  assert calls and all(calls)  # only the second call, and with the segments
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_positions_that_do_not_rise_by_one_keep_the_dense_mask():
  from lckv_jax.model import rises_by_one
  seg = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 2, 2]])
  assert rises_by_one(np.array([[0, 0, 0, 1, 2], [4, 5, 6, 0, 1]]), seg)
  assert not rises_by_one(np.array([[0, 0, 0, 2, 3], [4, 5, 6, 0, 1]]), seg)  # a gap
  assert not rises_by_one(np.array([[0, 0, 0, 1, 2], [0, 1, 0, 1, 2]]),  # segments 1, 2, 1
                          np.array([[0, 0, 1, 1, 1], [1, 1, 2, 1, 1]]))
  seen = []
  jax.jit(lambda p: seen.append(rises_by_one(p, seg)))(jnp.zeros((2, 5), jnp.int32))
  assert seen == [False]  # traced: unknown


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


def test_start_hands_the_cache_through_without_a_copy(tiny_model):
  # `_started` (the first token) donates the prefill's cache: the decode state's is its buffer,
  # not a copy, so a large batch never holds two caches at the start.
  model = tiny_model(std=0.1, sliding_window=3, layer_types=PRESETS["lckv"])
  gen = Generator(model, max_new_tokens=4, max_len=32)
  state = gen.start(prompts([5, 5], seed=9))
  n = np.full((2,), 5, np.int32)
  analysis = gen_lib._started.lower(gen.settings, 4, 0, False, True, state.cache,
                                    jnp.zeros((2, 64)), np.uint32(0), n, n, n,
                                    None).compile().memory_analysis()
  cache = sum(x.nbytes for x in jax.tree.leaves(state.cache))
  assert analysis.alias_size_in_bytes >= cache


# -- bad inputs: prompts past the model's limits ---------------------------------------------------


def tokens(batch=2, length=8, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def test_generation_refuses_prompts_past_the_limits(tiny_model):
  model = tiny_model(**LIMITED)
  with pytest.raises(ValueError, match="prompt of 33 tokens exceeds max_position_embeddings=32"):
    gen_lib.generate(model, [tokens(1, 33)[0].tolist()])
  with pytest.raises(ValueError, match=r"prompt of 20 tokens \+ max_new_tokens=16 = 36 positions "
                                       r"exceeds max_position_embeddings=32"):
    gen_lib.generate(model, [tokens(1, 20)[0].tolist()], max_new_tokens=16)
  with pytest.raises(ValueError, match=r"prompt 1 of 30 tokens \+ max_new_tokens=4"):
    gen_lib.generate(model, [[1, 2], tokens(1, 30)[0].tolist()], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"n_sink \+ window = 40 positions exceeds "
                                       "max_position_embeddings=32"):
    gen_lib.generate(model, [[1, 2]], max_new_tokens=64, sink=(4, 36))
  with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 256\)"):
    gen_lib.generate(model, [[1, 300]])
  with pytest.raises(ValueError, match="token id -2 is outside"):
    gen_lib.generate(model, np.asarray([[1, -2]]))
  with pytest.raises(ValueError, match="token ids must be integers, got 2.5"):
    gen_lib.generate(model, [[1, 2.5]])
  t, pos, seg, _ = gen_lib.pad_prompts([[1, 2, 3], [4]], VOCAB)
  t[1, 2] = VOCAB
  cache = KVCache.create(model.config, 2, 8)
  with pytest.raises(ValueError, match="token id 256 is outside"):
    gen_lib.prefill(model, t, pos, seg, cache, jnp.zeros(2, jnp.int32))


def test_free_rows_is_the_empty_batch_of_start_without_running_the_model(tiny_model):
  # A server's batch starts as free rows. `start` on one-token prompts made it before, and with a
  # prefill chunk that prefilled [batch, chunk] tokens at once (out of memory at 7b, 205 rows):
  # `free_rows` runs nothing, and has the layout of what `start` gives, so the decode step
  # compiled for one serves the other.
  from lckv_jax.sampling import Sampling
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  gen = Generator(model, max_new_tokens=5, max_len=24, per_row_sampling=True, prefill_chunk=8)
  free = gen.free_rows(3)
  started = gen.start([[0]] * 3, max_new_tokens=1, seeds=[0, 1, 2])
  layout = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)  # noqa: E731
  assert layout(free) == layout(started)
  assert np.asarray(free.done).all()
  # Requests inserted into free rows decode as they do alone; the free rows stay empty.
  ps = prompts([3, 9], seed=4)
  settings = [Sampling(), Sampling(1.0, 5, 0.9)]
  state = free
  for row, (p, s) in zip((0, 2), zip(ps, settings)):
    state = gen.insert(state, row, gen.start([p], sampling=[s], seeds=[row + 5]))
  out = gen.results(gen.decode(state))
  for row, (p, s) in zip((0, 2), zip(ps, settings)):
    assert out[row] == gen.results(gen.decode(gen.start([p], sampling=[s], seeds=[row + 5])))[0]
  assert out[1] == []  # free: nothing generated
  with pytest.raises(ValueError, match="fixed max_len"):
    Generator(model, max_new_tokens=2).free_rows(2)


def test_per_row_sampling_gives_each_request_its_own_tokens_whatever_the_batch(tiny_model):
  from lckv_jax.sampling import Sampling
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  ps = prompts([3, 5, 2], seed=12)
  settings = [Sampling(), Sampling(1.0, 5, 0.9), Sampling(0.8)]
  gen = Generator(model, max_new_tokens=6, max_len=32, per_row_sampling=True)
  batch = gen.results(gen.decode(gen.start(ps, sampling=settings, seeds=[7, 8, 9])))
  for r, p in enumerate(ps):  # alone, a row samples the same tokens: its seed decides, not the batch
    alone = gen.start([p], sampling=[settings[r]], seeds=[7 + r])
    assert gen.results(gen.decode(alone))[0] == batch[r]
  assert batch[0] == generate(model, [ps[0]], max_new_tokens=6).tokens[0]  # greedy row
  assert batch[1] != gen.results(gen.decode(gen.start([ps[1]], sampling=[settings[1]],
                                                      seeds=[70])))[0]
  # A request joining a running batch (continuous batching) samples as it would alone.
  running = gen.decode(gen.start(ps, sampling=settings, seeds=[7, 8, 9]), 2)
  new = gen.start([[11, 12, 13]], sampling=[Sampling(1.0)], seeds=[3])
  joined = gen.results(gen.decode(gen.insert(running, 0, new)))[0]
  assert joined == gen.results(gen.decode(gen.start([[11, 12, 13]], sampling=[Sampling(1.0)],
                                                    seeds=[3])))[0]
  with pytest.raises(ValueError, match="need Generator\\(per_row_sampling=True\\)"):
    Generator(model, max_new_tokens=2).start(ps, seeds=[1, 2, 3])
  with pytest.raises(ValueError, match="3 prompts need 3 sampling settings and seeds"):
    gen.start(ps, seeds=[1, 2])


# -- chunked prefill ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_types,chunk", [
    ("0_1_2_3", 4),  # llama
    ("0_0_2_2", 5),  # CLA-like: layers 1 and 3 read the layer below
    ("0s_1s_2_3", 2),  # sliding windows (3) longer than a chunk: rings widened by earlier keys
    ("0s_1_2s_2", 5)])  # windows shorter than a chunk: rings widened for the chunk too
def test_chunked_prefill_gives_the_one_shot_logits_without_a_cycle(layer_types, chunk,
                                                                   tiny_model):
  model = tiny_model(std=0.1, layer_types=layer_types, sliding_window=3)
  assert not model.config.layer_spec.has_cycle
  # Shorter than, as long as, and longer than a chunk; a batch of mixed lengths (padded rows,
  # some padded beyond their first chunk), and one prompt of whole chunks (no padding at all).
  for ps in (prompts([2, chunk, 2 * chunk + 1, 3 * chunk - 1], seed=13), prompts([2 * chunk])):
    whole = generate(model, ps, max_new_tokens=4, return_logits=True)
    chunked = generate(model, ps, max_new_tokens=4, return_logits=True, prefill_chunk=chunk)
    # The first token's logits are the prefill's; the later ones read the chunks' cache.
    np.testing.assert_allclose(chunked.logits, whole.logits, atol=2e-5, rtol=1e-5)
    assert chunked.tokens == whole.tokens


@pytest.mark.parametrize("layer_types,cache_dtype", [
    ("0_3_3_3", None),  # LCKV: the lower layers read the top layer's KV of the chunks before
    ("0s_2_2s_3", None),  # a cycle over sliding windows shorter than a chunk
    ("0_1_2_3", "int8")])
def test_chunks_into_a_filled_cache_take_the_fused_kernel_with_the_dense_ones_logits(
    layer_types, cache_dtype, tiny_model):
  # attention_impl="xla": every chunk after the first runs jax's fused attention over the cache
  # with the dense mask (dispatch's "xla_masked", "cudnn_masked" on a GPU), not the reference.
  dense = tiny_model(std=0.1, layer_types=layer_types, sliding_window=3)
  fused = tiny_model(std=0.1, layer_types=layer_types, sliding_window=3, attention_impl="xla")
  ps = prompts([3, 9, 14], seed=15)
  want = generate(dense, ps, max_new_tokens=4, return_logits=True, prefill_chunk=4,
                  cache_dtype=cache_dtype)
  got = generate(fused, ps, max_new_tokens=4, return_logits=True, prefill_chunk=4,
                 cache_dtype=cache_dtype)
  # int8: a float rounding difference upstream can move a stored key by one step (scale / 127).
  atol = 2e-5 if cache_dtype is None else 2e-3
  np.testing.assert_allclose(got.logits, want.logits, atol=atol, rtol=1e-5)
  assert got.tokens == want.tokens


def _padded_chunks(p, chunk):
  """`p` left-padded to a whole number of chunks: tokens, positions, segments [1, padded]."""
  t, pos, seg, _ = gen_lib.pad_prompts([p], 64, pad_to=-(-len(p) // chunk) * chunk)
  return t, pos, seg


def test_chunked_prefill_of_a_cycle_iterates_each_chunk_on_the_earlier_chunks_kv(tiny_model):
  # Two iterations over chunks of 4 (parallel, an approximation): chunk k iterates given the
  # final KV of chunks 0..k-1, which `prefill` does when called chunk by chunk by hand.
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  chunk, iterations = 4, 2
  p = prompts([11], seed=14)[0]
  gen = Generator(model, max_new_tokens=3, max_len=16, prefill_chunk=chunk,
                  prefill_iterations=iterations)
  job = gen.begin([p])
  assert job.num_chunks == 3 and job.cache is None
  while not job.done:
    job = gen.prefill_next(job)
  t, pos, seg = _padded_chunks(p, chunk)  # one token of padding, in the first chunk
  cache = KVCache.create(model.config, 1, 16, contiguous=True)
  for k in range(3):
    cols = slice(k * chunk, (k + 1) * chunk)
    mode, at = (Mode.PREFILL_EMPTY, None) if k == 0 else (Mode.PREFILL, jnp.full(1, k * chunk))
    logits, cache = gen_lib.prefill(model, t[:, cols], pos[:, cols], seg[:, cols], cache, at,
                                    mode=mode, iterations=iterations)
  np.testing.assert_allclose(job.logits, logits, atol=1e-5)
  for a, b in zip(jax.tree.leaves(job.cache), jax.tree.leaves(cache)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Not the one-shot prefill's approximation, which iterates over all 11 tokens at once.
  one_shot, _ = gen_lib.prefill(model, *gen_lib.pad_prompts([p], 64)[:3],
                                KVCache.create(model.config, 1, 16), mode=Mode.PREFILL_EMPTY,
                                iterations=iterations)
  assert float(np.abs(np.asarray(one_shot) - np.asarray(logits)).max()) > 1e-3


def test_chunked_generate_gives_the_tokens_of_chunks_interleaved_with_decoding(tiny_model):
  # A server's path: a prompt prefilled one chunk per decode call of a running batch, then
  # inserted. Its tokens are those of generate(prefill_chunk=) alone.
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  kw = dict(prefill_chunk=3, prefill_iterations=2)
  gen = Generator(model, max_new_tokens=10, max_len=32, **kw)
  a, b, c = prompts([5, 8, 10], seed=15)
  running = gen.decode(gen.start([a, b], max_new_tokens=[2, 10]), num_steps=1)
  job = gen.begin([c])
  while not job.done:
    job = gen.prefill_next(job)
    running = gen.decode(running, num_steps=1)
  assert bool(running.done[0]) and not bool(running.done[1])
  state = gen.decode(gen.insert(running, 0, gen.finish(job)))
  alone = [generate(model, [p], max_new_tokens=10, **kw).tokens[0] for p in (a, b, c)]
  assert gen.results(state) == [alone[2], alone[1]]
  assert generate(model, [a, b, c], max_new_tokens=10, **kw).tokens == alone
  # For this cycle, chunks change the tokens: the equalities above are the chunked path's.
  assert alone[2] != generate(model, [c], max_new_tokens=10, prefill_iterations=2).tokens[0]


def test_stacked_jobs_fill_several_rows_in_one_call_with_each_rows_own_tokens(tiny_model):
  # A server's job of several prompts admitted together (`PrefillJob.stack`), inserted into
  # free rows of a running batch in one call (`insert_rows`; None skips a cancelled one): each
  # row decodes what its prompt gives alone, with its own sampling and seed.
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  gen = Generator(model, max_new_tokens=6, max_len=32, prefill_chunk=4, prefill_iterations=2,
                  per_row_sampling=True)
  a, b, c, d = prompts([5, 7, 6, 3], seed=31)  # a, b, c: two chunks of 4; d: one
  settings = [(Sampling(), 1), (Sampling(0.8, 8), 2), (Sampling(1.0), 3)]
  job = PrefillJob.stack([gen.begin([p], sampling=[s], seeds=[seed])
                          for p, (s, seed) in zip((a, b, c), settings)])
  assert job.tokens.shape == (3, 8) and job.seeds == (1, 2, 3)
  running = gen.start([d, d, d, d], sampling=[Sampling()] * 4, seeds=[9] * 4)
  running = gen.decode(running._replace(done=running.done.at[1:].set(True)), num_steps=1)
  while not job.done:
    job = gen.prefill_next(job)
  free_row = gen.results(running)[2]
  state = gen.decode(gen.insert_rows(running, [3, None, 1], gen.finish(job)))
  out = gen.results(state)
  alone = [gen.results(gen.decode(gen.start([p], sampling=[s], seeds=[seed])))[0]
           for p, (s, seed) in zip((a, b, c), settings)]
  assert out[3] == alone[0] and out[1] == alone[2]
  assert out[2] == free_row  # untouched: free, never decoded on
  with pytest.raises(ValueError, match="rows must be distinct"):
    gen.insert_rows(state, [1, 1, 2], gen.start([a, b, c]))
  with pytest.raises(ValueError, match="3 new rows need 3 row indices"):
    gen.insert_rows(state, [0, 1], gen.start([a, b, c]))
  with pytest.raises(ValueError, match="differ in"):
    PrefillJob.stack([gen.begin([a]), gen.begin([d])])


def test_a_chunked_prompt_pads_only_its_first_chunk_to_a_quarter_a_half_or_a_whole_chunk(
    tiny_model):
  from lckv_jax.generation import chunked_length
  lengths = (1, 64, 65, 128, 129, 256, 257, 300, 400, 512)
  assert [chunked_length(n, 256) for n in lengths] == [64, 64, 128, 128, 256, 256, 320, 320, 512,
                                                       512]
  assert [chunked_length(n, 4) for n in (1, 2, 3, 5, 7, 18)] == [1, 2, 4, 5, 8, 18]
  # The load mix of benchmarks.serve_load: 319 slots a prompt on average, not 392.
  assert np.mean([chunked_length(n, 256) for n in range(32, 512)]) < 320
  job = Generator(tiny_model(), max_new_tokens=2, max_len=32, prefill_chunk=4).begin(
      [list(range(1, 10))])  # 9 tokens: a first chunk of 1, then two of 4
  assert job.num_chunks == 3 and [job.bounds(k) for k in range(3)] == [(0, 1), (1, 5), (5, 9)]
  # prefill_widths=N: the first chunk a multiple of C/N (rounded up), less padding.
  assert [chunked_length(n, 256, 8) for n in lengths] == [32, 64, 96, 128, 160, 256, 288, 320,
                                                          416, 512]
  assert [chunked_length(n, 4, 4) for n in (1, 2, 3, 5, 7, 18)] == [1, 2, 3, 5, 7, 18]
  assert [chunked_length(n, 10, 4) for n in (1, 4, 6, 9, 11)] == [3, 5, 8, 10, 13]
  assert np.mean([chunked_length(n, 256, 8) for n in range(32, 512)]) < 288
  job = Generator(tiny_model(), max_new_tokens=2, max_len=32, prefill_chunk=4,
                  prefill_widths=4).begin([list(range(1, 8))])  # 7 tokens: 3, then 4
  assert [job.bounds(k) for k in range(job.num_chunks)] == [(0, 3), (3, 7)]


def test_prefill_calls_compiled_ahead_run_without_compiling(tiny_model):
  # What a server's warm-up does on its threads: each chunk call compiled, nothing run, then
  # run from the compiled programs, with the tokens of a Generator that compiled as it went.
  import concurrent.futures
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  gen = Generator(model, max_new_tokens=3, max_len=16, prefill_chunk=4, prefill_widths=4,
                  static_weights=True)
  gen.prefill_next(gen.begin([[5]]))  # compiles the empty cache of one row (not a chunk call)
  ps = [[3, 9, 4, 1, 7, 2, 8]]  # chunks of 3 and 4 tokens
  job = gen.begin(ps)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda k: gen.compile_prefill(job, k), range(job.num_chunks)))
  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    while not job.done:
      job = gen.prefill_next(job)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  plain = Generator(model, max_new_tokens=3, max_len=16, prefill_chunk=4, prefill_widths=4)
  assert gen.results(gen.decode(gen.finish(job))) == plain.results(plain.decode(plain.start(ps)))
  with pytest.raises(ValueError, match="compile_prefill: chunk 2 of a job of 2 chunks"):
    gen.compile_prefill(job, 2)


def test_chunked_prefill_refuses_bad_settings(tiny_model):
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match=f"prefill_widths must be a positive integer or None, "
                                         f"got {bad!r}"):
      Generator(model, max_new_tokens=2, prefill_chunk=4, prefill_widths=bad)
  with pytest.raises(ValueError, match="prefill_widths=4 needs a prefill_chunk"):
    Generator(model, max_new_tokens=2, prefill_widths=4)
  for bad in (0, -4, 2.5, True, "4"):
    with pytest.raises(ValueError, match=f"prefill_chunk must be a positive integer or None, "
                                         f"got {bad!r}"):
      Generator(model, max_new_tokens=2, prefill_chunk=bad)
  with pytest.raises(ValueError, match=r"prefill_chunk=4 with sink=\(1, 8\): chunked prefill "
                                       "into a sink cache is not supported"):
    generate(model, [[1, 2]], prefill_chunk=4, sink=(1, 8))
  with pytest.raises(ValueError, match="prefill_chunk=4 with prefill_batch=2"):
    Generator(model, max_new_tokens=2, prefill_chunk=4, prefill_batch=2)
  # The cache holds the padded prompt: 7 tokens padded to 8 (a first chunk of 4 for the 3 left
  # after a whole chunk) + 2 new need 9 slots; 6 tokens take 6 (a first chunk of 2), and fit.
  with pytest.raises(ValueError, match=r"prompt of 7 tokens \(padded to 8\) \+ max_new_tokens=2 "
                                       "needs 9 cache slots, but max_len=8"):
    generate(model, [list(range(7))], max_new_tokens=2, max_len=8, prefill_chunk=4)
  generate(model, [list(range(6))], max_new_tokens=2, max_len=8, prefill_chunk=4)
  gen = Generator(model, max_new_tokens=2, max_len=16, prefill_chunk=4)
  job = gen.begin([[1, 2, 3, 4, 5]])
  with pytest.raises(ValueError, match="2 of the job's 2 chunks are not prefilled yet"):
    gen.finish(job)
  job = gen.prefill_next(gen.prefill_next(job))
  with pytest.raises(ValueError, match="chunks are all prefilled; call finish"):
    gen.prefill_next(job)


def test_static_weights_split_once_and_give_the_same_tokens(tiny_model, monkeypatch):
  # A server's Generator splits the model at construction, not at every prefill and decode call;
  # the default splits at each call, so weights updated in place are seen.
  from flax import nnx
  model = tiny_model(std=0.1, layer_types="0_2_2_3")
  ps = prompts([5, 9], seed=41)
  plain = Generator(model, max_new_tokens=6, max_len=32, prefill_chunk=4)
  static = Generator(model, max_new_tokens=6, max_len=32, prefill_chunk=4, static_weights=True)
  run = lambda gen: gen.results(gen.decode(gen.start(ps)))  # noqa: E731
  expected = run(plain)  # compiles: tracing the model splits its layers
  calls = []
  real = nnx.split
  monkeypatch.setattr(nnx, "split", lambda *a, **k: calls.append(1) or real(*a, **k))
  assert run(static) == expected and not calls
  assert run(plain) == expected and calls
