"""What one forward pass of the model does (docs/spec.md §4, §5).

The mode decides which KV a pass reads and writes and which attention kernels may run:

- `TRAIN`: whole sequences without a cache, following the iteration plan (training, scoring);
  `Transformer.__call__`.
- `PREFILL_EMPTY`: a prompt chunk written from slot 0 of every row of an empty cache. Its keys
  are its own, so without padding it attends causally by index (the fused kernels), and a ring
  buffer needs room for the chunk only.
- `PREFILL`: a chunk written after what each row's cache holds (chunked prefill, a prompt joined
  to a running batch); it attends to the cache through the dense mask.
- `DECODE`: one token per row after what the cache holds; one exact pass (§5).
"""

import enum


class Mode(enum.Enum):
  TRAIN = "train"
  PREFILL_EMPTY = "prefill_empty"
  PREFILL = "prefill"
  DECODE = "decode"

  @property
  def cached(self) -> bool:
    """The pass reads and writes a KV cache."""
    return self is not Mode.TRAIN
