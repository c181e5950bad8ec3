"""Decode throughput with `lckv_jax.generation.Generator` (the LCKV paper's protocol).

Random weights in bf16, prompt of P tokens, G generated tokens (no early stop), batch B.
Throughput = B * G / (prefill + decode time); decode-only tokens/s and prefill time are reported
too. Each phase is timed after a warm-up call with the same shapes, so compile time is excluded
(and reported separately). Writes one JSON per run.

  python benchmarks/decode_speed.py --shape=1b --layer_types=lckv --batch=32 --prompt=512 --gen=256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import nnx

from lckv_jax import Transformer
from lckv_jax.cache import cache_bytes
from lckv_jax.generation import Generator
from lckv_jax.train.config import model_from_file

SHAPES = ("tiny", "50m", "1b", "7b", "30b")  # the model sections of configs/<shape>.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args) -> dict:
  config = model_from_file(
      os.path.join(ROOT, "configs", f"{args.shape}.py"), layer_types=args.layer_types,
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
      python=platform.python_version(), command="python " + " ".join(sys.argv),
      first_call_s=round(compile_s, 2), prefill_s=round(prefill_s, 4),
      decode_s=round(decode_s, 4), step_ms=round(1000 * decode_s / (g - 1), 3),
      tokens_per_s=round(b * g / (prefill_s + decode_s), 1),
      decode_tokens_per_s=round(b * (g - 1) / decode_s, 1),
      cache_bytes=cache_bytes(config, b, args.prompt + args.gen),
      first_run=[round(x, 3) for x in first])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shape", choices=SHAPES, default="tiny")
  p.add_argument("--layer_types", default="lckv")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--gen", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_scan", action="store_true", help="unroll the layers (scan_layers=False)")
  p.add_argument("--decode_attention", default="auto", choices=("auto", "pallas", "xla"))
  p.add_argument("--tag", default="", help="suffix of the JSON file name")
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = p.parse_args()
  result = run(args)
  print(json.dumps(result))
  os.makedirs(args.out, exist_ok=True)
  name = (f"decode_{args.shape}_{args.layer_types.replace(':', '-')}_b{args.batch}"
          f"_p{args.prompt}_g{args.gen}{'_unrolled' if args.no_scan else ''}{args.tag}.json")
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
