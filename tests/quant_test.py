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
  assert quant.itemsizes(jnp.int8) == (1, 2) and quant.itemsizes(jnp.bfloat16) == (2, 0)
  for bad in ("int4", "float8_e5m2", jnp.int32, "nonsense"):
    with pytest.raises(ValueError, match=r"cache_dtype must be one of float32, bfloat16, float16, "
                                         r"int8, float8_e4m3fn, fp8, got"):
      quant.cache_dtype(bad)


def _vectors(dtype):
  """[2, 5, 3, 16] vectors whose scales span 1e-3..1e3, in `dtype`."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16), jnp.float32)
  x = x * jnp.logspace(-3, 3, 5)[None, :, None, None]
  return x.astype(dtype)


def _check_scale(scale, x32, qmax):
  """Scales: absmax / qmax (in float64) rounded to the nearest bfloat16."""
  assert scale.dtype == jnp.bfloat16
  exact = np.asarray(jnp.abs(x32).max(-1), np.float64) / qmax
  s = np.asarray(scale.astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(s, exact.astype(np.float32).astype(jnp.bfloat16).astype(np.float64))
  assert (np.abs(s - exact) <= exact * 2.0**-8).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_round_trip_is_within_half_a_step(dtype):
  x = _vectors(dtype)
  q, scale = quant.quantize(x, jnp.int8)
  assert q.dtype == jnp.int8 and scale.shape == x.shape[:3]
  x32 = x.astype(jnp.float32)
  _check_scale(scale, x32, 127)
  # The absmax maps to +-127 (its quotient is within 127 * 2^-8 of 127, clipped if above).
  top = jnp.abs(q.astype(jnp.int32)).max(-1)
  assert bool((top == 127).all())
  err = jnp.abs(quant.dequantize(q, scale, jnp.float32) - x32)
  assert bool((err <= scale.astype(jnp.float32)[..., None] * (0.5 + 1e-5)).all())
  assert quant.dequantize(q, scale, dtype).dtype == dtype


@pytest.mark.parametrize("qdtype,qmax,bound", [("int8", 127, 0.5), ("fp8", 448, 448 * 2.0**-4)])
def test_a_scale_rounded_down_by_almost_its_most_keeps_the_bound(qdtype, qmax, bound):
  # absmax / qmax just under 1 + 2^-8, the midpoint above 1.0 in bf16: the scale rounds down to
  # 1.0, the absmax reads qmax * (1 + 2^-8) scale units and is clipped to qmax, 0.496 of a unit
  # (int8) from its value; within half a step (int8) and e4m3's half-ulp at qmax (fp8).
  top = qmax * (1 + 2.0**-8 - 2.0**-20)
  x = jnp.asarray([[[[top, -0.3 * top, 0.71 * top, 0.0]]]], jnp.float32)
  q, scale = quant.quantize(x, quant.cache_dtype(qdtype))
  assert float(scale[0, 0, 0]) == 1.0
  err = jnp.abs(quant.dequantize(q, scale, jnp.float32) - x)
  assert float(err[..., 0].max()) == pytest.approx(qmax * (2.0**-8 - 2.0**-20), rel=1e-5)
  assert float(err.max()) <= bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_round_trip_is_within_e4m3_precision(dtype):
  x = _vectors(dtype)
  q, scale = quant.quantize(x, jnp.float8_e4m3fn)
  assert q.dtype == jnp.float8_e4m3fn and scale.shape == x.shape[:3]
  x32 = x.astype(jnp.float32)
  _check_scale(scale, x32, 448)
  y = quant.dequantize(q, scale, jnp.float32)
  assert bool(jnp.isfinite(y).all())
  # e4m3: 3 mantissa bits, so half an ulp is 2^-4 of the value; subnormals (below 2^-6 of the
  # scale unit) are spaced 2^-9 apart.
  s = scale.astype(jnp.float32)[..., None]
  bound = jnp.maximum(jnp.abs(x32) * 2.0**-4, s * 2.0**-10) * (1 + 1e-5)
  assert bool((jnp.abs(y - x32) <= bound).all())
  # The absmax lands within 2^-8 of 448 scale units and reads back as 448 (e4m3's next is 416).
  np.testing.assert_allclose(jnp.abs(y).max(-1), jnp.abs(x32).max(-1), rtol=2.0**-8)
  assert bool((jnp.abs(q.astype(jnp.float32)).max(-1) == 448).all())


@pytest.mark.parametrize("qdtype", ["int8", "fp8"])
def test_zero_vectors_read_back_as_zeros(qdtype):
  x = _vectors(jnp.float32).at[0, 1].set(0.0)
  q, scale = quant.quantize(x, quant.cache_dtype(qdtype))
  assert bool((scale[0, 1] == 0).all()) and bool((scale[1] > 0).all())
  y = quant.dequantize(q, scale, jnp.float32)
  assert bool(jnp.isfinite(y).all()) and float(jnp.abs(y[0, 1]).max()) == 0.0
