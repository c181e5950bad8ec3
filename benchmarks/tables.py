"""The benchmark tables of README.md and benchmarks/results/*.md, generated from the record files.

Each table sits between `<!-- table:NAME -->` and `<!-- /table -->`; this command rewrites what
lies between the two from the records (`TABLES[NAME]`), so every number in a table is a number
of a record. The rows of a table are the settings listed here; a re-run of a setting changes its
row, a new setting appears once it is added to a list below.

  python -m benchmarks.tables            # rewrite README.md and benchmarks/results/*.md
  python -m benchmarks.tables --check    # exit 1 and print the diff where a file differs

The decode tables of throughput.md recompute each run's roofline (`summarize_throughput`), which
takes seconds per run; README.md's tables read the records alone.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import glob
import os
import re
import sys

from benchmarks import records
from benchmarks.common import ROOT, RESULTS

H100, H200, CPU = "h100_80gb_hbm3", "h200", "cpu"  # device slugs of the records used here
# The ceilings every decode roofline of throughput.md is recomputed at (the H100's measurements
# ranged over 2.68-2.91 TB/s and 629-773 TFLOP/s; see throughput.md).
HBM_BYTES_PER_S, MATMUL_FLOPS_PER_S = 2.85e12, 740e12
MARK = re.compile(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", re.S)


@functools.cache
def _entries(benchmark: str, device: str) -> tuple[dict, ...]:
  ext = "jsonl" if benchmark == "decode_profile" else "json"
  return tuple(records.read(os.path.join(RESULTS, f"{benchmark}_{device}.{ext}")))


def _get(benchmark: str, device: str, setting: str) -> dict:
  return records.find(list(_entries(benchmark, device)), setting)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _n(x: float) -> str:
  return f"{x:,.0f}"


# ---------------------------------------------------------------------------------------------
# Decode throughput (benchmarks.throughput), against the LCKV paper's Table 1.
# ---------------------------------------------------------------------------------------------

# The paper's Table 1 (max batch, tokens/s end to end, llama and lckv) and our runs of each row.
PAPER = (
    dict(row="RTX 3090 24GB, 1.1B, 5+8187", model="1b (TinyLlama)", memory="24 GB cap",
         gpu="RTX 3090", batch=(48, 384), tok_s=(1425, 4113),
         ours=("1b_llama_p5_g8187_max_25.5GB", "1b_lckv_p5_g8187_max_25.5GB")),
    dict(row="RTX 3090 24GB, 1.1B, 5+2043", model="1b (TinyLlama)", memory="24 GB cap",
         gpu="RTX 3090", batch=(239, 1150), tok_s=(5143, 10033),
         ours=("1b_llama_p5_g2043_max_25.5GB", "1b_lckv_p5_g2043_max_25.5GB")),
    dict(row="RTX 3090 24GB, 7B, 512+1024", model="7b", memory="24 GB cap", gpu="RTX 3090",
         batch=(7, 72), tok_s=(174, 402),
         ours=("7b_llama_p512_g1024_max_25.5GB", "7b_lckv_p512_g1024_max_25.5GB")),
    dict(row="A100 80GB, 7B, 2048+2048", model="7b", memory="80 GB", gpu="A100",
         batch=(15, 128), tok_s=(141, 421),
         ours=("7b_llama_p2048_g2048_max_80.8GB", "7b_lckv_p2048_g2048_max_80.8GB")),
    dict(row="A100 80GB, 30B, 2048+2048", model="30b", memory="80 GB", gpu="A100",
         batch=(1, 32), tok_s=(14.1, 108),
         ours=("30b_llama_p2048_g2048_max_80.8GB", "30b_lckv_p2048_g2048_max_80.8GB")),
)
# The rows of throughput.md's table of every run, in its order.
RUNS = (
    "1b_llama_p512_g256_b32", "1b_lckv_p512_g256_b32",
    "1b_llama_p4096_g4096_b32", "1b_lckv_p4096_g4096_b32",
    "1b_llama_p5_g2043_b32", "1b_llama_p5_g2043_max_25.5GB", "1b_lckv_p5_g2043_max_25.5GB",
    "1b_cla_p5_g2043_max_25.5GB", "1b_lckv-10_p5_g2043_max_25.5GB",
    "1b_yoco_p5_g2043_max_25.5GB",
    "1b_llama_p5_g8187_max_25.5GB", "1b_lckv_p5_g8187_max_25.5GB",
    "1b_llama_p5_g2043_max_80.8GB", "1b_lckv_p5_g2043_max_80.8GB",
    "7b_llama_p512_g1024_max_25.5GB", "7b_lckv_p512_g1024_max_25.5GB",
    "7b_llama_p2048_g2048_max_80.8GB", "7b_lckv_p2048_g2048_max_80.8GB",
    "30b_llama_p2048_g2048_max_80.8GB", "30b_lckv_p2048_g2048_max_80.8GB",
)
# The settings of throughput.md's table of ratios: (name, llama at max batch, lckv at max batch).
RATIOS = (
    ("1b, 24 GB, 5+2043", "1b_llama_p5_g2043_max_25.5GB", "1b_lckv_p5_g2043_max_25.5GB"),
    ("1b, 24 GB, 5+8187", "1b_llama_p5_g8187_max_25.5GB", "1b_lckv_p5_g8187_max_25.5GB"),
    ("1b, 80 GB, 5+2043", "1b_llama_p5_g2043_max_80.8GB", "1b_lckv_p5_g2043_max_80.8GB"),
    ("7b, 24 GB, 512+1024", "7b_llama_p512_g1024_max_25.5GB", "7b_lckv_p512_g1024_max_25.5GB"),
    ("7b, 80 GB, 2048+2048", "7b_llama_p2048_g2048_max_80.8GB",
     "7b_lckv_p2048_g2048_max_80.8GB"),
    ("30b, 80 GB, 2048+2048", "30b_llama_p2048_g2048_max_80.8GB",
     "30b_lckv_p2048_g2048_max_80.8GB"),
)


def _paper_number(x: float) -> str:
  return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def _ours(row: dict, device: str = H100) -> tuple[dict, dict]:
  return tuple(_get("throughput", device, s) for s in row["ours"])


def throughput_max_batch(device: str = H100) -> str:
  """README.md: each Table-1 row of the paper at our max batch, with the paper's lckv tok/s."""
  rows = []
  for row in PAPER:
    llama, lckv = _ours(row, device)
    ratio = lckv["tokens_per_s"] / llama["tokens_per_s"]
    rows.append([row["model"], f"{llama['prompt']}+{llama['gen']}", row["memory"],
                 f"{llama['batch']:,}, {_n(llama['tokens_per_s'])}",
                 f"{lckv['batch']:,}, {_n(lckv['tokens_per_s'])} ({ratio:.2f}x)",
                 f"{_paper_number(row['tok_s'][1])} ({row['gpu']})"])
  return _markdown(["model", "P+G", "memory", "llama: max batch, tok/s",
                    "lckv: max batch, tok/s (lckv/llama)", "paper (lckv tok/s)"], rows)


