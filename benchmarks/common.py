"""What several benchmarks share: paths, the recorded command line, the serving model, packed rows.

Imported by the scripts of this package, never by `lckv_jax`. JAX and the model are imported
inside the functions that need them, so that `records` and `tables` (JSON alone) stay light.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHAPES = ("tiny", "50m", "study_110m", "1b", "7b", "30b")  # model sections of configs/<shape>.py


def config_path(shape: str) -> str:
  return os.path.join(ROOT, "configs", f"{shape}.py")


def default_out() -> str:
  """Where a run writes its record file: $OUT when set (a device machine hands that folder back),
  else benchmarks/results."""
  return os.environ.get("OUT", RESULTS)


def command(module: str, argv: list[str] | None = None) -> str:
  """The command line of this run as typed from the repository root, for the record.

  `argv`: the arguments a caller passed to `main` (None: the process's own).
  """
  args = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python", "-m", module, *args])


def cache_len(prompt: int, gen: int) -> int:
  """Cache slots of a run of P prompt and G generated tokens, as `Generator` sizes them without
  `max_len`."""
  from lckv_jax.cache import rounded_slots
  return rounded_slots(prompt + gen - 1)


def serving_model(args, layer_types: str, **overrides):
  """Random bf16 weights in the serving layout (one array per layer, no remat) of
  configs/<args.shape>.py for P + G = args.prompt + args.gen tokens; `args.sliding_window`, when
  set, is the window of the 's' layers; `overrides` replace further config fields."""
  from flax import nnx

  from lckv_jax import Transformer
  from lckv_jax.config import model_from_file
  config = model_from_file(
      config_path(args.shape), layer_types=layer_types,
      dtype="bfloat16", param_dtype="bfloat16", scan_layers=False, remat="none",
      max_position_embeddings=max(args.prompt + args.gen, 16),
      **({"sliding_window": args.sliding_window} if args.sliding_window else {}), **overrides)
  return Transformer(config, rngs=nnx.Rngs(0))


def packed_rows(batch: int, seq: int, docs: int, seed: int = 0):
  """Positions and segment ids [batch, seq] of `docs` documents per row at random boundaries,
  positions restarting per document (what the data pipeline makes with document_mask=True)."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.RandomState(seed)
  seg, pos = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
  for r in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False))
    for d, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq])):
      seg[r, a:b], pos[r, a:b] = d + 1, np.arange(b - a)
  return jnp.asarray(pos), jnp.asarray(seg)


def cap_allocator(cap_bytes: int | None) -> float | None:
  """Caps JAX's GPU allocator at `cap_bytes` (XLA_PYTHON_CLIENT_MEM_FRACTION of the first
  visible GPU's memory, read with nvidia-smi), so a run "under a 24 GB cap" cannot use more.
  Must run before JAX starts its backend; a fraction already set wins. Returns the fraction set,
  or None (no cap, no GPU, or already set)."""
  import shutil
  import subprocess
  if not cap_bytes or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or not shutil.which(
      "nvidia-smi"):
    return None
  out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
  totals = [int(x) for x in out.stdout.split() if x.strip().isdigit()]
  if out.returncode != 0 or not totals:
    return None
  total = totals[int(visible) if visible.isdigit() and int(visible) < len(totals) else 0] << 20
  fraction = min(1.0, cap_bytes / total)
  os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
  return fraction
