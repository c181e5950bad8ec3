"""The roofline of a decode step: bytes moved, FLOPs done, and the time the hardware allows.

A decode step feeds one new token per row for `batch` rows; `context` counts the tokens of each
row's cache including the new one. The counts are the ideal ones: every parameter and every
*visible* cached key/value is read once from HBM. (The GPU decode kernel,
`lckv_jax.kernels.decode`, reads only the valid slots; the XLA path reads every slot of a
buffer, so there a step may read more.)

The physics point (docs/spec.md §8): each layer attends to some layer's KV, so llama and LCKV read
(almost) the same KV bytes per step at equal batch; LCKV's saving is cache *capacity* (fewer
buffers), which buys a larger batch, not fewer bytes per token at a fixed batch.

Two measurements give the two roofs on the current default device: `measure_hbm_bandwidth`
(bytes/s) and `measure_matmul_rate` (FLOP/s).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp

from lckv_jax import layer_types as lt_lib
from lckv_jax import quant
from lckv_jax.config import ModelConfig
from lckv_jax.flops import attention_flops, layer_matmul_params

# ---------------------------------------------------------------------------------------------
# Counting.
# ---------------------------------------------------------------------------------------------


def visible_keys(config: ModelConfig, layer: int, context: int) -> int:
  """Keys that the newest token of layer `layer` attends to, with `context` tokens cached.

  As `kernels.reference.make_mask`: a window W covers the query and the W-1 keys before it, and a
  masked diagonal drops the query's own key from what is left, so a diag-masked sliding layer
  sees W-1.
  """
  lt = config.layer_spec
  keys = min(context, config.sliding_window) if lt.sliding[layer] else context
  return max(keys - int(lt.diag_masked[layer]), 0)


def param_count(config: ModelConfig) -> int:
  """Parameters of `model.Transformer(config)`: layers (matmuls + 2 norm scales), embed, head."""
  e, v = config.hidden_size, config.vocab_size
  layers = sum(layer_matmul_params(config, i) + 2 * e for i in range(config.num_layers))
  head = 0 if config.tie_word_embeddings else e * v
  return layers + v * e + e + head  # + embed + final norm + LM head


def decode_step_bytes(config: ModelConfig, batch: int, context: int, *,
                      param_bytes: int | None = None, cache_itemsize: int | None = None,
                      cache_dtype=None) -> dict[str, int]:
  """HBM bytes of one decode step: {'weights', 'kv_read', 'kv_write', 'total'}.

  Args:
    batch: rows, one new token each.
    context: tokens in each row's cache, including the new one.
    param_bytes: bytes per parameter; default the itemsize of `config.param_dtype`.
    cache_itemsize: bytes per cached K/V element; default that of `cache_dtype`.
    cache_dtype: the cache's storage (`lckv_jax.quant`; default `config.dtype`); a quantized
      cache's scales are read and written with its keys and values.
  """
  lt = config.layer_spec
  if param_bytes is None:
    param_bytes = jnp.dtype(config.weights_dtype).itemsize
  itemsize, scale_bytes = quant.itemsizes(quant.cache_dtype(cache_dtype, config.compute_dtype))
  if cache_itemsize is None:
    cache_itemsize = itemsize
  e, v = config.hidden_size, config.vocab_size
  # The embedding gather touches one row per token (at most the V distinct rows); a tied table is
  # also the LM head, which reads all of it.
  embed_read = v * e if config.tie_word_embeddings else min(batch, v) * e
  weights = (param_count(config) - v * e + embed_read) * param_bytes
  per_key = batch * lt_lib.kv_bytes_per_key(config.num_kv_heads, config.resolved_head_dim,
                                            cache_itemsize, scale_bytes)
  # Every layer reads the KV it attends to, even when several layers share one buffer: each layer
  # is its own attention kernel, so the shared buffer streams from HBM once per reader.
  kv_read = per_key * sum(visible_keys(config, i, context) for i in range(config.num_layers))
  kv_write = per_key * len(lt.kv_layers)  # one new key and value per KV-computing layer
  return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write,
          "total": weights + kv_read + kv_write}


def decode_step_flops(config: ModelConfig, batch: int, context: int) -> dict[str, int]:
  """FLOPs of one decode step: {'matmul', 'attention', 'total'}.

  matmul: 2 per multiply-add of q/k/v/o (k/v on KV layers only), MLP and LM head weights; norms
  and the embedding gather are not matmuls. attention: scores and values over the visible keys.
  """
  weights = sum(layer_matmul_params(config, i) for i in range(config.num_layers))
  matmul = 2 * batch * (weights + config.hidden_size * config.vocab_size)
  attention = batch * attention_flops(
      config, sum(visible_keys(config, i, context) for i in range(config.num_layers)))
  return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def _causal_pairs(config: ModelConfig, layer: int, length: int) -> int:
  """Visible (query, key) pairs of a causal chunk of `length` tokens at layer `layer`.

  T(T+1)/2 causal, T(T-1)/2 with the diagonal masked, fewer under a sliding window.
  """
  return sum(visible_keys(config, layer, t) for t in range(1, length + 1))


def prefill_flops(config: ModelConfig, batch: int, prompt_len: int, iterations: int) -> int:
  """FLOPs of encoding `batch` prompts of `prompt_len` tokens through the iteration plan.

  Layers of a cyclic group run `iterations` times (docs/spec.md §4, `Transformer.step`), the others
  once; the LM head runs once, for the last token only (the one whose logits are sampled).
  """
  total = 0
  for seg in config.layer_spec.plan():
    runs = iterations if seg.cyclic else 1
    for i in seg.layers:
      matmul = 2 * batch * prompt_len * layer_matmul_params(config, i)
      attention = batch * attention_flops(config, _causal_pairs(config, i, prompt_len))
      total += runs * (matmul + attention)
  return total + 2 * batch * config.hidden_size * config.vocab_size


# ---------------------------------------------------------------------------------------------
# The roofline.
# ---------------------------------------------------------------------------------------------


def roofline_seconds(bytes_total: float, flops_total: float, hbm_bytes_per_s: float,
                     flops_per_s: float) -> float:
  """Lower bound on the time (s): the slower of moving the bytes and doing the FLOPs."""
  return max(bytes_total / hbm_bytes_per_s, flops_total / flops_per_s)


def decode_roofline_steps(config: ModelConfig, batch: int, prompt: int, gen: int,
                          hbm_bytes_per_s: float, flops_per_s: float, cache_dtype=None
                          ) -> list[float]:
  """Roofline seconds of each of the gen-1 decode steps after a prompt of `prompt` tokens (the
  first generated token comes from the prefill); step i runs with context prompt + 2 + i.
  `cache_dtype`: the cache's storage (default `config.dtype`)."""
  return [roofline_seconds(decode_step_bytes(config, batch, c, cache_dtype=cache_dtype)["total"],
                           decode_step_flops(config, batch, c)["total"], hbm_bytes_per_s,
                           flops_per_s)
          for c in range(prompt + 2, prompt + gen + 1)]


