"""The KV cache: buffers for the KV-computing layers only (docs/spec.md §5, §8).

A `KVCache` is a pytree holding, for every layer j that computes KV, a buffer `layers[j]`
(`attention.KV`: k, v `[batch, slots, kv_heads, head_dim]`, and the position and segment of every
slot, `seg == 0` marking an empty slot that is never attended). For LCKV `0_20_..._20_21` that is
3 buffers of 22 layers. Its static part says how the buffers are laid out; the cache owns what
follows from that: where a chunk is written (`write`), widening rings around a chunk and
compacting them after (`widen`, `compact`), the sink cache's eviction (`evict_sink`), and rows
(`insert_row`, `insert_rows`, `put_rows`, `left_align`).

Three layouts, all read by `Transformer.step` the same way (attention masks by the stored
`pos`/`seg`, never by slot order):

- full: `max_len` slots; slot s holds the s-th token of the row (left padding included).
- ring: a KV layer read only by sliding-window layers (`rings`) keeps `sliding_window` slots;
  slot s lives at `s % slots` (`write` wraps modulo the buffer length). A decode step writes
  straight into the ring; a longer chunk needs `sliding_window + chunk - 1` slots, so `widen` and
  `compact` turn the ring around it (`generation.prefill` does this).
- sink (StreamingLLM, `n_sink` set): `n_sink + window` slots for every KV layer, left-aligned:
  slot s holds cache position s. When full, `evict_sink` drops the oldest non-sink token, shifts
  the rest down one slot and re-rotates their keys one position back (HF SinkCache); the new
  token then takes position `length` = `n_sink + window - 1`. Memory and positions stay bounded.

`contiguous` is a promise about the contents: each row holds one sequence (one segment) in the
contiguous slots [first non-empty slot, next write], as `Generator` keeps it; a decode step may
then read only that span (`config.decode_attention`).

Any layout may store its K and V quantized (`dtype` "int8" or "float8_e4m3fn", `lckv_jax.quant`):
each buffer then also holds `k_scale`, `v_scale` [batch, kv_heads, slots] (float32, slots last:
see `attention.KV`), one per token and KV head. `write` quantizes; every operation that moves
slots moves the scales with them (`KV.map_slots`: along their own slot axis); `evict_sink`
dequantizes the keys it re-rotates and quantizes them again. The arrays say the format (int8 K
and V with scales), so it needs no static field: a jitted step still compiles once per format, as
the tree's leaves differ.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from lckv_jax import layer_types as lt_lib
from lckv_jax import quant
from lckv_jax.attention import KV, SLOT_AXIS, apply_rope, rope_inv_freq, rope_tables
from lckv_jax.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------


def ring_layers(config: ModelConfig) -> tuple[int, ...]:
  """KV layers whose every reader is a sliding-window layer: they need only the last W keys."""
  lt = config.layer_spec
  return tuple(j for j in lt.kv_layers
               if all(lt.sliding[i] for i, t in enumerate(lt.attends_to) if t == j))


def buffer_slots(config: ModelConfig, max_len: int, ring: bool = True) -> dict[int, int]:
  """Slots of each KV layer's buffer: `max_len`, or `min(sliding_window, max_len)` for rings."""
  rings = set(ring_layers(config)) if ring else set()
  return {j: min(config.sliding_window, max_len) if j in rings else max_len
          for j in config.layer_spec.kv_layers}


def rounded_slots(tokens: int) -> int:
  """Cache slots for `tokens` tokens: whole blocks of the decode kernel
  (`lckv_jax.kernels.decode`), 128 slots (16 below 128); the extra slots stay empty."""
  multiple = 128 if tokens >= 128 else 16
  return -(-tokens // multiple) * multiple


def _empty(config: ModelConfig, batch: int, slots: int, dtype) -> KV:
  shape = (batch, slots, config.num_kv_heads, config.resolved_head_dim)
  scales = ()
  if quant.is_quantized(dtype):
    scales = tuple(jnp.zeros((batch, shape[2], slots), quant.SCALE_DTYPE) for _ in range(2))
  # Distinct arrays (never aliases), so the whole cache can be donated to `jit`.
  return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), jnp.int32),
            jnp.zeros((batch, slots), jnp.int32), *scales)


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None, *, ring: bool = True,
                metadata: bool = False) -> int:
  """Bytes of the K and V buffers of `KVCache.create`, before allocating them (docs/spec.md §8).

  `dtype`: the cache's (default the compute dtype); a quantized one's scales are counted. With
  `metadata`, the int32 position and segment of every slot are counted as well, so the result
  equals the bytes of every array of the cache.
  """
  itemsize, scale = quant.itemsizes(quant.cache_dtype(dtype, config.compute_dtype))
  per_slot = (lt_lib.kv_bytes_per_key(config.num_kv_heads, config.resolved_head_dim, itemsize,
                                      scale) + (8 if metadata else 0))
  return batch * per_slot * sum(buffer_slots(config, max_len, ring).values())


