"""A picture of a training run: `<workdir>/metrics.jsonl` as loss, learning rate, gradient norm
and throughput against the step (matplotlib, imported only when drawing).

    python -m lckv_jax.metrics_plot /tmp/lckv-tiny            # writes /tmp/lckv-tiny/metrics.png
    python -m lckv_jax.metrics_plot /tmp/a /tmp/b --out=ab.png  # two runs on the same axes

`train.py` draws it when a run ends; this command draws it at any time, also while a run goes on.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from lckv_jax import cli

# (panel title, [(metrics.jsonl key, legend suffix, line style)], log scale)
PANELS = (
    ("loss", [("loss", "train", "-"), ("eval_loss", "held-out", "o--")], False),
    ("learning rate", [("lr", "", "-")], False),
    ("gradient norm", [("grad_norm", "", "-")], True),
    ("tokens / s", [("tokens_per_s", "", "-")], False),
)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (a torn last line, from a killed run, is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}: is it a train.py --workdir?")
  rows = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{path}, line {i + 1}: not JSON: {line[:80]!r}") from None
  if not rows:
    raise ValueError(f"{path} has no rows yet (the first is written after log_every steps)")
  return rows


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
  pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def figure(runs: dict[str, Sequence[dict]]):
  """A matplotlib Figure with one panel per entry of PANELS; `runs` maps a label to its rows."""
  try:
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError("plotting metrics needs matplotlib: pip install matplotlib") from e
  fig = Figure(figsize=(10, 6.5), dpi=110, layout="constrained")
  axes = fig.subplots(2, 2).ravel()
  colors = [f"C{i}" for i in range(10)]
  for ax, (title, series, log) in zip(axes, PANELS):
    drawn = False
    for (label, rows), color in zip(runs.items(), colors * len(runs)):
      for key, suffix, style in series:
        x, y = _series(rows, key)
        if not x:
          continue
        name = " ".join(s for s in (label if len(runs) > 1 else "", suffix) if s)
        ax.plot(x, y, style, color=color, label=name or None, markersize=4,
                alpha=1.0 if key.startswith("eval") or len(series) == 1 else 0.7)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if log and drawn:
      ax.set_yscale("log")
    if not drawn:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
              color="gray")
    elif ax.get_legend_handles_labels()[1]:
      ax.legend(fontsize=8)
  return fig


def save(workdirs: Sequence[str], out: str | None = None) -> str:
  """Draws the runs in `workdirs` to `out` (default `<first workdir>/metrics.png`); returns it."""
  runs = {os.path.basename(os.path.normpath(w)) or w: read_metrics(w) for w in workdirs}
  if len(runs) != len(workdirs):  # two workdirs with one base name: use the full paths
    runs = {w: read_metrics(w) for w in workdirs}
  out = out or os.path.join(workdirs[0], "metrics.png")
  figure(runs).savefig(out)
  return out


PROG = "python -m lckv_jax.metrics_plot"


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog=PROG, description="Plot the metrics.jsonl of training runs.")
  parser.add_argument("workdirs", nargs="+", help="train.py --workdir folders")
  parser.add_argument("--out", default=None,
                      help="image file (.png, .svg, .pdf); default <first workdir>/metrics.png")
  args = parser.parse_args(argv)
  print(f"wrote {save(args.workdirs, args.out)}")


if __name__ == "__main__":
  cli.run(main, prog=PROG)
