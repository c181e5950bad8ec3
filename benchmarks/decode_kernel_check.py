"""On a GPU: the prefix-reading decode kernel against the XLA attention over the whole buffer.

Checks numerics (bf16, against a float32 dense reference) and times one layer's attention for a
batch of rows whose valid prefix is a fraction of the buffer (the XLA path reads every slot).
Prints its numbers; writes no record.

  python -m benchmarks.decode_kernel_check
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lckv_jax.kernels.reference import dot_product_attention
from lckv_jax.kernels.decode import prefix_attention


def timed(f, *args, n=20):
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def main(argv=None):
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
  key = jax.random.key(0)
  print(jax.devices()[0].device_kind, jax.__version__)
  # (batch, heads, kv_heads, head_dim, slots): the 1b shape and the 30b (MHA, head_dim 128) one.
  for b, h, kh, d, s in [(32, 32, 4, 64, 4096), (256, 32, 4, 64, 4096), (8, 52, 52, 128, 4096)]:
    kq, kk, kv, ks = jax.random.split(jax.random.fold_in(key, b), 4)
    q = jax.random.normal(kq, (b, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, kh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, kh, d), jnp.bfloat16)
    for valid in (s // 4, s):
      start = jax.random.randint(ks, (b,), 0, 8)
      end = jnp.full((b,), valid, jnp.int32)
      idx = jnp.arange(s)
      mask = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None]))[:, None, :]
      fused = jax.jit(prefix_attention)
      dense = jax.jit(lambda q, k, v, m: dot_product_attention(q[:, None], k, v, m)[:, 0])
      out = fused(q, k, v, start, end)
      ref = dot_product_attention(q[:, None].astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32), mask)[:, 0]
      err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
      t_fused, t_dense = timed(fused, q, k, v, start, end), timed(dense, q, k, v, mask)
      read = 2 * b * valid * kh * d * 2
      print(f"B={b:4d} H={h} K={kh} D={d} slots={s} valid={valid}: max err {err:.2e}  "
            f"kernel {1e6 * t_fused:8.1f} us ({read / t_fused / 1e12:.2f} TB/s of valid KV)  "
            f"xla whole buffer {1e6 * t_dense:8.1f} us")
  assert np.isfinite(err)


if __name__ == "__main__":
  main()
