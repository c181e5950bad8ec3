"""The storage dtypes of the KV cache, and the quantized ones' encoding (int8, fp8 e4m3).

A cache stores K and V in a float dtype (`float32`, `bfloat16`, `float16`: the values as they
are, cast), or quantized: `int8` or `float8_e4m3fn` (alias `fp8`) with one float32 scale per
token and KV head. The quantization is symmetric absmax over the head dimension:

    scale = max |x| / QMAX        (QMAX: 127 for int8, 448 = e4m3's largest finite value)
    q     = round(x / scale) clipped to [-127, 127]   (int8)
          = (x / scale).astype(float8_e4m3fn)          (fp8: round to nearest e4m3)
    x'    = q * scale

so an int8 element is off by at most scale / 2 and an fp8 one by e4m3's half-ulp (relative
2^-4, or scale * 2^-10 near zero). A zero vector gets scale 0 and q = 0, read back as zeros.

Scales are float32. bfloat16 scales would save 2 bytes per token and head (1.5% of an int8 cache
at head_dim 128, 3% at 64) and were tried (commit 9a513cf; its quality A/B in 2069b45's
`kv_quant_cpu.md`): rounded to nearest, with q computed from the stored scale, they keep both
bounds (a scale rounded down by its most, 2^-8, clips the largest element by at most 0.496 of a
step) and matched float32 scales' quality on the trained tiny model; rounded up they did worse in
a sink cache (a fifth more error, its keys being encoded again at each eviction). But the Triton
decode kernel read them 9-11% slower on the H200 (1b lckv's shape, 2,048 and 4,096 rows: 514
against 460 us, 946 against 864), and at 1b lckv's max batch 4,658 rows gave 112,077 tokens/s
against the float32 record's 4,541 rows and 116,010 (49c1380): 2.6% more rows, 3.4% fewer
tokens/s. (Both max-batch runs are past 2^31 elements of int8 cache, which that kernel read with
wrapped 32-bit offsets, fixed in 3c9d98e: `kernels.decode.needs_packing`. The kernel A/B, at
2,048 and 4,096 rows, is not.) The decode kernel multiplies in float32 either way.

Who does what: `cache.write` quantizes every chunk it stores (`quantize`); the attention
dispatch reads the cache through `dequantize` for every kernel but the decode kernel
(`kernels/decode.py`), which reads the quantized K and V and their scales directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZED_DTYPES = ("int8", "float8_e4m3fn")
CACHE_DTYPES = FLOAT_DTYPES + QUANTIZED_DTYPES  # what a cache may store
ALIASES = {"fp8": "float8_e4m3fn"}
SCALE_DTYPE = jnp.float32  # one scale per (row, slot, KV head): see the module doc
_QMAX = {"int8": 127.0, "float8_e4m3fn": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448


def cache_dtype(dtype, default=jnp.float32) -> jnp.dtype:
  """The cache storage dtype that `dtype` names (a string, an alias such as 'fp8', a jnp dtype;
  None: `default`), or a ValueError naming the allowed values."""
  if dtype is None:
    dtype = default
  name = ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
  try:
    resolved = jnp.dtype(name)
  except TypeError:
    resolved = None
  if resolved is None or resolved.name not in CACHE_DTYPES:
    allowed = ", ".join(CACHE_DTYPES + tuple(ALIASES))
    raise ValueError(f"cache_dtype must be one of {allowed}, got {dtype!r}")
  return resolved


def is_quantized(dtype) -> bool:
  """Whether a cache of `dtype` stores quantized values with scales."""
  return jnp.dtype(dtype).name in QUANTIZED_DTYPES


def itemsizes(dtype) -> tuple[int, int]:
  """Bytes per cached K/V element and per scale (0 when `dtype` is not quantized)."""
  dtype = jnp.dtype(dtype)
  return dtype.itemsize, (jnp.dtype(SCALE_DTYPE).itemsize if is_quantized(dtype) else 0)


def quantize(x_BxTxKxD: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """x quantized to `dtype` over its last axis: (q [..., D] of `dtype`, scale [...] float32)."""
  dtype = jnp.dtype(dtype)
  qmax = _QMAX[dtype.name]
  x = x_BxTxKxD.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / qmax
  y = jnp.clip(x / jnp.where(scale > 0, scale, 1.0)[..., None], -qmax, qmax)
  q = jnp.round(y).astype(dtype) if dtype.name == "int8" else y.astype(dtype)
  return q, scale.astype(SCALE_DTYPE)


def dequantize(q_BxTxKxD: jax.Array, scale_BxTxK: jax.Array, dtype) -> jax.Array:
  """q * scale in float32, cast to `dtype`."""
  return (q_BxTxKxD.astype(jnp.float32) * scale_BxTxK.astype(jnp.float32)[..., None]).astype(dtype)
