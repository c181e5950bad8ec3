"""Prefill + decoding against the sequential mode, HF Llama, padding, insertion, CLI, sharding."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax import ModelConfig
from lckv_jax import generation as gen_lib
from lckv_jax.generation import Generator, generate
from tests import ROOT as REPO, reference

PRESETS = {"llama": "0_1_2_3", "lckv": "0_2_2_3", "cla": "0_0_2_2", "yoco": "0s_1s_2_2",
           "mixed": "0s_3_3s_3"}


def prompts(lengths, seed=0, vocab=64):
  rs = np.random.RandomState(seed)
  return [rs.randint(0, vocab, n).tolist() for n in lengths]


# -- exactness: prefill + decode = the sequential mode ----------------------------------------------


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
    cache = gen_lib.cache_lib.init_cache(model.config, 1, 12)
    t, pos, sg, _ = gen_lib.pad_prompts(ps[:1], 64)
    logits, _ = gen_lib.prefill(model, t, pos, sg, cache, jnp.zeros(1, jnp.int32), mode=mode,
                                iterations=7, all_logits=True)
    np.testing.assert_allclose(logits[0], seq[0, :7], atol=1e-4, rtol=1e-4)


def test_short_prefill_is_the_approximation_of_the_plan(tiny_model):
  # With fewer iterations than tokens a cyclic model's prefill is the plan (m = 2, b = 1).
  model = tiny_model(std=0.1, sliding_window=3, layer_types="3_3_3_3")
  p = jnp.asarray(prompts([10]))
  cache = gen_lib.cache_lib.init_cache(model.config, 1, 10)
  logits, _ = gen_lib.prefill(model, p, jnp.arange(10)[None], jnp.ones_like(p), cache,
                              jnp.zeros(1, jnp.int32), iterations=3, all_logits=True)
  np.testing.assert_allclose(logits, model(p, forward_passes=2, backward_passes=1), atol=1e-5)


# -- HuggingFace greedy generation ---------------------------------------------------------------


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


# -- sampling, text, errors ----------------------------------------------------------------------


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


def test_cli_without_checkpoint_explains_and_exits_2():
  out = _run(["generate.py", "--prompt=hi"])
  assert out.returncode == 2
  assert "train.py --config=configs/tiny.py" in out.stderr
  assert "lckv_jax.convert from-hf" in out.stderr


def test_cli_streams_from_a_checkpoint(tmp_path, tiny_model):
  from lckv_jax.checkpoint import save_model
  save_model(str(tmp_path / "ckpt"),
             tiny_model(std=0.1, sliding_window=3, layer_types="lckv", vocab_size=256))
  (tmp_path / "prompts.txt").write_text("ab\nxyz\n")
  out = _run(["generate.py", f"--checkpoint={tmp_path / 'ckpt'}", "--max_new_tokens=4",
              f"--prompts_file={tmp_path / 'prompts.txt'}"])
  assert out.returncode == 0, out.stderr
  assert "tokens/s" in out.stderr
  assert out.stdout.count("xyz") == 1


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
