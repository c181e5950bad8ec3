"""Generates text from a model checkpoint, streaming tokens as they come.

  python generate.py --checkpoint=DIR --prompt="Once upon a time" --max_new_tokens=64
  python generate.py --checkpoint=DIR --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

A checkpoint is a directory written by `lckv_jax.checkpoint.save_model` (training exports, or
`python -m lckv_jax.convert from-hf SRC DST`). The tokenizer is the HF tokenizer saved in the
checkpoint directory (train.py --export_model writes it there), else UTF-8 bytes for a model with
a vocabulary of 256.
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

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_DTYPES = ("float32", "bfloat16", "float16")


class _PromptTokenizer:
  """A training tokenizer (lckv_jax.data.tokenizer) that starts prompts with BOS, as training
  started documents (`data.add_bos`), and returns plain lists of ids."""

  def __init__(self, tok):
    self.tok, self.eos_id = tok, tok.eos_id

  def encode(self, text):
    ids = [int(i) for i in self.tok.encode(text)]
    return ([self.tok.bos_id] if self.tok.bos_id is not None else []) + ids

  def decode(self, ids):
    return self.tok.decode(ids)


def load_tokenizer(checkpoint: str, vocab_size: int):
  """The tokenizer saved beside the checkpoint: a HuggingFace one (from `convert from-hf`, with
  tokenizer_config.json) through transformers; one exported by train.py (tokenizer.model,
  tokenizer.json or vocab.json + merges.txt) through lckv_jax; bytes only for a 256-token model."""
  has = lambda f: os.path.exists(os.path.join(checkpoint, f))
  if has("tokenizer_config.json"):
    try:
      import transformers
    except ImportError:
      raise cli.UserError(f"{checkpoint} holds a HuggingFace tokenizer, which needs transformers: "
                          "pip install transformers") from None
    try:
      return transformers.AutoTokenizer.from_pretrained(checkpoint)
    except Exception as e:  # noqa: BLE001 - tokenizers raise bare Exceptions on damaged files
      raise cli.UserError(f"{checkpoint}: cannot load the tokenizer saved there "
                          f"({cli.one_line(e)})") from e
  if any(has(f) for f in _TOKENIZER_FILES):
    from lckv_jax.data.tokenizer import load_tokenizer as load_training_tokenizer
    tok = load_training_tokenizer(checkpoint)
    if tok.vocab_size > vocab_size:
      raise cli.UserError(f"the tokenizer in {checkpoint} has {tok.vocab_size} tokens but the "
                          f"model only {vocab_size}: they do not belong together")
    return _PromptTokenizer(tok)
  from lckv_jax.generation import ByteTokenizer
  if vocab_size != ByteTokenizer.vocab_size:  # bytes into a 32k model: fluent-looking nonsense
    raise cli.UserError(
        f"no tokenizer in {checkpoint} (tokenizer.model, tokenizer.json, vocab.json) and "
        f"model.vocab_size={vocab_size} is not the byte vocabulary (256): copy the tokenizer "
        "the model was trained with into that directory (train.py --export_model does)")
  return ByteTokenizer()


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

  model = load_model(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {}))
  vocab = model.config.vocab_size
  tokenizer = load_tokenizer(args.checkpoint, vocab)
  eos_id = args.eos_id if args.eos_id is not None else getattr(
      tokenizer, "eos_token_id", getattr(tokenizer, "eos_id", None))
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
  cli.run(main)