def throughput_paper(device: str = H100) -> str:
  """throughput.md: the paper's Table 1 beside our runs of each row."""
  rows = []
  for row in PAPER:
    llama, lckv = _ours(row, device)
    (pb0, pb1), (pt0, pt1) = row["batch"], row["tok_s"]
    proj = ", proj." if llama.get("projected") or lckv.get("projected") else ""
    rows.append([
        row["row"],
        f"{pb0:,} -> {pb1:,}; {_paper_number(pt0)} -> {_paper_number(pt1)} ({pt1 / pt0:.1f}x)",
        f"{llama['batch']:,} -> {lckv['batch']:,}; {_n(llama['tokens_per_s'])} -> "
        f"{_n(lckv['tokens_per_s'])} ({lckv['tokens_per_s'] / llama['tokens_per_s']:.2f}x{proj})",
        f"{lckv['tokens_per_s'] / pt1:.1f}x"])
  return _markdown(["paper row", "paper: batch, tok/s llama -> lckv",
                    f"here ({'H100' if device == H100 else 'H200'}, same memory): batch, tok/s "
                    "llama -> lckv",
                    "lckv here / paper"], rows)


# The quantized cache at max batch (issue 17: capacity 1.9x, tokens/s 1.7x the bf16 cache's).
QUANT = (("1b, 24 GB, 5+2043", "1b_{}_p5_g2043_max_25.5GB"),
         ("7b, 24 GB, 512+1024", "7b_{}_p512_g1024_max_25.5GB"))


