"""Packing documents into fixed-length rows and the grain pipelines over them.

A row is `seq_len` tokens cut from the concatenation of the (shuffled) documents. Each piece of a
document inside a row gets its own segment id (1, 2, ... within the row; 0 = padding, only at the
very end of the data) and positions restarting at 0, so the model never attends across documents
(`Transformer.__call__` takes `positions` and `segment_ids`).

The train pipeline is a `grain.MapDataset`: rows -> shard by process -> shuffle -> repeat (each
epoch reshuffled, deterministically) -> batch.
It is random access, so batch `step` is a pure function of (data, seed, step): resuming from a
step is exact and needs no iterator state beyond the step (`StepIterator`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import grain
import jax
import numpy as np


def pack_documents(docs_tokens: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Concatenates documents and cuts rows: {'tokens', 'segment_ids', 'positions'} [rows, seq_len]."""
  docs_tokens = [np.asarray(d, np.int32) for d in docs_tokens if len(d)]
  if not docs_tokens:
    raise ValueError("no tokens to pack: every document is empty")
  stream = np.concatenate(docs_tokens)
  doc = np.repeat(np.arange(len(docs_tokens), dtype=np.int64), [len(d) for d in docs_tokens])
  rows = -(-len(stream) // seq_len)
  pad = rows * seq_len - len(stream)
  tokens = np.pad(stream, (0, pad)).reshape(rows, seq_len)
  doc = np.pad(doc, (0, pad), constant_values=-1).reshape(rows, seq_len)
  starts = np.ones((rows, seq_len), bool)
  starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
  segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
  segment_ids[doc < 0] = 0
  idx = np.broadcast_to(np.arange(seq_len), (rows, seq_len))
  start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  positions = (idx - start_idx).astype(np.int32)
  positions[doc < 0] = 0
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


class _Rows:
  """A grain random-access source over packed rows."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.rows = rows

  def __len__(self):
    return len(self.rows["tokens"])

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.rows.items()}


def train_dataset(rows: dict[str, np.ndarray], batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite batches of `batch_size` rows for this process: batch i is a pure function of i."""
  ds = grain.MapDataset.source(_Rows(rows))
  ds = ds.slice(slice(process_index, None, process_count))
  if len(ds) == 0:
    raise ValueError("the train split has no rows for this process: use more data")
  if len(ds) < batch_size:  # e.g. the embedded corpus under a 7b batch: rows repeat in a batch
    logging.warning("the train split has %d rows for this process, fewer than one batch (%d): "
                    "rows repeat within a batch; use more data for a real run", len(ds),
                    batch_size)
  return ds.shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True)


def eval_dataset(rows: dict[str, np.ndarray], batch_size: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0) -> grain.MapDataset:
  """Finite batches of the held-out rows, padded with empty rows (segment 0) to whole batches."""
  n = len(rows["tokens"])
  per = -(-n // process_count)
  n_pad = -(-per // batch_size) * batch_size * process_count - n
  rows = {k: np.concatenate([v, np.zeros((n_pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
  ds = grain.MapDataset.source(_Rows(rows)).slice(slice(process_index, None, process_count))
  ds = ds.batch(batch_size, drop_remainder=True)
  if max_batches:
    ds = ds.slice(slice(0, max_batches))
  return ds


@dataclasses.dataclass
class StepIterator:
  """Iterates a random-access batch dataset from `step`; the step is its whole state."""
  dataset: grain.MapDataset
  step: int = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.dataset[self.step]
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


@dataclasses.dataclass
class Datasets:
  train: grain.MapDataset
  eval: grain.MapDataset | None
  tokenizer: object
  train_tokens: int
  eval_tokens: int


def make_datasets(data_cfg, seq_len: int, batch_size: int, model_vocab_size: int,
                  process_index: int | None = None, process_count: int | None = None) -> Datasets:
  """Builds the train and held-out pipelines from the `data` section of the train config."""
  from lckv_jax import tokenizer as tok_lib
  from lckv_jax.data import sources
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  tokenizer = tok_lib.load_tokenizer(data_cfg.tokenizer)
  src = sources.source(data_cfg.source)
  query = sources.Query(path=data_cfg.path, text_field=data_cfg.text_field,
                        tfds_name=data_cfg.tfds_name, split=data_cfg.tfds_train_split,
                        tfds_data_dir=data_cfg.tfds_data_dir,
                        max_documents=data_cfg.max_documents)
  if src.tokens:  # already token ids: the tokenizer only decodes
    docs = sources.read_documents(data_cfg.source, query)
    lo = min((int(d.min()) for d in docs if len(d)), default=0)
    hi = max((int(d.max()) for d in docs if len(d)), default=0)
    if lo < 0 or hi >= model_vocab_size:
      raise ValueError(f"data.path={data_cfg.path!r} holds token ids in [{lo}, {hi}] but "
                       f"model.vocab_size={model_vocab_size}; set --config.model.vocab_size to "
                       "the vocabulary the files were written with (see <file>.json)")
  else:  # before reading: a corpus can take minutes
    tok_lib.check_vocab(tokenizer, model_vocab_size, data_cfg.tokenizer)
    docs = sources.read_documents(data_cfg.source, query)
  eval_docs = None
  if src.splits and data_cfg.tfds_eval_split:
    eval_docs = sources.read_documents(
        data_cfg.source, dataclasses.replace(query, split=data_cfg.tfds_eval_split))
  if eval_docs is None:
    train_docs, eval_docs = sources.split_documents(docs, data_cfg.eval_fraction)
  else:
    train_docs = docs
  encode = lambda ds: list(ds) if src.tokens else tok_lib.encode_texts(tokenizer, ds,
                                                                       data_cfg.add_bos)
  order = np.random.default_rng(data_cfg.seed).permutation(len(train_docs))
  train_tok = encode([train_docs[i] for i in order])
  train_rows = pack_documents(train_tok, seq_len)
  train = train_dataset(train_rows, batch_size, data_cfg.seed, pi, pc)
  ev, eval_tokens = None, 0
  if eval_docs:
    eval_rows = pack_documents(encode(eval_docs), seq_len)
    ev = eval_dataset(eval_rows, batch_size, pi, pc, data_cfg.eval_batches)
    eval_tokens = int((eval_rows["segment_ids"] > 0).sum())
  return Datasets(train, ev, tokenizer, int((train_rows["segment_ids"] > 0).sum()), eval_tokens)
