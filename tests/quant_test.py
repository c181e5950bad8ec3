"""The cache storage dtypes and the int8 / fp8 encoding (lckv_jax.quant): names, errors, round-trip
bounds, zero vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax import quant


def test_cache_dtype_names_and_errors():
  assert quant.cache_dtype("int8") == jnp.int8
  assert quant.cache_dtype("fp8") == quant.cache_dtype("float8_e4m3fn") == jnp.float8_e4m3fn
  assert quant.cache_dtype(jnp.int8) == jnp.int8 and quant.cache_dtype(jnp.bfloat16) == jnp.bfloat16
  assert quant.cache_dtype(None, jnp.bfloat16) == jnp.bfloat16
  assert quant.is_quantized("int8") and quant.is_quantized(jnp.float8_e4m3fn)
  assert not quant.is_quantized(jnp.bfloat16)
  assert quant.itemsizes(jnp.int8) == (1, 4) and quant.itemsizes(jnp.bfloat16) == (2, 0)
  for bad in ("int4", "float8_e5m2", jnp.int32, "nonsense"):
    with pytest.raises(ValueError, match=r"cache_dtype must be one of float32, bfloat16, float16, "
                                         r"int8, float8_e4m3fn, fp8, got"):
      quant.cache_dtype(bad)


def _vectors(dtype):
  """[2, 5, 3, 16] vectors whose scales span 1e-3..1e3, in `dtype`."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16), jnp.float32)
  x = x * jnp.logspace(-3, 3, 5)[None, :, None, None]
  return x.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_round_trip_is_within_half_a_step(dtype):
  x = _vectors(dtype)
  q, scale = quant.quantize(x, jnp.int8)
  assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:3]
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(scale, jnp.abs(x32).max(-1) / 127, rtol=1e-6)
  assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127  # the absmax maps to +-127
  err = jnp.abs(quant.dequantize(q, scale, jnp.float32) - x32)
  assert bool((err <= scale[..., None] * (0.5 + 1e-5)).all())
  assert quant.dequantize(q, scale, dtype).dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_round_trip_is_within_e4m3_precision(dtype):
  x = _vectors(dtype)
  q, scale = quant.quantize(x, jnp.float8_e4m3fn)
  assert q.dtype == jnp.float8_e4m3fn and scale.shape == x.shape[:3]
  x32 = x.astype(jnp.float32)
  np.testing.assert_allclose(scale, jnp.abs(x32).max(-1) / 448, rtol=1e-6)
  y = quant.dequantize(q, scale, jnp.float32)
  assert bool(jnp.isfinite(y).all())
  # e4m3: 3 mantissa bits, so half an ulp is 2^-4 of the value; subnormals (below 2^-6 of the
  # scale unit) are spaced 2^-9 apart.
  bound = jnp.maximum(jnp.abs(x32) * 2.0**-4, scale[..., None] * 2.0**-10) * (1 + 1e-5)
  assert bool((jnp.abs(y - x32) <= bound).all())
  np.testing.assert_allclose(jnp.abs(y).max(-1), jnp.abs(x32).max(-1), rtol=1e-6)  # 448 exact


@pytest.mark.parametrize("qdtype", ["int8", "fp8"])
def test_zero_vectors_read_back_as_zeros(qdtype):
  x = _vectors(jnp.float32).at[0, 1].set(0.0)
  q, scale = quant.quantize(x, quant.cache_dtype(qdtype))
  assert bool((scale[0, 1] == 0).all()) and bool((scale[1] > 0).all())
  y = quant.dequantize(q, scale, jnp.float32)
  assert bool(jnp.isfinite(y).all()) and float(jnp.abs(y[0, 1]).max()) == 0.0
