"""Training-step speed of the model alone: compile time, step time, tokens/s and MFU.

A step is `value_and_grad` of the next-token loss plus an AdamW update, jitted, on random tokens,
bf16 compute and float32 parameters. FLOPs count the iteration plan's extra passes
(`lckv_jax.train.flops`). Writes one JSON per run.

  python benchmarks/train_speed.py --shape=1b --layer_types=lckv --batch=8 --seq=2048
  python benchmarks/train_speed.py --shape=7b --compile_only   # AOT compile on abstract inputs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lckv_jax import Transformer
from lckv_jax.train.config import model_from_file
from lckv_jax.loss import next_token_loss
from lckv_jax.train.flops import flops_per_token, peak_flops_per_device

SHAPES = ("tiny", "50m", "1b", "7b", "30b")  # the model sections of configs/<shape>.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def packed_rows(batch: int, seq: int, docs: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Positions and segment ids [batch, seq] of `docs` documents per row at random boundaries,
  positions restarting per document (what the data pipeline makes with document_mask=True)."""
  rng = np.random.RandomState(seed)
  seg, pos = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
  for r in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False))
    for d, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq])):
      seg[r, a:b], pos[r, a:b] = d + 1, np.arange(b - a)
  return jnp.asarray(pos), jnp.asarray(seg)


def run(args) -> dict:
  config = model_from_file(
      os.path.join(ROOT, "configs", f"{args.shape}.py"), layer_types=args.layer_types,
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
                attention=abstract._fused_impl() or "dense",
                jax=jax.__version__, python=platform.python_version(),
                command="python " + " ".join(sys.argv))
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


def main():
  p = argparse.ArgumentParser()
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
  p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  args = p.parse_args()
  result = run(args)
  print(json.dumps(result))
  os.makedirs(args.out, exist_ok=True)
  name = (f"train_speed_{args.shape}_{args.layer_types.replace(':', '-')}_b{args.batch}"
          f"_s{args.seq}_{args.remat}_{result['attention']}"
          f"{f'_docs{args.docs}' if args.docs > 1 else ''}.json")
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
