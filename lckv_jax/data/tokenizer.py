"""Tokenizers: byte-level (no file), SentencePiece `.model`, HuggingFace `tokenizer.json`, GPT-2
byte-level BPE files (`vocab.json` + `merges.txt`), and the shipped `kjv-bpe-32k`.

`kjv-bpe-32k` is a 32,000-piece SentencePiece BPE model (Llama's layout: unk 0, bos 1, eos 2,
byte fallback, so any UTF-8 text encodes) trained on the embedded corpus and shipped in this
package, so that the 32,000-token configs train offline with nothing to download. It was made by
`python -m lckv_jax.data.train_tokenizer --vocab_size=32000 --byte_fallback --output=PREFIX`;
SentencePiece's training is not bit-reproducible across runs, which is why the file is shipped
rather than trained on first use: a resumed run must see the very same ids.
"""

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
    self.path = path
    try:
      import sentencepiece as spm
    except ImportError:
      raise ImportError(f"data.tokenizer={path!r} needs sentencepiece (pip install "
                        "sentencepiece)") from None
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"data.tokenizer={path!r} is not a readable SentencePiece model "
                       f"({str(e).splitlines()[0][:200]})") from None
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  def encode_batch(self, texts):
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(list(texts))]

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    return self.sp.decode([int(i) for i in ids])


def _import_tokenizers(path: str):
  try:
    import tokenizers
  except ImportError:
    raise ImportError(f"data.tokenizer={path!r} needs tokenizers (pip install "
                      "tokenizers)") from None
  return tokenizers


_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")  # GPT-2: one token for both
_EOS = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


class HFTokenizer:
  """A HuggingFace `tokenizers.Tokenizer`: from a tokenizer.json `path`, or given as `tok`."""

  def __init__(self, path: str, tok=None):
    self.path = path
    if tok is None:
      try:
        tok = _import_tokenizers(path).Tokenizer.from_file(path)
      except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(f"data.tokenizer={path!r} is not a readable HuggingFace tokenizer.json "
                         f"({str(e).splitlines()[0][:200]})") from None
    self.tok = tok
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.bos_id = next((vocab[t] for t in _BOS if t in vocab), None)
    self.eos_id = next((vocab[t] for t in _EOS if t in vocab), None)

  def encode_batch(self, texts):
    encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids])


def gpt2_bpe_tokenizer(vocab_path: str, merges_path: str) -> HFTokenizer:
  """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt` (no prefix space, like GPT-2)."""
  tokenizers = _import_tokenizers(vocab_path)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab_path, merges_path))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  out = HFTokenizer(vocab_path, tok)
  out.merges_path = merges_path
  return out


# Tokenizers that ship with the package, by name (data.tokenizer='kjv-bpe-32k').
SHIPPED = {"kjv-bpe-32k": os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "kjv_bpe_32k.model")}


def describe(spec: str | None) -> str:
  """A one-line account of a tokenizer spec, for the first log line of a run."""
  if not spec or spec == "byte":
    return "byte (UTF-8 bytes, 256 ids)"
  if spec in SHIPPED:
    return (f"{spec} (SentencePiece BPE, 32,000 pieces, trained on the embedded corpus, shipped "
            "in lckv_jax/data)")
  return spec


def load_tokenizer(spec: str | None):
  """'byte' (or empty) -> ByteTokenizer; a shipped name ('kjv-bpe-32k') or a `.model` file ->
  SentencePiece; a `tokenizer.json` -> HF; a `vocab.json` with `merges.txt` beside it -> GPT-2
  BPE. A directory: the first of tokenizer.json, tokenizer.model, vocab.json + merges.txt it
  holds."""
  if not spec or spec == "byte":
    return ByteTokenizer()
  if spec in SHIPPED:
    return SentencePieceTokenizer(SHIPPED[spec])
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
      if os.path.exists(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.tokenizer={spec!r}: no such file (use 'byte', "
                            f"{', '.join(repr(k) for k in SHIPPED)}, a SentencePiece .model, a "
                            "HuggingFace tokenizer.json or a GPT-2 vocab.json)")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  merges = os.path.join(os.path.dirname(path), "merges.txt")
  name = os.path.basename(path)
  if name == "vocab.json" or (name.endswith(".json") and name != "tokenizer.json"
                              and _is_bpe_vocab(path)):
    if not os.path.exists(merges):
      raise FileNotFoundError(f"data.tokenizer={spec!r} is a BPE vocab.json but {merges!r} is "
                              "missing (GPT-2 BPE needs vocab.json and merges.txt side by side)")
    return gpt2_bpe_tokenizer(path, merges)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(f"data.tokenizer={spec!r}: expected 'byte', a .model, a tokenizer.json or a "
                   "GPT-2 vocab.json (with merges.txt)")


def _is_bpe_vocab(path: str) -> bool:
  """A plain {token: id} map (vocab.json), not a tokenizer.json (which has a 'model' key)."""
  import json
  try:
    with open(path, encoding="utf-8") as f:
      head = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"data.tokenizer={path!r} is not valid JSON ({e})") from None
  return isinstance(head, dict) and "model" not in head and \
      all(isinstance(v, int) for v in list(head.values())[:100])


def check_vocab(tokenizer, model_vocab_size: int, spec: str | None = None) -> None:
  """Fails before training when the tokenizer emits ids the model has no embedding for."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"data.tokenizer={spec or 'byte'!r} has {tokenizer.vocab_size} tokens but "
        f"model.vocab_size={model_vocab_size}; set --config.model.vocab_size="
        f"{tokenizer.vocab_size} (or larger)")


def save_tokenizer(tokenizer, directory: str) -> list[str]:
  """Writes the files that `load_tokenizer(directory)` reads back as `tokenizer` (none for bytes,
  the fallback of a 256-token model); returns their names. A model exported with its tokenizer is
  then decoded with the ids it was trained on, never with another tokenizer's."""
  import shutil
  if isinstance(tokenizer, ByteTokenizer):
    return []
  src = tokenizer.path
  if isinstance(tokenizer, SentencePieceTokenizer):
    pairs = [(src, "tokenizer.model")]
  elif getattr(tokenizer, "merges_path", None):  # GPT-2 BPE
    pairs = [(src, "vocab.json"), (tokenizer.merges_path, "merges.txt")]
  else:
    pairs = [(src, "tokenizer.json")]
  for a, name in pairs:
    shutil.copyfile(a, os.path.join(directory, name))
  return [name for _, name in pairs]
