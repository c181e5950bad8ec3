"""Pictures of a `layer_types` attention graph (matplotlib, imported only when drawing).

    python -m lckv_jax.layer_types show lckv --num_layers 8 --image=lckv.png   # one graph
    python -m lckv_jax.visualize docs/layer_types.png llama lckv cla yoco --num_layers 8

Both command lines live here (`show_main`, `main`): `layer_types` stays pure and never imports
this module.

Layers are nodes from the bottom (layer 0) to the top; an arrow goes from each layer to the layer
whose KV it reads (on the right when it reads upward, a cycle; on the left when it reads a lower
layer); a layer without an arrow reads its own KV. Filled nodes compute and cache KV; dashed
nodes are sliding-window layers (`sw`); a shaded band is a cyclic group of the iteration plan.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

from lckv_jax import cli
from lckv_jax import layer_types as lt_lib

KV_COLOR = "#d95f02"  # nodes that compute and cache KV
READER_COLOR = "#ffffff"  # nodes that read another layer's KV
UP_COLOR = "#7570b3"  # arrows to a layer above (cyclic: iteration plan)
DOWN_COLOR = "#1b9e77"  # arrows to a layer below (plain reuse)
CYCLE_COLOR = "#efedf5"  # background band of a cyclic group


def _matplotlib():
  """The `matplotlib` module, or an ImportError that says how to get it."""
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError("drawing layer_types needs matplotlib, which is not installed: "
                      "pip install matplotlib") from e
  return matplotlib


def _tracks(arrows: Sequence[tuple[int, int]]) -> dict[tuple[int, int], int]:
  """A track (0 = nearest the nodes) per arrow (source, target) so that no two arrows whose
  layer spans meet share a track, and an arrow runs outside every arrow within its span."""
  track = {}
  for a in sorted(arrows, key=lambda a: abs(a[0] - a[1])):
    lo, hi = sorted(a)
    below = [t for b, t in track.items() if min(b) <= hi and max(b) >= lo]
    track[a] = 1 + max(below, default=-1)
  return track


def draw(lt: lt_lib.LayerTypes, ax, title: str | None = None) -> None:
  """Draws the attention graph of `lt` on the matplotlib Axes `ax`."""
  from matplotlib.patches import Circle, FancyArrowPatch, Rectangle
  from matplotlib.path import Path
  n = lt.num_layers
  r, half_width = 0.32, 1.6  # node radius and panel half-width, in layer units
  for seg in lt.plan():
    if seg.cyclic:
      ax.add_patch(Rectangle((-half_width, seg.start - 0.48), 2 * half_width,
                             seg.end - seg.start - 0.04, facecolor=CYCLE_COLOR,
                             edgecolor="none", zorder=0))
  # Reads of a layer above run on the right of the column, reads of a layer below on the left,
  # each as a bracket out of the reader and into the layer whose KV it reads.
  for up in (True, False):
    arrows = [(i, j) for i, j in enumerate(lt.attends_to) if (j > i if up else j < i)]
    tracks = _tracks(arrows)
    step = min(0.16, (half_width - r - 0.25) / max(max(tracks.values(), default=0), 1))
    side = 1.0 if up else -1.0
    for (i, j), t in tracks.items():
      x = side * (r + 0.12 + step * t)
      path = Path([(side * r, i), (x, i), (x, j), (side * r, j)])
      ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=8, lw=0.9,
                                   color=UP_COLOR if up else DOWN_COLOR, zorder=1))
  for i in range(n):
    kv, sw = lt.computes_kv[i], lt.sliding[i]
    ax.add_patch(Circle((0.0, i), r, facecolor=KV_COLOR if kv else READER_COLOR,
                        edgecolor="black", lw=1.0, ls="--" if sw else "-", zorder=2))
    ax.text(0.0, i, str(i), ha="center", va="center", fontsize=7, zorder=3,
            color="white" if kv else "black")
    if sw:
      ax.text(-r - 0.06, i + r, "sw", ha="right", va="bottom", fontsize=6, style="italic")
  kv = len(lt.kv_layers)
  heading = f"{title}\n" if title else ""
  ax.set_title(f"{heading}KV cache: {kv} of {n} layers", fontsize=9)
  ax.set_xlim(-half_width, half_width)
  ax.set_ylim(-0.8, n - 0.2)
  ax.set_aspect("equal")
  ax.axis("off")


def figure(specs: Sequence[str], num_layers: int | None = None,
           titles: Sequence[str] | None = None):
  """A matplotlib Figure with one attention graph per spec (preset name or literal string)."""
  _matplotlib()
  from matplotlib.figure import Figure
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  parsed = [lt_lib.parse_spec(spec, num_layers) for spec in specs]
  # A preset keeps its name; a literal string is wrapped to the panel's width.
  titles = list(titles) if titles is not None else [
      "\n".join(textwrap.wrap(s.replace("_", " "), 22)).replace(" ", "_") for s in specs]
  n = max(lt.num_layers for lt in parsed)
  fig = Figure(figsize=(1.9 * len(parsed) + 0.2, 0.42 * n + 1.9), dpi=120)
  axes = fig.subplots(1, len(parsed), squeeze=False)[0]
  for ax, lt, title in zip(axes, parsed, titles):
    draw(lt, ax, title)
  handles = [Patch(facecolor=KV_COLOR, edgecolor="black", label="computes + caches KV"),
             Patch(facecolor=READER_COLOR, edgecolor="black", label="reads another layer's KV"),
             Line2D([], [], color=UP_COLOR, marker=">", label="reads a layer above (cycle)"),
             Line2D([], [], color=DOWN_COLOR, marker=">", label="reads a layer below"),
             Line2D([], [], ls="none", label="no arrow: reads its own KV")]
  if any(any(lt.sliding) for lt in parsed):
    handles.append(Patch(facecolor="white", edgecolor="black", ls="--", label="sliding window"))
  if any(lt.has_cycle for lt in parsed):
    handles.append(Patch(facecolor=CYCLE_COLOR, label="cyclic group (m + b iterations)"))
  # As many legend columns as the width holds (a label is about 1.9 inches at 7 points), and a
  # bottom margin as tall as the legend's rows, so one narrow graph keeps its whole legend.
  width, height = fig.get_size_inches()
  ncol = max(1, min(3, len(handles), int(width // 1.9)))
  rows = -(-len(handles) // ncol)
  fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
  fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.45 / height,
                      bottom=(0.2 + 0.16 * rows) / height, wspace=0.05)
  return fig


def save(path: str, specs: Sequence[str], num_layers: int | None = None,
         titles: Sequence[str] | None = None) -> None:
  """Writes the attention graphs of `specs` side by side to an image file (`.png`, `.svg`, ...)."""
  figure(specs, num_layers, titles).savefig(path)


PROG = "python -m lckv_jax.visualize"


def show_main(argv: Sequence[str] | None = None) -> None:
  """`python -m lckv_jax.layer_types show LAYER_TYPES [--image=F]`: the text view of the attention
  graph (`layer_types.describe`), and its picture with --image."""
  parser = cli.ArgumentParser(prog=lt_lib.PROG)
  parser.add_argument("command", choices=["show"])
  parser.add_argument("layer_types", help="a layer_types string or preset name")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="layer count, needed for preset names")
  parser.add_argument("--image", default=None,
                      help="also draw the graph to this image file (.png, .svg; needs matplotlib)")
  args = parser.parse_args(argv)
  lt = lt_lib.parse_spec(args.layer_types, args.num_layers)
  print(lt_lib.describe(lt))
  if args.image:
    save(args.image, [args.layer_types], args.num_layers)
    print(f"\nwrote {args.image}")


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(prog=PROG,
                              description="Draw layer_types attention graphs side by side.")
  parser.add_argument("out", help="image file to write (.png, .svg, .pdf)")
  parser.add_argument("layer_types", nargs="+", help="layer_types strings or preset names")
  parser.add_argument("--num_layers", type=int, default=None,
                      help="layer count, needed for preset names")
  args = parser.parse_args(argv)
  # A bad string or a missing matplotlib reaches cli.run: one line, exit 2.
  save(args.out, args.layer_types, args.num_layers)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  cli.run(main, prog=PROG)
