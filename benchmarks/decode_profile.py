"""What binds a decode step: device kernel time against wall time, kernels per token, memory.

Runs `Generator` on random weights (as `throughput.py`), then decodes `--steps` tokens three
times: timed, under `jax.profiler` (device kernels read back from the trace), and once more
timed. Reports per token: wall time, the device's kernel time (sum of kernel durations), the
number of kernels, the idle gaps between them, the largest kernels; and XLA's memory analysis of
the compiled decode loop (its temporary buffers against the cache, which a donated, in-place
loop does not need to copy). Each run is one line of `--out`, by default
`decode_profile_<device>.jsonl` (`records`), under the setting shape, layer_types, sizes and
`--tag`: a re-run of a setting replaces its line. `XLA_FLAGS` is recorded, so flag variants are
one run each, named by their tag:

  python -m benchmarks.decode_profile --shape=1b --layer_types=llama --batch=32 --tag=default
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m benchmarks.decode_profile --tag=no_graphs

A wall time well above the kernel time, with gaps between kernels, means the host launches
kernels more slowly than the device runs them (launch overhead).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import records
from benchmarks.common import cache_len, default_out, serving_model  # throughput.py's model
from lckv_jax import generation as gen_lib
from lckv_jax.cache import cache_bytes


def device_kernels(trace_dir: str) -> tuple[list[tuple[str, int, int]], dict]:
  """(name, start_ns, duration_ns) of every kernel the GPU ran in the trace, sorted by start; and
  the event count of every line of the GPU planes (what the kernel list was taken from)."""
  from jax.profiler import ProfileData
  events, lines = [], {}
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        line_events = list(line.events)
        lines[f"{plane.name}/{line.name}"] = len(line_events)
        # Streams carry the kernels and copies; other lines ('XLA Ops', 'XLA Modules', ...)
        # summarize them.
        if line.name.startswith("Stream"):
          events += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line_events]
  return sorted(events, key=lambda e: e[1]), lines


def traced(run):
  """`run()` under `jax.profiler`, waited for: (its result, the GPU's kernels, the trace's line
  counts), as `device_kernels` reads them."""
  with tempfile.TemporaryDirectory() as trace:
    jax.profiler.start_trace(trace)
    out = jax.block_until_ready(run())
    jax.profiler.stop_trace()
    return (out, *device_kernels(trace))


def report(record: dict, out: str) -> None:
  """Writes `record` into the record file `out` and prints it, its largest kernels a line each."""
  records.update(out, [record])
  print(json.dumps({k: v for k, v in record.items() if k != "largest"}), flush=True)
  for row in record.get("largest", []):
    print("  ", row)


def summarize(kernels, steps: int, top: int = 15) -> dict:
  """Per-token numbers of the kernels in the trace."""
  if not kernels:
    return {"kernels_per_token": 0}
  busy = sum(d for _, _, d in kernels)
  span = kernels[-1][1] + kernels[-1][2] - kernels[0][1]
  by_name = collections.defaultdict(lambda: [0, 0])
  for name, _, d in kernels:
    by_name[name][0] += 1
    by_name[name][1] += d
  largest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return dict(
      kernels_per_token=round(len(kernels) / steps, 1),
      kernel_ms_per_token=round(busy / steps / 1e6, 4),
      span_ms_per_token=round(span / steps / 1e6, 4),
      idle_fraction=round(1 - busy / span, 3) if span else None,
      mean_kernel_us=round(busy / len(kernels) / 1e3, 2),
      largest=[dict(name=n[:120], per_token=round(c / steps, 2),
                    us_per_token=round(d / steps / 1e3, 2)) for n, (c, d) in largest])


def setting(args) -> str:
  """'1b_llama_b32_p512_g256_no_graphs': the model, the sizes and the tag (the variant)."""
  return (f"{args.shape}_{args.layer_types.replace(':', '-')}_b{args.batch}_p{args.prompt}"
          f"_g{args.gen}{'_' + args.tag if args.tag else ''}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="1b")
  p.add_argument("--layer_types", default="llama")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--gen", type=int, default=256)
  p.add_argument("--steps", type=int, default=32, help="decode steps timed and profiled")
  p.add_argument("--decode_attention", default="auto")
  p.add_argument("--sliding_window", type=int, default=None)
  p.add_argument("--tag", default="")
  p.add_argument("--out", default=None, help="JSON-lines record file (default "
                 "decode_profile_<device>.jsonl in $OUT, else in benchmarks/results)")
  p.add_argument("--hlo", default=None, help="also write the compiled decode loop's HLO here")
  args = p.parse_args(argv)
  if args.steps >= args.gen:
    raise SystemExit(f"--steps ({args.steps}) must be below --gen ({args.gen})")

  model = serving_model(args, args.layer_types, decode_attention=args.decode_attention)
  cfg = model.config
  gen = gen_lib.Generator(model, max_new_tokens=args.gen, unstack=False)
  rng = np.random.RandomState(0)
  prompts = rng.randint(1, cfg.vocab_size, (args.batch, args.prompt)).tolist()
  state = gen.start(prompts)
  state = gen.decode(state, 4)  # compile
  jax.block_until_ready(state.tokens)

  def timed(state):
    t0 = time.perf_counter()
    state = gen.decode(state, args.steps)
    jax.block_until_ready(state.tokens)
    return state, (time.perf_counter() - t0) / args.steps

  state, wall1 = timed(state)
  state, kernels, lines = traced(lambda: gen.decode(state, args.steps))
  state, wall2 = timed(state)

  graphdef, params = nnx.split(gen.model)
  compiled = gen_lib._decode.lower(graphdef, gen.settings, params, state,
                                   jnp.asarray(args.steps, jnp.int32)).compile()
  mem = compiled.memory_analysis()
  slots = cache_len(args.prompt, args.gen)
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(compiled.as_text())
  record = records.entry(
      setting(args),
      shape=args.shape, layer_types=args.layer_types, batch=args.batch, prompt=args.prompt,
      gen=args.gen, steps=args.steps, tag=args.tag, xla_flags=os.environ.get("XLA_FLAGS", ""),
      decode_attention=args.decode_attention, device=jax.devices()[0].device_kind,
      jax=jax.__version__, wall_ms_per_token=[round(1e3 * wall1, 4), round(1e3 * wall2, 4)],
      cache_bytes=cache_bytes(cfg, args.batch, slots, metadata=True),
      decode_temp_bytes=getattr(mem, "temp_size_in_bytes", None),
      decode_alias_bytes=getattr(mem, "alias_size_in_bytes", None),
      trace_lines=lines, **summarize(kernels, args.steps))
  report(record, args.out or records.record_path(default_out(), "decode_profile",
                                                 jax.devices()[0].device_kind, ext="jsonl"))


if __name__ == "__main__":
  main()
