"""Pre-tokenizing to ArrayRecord, and the data command lines (pretokenize, train_tokenizer)."""

import json
import os

import numpy as np
import pytest

from lckv_jax import tokenizer
from lckv_jax.data import corpus, pipeline, pretokenize, sources, train_tokenizer
from tests.cli_test import _user_error, _write
from tests.data.pipeline_test import _data_cfg


def test_pretokenized_array_record_source(tmp_path):
  from lckv_jax.data import pretokenize
  out = str(tmp_path / "kjv.array_record")
  note = pretokenize.pretokenize("embedded", "byte", out, max_documents=6)
  assert note["documents"] == 6 and os.path.exists(out + ".json")
  docs = sources.load_token_documents(str(tmp_path / "*.array_record"))
  want = [tokenizer.ByteTokenizer().encode(d) for d in corpus.embedded_documents()[:6]]
  assert len(docs) == 6 and all(np.array_equal(a, b) for a, b in zip(docs, want))
  cfg = _data_cfg(source="array_record", path=out, eval_fraction=0.3, add_bos=False)
  ds = pipeline.make_datasets(cfg, 32, 2, 256)
  text = _data_cfg(max_documents=6, eval_fraction=0.3, add_bos=False)
  ref = pipeline.make_datasets(text, 32, 2, 256)  # the same rows as tokenizing the text
  np.testing.assert_array_equal(ds.train[3]["tokens"], ref.train[3]["tokens"])
  assert (ds.train_tokens, ds.eval_tokens) == (ref.train_tokens, ref.eval_tokens)
  with pytest.raises(ValueError, match=r"token ids in \[\d+, \d+\] but model.vocab_size=100"):
    pipeline.make_datasets(cfg, 32, 2, 100)
  pretokenize.main(["--input=embedded", "--max_documents=2", "--no-add_bos",
                    f"--output={tmp_path / 'two.array_record'}"])  # the command line
  assert len(sources.load_token_documents(str(tmp_path / "two.array_record"))) == 2
  (tmp_path / "bad.array_record").write_bytes(b"not an array record")
  with pytest.raises(ValueError, match="not readable as ArrayRecord"):
    sources.load_token_documents(str(tmp_path / "bad.array_record"))


def test_data_command_lines(tmp_path, capsys):
  bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": None}) + "\n")
  out = str(tmp_path / "out.array_record")
  run = lambda argv, match: _user_error(pretokenize.main, argv, pretokenize.PROG, capsys, match)
  run([f"--input={bad}", f"--output={out}"], r"bad.jsonl:1: field 'text' is null, not a string")
  run([f"--input={tmp_path / 'no*.jsonl'}", f"--output={out}"], r"--input: .* matches no file")
  run(["--max_documents=-1", f"--output={out}"], r"--max_documents must be an integer >= 0")
  run(["--max_documents=1", f"--output={tmp_path}"], r"is a directory")
  run = lambda argv, match: _user_error(train_tokenizer.main, argv, train_tokenizer.PROG, capsys,
                                        match)
  prefix = f"--output={tmp_path / 'tok'}"
  run([f"--input={bad}", "--vocab_size=50", prefix], r"bad.jsonl:1: field 'text' is null")
  run(["--vocab_size=0", prefix], r"vocab_size must be a positive integer, got 0")
  run(["--vocab_size=50", f"--output={tmp_path}"], r"must be a file prefix")
  pytest.importorskip("sentencepiece")
  text = _write(tmp_path / "t.txt", "the quick brown fox jumps over the lazy dog\n" * 5)
  run([f"--input={text}", "--vocab_size=5", prefix],
      r"sentencepiece training failed with vocab_size=5.*Vocabulary size is smaller")