# What a run on an accelerator needs beyond its arrays: XLA's workspace, cuBLAS/cuDNN/Triton
# autotuning scratch (allocated after the cache, when a new batch compiles) and allocator
# fragmentation. With 2 GiB alone, 1b llama under a 24 GB cap ran out of memory in the prefill at
# the predicted batch (H100).
RESERVE_BYTES, RESERVE_FRACTION = 2 << 30, 0.05


def reserve_bytes(memory_bytes: int) -> int:
  """Bytes of `memory_bytes` kept free of weights, caches and activations."""
  return RESERVE_BYTES + int(RESERVE_FRACTION * memory_bytes)


def prefill_bytes_per_token(config: ModelConfig, slots: int = 0, backend: str | None = None
                            ) -> int:
  """Live activations of one prefill token, an estimate: 16 widths of the residual stream and 6
  of the MLP in the compute dtype (2 bytes), plus, with `slots`, what a chunk after the first
  holds to attend to that many cache slots: where it runs the dense reference (a CPU, float32,
  `attention_impl="dense"` or `"splash"`), its row of scores and probabilities (float32, every
  query head); under cuDNN's fused kernel (a GPU in 16-bit), the mask's bias row (2 bytes a
  slot). The first chunk, into an empty cache, runs the fused kernel and holds neither."""
  from lckv_jax.kernels import dispatch  # the kernel a later chunk gets (dispatch.choose)
  fused = dispatch.resolve_attention_impl(config.attention_impl, config.dtype, backend) == "cudnn"
  scores = (2 if fused else 2 * 4 * config.num_heads) * slots
  return 2 * (16 * config.hidden_size + 6 * config.intermediate_size) + scores


def sink_cache_bytes(config: ModelConfig, batch: int, n_sink: int, window: int, dtype=None) -> int:
  """Bytes of the K and V buffers (and scales) of `KVCache.create_sink`, whatever the generated
  length."""
  return batch * (n_sink + window) * config.kv_cache_bytes_per_token(dtype)


# ---------------------------------------------------------------------------------------------
# Slots of one buffer.
# ---------------------------------------------------------------------------------------------


def _quantize(x_BxTxKxD, dtype) -> tuple[jax.Array, jax.Array]:
  """x quantized for a buffer: (values [batch, T, kv_heads, head_dim], scales [batch, kv_heads,
  T], slots last as stored)."""
  q, scale_BxTxK = quant.quantize(x_BxTxKxD, dtype)
  return q, jnp.swapaxes(scale_BxTxK, 1, 2)


def write(entry: KV, k_BxTxKxD, v_BxTxKxD, positions_BxT, segment_ids_BxT,
          write_index_B) -> KV:
  """`entry` with a chunk's KV at slots `write_index .. write_index + T - 1` of each row.

  Slots wrap modulo the buffer length, so a short buffer is a ring; for a full-length buffer the
  modulo changes nothing.
  """
  slots, t = entry.k.shape[1], k_BxTxKxD.shape[1]
  if t > slots:
    raise ValueError(f"a chunk of {t} tokens does not fit a cache buffer of {slots} slots")
  if t == 1:  # a slice update, which XLA does in place
    index = write_index_B % slots
    row_put = lambda buf, new, i, axis: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis)
  else:
    index = (write_index_B[:, None] + jnp.arange(t)) % slots
    row_put = lambda buf, new, i, axis: buf.at[(slice(None),) * axis + (i,)].set(new)

  def put(buf, new, axis):  # new: [batch, T] along buf's slot axis
    return jax.vmap(lambda b, n, i: row_put(b, n, i, axis - 1))(buf, new, index)

  if entry.quantized:  # a quantized buffer: the chunk's values and their scales
    (k, k_scale), (v, v_scale) = (_quantize(x, entry.k.dtype) for x in (k_BxTxKxD, v_BxTxKxD))
    new = KV(k, v, positions_BxT, segment_ids_BxT, k_scale, v_scale)
  else:
    new = KV(k_BxTxKxD.astype(entry.k.dtype), v_BxTxKxD.astype(entry.v.dtype), positions_BxT,
             segment_ids_BxT)
  return KV(*(None if b is None else put(b, n, SLOT_AXIS[f])
              for f, b, n in zip(KV._fields, entry, new)))


