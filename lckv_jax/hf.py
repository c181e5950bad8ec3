"""HuggingFace checkpoint files: config.json, (sharded) safetensors, tokenizer files.

File-level I/O only (numpy + safetensors, no torch): which tensors exist, their shapes, reading
one at a time, writing a state dict in one file or in shards with `model.safetensors.index.json`.
The mapping between these tensors and lckv-jax parameters lives in `convert.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied next to a converted checkpoint, in both directions, so tokenizer loaders find them and
# HuggingFace's generate() stops at the model's own EOS (generation_config.json).
COPIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json")
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def read_json(file: str) -> dict:
  """A JSON object from `file`; damage is one ValueError naming the file."""
  try:
    with open(file, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
  return d


def _open(file: str):
  """`safe_open(file)`, with a damaged file reported as one ValueError naming it."""
  try:
    return safe_open(file, "numpy")
  except SafetensorError as e:
    raise ValueError(f"{file} is not a readable safetensors file ({e})") from None


def read_config(path: str) -> dict:
  """The parsed `config.json` of a checkpoint directory."""
  if not os.path.isdir(path):
    what = "is a file" if os.path.exists(path) else "does not exist"
    raise FileNotFoundError(f"HuggingFace checkpoint {path} {what}; expected a directory with "
                            "config.json and *.safetensors")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} is not a HuggingFace checkpoint: {cfg_path} is missing")
  return read_json(cfg_path)


class TensorReader:
  """Lazy access to the tensors of a checkpoint directory, sharded or not.

  Uses `model.safetensors.index.json` when present, else every `*.safetensors` file of the
  directory. Tensors are read one at a time, as numpy arrays (bfloat16 via ml_dtypes).
  """

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
      self._file_of = {name: os.path.join(path, file) for name, file in weight_map.items()}
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(
            f"{path}: no {INDEX_FILE} and no *.safetensors file (pytorch_model.bin checkpoints are "
            "not supported: re-save with safe_serialization=True)")
      self._file_of = {}
      for file in files:
        with _open(os.path.join(path, file)) as f:
          for name in f.keys():
            self._file_of[name] = os.path.join(path, file)
    self._shapes = {}
    for file in sorted(set(self._file_of.values())):
      if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: shard {os.path.basename(file)} named by {INDEX_FILE} "
                                "is missing")
      with _open(file) as f:
        for name in f.keys():
          if self._file_of.get(name) == file:
            self._shapes[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(self._file_of) - set(self._shapes))
    if missing:
      raise ValueError(f"{path}: tensor(s) {missing[:5]} are listed in {INDEX_FILE} but absent "
                       "from their shard")

  def names(self) -> list[str]:
    return sorted(self._shapes)

  def __contains__(self, name: str) -> bool:
    return name in self._shapes

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def get(self, name: str) -> np.ndarray:
    if name not in self._shapes:
      raise KeyError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
    with _open(self._file_of[name]) as f:
      try:
        return f.get_tensor(name)
      except SafetensorError as e:
        raise ValueError(f"{self._file_of[name]}: tensor {name!r} is unreadable ({e})") from None


def _refuse_existing(path: str, names: Iterable[str]) -> None:
  taken = [n for n in names if os.path.lexists(os.path.join(path, n))]
  if taken:
    raise FileExistsError(f"destination {path} already holds {', '.join(taken)}: choose a new "
                          "directory")


def write_tensors(path: str, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int | None = None) -> list[str]:
  """Writes `tensors` as `model.safetensors`, or as shards plus an index if they exceed the size.

  Returns the file names written. The metadata `{"format": "pt"}` is what transformers expects.
  Refuses to overwrite a file.
  """
  os.makedirs(path, exist_ok=True)
  names = list(tensors)
  total = sum(int(np.asarray(tensors[n]).nbytes) for n in names)
  shards: list[list[str]] = [[]]
  size = 0
  for name in names:
    nbytes = int(np.asarray(tensors[name]).nbytes)
    if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  meta = {"format": "pt"}
  files = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  _refuse_existing(path, files + ([] if len(shards) == 1 else [INDEX_FILE]))
  if len(shards) == 1:
    save_file({n: np.ascontiguousarray(tensors[n]) for n in names},
              os.path.join(path, SINGLE_FILE), metadata=meta)
    return [SINGLE_FILE]
  weight_map = {}
  for file, shard in zip(files, shards):
    save_file({n: np.ascontiguousarray(tensors[n]) for n in shard}, os.path.join(path, file),
              metadata=meta)
    weight_map.update({n: file for n in shard})
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files


def copy_tokenizer_files(src: str, dst: str, names: Iterable[str] = COPIED_FILES) -> list[str]:
  """Copies the tokenizer files present in `src` into `dst` (never over a file); returns the names
  copied."""
  present = [n for n in names if os.path.exists(os.path.join(src, n))]
  _refuse_existing(dst, present)
  for name in present:
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  return present
