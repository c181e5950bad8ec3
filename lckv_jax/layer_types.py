"""`layer_types`: which layer's KV each layer attends to, and the iteration plan it implies.

Pure Python (no JAX), so configs, converters and the CLI can reason about a model without building
it. See `docs/spec.md` §2 and §4.

A `layer_types` string has one token per layer, joined by `_`: token i is `<j>` or `<j>s`, meaning
layer i attends to the KV of layer j, with a sliding window when suffixed by `s`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

_TOKEN = re.compile(r"^(\d+)(s?)$")
PROG = "python -m lckv_jax.layer_types"


def kv_bytes_per_key(num_kv_heads: int, head_dim: int, bytes_per_elem: int,
                     bytes_per_scale: int = 0) -> int:
  """Bytes of the K and V of one token in one KV-computing layer (docs/spec.md §8).

  The one count of KV-cache bytes: per token (`LayerTypes.kv_bytes_per_token`), per cache
  (`cache.cache_bytes`, `cache.sink_cache_bytes`) and per decode step (`roofline`) multiply it.
  `bytes_per_scale`: a quantized cache's scale of each K and V vector (one per KV head,
  `lckv_jax.quant`); 0 for a float cache.
  """
  return 2 * num_kv_heads * (head_dim * bytes_per_elem + bytes_per_scale)


@dataclasses.dataclass(frozen=True)
class Segment:
  """A run of consecutive layers `[start, end)` in the iteration plan.

  A plain segment runs once. A cyclic segment contains a layer that attends to a layer above it; it
  runs `forward_passes` times without gradients, then `backward_passes` times with gradients.
  """
  start: int
  end: int
  cyclic: bool

  @property
  def layers(self) -> range:
    return range(self.start, self.end)


@dataclasses.dataclass(frozen=True)
class LayerTypes:
  """A parsed `layer_types` string and everything derived from it."""
  attends_to: tuple[int, ...]
  sliding: tuple[bool, ...]
  force_nodiag: bool = False

  @property
  def num_layers(self) -> int:
    return len(self.attends_to)

  @functools.cached_property
  def computes_kv(self) -> tuple[bool, ...]:
    """Layer i computes (and owns) KV iff some layer attends to it."""
    targets = set(self.attends_to)
    return tuple(i in targets for i in range(self.num_layers))

  @property
  def kv_layers(self) -> tuple[int, ...]:
    """Indices of the KV-computing layers: the only ones with K/V weights and a cache."""
    return tuple(i for i, c in enumerate(self.computes_kv) if c)

  @property
  def attends_top(self) -> tuple[bool, ...]:
    """Layer i reads KV from a layer that runs after it for the same token (a cycle)."""
    return tuple(j > i for i, j in enumerate(self.attends_to))

  @property
  def diag_masked(self) -> tuple[bool, ...]:
    """Layer i never sees its own position's key: it attends upward, or `force_nodiag` is set."""
    return tuple(top or self.force_nodiag for top in self.attends_top)

  @property
  def has_cycle(self) -> bool:
    return any(self.attends_top)

  def __str__(self) -> str:
    return "_".join(f"{j}{'s' if s else ''}" for j, s in zip(self.attends_to, self.sliding))

  def plan(self) -> tuple[Segment, ...]:
    """Consecutive segments covering all layers (docs/spec.md §4).

    A layer that attends upward opens a cyclic group reaching to the highest layer attended from
    inside the group (extended while any member attends higher); everything else is plain.
    """
    segments, i, plain_start, n = [], 0, 0, self.num_layers
    while i < n:
      if self.attends_to[i] <= i:
        i += 1
        continue
      if plain_start < i:
        segments.append(Segment(plain_start, i, cyclic=False))
      end = self.attends_to[i] + 1
      j = i
      while j < end:
        end = max(end, self.attends_to[j] + 1)
        j += 1
      segments.append(Segment(i, end, cyclic=True))
      i = plain_start = end
    if plain_start < n:
      segments.append(Segment(plain_start, n, cyclic=False))
    return tuple(segments)

  def kv_bytes_per_token(self, num_kv_heads: int, head_dim: int, bytes_per_elem: int,
                         bytes_per_scale: int = 0) -> int:
    """Bytes of KV cache that one token occupies (docs/spec.md §8)."""
    return len(self.kv_layers) * kv_bytes_per_key(num_kv_heads, head_dim, bytes_per_elem,
                                                  bytes_per_scale)


