"""What a quantized KV cache (int8, fp8 e4m3: `lckv_jax.quant`) costs in quality.

Held-out windows are scored token by token through the KV cache, as generation reads it, once per
cache dtype:

- full cache: the exact sequential mode (`lckv_jax.eval.perplexity.Scorer(sequential=True,
  cache_dtype=...)`) over windows of the model's context;
- sink cache (`--sink N_SINK WINDOW`, StreamingLLM): longer windows (`--sink_len`) decoded as the
  decode loop does it, one token a step into `KVCache.create_sink` with `evict_sink` before each
  step, the true next token fed (teacher forcing). Each eviction re-rotates the kept keys, which
  a quantized cache dequantizes and quantizes again: a key is re-encoded up to WINDOW - 1 times.

Per dtype: perplexity and its change against the bf16 cache, the max and mean |logits - logits of
the bf16 cache| over every scored position (for the sink cache also the mean before any eviction
and over the last quarter of each window), and how often the top-1 token agrees with the bf16
cache's; the float32 cache (in a float32 model: the exact model) is the first row. The cache's
bytes per token (`ModelConfig.kv_cache_bytes_per_token`, scales included) are listed beside each.

Data: the held-out split that `train.py` uses for the embedded corpus (every 50th KJV chapter,
byte tokens), windows as `benchmarks.prefill_iterations.heldout_windows` cuts them.

Each run is an entry of `kv_quant_<device>.json` (`records`) whose setting is its `--tag`: a
re-run of a tag replaces its entry; `python -m benchmarks.tables` copies its tables into
`benchmarks/results/kv_quant_cpu.md`.

  python train.py --config=configs/tiny.py --workdir=/tmp/lckv-quant-tiny
  python -m benchmarks.kv_quant --checkpoint=/tmp/lckv-quant-tiny/model --tag=tiny
  python -m benchmarks.kv_quant --checkpoint=/tmp/lckv-quant-tiny/model --dtype=bfloat16 \\
      --tag=tiny_bf16
  python -m benchmarks.kv_quant --smoke --out=/tmp/kvq     # a random model, seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import records
from benchmarks.common import RESULTS, command

CACHE_DTYPES = ("float32", "bfloat16", "int8", "fp8")  # the first is the exact model
REFERENCE = "bfloat16"  # what the quantized caches are compared with


# ---------------------------------------------------------------------------------------------
# Logits through a cache of each dtype.
# ---------------------------------------------------------------------------------------------


def full_cache_logits(model, inputs_BxT, cache_dtype: str) -> np.ndarray:
  """Logits of the exact sequential mode through a full cache of `cache_dtype`."""
  from lckv_jax.eval.perplexity import Scorer
  return np.asarray(Scorer(model, sequential=True, cache_dtype=cache_dtype).logits(inputs_BxT),
                    np.float32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _sink_scan(graphdef, params, inputs_BxT, n_sink: int, window: int, cache_dtype: str):
  from lckv_jax.cache import KVCache
  from lckv_jax.mode import Mode
  model = nnx.merge(graphdef, params)
  b = inputs_BxT.shape[0]
  cache = KVCache.create_sink(model.config, b, n_sink, window, dtype=cache_dtype)

  def body(carry, tok_B):
    cache, length = carry  # as generation._decode: evict when full, then write at `length`
    cache, length = cache.evict_sink(model.config, length)
    logits, cache = model.step(tok_B[:, None], cache, length, length[:, None],
                               jnp.ones((b, 1), jnp.int32), mode=Mode.DECODE)
    return (cache, length + 1), logits[:, 0]

  _, logits_TxBxV = jax.lax.scan(body, (cache, jnp.zeros((b,), jnp.int32)), inputs_BxT.T)
  return jnp.swapaxes(logits_TxBxV, 0, 1)


def sink_cache_logits(model, inputs_BxT, cache_dtype: str, n_sink: int, window: int
                      ) -> np.ndarray:
  """Logits of every token decoded (teacher-forced) through a sink cache of `cache_dtype`."""
  graphdef, params = nnx.split(model)
  return np.asarray(_sink_scan(graphdef, params, jnp.asarray(inputs_BxT, jnp.int32), n_sink,
                               window, cache_dtype), np.float32)


# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------


def measure(model, windows_BxT: np.ndarray, logits_of=full_cache_logits,
            cache_dtypes=CACHE_DTYPES, reference: str = REFERENCE,
            parts: dict | None = None) -> list[dict]:
  """One row per cache dtype: perplexity of windows[:, 1:] given windows[:, :-1] through the
  cache (`logits_of(model, inputs, cache_dtype)`), and the logits' distance to the `reference`
  cache's; `parts` {name: slice of positions} adds the mean error over each."""
  inputs, targets = windows_BxT[:, :-1], windows_BxT[:, 1:]
  logits = {name: logits_of(model, inputs, name)
            for name in dict.fromkeys((reference, *cache_dtypes))}
  ref = logits[reference]

  def row(name):
    x = logits[name]
    logp = jax.nn.log_softmax(jnp.asarray(x), axis=-1)
    nll = -float(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1).mean())
    err = np.abs(x - ref)
    out = dict(cache_dtype=name, ppl=float(np.exp(nll)), mean_nll=nll,
               kv_bytes_per_token=model.config.kv_cache_bytes_per_token(name),
               max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
               top1_agree=float((x.argmax(-1) == ref.argmax(-1)).mean()))
    for part, at in (parts or {}).items():
      out[f"mean_abs_err_{part}"] = float(err[:, at].mean())
    return out

  base, rows = row(reference), [row(name) for name in cache_dtypes]
  for r in rows:
    r["ppl_rel"] = r["ppl"] / base["ppl"] - 1
    r["bytes_rel"] = r["kv_bytes_per_token"] / base["kv_bytes_per_token"]
  return rows


