"""Data sources: local files (txt, jsonl, Parquet, globs), TFDS, the held-out split; bad files are
an error naming the file and line, never a silent number or a traceback."""

import json

import pytest

from lckv_jax.data import pipeline, sources
from tests.cli_test import _write
from tests.data.pipeline_test import _data_cfg


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


# -- bad files: an error naming the file and line --------------------------------------------------

@pytest.mark.parametrize("value,kind", [(None, "null"), (12345, "int"), (["a"], "list"),
                                        (1.5, "float")])
def test_jsonl_non_string_text_names_file_and_line(tmp_path, value, kind):
  path = _write(tmp_path / "data.jsonl", json.dumps({"text": "fine"}) + "\n\n"
                + json.dumps({"text": value}) + "\n")
  with pytest.raises(ValueError, match=rf"data.jsonl:3: field 'text' is {kind}, not a string"):
    sources.load_documents(path)


@pytest.mark.parametrize("values,match", [(["a", None], r"row 1 .*'text' is null"),
                                          ([7, 8], r"row 0 .*'text' is int")])
def test_parquet_non_string_text_names_file_and_row(tmp_path, values, match):
  pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (optional)")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": values}), tmp_path / "d.parquet")
  with pytest.raises(ValueError, match=r"d.parquet: " + match):
    sources.load_documents(str(tmp_path / "d.parquet"))
  with pytest.raises(ValueError, match=r"d.parquet: no column data.text_field='body'"):
    sources.load_documents(str(tmp_path / "d.parquet"), "body")


@pytest.mark.parametrize("name,data,match", [
    ("a.txt", b"caf\xe9 latin-1", r"a.txt: not UTF-8 text: byte 0xe9 at byte offset 3"),
    ("b.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"b.jsonl:2: not UTF-8 .* offset 25"),
])
def test_non_utf8_files_name_the_file(tmp_path, name, data, match):
  with pytest.raises(ValueError, match=match):
    sources.load_documents(_write(tmp_path / name, data))


def test_reader_flags(tmp_path):
  with pytest.raises(ValueError, match=r"max_documents must be an integer >= 0.*got -1"):
    sources.read_texts("embedded", max_documents=-1)  # would drop the last document
  with pytest.raises(IsADirectoryError, match=r"--input: .* is a directory"):
    sources.read_texts(str(tmp_path), flag="--input")
  crlf = _write(tmp_path / "w.txt", b"a\r\nb\r\n\r\n\r\n\r\nc")  # as open() reads it
  assert sources.load_documents(crlf) == ["a\nb", "c"]
