"""On a GPU: the prefix-reading decode kernels against the XLA attention over the whole buffer.

Checks numerics (bf16, against a float32 dense reference) and times one layer's attention for a
batch of rows whose valid prefix is a fraction of the buffer (the XLA path reads every slot),
for each kernel (`pallas`: Triton, `mosaic`: Mosaic GPU, Hopper) and block size asked: the
sweep that decides which one `decode_attention="auto"` picks and at which block. Prints its
numbers; writes no record.

  python -m benchmarks.decode_kernel_check --kernels pallas mosaic --block_k 64 128
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp

from lckv_jax.kernels.reference import dot_product_attention

# (batch, heads, kv_heads, head_dim, slots): the 1b shape at batch 32 and 256, and the 30b one
# (MHA, head_dim 128).
SHAPES = ((32, 32, 4, 64, 4096), (256, 32, 4, 64, 4096), (8, 52, 52, 128, 4096))
SMALL = ((2, 8, 2, 64, 256),)  # --interpret: the kernels in Pallas's interpreter (CPU tests)


def timed(f, *args, n=20):
  """Mean seconds of `n` calls after one."""
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def kernel(name: str):
  if name == "pallas":
    from lckv_jax.kernels.decode import prefix_attention
  else:
    from lckv_jax.kernels.decode_mgpu import prefix_attention
  return prefix_attention


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kernels", nargs="+", choices=("pallas", "mosaic"), default=["pallas"])
  p.add_argument("--block_k", type=int, nargs="+", default=[128],
                 help="slots per block (each kernel rounds down to a size it runs)")
  p.add_argument("--interpret", action="store_true",
                 help="small shapes in Pallas's interpreter: checks the sweep runs, no GPU")
  args = p.parse_args(argv)
  key = jax.random.key(0)
  print(jax.devices()[0].device_kind, jax.__version__)
  for b, h, kh, d, s in SMALL if args.interpret else SHAPES:
    kq, kk, kv, ks = jax.random.split(jax.random.fold_in(key, b), 4)
    q = jax.random.normal(kq, (b, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, kh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, kh, d), jnp.bfloat16)
    dense = jax.jit(lambda q, k, v, m: dot_product_attention(q[:, None], k, v, m)[:, 0])
    for valid in (s // 4, s):
      start = jax.random.randint(ks, (b,), 0, 8)
      end = jnp.full((b,), valid, jnp.int32)
      idx = jnp.arange(s)
      mask = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None]))[:, None, :]
      ref = dot_product_attention(q[:, None].astype(jnp.float32), k.astype(jnp.float32),
                                  v.astype(jnp.float32), mask)[:, 0]
      read = 2 * b * valid * kh * d * 2
      print(f"B={b:4d} H={h} K={kh} D={d} slots={s} valid={valid}: xla whole buffer "
            f"{1e6 * timed(dense, q, k, v, mask):8.1f} us")
      for name in args.kernels:
        for bk in args.block_k:
          f = functools.partial(kernel(name), block_k=bk, interpret=args.interpret)
          try:
            out = f(q, k, v, start, end)
          except Exception as e:  # noqa: BLE001 - a block a kernel cannot run: say so, go on
            print(f"  {name:6s} block {bk:4d}: {type(e).__name__}: {str(e)[:120]}")
            continue
          err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
          if not err < 5e-2:  # bf16 output against float32: ~1e-2; a wrong answer is far off
            raise AssertionError(f"{name} block {bk}: max error {err} against the reference")
          t = timed(f, q, k, v, start, end, n=1 if args.interpret else 20)
          print(f"  {name:6s} block {bk:4d}: {1e6 * t:8.1f} us ({read / t / 1e12:.2f} TB/s of "
                f"valid KV), max err {err:.2e}")


if __name__ == "__main__":
  main()
