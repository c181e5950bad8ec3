"""Training a SentencePiece tokenizer from the command line; GPT-2 byte-level BPE files."""

import os

import numpy as np
import pytest

from lckv_jax import tokenizer
from lckv_jax.data import corpus


def test_train_sentencepiece_command_and_gpt2_bpe(tmp_path):
  from lckv_jax.data import train_tokenizer
  train_tokenizer.main(["--input=embedded", "--max_documents=20", "--vocab_size=300",
                        f"--output={tmp_path / 'kjv'}"])
  t = tokenizer.load_tokenizer(str(tmp_path / "kjv.model"))
  assert t.vocab_size == 300 and (t.bos_id, t.eos_id) == (1, 2)
  text = "In the beginning God created the heaven and the earth."
  assert t.decode(t.encode(text)) == text
  assert len(t.encode(text)) < len(text) / 2  # merges learned
  # GPT-2 byte-level BPE: vocab.json + merges.txt, as a directory or the vocab.json path.
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(list(corpus.embedded_documents()[:3]), vocab_size=320, min_frequency=2,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  (tmp_path / "gpt2").mkdir()
  bpe.save_model(str(tmp_path / "gpt2"))
  for spec in (tmp_path / "gpt2", tmp_path / "gpt2" / "vocab.json"):
    g = tokenizer.load_tokenizer(str(spec))
    assert g.vocab_size == bpe.get_vocab_size() and g.bos_id == g.eos_id == 0
    ids = g.encode("And God said, Let there be light: ünïcode")
    assert g.decode(ids) == "And God said, Let there be light: ünïcode"
    np.testing.assert_array_equal(ids, bpe.encode("And God said, Let there be light: ünïcode").ids)
  os.remove(tmp_path / "gpt2" / "merges.txt")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    tokenizer.load_tokenizer(str(tmp_path / "gpt2" / "vocab.json"))
