"""Documents from local files (.txt, .jsonl, .parquet; paths or globs) and the held-out split."""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _expand(paths: str | Sequence[str]) -> list[str]:
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  if not paths:
    raise ValueError("data.path is empty: give local files or globs (comma-separated) with "
                     "data.source='files'")
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


def split_documents(docs: Sequence[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """(train, held-out): every k-th document is held out, k = round(1 / eval_fraction).

  With a single document its last `eval_fraction` of characters is held out instead.
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
