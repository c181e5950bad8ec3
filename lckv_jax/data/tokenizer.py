"""Tokenizers: byte-level (no file), SentencePiece `.model`, HuggingFace `tokenizer.json`."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, no special tokens."""
  vocab_size = 256
  bos_id = None
  eos_id = None

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:

  def __init__(self, path: str):
    try:
      import sentencepiece as spm
    except ImportError:
      raise ImportError(f"data.tokenizer={path!r} needs sentencepiece (pip install "
                        "sentencepiece)") from None
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  def encode_batch(self, texts):
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(list(texts))]

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer:

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError:
      raise ImportError(f"data.tokenizer={path!r} needs tokenizers (pip install "
                        "tokenizers)") from None
    self.tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.bos_id = next((vocab[t] for t in ("<s>", "<|begin_of_text|>", "<bos>") if t in vocab), None)
    self.eos_id = next((vocab[t] for t in ("</s>", "<|end_of_text|>", "<eos>") if t in vocab), None)

  def encode_batch(self, texts):
    encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str | None):
  """'byte' (or empty) -> ByteTokenizer; a `.model` file -> SentencePiece; a `.json` -> HF."""
  if not spec or spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  elif os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.model")):
    path = os.path.join(path, "tokenizer.model")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file (use 'byte', a SentencePiece "
                            ".model or a HuggingFace tokenizer.json)")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(f"data.tokenizer={spec!r}: expected 'byte', a .model or a .json file")


def check_vocab(tokenizer, model_vocab_size: int, spec: str | None = None) -> None:
  """Fails before training when the tokenizer emits ids the model has no embedding for."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"data.tokenizer={spec or 'byte'!r} has {tokenizer.vocab_size} tokens but "
        f"model.vocab_size={model_vocab_size}; set --config.model.vocab_size="
        f"{tokenizer.vocab_size} (or larger)")