def table(rows: list[dict], reference: str = REFERENCE, parts: tuple[str, ...] = ()) -> str:
  head = ["cache", "KV bytes / token", "perplexity", f"vs {reference}",
          f"max abs logits err vs {reference}", "mean abs err",
          *(f"mean abs err, {p.replace('_', ' ')}" for p in parts), "top-1 agreement"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([
        r["cache_dtype"], f"{r['kv_bytes_per_token']:,} ({r['bytes_rel']:.3f}x)",
        f"{r['ppl']:.4f}", f"{100 * r['ppl_rel']:+.3f}%", f"{r['max_abs_err']:.3g}",
        f"{r['mean_abs_err']:.3g}", *(f"{r[f'mean_abs_err_{p}']:.3g}" for p in parts),
        f"{r['top1_agree']:.4f}"]) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", default=None, help="a model checkpoint (train.py "
                 "--export_model); required unless --smoke")
  p.add_argument("--num_windows", type=int, default=None, help="held-out windows (default 128)")
  p.add_argument("--window", type=int, default=None,
                 help="tokens per window (default: the model's max_position_embeddings)")
  p.add_argument("--sink", type=int, nargs=2, metavar=("N_SINK", "WINDOW"), default=None,
                 help="the sink cache measured (default 4 124; smoke 2 6)")
  p.add_argument("--sink_len", type=int, default=None,
                 help="tokens per window through the sink cache (default 1024; smoke 24)")
  p.add_argument("--sink_windows", type=int, default=None, help="default 16; smoke 2")
  p.add_argument("--dtype", default=None, help="the model's compute dtype (default the "
                 "checkpoint's), e.g. bfloat16")
  p.add_argument("--smoke", action="store_true", help="a random tiny model: seconds")
  p.add_argument("--tag", default=None, help="the run's setting (default: smoke, else tiny)")
  p.add_argument("--out", default=RESULTS, help="folder of the record file")
  args = p.parse_args(argv)
  if not args.smoke and not args.checkpoint:
    p.error("give --checkpoint=DIR (or --smoke)")
  smoke = args.smoke
  args.num_windows = args.num_windows or (2 if smoke else 128)
  args.sink = tuple(args.sink or ((2, 6) if smoke else (4, 124)))
  args.sink_len = args.sink_len or (24 if smoke else 1024)
  args.sink_windows = args.sink_windows or (2 if smoke else 16)
  args.tag = args.tag or ("smoke" if smoke else "tiny")
  return args


def main(argv=None) -> dict:
  from benchmarks.prefill_iterations import EVAL_FRACTION, heldout_windows, smoke_model
  from lckv_jax.model import count_params
  args = parse_args(argv)
  if args.smoke:
    model, source = smoke_model(), "random float32 (prefill_iterations.smoke_model)"
  else:
    from lckv_jax import checkpoint
    model = checkpoint.load_model(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
    source = os.path.abspath(args.checkpoint)
  cfg = model.config
  window = args.window or (16 if args.smoke else cfg.max_position_embeddings)
  data = (f"embedded corpus, held-out split (every {round(1 / EVAL_FRACTION)}th chapter), byte "
          "tokens")
  t0 = time.perf_counter()
  full = measure(model, heldout_windows(args.num_windows, window + 1))
  n_sink, sink_window = args.sink
  cap = n_sink + sink_window
  parts = {"before_eviction": slice(0, cap), "last_quarter": slice(-args.sink_len // 4, None)}
  sink = measure(model, heldout_windows(args.sink_windows, args.sink_len + 1),
                 functools.partial(sink_cache_logits, n_sink=n_sink, window=sink_window),
                 parts=parts)
  dev = jax.devices()[0]
  result = dict(
      tag=args.tag, command=command("benchmarks.kv_quant", argv), device=dev.device_kind,
      backend=jax.default_backend(), jax=jax.__version__, python=platform.python_version(),
      model=dict(source=source, params=count_params(model), layer_types=cfg.layer_types,
                 dtype=cfg.dtype, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
                 max_position_embeddings=cfg.max_position_embeddings),
      data=data, seconds=round(time.perf_counter() - t0, 1),
      full=dict(num_windows=args.num_windows, window=window, results=full),
      sink=dict(n_sink=n_sink, window=sink_window, num_windows=args.sink_windows,
                length=args.sink_len, results=sink))
  result["table_markdown"] = table(full)
  result["sink_table_markdown"] = table(sink, parts=tuple(parts))
  print(f"full cache, {args.num_windows} windows of {window} tokens:\n{result['table_markdown']}")
  print(f"\nsink cache ({n_sink} + {sink_window} slots), {args.sink_windows} windows of "
        f"{args.sink_len} tokens:\n{result['sink_table_markdown']}")
  path = records.record_path(args.out, "kv_quant", dev.device_kind)
  records.update(path, [records.entry(args.tag, **result)])
  print(f"wrote {args.tag!r} to {path}")
  return result


if __name__ == "__main__":
  main()
