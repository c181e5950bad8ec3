"""Generates text from a model checkpoint, streaming tokens as they come.

  python generate.py --checkpoint=DIR --prompt="Once upon a time" --max_new_tokens=64
  python generate.py --checkpoint=DIR --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

A checkpoint is a directory written by `lckv_jax.checkpoint.save_model` (training exports, or
`python -m lckv_jax.convert from-hf SRC DST`). The tokenizer is the HF tokenizer saved in the
checkpoint directory if there is one, else UTF-8 bytes (models with a vocabulary of >= 256).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_NO_CHECKPOINT = """\
generate.py needs --checkpoint=DIR, a model directory (config.json + params/). Get one by
  training:    python train.py --config=configs/tiny.py --workdir=DIR   (then use its export)
  converting:  python -m lckv_jax.convert from-hf SRC DST              (a HF Llama/LCKV model)
and run:       python generate.py --checkpoint=DIR --prompt="Hello"
"""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(checkpoint: str, vocab_size: int):
  """The checkpoint's HF tokenizer if saved beside it, else bytes (vocab >= 256), else an error."""
  if any(os.path.exists(os.path.join(checkpoint, f)) for f in _TOKENIZER_FILES):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(checkpoint)
  from lckv_jax.generation import ByteTokenizer
  if vocab_size < 256:
    raise SystemExit(f"no tokenizer in {checkpoint} and the vocabulary ({vocab_size}) is too "
                     "small for the byte-level fallback (needs >= 256)")
  return ByteTokenizer()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
  args = parser.parse_args(argv)

  if not args.checkpoint:
    sys.stderr.write(_NO_CHECKPOINT)
    return 2
  prompts = list(args.prompt or [])
  if args.prompts_file:
    with open(args.prompts_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    parser.error("give --prompt or --prompts_file")

  import jax
  import numpy as np
  from lckv_jax.checkpoint import load_model
  from lckv_jax.generation import generate

  model = load_model(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
  tokenizer = load_tokenizer(args.checkpoint, model.config.vocab_size)
  eos_id = args.eos_id if args.eos_id is not None else getattr(tokenizer, "eos_token_id", getattr(tokenizer, "eos_id", None))

  # Streaming: one row prints as it comes; a batch prints each row when done.
  single = len(prompts) == 1
  generated: list[list[int]] = [[] for _ in prompts]
  shown = [""]

  def stream(tokens_B, active_B):
    for r, (t, a) in enumerate(zip(np.asarray(tokens_B), np.asarray(active_B))):
      if a:
        generated[r].append(int(t))
    if single:
      text = tokenizer.decode(generated[0])
      sys.stdout.write(text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text

  if single:
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
  t0 = time.perf_counter()
  out = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, eos_id=eos_id, prefill_iterations=args.prefill_iterations,
                 sink=tuple(args.sink) if args.sink else None, stream=stream)
  jax.effects_barrier()
  seconds = time.perf_counter() - t0
  if single:
    sys.stdout.write("\n")
  else:
    for p, text in zip(prompts, out.texts):
      sys.stdout.write(f"{p}{text}\n---\n")
  n = sum(len(t) for t in out.tokens)
  decode_s = max(out.seconds - out.prefill_seconds, 1e-9)
  sys.stderr.write(
      f"{n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s overall (compilation "
      f"included), {max(n - len(prompts), 0) / decode_s:.1f} tokens/s decoding\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
