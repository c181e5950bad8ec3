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


def train_sentencepiece(texts, vocab_size: int, output_prefix: str, model_type: str = "bpe",
                        byte_fallback: bool = False, character_coverage: float = 1.0,
                        input_sentence_size: int = 2_000_000, seed: int = 0) -> str:
  """Trains on the lines of `texts` (documents); returns the path of PREFIX.model."""
  try:
    import sentencepiece as spm
  except ImportError:
    raise ImportError("training a tokenizer needs sentencepiece (pip install sentencepiece)") \
        from None
  lines = [line for t in texts for line in t.splitlines() if line.strip()]
  if not lines:
    raise ValueError("train_tokenizer: the input holds no text")
  spm.set_random_generator_seed(seed)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=output_prefix, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  return output_prefix + ".model"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
  from lckv_jax.data.sources import read_texts
  texts = read_texts(a.input, a.text_field, a.max_documents)
  path = train_sentencepiece(texts, a.vocab_size, a.output, a.model_type, a.byte_fallback,
                             a.character_coverage, a.input_sentence_size)
  print(json.dumps({"model": path, "vocab_size": a.vocab_size, "documents": len(texts)}))


if __name__ == "__main__":
  main()