def throughput_quant_h200() -> str:
  """README.md: max batch and tokens/s of the bf16, int8 and fp8 caches, and their ratios."""
  rows, entries = [], {e["setting"]: e for e in _entries("throughput", H200)}
  for name, pattern in QUANT:
    for lt in ("llama", "lckv"):
      base = entries[pattern.format(lt)]
      for dtype in ("int8", "fp8"):
        r = entries.get(f"{pattern.format(lt)}_{dtype}")
        if r is None:
          continue
        # A run whose record says why it cannot be trusted (`suspect`) is marked, not dropped.
        mark = " (suspect)" if r.get("suspect") else ""
        rows.append([name, lt, dtype + mark, f"{base['batch']:,} -> {r['batch']:,}",
                     f"{r['batch'] / base['batch']:.2f}x",
                     f"{_n(base['tokens_per_s'])} -> {_n(r['tokens_per_s'])}",
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                     f"{base['step_ms']:.1f} -> {r['step_ms']:.1f}"])
  return _markdown(["setting", "model", "cache", "max batch bf16 -> quantized", "capacity",
                    "tok/s bf16 -> quantized", "tok/s ratio", "ms/step"], rows)


def throughput_runs() -> str:
  """throughput.md: every run of `RUNS`, rooflines at the common ceilings."""
  from benchmarks import summarize_throughput
  return summarize_throughput.table([_get("throughput", H100, s) for s in RUNS],
                                    HBM_BYTES_PER_S, MATMUL_FLOPS_PER_S)


def throughput_ratios() -> str:
  """throughput.md: lckv against llama at their max batches, against what the rooflines allow."""
  from benchmarks.summarize_throughput import roofline
  rows = []
  for name, a, b in RATIOS:
    llama, lckv = _get("throughput", H100, a), _get("throughput", H100, b)
    roof_a = roofline(llama, HBM_BYTES_PER_S, MATMUL_FLOPS_PER_S)[0]
    roof_b = roofline(lckv, HBM_BYTES_PER_S, MATMUL_FLOPS_PER_S)[0]
    capacity = lckv["batch"] / llama["batch"]
    cache = (llama["cache_bytes"] / llama["batch"]) / (lckv["cache_bytes"] / lckv["batch"])
    decode = lckv["decode_tokens_per_s"] / llama["decode_tokens_per_s"]
    end_to_end = lckv["tokens_per_s"] / llama["tokens_per_s"]
    bound = (lckv["batch"] / roof_b) / (llama["batch"] / roof_a)  # roofline tok/s, same G
    rule = 1 + llama["weights_bytes"] / llama["cache_bytes"]
    rows.append([name, f"{llama['batch']} -> {lckv['batch']}", f"{capacity:.2f}",
                 f"{cache:.2f}", f"{capacity / cache:.2f}", f"{decode:.2f}x",
                 f"{end_to_end:.2f}x", f"{bound:.2f}", f"{decode / bound:.2f}",
                 f"{end_to_end / bound:.2f}", f"{rule:.2f}"])
  return _markdown(["setting", "max batch llama -> lckv", "capacity ratio", "cache-size ratio",
                    "capacity / cache ratio", "decode ratio", "end-to-end ratio", "bound",
                    "decode / bound", "end-to-end / bound", "issue's rule"], rows)


# ---------------------------------------------------------------------------------------------
# What binds a decode step (benchmarks.decode_profile), prefill iterations.
# ---------------------------------------------------------------------------------------------

DECODE_PROFILE = (  # (what the run is, its setting)
    ("llama, XLA attention (the old default at 768 slots)", "1b_llama_b32_p512_g256_default"),
    ("same, command buffers off (`--xla_gpu_enable_command_buffer=`)",
     "1b_llama_b32_p512_g256_no_graphs"),
    ("llama, Pallas decode kernel (the default now)", "1b_llama_b32_p512_g256_pallas768"),
    ("llama, Pallas decode kernel, cuBLAS GEMMs (`--xla_gpu_enable_triton_gemm=false`)",
     "1b_llama_b32_p512_g256_cublas"),
    ("lckv, Pallas decode kernel", "1b_lckv_b32_p512_g256_pallas768"),
)


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n < 1e7 else f"{n / 1e6:.0f} MB"


