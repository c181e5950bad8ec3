"""Generates text from a model checkpoint, streaming tokens as they come.

  python generate.py --checkpoint=DIR --prompt="Once upon a time" --max_new_tokens=64
  python generate.py --checkpoint=DIR --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

A checkpoint is a directory written by `lckv_jax.checkpoint.save_model` (training exports, or
`python -m lckv_jax.convert from-hf SRC DST`). The tokenizer is the one saved in the checkpoint
directory (train.py --export_model and convert from-hf write it there), else UTF-8 bytes for a
model with a vocabulary of 256 (`lckv_jax.tokenizer.load_tokenizer`). Prompts start with the
tokenizer's BOS, as training started documents (`data.add_bos`).
"""

from __future__ import annotations

import os
import sys
import time

from lckv_jax import cli

_NO_CHECKPOINT = (
    "--checkpoint=DIR is required: a model directory (config.json + params/), written by "
    "`python train.py --config=configs/tiny.py --workdir=W --export_model=DIR` or "
    "`python -m lckv_jax.convert from-hf SRC DIR`")

_DTYPES = ("float32", "bfloat16", "float16")
# The KV cache's storage (lckv_jax.quant.CACHE_DTYPES; named here so that a bad flag fails before
# jax is imported): int8 and fp8 (e4m3) keep a float32 scale per token and KV head.
_CACHE_DTYPES = _DTYPES + ("int8", "fp8")


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
  """The prompts' ids, each starting with BOS (where the tokenizer has one), as training
  started documents (`data.add_bos`)."""
  from lckv_jax import tokenizer as tok_lib
  return [[int(i) for i in ids] for ids in tok_lib.encode_texts(tokenizer, prompts, add_bos=True)]


def read_prompts(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 file."""
  try:
    with open(path, encoding="utf-8") as f:
      prompts = [line.rstrip("\n") for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise cli.UserError(f"--prompts_file {path} is not UTF-8 text (byte "
                        f"{e.object[e.start]:#04x} at offset {e.start})") from None
  except OSError as e:
    raise cli.UserError(f"--prompts_file {path}: {e.strerror or e}") from None
  if not prompts:
    raise cli.UserError(f"--prompts_file {path} holds no prompt (every line is blank)")
  return prompts


def check_args(args) -> None:
  """One message per bad flag, naming it, its value and what is allowed."""
  if args.max_new_tokens < 1:
    raise cli.UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if not 0 <= args.temperature < float("inf"):
    raise cli.UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                        f"{args.temperature}")
  if args.top_k < 0:
    raise cli.UserError(f"--top_k must be >= 0 (0 = no limit), got {args.top_k}")
  if not 0 < args.top_p <= 1:
    raise cli.UserError(f"--top_p must be in (0, 1] (1 = no limit), got {args.top_p}")
  if args.sink is not None and (args.sink[0] < 0 or args.sink[1] < 1):
    raise cli.UserError(f"--sink N_SINK WINDOW needs N_SINK >= 0 and WINDOW >= 1, got "
                        f"{args.sink[0]} {args.sink[1]}")
  if args.prefill_iterations is not None and args.prefill_iterations < 1:
    raise cli.UserError(f"--prefill_iterations must be >= 1, got {args.prefill_iterations}")
  if args.dtype is not None and args.dtype not in _DTYPES:
    raise cli.UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {args.dtype!r}")
  if args.cache_dtype is not None and args.cache_dtype not in _CACHE_DTYPES:
    raise cli.UserError(f"--cache_dtype must be one of {', '.join(_CACHE_DTYPES)}, got "
                        f"{args.cache_dtype!r}")
  if not args.checkpoint:
    raise cli.UserError(_NO_CHECKPOINT)
  if not os.path.isdir(args.checkpoint):
    what = "is a file, not a directory" if os.path.exists(args.checkpoint) else "does not exist"
    raise cli.UserError(f"--checkpoint={args.checkpoint} {what} (a model directory: config.json "
                        "+ params/)")


def main(argv=None) -> int:
  parser = cli.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", help="model directory (config.json + params/)")
  parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
  parser.add_argument("--prompts_file", help="a file with one prompt per line")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = no limit")
  parser.add_argument("--top_p", type=float, default=1.0, help="1 = no limit")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eos_id", type=int, default=None, help="default: the tokenizer's")
  parser.add_argument("--prefill_iterations", type=int, default=None,
                      help="iterations of a cyclic group over the prompt; default m + b")
  parser.add_argument("--sink", type=int, nargs=2, metavar=("N_SINK", "WINDOW"), default=None,
                      help="StreamingLLM cache: keep N_SINK first tokens and WINDOW recent ones")
  parser.add_argument("--dtype", default=None, help="override the compute dtype (e.g. bfloat16)")
  parser.add_argument("--cache_dtype", default=None,
                      help="the KV cache's storage: int8 or fp8 (quantized, a scale per token and "
                           "KV head) or a float dtype; default the compute dtype")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)

  check_args(args)
  prompts = list(args.prompt or [])
  if args.prompts_file:
    prompts += read_prompts(args.prompts_file)
  if not prompts:
    raise cli.UserError("give --prompt=TEXT (repeat for a batch) or --prompts_file=FILE")
  empty = [i for i, p in enumerate(prompts) if not p]
  if empty:
    raise cli.UserError(f"prompt {empty[0]} is empty: every prompt needs some text")

  import jax
  import numpy as np
  from lckv_jax.checkpoint import load_model
  from lckv_jax.generation import generate
  from lckv_jax.tokenizer import load_tokenizer

  model = load_model(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
  vocab = model.config.vocab_size
  # The tokenizer saved beside the model; bytes only for a 256-token model.
  tokenizer = load_tokenizer(args.checkpoint, vocab_size=vocab, flag="--checkpoint",
                             transformers=True)
  eos_id = args.eos_id if args.eos_id is not None else tokenizer.eos_id
  if args.eos_id is not None and not 0 <= args.eos_id < vocab:
    raise cli.UserError(f"--eos_id must be in [0, {vocab}) (model.vocab_size={vocab}), got "
                        f"{args.eos_id}")

  # Streaming: one row prints as it comes (the prompt with its first token, so that an error in
  # the prompt prints nothing); a batch prints each row when done.
  single = len(prompts) == 1
  generated: list[list[int]] = [[] for _ in prompts]
  shown = [""]

  def stream(tokens_B, active_B):
    for r, (t, a) in enumerate(zip(np.asarray(tokens_B), np.asarray(active_B))):
      if a:
        generated[r].append(int(t))
    if single:
      text = tokenizer.decode(generated[0])
      sys.stdout.write((prompts[0] if len(generated[0]) == 1 else "") + text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text

  t0 = time.perf_counter()
  out = generate(model, prompt_ids(tokenizer, prompts), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, eos_id=eos_id, prefill_iterations=args.prefill_iterations,
                 sink=tuple(args.sink) if args.sink else None, stream=stream,
                 cache_dtype=args.cache_dtype)
  jax.effects_barrier()
  seconds = time.perf_counter() - t0
  if single:
    sys.stdout.write("\n")
  else:
    for p, ids in zip(prompts, out.tokens):
      text = tokenizer.decode(ids)
      sys.stdout.write(f"{p}{text}\n---\n")
  n = sum(len(t) for t in out.tokens)
  decode_s = max(out.seconds - out.prefill_seconds, 1e-9)
  sys.stderr.write(
      f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s overall (compilation "
      f"included), {max(n - len(prompts), 0) / decode_s:.1f} tokens/s decoding\n")
  return 0


if __name__ == "__main__":
  cli.run(main)
