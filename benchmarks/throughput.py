"""Decode throughput, the LCKV paper's protocol, with the roofline of every run.

Random bf16 weights (one array per layer, the serving layout), prompts of P random tokens, G
generated tokens per row (no early stop), batch B. Throughput = B*G / (prefill + decode), the
paper's number; decode-only tokens/s, prefill time, per-step time and peak device memory are
recorded too (`peak_bytes`: the process's peak so far, which JAX cannot reset, so with several
models or batches in one command a later run shows an earlier one's peak if it was higher).
Compile time is measured (JAX's compile events) and subtracted from the phase it fell in, so one
pass per setting suffices.

`--max_batch` finds the largest batch that fits, exact to one row: doubling, then bisection, over a memory model
(weights + cache + decode state + the prefill chunk's activations + a reserve) against the
device's limit (`--cap_bytes` caps it in bytes, the GPU allocator with it, e.g. to emulate a 24 GB
GPU on a larger one); each record under a limit keeps the model's count (`memory_model_bytes`,
`reserve_bytes`) beside `peak_bytes`, and a peak above the count is printed; the run at
that batch confirms it, and an out-of-memory there retries 15% smaller (up to 3 times; on the
H100 a first out-of-memory was followed by more, so treat such a result with suspicion).

Roofline: the script measures HBM bandwidth and the bf16 matmul rate on the same GPU first, then
for each run sums the per-step minimum time max(bytes / bandwidth, FLOPs / rate) over the G-1
decode steps (bytes: weights + every layer's read of the valid KV it attends to,
`lckv_jax.roofline`) and reports measured / roofline. The prefill is compared with its
(iterations-pass) FLOPs over the matmul rate.

`--cache_dtype int8|fp8` stores the KV cache quantized (`lckv_jax.quant`): the memory model, the
batch search and the roofline count its bytes (scales included), and the setting's name ends in
`_int8` / `_fp8` (the default bf16 cache adds nothing, so earlier records keep their names).

Every run (one model at one batch) is an entry of `throughput_<device>.json` (`records`), under
the setting `setting` names: a re-run of a setting replaces its entry.

  python -m benchmarks.throughput --shape=1b --layer_types llama lckv --prompt=512 --gen=1536 \
      --batch 32 128 --max_batch
  python -m benchmarks.throughput --smoke     # a tiny model on any device, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import records
from benchmarks.common import cache_len, cap_allocator, command, default_out, serving_model
from lckv_jax import roofline as rl
from lckv_jax.cache import cache_bytes, prefill_bytes_per_token, reserve_bytes
from lckv_jax.generation import Generator

CACHE_DTYPES = {"bfloat16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}  # flag -> dtype
DEFAULT_CACHE_DTYPE = "bfloat16"  # the compute dtype of `serving_model`


# ---------------------------------------------------------------------------------------------
# Compile time: JAX reports every tracing, lowering and backend compile as a duration event.
# ---------------------------------------------------------------------------------------------

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_s = [0.0]


def _on_event(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_s[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


class Clock:
  """Wall time of a phase, and the part of it spent compiling."""

  def __enter__(self):
    self.c0, self.t0 = _compile_s[0], time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.t0
    self.compile = _compile_s[0] - self.c0
    self.run = max(self.wall - self.compile, 0.0)


# ---------------------------------------------------------------------------------------------
# Batch search.
# ---------------------------------------------------------------------------------------------


def find_max_batch(fits, start: int = 1, resolution: float = 0, limit: int = 1 << 20) -> int:
  """The largest batch b with fits(b): doubling from `start`, then bisection to `resolution`
  (relative; 0, the default: exact to one row, as `fits` is a memory model and costs nothing);
  0 if even batch 1 does not fit. `fits` must be monotone."""
  lo, hi = 0, None
  b = max(1, start)
  while b <= limit:  # doubling (halving first when `start` is too big)
    if fits(b):
      lo = b
      if hi is not None:
        break
      b *= 2
    else:
      hi = b
      if lo:
        break
      b //= 2
      if b == 0:
        return 0
  if hi is None:
    return lo
  while hi - lo > max(1, int(lo * resolution)):  # bisection
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


def _device_limit() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit", 0))


def prefill_rows(config, batch: int, prompt: int, limit: int) -> int:
  """Rows prefilled at once: about 32k tokens, and activations within 8% of device memory.

  The last chunk may be smaller (one more prefill compile). The H100 runs required equal chunks,
  which left 7b lckv at batch 59 (a prime) prefilling one row at a time.
  """
  per_token = prefill_bytes_per_token(config)
  rows = min(batch, max(1, 32768 // prompt))
  if limit:
    rows = min(rows, max(1, int(0.08 * limit) // (prompt * per_token)))
  return rows


def memory_need(config, batch: int, prompt: int, gen: int, weights: int, limit: int,
                cache_copies: int = 1, cache_dtype=None) -> int:
  """Device bytes of a run at `batch`: weights, cache, decode state, prefill chunk, reserve.

  `cache_dtype`: the cache's storage (default the compute dtype; int8 and fp8 with their scales).

  `cache_copies`: cache-sized buffers at the peak. The first H100 runs (stop 10, some with
  `--cache_copies=2`) held two: the first token's sampling returned a copy of the
  decode state (now donated), and XLA's decode attention keeps the whole cache in a second,
  transposed layout inside the decode loop (the Pallas kernel, now used at every buffer length
  on a GPU, does not; `benchmarks.decode_profile` reads the loop's temporary bytes).
  """
  slots = cache_len(prompt, gen)
  cache = cache_copies * cache_bytes(config, batch, slots, cache_dtype, metadata=True)
  rows = prefill_rows(config, batch, prompt, limit)
  chunk = rows * prompt * prefill_bytes_per_token(config)
  if rows < batch:  # row chunks prefill into caches of `prompt` slots, copied into the cache
    chunk += cache_bytes(config, rows, prompt, cache_dtype, metadata=True)
  state = batch * (gen * 4 + 4 * config.vocab_size * 4)  # tokens; logits, softmax, sampling
  return weights + cache + state + chunk + reserve_bytes(limit)


def memory_count(cfg, batch: int, args, weights: int, limit: int, peak: int) -> dict:
  """What the memory model counts for a run at `batch` beside its reserve, to set against the
  device's measured peak: `memory_model_bytes` (weights, cache, decode state, prefill chunk) and
  `reserve_bytes`. A peak above the count means the reserve absorbed what the model missed; it
  is printed, since a tighter reserve would then run out of memory (`peak` is the process's peak
  so far: after a larger run in the same command it is that run's)."""
  reserve = reserve_bytes(limit)
  counted = memory_need(cfg, batch, args.prompt, args.gen, weights, limit, args.cache_copies,
                        CACHE_DTYPES[args.cache_dtype]) - reserve
  if peak > counted:
    print(f"  batch {batch}: the device's peak, {peak / 1e9:.2f} GB, is "
          f"{(peak - counted) / 1e9:.2f} GB above the memory model's count "
          f"({counted / 1e9:.2f} GB); the reserve ({reserve / 1e9:.2f} GB) took it", flush=True)
  return dict(memory_model_bytes=int(counted), reserve_bytes=int(reserve))


# ---------------------------------------------------------------------------------------------
# One run.
# ---------------------------------------------------------------------------------------------


def run_once(model, args, batch: int, ceilings: dict, limit: int) -> dict:
  cfg = model.config
  p, g = args.prompt, args.gen
  rows = prefill_rows(cfg, batch, p, limit)
  cache_dtype = CACHE_DTYPES[args.cache_dtype]
  gen = Generator(model, max_new_tokens=g, prefill_iterations=args.prefill_iterations,
                  prefill_batch=rows, unstack=False, cache_dtype=cache_dtype)
  rng = np.random.RandomState(batch)
  prompts = rng.randint(1, cfg.vocab_size, (batch, p)).tolist()
  with Clock() as pre:
    state = gen.start(prompts)
    jax.block_until_ready(state.token)
  steps = g - 1 if not args.decode_steps else min(args.decode_steps, g - 1)
  if steps < min(512, g - 1):
    print(f"warning: {steps} of {g - 1} decode steps timed, the rest projected: the first steps "
          "are overhead-bound, so this overstates the time (--decode_steps 512 or more)",
          file=sys.stderr, flush=True)
  with Clock() as dec:
    state = gen.decode(state, steps)
    jax.block_until_ready(state.tokens)
  if int(np.asarray(state.num_generated).min()) != steps + 1:
    raise RuntimeError(f"a row stopped before {steps + 1} tokens")
  stats = jax.devices()[0].memory_stats() or {}
  del state
  bw, rate = ceilings["hbm_bytes_per_s"], ceilings["matmul_flops_per_s"]
  roofs = rl.decode_roofline_steps(cfg, batch, p, g, bw, rate, cache_dtype)
  # With --decode_steps only the first steps run; the rest are projected by the roofline's
  # growth with the context (the measured fraction of the roofline is kept).
  decode_s = dec.run * sum(roofs) / sum(roofs[:steps]) if steps < g - 1 else dec.run
  total = pre.run + decode_s
  iterations = args.prefill_iterations or cfg.forward_passes + cfg.backward_passes
  record = dict(
      batch=batch, prompt=p, gen=g, prefill_batch=rows, prefill_iterations=iterations,
      decode_steps_measured=steps, projected=steps < g - 1,
      prefill_s=round(pre.run, 4), decode_s=round(decode_s, 4),
      step_ms=round(1e3 * decode_s / max(g - 1, 1), 4),
      tokens_per_s=round(batch * g / total, 1),
      decode_tokens_per_s=round(batch * (g - 1) / decode_s, 1) if g > 1 else None,
      compile_prefill_s=round(pre.compile, 2), compile_decode_s=round(dec.compile, 2),
      cache_dtype=cache_dtype, cache_bytes=cache_bytes(cfg, batch, cache_len(p, g), cache_dtype),
      peak_bytes=int(stats.get("peak_bytes_in_use", 0)), bytes_limit=limit)
  last = p + g
  bound = rl.roofline_bound(rl.decode_step_bytes(cfg, batch, last,
                                                 cache_dtype=cache_dtype)["total"],
                            rl.decode_step_flops(cfg, batch, last)["total"], bw, rate)
  roof = sum(roofs)
  prefill_roof = rl.prefill_flops(cfg, batch, p, iterations) / rate
  fraction = roof / decode_s if decode_s else None
  if fraction is not None and fraction > 1.0:
    # Faster than the best the device did: the ceilings were measured too low (or the byte count
    # is off), never a result.
    print(f"  measurement error: batch {batch} ran at {fraction:.3f} of its roofline (> 1)",
          flush=True)
    record["roofline_error"] = True
  record.update(roofline_decode_s=round(roof, 4),
                decode_roofline_fraction=round(fraction, 3) if fraction else None,
                decode_bound=bound, prefill_flop_s=round(prefill_roof, 4),
                prefill_vs_flops=round(pre.run / prefill_roof, 3) if prefill_roof else None)
  return record


def setting(record: dict, tag: str = "") -> str:
  """The setting of a run's record: label, P, G, and the batch, or `max_<device limit>GB` for
  the largest batch that fits (found again at each run); a quantized cache's `_int8` / `_fp8`;
  then `tag`. E.g. '1b_lckv-10_p5_g2043_max_25.5GB', '1b_llama_p512_g256_b32_int8'."""
  name = record["label"].replace(" ", "_").replace(":", "-")
  # The cap asked for names the setting (the allocator's limit under it differs by GPU and JAX:
  # 25,398,607,872 B on the H200 for a cap of 25,507,659,776).
  memory = record.get("cap_bytes") or record["bytes_limit"]
  batch = (f"max_{memory / 1e9:.1f}GB" if record.get("max_batch")
           else f"b{record['batch']}")
  cache = record.get("cache_dtype", DEFAULT_CACHE_DTYPE)
  flag = {v: k for k, v in CACHE_DTYPES.items()}.get(cache, cache)
  cache = "" if cache == DEFAULT_CACHE_DTYPE else f"_{flag}"
  return f"{name}_p{record['prompt']}_g{record['gen']}_{batch}{cache}{tag}"


def run_model(args, layer_types: str, ceilings: dict) -> list[dict]:
  model = serving_model(args, layer_types)
  cfg = model.config
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  limit = _device_limit()
  if args.cap_bytes:  # the memory model's budget; the allocator is capped too (cap_allocator)
    limit = min(limit, args.cap_bytes) if limit else args.cap_bytes
  batches = list(args.batch)
  max_b = None
  if args.max_batch:
    if not limit:
      raise SystemExit("--max_batch needs a device that reports its memory limit (a GPU)")
    cache_dtype = CACHE_DTYPES[args.cache_dtype]
    fits = lambda b: memory_need(cfg, b, args.prompt, args.gen, weights, limit,
                                 args.cache_copies, cache_dtype) <= limit
    per_row = cache_bytes(cfg, 1, cache_len(args.prompt, args.gen), cache_dtype, metadata=True)
    max_b = find_max_batch(fits, start=max(1, (limit - weights) // (2 * per_row)))
    if max_b < 1:
      raise SystemExit(f"{args.shape} {layer_types}: even batch 1 does not fit in {limit} bytes")
    batches = [b for b in batches if b < max_b] + [max_b]
  label = f"{args.shape} {args.label or layer_types}"
  common = dict(label=label, shape=args.shape, layer_types=cfg.layer_types,
                sliding_window=cfg.sliding_window, weights_bytes=weights,
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                python=platform.python_version(), command=args.command,
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                cap_bytes=args.cap_bytes, **ceilings)
  found, good = [], 0
  for b in batches:
    is_max = b == max_b
    r = None
    for _ in range(4):  # an out-of-memory at the predicted batch: retry 15% smaller
      try:
        first = run_once(model, args, b, ceilings, limit)
        r = first
        for _ in range(args.repeats - 1):  # warm runs: first-execution costs stay in `first`
          r = run_once(model, args, b, ceilings, limit)
        r.update(first_run_prefill_s=first["prefill_s"], first_run_decode_s=first["decode_s"],
                 compile_prefill_s=first["compile_prefill_s"],
                 compile_decode_s=first["compile_decode_s"])
        good = max(good, b)
      except Exception as e:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          raise
      if r is not None:
        break
      gc.collect()  # outside the except block, so the failed run's frames (its cache) are freed
      print(f"  batch {b}: out of memory; retrying at {int(b * 0.85)}", flush=True)
      b = int(b * 0.85)
      if b <= good or b < 1:
        break
    if r is None:
      continue
    if limit:
      r.update(memory_count(cfg, b, args, weights, limit, r["peak_bytes"]))
    r.update(common, max_batch=is_max, predicted_max_batch=max_b if is_max else None)
    found.append(records.entry(setting(r, args.tag), **r))
    print(json.dumps({k: r[k] for k in ("label", "batch", "prompt", "gen", "tokens_per_s",
                                        "decode_tokens_per_s", "prefill_s", "step_ms")}
                     | {k: r.get(k) for k in ("decode_roofline_fraction", "prefill_vs_flops",
                                              "compile_decode_s", "peak_bytes")}), flush=True)
  del model
  return found


def measured_ceilings(smoke: bool = False, path: str | None = None) -> dict:
  """The roofline's ceilings: the best this GPU does now, the decode kernel's own read included;
  read from `path` when it holds those of the same device, else measured (and written there)."""
  device = jax.devices()[0].device_kind
  if path and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("device") == device:
      return {k: v for k, v in saved.items() if k != "device"}
  small = smoke or jax.default_backend() == "cpu"
  extra = {} if small else {"decode_kernel": rl.measure_decode_kernel_bandwidth}
  ceilings = rl.ceilings(small, extra)
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(dict(ceilings, device=device), f, indent=1)
  return ceilings


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="1b", help="configs/<shape>.py")
  p.add_argument("--layer_types", nargs="+", default=["llama", "lckv"])
  p.add_argument("--label", default=None, help="series label (default: the layer_types)")
  p.add_argument("--prompt", type=int, default=512)
  p.add_argument("--gen", type=int, default=1536)
  p.add_argument("--batch", type=int, nargs="*", default=[32])
  p.add_argument("--max_batch", action="store_true", help="also run the largest batch that fits")
  p.add_argument("--prefill_iterations", type=int, default=None, help="default m + b")
  p.add_argument("--sliding_window", type=int, default=None,
                 help="window of the 's' layers (needed by yoco and mixattention)")
  p.add_argument("--tag", default="", help="suffix of each run's setting (see `setting`)")
  p.add_argument("--cache_dtype", choices=tuple(CACHE_DTYPES), default=DEFAULT_CACHE_DTYPE,
                 help="the KV cache's storage: bf16, or int8 / fp8 (e4m3) with a float32 scale "
                      "per token and KV head")
  p.add_argument("--cache_copies", type=int, default=1,
                 help="cache-sized buffers the memory model allows for at the peak (see "
                      "memory_need)")
  p.add_argument("--repeats", type=int, default=1,
                 help="runs per setting; the last is reported (the first pays first-execution "
                      "costs that compile events miss)")
  p.add_argument("--decode_steps", type=int, default=None,
                 help="run only the first N decode steps and project the rest (marked "
                      "projected) by the roofline's growth with the context. The first steps are "
                      "overhead-bound, so few of them overstate the time: 32 of 2043 projected "
                      "1b llama's 5+2043 at 5,805 tok/s against 42,600 measured; time 512 or more")
  p.add_argument("--cap_bytes", type=int, default=None,
                 help="device memory in bytes: caps the GPU allocator (unless "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION is set) and, with --max_batch, the memory "
                      "model the batch is searched on (default: the device's limit)")
  p.add_argument("--ceilings", default=None, metavar="FILE",
                 help="the roofline's ceilings from this JSON file when it exists, else measured "
                      "and written there (runs in a row on one GPU measure them once: the study "
                      "starts 20 such processes)")
  p.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (CI)")
  p.add_argument("--out", default=default_out(),
                 help="folder of the record file (default $OUT, else benchmarks/results)")
  args = p.parse_args(argv)
  args.command = command("benchmarks.throughput", argv)
  if args.smoke:
    args.shape, args.prompt, args.gen, args.batch = "tiny", 8, 4, [2]
  cap_allocator(args.cap_bytes)  # before JAX starts its backend
  ceilings = measured_ceilings(args.smoke, args.ceilings)
  print(f"ceilings: HBM {ceilings['hbm_bytes_per_s'] / 1e12:.2f} TB/s "
        f"({ceilings['hbm_ceiling_source']}; "
        + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in ceilings["hbm_measured_bytes_per_s"].items())
        + f"), bf16 matmul {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"
        + (f"; of the datasheet: {ceilings['hbm_vs_datasheet']:.2f} and "
           f"{ceilings['matmul_vs_datasheet']:.2f}" if "datasheet" in ceilings else ""),
        flush=True)
  path = records.record_path(args.out, "throughput", jax.devices()[0].device_kind)
  for lt in args.layer_types:
    # After every model, so a later failure keeps the earlier ones.
    records.update(path, run_model(args, lt, ceilings))
  return path


if __name__ == "__main__":
  main()