def _rering(entry: KV, end_B: jax.Array, slots: int) -> KV:
  """A buffer of `slots` slots holding slot x at `x % slots`, for the last min(S, slots) slots.

  `entry` (S slots) holds slot x at `x % S` for x in [end - S, end - 1] (slots >= end are not
  written yet); `end_B` [batch] is the first unwritten slot of each row.
  """
  old = entry.k.shape[1]
  keep = min(old, slots)
  end = end_B[:, None]
  x = end - slots + (jnp.arange(slots)[None, :] - end) % slots  # in [end - slots, end - 1]
  valid = (x >= 0) & (x >= end - keep)
  return _take(entry, x % old, valid)


def _take(entry: KV, src_BxS: jax.Array, valid_BxS: jax.Array) -> KV:
  """Slot s of each row taken from slot `src[s]`, or empty where not `valid[s]`."""
  def moved(x, axis):  # any per-slot array: k, v, pos, seg, the scales
    taken = jax.vmap(lambda buf, idx: jnp.take(buf, idx, axis=axis - 1, mode="clip"))(x, src_BxS)
    mask = jnp.expand_dims(valid_BxS, [d for d in range(1, x.ndim) if d != axis])
    return jnp.where(mask, taken, jnp.zeros((), x.dtype))

  return entry.map_slots(moved)


def rerotate(config: ModelConfig, k_BxSxKxD: jax.Array, shift: int) -> jax.Array:
  """Keys rotated at position p, re-rotated to position p + shift (RoPE angles add up)."""
  b, s = k_BxSxKxD.shape[:2]
  cos_sin = rope_tables(rope_inv_freq(config), jnp.full((b, s), shift, jnp.int32))
  return apply_rope(k_BxSxKxD, cos_sin)


