"""The markdown table of `benchmarks/throughput.py` results, the roofline recomputed at given ceilings.

  python benchmarks/summarize_throughput.py benchmarks/results/throughput_*.json \
      --hbm_tbps 2.85 --matmul_tflops 740

Each run's JSON holds the ceilings measured in its own process; `--hbm_tbps/--matmul_tflops` put
every row on the same ceilings (the first measurement of the session read 2.1-2.4 TB/s: it timed
one pass with its allocation; later ones, 10 passes in place, 2.8-2.9 TB/s).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plot_throughput import load  # noqa: E402
from lckv_jax import roofline as rl  # noqa: E402
from lckv_jax.train.config import model_from_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("model", "P+G", "batch", "device memory", "tok/s", "decode tok/s", "prefill s", "ms/step",
           "roofline ms/step", "measured/roofline", "prefill / FLOP time", "compile s")


def roofline(record: dict, bw: float, rate: float) -> tuple[float, float]:
  """(decode roofline seconds over the G-1 steps, prefill FLOP seconds) of one record."""
  # Records before the field was written name the window in their command only.
  window = record.get("sliding_window") or next(
      (int(m) for m in re.findall(r"--sliding_window[= ](\d+)", record.get("command", ""))), None)
  cfg = model_from_file(os.path.join(ROOT, "configs", f"{record['shape']}.py"),
                        layer_types=record["layer_types"], dtype="bfloat16",
                        param_dtype="bfloat16", max_position_embeddings=record["prompt"]
                        + record["gen"], **({"sliding_window": window} if window else {}))
  b, p, g = record["batch"], record["prompt"], record["gen"]
  decode = sum(rl.decode_roofline_steps(cfg, b, p, g, bw, rate))
  return decode, rl.prefill_flops(cfg, b, p, record["prefill_iterations"]) / rate


def row(r: dict, bw: float, rate: float) -> list[str]:
  decode_roof, prefill_roof = roofline(r, bw, rate)
  steps = max(r["gen"] - 1, 1)
  cap = f"{r['bytes_limit'] / 1e9:.1f} GB" if r.get("bytes_limit") else "-"
  mark = "*" if r.get("max_batch") else ""
  proj = " (proj.)" if r.get("projected") else ""
  return [r["label"], f"{r['prompt']}+{r['gen']}", f"{r['batch']}{mark}", cap,
          f"{r['tokens_per_s']:,.0f}{proj}", f"{r['decode_tokens_per_s']:,.0f}",
          f"{r['prefill_s']:.3f}", f"{r['step_ms']:.2f}", f"{1e3 * decode_roof / steps:.2f}",
          f"{decode_roof / r['decode_s']:.2f}", f"{r['prefill_s'] / prefill_roof:.2f}",
          f"{r.get('compile_prefill_s', 0):.0f} + {r.get('compile_decode_s', 0):.0f}"]


def table(records: list[dict], bw: float, rate: float) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(row(r, bw, rate)) + " |" for r in records]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("paths", nargs="+")
  p.add_argument("--hbm_tbps", type=float, default=2.85)
  p.add_argument("--matmul_tflops", type=float, default=740.0)
  args = p.parse_args(argv)
  print(table(load(args.paths), args.hbm_tbps * 1e12, args.matmul_tflops * 1e12))


if __name__ == "__main__":
  main()
