"""Tokenizers: HuggingFace tokenizer.json, SentencePiece, GPT-2 BPE, and the tokenizer an exported
model carries."""

import sys

import numpy as np
import pytest

from lckv_jax import tokenizer
from lckv_jax.data import corpus, pipeline
from tests import ROOT
from tests.data.pipeline_test import _data_cfg


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  t = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert t.vocab_size == 4 and t.bos_id == 1
  np.testing.assert_array_equal(t.encode("hello world foo"), [2, 3, 0])


def test_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  text = "\n".join(corpus.embedded_documents()[:20])
  (tmp_path / "train.txt").write_text(text)
  spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"),
                                 model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                 model_type="bpe", minloglevel=2)
  t = tokenizer.load_tokenizer(str(tmp_path / "sp.model"))
  assert t.vocab_size == 300 and t.bos_id is not None
  ids = t.encode("In the beginning God created the heaven")
  assert t.decode(ids) == "In the beginning God created the heaven"
  with pytest.raises(ValueError, match="has 300 tokens but model.vocab_size=256"):
    tokenizer.check_vocab(t, 256, str(tmp_path / "sp.model"))
  ds = pipeline.make_datasets(_data_cfg(max_documents=20, tokenizer=str(tmp_path / "sp.model")),
                              32, 2, 300)
  assert ds.train[0]["tokens"].max() < 300
  assert tokenizer.encode_texts(t, ["And God said"], add_bos=True)[0][0] == t.bos_id


def test_an_exported_model_carries_its_tokenizer_and_bytes_never_stand_in(tmp_path):
  sys.path.insert(0, ROOT)
  import generate as generate_py
  from lckv_jax.tokenizer import ByteTokenizer, load_tokenizer, save_tokenizer
  tok = load_tokenizer("kjv-bpe-32k")
  assert save_tokenizer(tok, str(tmp_path)) == ["tokenizer.model"]
  assert save_tokenizer(ByteTokenizer(), str(tmp_path)) == []
  text = "And God said, Let there be light: and there was light."
  ids = [int(i) for i in tok.encode(text)]
  # What generate.py and the evaluators load for a checkpoint directory.
  for_model = lambda path, vocab: load_tokenizer(path, vocab_size=vocab, flag="--checkpoint",
                                                 transformers=True)
  loaded = for_model(str(tmp_path), 32000)
  assert generate_py.prompt_ids(loaded, [text]) == [[tok.bos_id] + ids]  # as documents started
  assert loaded.decode(ids) == text and loaded.eos_id == tok.eos_id
  empty = tmp_path / "empty"
  empty.mkdir()
  # A 32,000-token model without its tokenizer: an error, never UTF-8 bytes in its place.
  with pytest.raises(FileNotFoundError, match="model.vocab_size=32000 is not the byte vocabulary"):
    for_model(str(empty), 32000)
  assert isinstance(for_model(str(empty), 256), ByteTokenizer)