def decode_profile() -> str:
  """throughput.md: wall and kernel time per token, kernels per token, the loop's temporaries."""
  rows = []
  for what, setting in DECODE_PROFILE:
    r = _get("decode_profile", H100, setting)
    walls = sorted(r["wall_ms_per_token"])  # the timed runs before and after the profiled one
    lo, hi = f"{walls[0]:.2f}", f"{walls[-1]:.2f}"
    rows.append([what, lo if lo == hi else f"{lo}-{hi}", f"{r['kernel_ms_per_token']:.2f}",
                 f"{r['kernels_per_token']:.0f}", _mb(r["decode_temp_bytes"]),
                 _mb(r["cache_bytes"])])
  return _markdown(["run", "wall ms/token", "kernel ms/token", "kernels/token",
                    "decode loop's temporaries", "cache"], rows)


def prefill_iterations_1b() -> str:
  """throughput.md: prefill time of the 1b shape against the iterations k."""
  t = _get("prefill_iterations", H100, "1b")["timing_shape"]
  default = t["forward_passes"] + t["backward_passes"]
  ks = [f"{r['k']} (m+b, default)" if r["k"] == default else str(r["k"]) for r in t["results"]]
  return _markdown(["k", *ks], [["prefill ms", *(f"{r['prefill_ms']:.0f}" for r in t["results"])]])


def _quality_table(tag: str) -> str:
  """The quality table the run printed (its `table_markdown`, up to the first blank line)."""
  return _get("prefill_iterations", CPU, tag)["table_markdown"].split("\n\n")[0]


def _kv_quant(tag: str, which: str = "table_markdown") -> str:
  """kv_quant_cpu.md: a quantized cache's quality table as the run printed it."""
  return _get("kv_quant", CPU, tag)[which]


# ---------------------------------------------------------------------------------------------
# Training speed (benchmarks.train_speed, train.py) and decode speed (benchmarks.decode_speed).
# ---------------------------------------------------------------------------------------------

PACKED = (  # (layer_types, attention, setting)
    ("llama, 16 documents per row", "cudnn", "1b_llama_b8_s2048_dots_cudnn_docs16"),
    ("lckv (m=7, b=2), 16 documents per row", "cudnn", "1b_lckv_b8_s2048_dots_cudnn_docs16"),
)
TRAIN_SPEED = (
    ("llama", "dense", "1b_llama_b8_s2048_full_dense"),
    ("lckv (m=7, b=2)", "dense", "1b_lckv_b8_s2048_full_dense"),
    ("llama", "cudnn", "1b_llama_b8_s2048_dots_cudnn"),
    ("lckv (m=7, b=2)", "cudnn", "1b_lckv_b8_s2048_dots_cudnn"),
    *PACKED,
)


def _train_speed(device: str, rows_of: tuple) -> str:
  rows = []
  for lt, attention, setting in rows_of:
    r = _get("train_speed", device, setting)
    rows.append([lt, attention, r["remat"], f"{r['step_s']:.2f}", _n(r["tokens_per_s"]),
                 f"{r['tflops']:.0f}", f"{100 * r['mfu']:.1f}%", f"{r['compile_s']:.1f}"])
  return _markdown(["layer_types", "attention", "remat", "step (s)", "tokens/s", "TFLOP/s", "MFU",
                    "compile (s)"], rows)


TRAIN_PY = (  # (layer_types, m and b, attention, setting)
    ("llama", "—", "dense mask (packed documents)", "1b_llama_dense"),
    ("lckv `0_20_..._20_21`", "7, 2", "dense mask (packed documents)", "1b_lckv_dense"),
    ("llama", "—", "cuDNN (`--config.document_mask=False`)", "1b_llama_cudnn"),
    ("lckv `0_20_..._20_21`", "7, 2", "cuDNN (`--config.document_mask=False`)", "1b_lckv_cudnn"),
)


