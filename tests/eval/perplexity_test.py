"""Evaluation: perplexity windows, the lm-eval adapter, offline multiple choice."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from lckv_jax import checkpoint
from lckv_jax.tokenizer import ByteTokenizer
from lckv_jax.eval import lm_eval_adapter, multiple_choice
from lckv_jax.eval import perplexity as ppl
from tests import tiny

# The models of these tests: a vocabulary of 128 (ASCII bytes) and 64 positions; weights
# N(0, 0.1) (norm scales near 1), drawn without the slow eager initialisation.
MODEL = dict(std=0.1, draw="numpy", vocab_size=128, initializer_range=0.1,
             max_position_embeddings=64)
TEXT = "The quick brown fox jumps over the lazy dog, twice."  # 51 bytes, ASCII < 128


@pytest.fixture(scope="module")
def lckv_model():
  return tiny.tiny_model(0, **MODEL, layer_types="0_2_2_3", forward_passes=2, backward_passes=1)


@nnx.jit
def _fwd(model, tokens_1xS):
  return model(tokens_1xS)


def _logits(model, tokens):
  """Logits [len, vocab] of one sequence, padded to 32 (causal: the padding changes nothing)."""
  buf = np.zeros((1, 32), np.int32)
  buf[0, :len(tokens)] = tokens
  return np.asarray(_fwd(model, buf))[0, :len(tokens)]


def _direct_logp(model, tokens):
  """log p(tokens[t] | tokens[:t]) for t = 1..N-1 from one full forward."""
  tokens = np.asarray(tokens)
  logp = jax.nn.log_softmax(_logits(model, tokens[:-1]), axis=-1)
  return np.asarray(logp[np.arange(len(tokens) - 1), tokens[1:]])


def _lm_eval_rolling_windows(token_list, prefix_token, max_seq_len):
  """lm_eval.utils.get_rolling_token_windows with context_len=1, restated for the test."""
  pred_len, predicted = max_seq_len, 0
  first = min(max_seq_len, len(token_list))
  yield [prefix_token] + token_list[:first - 1], token_list[:first]
  predicted += first
  while predicted < len(token_list):
    n = min(len(token_list) - predicted, pred_len)
    end = predicted + n
    yield token_list[end - max_seq_len - 1:end - 1], token_list[end - n:end]
    predicted += n


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17, 40])
@pytest.mark.parametrize("context_len", [1, 4, 16])
def test_windows_score_every_target_once(num_tokens, context_len):
  for stride in sorted({1, max(context_len // 2, 1), context_len}):
    targets = []
    for start, end, first in ppl.windows(num_tokens, context_len, stride):
      assert 0 <= start < end <= num_tokens - 1 and end - start <= context_len
      assert start + 1 <= first <= end
      targets += range(first, end + 1)
    assert targets == list(range(1, num_tokens))
  # Chunked windows are lm-eval's rolling windows (with the prefix token as token 0).
  if num_tokens > 1:
    seq = list(range(100, 100 + num_tokens - 1))
    ours = [([0] + seq)[s:e] for s, e, _ in ppl.windows(num_tokens, context_len)]
    theirs = [ctx for ctx, _ in _lm_eval_rolling_windows(seq, 0, context_len)]
    assert ours == theirs


def test_perplexity_matches_direct_forward(lckv_model):
  # Every scoring below (and in the adapter tests) has shape [1, 8]: one compilation.
  tokens = np.random.RandomState(0).randint(0, 128, 17)
  scorer = ppl.Scorer(lckv_model)
  direct = _direct_logp(lckv_model, tokens[:9])
  r = ppl.perplexity(scorer, tokens[:9], context_len=8)
  assert r.tokens == 8
  np.testing.assert_allclose(r.nll, -direct.sum(), rtol=1e-5)
  np.testing.assert_allclose(r.ppl, np.exp(-direct.mean()), rtol=1e-5)
  # Sliding windows of 8 with stride 3: target t is predicted from (at least) the 5 before it.
  logp = ppl.token_logprobs(scorer, tokens, context_len=8, stride=3)
  assert len(ppl.windows(17, 8, 3)) == 4
  for s, e, first in ppl.windows(17, 8, 3):
    window = _direct_logp(lckv_model, tokens[s:e + 1])
    np.testing.assert_allclose(logp[first - 1:e], window[first - 1 - s:], rtol=1e-5, atol=1e-6)
  # Several documents add up.
  two = ppl.perplexity(scorer, [tokens[:5], tokens[5:9]], context_len=8)
  assert two.tokens == 7
  np.testing.assert_allclose(two.nll, -(_direct_logp(lckv_model, tokens[:5]).sum()
                                        + _direct_logp(lckv_model, tokens[5:9]).sum()), rtol=1e-5)


def test_perplexity_iterations(lckv_model):
  """With m + b >= sequence length the parallel plan equals the sequential mode
  (docs/spec.md §4)."""
  tokens = np.random.RandomState(1).randint(0, 128, 9)
  seq = ppl.perplexity(lckv_model, tokens, context_len=8, sequential=True)
  exact = ppl.perplexity(lckv_model, tokens, context_len=8, forward_passes=7, backward_passes=1)
  rough = ppl.perplexity(lckv_model, tokens, context_len=8, forward_passes=0, backward_passes=1)
  np.testing.assert_allclose(exact.nll, seq.nll, rtol=1e-4)
  assert abs(rough.nll - seq.nll) > 1e-3


def test_loglikelihood_and_rolling(lckv_model):
  tok = ByteTokenizer()
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, tok, max_length=8, batch_size=1)
  requests = [("The cat", " sat"), ("", "hello"), ("a b ", "c"), ("x" * 30, " long tail")]
  results = lm.loglikelihood(requests)
  for (ctx, cont), (ll, greedy) in zip(requests, results):
    if ctx.endswith(" "):
      ctx, cont = ctx.rstrip(), " " + cont
    whole = (list(tok.encode(ctx)) or [0]) + list(tok.encode(cont))
    whole = whole[-9:]  # max_length + 1
    direct = _direct_logp(lckv_model, whole)
    np.testing.assert_allclose(ll, direct[-len(cont):].sum(), rtol=1e-5)
    assert isinstance(greedy, bool)
  # Rolling: equals the perplexity code's total NLL, and lm-eval's windows computed directly.
  (rolling,) = lm.loglikelihood_rolling([(TEXT,)])
  r = ppl.perplexity(lckv_model, tok.encode(TEXT), context_len=8, prefix_token=0)
  assert r.tokens == len(TEXT)
  np.testing.assert_allclose(rolling, -r.nll, rtol=1e-6)
  direct = 0.0
  for ctx, pred in _lm_eval_rolling_windows(list(tok.encode(TEXT)), 0, 8):
    logp = _direct_logp(lckv_model, ctx + pred[-1:])
    direct += logp[-len(pred):].sum()
  np.testing.assert_allclose(rolling, direct, rtol=1e-5)


def test_generate_until(lckv_model):
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=32, max_gen_toks=4,
                                     decoder="parallel")
  prompt = lm.tok_encode("Hello")
  ids = lm.greedy_tokens(prompt, 4)
  expected = list(prompt)
  for _ in range(4):
    expected.append(int(np.argmax(_logits(lckv_model, expected)[-1])))
  assert ids == expected[len(prompt):]
  text = lm.tok_decode(ids)
  (full,) = lm.generate_until([("Hello", {"until": [], "max_gen_toks": 4})])
  assert full == text
  if len(text) > 1 and text[1] not in text[:1]:
    (cut,) = lm.generate_until([("Hello", {"until": [text[1]], "max_gen_toks": 4})])
    assert cut == text[:1]


def test_generate_with_generation_module(lckv_model):
  """decoder='generation' goes through lckv_jax.generation (prefill + exact cached decoding)."""
  pytest.importorskip("lckv_jax.generation")
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=32, max_gen_toks=3)
  assert lm.decoder == "generation"
  ids = lm.greedy_tokens([72, 101, 108, 108, 111], 3)
  assert 1 <= len(ids) <= 3 and all(0 <= i < 128 for i in ids)
  (text,) = lm.generate_until([("Hello", {"until": ["\n"]})])
  assert isinstance(text, str)


def test_multiple_choice(lckv_model, tmp_path, capsys):
  examples = [{"context": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
              {"context": "2 + 2 =", "choices": ["4", "5"], "label": 1},
              {"context": "Cats say", "choices": ["meow", "woof", "moo", "quack"], "label": 2}]
  path = tmp_path / "task.jsonl"
  path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
  loaded = multiple_choice.load_task(str(path))
  assert loaded == examples
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=8, batch_size=1)
  r = multiple_choice.evaluate(lm, loaded)
  assert r["n"] == 3
  direct = lm.loglikelihood([(e["context"], " " + c) for e in examples for c in e["choices"]])
  flat = [ll for lls in r["loglikelihoods"] for ll in lls]
  np.testing.assert_allclose(flat, [ll for ll, _ in direct], rtol=1e-6)
  acc = np.mean([int(np.argmax(lls)) == e["label"] for lls, e in zip(r["loglikelihoods"], examples)])
  assert r["acc"] == acc
  # The documented delimiter: choices with their own leading space and --delimiter='' score
  # the same.
  spaced = [{**e, "choices": [" " + c for c in e["choices"]]} for e in examples]
  assert multiple_choice.evaluate(lm, spaced, "")["loglikelihoods"] == r["loglikelihoods"]
  # The CLI, on a saved checkpoint.
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_model(ckpt, lckv_model)
  multiple_choice.main(["--checkpoint", ckpt, "--tasks", str(path), "--byte_tokenizer",
                        "--max_length=8", "--batch_size=1"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["task"] == "task.jsonl" and out["acc"] == acc and out["n"] == 3
  # Malformed files name the line and the field.
  path.write_text(json.dumps({"context": "a", "choices": ["b"], "label": 3}) + "\n")
  with pytest.raises(ValueError, match=r"task.jsonl:1: field 'label'"):
    multiple_choice.load_task(str(path))


def test_adapter_rejects_out_of_vocab(lckv_model):
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=16)
  with pytest.raises(ValueError, match="vocab_size"):
    lm.loglikelihood([("caf", "\u00e9")])  # UTF-8 bytes >= 128


def test_lm_eval_registration():
  pytest.importorskip("lm_eval")
  from lm_eval.api.registry import get_model
  assert get_model("lckv_jax") is lm_eval_adapter.LCKVLM
