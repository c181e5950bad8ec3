"""The lm-evaluation-harness adapter: log-likelihoods, rolling windows and generation against a
direct forward."""

import numpy as np
import pytest

from lckv_jax import tokenizer as tok_lib
from lckv_jax.eval import lm_eval_adapter
from lckv_jax.eval import perplexity as ppl
from lckv_jax.tokenizer import ByteTokenizer
from tests.cli_test import _write
from tests.eval.perplexity_test import (  # noqa: F401  (lckv_model: a module fixture)
    _direct_logp, _lm_eval_rolling_windows, _logits, lckv_model)

TEXT = "The quick brown fox jumps over the lazy dog, twice."  # 51 bytes, ASCII < 128


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


def test_adapter_rejects_out_of_vocab(lckv_model):
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=16)
  with pytest.raises(ValueError, match="vocab_size"):
    lm.loglikelihood([("caf", "\u00e9")])  # UTF-8 bytes >= 128


def test_lm_eval_registration():
  pytest.importorskip("lm_eval")
  from lm_eval.api.registry import get_model
  assert get_model("lckv_jax") is lm_eval_adapter.LCKVLM


def test_adapter_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"pretrained='.*nope' does not exist"):
    lm_eval_adapter.LCKVEvalModel.from_checkpoint(str(tmp_path / "nope"), flag="pretrained")
  with pytest.raises(FileNotFoundError, match=r"tokenizer='.*nope': no such file"):
    tok_lib.load_tokenizer(str(tmp_path / "nope"), flag="tokenizer", transformers=True)
  with pytest.raises(FileNotFoundError, match=r"holds no tokenizer files"):
    tok_lib.load_tokenizer(str(tmp_path), flag="tokenizer", transformers=True)
  broken = _write(tmp_path / "tokenizer.json", '{"not": "a tokenizer"')  # was: bytes + warning
  with pytest.raises(ValueError, match=r"tokenizer='.*tokenizer.json': could not load"):
    tok_lib.load_tokenizer(broken, flag="tokenizer", transformers=True)