# ---------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """The buffers of the KV-computing layers and how they are laid out (see the module doc).

  layers: KV-computing layer j -> its buffer (k, v [batch, slots, kv_heads, head_dim]; pos, seg
    [batch, slots]). The only arrays; the other fields are static (part of the tree structure).
  rings: the layers whose buffer is a ring of `window` slots.
  window: the sliding window of the model (rings keep that many slots between chunks).
  n_sink: the attention-sink layout's sink slots; None for the full and ring layouts.
  contiguous: each row holds one sequence in contiguous slots (the caller's promise).
  """
  layers: dict[int, KV]
  rings: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  n_sink: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  contiguous: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @classmethod
  def create(cls, config: ModelConfig, batch: int, max_len: int, dtype=None, *,
             ring: bool = True, contiguous: bool = False) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    With `ring` (default), KV layers read only by sliding-window layers get a ring buffer of
    `sliding_window` slots instead of `max_len`.
    """
    if batch < 1 or max_len < 1:
      raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
    dtype = quant.cache_dtype(dtype, config.compute_dtype)
    slots = buffer_slots(config, max_len, ring)
    rings = tuple(j for j in ring_layers(config) if ring and slots[j] < max_len)
    return cls({j: _empty(config, batch, n, dtype) for j, n in slots.items()}, rings,
               config.sliding_window, None, contiguous)

  @classmethod
  def create_sink(cls, config: ModelConfig, batch: int, n_sink: int, window: int, dtype=None
                  ) -> KVCache:
    """An empty attention-sink cache: `n_sink + window` slots for every KV layer, one sequence
    per row (left-aligned).

    Every eviction re-rotates the kept keys and stores them again, rounded to the cache's dtype,
    so a key is re-encoded up to `window - 1` times and the rounding errors add up (in bf16
    too). fp8's 3 mantissa bits do not survive that (a warning says so; measurements in
    benchmarks/results/kv_quant_cpu.md); int8 stays close to bf16.
    """
    if n_sink < 0 or window < 1:
      raise ValueError(f"sink cache needs n_sink >= 0 and window >= 1, got {n_sink} and {window}")
    full = cls.create(config, batch, n_sink + window, dtype, ring=False, contiguous=True)
    if full.dtype == jnp.float8_e4m3fn and window > 1:
      logging.warning(
          "a sink cache in fp8 (float8_e4m3fn) re-encodes every kept key at each eviction and "
          "loses precision with each (see benchmarks/results/kv_quant_cpu.md); int8 or bf16 "
          "keep the model's quality")
    return dataclasses.replace(full, n_sink=n_sink)

  # -- what it holds -------------------------------------------------------------------------

  def __getitem__(self, layer: int) -> KV:
    return self.layers[layer]

  @property
  def kv_layers(self) -> tuple[int, ...]:
    return tuple(sorted(self.layers))

  @property
  def batch(self) -> int:
    return next(iter(self.layers.values())).k.shape[0]

  @property
  def dtype(self) -> jnp.dtype:
    """The storage dtype of K and V (int8 or float8_e4m3fn for a quantized cache)."""
    return next(iter(self.layers.values())).k.dtype

  @property
  def quantized(self) -> bool:
    return next(iter(self.layers.values())).quantized

  def slots(self, layer: int) -> int:
    return self.layers[layer].k.shape[1]

  def nbytes(self, metadata: bool = False) -> int:
    """Bytes its arrays occupy (K and V and their scales, plus positions and segments with
    `metadata`)."""
    return sum(x.nbytes for e in self.layers.values()
               for x in jax.tree.leaves(e if metadata else e._replace(pos=None, seg=None)))

  def replace(self, **changes) -> KVCache:
    return dataclasses.replace(self, **changes)

  def with_layers(self, layers: dict[int, KV]) -> KVCache:
    """The same layout holding `layers` (a forward pass's new buffers)."""
    if set(layers) != set(self.layers):
      raise ValueError(f"a cache of layers {self.kv_layers} cannot take layers {sorted(layers)}")
    return dataclasses.replace(self, layers=dict(layers))

  # -- rings around a chunk ------------------------------------------------------------------

  def widen(self, write_index_B: jax.Array, chunk: int, *, empty: bool = False) -> KVCache:
    """Rings widened so that a chunk of `chunk` tokens at `write_index` sees its windows.

    `empty`: the cache holds nothing yet and the chunk starts at slot 0; a ring then needs room
    for the chunk alone (none when it fits), not for `window - 1` earlier keys as well.
    `compact(end, like=self)` turns the result back after the chunk.
    """
    need = chunk if empty else (self.window or 0) + chunk - 1
    layers = dict(self.layers)
    for j in self.rings:
      if layers[j].k.shape[1] < need:
        layers[j] = _rering(layers[j], write_index_B, need)
    return dataclasses.replace(self, layers=layers)

  def compact(self, end_B: jax.Array, like: KVCache) -> KVCache:
    """Buffers widened by `widen` turned back to the slot counts of `like`; `end_B` [batch] is
    the first unwritten slot of each row."""
    layers = {j: e if e.k.shape[1] == like.slots(j) else _rering(e, end_B, like.slots(j))
              for j, e in self.layers.items()}
    return dataclasses.replace(self, layers=layers)

  # -- the sink layout -----------------------------------------------------------------------

  def evict_sink(self, config: ModelConfig, length_B: jax.Array) -> tuple[KVCache, jax.Array]:
    """Makes room for one token in full rows: drop the oldest non-sink token, shift, re-rotate.

    Rows are left-aligned (slot s = cache position s). Returns the cache and the new lengths, so
    the next token is written at slot `length` with position `length`.
    """
    n_sink = self.n_sink
    if n_sink is None:
      raise ValueError("evict_sink needs a sink cache (KVCache.create_sink)")
    cap = next(iter(self.layers.values())).k.shape[1]
    if n_sink >= cap:
      raise ValueError(f"sink cache: n_sink ({n_sink}) must be smaller than its {cap} slots")
    full = length_B >= cap

    def shift(x, axis):
      part = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
      return jnp.concatenate([part(0, n_sink), part(n_sink + 1, None),
                              jnp.zeros_like(part(0, 1))], axis=axis)

    layers = {}
    for j, e in self.layers.items():
      shifted = e.map_slots(shift)
      k, k_scale = shifted.k[:, n_sink:], None
      if e.quantized:  # rotate the values, then quantize them again (new scales)
        k = shifted.dequantized(jnp.float32).k[:, n_sink:]
        k, k_scale = _quantize(rerotate(config, k, -1), e.k.dtype)
        k_scale = jnp.concatenate([shifted.k_scale[:, :, :n_sink], k_scale], axis=2)
      else:
        k = rerotate(config, k, -1)
      k = jnp.concatenate([shifted.k[:, :n_sink], k], axis=1)
      pos = jnp.concatenate([shifted.pos[:, :n_sink], jnp.maximum(shifted.pos[:, n_sink:] - 1, 0)],
                            axis=1)
      shifted = shifted._replace(k=k, pos=pos, k_scale=k_scale)
      layers[j] = jax.tree.map(
          lambda a, b: jnp.where(full.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), shifted, e)
    return dataclasses.replace(self, layers=layers), jnp.where(full, cap - 1, length_B)

  # -- rows ----------------------------------------------------------------------------------

  def left_align(self, pad_B: jax.Array) -> KVCache:
    """Each row's content moved `pad` slots to the left (slot s <- s + pad), the tail emptied."""
    layers = {}
    for j, e in self.layers.items():
      src = jnp.arange(e.k.shape[1])[None, :] + pad_B[:, None]
      layers[j] = _take(e, jnp.minimum(src, e.k.shape[1] - 1), src < e.k.shape[1])
    return dataclasses.replace(self, layers=layers)

  def _check_same_layout(self, other: KVCache, what: str, same_slots: bool = False) -> None:
    for j, e in self.layers.items():
      if same_slots and j in other.layers and other.slots(j) != e.k.shape[1]:
        raise ValueError(f"{what}: the caches differ at layer {j}: {e.k.shape[1]} slots vs "
                         f"{other.slots(j)}")
      if j not in other.layers or other[j].k.shape[2:] != e.k.shape[2:]:
        raise ValueError(f"{what}: the caches differ at layer {j}: heads "
                         f"{e.k.shape[2:]} vs {other.layers.get(j, e).k.shape[2:]}")
      if other[j].quantized != e.quantized or (e.quantized and other[j].k.dtype != e.k.dtype):
        raise ValueError(f"{what}: the caches differ at layer {j}: dtype {e.k.dtype} vs "
                         f"{other[j].k.dtype}")

  def insert_row(self, row: int | jax.Array, other: KVCache, other_row: int = 0) -> KVCache:
    """Batch row `row` replaced by row `other_row` of `other` (same layout and slots):
    `insert_rows` with the other rows of `other` skipped."""
    rows = jnp.full((other.batch,), self.batch, jnp.int32).at[other_row].set(row)
    return self.insert_rows(rows, other)

  def insert_rows(self, rows, other: KVCache) -> KVCache:
    """Batch rows `rows[i]` replaced by row i of `other` (same layout and slots); a row index
    outside the batch (e.g. the batch size) skips that row of `other`. `rows`: [other's batch]."""
    self._check_same_layout(other, "insert_rows", same_slots=True)
    return self.with_layers({j: jax.tree.map(lambda a, b: a.at[rows].set(b, mode="drop"), e,
                                             other[j]) for j, e in self.layers.items()})

  def put_rows(self, rows: KVCache, start) -> KVCache:
    """The first slots of rows `start..` replaced by `rows` (a cache of fewer rows and no more
    slots per buffer); in place when the cache is donated."""
    self._check_same_layout(rows, "put_rows")
    return self.with_layers(jax.tree.map(
        lambda a, r: jax.lax.dynamic_update_slice(a, r.astype(a.dtype),
                                                  (start,) + (0,) * (a.ndim - 1)),
        self.layers, rows.layers))
