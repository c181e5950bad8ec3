"""Training-step speed of the model alone: compile time, step time, tokens/s and MFU.

A step is `value_and_grad` of the next-token loss plus an AdamW update, jitted, on random tokens,
bf16 compute and float32 parameters. FLOPs count the iteration plan's extra passes
(`lckv_jax.flops`). Each run is an entry of `train_speed_<device>.json` (`records`) under
the setting `setting` names: a re-run of a setting replaces its entry.

  python -m benchmarks.train_speed --shape=1b --layer_types=lckv --batch=8 --seq=2048
  python -m benchmarks.train_speed --shape=7b --compile_only   # AOT compile on abstract inputs
"""

from __future__ import annotations

import argparse
import json
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


def run(args) -> dict:
  config = model_from_file(
      config_path(args.shape), layer_types=args.layer_types,
      forward_passes=args.m, backward_passes=args.b, dtype=args.dtype, param_dtype="float32",
      remat=args.remat, max_position_embeddings=max(2048, args.seq))
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
  if args.compile_only:
    return result
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


def setting(args, attention: str) -> str:
  """'1b_lckv_b8_s2048_dots_cudnn_docs16': shape, layer_types, batch, length, remat, attention
  path and, when packed, the documents per row."""
  return (f"{args.shape}_{args.layer_types.replace(':', '-')}_b{args.batch}_s{args.seq}"
          f"_{args.remat}_{attention}{f'_docs{args.docs}' if args.docs > 1 else ''}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=SHAPES, default="tiny")
  p.add_argument("--layer_types", default="lckv")
  p.add_argument("--m", type=int, default=7)
  p.add_argument("--b", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="full")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--docs", type=int, default=1,
                 help="documents packed per row (segment ids and positions); 1 = one sequence")
  p.add_argument("--compile_only", action="store_true")
  p.add_argument("--out", default=default_out(),
                 help="folder of the record file (default $OUT, else benchmarks/results)")
  args = p.parse_args(argv)
  args.command = command("benchmarks.train_speed", argv)
  result = run(args)
  print(json.dumps(result))
  path = records.record_path(args.out, "train_speed", result["device"])
  records.update(path, [records.entry(setting(args, result["attention"]), **result)])
  return path


if __name__ == "__main__":
  main()
