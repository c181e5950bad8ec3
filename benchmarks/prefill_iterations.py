"""Prefill iterations vs quality and speed (docs/spec.md §4, §5): how many passes does a prompt
need?

A model with a cycle (LCKV) encodes a prompt in parallel by running its cyclic layer group
`iterations` times (default m + b). For each k in `--iterations` this script prefills held-out
prompts with k iterations (`generation.prefill(..., prefill_mode="parallel", iterations=k)`) and
measures, against the exact token-by-token model (`Transformer.sequential`):

- logits error over the prompt (max / mean |logits_k - logits_exact|, all prompt positions), the
  error at the last prompt position separately (the logits that start generation), and how many
  leading positions are exact (theory: at least k);
- prompt perplexity under the k-iteration prefill logits (teacher forcing over the prompt);
- continuation perplexity: the prompt is prefilled with k iterations into a cache, then the next
  `--gen` true tokens are scored with exact single-token steps (`model.step(..., mode=DECODE)`),
  so the effect of an approximate prompt cache on later predictions is measured;
- top-1 agreement with the exact model (last prompt position, all prompt positions, continuation);
- prefill wall time (jitted, warm-up excluded, median of `--repeats`, `block_until_ready`), last
  position's logits only, as `Generator` does; `--time_shape=1b` also times a random bf16 model
  of `configs/1b.py` (batch `--time_batch` x `--time_prompt` tokens) for each k.

"Where quality stops moving": the smallest k such that it and every larger k of the list have a
continuation perplexity within `--tol` (0.5%) of both the largest k's (normally 9, the training
setting m + b) and the exact model's.

Data: the held-out split that `train.py` uses for the embedded corpus (every 50th KJV chapter,
`data.eval_fraction=0.02`, byte tokens, no BOS). Window i is a run of prompt_len + gen bytes:
first the opening bytes of every held-out chapter (in split order), then the next non-overlapping
window of every chapter long enough, and so on. Positions restart at 0 in every window.

Each run is an entry of `prefill_iterations_<device>.json` (`records`) whose setting is its
`--tag`: a re-run of a tag replaces its entry.

  # the real run (a checkpoint written by train.py --export_model)
  python -m benchmarks.prefill_iterations --checkpoint=/tmp/pi-tiny/model --tag=tiny
  # no checkpoint: trains configs/tiny.py with m=7, b=2 in-process first (--train_steps)
  python -m benchmarks.prefill_iterations --train_steps=300
  # seconds: a random float32 model, 8-token prompts
  python -m benchmarks.prefill_iterations --smoke --out=/tmp/pi
  # speed only, TinyLlama-1.1B shape, random bf16 weights (e.g. on an H100)
  python -m benchmarks.prefill_iterations --only_timing --time_shape=1b --time_batch=32 \\
      --time_prompt=512
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import records
from benchmarks.common import RESULTS, command, config_path
from lckv_jax.cache import KVCache
from lckv_jax.config import ModelConfig
from lckv_jax.generation import prefill
from lckv_jax.mode import Mode
from lckv_jax.model import Transformer, count_params

DEFAULT_ITERATIONS = (1, 2, 3, 5, 9)
TIME_SHAPES = ("50m", "1b", "7b", "30b")  # model sections of configs/<shape>.py
EVAL_FRACTION = 0.02  # the default data.eval_fraction of lckv_jax.train.config


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------


def smoke_model(seed: int = 0, std: float = 0.1) -> Transformer:
  """A random float32 LCKV model (0_2_2_3, a cycle), weights N(0, std) so every path matters."""
  cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=4, num_kv_heads=2, layer_types="lckv", forward_passes=7,
                    backward_passes=2, max_position_embeddings=64, tie_word_embeddings=True)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
  params = nnx.state(model, nnx.Param)
  # Drawn with numpy: compiling JAX's initialisers takes seconds on a CPU.
  rng = np.random.RandomState(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
  new = [jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(p) else 0.0)
                     + std * rng.standard_normal(x.shape), x.dtype) for p, x in leaves]
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, params)
  return model


def train_model(steps: int, workdir: str | None, m: int = 7, b: int = 2
                ) -> tuple[Transformer, dict]:
  """Trains configs/tiny.py with m, b in-process (train.py's Trainer); returns model and log."""
  from lckv_jax.train.config import from_file
  from lckv_jax.train.step import abstract_model
  from lckv_jax.train.trainer import Trainer
  cfg = from_file(config_path("tiny"))
  cfg.model.forward_passes, cfg.model.backward_passes = m, b
  cfg.steps = steps
  cfg.progress_bar = False
  cfg.eval_every = 0
  cfg.checkpoint.every = 0
  cfg.optimizer.warmup_steps = min(cfg.optimizer.warmup_steps, max(1, steps // 10))
  workdir = workdir or tempfile.mkdtemp(prefix="prefill_iterations_train_")
  t0 = time.perf_counter()
  trainer = Trainer(cfg, workdir)
  state, history = trainer.train()
  losses = [h["loss"] for h in history if "loss" in h]
  evals = [h for h in history if "eval_loss" in h]
  model = abstract_model(trainer.model_config)
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, jax.device_get(state["params"]))
  nnx.update(model, params)
  log = dict(config="configs/tiny.py", forward_passes=m, backward_passes=b, steps=steps,
             workdir=workdir, final_loss=losses[-1] if losses else None,
             eval_loss=evals[-1]["eval_loss"] if evals else None,
             seconds=round(time.perf_counter() - t0, 1))
  return model, log


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------


def heldout_windows(n: int, length: int, eval_fraction: float = EVAL_FRACTION) -> np.ndarray:
  """[n, length] byte tokens from the held-out chapters of the embedded corpus (see the doc)."""
  from lckv_jax.data.corpus import embedded_documents
  from lckv_jax.data.sources import split_documents
  from lckv_jax.tokenizer import ByteTokenizer
  _, held = split_documents(list(embedded_documents()), eval_fraction)
  docs = [ByteTokenizer().encode(d) for d in held]
  windows, r = [], 0
  while len(windows) < n:
    added = False
    for d in docs:
      if (r + 1) * length <= len(d):
        windows.append(d[r * length:(r + 1) * length])
        added = True
        if len(windows) == n:
          break
    if not added:
      raise ValueError(f"the held-out split has only {len(windows)} windows of {length} tokens; "
                       "lower --num_prompts or --prompt_len/--gen")
    r += 1
  return np.stack(windows).astype(np.int32)


def random_windows(n: int, length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(1, vocab_size, (n, length)).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------


def _nll(logits_BxTxV, targets_BxT) -> np.ndarray:
  logp = jax.nn.log_softmax(jnp.asarray(logits_BxTxV, jnp.float32), axis=-1)
  return -np.asarray(jnp.take_along_axis(logp, jnp.asarray(targets_BxT)[..., None], -1)[..., 0])


def _kl(exact_BxTxV, approx_BxTxV) -> float:
  """Mean over positions of KL(exact || approx)."""
  p = jax.nn.log_softmax(jnp.asarray(exact_BxTxV, jnp.float32), axis=-1)
  q = jax.nn.log_softmax(jnp.asarray(approx_BxTxV, jnp.float32), axis=-1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))


@functools.partial(jax.jit, static_argnums=(0,))
def _sequential(graphdef, params, tokens):
  return nnx.merge(graphdef, params).sequential(tokens)


@functools.partial(jax.jit, static_argnums=(0,))
def _continue(graphdef, params, cache, tokens_BxG, start):
  """Exact single-token steps of `tokens` from slot/position `start`: logits [B, G, V]."""
  model = nnx.merge(graphdef, params)
  b = tokens_BxG.shape[0]

  def body(cache, xs):
    i, tok = xs
    wi = jnp.full((b,), start + i, jnp.int32)
    logits, cache = model.step(tok[:, None], cache, wi, wi[:, None],
                               jnp.ones((b, 1), jnp.int32), mode=Mode.DECODE)
    return cache, logits[:, 0]

  _, logits = jax.lax.scan(body, cache, (jnp.arange(tokens_BxG.shape[1]), tokens_BxG.T))
  return jnp.swapaxes(logits, 0, 1)


def time_prefill(model: Transformer, tokens_BxP: np.ndarray, iterations: int | None,
                 repeats: int, warmup: int = 2) -> dict:
  """Median wall time of `prefill` (last logits only): parallel with k iterations, or
  sequential (exact) with `iterations=None`. A fresh cache per call (the cache is donated)."""
  b, p = tokens_BxP.shape
  tokens = jnp.asarray(tokens_BxP)
  how = "sequential" if iterations is None else "parallel"

  def once():
    cache = KVCache.create(model.config, b, p)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    # Unpadded prompts into an empty cache, as `Generator.start` prefills equal-length prompts
    # (the fused attention kernel where one applies).
    logits, cache = prefill(model, tokens, None, None, cache, mode=Mode.PREFILL_EMPTY,
                            iterations=iterations or 1, prefill_mode=how)
    jax.block_until_ready((logits, cache))
    return time.perf_counter() - t0

  c0 = time.perf_counter()
  once()
  first = time.perf_counter() - c0
  for _ in range(warmup - 1):
    once()
  times = [once() for _ in range(repeats)]
  med = float(np.median(times))
  return dict(prefill_ms=round(1e3 * med, 4), prefill_ms_min=round(1e3 * min(times), 4),
              prefill_tokens_per_s=round(b * p / med, 1), first_call_s=round(first, 3))


def quality(model: Transformer, windows: np.ndarray, prompt_len: int, iterations
            ) -> tuple[dict, list[dict]]:
  """Exact reference and per-k metrics on `windows` [B, prompt_len + gen]."""
  b, total = windows.shape
  p, g = prompt_len, total - prompt_len
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(windows)
  exact = np.asarray(_sequential(graphdef, params, tokens))  # [B, P + G, V]
  ex_prompt, ex_cont = exact[:, :p], exact[:, p - 1:p - 1 + g]
  prompt_targets, cont_targets = windows[:, 1:p], windows[:, p:]
  atol = 1e-4 * max(1.0, float(np.abs(ex_prompt).max()))
  ex = dict(
      prompt_ppl=float(np.exp(_nll(ex_prompt[:, :-1], prompt_targets).mean())),
      cont_ppl=float(np.exp(_nll(ex_cont, cont_targets).mean())) if g else None,
      logits_abs_max=float(np.abs(ex_prompt).max()), exact_prefix_atol=atol)
  rows = []
  for k in iterations:
    cache = KVCache.create(model.config, b, total)
    logits, cache = prefill(model, tokens[:, :p], None, None, cache, mode=Mode.PREFILL_EMPTY,
                            iterations=k, prefill_mode="parallel", all_logits=True)
    logits = np.asarray(logits)  # [B, P, V]
    if g > 1:
      steps = np.asarray(_continue(graphdef, params, cache, tokens[:, p:p + g - 1], p))
      cont = np.concatenate([logits[:, -1:], steps], axis=1)  # predicts tokens p .. p+g-1
    else:
      cont = logits[:, -1:][:, :g]
    err = np.abs(logits - ex_prompt)  # [B, P, V]
    per_pos = err.max(axis=(0, 2))
    inexact = np.nonzero(per_pos > atol)[0]
    row = dict(
        k=k,
        prompt_max_abs_err=float(err.max()), prompt_mean_abs_err=float(err.mean()),
        last_max_abs_err=float(err[:, -1].max()), last_mean_abs_err=float(err[:, -1].mean()),
        exact_prefix_len=int(inexact[0]) if len(inexact) else p,
        mean_abs_err_by_position=[float(f"{x:.4g}") for x in err.mean(axis=(0, 2))],
        prompt_kl=_kl(ex_prompt, logits),
        top1_last_agree=float(np.mean(logits[:, -1].argmax(-1) == ex_prompt[:, -1].argmax(-1))),
        top1_prompt_agree=float(np.mean(logits.argmax(-1) == ex_prompt.argmax(-1))),
        prompt_ppl=float(np.exp(_nll(logits[:, :-1], prompt_targets).mean())),
    )
    if g:
      cerr = np.abs(cont - ex_cont)
      row.update(
          cont_ppl=float(np.exp(_nll(cont, cont_targets).mean())),
          cont_max_abs_err=float(cerr.max()), cont_mean_abs_err=float(cerr.mean()),
          cont_kl=_kl(ex_cont, cont),
          top1_cont_agree=float(np.mean(cont.argmax(-1) == ex_cont.argmax(-1))),
          # The exact steps only (continuation positions 1..gen-1): the prompt cache's effect.
          cont_steps_max_abs_err=float(cerr[:, 1:].max()) if g > 1 else None,
          cont_steps_mean_abs_err=float(cerr[:, 1:].mean()) if g > 1 else None,
          cont_mean_abs_err_by_position=[float(f"{x:.4g}") for x in cerr.mean(axis=(0, 2))])
    rows.append(row)
  ref = max(rows, key=lambda r: r["k"])
  for r in rows:
    for name in ("prompt_ppl", "cont_ppl"):
      if r.get(name) is not None:
        r[f"{name}_rel_exact"] = r[name] / ex[name] - 1
        r[f"{name}_rel_ref"] = r[name] / ref[name] - 1
  return ex, rows


def stop_k(rows: list[dict], name: str, tol: float, against=("exact", "ref")) -> int | None:
  """Smallest k such that it and every larger k have |name / reference - 1| <= tol."""
  ok = {r["k"]: all(abs(r[f"{name}_rel_{a}"]) <= tol for a in against) for r in rows
        if f"{name}_rel_exact" in r}
  ks = sorted(ok)
  for i, k in enumerate(ks):
    if all(ok[j] for j in ks[i:]):
      return k
  return None


def time_shape(shape: str, batch: int, prompt: int, iterations, repeats: int,
               sequential: bool) -> dict:
  """Prefill time of a random bf16 model of configs/<shape>.py (last logits only) for each k."""
  from lckv_jax.config import model_from_file
  base = model_from_file(config_path(shape))
  cfg = base.replace(dtype="bfloat16", param_dtype="bfloat16", remat="none",
                     max_position_embeddings=max(base.max_position_embeddings, prompt))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = random_windows(batch, prompt, cfg.vocab_size, seed=1)
  out = dict(shape=shape, layer_types=cfg.layer_types, num_layers=cfg.num_layers,
             forward_passes=cfg.forward_passes, backward_passes=cfg.backward_passes,
             params=count_params(model), dtype=cfg.dtype, batch=batch, prompt=prompt,
             repeats=repeats, results=[])
  for k in iterations:
    out["results"].append(dict(k=k, **time_prefill(model, tokens, k, repeats)))
  if sequential:
    out["sequential"] = time_prefill(model, tokens, None, repeats)
  base_ms = out["results"][0]["prefill_ms"]
  for r in out["results"]:
    r["cost_vs_first"] = round(r["prefill_ms"] / base_ms, 3)
  del model
  return out


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------


def _pct(x):
  return "" if x is None else f"{100 * x:+.2f}%"


def table(result: dict) -> str:
  lines = []
  q = result.get("results")
  if q:
    ex = result["exact"]
    has_cont = ex["cont_ppl"] is not None
    head = ["k", "prefill ms", "tok/s", "cost vs k=1", "max abs err (prompt)",
            "mean abs err (prompt)", "max abs err (last)", "exact prefix", "top-1 last",
            "top-1 prompt", "prompt ppl (vs exact)"]
    if has_cont:
      head += ["cont ppl (vs exact)", "cont ppl vs k_ref", "max abs err (cont steps)",
               "mean abs err (cont steps)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in q:
      cells = [str(r["k"]), f"{r['prefill_ms']:.3f}", f"{r['prefill_tokens_per_s']:.0f}",
               f"{r['cost_vs_k1']:.2f}x", f"{r['prompt_max_abs_err']:.3g}",
               f"{r['prompt_mean_abs_err']:.3g}", f"{r['last_max_abs_err']:.3g}",
               f"{r['exact_prefix_len']}/{result['prompt_len']}",
               f"{r['top1_last_agree']:.3f}", f"{r['top1_prompt_agree']:.3f}",
               f"{r['prompt_ppl']:.4f} ({_pct(r['prompt_ppl_rel_exact'])})"]
      if has_cont:
        cells += [f"{r['cont_ppl']:.4f} ({_pct(r['cont_ppl_rel_exact'])})",
                  _pct(r["cont_ppl_rel_ref"]), f"{r['cont_steps_max_abs_err'] or 0:.3g}",
                  f"{r['cont_steps_mean_abs_err'] or 0:.3g}"]
      lines.append("| " + " | ".join(cells) + " |")
    seq = result.get("sequential_timing", {})
    cells = ["exact (sequential)", f"{seq.get('prefill_ms', float('nan')):.3f}",
             f"{seq.get('prefill_tokens_per_s', float('nan')):.0f}", "", "0", "0", "0",
             f"{result['prompt_len']}/{result['prompt_len']}", "1", "1",
             f"{ex['prompt_ppl']:.4f}"]
    if has_cont:
      cells += [f"{ex['cont_ppl']:.4f}", "", "0", "0"]
    lines.append("| " + " | ".join(cells) + " |")
    s = result["quality_stops_at"]
    lines += ["", (f"Quality stops moving (continuation ppl within {100 * s['tol']:.2g}% of k="
                   f"{s['k_ref']} and of exact, for this k and every larger one): k = "
                   f"{s['cont_ppl']} (vs k_ref only: {s['cont_ppl_vs_ref']}, vs exact only: "
                   f"{s['cont_ppl_vs_exact']}; prompt ppl: {s['prompt_ppl']})")]
  t = result.get("timing_shape")
  if t:
    lines += ["", (f"Prefill time, {t['shape']} ({t['params'] / 1e9:.2f}B params, "
                   f"{t['dtype']}, random weights), batch {t['batch']} x {t['prompt']} tokens, "
                   f"{result['device']}:"), "",
              "| k | prefill ms | tok/s | cost vs first |", "|---|---|---|---|"]
    for r in t["results"]:
      lines.append(f"| {r['k']} | {r['prefill_ms']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                   f"{r['cost_vs_first']:.2f}x |")
    if "sequential" in t:
      s = t["sequential"]
      lines.append(f"| exact (sequential) | {s['prefill_ms']:.2f} | "
                   f"{s['prefill_tokens_per_s']:.0f} | "
                   f"{s['prefill_ms'] / t['results'][0]['prefill_ms']:.2f}x |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", default=None, help="model checkpoint dir (lckv_jax.checkpoint, "
                 "e.g. train.py --export_model); none: train configs/tiny.py in-process")
  p.add_argument("--iterations", type=int, nargs="+", default=None,
                 help="prefill iteration counts k (default "
                 f"{' '.join(map(str, DEFAULT_ITERATIONS))})")
  p.add_argument("--prompt_len", type=int, default=None,
                 help="prompt tokens (default 128; smoke 8)")
  p.add_argument("--num_prompts", type=int, default=None,
                 help="held-out windows (default 16; smoke 2)")
  p.add_argument("--gen", type=int, default=None,
                 help="true continuation tokens scored after the prompt (default 64; smoke 4)")
  p.add_argument("--data", choices=("corpus", "random"), default="corpus",
                 help="held-out windows of the embedded corpus, or random token ids")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed prefill calls (default 10; smoke 2)")
  p.add_argument("--tol", type=float, default=0.005, help="relative perplexity tolerance")
  p.add_argument("--smoke", action="store_true",
                 help="a random float32 tiny model and tiny sizes: finishes in seconds")
  p.add_argument("--train_steps", type=int, default=300,
                 help="steps of the in-process training when no --checkpoint is given")
  p.add_argument("--train_workdir", default=None, help="workdir of the in-process training")
  p.add_argument("--time_shape", choices=TIME_SHAPES, default=None,
                 help="also time prefill of a random bf16 model of configs/<shape>.py")
  p.add_argument("--time_batch", type=int, default=32)
  p.add_argument("--time_prompt", type=int, default=512)
  p.add_argument("--time_repeats", type=int, default=5)
  p.add_argument("--no_time_sequential", action="store_true",
                 help="skip timing the sequential (exact) prefill of --time_shape")
  p.add_argument("--only_timing", action="store_true",
                 help="skip the quality study: only --time_shape timing (needs --time_shape)")
  p.add_argument("--tag", default=None, help="the run's setting in its record file "
                 "(default: smoke, tiny, or the time shape with --only_timing)")
  p.add_argument("--out", default=RESULTS, help="folder of the record file")
  args = p.parse_args(argv)
  smoke = args.smoke
  args.iterations = args.iterations or list(DEFAULT_ITERATIONS)
  args.prompt_len = args.prompt_len or (8 if smoke else 128)
  args.num_prompts = args.num_prompts or (2 if smoke else 16)
  args.gen = (4 if smoke else 64) if args.gen is None else args.gen
  args.repeats = args.repeats or (2 if smoke else 10)
  if args.only_timing and not args.time_shape:
    p.error("--only_timing needs --time_shape")
  if min(args.iterations) < 1 or args.prompt_len < 2 or args.num_prompts < 1 or args.gen < 0:
    p.error("need iterations >= 1, prompt_len >= 2, num_prompts >= 1, gen >= 0")
  args.iterations = sorted(set(args.iterations))
  if args.tag is None:
    args.tag = ("smoke" if smoke else args.time_shape if args.only_timing else
                "tiny" + (f"_{args.time_shape}" if args.time_shape else ""))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  dev = jax.devices()[0]
  result = dict(tag=args.tag, command=command("benchmarks.prefill_iterations", argv),
                device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(), iterations=args.iterations, tol=args.tol,
                prefill_kwargs={"mode": Mode.PREFILL_EMPTY.value})  # unpadded: fused kernels
  if not args.only_timing:
    if args.smoke:
      model, source = smoke_model(), "random float32 (smoke_model, weights N(0, 0.1))"
    elif args.checkpoint:
      from lckv_jax import checkpoint
      model, source = checkpoint.load_model(args.checkpoint), os.path.abspath(args.checkpoint)
    else:
      model, log = train_model(args.train_steps, args.train_workdir)
      source = "trained in-process"
      result["training"] = log
    cfg = model.config
    if not cfg.layer_spec.has_cycle:
      print(f"note: layer_types={cfg.layer_types} has no cycle: every k gives the same prefill")
    total = args.prompt_len + args.gen
    if total > cfg.max_position_embeddings:
      raise ValueError(f"prompt_len + gen = {total} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if args.data == "corpus":
      if cfg.vocab_size < 256:
        raise ValueError("--data=corpus needs a byte vocabulary (vocab_size >= 256)")
      windows = heldout_windows(args.num_prompts, total)
      data = (f"embedded corpus, held-out split (every {round(1 / EVAL_FRACTION)}th chapter, "
              f"eval_fraction={EVAL_FRACTION}), byte tokens, windows of {total} tokens")
    else:
      windows = random_windows(args.num_prompts, total, cfg.vocab_size)
      data = f"random token ids in [1, {cfg.vocab_size}), seed 0"
    result.update(model=dict(source=source, params=count_params(model),
                             **dataclasses.asdict(cfg)),
                  data=data, prompt_len=args.prompt_len, gen=args.gen,
                  num_prompts=args.num_prompts, repeats=args.repeats)
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest"):
      exact, rows = quality(model, windows, args.prompt_len, args.iterations)
    result["quality_s"] = round(time.perf_counter() - t0, 2)
    prompts = windows[:, :args.prompt_len]
    for r in rows:
      r.update(time_prefill(model, prompts, r["k"], args.repeats))
      r["cost_vs_k1"] = r["prefill_ms"] / rows[0]["prefill_ms"]
    result["sequential_timing"] = time_prefill(model, prompts, None, args.repeats)
    k_ref = max(args.iterations)
    result.update(exact=exact, results=rows, quality_stops_at=dict(
        tol=args.tol, k_ref=k_ref,
        cont_ppl=stop_k(rows, "cont_ppl", args.tol) if args.gen else None,
        cont_ppl_vs_ref=stop_k(rows, "cont_ppl", args.tol, ("ref",)) if args.gen else None,
        cont_ppl_vs_exact=stop_k(rows, "cont_ppl", args.tol, ("exact",)) if args.gen else None,
        prompt_ppl=stop_k(rows, "prompt_ppl", args.tol)))
  if args.time_shape:
    result["timing_shape"] = time_shape(args.time_shape, args.time_batch, args.time_prompt,
                                        args.iterations, args.time_repeats,
                                        not args.no_time_sequential)
  result["table_markdown"] = table(result)
  print(result["table_markdown"])
  path = records.record_path(args.out, "prefill_iterations", dev.device_kind)
  records.update(path, [records.entry(args.tag, **result)])
  print(f"wrote {args.tag!r} to {path}")
  return result


if __name__ == "__main__":
  main()
