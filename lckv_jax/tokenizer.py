"""Tokenizers: one protocol, one loader, one convention for the special ids.

Kinds: UTF-8 bytes (no file), SentencePiece `.model` (the shipped `kjv-bpe-32k` too), HuggingFace
`tokenizer.json`, GPT-2 byte-level BPE (`vocab.json` + `merges.txt`), and, for generation and
evaluation only, a HuggingFace tokenizer saved with `tokenizer_config.json` (as `convert from-hf`
copies it), loaded through transformers. `load_tokenizer` reads any of them by name, file or
folder; `save_tokenizer` writes what it reads back.

The convention for special ids, which every caller follows:

- `encode` maps text to ids and adds nothing: no BOS, no EOS. Starting a sequence with BOS is the
  caller's choice, made with `encode_texts(tok, texts, add_bos=...)`: training documents
  (`data.add_bos`, default on), pre-tokenized files (`--add_bos`) and generate.py's prompts start
  with it, so a prompt begins as a training document did; evaluation scores text as given.
- `bos_id` / `eos_id` are the ids the tokenizer itself defines, or None. Bytes define none: a
  byte-level model never saw an end-of-text id (documents are separated by segment ids, not by a
  token), so no byte (NUL included) stops generation unless the caller passes `eos_id`.
- A caller that needs a token before the first (lm-eval's empty contexts and rolling windows)
  takes `prefix_id(tok)`: BOS, else EOS, else 0.

`kjv-bpe-32k` is a 32,000-piece SentencePiece BPE model (Llama's layout: unk 0, bos 1, eos 2,
byte fallback, so any UTF-8 text encodes) trained on the embedded corpus and shipped in
`lckv_jax/data/`, so that the 32,000-token configs train offline with nothing to download. It was
made by `python -m lckv_jax.data.train_tokenizer --vocab_size=32000 --byte_fallback
--output=PREFIX`; SentencePiece's training is not bit-reproducible, which is why the file is
shipped rather than trained on first use: a resumed run must see the very same ids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class Tokenizer(Protocol):
  """What every tokenizer here offers (module docstring: the convention for special ids)."""
  vocab_size: int  # ids are 0..vocab_size-1
  bos_id: int | None  # the tokenizer's beginning-of-text id; never added by `encode`
  eos_id: int | None  # its end-of-text id: where generation stops

  def encode(self, text: str) -> np.ndarray:
    """int32 ids [T] of `text`, without special tokens."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text (one call into the library where it batches)."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`."""


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], add_bos: bool) -> list[np.ndarray]:
  """int32 ids of each text, BOS first when `add_bos` and the tokenizer has one."""
  out = tokenizer.encode_batch(list(texts))
  if add_bos and tokenizer.bos_id is not None:
    out = [np.concatenate([[tokenizer.bos_id], t]).astype(np.int32) for t in out]
  return out


def prefix_id(tokenizer: Tokenizer) -> int:
  """The token put before the first one where a context must not be empty: BOS, else EOS, else 0
  (lm-evaluation-harness's `prefix_token_id`)."""
  for i in (tokenizer.bos_id, tokenizer.eos_id):
    if i is not None:
      return int(i)
  return 0


# -- the kinds ------------------------------------------------------------------------------------

class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, no special ids."""
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
  """A SentencePiece `.model` file; `flag` names the setting it came from in errors."""

  def __init__(self, path: str, flag: str = "data.tokenizer"):
    self.path = path
    try:
      import sentencepiece as spm
    except ImportError:
      raise ImportError(f"{flag}={path!r} needs sentencepiece (pip install "
                        "sentencepiece)") from None
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{flag}={path!r}: could not load it as a SentencePiece model "
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


def _import_tokenizers(path: str, flag: str):
  try:
    import tokenizers
  except ImportError:
    raise ImportError(f"{flag}={path!r} needs tokenizers (pip install tokenizers)") from None
  return tokenizers


# A tokenizer.json names no BOS/EOS roles: the usual token strings stand for them.
_BOS = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")  # GPT-2: one token for both
_EOS = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


class HFTokenizer:
  """A HuggingFace `tokenizers.Tokenizer`: from a tokenizer.json `path`, or given as `tok`."""

  def __init__(self, path: str, tok=None, flag: str = "data.tokenizer"):
    self.path = path
    if tok is None:
      try:
        tok = _import_tokenizers(path, flag).Tokenizer.from_file(path)
      except ImportError:
        raise
      except Exception as e:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(f"{flag}={path!r}: could not load it as a HuggingFace tokenizer.json "
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


def gpt2_bpe_tokenizer(vocab_path: str, merges_path: str,
                       flag: str = "data.tokenizer") -> HFTokenizer:
  """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt` (no prefix space, like GPT-2)."""
  tokenizers = _import_tokenizers(vocab_path, flag)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab_path, merges_path))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  out = HFTokenizer(vocab_path, tok, flag)
  out.merges_path = merges_path
  return out


class TransformersTokenizer:
  """A transformers tokenizer (`AutoTokenizer`), or any object with `encode`/`decode` and
  HuggingFace's `bos_token_id`/`eos_token_id`, seen through the protocol: `encode` adds no
  special tokens."""

  def __init__(self, tok, path: str | None = None):
    self.tok, self.path = tok, path
    self.vocab_size = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", None)
    self.bos_id = getattr(tok, "bos_token_id", None)
    self.eos_id = getattr(tok, "eos_token_id", None)

  def encode(self, text):
    try:
      ids = self.tok.encode(text, add_special_tokens=False)
    except TypeError:  # an encode without HuggingFace's keyword adds nothing anyway
      ids = self.tok.encode(text)
    return np.asarray(ids, np.int32).reshape(-1)

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids])


def as_tokenizer(tok) -> Tokenizer:
  """`tok` itself if it follows the protocol, else seen through it (`TransformersTokenizer`)."""
  return tok if isinstance(tok, Tokenizer) else TransformersTokenizer(tok)


# -- loading and saving ---------------------------------------------------------------------------

# Tokenizers that ship with the package, by name (data.tokenizer='kjv-bpe-32k').
SHIPPED = {"kjv-bpe-32k": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                       "kjv_bpe_32k.model")}

# What a folder may hold, in the order looked for; `save_tokenizer` writes one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
HF_CONFIG = "tokenizer_config.json"  # a transformers tokenizer (`save_pretrained`)


def describe(spec: str | None) -> str:
  """A one-line account of a tokenizer spec, for the first log line of a run."""
  if not spec or spec == "byte":
    return "byte (UTF-8 bytes, 256 ids)"
  if spec in SHIPPED:
    return (f"{spec} (SentencePiece BPE, 32,000 pieces, trained on the embedded corpus, shipped "
            "in lckv_jax/data)")
  return spec


def load_tokenizer(spec: str | None, *, vocab_size: int | None = None,
                   flag: str = "data.tokenizer", transformers: bool = False) -> Tokenizer:
  """The tokenizer named by `spec`.

  Args:
    spec: 'byte' (or empty): bytes; a shipped name ('kjv-bpe-32k'); a `.model` (SentencePiece),
      a `tokenizer.json` (HuggingFace), a `vocab.json` with `merges.txt` beside it (GPT-2 BPE);
      or a folder (a model checkpoint, a tokenizer folder) holding the first of
      `TOKENIZER_FILES`.
    vocab_size: the model's vocabulary, when the tokenizer is for a given model. A folder without
      tokenizer files is then bytes if and only if it is 256 (bytes into a 32k model would give
      fluent-looking nonsense and wrong scores), and a tokenizer with more ids is refused.
      Without it such a folder is an error.
    flag: the setting `spec` came from, named in errors (`--checkpoint`, `pretrained`, ...).
    transformers: a folder with `tokenizer_config.json` loads through transformers'
      AutoTokenizer (generation and evaluation of a converted HuggingFace checkpoint; training
      reads the same folder's tokenizer.json or .model itself).
  """
  if not spec or spec == "byte":
    return ByteTokenizer()
  if spec in SHIPPED:
    return SentencePieceTokenizer(SHIPPED[spec], flag)
  path = os.path.expanduser(spec)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{flag}={spec!r}: no such file or directory (use 'byte', "
                            f"{', '.join(repr(k) for k in SHIPPED)}, a SentencePiece .model, a "
                            "HuggingFace tokenizer.json, a GPT-2 vocab.json or a folder of one)")
  if os.path.isdir(path):
    tok = _load_folder(spec, path, vocab_size, flag, transformers)
  else:
    tok = _load_file(spec, path, flag)
  # A transformers tokenizer may count added tokens (a pad) that encode never emits, beyond the
  # embedding of a working model: it is not held to this.
  if (vocab_size is not None and not isinstance(tok, TransformersTokenizer)
      and tok.vocab_size > vocab_size):
    raise ValueError(f"{flag}={spec!r}: its tokenizer has {tok.vocab_size} tokens but "
                     f"model.vocab_size={vocab_size}: they do not belong together")
  return tok


def _load_folder(spec, path, vocab_size, flag, transformers) -> Tokenizer:
  if transformers and os.path.exists(os.path.join(path, HF_CONFIG)):
    return _load_transformers(spec, path, flag)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(path, name)):
      return _load_file(spec, os.path.join(path, name), flag)
  if vocab_size == ByteTokenizer.vocab_size:  # a byte model exports no tokenizer file
    log.info("%s holds no tokenizer files; model.vocab_size=256: UTF-8 bytes as tokens", spec)
    return ByteTokenizer()
  files = ", ".join(TOKENIZER_FILES + ((HF_CONFIG,) if transformers else ()))
  why = "" if vocab_size is None else (
      f" and model.vocab_size={vocab_size} is not the byte vocabulary (256): copy the tokenizer "
      "the model was trained with there (train.py --export_model does)")
  raise FileNotFoundError(f"{flag}={spec!r} holds no tokenizer files ({files}){why}")


def _load_transformers(spec, path, flag) -> Tokenizer:
  try:
    from transformers import AutoTokenizer  # optional
  except ImportError:
    raise ImportError(f"{flag}={spec!r} holds a HuggingFace tokenizer ({HF_CONFIG}), which needs "
                      "transformers: pip install transformers") from None
  try:
    with warnings.catch_warnings():  # about our config.json, which is not a transformers one
      warnings.simplefilter("ignore", FutureWarning)
      return TransformersTokenizer(AutoTokenizer.from_pretrained(path), path)
  except Exception as e:  # noqa: BLE001 - tokenizers raise bare Exceptions on damaged files
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
    raise ValueError(f"{flag}={spec!r}: cannot load the HuggingFace tokenizer saved there "
                     f"({reason})") from None


def _load_file(spec, path, flag) -> Tokenizer:
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, flag)
  merges = os.path.join(os.path.dirname(path), "merges.txt")
  name = os.path.basename(path)
  if name == "vocab.json" or (name.endswith(".json") and name != "tokenizer.json"
                              and _is_bpe_vocab(path, flag)):
    if not os.path.exists(merges):
      raise FileNotFoundError(f"{flag}={spec!r} is a BPE vocab.json but {merges!r} is "
                              "missing (GPT-2 BPE needs vocab.json and merges.txt side by side)")
    return gpt2_bpe_tokenizer(path, merges, flag)
  if path.endswith(".json"):
    return HFTokenizer(path, flag=flag)
  raise ValueError(f"{flag}={spec!r}: expected 'byte', a .model, a tokenizer.json or a "
                   "GPT-2 vocab.json (with merges.txt)")


def _is_bpe_vocab(path: str, flag: str) -> bool:
  """A plain {token: id} map (vocab.json), not a tokenizer.json (which has a 'model' key)."""
  try:
    with open(path, encoding="utf-8") as f:
      head = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{flag}={path!r} is not valid JSON ({e})") from None
  return isinstance(head, dict) and "model" not in head and \
      all(isinstance(v, int) for v in list(head.values())[:100])


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, spec: str | None = None) -> None:
  """Fails before training when the tokenizer emits ids the model has no embedding for."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(
        f"data.tokenizer={spec or 'byte'!r} has {tokenizer.vocab_size} tokens but "
        f"model.vocab_size={model_vocab_size}; set --config.model.vocab_size="
        f"{tokenizer.vocab_size} (or larger)")


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> list[str]:
  """Writes the files that `load_tokenizer(directory)` reads back as `tokenizer` (none for bytes,
  the fallback of a 256-token model); returns their names. A model exported with its tokenizer is
  then decoded with the ids it was trained on, never with another tokenizer's."""
  if isinstance(tokenizer, ByteTokenizer):
    return []
  if isinstance(tokenizer, TransformersTokenizer):
    written = tokenizer.tok.save_pretrained(directory)
    return sorted(os.path.basename(f) for f in written)
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
