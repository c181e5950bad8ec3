"""Offline multiple-choice tasks, scored through the lm-eval adapter's `loglikelihood`.

    python -m lckv_jax.eval.multiple_choice --checkpoint DIR --tasks a.jsonl [--tasks b.jsonl]

A task file is JSON lines `{"context": str, "choices": [str, ...], "label": int}`. Each choice
is scored as the continuation `delimiter + choice` of the context (lm-eval's convention, default
delimiter " "); `acc` takes the highest log-likelihood, `acc_norm` the highest per UTF-8 byte of
the continuation.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from lckv_jax import cli

PROG = "python -m lckv_jax.eval.multiple_choice"
_FIELDS = ("context", "choices", "label")


def load_task(path: str) -> list[dict]:
  """Reads and validates a JSONL task file; errors name the line and the field."""
  from lckv_jax.data.sources import read_jsonl
  examples = []
  for n, ex in read_jsonl(path):
    examples.append(_check_example(ex, f"{path}:{n}"))
  if not examples:
    raise ValueError(f"no examples in {path}: give JSON lines {{\"context\": str, \"choices\": "
                     "[str, ...], \"label\": int}")
  return examples


def _check_example(ex, where: str) -> dict:
  if not isinstance(ex, dict):
    raise ValueError(f"{where}: a row must be a JSON object with fields {list(_FIELDS)}, got "
                     f"{type(ex).__name__}")
  missing = [k for k in _FIELDS if k not in ex]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}; a row has {list(_FIELDS)}")
  if not isinstance(ex["context"], str):
    raise ValueError(f"{where}: field 'context' must be a string, got {ex['context']!r}")
  choices = ex["choices"]
  if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings, got "
                     f"{choices!r}")
  label = ex["label"]
  if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
    raise ValueError(f"{where}: field 'label' must be an integer in 0..{len(choices) - 1}, got "
                     f"{label!r}")
  return ex


def evaluate(lm, examples: Sequence[dict], delimiter: str = " ") -> dict:
  """Accuracy of `lm` (an object with lm-eval's `loglikelihood`) on the examples.

  Returns {'acc', 'acc_norm', 'n', 'loglikelihoods'} (the last: one list per example).
  """
  requests, owner = [], []
  for k, ex in enumerate(examples):
    for choice in ex["choices"]:
      requests.append((ex["context"], delimiter + choice))
      owner.append(k)
  scores = lm.loglikelihood(requests)
  per_example: list[list[float]] = [[] for _ in examples]
  for k, (ll, _) in zip(owner, scores):
    per_example[k].append(ll)
  correct = correct_norm = 0
  for ex, lls in zip(examples, per_example):
    lens = [max(len((delimiter + c).encode("utf-8")), 1) for c in ex["choices"]]
    correct += int(np.argmax(lls)) == ex["label"]
    correct_norm += int(np.argmax(np.asarray(lls) / np.asarray(lens))) == ex["label"]
  n = len(examples)
  return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n,
          "loglikelihoods": per_example}


def main(argv: Sequence[str] | None = None) -> None:
  from lckv_jax import checkpoint
  from lckv_jax import tokenizer as tok_lib
  from lckv_jax.eval import lm_eval_adapter
  from lckv_jax.eval import perplexity as ppl_lib
  p = cli.ArgumentParser(prog=PROG)
  p.add_argument("--checkpoint", required=True, help="lckv-jax model checkpoint directory")
  p.add_argument("--tasks", action="append", required=True, help="a JSONL task file (repeatable)")
  p.add_argument("--delimiter", default=" ",
                 help="put between context and each choice (default one space, as lm-eval); "
                 "use '' when choices begin with their own space")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_length", type=int, default=None)
  p.add_argument("--forward_passes", type=int, default=None)
  p.add_argument("--backward_passes", type=int, default=None)
  p.add_argument("--byte_tokenizer", action="store_true", help="UTF-8 bytes as token ids")
  args = p.parse_args(argv)
  # Every check that needs no model first: loading one takes minutes.
  path = ppl_lib.checkpoint_dir(args.checkpoint, "--checkpoint")
  lm_eval_adapter.check_options(checkpoint.load_config(path), args.max_length, args.batch_size)
  ppl_lib.check_passes(args.forward_passes, args.backward_passes)
  for task in args.tasks:
    if not os.path.isfile(task):
      raise FileNotFoundError(f"--tasks={task!r}: no such file")
  tasks = [(task, load_task(task)) for task in args.tasks]
  lm = lm_eval_adapter.LCKVEvalModel.from_checkpoint(
      path, tok_lib.ByteTokenizer() if args.byte_tokenizer else None,
      flag="--checkpoint", batch_size=args.batch_size, max_length=args.max_length,
      forward_passes=args.forward_passes, backward_passes=args.backward_passes)
  for task, examples in tasks:
    r = evaluate(lm, examples, args.delimiter)
    print(json.dumps({"task": os.path.basename(task), "acc": r["acc"],
                      "acc_norm": r["acc_norm"], "n": r["n"]}))


if __name__ == "__main__":
  cli.run(main, prog=PROG)