def parse(layer_types: str, num_layers: int | None = None, *, force_nodiag: bool = False
          ) -> LayerTypes:
  """Parses a `layer_types` string such as `0_20_20_..._20_21` or `0s_1s_2_...`.

  Raises:
    ValueError: naming the bad token and its position, or the layer count mismatch.
  """
  if not isinstance(layer_types, str) or not layer_types:
    raise ValueError(f"layer_types must be a non-empty string like '0_1_2_3', got {layer_types!r}")
  tokens = layer_types.split("_")
  attends_to, sliding = [], []
  for pos, tok in enumerate(tokens):
    m = _TOKEN.match(tok)
    if m is None:
      raise ValueError(
          f"layer_types: bad token {tok!r} at position {pos} of {layer_types!r}; each token must be "
          "a layer index, optionally followed by 's' for sliding window (e.g. '3' or '3s')")
    attends_to.append(int(m.group(1)))
    sliding.append(bool(m.group(2)))
  n = len(tokens)
  if num_layers is not None and n != num_layers:
    raise ValueError(
        f"layer_types has {n} tokens but num_layers is {num_layers}: give one token per layer "
        f"({layer_types!r})")
  for pos, j in enumerate(attends_to):
    if j >= n:
      raise ValueError(
          f"layer_types: token {tokens[pos]!r} at position {pos} attends to layer {j}, but layers "
          f"are numbered 0..{n - 1}")
  lt = LayerTypes(tuple(attends_to), tuple(sliding), force_nodiag)
  return lt


# ---------------------------------------------------------------------------------------------
# Presets: the configurations of the LCKV paper and the NAACL 2025 study, as strings.
# ---------------------------------------------------------------------------------------------


def _join(attends_to: Sequence[int], sliding: Sequence[bool] | None = None) -> str:
  sliding = sliding or [False] * len(attends_to)
  return "_".join(f"{j}{'s' if s else ''}" for j, s in zip(attends_to, sliding))


def grouped(groups: Sequence[Sequence[int]], target: str) -> str:
  """The NAACL study's general builder: every layer of a group attends to its bottom/top/middle.

  Args:
    groups: consecutive groups of layer indices covering 0..L-1 in order, e.g. [[0], [1..6], [7]].
    target: 'bottom', 'top' or 'middle' (floor of the group's midpoint).
  """
  if target not in ("bottom", "top", "middle"):
    raise ValueError(f"grouped: target must be 'bottom', 'top' or 'middle', got {target!r}")
  flat = [i for g in groups for i in g]
  if flat != list(range(len(flat))) or any(len(g) == 0 for g in groups):
    raise ValueError(f"grouped: groups must be non-empty and cover 0..L-1 in order, got {groups}")
  attends_to = []
  for g in groups:
    attends_to += [_member(g, target)] * len(g)
  return _join(attends_to)


def _check_layers(name: str, num_layers: int, minimum: int) -> None:
  if not isinstance(num_layers, int) or num_layers < minimum:
    raise ValueError(f"preset {name!r} needs num_layers >= {minimum}, got {num_layers!r}")


def llama(num_layers: int) -> str:
  """Standard transformer: every layer attends to its own KV."""
  _check_layers("llama", num_layers, 1)
  return _join(range(num_layers))


def _warmup_groups(num_layers: int, warmup_layers: int) -> list[list[int]]:
  if warmup_layers < 0 or warmup_layers > num_layers - 1:
    raise ValueError(
        f"warmup_layers must be in 0..{num_layers - 1} for {num_layers} layers, got {warmup_layers}")
  bottom = warmup_layers // 2
  top = warmup_layers - bottom
  middle = list(range(bottom, num_layers - top))
  return [[i] for i in range(bottom)] + [middle] + [[i] for i in range(num_layers - top, num_layers)]


