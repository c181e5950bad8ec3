"""The markdown table of `benchmarks.throughput` runs, the roofline recomputed at given ceilings.

  python -m benchmarks.summarize_throughput benchmarks/results/throughput_h100_80gb_hbm3.json \
      --hbm_tbps 2.85 --matmul_tflops 740

Each run's JSON holds the ceilings measured in its own process; `--hbm_tbps/--matmul_tflops` put
every row on the same ceilings (the first measurement of the session read 2.1-2.4 TB/s: it timed
one pass with its allocation; later ones, 10 passes in place, 2.8-2.9 TB/s).
"""

from __future__ import annotations

import argparse
import re

from benchmarks import records
from benchmarks.common import config_path
from lckv_jax import roofline as rl
from lckv_jax.config import model_from_file

COLUMNS = ("model", "P+G", "batch", "device memory", "tok/s", "decode tok/s", "prefill s",
           "ms/step", "roofline ms/step", "measured/roofline", "prefill / FLOP time", "compile s")
REQUIRED = ("label", "shape", "layer_types", "prompt", "gen", "batch", "prefill_iterations",
            "tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "step_ms")


def roofline(record: dict, bw: float, rate: float) -> tuple[float, float]:
  """(decode roofline seconds over the G-1 steps, prefill FLOP seconds) of one record."""
  # Records before the field was written name the window in their command only.
  window = record.get("sliding_window") or next(
      (int(m) for m in re.findall(r"--sliding_window[= ](\d+)", record.get("command", ""))), None)
  key = tuple(record[k] for k in ("shape", "layer_types", "batch", "prompt", "gen",
                                  "prefill_iterations")) + (window, bw, rate)
  if key not in _ROOFLINES:  # a sum over every decode step in Python: seconds per run
    _ROOFLINES[key] = _roofline(record, window, bw, rate)
  return _ROOFLINES[key]


_ROOFLINES: dict[tuple, tuple[float, float]] = {}  # benchmarks.tables asks twice for some runs


def _roofline(record: dict, window: int | None, bw: float, rate: float) -> tuple[float, float]:
  cfg = model_from_file(config_path(record["shape"]), layer_types=record["layer_types"],
                        dtype="bfloat16", param_dtype="bfloat16",
                        max_position_embeddings=record["prompt"] + record["gen"],
                        **({"sliding_window": window} if window else {}))
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
  p.add_argument("paths", nargs="+", help="record files of benchmarks.throughput")
  p.add_argument("--settings", default=None,
                 help="regular expression: only entries whose setting it finds (re.search)")
  p.add_argument("--hbm_tbps", type=float, default=2.85)
  p.add_argument("--matmul_tflops", type=float, default=740.0)
  args = p.parse_args(argv)
  found = records.load(args.paths, REQUIRED)
  if args.settings:
    found = [r for r in found if re.search(args.settings, r.get("setting", ""))]
  print(table(found, args.hbm_tbps * 1e12, args.matmul_tflops * 1e12))


if __name__ == "__main__":
  main()
