"""Decode throughput against batch size, from the JSON records of a throughput sweep.

Each record has at least `label` (e.g. "1b llama"), `prompt`, `gen`, `batch`, `tokens_per_s`
(end-to-end: prefill + decode), `decode_tokens_per_s` and `max_batch` (true at the largest batch
that fits in memory). A JSON file holds one record or a list of them (a record file of
`benchmarks.throughput`, whose entries `--settings` selects by their setting). The figure of
benchmarks/results/throughput.md, every run under the 24 GB cap at 5+2043 and 512+1024:

  python -m benchmarks.plot_throughput benchmarks/results/throughput_h100_80gb_hbm3.json \
      --settings "_p5_g2043_(b32|max_25.5GB)|_p512_g1024_max_25.5GB" \
      --title "H100 under a 24 GB cap (XLA_PYTHON_CLIENT_MEM_FRACTION=0.30), bf16, random weights" \
      --out benchmarks/results/throughput_24gb.png
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only: no display on benchmark machines

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from benchmarks import records  # noqa: E402

REQUIRED = ("label", "prompt", "gen", "batch", "tokens_per_s", "decode_tokens_per_s")


def _series(records: list[dict]) -> dict[str, dict[tuple, list[dict]]]:
  """{size: {(label, prompt, gen): records sorted by batch}}, size = the label's first word."""
  out: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
  for r in records:
    out[r["label"].split()[0]][(r["label"], r["prompt"], r["gen"])].append(r)
  return {size: {k: sorted(v, key=lambda r: r["batch"]) for k, v in sorted(groups.items())}
          for size, groups in out.items()}


def _draw(ax, groups: dict[tuple, list[dict]], colors) -> None:
  """One colour per series: end-to-end solid, decode-only dashed, a star at the max batch."""
  for (label, prompt, gen), rs in groups.items():
    color = next(colors)
    x = [r["batch"] for r in rs]
    ax.plot(x, [r["tokens_per_s"] for r in rs], "-o", color=color, ms=3,
            label=f"{label} (prompt {prompt} + gen {gen})")
    ax.plot(x, [r["decode_tokens_per_s"] for r in rs], "--o", color=color, ms=3)
    for r in rs:
      if r.get("max_batch", False):
        for key in ("tokens_per_s", "decode_tokens_per_s"):
          ax.plot(r["batch"], r[key], "*", color=color, ms=14, mec="black", mew=0.6)
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(ScalarFormatter())  # 8, 16, 32 rather than 2^3, 2^4, 2^5
  ax.set_ylim(bottom=0)
  ax.set_xlabel("batch (sequences)")
  ax.set_ylabel("throughput (generated tokens/s)")
  ax.grid(True, which="both", alpha=0.3)


def _style_handles() -> list[Line2D]:
  return [Line2D([], [], color="gray", ls="-", label="end-to-end (prefill + decode)"),
          Line2D([], [], color="gray", ls="--", label="decode only"),
          Line2D([], [], color="gray", ls="", marker="*", ms=12, mec="black",
                 label="largest batch that fits")]


def plot(records: list[dict], path: str, title: str | None = None) -> None:
  """Writes a PNG of tokens/s against batch: one subplot per model size (the label's first word)."""
  if not records:
    raise ValueError("plot: no records")
  by_size = _series(records)
  fig, axes = plt.subplots(1, len(by_size), figsize=(6.5 * len(by_size), 4.8), squeeze=False)
  colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
  for ax, (size, groups) in zip(axes[0], by_size.items()):
    _draw(ax, groups, colors)
    ax.set_title(size)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _style_handles(), fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="+", help="JSON files of throughput records")
  parser.add_argument("--out", default="benchmarks/results/throughput.png", help="PNG to write")
  parser.add_argument("--title", default=None)
  parser.add_argument("--settings", default=None,
                      help="regular expression: only entries whose setting it finds (re.search)")
  parser.add_argument("--superseded_max", nargs="*", default=[],
                      help="JSON files whose largest-batch records a later run superseded: only "
                           "their other batches are plotted")
  args = parser.parse_args(argv)
  found = (records.load(args.files, REQUIRED)
           + [r for r in records.load(args.superseded_max, REQUIRED) if not r.get("max_batch")])
  if args.settings:
    found = [r for r in found if re.search(args.settings, r.get("setting", ""))]
  plot(found, args.out, args.title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