def lckv(num_layers: int, warmup_layers: int = 2) -> str:
  """LCKV: the middle layers attend to the top of the middle; warm-up layers split bottom/top.

  `lckv(22, 2)` is the paper's `0_20_20_..._20_21`; `lckv(8, 0)` is `7_7_..._7`.
  """
  _check_layers("lckv", num_layers, 1)
  return grouped(_warmup_groups(num_layers, warmup_layers), "top")


def sandwich(num_layers: int, warmup_layers: int = 2) -> str:
  """Sandwich-middle of the NAACL study: like LCKV but the shared KV is the middle layer's."""
  _check_layers("sandwich", num_layers, 1)
  return grouped(_warmup_groups(num_layers, warmup_layers), "middle")


def cla(num_layers: int, group_size: int = 2) -> str:
  """Cross-Layer Attention: groups of `group_size` share their bottom layer's KV."""
  _check_layers("cla", num_layers, 1)
  if group_size < 1:
    raise ValueError(f"cla: group_size must be >= 1, got {group_size}")
  groups = [list(range(s, min(s + group_size, num_layers))) for s in range(0, num_layers, group_size)]
  return grouped(groups, "bottom")


def yoco(num_layers: int) -> str:
  """YOCO: the bottom half uses sliding windows; the top half shares layer L/2's KV."""
  _check_layers("yoco", num_layers, 2)
  half = num_layers // 2
  return _join(list(range(half)) + [half] * (num_layers - half),
               [True] * half + [False] * (num_layers - half))


def mixattention(num_layers: int) -> str:
  """MixAttention (Pairs), as in the reference code's README for 22 layers, extended to any L.

  Chunks of 6 layers: the first of each chunk has full attention (its own KV in even chunks, the
  previous chunk's first layer's KV in odd ones); the rest are sliding-window layers sharing KV in
  pairs (positions 1-2) and triples (3-5). A short last chunk shares one sliding KV.
  """
  _check_layers("mixattention", num_layers, 1)
  attends_to, sliding = [], []
  for c, s in enumerate(range(0, num_layers, 6)):
    n = min(6, num_layers - s)
    attends_to.append(s if c % 2 == 0 else s - 6)
    sliding.append(False)
    subgroups = [[1, 2], [3, 4, 5]] if n == 6 else ([list(range(1, n))] if n <= 4
                                                     else [[1, 2], list(range(3, n))])
    for g in subgroups:
      for _ in g:
        attends_to.append(s + g[0])
        sliding.append(True)
  return _join(attends_to, sliding)


# The NAACL study's grid: how the layers are cut into groups (the partitioning) x which member
# of a group provides its KV (the target). Each configuration keeps `kv_layers` KV layers, layer 0
# among them; existing methods are special cases (docs/spec.md §2).
PARTITIONS = ("pizza", "sandwich", "lasagna")
TARGETS = ("bottom", "top", "middle")


def _split(start: int, end: int, parts: int) -> list[list[int]]:
  """Layers start..end-1 cut into `parts` consecutive groups of near-equal size, larger first."""
  n = end - start
  groups = []
  for g in range(parts):
    size = n // parts + (1 if g < n % parts else 0)
    groups.append(list(range(start, start + size)))
    start += size
  return groups