def roofline_bound(bytes_total: float, flops_total: float, hbm_bytes_per_s: float,
                   flops_per_s: float) -> str:
  """'bytes' if memory traffic sets `roofline_seconds` (ties included), else 'flops'."""
  memory = bytes_total / hbm_bytes_per_s
  return "bytes" if memory >= flops_total / flops_per_s else "flops"


# ---------------------------------------------------------------------------------------------
# Measurements on the default device.
# ---------------------------------------------------------------------------------------------


def _best_seconds(fn, repeats: int, calls: int = 1) -> float:
  """The fastest per-call time of `repeats` timings, each of `calls` back-to-back calls of
  `fn()` (which returns its result without waiting for it), after one untimed call.

  A ceiling is the best the device does: a slower timing is the device still clocking up or
  busy with something else (the H200 read 1.35 TB/s for a copy first in a process, 3.05 in a
  process started after minutes of work, with the median). Calls in a row are queued while the
  device runs the earlier ones, so dispatch and the wait for the result are paid once per timing,
  not once per call: on a 1 ms copy they are a few percent of it.
  """
  jax.block_until_ready(fn())  # compiles and warms caches
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / calls)
    del out
  return best


def warm_up_device(seconds: float = 2.0, n: int = 4096) -> int:
  """Keeps the device busy with matmuls for `seconds`, so that the measurements after it run at
  the clocks a loaded GPU holds, not an idle one's; returns the products run."""
  x = jnp.ones((n, n), jnp.bfloat16)
  w = jnp.full((n, n), 1.0 / n, jnp.bfloat16)
  runs, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    jax.block_until_ready(_chained_matmul(x, w))
    runs += 1
  return runs


