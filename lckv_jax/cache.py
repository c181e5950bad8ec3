"""The KV cache: buffers for the KV-computing layers only (docs/spec.md §5, §8).

A cache is a plain dict `{('layer', j): KV}` over the layers that compute KV, each buffer
`[batch, slots, kv_heads, head_dim]` with the position and segment of every slot (`seg == 0`
marks an empty slot, never attended). For LCKV `0_20_..._20_21` that is 3 buffers of 22 layers.

Three layouts, all read by `Transformer.step` the same way (attention masks by the stored
`pos`/`seg`, never by slot order):

- full: `max_len` slots; slot s holds the s-th token of the row (left padding included).
- ring: a KV layer read only by sliding-window layers keeps `sliding_window` slots; slot s lives
  at `s % sliding_window` (the model writes modulo the buffer length). A decode step (one token)
  writes straight into the ring; a longer chunk needs `sliding_window + chunk - 1` slots, so
  `with_room`/`compact` widen the ring around it (`generation.prefill` does this).
- sink (StreamingLLM): `n_sink + window` slots for every KV layer, left-aligned: slot s holds
  cache position s. When full, `sink_evict` drops the oldest non-sink token, shifts the rest
  down one slot and re-rotates their keys one position back (HF SinkCache); the new token then
  takes position `length` = `n_sink + window - 1`. Memory and positions stay bounded forever.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lckv_jax import layer_types as lt_lib
from lckv_jax.attention import KV, apply_rope, rope_inv_freq, rope_tables
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
  # Distinct arrays (never aliases), so the whole cache can be donated to `jit`.
  return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), jnp.int32),
            jnp.zeros((batch, slots), jnp.int32))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, *,
               ring: bool = True) -> dict:
  """An empty cache for `batch` sequences of up to `max_len` tokens.

  With `ring` (default), KV layers read only by sliding-window layers get a ring buffer of
  `sliding_window` slots instead of `max_len`.
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch} and {max_len}")
  dtype = dtype or config.compute_dtype
  return {("layer", j): _empty(config, batch, slots, dtype)
          for j, slots in buffer_slots(config, max_len, ring).items()}


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None, *, ring: bool = True,
                metadata: bool = False) -> int:
  """Bytes of the K and V buffers of `init_cache` (docs/spec.md §8), before allocating them.

  With `metadata`, the int32 position and segment of every slot are counted as well, so the
  result equals the bytes of every array of the cache.
  """
  itemsize = jnp.dtype(dtype or config.compute_dtype).itemsize
  per_slot = (lt_lib.kv_bytes_per_key(config.num_kv_heads, config.resolved_head_dim, itemsize)
              + (8 if metadata else 0))
  return batch * per_slot * sum(buffer_slots(config, max_len, ring).values())


def sink_cache_bytes(config: ModelConfig, batch: int, n_sink: int, window: int, dtype=None) -> int:
  """Bytes of the K and V buffers of `init_sink_cache`, whatever the generated length."""
  itemsize = jnp.dtype(dtype or config.compute_dtype).itemsize
  return batch * (n_sink + window) * config.layer_spec.kv_bytes_per_token(
      config.num_kv_heads, config.resolved_head_dim, itemsize)


def nbytes(cache: dict, metadata: bool = False) -> int:
  """Bytes the cache arrays occupy (K and V, plus positions and segments with `metadata`)."""
  return sum(e.k.nbytes + e.v.nbytes + ((e.pos.nbytes + e.seg.nbytes) if metadata else 0)
             for e in cache.values())


# ---------------------------------------------------------------------------------------------
# Ring buffers around a chunk.
# ---------------------------------------------------------------------------------------------


def relayout(entry: KV, end_B: jax.Array, slots: int) -> KV:
  """A buffer of `slots` slots holding slot x at `x % slots`, for the last min(S, slots) slots.

  `entry` (S slots) holds slot x at `x % S` for x in [end - S, end - 1] (slots >= end are not
  written yet); `end_B` [batch] is the first unwritten slot of each row.
  """
  old = entry.k.shape[1]
  keep = min(old, slots)
  end = end_B[:, None]
  x = end - slots + (jnp.arange(slots)[None, :] - end) % slots  # in [end - slots, end - 1]
  valid = (x >= 0) & (x >= end - keep)
  src = x % old
  take = jax.vmap(lambda buf, idx: buf[idx])
  kv_mask = valid[:, :, None, None]
  return KV(jnp.where(kv_mask, take(entry.k, src), 0).astype(entry.k.dtype),
            jnp.where(kv_mask, take(entry.v, src), 0).astype(entry.v.dtype),
            jnp.where(valid, take(entry.pos, src), 0),
            jnp.where(valid, take(entry.seg, src), 0))