def train_py() -> str:
  """train_py.md: the last logged step of each train.py run."""
  rows = []
  for lt, mb, attention, setting in TRAIN_PY:
    r = _get("train_py", H100, setting)
    last = r["metrics"][-1]
    remat = re.findall(r"--config\.model\.remat=(\w+)", r["command"])[-1]
    rows.append([lt, mb, attention, remat, _n(last["tokens_per_s"]), f"{100 * last['mfu']:.1f}%"])
  return _markdown(["layer_types", "m, b", "attention", "remat", "tokens/s (last logged step)",
                    "MFU (of 989 TFLOP/s; FLOPs count 3b+m passes in the cyclic group)"], rows)


# (layer_types, B, version, setting, setting whose prefill the row's end-to-end number uses)
DECODE_SPEED = (
    ("llama", 32, "scanned", "1b_llama_b32_p512_g256_scanned", None),
    ("llama", 32, "unrolled, stacked weights", "1b_llama_b32_p512_g256_unrolled_stacked",
     "1b_llama_b32_p512_g256_scanned"),
    ("llama", 32, "scan_layers=False", "1b_llama_b32_p512_g256_scan_layers_false", None),
    ("llama", 32, "stacked weights, Pallas decode kernel", "1b_llama_b32_p512_g256_pallas", None),
    ("llama", 32, "same, `--xla_gpu_enable_dynamic_slice_fusion=true`",
     "1b_llama_b32_p512_g256_pallas_dsf", None),
    ("llama", 32, "per-layer weights (`--no_scan`), Pallas decode kernel",
     "1b_llama_b32_p512_g256_unrolled_pallas", None),
    ("lckv", 32, "scanned", "1b_lckv_b32_p512_g256_scanned", None),
    ("lckv", 32, "unrolled, stacked weights", "1b_lckv_b32_p512_g256_unrolled_stacked",
     "1b_lckv_b32_p512_g256_scanned"),
    ("lckv", 32, "scan_layers=False", "1b_lckv_b32_p512_g256_scan_layers_false", None),
    ("lckv", 32, "stacked weights, Pallas decode kernel", "1b_lckv_b32_p512_g256_pallas", None),
    ("llama", 128, "scanned", "1b_llama_b128_p512_g256_scanned", None),
    ("llama", 128, "unrolled, stacked weights", "1b_llama_b128_p512_g256_unrolled_stacked",
     "1b_llama_b128_p512_g256_scanned"),
    ("lckv", 128, "scanned", "1b_lckv_b128_p512_g256_scanned", None),
    ("lckv", 128, "unrolled, stacked weights", "1b_lckv_b128_p512_g256_unrolled_stacked",
     "1b_lckv_b128_p512_g256_scanned"),
)


def decode_speed() -> str:
  """decode_speed.md: every version of the decode step; a `*` row's end-to-end number adds its
  decode time to the prefill time of another run, in parentheses (see decode_speed.md)."""
  rows = []
  for lt, b, version, setting, prefill_of in DECODE_SPEED:
    r = _get("decode_speed", H100, setting)
    if prefill_of:
      prefill_s = _get("decode_speed", H100, prefill_of)["prefill_s"]
      prefill = f"({prefill_s:.3f})"
      end_to_end = f"{_n(r['batch'] * r['gen'] / (prefill_s + r['decode_s']))} *"
    else:
      prefill, end_to_end = f"{r['prefill_s']:.3f}", _n(r["tokens_per_s"])
    rows.append([lt, str(b), version, prefill, f"{r['step_ms']:.2f}",
                 _n(r["decode_tokens_per_s"]), end_to_end])
  return _markdown(["layer_types", "B", "version", "prefill (s)", "ms / token", "decode tok/s",
                    "end-to-end tok/s"], rows)


# ---------------------------------------------------------------------------------------------
# The cross-layer sharing study (study.py) on the H200.
# ---------------------------------------------------------------------------------------------

STUDY_H200 = os.path.join(RESULTS, "study_h200", "study.json")
# The methods the study's grid generalises, as the NAACL paper names them.
STUDY_ALIASES = {"lasagna-bottom:6": "CLA", "pizza-bottom:6": "YOCO w/o SWA",
                 "sandwich-top:3": "LCKV, 2 warm-up, m=7", "lckv:4": "LCKV, 4 warm-up",
                 "lckv:0": "LCKV, no warm-up", "lckv:2 m=2": "LCKV, m=2", "lckv:2 m=4": "LCKV, m=4"}
