"""Tokenizes a corpus once and writes it as an ArrayRecord file of token documents.

  python -m lckv_jax.data.pretokenize --input='data/*.jsonl' --tokenizer=tok.model \
      --output=data/train.array_record
  python train.py ... --config.data.source=array_record --config.data.path=data/train.array_record

Format (read by `sources.load_token_documents`): one record per document, its token ids as
little-endian int32 bytes, BOS prepended when the tokenizer has one (`--no-add_bos` to leave it
out). `<output>.json` notes the tokenizer, vocabulary size and counts.
"""

from __future__ import annotations

import argparse
import json

from lckv_jax import cli
from lckv_jax import tokenizer as tok_lib
from lckv_jax.data import sources

PROG = "python -m lckv_jax.data.pretokenize"


def pretokenize(input_spec: str, tokenizer_spec: str, output: str, text_field: str = "text",
                add_bos: bool = True, max_documents: int = 0, chunk: int = 1024,
                input_flag: str = "input_spec") -> dict:
  """Writes `output` (+ `output.json`) from 'embedded', 'tfds:NAME[:SPLIT]' or files; the note."""
  tok = tok_lib.load_tokenizer(tokenizer_spec)
  docs = sources.read_texts(input_spec, text_field, max_documents, input_flag)

  def token_docs():
    for i in range(0, len(docs), chunk):
      yield from tok_lib.encode_texts(tok, docs[i:i + chunk], add_bos)

  n_docs, n_tokens = sources.write_token_documents(output, token_docs())
  note = {"format": "one record per document: little-endian int32 token ids",
          "input": input_spec, "tokenizer": tokenizer_spec or "byte",
          "vocab_size": int(tok.vocab_size), "add_bos": bool(add_bos and tok.bos_id is not None),
          "documents": n_docs, "tokens": n_tokens}
  with open(output + ".json", "w") as f:
    json.dump(note, f, indent=1)
  return note


def main(argv=None):
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--input", default="embedded",
                 help="'embedded', 'tfds:NAME[:SPLIT]' or comma-separated .txt/.jsonl/.parquet "
                      "files or globs")
  p.add_argument("--tokenizer", default="byte",
                 help="'byte', a SentencePiece .model, a tokenizer.json or a GPT-2 vocab.json/dir")
  p.add_argument("--output", required=True, help="the ArrayRecord file to write")
  p.add_argument("--text_field", default="text", help="field of .jsonl/.parquet/TFDS rows")
  p.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True,
                 help="prepend the tokenizer's BOS id to each document")
  p.add_argument("--max_documents", type=int, default=0, help="only the first N (0 = all)")
  a = p.parse_args(argv)
  sources.check_max_documents(a.max_documents, "--max_documents")
  note = pretokenize(a.input, a.tokenizer, a.output, a.text_field, a.add_bos, a.max_documents,
                     input_flag="--input")
  print(json.dumps({"output": a.output, **note}))


if __name__ == "__main__":
  cli.run(main, prog=PROG)