def with_room(config: ModelConfig, cache: dict, write_index_B: jax.Array, chunk: int, *,
              empty: bool = False) -> dict:
  """Widens ring buffers so that a chunk of `chunk` tokens at `write_index` sees its windows.

  `empty`: the cache holds nothing yet and the chunk starts at slot 0; the ring then needs room
  for the chunk alone (none when it fits), not for `sliding_window - 1` earlier keys as well.
  Returns the cache to pass to `Transformer.step`; `compact` turns it back afterwards.
  """
  if not config.sliding_window:
    return dict(cache)
  need = chunk if empty else config.sliding_window + chunk - 1
  out = dict(cache)
  for j in ring_layers(config):
    e = cache[("layer", j)]
    if e.k.shape[1] < need:
      out[("layer", j)] = relayout(e, write_index_B, need)
  return out


def compact(cache: dict, shapes: dict, end_B: jax.Array) -> dict:
  """Shrinks buffers widened by `with_room` back to the slot counts of `shapes` (a cache)."""
  out = dict(cache)
  for key, e in cache.items():
    slots = shapes[key].k.shape[1]
    if e.k.shape[1] != slots:
      out[key] = relayout(e, end_B, slots)
  return out


# ---------------------------------------------------------------------------------------------
# StreamingLLM sink cache.
# ---------------------------------------------------------------------------------------------


def init_sink_cache(config: ModelConfig, batch: int, n_sink: int, window: int, dtype=None) -> dict:
  """An empty attention-sink cache: `n_sink + window` slots for every KV layer."""
  if n_sink < 0 or window < 1:
    raise ValueError(f"sink cache needs n_sink >= 0 and window >= 1, got {n_sink} and {window}")
  return init_cache(config, batch, n_sink + window, dtype, ring=False)


def rerotate(config: ModelConfig, k_BxSxKxD: jax.Array, shift: int) -> jax.Array:
  """Keys rotated at position p, re-rotated to position p + shift (RoPE angles add up)."""
  b, s = k_BxSxKxD.shape[:2]
  cos_sin = rope_tables(rope_inv_freq(config), jnp.full((b, s), shift, jnp.int32))
  return apply_rope(k_BxSxKxD, cos_sin)


def sink_evict(config: ModelConfig, cache: dict, length_B: jax.Array, n_sink: int
               ) -> tuple[dict, jax.Array]:
  """Makes room for one token in full rows: drop the oldest non-sink token, shift, re-rotate.

  Rows are left-aligned (slot s = cache position s). Returns the cache and the new lengths, so the
  next token is written at slot `length` with position `length`.
  """
  out = {}
  full = None
  for key, e in cache.items():
    cap = e.k.shape[1]
    full = length_B >= cap
    if n_sink >= cap:
      raise ValueError(f"sink cache: n_sink ({n_sink}) must be smaller than its {cap} slots")

    def shift(x, fill=0):
      pad = jnp.full_like(x[:, :1], fill)
      return jnp.concatenate([x[:, :n_sink], x[:, n_sink + 1:], pad], axis=1)

    k = shift(e.k)
    k = jnp.concatenate([k[:, :n_sink], rerotate(config, k[:, n_sink:], -1)], axis=1)
    pos = shift(e.pos)
    pos = jnp.concatenate([pos[:, :n_sink], jnp.maximum(pos[:, n_sink:] - 1, 0)], axis=1)
    shifted = KV(k, shift(e.v), pos, shift(e.seg))
    out[key] = jax.tree.map(
        lambda a, b: jnp.where(full.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), shifted, e)
  if full is None:
    return cache, length_B
  cap = next(iter(cache.values())).k.shape[1]
  return out, jnp.where(full, cap - 1, length_B)


def left_align(cache: dict, pad_B: jax.Array) -> dict:
  """Moves each row's content `pad` slots to the left (slot s <- s + pad), emptying the tail."""
  out = {}
  for key, e in cache.items():
    slots = e.k.shape[1]
    src = jnp.arange(slots)[None, :] + pad_B[:, None]
    valid = src < slots
    src = jnp.minimum(src, slots - 1)
    take = jax.vmap(lambda buf, idx: buf[idx])
    m = valid[:, :, None, None]
    out[key] = KV(jnp.where(m, take(e.k, src), 0).astype(e.k.dtype),
                  jnp.where(m, take(e.v, src), 0).astype(e.v.dtype),
                  jnp.where(valid, take(e.pos, src), 0), jnp.where(valid, take(e.seg, src), 0))
  return out


# ---------------------------------------------------------------------------------------------
# Rows.
# ---------------------------------------------------------------------------------------------


def insert_row(cache: dict, row: int | jax.Array, other: dict, other_row: int = 0) -> dict:
  """The cache with batch row `row` replaced by row `other_row` of `other` (same layout)."""
  for key, e in cache.items():
    if key not in other or other[key].k.shape[1:] != e.k.shape[1:]:
      raise ValueError(f"insert_row: the caches differ at {key}: slots/heads "
                       f"{e.k.shape[1:]} vs {other.get(key, e).k.shape[1:]}")
  return {key: jax.tree.map(lambda a, b: a.at[row].set(b[other_row]), e, other[key])
          for key, e in cache.items()}
