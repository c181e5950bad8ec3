"""Documents from local files, pre-tokenized ArrayRecord files, TFDS; and the held-out split.

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

import glob
import json
import os
from typing import Sequence

import numpy as np

_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _expand(paths: str | Sequence[str]) -> list[str]:
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  if not paths:
    raise ValueError("data.path is empty: give local files or globs (comma-separated) with "
                     "data.source='files' or 'array_record'")
  out = []
  for p in paths:
    p = os.path.expanduser(p.strip())
    hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
    hits = [h for h in hits if not os.path.isdir(h)] if glob.has_magic(p) else hits
    if not hits or not all(os.path.exists(h) for h in hits):
      raise FileNotFoundError(f"data.path: {p!r} matches no file")
    out.extend(hits)
  return out


def _read_txt(path: str) -> list[str]:
  # One document per file; a form feed or three blank lines also separate documents.
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return [d for d in text.replace("\f", "\n\n\n\n").split("\n\n\n\n") if d.strip()]


def _read_jsonl(path: str, text_field: str) -> list[str]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or text_field not in row:
        raise ValueError(f"{path}:{n}: no field data.text_field={text_field!r}")
      docs.append(str(row[text_field]))
  return docs


def _read_parquet(path: str, text_field: str) -> list[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); or convert it to "
                      ".jsonl") from None
  table = pq.read_table(path, columns=[text_field])
  return [str(t) for t in table.column(text_field).to_pylist() if t is not None]


def load_documents(paths: str | Sequence[str], text_field: str = "text") -> list[str]:
  """Reads every document of the given files; an empty file or an empty result is an error."""
  docs = []
  for path in _expand(paths):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
      raise ValueError(f"data.path: {path!r} has suffix {suffix!r}; supported: {_SUFFIXES}")
    if os.path.getsize(path) == 0:
      raise ValueError(f"data.path: {path!r} is empty")
    if suffix == ".txt":
      got = _read_txt(path)
    elif suffix == ".jsonl":
      got = _read_jsonl(path, text_field)
    else:
      got = _read_parquet(path, text_field)
    if not any(d.strip() for d in got):
      raise ValueError(f"data.path: {path!r} holds no text")
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path, _WRITER_OPTIONS)
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
    for row in rows(list(range(start, min(n, start + 1024)))):
      if text_field not in row:
        raise ValueError(f"TFDS {name!r} has no field data.text_field={text_field!r}; its "
                         f"fields: {sorted(row)}")
      t = row[text_field]
      docs.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
  if not any(d.strip() for d in docs):
    raise ValueError(f"TFDS {name!r} split {split!r} holds no text in field {text_field!r}")
  return docs


def read_texts(spec: str, text_field: str = "text", max_documents: int = 0) -> list[str]:
  """Text documents for the command-line tools: 'embedded', 'tfds:NAME[:SPLIT]' or files/globs."""
  if spec == "embedded":
    from lckv_jax.data.corpus import embedded_documents
    docs = list(embedded_documents())
  elif spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    return load_tfds_documents(name, split or "train", text_field, max_documents=max_documents)
  else:
    docs = load_documents(spec, text_field)
  return docs[:max_documents] if max_documents else docs


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
