"""python -m lckv_jax.serve --checkpoint DIR: an OpenAI-compatible server for a model checkpoint.

The batch is `--max_batch` rows, or the most rows whose KV cache fits `--memory_bytes` beside the
weights (`cache.cache_bytes` with the server's cache length): a model with a smaller KV cache
(LCKV) serves more requests at once. Warm-up compiles everything before the port opens and
prints how long it took; SIGTERM stops accepting, lets the running requests finish, then exits
(with the signal's status, as uvicorn re-raises it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lckv_jax import cli
from lckv_jax.serve import (PREFILL_CHUNK, PREFILL_ROWS, PREFILL_TOKENS_PER_TICK, STEPS_PER_TICK,
                             group_sizes)

PROG = "python -m lckv_jax.serve"


def rows_that_fit(config, memory_bytes: int, weights_bytes: int, max_len: int,
                  cache_dtype=None, prefill_tokens: int = PREFILL_CHUNK,
                  prefill_rows: int = 1) -> int:
  """The largest batch whose cache (in `cache_dtype`, scales counted) and decode state fit beside
  the weights, the prompts being prefilled (a call of `prefill_tokens` tokens: its activations,
  and the cache of its job's `prefill_rows` rows) and the reserve `benchmarks.throughput` sizes
  its batches with (`cache.reserve_bytes`: XLA's workspaces, fragmentation), so that the two
  compare at the same memory."""
  from lckv_jax.cache import cache_bytes, prefill_bytes_per_token, reserve_bytes
  row_cache = cache_bytes(config, 1, max_len, cache_dtype, metadata=True)
  per_row = row_cache + 4 * config.vocab_size * 4  # + logits, probabilities, sampling state
  free = (memory_bytes - weights_bytes - reserve_bytes(memory_bytes) - prefill_rows * row_cache
          - prefill_tokens * prefill_bytes_per_token(config, slots=max_len))
  return max(0, free // per_row)


def prefill_rows_that_fit(most: int, fit) -> int:
  """The most prompts a prefill call takes (a power of two up to `most`) when they may cost the
  batch at most 1/16 of its rows: `fit(k)` is the batch beside a job of k rows. A job's cache
  and activations grow with its rows; at 7b, a row of llama's cache is 537 MB, so llama
  prefills one prompt at a time there and LCKV a few (1b: 8).

  Giving jobs 1/8 of the rows (7b LCKV at 24 GB: 8 prompts a call and 188 rows, against 4 and
  198) did not serve its burst faster on the H200 (2,521 output tokens/s against 2,494-2,587),
  so the rows stay with the batch."""
  alone = fit(1)
  return next(k for k in group_sizes(most) if k == 1 or 16 * fit(k) >= 15 * alone)


def lowered(asked: int, rows: int, fit) -> str:
  """What the server says when `prefill_rows_that_fit` gave jobs of `rows` for `--prefill_rows
  asked`: what the asked jobs would have cost the batch."""
  alone = fit(1)
  return (f"--prefill_rows {asked} lowered to {rows}: jobs of {asked} prompts would leave "
          f"{fit(asked):,} rows of the {alone:,} a job of one leaves (jobs take at most 1/16 of "
          f"the rows; --max_batch sizes the batch by hand)")


def chunk_flag(text: str) -> int | None:
  """--prefill_chunk: a number of tokens; 0 or 'none' prefills every prompt whole."""
  if text.strip().lower() in ("0", "none"):
    return None
  try:
    n = int(text)
  except ValueError:
    n = -1
  if n < 1:
    raise argparse.ArgumentTypeError(f"expected a positive number of tokens, 0 or 'none', got "
                                     f"{text!r}")
  return n


def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a model checkpoint directory")
  p.add_argument("--random_weights", action="store_true",
                 help="serve random bf16 weights of the checkpoint's config.json instead of its "
                 "weights (load tests of a shape nobody trained, as vLLM's --load-format "
                 "dummy; the folder needs config.json only)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--model_name", default=None, help="the model id clients name (default: the "
                 "checkpoint folder's name)")
  p.add_argument("--max_batch", type=int, default=None, help="rows decoded at once")
  p.add_argument("--memory_bytes", type=int, default=None,
                 help="size the batch to this many bytes of weights and cache instead")
  p.add_argument("--max_prompt", type=int, default=None,
                 help="longest prompt in tokens (default: half the model's context)")
  p.add_argument("--max_tokens", type=int, default=None,
                 help="most new tokens per request (default: the rest of the context)")
  p.add_argument("--steps_per_tick", type=int, default=STEPS_PER_TICK,
                 help="decode steps between admissions of new requests")
  p.add_argument("--busy_steps_per_tick", type=int, default=None,
                 help="decode steps between admissions while requests wait for a row: fuller "
                 "prefill calls and less host work per token when saturated, tokens streamed in "
                 "larger bunches (default twice --steps_per_tick)")
  p.add_argument("--max_waiting", type=int, default=256,
                 help="queued requests before new ones get 429")
  p.add_argument("--prefill_chunk", type=chunk_flag, default=PREFILL_CHUNK,
                 help="prompt tokens per prefill call, so a long prompt does not stall the "
                 "running requests (prompts are padded to whole chunks; at most --max_prompt); "
                 f"0 or 'none': each prompt at once (default {PREFILL_CHUNK})")
  p.add_argument("--prefill_widths", type=int, default=None,
                 help="how many widths a prompt's first chunk may take: the multiples of "
                 "--prefill_chunk / N; more pad short prompts less (prompts of 32-512 tokens in "
                 "chunks of 512: 366 slots on average with the default, 302 with 8), for one "
                 "compilation per width and job size at start (default: chunk/4, chunk/2 and "
                 "chunk)")
  p.add_argument("--prefill_tokens_per_tick", type=int, default=None,
                 help="most prompt tokens prefilled between two decode calls (whole calls, at "
                 "least one): larger keeps a large batch full under load, smaller bounds the "
                 f"pause of the running requests (default {PREFILL_TOKENS_PER_TICK}, or twice "
                 "the tokens a full busy tick decodes, rows x --busy_steps_per_tick, where that is "
                 "more)")
  p.add_argument("--prefill_rows", type=int, default=PREFILL_ROWS,
                 help="most prompts prefilled together in one call (prompts of the same call "
                 "shape, the oldest waiting first; --admit_lookahead): fewer, fuller calls "
                 "under load. "
                 "With --memory_bytes, lowered (to a power of two) until the prefill's cache and "
                 "activations take at most 1/16 of the rows; 1 without --prefill_chunk "
                 f"(default {PREFILL_ROWS})")
  p.add_argument("--admit_lookahead", type=int, default=None,
                 help="how many waiting requests past the oldest admission looks through for "
                 "prompts of the same prefill shape, so jobs are full (0: arrival order only; "
                 "default 8 x --prefill_rows)")
  p.add_argument("--cache_dtype", default=None, choices=["int8", "fp8", "bfloat16", "float32"],
                 help="the KV cache's storage; int8 and fp8 quantize it with a float32 scale per "
                 "token and KV head: about half the bytes of bf16, so --memory_bytes admits about "
                 "twice the rows (default: the compute dtype)")
  args = p.parse_args(argv)
  if (args.max_batch is None) == (args.memory_bytes is None):
    raise ValueError("give one of --max_batch or --memory_bytes")
  for flag in ("prefill_rows", "steps_per_tick", "busy_steps_per_tick",
               "prefill_tokens_per_tick", "prefill_widths"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag} must be >= 1, got {value}")
  if args.admit_lookahead is not None and args.admit_lookahead < 0:
    raise ValueError(f"--admit_lookahead must be >= 0, got {args.admit_lookahead}")
  if args.prefill_widths is not None and args.prefill_chunk is None:
    raise ValueError(f"--prefill_widths={args.prefill_widths} needs a --prefill_chunk: the "
                     "widths are those of a chunked prefill's first chunk")

  import jax
  import uvicorn
  from flax import nnx

  from lckv_jax import checkpoint
  from lckv_jax.eval.perplexity import checkpoint_dir
  from lckv_jax.serve.api import create_app
  from lckv_jax.serve.engine import Engine, row_slots
  from lckv_jax.tokenizer import load_tokenizer

  path = checkpoint_dir(args.checkpoint, "--checkpoint")
  stored_config = checkpoint.load_config(path)
  # The tokenizer first: a checkpoint without one fails in a second, not after loading 14 GB.
  tokenizer = load_tokenizer(path, vocab_size=stored_config.vocab_size, flag="--checkpoint",
                             transformers=True)
  if args.random_weights:
    import dataclasses

    from lckv_jax import Transformer
    cfg = dataclasses.replace(stored_config, dtype="bfloat16", param_dtype="bfloat16",
                              scan_layers=False, remat="none")
    # Made op by op on the default device (the GPU's memory, never the host's). Not one jitted
    # program: XLA compiled a 1b model's initialisation for over 100 s on the H200 (7b: over
    # 240 s, "Very slow compile"), where each initialiser alone compiles in milliseconds.
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    print(f"random weights of {path}/config.json (--random_weights)", flush=True)
  else:
    model = checkpoint.load_model(path, scan_layers=False)
  cfg = model.config
  context = cfg.max_position_embeddings
  max_prompt = args.max_prompt or context // 2
  max_tokens = args.max_tokens or context - max_prompt
  batch = args.max_batch
  if batch is None:
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    slots = row_slots(max_prompt, max_tokens, args.prefill_chunk, args.prefill_widths)
    fit = lambda k: rows_that_fit(cfg, args.memory_bytes, weights, slots,  # noqa: E731
                                  args.cache_dtype, k * (args.prefill_chunk or max_prompt), k)
    if args.prefill_chunk is not None:
      asked, args.prefill_rows = args.prefill_rows, prefill_rows_that_fit(args.prefill_rows, fit)
      if args.prefill_rows < asked:
        print(lowered(asked, args.prefill_rows, fit), flush=True)
    batch = fit(1 if args.prefill_chunk is None else args.prefill_rows)
    if batch < 1:
      raise ValueError(f"--memory_bytes={args.memory_bytes}: not even one row's cache fits "
                       f"beside {weights:,} bytes of weights and the reserve")
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  engine = Engine(model, max_batch=batch, max_prompt=max_prompt, max_tokens=max_tokens,
                  eos_ids=eos, steps_per_tick=args.steps_per_tick, max_waiting=args.max_waiting,
                  prefill_chunk=args.prefill_chunk,
                  prefill_tokens_per_tick=args.prefill_tokens_per_tick,
                  prefill_rows=args.prefill_rows, admit_lookahead=args.admit_lookahead,
                  cache_dtype=args.cache_dtype, busy_steps_per_tick=args.busy_steps_per_tick,
                  prefill_widths=args.prefill_widths)
  print(f"{batch} rows of {engine.max_len} cache slots; compiling and running each call once "
        "(warm-up)", flush=True)
  seconds = engine.warm_up()  # runs every call at the full batch: the peak is the server's
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if args.memory_bytes and peak and peak > args.memory_bytes:
    raise ValueError(f"--memory_bytes={args.memory_bytes:,}: {batch} rows peaked at {peak:,} "
                     "bytes in the warm-up; give less memory to the rows (--max_batch)")
  name = args.model_name or os.path.basename(os.path.normpath(path))
  stored = f" {args.cache_dtype}" if args.cache_dtype else ""
  print(f"serving {name} ({cfg.layer_types}) on http://{args.host}:{args.port}: {batch} rows of "
        f"{engine.max_len}{stored} cache slots, prompts up to {max_prompt} tokens (prefilled "
        f"{engine.prefill_chunk or 'whole'} at a time, up to {engine.prefill_rows} at once), up "
        f"to {max_tokens} new; compiled in "
        f"{seconds:.1f} s" + (f"; device memory peak {peak:,} bytes" if peak else ""), flush=True)
  engine.start()
  app = create_app(engine, tokenizer, name)
  # A burst of thousands of clients (a full 1b lckv batch is 5,382 rows) overflows uvicorn's
  # default listen queue of 2,048; the kernel caps this at its somaxconn.
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=None, backlog=16384)
  server = uvicorn.Server(config)
  # SIGTERM or Ctrl-C: uvicorn stops accepting, waits for the open requests (their rows finish
  # decoding), then re-raises the signal, so the process ends as killed by it, after the drain.
  server.run()
  engine.stop(drain=True, timeout=60)
  return 0


def entry() -> None:
  logging.basicConfig(level=logging.WARNING)
  cli.run(main, prog=PROG)


if __name__ == "__main__":
  entry()