_PASSES = 10  # elementwise passes per call: dispatch and allocation are paid once for 10


@functools.partial(jax.jit, donate_argnums=(0,))
def _axpb(x, a, b):
  # a, b are arguments, not constants, so XLA cannot fold a pass away; the loop keeps the passes
  # apart (XLA would fuse a chain of elementwise ops into one read + write).
  return jax.lax.fori_loop(0, _PASSES, lambda _, x: x * a + b, x)


def measure_hbm_bandwidth(nbytes: int = 2**31, dtype=jnp.bfloat16, repeats: int = 5) -> float:
  """Memory bandwidth (bytes/s) of an elementwise pass y = x * a + b over `nbytes` of `dtype`.

  Counts 2 * nbytes per pass (x read, y written); `_PASSES` passes per timed call, the fastest
  of `repeats` calls. The buffer is donated and updated in place, so one array is ever alive.
  """
  n = nbytes // jnp.dtype(dtype).itemsize
  state = [jax.random.normal(jax.random.key(0), (n,), dtype)]
  a, b = jnp.asarray(0.5, dtype), jnp.asarray(0.25, dtype)

  def once():
    state[0] = _axpb(state[0], a, b)
    return state[0]

  seconds = _best_seconds(once, repeats)
  jax.block_until_ready(state[0]).delete()
  return _PASSES * 2 * n * jnp.dtype(dtype).itemsize / seconds


def measure_copy_bandwidth(nbytes: int = 2**31, dtype=jnp.bfloat16, repeats: int = 5,
                           calls: int = 8) -> float:
  """Bytes/s of a device-to-device copy of `nbytes` (read + write counted, as memcpy
  benchmarks do), timed over `calls` copies in a row."""
  n = nbytes // jnp.dtype(dtype).itemsize
  x = jax.random.normal(jax.random.key(0), (n,), dtype)
  copy = jax.jit(lambda x: x.copy())  # noqa: E731 - XLA's copy: no arithmetic, a new buffer

  seconds = _best_seconds(lambda: copy(x), repeats, calls)
  x.delete()
  return 2 * n * jnp.dtype(dtype).itemsize / seconds


@jax.jit
def _read_sum(x_RxC):
  return jnp.sum(x_RxC, axis=1, dtype=jnp.float32)  # reads everything, writes R floats