# Training time relative to the standard transformer, the authors' 110M runs (issue 15).
STUDY_AUTHORS_COST = (("bottom targets", ("pizza-bottom", "sandwich-bottom", "lasagna-bottom"),
                       "0.94-0.97x"),
                      ("middle (pizza, sandwich)", ("pizza-middle", "sandwich-middle"),
                       "1.68-1.70x"),
                      ("top (pizza, sandwich)", ("pizza-top", "sandwich-top"), "2.16-2.20x"),
                      ("lasagna-middle", ("lasagna-middle",), "2.93x"),
                      ("lasagna-top", ("lasagna-top",), "3.08x"))


@functools.cache
def _study() -> tuple[dict[str, dict], float]:
  """The H200 study's records and the standard model's training tokens/s, which costs divide."""
  from lckv_jax.train import study
  recs = study.read_records(STUDY_H200)
  return recs, study.baseline_tokens_per_s(list(recs.values()))


def study_h200() -> str:
  """README.md: every configuration of the H200 study; cost = the standard model's training
  tokens/s over this one's, each timed alone (`benchmarks.train_speed`)."""
  from lckv_jax.train import study
  recs, base = _study()
  rows = []
  for name, r in recs.items():
    alias = STUDY_ALIASES.get(name)
    ppl = f"{r['eval_ppl']:.2f}"
    if r.get("eval_ppl_sequential") is not None:
      ppl += f" ({r['eval_ppl_sequential']:.2f})"
    acc = next(iter(r.get("tasks", {}).values()), {}).get("acc")
    decode = [r.get(f"decode_{p}+{g}") for p, g in study.DECODE_SETTINGS]
    rows.append([name + (f" ({alias})" if alias else ""), str(r["kv_layers"]), ppl,
                 "–" if acc is None else f"{acc:.3f}",
                 f"{base / r['train_speed_tokens_per_s']:.2f}x",
                 *[f"{_n(d['tokens_per_s'])} ({d['batch']})" if d else "–" for d in decode],
                 f"{1000 * r['prefill_latency_s']:.0f}"])
  return _markdown(["configuration", "KV layers", "held-out ppl (exact)", "MC acc (200)",
                    "train cost", *[f"decode {p}+{g} tok/s (batch)"
                                    for p, g in study.DECODE_SETTINGS], "prefill (ms)"], rows)


def study_h200_cost() -> str:
  """README.md: the study's training cost per target against the authors' 110M numbers."""
  recs, base = _study()

  def span(prefixes, reduction):
    costs = [base / r["train_speed_tokens_per_s"] for name, r in recs.items()
             if r["group"] == reduction and name.split(":")[0] in prefixes]
    if not costs:
      return "–"
    return (f"{min(costs):.2f}x" if max(costs) - min(costs) < 0.005
            else f"{min(costs):.2f}-{max(costs):.2f}x")
  rows = [[what, theirs, span(prefixes, "2x"), span(prefixes, "4x")]
          for what, prefixes, theirs in STUDY_AUTHORS_COST]
  return _markdown(["target", "authors (110M)", "ours at 2x (6 KV layers)",
                    "ours at 4x (3 KV layers)"], rows)


# ---------------------------------------------------------------------------------------------
# Serving (benchmarks.serve_load) on the H200, against the offline max batch of the same memory.
# ---------------------------------------------------------------------------------------------

# The load runs, in the table's order, each with the offline setting (benchmarks.throughput,
# P=G=512: the load's longest prompt and output, the same slots per row) it is held against;
# the decode-heavy mix (prompts 32-256, outputs 256-1024) has no offline setting of its own.
DECODE_MIX = " prompt 32-256 output 256-1024"
SERVE_LOAD = (("7b llama 25507659776", "7b_llama_p512_g512_max_25.5GB"),
              ("7b lckv 25507659776", "7b_lckv_p512_g512_max_25.5GB"),
              ("7b lckv 25507659776 steps 16", "7b_lckv_p512_g512_max_25.5GB"),
              ("1b llama 25507659776", "1b_llama_p512_g512_max_25.5GB"),
              ("1b llama 25507659776 steps 16", "1b_llama_p512_g512_max_25.5GB"),
              ("1b lckv 25507659776", "1b_lckv_p512_g512_max_25.5GB"),
              ("1b lckv 25507659776 steps 16", "1b_lckv_p512_g512_max_25.5GB"),
              ("7b llama 25507659776" + DECODE_MIX, None),
              ("7b lckv 25507659776" + DECODE_MIX, None),
              ("7b lckv 25507659776 int8" + DECODE_MIX, None))


