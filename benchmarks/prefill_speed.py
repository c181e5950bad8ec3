"""Prefill calls timed warm, against their FLOPs: whole prompts, or a server's chunks.

Two kinds of run on random bf16 weights (as `throughput.py`):

  start   `Generator.start` over `--rows` prompts of `--prompt` tokens, whole, one call (the
          offline benchmark's prefill); timed over `--reps` calls after the first (which
          compiles, and pays first-execution costs that `throughput.py`'s single runs keep), then
          profiled once: kernels, their time, idle gaps, the largest kernels.
  chunks  a server's chunked prefill (`Generator(prefill_chunk=C)`): `--rows` prompts of
          `--prompt` tokens in [rows, C] calls into a cache of `--max_len` slots, each chunk
          timed (median over the reps after the first). `--dense` runs the chunks into a filled
          cache through the dense reference instead of the fused kernel the dispatch picks
          (`cudnn_masked`): the A/B of that choice.

  python -m benchmarks.prefill_speed start --shape=1b --layer_types=lckv --rows=32 --prompt=512
  python -m benchmarks.prefill_speed chunks --shape=7b --layer_types=lckv --rows=4 [--dense]

Each run is one entry of `prefill_speed_<device>.json` (`records`), its setting named by the
kind, model and sizes. FLOP times are at `--flops_per_s` (default: the matmul rate this GPU
measured, `roofline.ceilings`; on a CPU no kernels are traced and the rate is nominal).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types

import jax
import numpy as np

from benchmarks import records
from benchmarks.common import default_out, serving_model
from benchmarks.decode_profile import report, summarize, traced
from lckv_jax import generation as gen_lib
from lckv_jax import roofline as rl
from lckv_jax.kernels import dispatch


def dense_chunks() -> None:
  """Chunks into a filled cache take the dense reference where the dispatch picks a fused one."""
  choose = dispatch.choose

  def dense(*args, **kwargs):
    kernel = choose(*args, **kwargs)
    return "dense" if kernel.endswith("_masked") else kernel
  dispatch.choose = dense


def iterations(config) -> int:
  return config.forward_passes + config.backward_passes if config.layer_spec.has_cycle else 1


def time_chunks(gen, prompts, reps: int) -> list[list[float]]:
  """Seconds of each chunk call, per rep (the first compiles)."""
  per_rep = []
  for _ in range(reps):
    job, seconds = gen.begin(prompts), []
    while not job.done:
      t0 = time.perf_counter()
      job = gen.prefill_next(job)
      jax.block_until_ready(job.logits)
      seconds.append(time.perf_counter() - t0)
    per_rep.append(seconds)
  return per_rep


def time_start(gen, prompts, reps: int) -> list[float]:
  seconds = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state = gen.start(prompts)
    jax.block_until_ready(state.token)
    seconds.append(time.perf_counter() - t0)
    del state
  return seconds


def profile_start(gen, prompts) -> dict:
  _, kernels, _ = traced(lambda: gen.start(prompts))
  return summarize(kernels, steps=1, top=12)  # "per token" = per call here


def setting(a) -> str:
  chunk = f"_c{a.chunk}_s{a.max_len}{'_dense' if a.dense else ''}" if a.what == "chunks" else ""
  return f"{a.what}_{a.shape}_{a.layer_types}_r{a.rows}_p{a.prompt}{chunk}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("start", "chunks"))
  p.add_argument("--shape", default="1b")
  p.add_argument("--layer_types", default="lckv")
  p.add_argument("--rows", type=int, default=4)
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--chunk", type=int, default=256, help="chunks: tokens per call")
  p.add_argument("--max_len", type=int, default=1024, help="cache slots a row")
  p.add_argument("--dense", action="store_true", help="chunks: the dense reference (A/B)")
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--flops_per_s", type=float, default=None)
  p.add_argument("--out", default=None, help="record file (default prefill_speed_<device>.json "
                 "in $OUT, else in benchmarks/results)")
  a = p.parse_args(argv)
  if a.reps < 2:
    raise SystemExit("--reps must be >= 2: the first call compiles")
  if a.max_len <= a.prompt:
    raise SystemExit(f"--max_len ({a.max_len}) must exceed --prompt ({a.prompt})")
  if a.dense:
    dense_chunks()
  model = serving_model(types.SimpleNamespace(shape=a.shape, prompt=a.prompt,
                                              gen=a.max_len - a.prompt, sliding_window=None),
                        a.layer_types)
  cfg = model.config
  rate = a.flops_per_s or rl.ceilings(jax.default_backend() == "cpu")["matmul_flops_per_s"]
  prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (a.rows, a.prompt)).tolist()
  new = a.max_len - a.prompt
  fields = dict(what=a.what, shape=a.shape, layer_types=cfg.layer_types, rows=a.rows,
                prompt=a.prompt, iterations=iterations(cfg), device=jax.devices()[0].device_kind,
                jax=jax.__version__, matmul_flops_per_s=rate,
                command="python -m benchmarks.prefill_speed " + " ".join(argv or sys.argv[1:]))
  if a.what == "chunks":
    gen = gen_lib.Generator(model, max_new_tokens=new, max_len=a.max_len, prefill_chunk=a.chunk,
                            per_row_sampling=True)
    per_rep = time_chunks(gen, prompts, a.reps)
    ms = [round(1e3 * statistics.median(r[i] for r in per_rep[1:]), 2)
          for i in range(len(per_rep[0]))]
    flop_ms = 1e3 * rl.prefill_flops(cfg, a.rows, a.chunk, iterations(cfg)) / rate
    fields.update(chunk=a.chunk, max_len=a.max_len, dense=a.dense, ms_per_chunk=ms,
                  flop_ms_per_full_chunk=round(flop_ms, 2))
  else:
    gen = gen_lib.Generator(model, max_new_tokens=new, prefill_batch=a.rows, unstack=False)
    seconds = time_start(gen, prompts, a.reps)
    flop_s = rl.prefill_flops(cfg, a.rows, a.prompt, iterations(cfg)) / rate
    warm = statistics.median(seconds[1:])
    fields.update(ms=[round(1e3 * s, 1) for s in seconds], flop_ms=round(1e3 * flop_s, 1),
                  vs_flops=round(warm / flop_s, 3), **profile_start(gen, prompts))
  report(records.entry(setting(a), **fields), a.out or records.record_path(
      default_out(), "prefill_speed", jax.devices()[0].device_kind))


if __name__ == "__main__":
  main()
