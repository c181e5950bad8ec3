"""Trains a SentencePiece model on a corpus, offline.

  python -m lckv_jax.data.train_tokenizer --vocab_size=8000 --output=/tmp/kjv   # embedded corpus
  python -m lckv_jax.data.train_tokenizer --input='data/*.jsonl' --vocab_size=32000 \
      --output=tok --byte_fallback
  python train.py ... --config.data.tokenizer=/tmp/kjv.model --config.model.vocab_size=8000

Writes PREFIX.model and PREFIX.vocab. Each line of each document is one SentencePiece sentence;
ids: unk 0, bos 1, eos 2, no pad.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from lckv_jax import cli

PROG = "python -m lckv_jax.data.train_tokenizer"


def train_sentencepiece(texts, vocab_size: int, output_prefix: str, model_type: str = "bpe",
                        byte_fallback: bool = False, character_coverage: float = 1.0,
                        input_sentence_size: int = 2_000_000, seed: int = 0) -> str:
  """Trains on the lines of `texts` (documents); returns the path of PREFIX.model."""
  try:
    import sentencepiece as spm
  except ImportError:
    raise ImportError("training a tokenizer needs sentencepiece (pip install sentencepiece)") \
        from None
  _check_options(vocab_size, output_prefix, character_coverage, input_sentence_size)
  lines = [line for t in texts for line in t.splitlines() if line.strip()]
  if not lines:
    raise ValueError("train_tokenizer: the input holds no text")
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=output_prefix, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  except RuntimeError as e:  # sentencepiece reports every rejection as RuntimeError
    raise ValueError(f"sentencepiece training failed with vocab_size={vocab_size}, model_type="
                     f"{model_type!r}, byte_fallback={byte_fallback}: {_spm_reason(e)}") from None
  return output_prefix + ".model"


def _check_options(vocab_size, output_prefix, character_coverage, input_sentence_size) -> None:
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
  if not output_prefix or os.path.isdir(output_prefix):
    raise ValueError(f"output={output_prefix!r} must be a file prefix (PREFIX.model and "
                     "PREFIX.vocab are written), not a directory")
  if not 0 < character_coverage <= 1:
    raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
  if input_sentence_size < 0:
    raise ValueError(f"input_sentence_size must be >= 0 (0 = all), got {input_sentence_size}")


def _spm_reason(e: RuntimeError) -> str:
  """sentencepiece's message without its source location ('INTERNAL: trainer.cc(638) [...] ')."""
  text = str(e).splitlines()[0] if str(e) else type(e).__name__
  return re.sub(r"^[A-Z_]+: (\S+\.cc\(\d+\) (\[.*?\] )?)?", "", text)


def main(argv=None):
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  p.add_argument("--input", default="embedded",
                 help="'embedded', 'tfds:NAME[:SPLIT]' or comma-separated .txt/.jsonl/.parquet "
                      "files or globs")
  p.add_argument("--vocab_size", type=int, required=True, help="pieces in the model")
  p.add_argument("--output", required=True, help="prefix of PREFIX.model / PREFIX.vocab")
  p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
  p.add_argument("--byte_fallback", action=argparse.BooleanOptionalAction, default=False,
                 help="unknown characters as UTF-8 byte pieces (Llama style; needs vocab_size "
                      "above 259 + the corpus' characters)")
  p.add_argument("--character_coverage", type=float, default=1.0)
  p.add_argument("--input_sentence_size", type=int, default=2_000_000,
                 help="lines sampled for training (0 = all)")
  p.add_argument("--text_field", default="text", help="field of .jsonl/.parquet/TFDS rows")
  p.add_argument("--max_documents", type=int, default=0, help="only the first N (0 = all)")
  a = p.parse_args(argv)
  from lckv_jax.data.sources import check_max_documents, read_texts
  check_max_documents(a.max_documents, "--max_documents")
  _check_options(a.vocab_size, a.output, a.character_coverage, a.input_sentence_size)
  texts = read_texts(a.input, a.text_field, a.max_documents, "--input")
  path = train_sentencepiece(texts, a.vocab_size, a.output, a.model_type, a.byte_fallback,
                             a.character_coverage, a.input_sentence_size)
  print(json.dumps({"model": path, "vocab_size": a.vocab_size, "documents": len(texts)}))


if __name__ == "__main__":
  cli.run(main, prog=PROG)
