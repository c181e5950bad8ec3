"""Training-step speed of the model alone: compile time, step time, tokens/s and MFU.

A step is `value_and_grad` of the next-token loss plus an AdamW update, jitted, on random tokens,
bf16 compute and float32 parameters. FLOPs count the iteration plan's extra passes
(`lckv_jax.flops`). Each run is an entry of `train_speed_<device>.json` (`records`) under
the setting `setting` names: a re-run of a setting replaces its entry.

Several `--layer_types` in one process compile side by side (one thread each: XLA compiles
outside the GIL) and are then timed one after the other, alone on the device: what the study
(`study.py`) uses for the training cost of its whole grid.

  python -m benchmarks.train_speed --shape=1b --layer_types=lckv --batch=8 --seq=2048
  python -m benchmarks.train_speed --shape=study_110m --layer_types llama lckv:2 sandwich-top:6
  python -m benchmarks.train_speed --shape=7b --compile_only   # AOT compile on abstract inputs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import records
from benchmarks.common import SHAPES, command, config_path, default_out, packed_rows
from lckv_jax import Transformer
from lckv_jax.loss import next_token_loss
from lckv_jax.train.config import model_from_file
from lckv_jax.flops import flops_per_token, peak_flops_per_device
from lckv_jax.kernels import dispatch


def compile_step(args, layer_types: str):
  """The jitted training step of one configuration, compiled on abstract inputs; returns it with
  the config and the record's fields so far."""
  config = model_from_file(
      config_path(args.shape), layer_types=layer_types,
      forward_passes=args.m, backward_passes=args.b, dtype=args.dtype, param_dtype="float32",
      remat=args.remat, max_position_embeddings=max(2048, args.seq),
      attention_impl=args.attention_impl)
  tx = optax.adamw(1e-4)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)

  positions, segments = packed_rows(args.batch, args.seq, args.docs) if args.docs > 1 else (
      None, None)

  def step(state, opt_state, tokens):
    def loss_fn(state):
      logits = nnx.merge(graphdef, state)(tokens, positions, segments)
      return next_token_loss(logits, tokens)[0]
    loss, grads = jax.value_and_grad(loss_fn)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  tokens_spec = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  opt_spec = jax.eval_shape(tx.init, abstract_state)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract_state, opt_spec, tokens_spec).compile()
  compile_s = time.perf_counter() - t0
  result = dict(shape=args.shape, layer_types=config.layer_types, m=args.m, b=args.b,
                batch=args.batch, seq=args.seq, docs=args.docs, dtype=args.dtype,
                remat=args.remat,
                compile_s=round(compile_s, 2), device=jax.devices()[0].device_kind,
                attention=dispatch.resolve_attention_impl(config.attention_impl, config.dtype),
                jax=jax.__version__, python=platform.python_version(),
                command=args.command)
  mem = compiled.memory_analysis()
  if mem is not None:
    result["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
  return config, compiled, result


def time_step(args, config, compiled, result: dict) -> dict:
  """Median step time of `args.steps` steps after one warm-up step, on random tokens."""
  tx = optax.adamw(1e-4)
  state = nnx.state(Transformer(config, rngs=nnx.Rngs(0)))
  opt_state = tx.init(state)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
  state, opt_state, loss = compiled(state, opt_state, tokens)
  loss.block_until_ready()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, opt_state, loss = compiled(state, opt_state, tokens)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  step_s = times[len(times) // 2]
  tok_s = args.batch * args.seq / step_s
  flops = flops_per_token(config, args.seq) * tok_s
  peak = peak_flops_per_device()
  result.update(step_s=round(step_s, 4), tokens_per_s=round(tok_s, 1),
                tflops=round(flops / 1e12, 1), loss=float(loss),
                mfu=None if peak is None else round(flops / peak, 4))
  return result


def setting(args, attention: str, layer_types: str | None = None) -> str:
  """'1b_lckv_b8_s2048_dots_cudnn_docs16': shape, layer_types, batch, length, remat, attention
  path, when packed the documents per row, and `--tag`."""
  lt = args.layer_types if layer_types is None else layer_types
  return (f"{args.shape}_{lt.replace(':', '-')}_b{args.batch}_s{args.seq}"
          f"_{args.remat}_{attention}{f'_docs{args.docs}' if args.docs > 1 else ''}"
          f"{f'_{args.tag}' if args.tag else ''}")


def run(args) -> list[dict]:
  """Compiles every `--layer_types` side by side, then times each alone (unless
  `--compile_only`); returns one record per configuration, in the order given."""
  workers = max(1, min(len(args.layer_types), args.compile_threads or (os.cpu_count() or 1)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    compiled = list(pool.map(lambda lt: compile_step(args, lt), args.layer_types))
  results = []
  for spec, (config, step, result) in zip(args.layer_types, compiled):
    # compile_s is wall time, shared with the configurations compiled alongside.
    result.update(spec=spec, compiled_alongside=workers - 1)
    results.append(result if args.compile_only else time_step(args, config, step, result))
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=SHAPES, default="tiny")
  p.add_argument("--layer_types", nargs="+", default=["lckv"],
                 help="one or more layer_types strings or presets: compiled side by side, "
                 "timed one at a time")
  p.add_argument("--m", type=int, default=7)
  p.add_argument("--b", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="full")
  p.add_argument("--attention_impl", default="auto", choices=("auto", "dense", "xla", "cudnn"),
                 help="the training attention kernel (auto: cudnn on a GPU in 16-bit)")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--docs", type=int, default=1,
                 help="documents packed per row (segment ids and positions); 1 = one sequence")
  p.add_argument("--compile_only", action="store_true")
  p.add_argument("--compile_threads", type=int, default=None,
                 help="configurations compiled at once (default: one per CPU core)")
  p.add_argument("--tag", default="", help="suffix of each run's setting (see `setting`)")
  p.add_argument("--out", default=default_out(),
                 help="folder of the record file (default $OUT, else benchmarks/results)")
  args = p.parse_args(argv)
  args.command = command("benchmarks.train_speed", argv)
  results = run(args)
  for result in results:
    print(json.dumps(result), flush=True)
  path = records.record_path(args.out, "train_speed", results[0]["device"])
  records.update(path, [records.entry(setting(args, r["attention"], r["spec"]), **r)
                        for r in results])
  return path


if __name__ == "__main__":
  main()