def serve_load_h200() -> str:
  """serve_load.md: the load runs on the H200 that exist, against the offline max batch."""
  from benchmarks import serve_load
  entries = {e["setting"]: e for e in _entries("serve_load", H200)}
  offline = {e["setting"]: e["tokens_per_s"] for e in _entries("throughput", H200)}
  runs = [entries[s] for s, _ in SERVE_LOAD if s in entries]
  return serve_load.markdown(runs, {s: offline[o] for s, o in SERVE_LOAD if o in offline})


TABLES = {
    "throughput_paper": throughput_paper,
    "throughput_max_batch_h200": functools.partial(throughput_max_batch, H200),
    "throughput_paper_h200": functools.partial(throughput_paper, H200),
    "throughput_quant_h200": throughput_quant_h200,
    "throughput_runs": throughput_runs,
    "throughput_ratios": throughput_ratios,
    "decode_profile": decode_profile,
    "prefill_iterations_1b": prefill_iterations_1b,
    "prefill_iterations_tiny": functools.partial(_quality_table, "tiny"),
    "prefill_iterations_tiny300": functools.partial(_quality_table, "tiny300"),
    "kv_quant_tiny": functools.partial(_kv_quant, "tiny"),
    "kv_quant_tiny_sink": functools.partial(_kv_quant, "tiny", "sink_table_markdown"),
    "kv_quant_tiny_bf16": functools.partial(_kv_quant, "tiny_bf16"),
    "kv_quant_tiny_bf16_sink": functools.partial(_kv_quant, "tiny_bf16", "sink_table_markdown"),
    "train_speed": functools.partial(_train_speed, H100, TRAIN_SPEED),
    "train_speed_h200": functools.partial(_train_speed, H200, TRAIN_SPEED),
    "train_py": train_py,
    "decode_speed": decode_speed,
    "study_h200": study_h200,
    "study_h200_cost": study_h200_cost,
    "serve_load_h200": serve_load_h200,
}
DOCS = ("README.md", *sorted(os.path.relpath(p, ROOT)
                             for p in glob.glob(os.path.join(RESULTS, "*.md"))))


# ---------------------------------------------------------------------------------------------
# Filling the marked blocks.
# ---------------------------------------------------------------------------------------------


def names(text: str) -> list[str]:
  """The tables marked in `text`, in order."""
  return MARK.findall(text)


@functools.cache
def table(name: str) -> str:
  if name not in TABLES:
    raise KeyError(f"no table {name!r} (<!-- table:{name} -->); there are: {', '.join(TABLES)}")
  return TABLES[name]()


def fill(text: str) -> str:
  """`text` with every marked block holding its table, generated from the records."""
  return MARK.sub(lambda m: f"<!-- table:{m[1]} -->\n\n{table(m[1])}\n\n<!-- /table -->", text)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("files", nargs="*", help=f"markdown files (default: {', '.join(DOCS)}), "
                 "relative to the repository root")
  p.add_argument("--check", action="store_true",
                 help="write nothing; exit 1 and print a diff if a file's tables differ")
  args = p.parse_args(argv)
  differ = []
  for name in args.files or DOCS:
    path = os.path.join(ROOT, name)
    with open(path) as f:
      text = f.read()
    new = fill(text)
    if new == text:
      continue
    differ.append(name)
    if args.check:
      sys.stdout.writelines(difflib.unified_diff(
          text.splitlines(keepends=True), new.splitlines(keepends=True), f"{name} (as written)",
          f"{name} (from the records)"))
    else:
      with open(path, "w") as f:
        f.write(new)
      print(f"rewrote the tables of {name}")
  if args.check and differ:
    print(f"\n{', '.join(differ)}: tables differ from the records; "
          "`python -m benchmarks.tables` rewrites them", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
