"""Perplexity: its windows against lm-eval's, its numbers against a direct forward, its errors and
command line. The model fixtures and the direct log-probs serve the other eval tests too."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from lckv_jax import checkpoint
from lckv_jax import tokenizer as tok_lib
from lckv_jax.eval import lm_eval_adapter
from lckv_jax.eval import perplexity as ppl
from tests import tiny
from tests.cli_test import _user_error, _write

# The models of these tests: a vocabulary of 128 (ASCII bytes) and 64 positions; weights
# N(0, 0.1) (norm scales near 1), drawn without the slow eager initialisation.
MODEL = dict(std=0.1, draw="numpy", vocab_size=128, initializer_range=0.1,
             max_position_embeddings=64)


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


def test_sequential_perplexity_through_a_quantized_cache(lckv_model):
  # The sequential mode reads earlier tokens from a KV cache; cache_dtype stores it quantized.
  tokens = np.random.RandomState(2).randint(0, 128, 17)
  exact = ppl.perplexity(lckv_model, tokens, context_len=16, sequential=True)
  for name, rtol in (("bfloat16", 1e-3), ("int8", 2e-3), ("fp8", 1e-2)):
    got = ppl.perplexity(lckv_model, tokens, context_len=16, sequential=True, cache_dtype=name)
    assert got.tokens == exact.tokens and got.nll != exact.nll
    np.testing.assert_allclose(got.nll, exact.nll, rtol=rtol)
  scorer = ppl.Scorer(lckv_model, sequential=True, cache_dtype="fp8")
  assert scorer.static["cache_dtype"] == "float8_e4m3fn"
  with pytest.raises(ValueError, match="cache_dtype='int8' needs sequential=True"):
    ppl.Scorer(lckv_model, cache_dtype="int8")
  with pytest.raises(ValueError, match="cache_dtype must be one of"):
    ppl.Scorer(lckv_model, sequential=True, cache_dtype="int4")


# -- bad inputs: an error naming the window, id or flag --------------------------------------------


LIMIT = MODEL["max_position_embeddings"]


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_model(0, **MODEL, layer_types="0_2_2_3", forward_passes=2, backward_passes=1)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("faults") / "ckpt")
  checkpoint.save_model(path, model)
  return path


def test_perplexity_of_nothing_is_an_error(model):
  for tokens in ([], [5], np.zeros(0, np.int64)):
    with pytest.raises(ValueError, match="no tokens to score"):
      ppl.perplexity(model, tokens, context_len=8)  # was Perplexity(0, 0): ppl 1.0
  with pytest.raises(ValueError, match="no tokens to score"):
    ppl.perplexity_of_text(model, tok_lib.ByteTokenizer(), "a", context_len=8)


def test_windows_past_the_model_are_errors(model):
  tokens = np.random.RandomState(0).randint(0, 128, 20)
  for context_len in (LIMIT + 1, 2048, 0):
    with pytest.raises(ValueError, match=rf"context_len={context_len} must be in 1..{LIMIT} "
                                         rf"\(the model's max_position_embeddings={LIMIT}\)"):
      ppl.perplexity(model, tokens, context_len=context_len)
  with pytest.raises(ValueError, match=r"stride=9 must be in 1..context_len=8"):
    ppl.perplexity(model, tokens, context_len=8, stride=9)
  with pytest.raises(ValueError, match=rf"max_length={LIMIT + 1} must be in 1..{LIMIT}"):
    lm_eval_adapter.LCKVEvalModel(model, max_length=LIMIT + 1)


def test_ids_past_the_vocabulary_are_errors(model):
  with pytest.raises(ValueError, match=r"id 200 is outside 0..127 \(model.vocab_size=128\)"):
    ppl.perplexity(model, [1, 200, 3], context_len=8)
  with pytest.raises(ValueError, match=r"id -1 is outside 0..127"):
    ppl.Scorer(model)(np.array([[1, -1]]), np.array([[2, 3]]))
  with pytest.raises(ValueError, match=r"dtype float64, not integer token ids"):
    ppl.perplexity(model, np.array([1.5, 2.0, 3.0]), context_len=8)
  lm = lm_eval_adapter.LCKVEvalModel(model, max_length=16)
  with pytest.raises(ValueError, match=r"prompt: id 195 .*model.vocab_size=128"):
    lm.greedy_tokens(list("é".encode()), 2)  # UTF-8 bytes >= 128


def test_perplexity_command_line(ckpt, tmp_path, capsys):
  text = _write(tmp_path / "t.txt", "hello there")
  run = lambda argv, match: _user_error(ppl.main, argv, ppl.PROG, capsys, match)
  run(["--checkpoint", str(tmp_path / "nope"), "--text_file", text],
      r"--checkpoint='.*nope' does not exist")
  run(["--checkpoint", str(tmp_path), "--text_file", text], re.escape(str(tmp_path)))
  run(["--checkpoint", ckpt, "--text_file", str(tmp_path / "missing.txt")],
      r"--text_file='.*missing.txt': no such file")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "2048"],
      rf"context_len=2048 must be in 1..{LIMIT} \(the model's max_position_embeddings={LIMIT}\)")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "0"], r"context_len=0")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "8", "--stride", "9"],
      r"stride=9 must be in 1..context_len=8")
  run(["--checkpoint", ckpt, "--text_file", text, "--stride", "0"], r"stride=0")
  run(["--checkpoint", ckpt, "--text_file", text, "--batch_size", "0"], r"--batch_size must be")
  for name, data in (("empty.txt", ""), ("one.txt", "a")):
    run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file", _write(tmp_path / name, data)],
        rf"no tokens to score in .*{name}")
  run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file",
       _write(tmp_path / "l1.txt", b"\xe9t\xe9")], r"l1.txt: not UTF-8 text")
  run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file", _write(tmp_path / "e.txt", "é!")],
      r"e.txt \(tokenized\): id 195 is outside 0..127 \(model.vocab_size=128\)")
  np.save(tmp_path / "ids.npy", np.array([1, 2, 500]))
  run(["--checkpoint", ckpt, "--tokens", str(tmp_path / "ids.npy")],
      r"--tokens='.*ids.npy': id 500 is outside")
  run(["--checkpoint", ckpt, "--tokens", text], r"--tokens='.*t.txt' is not a .npy file")
  run(["--checkpoint", ckpt, "--text_file", text, "--cache_dtype", "int8"],
      r"--cache_dtype needs --sequential")
  run(["--checkpoint", ckpt, "--text_file", text, "--sequential", "--cache_dtype", "int4"],
      r"cache_dtype must be one of")
  ppl.main(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file", text, "--context_len", "8",
            "--sequential", "--cache_dtype", "int8"])
  assert re.search(r"tokens=10 nll=\S+ mean_nll=\S+ ppl=\S+", capsys.readouterr().out)