def measure_read_bandwidth(nbytes: int = 2**31, dtype=jnp.bfloat16, repeats: int = 5,
                           calls: int = 8, cols: int = 4096) -> float:
  """Bytes/s of a read-only pass: a row sum over `nbytes` in rows of `cols` elements (the
  writes, one float a row, are negligible), timed over `calls` passes in a row. A decode step is
  mostly this: weights and cache read once. Rows of 4,096 read 4.30 TB/s on the H200, rows of
  65,536 3.98 (`benchmarks/results/hbm_ceilings_h200.json`)."""
  n = nbytes // jnp.dtype(dtype).itemsize
  x = jax.random.normal(jax.random.key(0), (max(1, n // cols), cols), dtype)

  seconds = _best_seconds(lambda: _read_sum(x), repeats, calls)
  nbytes = x.nbytes
  x.delete()
  return nbytes / seconds


def measure_decode_kernel_bandwidth(nbytes: int = 2**31, repeats: int = 5, calls: int = 8,
                                    interpret: bool = False) -> float:
  """Bytes/s of the decode kernel's own streaming read (`kernels.decode.prefix_attention`): one
  query per row over every slot of a bf16 cache of about `nbytes` (keys and values), 1b's
  heads (32 query, 8 KV heads of 128), 4096 slots; bytes = the cache's K and V."""
  from lckv_jax.kernels import decode
  heads, kv_heads, dim, slots = 32, 8, 128, 4096
  batch = max(1, nbytes // (2 * slots * kv_heads * dim * 2))
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (batch, heads, dim), jnp.bfloat16)
  k = jax.random.normal(kk, (batch, slots, kv_heads, dim), jnp.bfloat16)
  v = jax.random.normal(kv, (batch, slots, kv_heads, dim), jnp.bfloat16)
  start, end = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), slots, jnp.int32)
  attend = jax.jit(functools.partial(decode.prefix_attention, interpret=interpret))

  seconds = _best_seconds(lambda: attend(q, k, v, start, end), repeats, calls)
  read = k.nbytes + v.nbytes
  for x in (q, k, v):
    x.delete()
  return read / seconds


# Vendors' datasheet figures (dense bf16, HBM), by `device_kind`: what the measured ceilings are
# also given against. H100 SXM: 3.35 TB/s, 989 TFLOP/s; H200: 4.8 TB/s, same tensor cores.
DATASHEET = {
    "NVIDIA H100 80GB HBM3": dict(hbm_bytes_per_s=3.35e12, matmul_flops_per_s=989e12),
    "NVIDIA H200": dict(hbm_bytes_per_s=4.8e12, matmul_flops_per_s=989e12),
}


def ceilings(small: bool = False,
             extra_hbm: dict[str, float | Callable[[], float]] | None = None) -> dict:
  """The best this device does, measured now: HBM bandwidth as the maximum of a copy, a
  read-only reduction, the old elementwise pass and any `extra_hbm` reading (e.g. the decode
  kernel's own streaming read; a callable is measured here, after the warm-up), and the bf16
  matmul rate. A roofline below any of these is not a ceiling. With the device's datasheet
  figures where known, and the measured fraction of them. `small`: tiny sizes (a CPU, a smoke
  run), no warm-up."""
  size = {"nbytes": 2**20, "repeats": 2} if small else {}
  if not small:
    warm_up_device()
  extra = {k: v() if callable(v) else v for k, v in (extra_hbm or {}).items()}
  hbm = dict(copy=measure_copy_bandwidth(**size), read=measure_read_bandwidth(**size),
             elementwise=measure_hbm_bandwidth(**size), **extra)
  source = max(hbm, key=hbm.get)
  out = dict(hbm_bytes_per_s=hbm[source], hbm_ceiling_source=source,
             hbm_measured_bytes_per_s={k: round(v) for k, v in hbm.items()},
             matmul_flops_per_s=measure_matmul_rate(**({"n": 128, "repeats": 2} if small
                                                       else {})))
  sheet = DATASHEET.get(jax.devices()[0].device_kind)
  if sheet:
    out.update(datasheet=sheet,
               hbm_vs_datasheet=round(out["hbm_bytes_per_s"] / sheet["hbm_bytes_per_s"], 3),
               matmul_vs_datasheet=round(out["matmul_flops_per_s"]
                                         / sheet["matmul_flops_per_s"], 3))
  return out


_CHAIN = 4  # products per call: the launch overhead is paid once for 4 n^3 multiply-adds


@jax.jit
def _chained_matmul(x, w):
  for _ in range(_CHAIN):
    x = x @ w  # each product depends on the last, so none can be skipped or overlapped away
  return x


def measure_matmul_rate(n: int = 8192, dtype=jnp.bfloat16, repeats: int = 5) -> float:
  """Matmul throughput (FLOP/s): `_CHAIN` dependent n x n x n products, 2 n^3 FLOPs each."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, n), dtype)
  # Entries of variance 1/n keep the rows' scale through the chain (no overflow in bf16).
  w = (jax.random.normal(kw, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

  seconds = _best_seconds(lambda: _chained_matmul(x, w), repeats)
  x.delete()
  w.delete()
  return _CHAIN * 2 * n**3 / seconds
