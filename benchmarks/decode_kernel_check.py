"""On a GPU: the prefix-reading decode kernels against the XLA attention over the whole buffer.

Checks numerics (bf16, against a float32 dense reference) and times one layer's attention for a
batch of rows whose valid prefix is a fraction of the buffer (the XLA path reads every slot),
for each kernel (`pallas`: Triton, `mosaic`: Mosaic GPU, Hopper), block size and cache storage
(`--cache_dtype int8|fp8`: quantized K and V with their scales, read as stored) asked, and for the
Triton kernel each number of kv heads a program (`--heads`; default: `heads_per_program`'s). The
sweep that decides which one `decode_attention="auto"` picks, at which block, and when a program
reads two kv heads. `--max_batch` adds the 24 GB max-batch shapes of the H200 records (1b lckv
int8: 4,541 rows of 2,048 slots, 7b lckv int8: 208 of 1,536). Prints its numbers (TB/s counts
the valid slots' K, V and scale bytes); writes no record.

  python -m benchmarks.decode_kernel_check --kernels pallas mosaic --block_k 64 128
  python -m benchmarks.decode_kernel_check --cache_dtype int8 --heads 1 2 --max_batch
"""
import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp

from lckv_jax import quant
from lckv_jax.kernels.reference import dot_product_attention

# (batch, heads, kv_heads, head_dim, slots): the 1b shape at batch 32 and 256, and the 30b one
# (MHA, head_dim 128).
SHAPES = ((32, 32, 4, 64, 4096), (256, 32, 4, 64, 4096), (8, 52, 52, 128, 4096))
MAX_BATCH = ((4541, 32, 4, 64, 2048), (208, 32, 32, 128, 1536))  # 1b and 7b lckv int8, 24 GB
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
  p.add_argument("--cache_dtype", default="bfloat16", choices=("bfloat16", "int8", "fp8"))
  p.add_argument("--heads", type=int, nargs="+", default=[None],
                 help="kv heads a program of the Triton kernel (1 or 2; default its own choice)")
  p.add_argument("--max_batch", action="store_true", help="also the max-batch shapes")
  p.add_argument("--interpret", action="store_true",
                 help="small shapes in Pallas's interpreter: checks the sweep runs, no GPU")
  args = p.parse_args(argv)
  key = jax.random.key(0)
  print(jax.devices()[0].device_kind, jax.__version__)
  shapes = SMALL if args.interpret else SHAPES + (MAX_BATCH if args.max_batch else ())
  for b, h, kh, d, s in shapes:
    kq, kk, kv, ks = jax.random.split(jax.random.fold_in(key, b), 4)
    q = jax.random.normal(kq, (b, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, s, kh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, s, kh, d), jnp.bfloat16)
    scales, per_slot = {}, 2 * kh * d * 2
    if args.cache_dtype != "bfloat16":  # the kernels read these; the reference their values
      (k, k_scale), (v, v_scale) = (quant.quantize(x, quant.cache_dtype(args.cache_dtype))
                                    for x in (k, v))
      scales = dict(k_scale_BxKxS=k_scale.swapaxes(1, 2), v_scale_BxKxS=v_scale.swapaxes(1, 2))
      per_slot = 2 * kh * (d + 4)
      k_ref, v_ref = (quant.dequantize(x, sc, jnp.float32) for x, sc in ((k, k_scale),
                                                                          (v, v_scale)))
    else:
      k_ref, v_ref = k.astype(jnp.float32), v.astype(jnp.float32)
    dense = jax.jit(lambda q, k, v, m: dot_product_attention(q[:, None], k, v, m)[:, 0])
    for valid in (s // 4, s):
      start = jax.random.randint(ks, (b,), 0, 8)
      end = jnp.full((b,), valid, jnp.int32)
      idx = jnp.arange(s)
      mask = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None]))[:, None, :]
      ref = dot_product_attention(q[:, None].astype(jnp.float32), k_ref, v_ref, mask)[:, 0]
      read = b * valid * per_slot
      xla = timed(dense, q, k_ref.astype(q.dtype), v_ref.astype(q.dtype), mask)
      print(f"B={b:4d} H={h} K={kh} D={d} slots={s} valid={valid} {args.cache_dtype}: xla whole "
            f"buffer (bf16) {1e6 * xla:8.1f} us")
      for name in args.kernels:
        heads_of = args.heads if name == "pallas" else [None]
        for bk, heads in itertools.product(args.block_k, heads_of):
          extra = {} if heads is None else {"heads": heads}
          f = functools.partial(kernel(name), block_k=bk, interpret=args.interpret, **scales,
                                **extra)
          tag = f"{name:6s} block {bk:4d}" + ("" if heads is None else f" heads {heads}")
          try:
            out = f(q, k, v, start, end)
          except Exception as e:  # noqa: BLE001 - a setting a kernel cannot run: say so, go on
            print(f"  {tag}: {type(e).__name__}: {str(e)[:120]}")
            continue
          err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
          if not err < 5e-2:  # bf16 output against float32: ~1e-2; a wrong answer is far off
            raise AssertionError(f"{tag}: max error {err} against the reference")
          t = timed(f, q, k, v, start, end, n=1 if args.interpret else 20)
          print(f"  {tag}: {1e6 * t:8.1f} us ({read / t / 1e12:.2f} TB/s of valid KV), max err "
                f"{err:.2e}")
      del ref
    del k, v, k_ref, v_ref


if __name__ == "__main__":
  main()