def _member(group: Sequence[int], target: str) -> int:
  return {"bottom": group[0], "top": group[-1], "middle": group[(len(group) - 1) // 2]}[target]


def study_groups(partition: str, target: str, num_layers: int, kv_layers: int
                 ) -> list[list[int]]:
  """The groups of a configuration of the study with `kv_layers` groups (one KV layer each).

  - pizza: layers 0..n-2 alone, the rest one group (YOCO's shape);
  - sandwich: n-1 layers alone, ceil((n-1)/2) at the bottom and the rest at the top, the middle
    one group (LCKV's shape; an odd count puts the extra layer at the bottom);
  - lasagna: n consecutive groups of near-equal size, larger first (CLA's shape). Where the
    target of the first group would not be layer 0 (top; middle of 3 or more), layer 0 is a group
    of its own and layers 1..L-1 make the other n-1, so that layer 0 stays a KV layer, as the
    study keeps it in every configuration.
  """
  if partition not in PARTITIONS:
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  if not isinstance(kv_layers, int) or not 2 <= kv_layers <= num_layers:
    raise ValueError(f"{partition}-{target}: kv_layers must be an integer in 2..{num_layers} (the "
                     f"study keeps layer 0 a KV layer), got {kv_layers!r}")
  n, L = kv_layers, num_layers
  if partition == "pizza":
    return [[i] for i in range(n - 1)] + [list(range(n - 1, L))]
  if partition == "sandwich":
    bottom, top = (n - 1) - (n - 1) // 2, (n - 1) // 2
    return ([[i] for i in range(bottom)] + [list(range(bottom, L - top))]
            + [[i] for i in range(L - top, L)])
  groups = _split(0, L, n)
  if _member(groups[0], target) != 0:
    groups = [[0]] + _split(1, L, n - 1)
  return groups


def study(partition: str, target: str, num_layers: int, kv_layers: int | None = None) -> str:
  """A configuration of the study's grid, e.g. study('sandwich', 'middle', 22, 3) is
  `0_10_10_..._10_21`. Default `kv_layers`: half the layers (a 2x smaller KV cache)."""
  _check_layers(f"{partition}-{target}", num_layers, 2)
  kv = num_layers // 2 if kv_layers is None else kv_layers
  return grouped(study_groups(partition, target, num_layers, kv), target)


def _study_preset(partition: str, target: str) -> Callable[..., str]:
  def preset(num_layers: int, kv_layers: int | None = None) -> str:
    return study(partition, target, num_layers, kv_layers)
  preset.__doc__ = (f"The study's {partition}-{target}; the argument is the number of KV layers "
                    "(default half the layers).")
  return preset


STUDY_PRESETS = tuple(f"{p}-{t}" for p in PARTITIONS for t in TARGETS)

PRESETS: dict[str, Callable[..., str]] = {
    "llama": llama,
    "lckv": lckv,
    "sandwich": sandwich,
    "cla": cla,
    "yoco": yoco,
    "mixattention": mixattention,
    **{name: _study_preset(*name.split("-")) for name in STUDY_PRESETS},
}


def known_names(spec: str, num_layers: int) -> list[str]:
  """Every preset (with its argument) that gives the string `spec`, e.g. for LCKV's
  `0_20_..._20_21`: ['lckv', 'lckv:2', 'sandwich-top:3']."""
  target = resolve(spec, num_layers)
  names = []
  for name, fn in PRESETS.items():
    args: list = [None]
    if name in ("lckv", "sandwich"):
      args += list(range(0, num_layers))
    elif name == "cla":
      args += list(range(1, num_layers + 1))
    elif name in STUDY_PRESETS:
      args += list(range(2, num_layers + 1))
    for a in args:
      try:
        got = fn(num_layers) if a is None else fn(num_layers, a)
      except ValueError:
        continue
      if got == target:
        names.append(name if a is None else f"{name}:{a}")
  return names


def resolve(spec: str, num_layers: int) -> str:
  """Turns a preset name (`lckv`, `lckv:10`, `cla:3`, ...) or a literal string into a string.

  The optional `:N` argument is the preset's integer parameter (warm-up layers, group size).
  """
  name, _, arg = spec.partition(":")
  if name not in PRESETS:
    return spec
  fn = PRESETS[name]
  if not arg:
    return fn(num_layers)
  if not arg.isdigit():
    raise ValueError(f"layer_types preset {spec!r}: the argument after ':' must be an integer")
  if name in ("llama", "yoco", "mixattention"):
    raise ValueError(f"layer_types preset {name!r} takes no argument, got {spec!r}")
  return fn(num_layers, int(arg))


# ---------------------------------------------------------------------------------------------
# Scan runs: how a segment's layers are grouped for `jax.lax.scan` (compile time, not semantics).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Role:
  """What one layer does inside a repeated block, independent of the block's position.

  `source` is the layer whose KV it reads: with `in_block`, the offset of a layer of the same
  block; else a fixed layer j outside the run (the same for every block).
  """
  computes_kv: bool
  source: int
  in_block: bool
  sliding: bool
  diag_masked: bool
  upward: bool = False  # reads a layer above itself (attends_top)


@dataclasses.dataclass(frozen=True)
class Run:
  """`num_blocks` repetitions of a block of `period` layers, starting at layer `start`."""
  start: int
  period: int
  num_blocks: int
  roles: tuple[Role, ...]

  @property
  def end(self) -> int:
    return self.start + self.period * self.num_blocks

  def layer(self, block: int, offset: int) -> int:
    return self.start + block * self.period + offset


def _roles(lt: LayerTypes, start: int, period: int, num_blocks: int) -> tuple[Role, ...] | None:
  """The block roles if layers start..start+period*num_blocks repeat, else None."""
  end = start + period * num_blocks
  roles = None
  for b in range(num_blocks):
    block_start = start + b * period
    rs = []
    for o in range(period):
      i = block_start + o
      j = lt.attends_to[i]
      in_block = block_start <= j < block_start + period
      if not in_block and start <= j < end:
        return None  # reads another block of the same run: blocks would not be independent
      rs.append(Role(lt.computes_kv[i], j - block_start if in_block else j, in_block,
                     lt.sliding[i], lt.diag_masked[i], lt.attends_top[i]))
    if roles is None:
      roles = tuple(rs)
    elif tuple(rs) != roles:
      return None
  return roles


def scan_runs(lt: LayerTypes, segment: Segment, scan_layers: bool = True,
              max_period: int = 6) -> tuple[Run, ...]:
  """Splits a segment into runs of identical blocks; each run becomes one `lax.scan`.

  Greedy from the bottom: at each layer take the period (up to `max_period`) that covers the most
  layers with at least two blocks. Without `scan_layers` every layer is its own run.
  """
  runs, i = [], segment.start
  while i < segment.end:
    best = (1, 1)
    if scan_layers:
      for p in range(1, max_period + 1):
        n = 1
        while i + (n + 1) * p <= segment.end and _roles(lt, i, p, n + 1) is not None:
          n += 1
        if n >= 2 and n * p > best[0] * best[1]:
          best = (p, n)
    p, n = best
    runs.append(Run(i, p, n, _roles(lt, i, p, n)))
    i += p * n
  return tuple(runs)


def parse_spec(spec: str, num_layers: int | None) -> LayerTypes:
  """A preset name (`lckv`, `cla:3`) or a literal string; errors say what is allowed."""
  name = spec.partition(":")[0]
  if name in PRESETS:
    if num_layers is None:
      raise ValueError(f"layer_types preset {spec!r} needs num_layers (--num_layers)")
    return parse(resolve(spec, num_layers), num_layers)
  if "_" not in spec and not _TOKEN.match(spec):  # a mistyped preset rather than a string
    raise ValueError(f"layer_types {spec!r} is neither a preset ({', '.join(PRESETS)}; "
                     "'lckv:N', 'sandwich:N' and 'cla:N' take an integer) nor a string of "
                     "layer indices joined by '_' such as '0_2_2_3' or '0s_1s_2_2'")
  return parse(spec, num_layers)


def describe(lt: LayerTypes) -> str:
  """A terminal picture: one row per layer, top layer first."""
  lines = [f"layer_types = {lt}", ""]
  for i in reversed(range(lt.num_layers)):
    j = lt.attends_to[i]
    arrow = "self" if j == i else (f"^ {j}" if j > i else f"v {j}")
    marks = ("KV " if lt.computes_kv[i] else "   ") + ("sw " if lt.sliding[i] else "   ")
    marks += "nodiag" if lt.diag_masked[i] else ""
    lines.append(f"  layer {i:3d}  {marks:<12} attends to {arrow}")
  kv = len(lt.kv_layers)
  names = known_names(str(lt), lt.num_layers)
  lines += ["", "known as: " + (", ".join(names) if names else "no preset")]
  lines += [f"KV cache: {kv} of {lt.num_layers} layers ({lt.num_layers / kv:.1f}x smaller than "
            "llama)", "plan: " + ", ".join(
                f"{'cyclic' if s.cyclic else 'plain'}[{s.start}..{s.end - 1}]" for s in lt.plan())]
  return "\n".join(lines)


if __name__ == "__main__":
  # `show` draws (--image), so its command line lives with the drawing, in visualize, which
  # imports this module: never the reverse. Run as a script this file is the module __main__.
  from lckv_jax import cli, visualize
  cli.run(visualize.show_main, prog=PROG)
