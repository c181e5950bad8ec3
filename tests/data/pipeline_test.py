import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import tokenizer
from lckv_jax.data import corpus, pipeline, sources
from lckv_jax.train.config import default_config


def _data_cfg(**kw):
  c = default_config().data
  c.update(kw)
  return c


def test_pack_segments_and_positions():
  docs = [np.arange(5) + 1, np.arange(7) + 10, np.arange(3) + 20]
  rows = pipeline.pack_documents(docs, 4)
  np.testing.assert_array_equal(rows["tokens"].ravel()[:15], np.concatenate(docs))
  np.testing.assert_array_equal(rows["segment_ids"],
                                [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(rows["positions"],
                                [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 0]])


def test_packed_documents_do_not_attend_across_boundaries(tiny_model):
  """Perturbing the other document of a packed row leaves this document's logits unchanged."""
  model = tiny_model(layer_types="lckv", forward_passes=1, backward_passes=1)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 64, 6), rng.integers(0, 64, 10)
  rows = pipeline.pack_documents([a, b], 16)
  b2 = (b + 1 + rng.integers(0, 62, 10)) % 64
  rows2 = pipeline.pack_documents([a, b2], 16)
  apply = nnx.jit(lambda m, t, p, s: m(t, p, s))
  f = lambda r: apply(model, jnp.asarray(r["tokens"]), jnp.asarray(r["positions"]),
                      jnp.asarray(r["segment_ids"]))
  l1, l2 = f(rows), f(rows2)
  np.testing.assert_allclose(l1[0, :6], l2[0, :6], atol=1e-6)  # document a unchanged
  assert np.abs(np.asarray(l1[0, 6:] - l2[0, 6:])).max() > 1e-3
  # Document b alone (positions from 0) gives the same logits as packed after a.
  alone = apply(model, jnp.asarray(b)[None], None, None)
  np.testing.assert_allclose(l1[0, 6:], alone[0], atol=1e-5)


def test_embedded_corpus_is_english_text():
  docs = corpus.embedded_documents()
  assert len(docs) == 1189
  assert docs[0].startswith("In the beginning God created the heaven and the earth.")
  assert sum(map(len, docs)) > 4_000_000


def test_train_batches_are_deterministic_and_resumable():
  ds = pipeline.make_datasets(_data_cfg(max_documents=40), seq_len=32, batch_size=4,
                              model_vocab_size=256)
  it = pipeline.StepIterator(ds.train)
  first = [next(it) for _ in range(5)]
  again = pipeline.StepIterator(ds.train)
  again.set_state({"step": 3})
  for want in first[3:]:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert first[0]["tokens"].shape == (4, 32)
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
  # Two processes see disjoint halves of the rows.
  p0 = pipeline.train_dataset(pipeline.pack_documents([np.arange(64)], 4), 2, 0, 0, 2)
  p1 = pipeline.train_dataset(pipeline.pack_documents([np.arange(64)], 4), 2, 0, 1, 2)
  rows0 = {tuple(r) for i in range(4) for r in p0[i]["tokens"]}
  rows1 = {tuple(r) for i in range(4) for r in p1[i]["tokens"]}
  assert rows0 and rows1 and not rows0 & rows1


def test_held_out_split_is_disjoint():
  docs = [f"doc {i}" for i in range(100)]
  train, held = sources.split_documents(docs, 0.05)
  assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 100


def test_local_files_txt_jsonl_and_globs(tmp_path):
  (tmp_path / "a.txt").write_text("hello world")
  with open(tmp_path / "b.jsonl", "w") as f:
    for t in ("one doc", "two doc", "three"):
      f.write(json.dumps({"text": t}) + "\n")
  docs = sources.load_documents(str(tmp_path / "*"))
  assert docs == ["hello world", "one doc", "two doc", "three"]
  ds = pipeline.make_datasets(_data_cfg(source="files", path=str(tmp_path / "*.jsonl"),
                                        eval_fraction=0.3), 4, 1, 256)
  assert ds.eval is not None and ds.train_tokens > 0


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  t = tokenizer.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert t.vocab_size == 4 and t.bos_id == 1
  np.testing.assert_array_equal(t.encode("hello world foo"), [2, 3, 0])


def test_bad_inputs_have_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.load_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.load_documents(str(tmp_path / "nothing*.jsonl"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    sources.load_documents(str(tmp_path / "empty.txt"))
  (tmp_path / "blank.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="holds no text"):
    sources.load_documents(str(tmp_path / "blank.jsonl"))
  with pytest.raises(ValueError, match=r"has 256 tokens but model.vocab_size=100"):
    pipeline.make_datasets(_data_cfg(max_documents=5), 16, 1, model_vocab_size=100)
  with pytest.raises(ValueError, match="data.path is empty"):
    pipeline.make_datasets(_data_cfg(source="files", path=""), 16, 1, 256)
  (tmp_path / "x.parquet").write_bytes(b"PAR1")
  try:
    import pyarrow  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="needs pyarrow"):
      sources.load_documents(str(tmp_path / "x.parquet"))


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


def test_tfds_source_with_mock_data(monkeypatch):
  import sys
  with monkeypatch.context() as m:  # tensorflow-datasets stays optional: a clear error
    m.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="needs tensorflow-datasets"):
      pipeline.make_datasets(_data_cfg(source="tfds", tfds_name="lm1b"), 16, 1, 256)
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    docs = sources.load_tfds_documents("lm1b", "train")
    assert len(docs) == 12 and all(isinstance(d, str) and d for d in docs)
    ds = pipeline.make_datasets(_data_cfg(source="tfds", tfds_name="lm1b", tfds_eval_split="test"),
                                8, 2, 256)
    assert ds.train_tokens == sum(len(d.encode()) for d in docs) and ds.eval_tokens > 0
    with pytest.raises(ValueError, match="no field data.text_field='body'"):
      sources.load_tfds_documents("lm1b", "train", text_field="body")
    with pytest.raises(ValueError, match="data.tfds_name='no_such_dataset' is not a TFDS"):
      sources.load_tfds_documents("no_such_dataset", "train")


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
