"""Decode throughput with `lckv_jax.generation.Generator` (the LCKV paper's protocol).

Random weights in bf16, prompt of P tokens, G generated tokens (no early stop), batch B.
Throughput = B * G / (prefill + decode time); decode-only tokens/s and prefill time are reported
too. Each phase is timed after a warm-up call with the same shapes, so compile time is excluded
(and reported separately). Each run is an entry of `decode_speed_<device>.json` (`records`) under
the setting `setting` names: a re-run of a setting replaces its entry.

  python -m benchmarks.decode_speed --shape=1b --layer_types=lckv --batch=32 --prompt=512 \
      --gen=256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import records
from benchmarks.common import SHAPES, command, config_path, default_out
from lckv_jax import Transformer
from lckv_jax.cache import cache_bytes
from lckv_jax.generation import Generator
from lckv_jax.config import model_from_file


def run(args) -> dict:
  config = model_from_file(
      config_path(args.shape), layer_types=args.layer_types,
      dtype=args.dtype, param_dtype=args.dtype, max_position_embeddings=args.prompt + args.gen,
      scan_layers=not args.no_scan, remat="none", decode_attention=args.decode_attention)
  model = Transformer(config, rngs=nnx.Rngs(0))
  gen = Generator(model, max_new_tokens=args.gen, max_len=args.prompt + args.gen)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(1, config.vocab_size, args.prompt).tolist() for _ in range(args.batch)]

  def once():
    t0 = time.perf_counter()
    state = gen.start(prompts)
    jax.block_until_ready(state.token)
    t1 = time.perf_counter()
    state = gen.decode(state, args.gen - 1)
    jax.block_until_ready(state.tokens)
    t2 = time.perf_counter()
    assert int(np.asarray(state.num_generated).min()) == args.gen
    return t1 - t0, t2 - t1

  c0 = time.perf_counter()
  first = once()
  compile_s = time.perf_counter() - c0
  runs = [once() for _ in range(args.repeats)]
  prefill_s = float(np.median([r[0] for r in runs]))
  decode_s = float(np.median([r[1] for r in runs]))
  b, g = args.batch, args.gen
  return dict(
      shape=args.shape, layer_types=config.layer_types, batch=b, prompt=args.prompt, gen=g,
      scan_layers=config.scan_layers, decode_attention=args.decode_attention,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      dtype=args.dtype, device=jax.devices()[0].device_kind, jax=jax.__version__,
      python=platform.python_version(), command=args.command,
      first_call_s=round(compile_s, 2), prefill_s=round(prefill_s, 4),
      decode_s=round(decode_s, 4), step_ms=round(1000 * decode_s / (g - 1), 3),
      tokens_per_s=round(b * g / (prefill_s + decode_s), 1),
      decode_tokens_per_s=round(b * (g - 1) / decode_s, 1),
      cache_bytes=cache_bytes(config, b, args.prompt + args.gen),
      first_run=[round(x, 3) for x in first])


def setting(args) -> str:
  """'1b_lckv_b32_p512_g256_unrolled_pallas': shape, layer_types, sizes, `_unrolled` for
  --no_scan, the --decode_attention unless auto, then --tag. (The kernel was left out once: the
  H200's mosaic run replaced its pallas run.)"""
  kernel = "" if args.decode_attention == "auto" else f"_{args.decode_attention}"
  return (f"{args.shape}_{args.layer_types.replace(':', '-')}_b{args.batch}_p{args.prompt}"
          f"_g{args.gen}{'_unrolled' if args.no_scan else ''}{kernel}{args.tag}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=SHAPES, default="tiny")
  p.add_argument("--layer_types", default="lckv")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--gen", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_scan", action="store_true", help="unroll the layers (scan_layers=False)")
  p.add_argument("--decode_attention", default="auto",
                 choices=("auto", "pallas", "mosaic", "dense"))
  p.add_argument("--tag", default="", help="suffix of the run's setting (see `setting`)")
  p.add_argument("--out", default=default_out(),
                 help="folder of the record file (default $OUT, else benchmarks/results)")
  args = p.parse_args(argv)
  args.command = command("benchmarks.decode_speed", argv)
  result = run(args)
  print(json.dumps(result))
  path = records.record_path(args.out, "decode_speed", result["device"])
  records.update(path, [records.entry(setting(args), **result)])
  return path


if __name__ == "__main__":
  main()
