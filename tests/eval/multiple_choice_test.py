"""Offline multiple-choice tasks: scoring, the task files and the command line."""

import json

import numpy as np
import pytest

from lckv_jax import checkpoint
from lckv_jax.eval import lm_eval_adapter, multiple_choice
from tests.cli_test import _user_error, _write
from tests.eval.perplexity_test import LIMIT, ckpt, lckv_model, model  # noqa: F401  (fixtures)

TASK = {"context": "The sky is", "choices": ["blue", "green"], "label": 0}


def test_multiple_choice(lckv_model, tmp_path, capsys):
  examples = [{"context": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
              {"context": "2 + 2 =", "choices": ["4", "5"], "label": 1},
              {"context": "Cats say", "choices": ["meow", "woof", "moo", "quack"], "label": 2}]
  path = tmp_path / "task.jsonl"
  path.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
  loaded = multiple_choice.load_task(str(path))
  assert loaded == examples
  lm = lm_eval_adapter.LCKVEvalModel(lckv_model, max_length=8, batch_size=1)
  r = multiple_choice.evaluate(lm, loaded)
  assert r["n"] == 3
  direct = lm.loglikelihood([(e["context"], " " + c) for e in examples for c in e["choices"]])
  flat = [ll for lls in r["loglikelihoods"] for ll in lls]
  np.testing.assert_allclose(flat, [ll for ll, _ in direct], rtol=1e-6)
  acc = np.mean([int(np.argmax(lls)) == e["label"] for lls, e in zip(r["loglikelihoods"], examples)])
  assert r["acc"] == acc
  # The documented delimiter: choices with their own leading space and --delimiter='' score
  # the same.
  spaced = [{**e, "choices": [" " + c for c in e["choices"]]} for e in examples]
  assert multiple_choice.evaluate(lm, spaced, "")["loglikelihoods"] == r["loglikelihoods"]
  # The CLI, on a saved checkpoint.
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_model(ckpt, lckv_model)
  multiple_choice.main(["--checkpoint", ckpt, "--tasks", str(path), "--byte_tokenizer",
                        "--max_length=8", "--batch_size=1"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["task"] == "task.jsonl" and out["acc"] == acc and out["n"] == 3
  # Malformed files name the line and the field.
  path.write_text(json.dumps({"context": "a", "choices": ["b"], "label": 3}) + "\n")
  with pytest.raises(ValueError, match=r"task.jsonl:1: field 'label'"):
    multiple_choice.load_task(str(path))


@pytest.mark.parametrize("rows,match", [
    ([], r"no examples in .*task.jsonl"),
    ([{"choices": ["a"], "label": 0}], r"task.jsonl:1: missing field\(s\) \['context'\]"),
    ([TASK, {"context": "x", "choices": ["a"]}], r"task.jsonl:2: missing field\(s\) \['label'\]"),
    ([{**TASK, "label": 2}], r"task.jsonl:1: field 'label' must be an integer in 0..1, got 2"),
    ([{**TASK, "label": True}], r"field 'label' must be an integer"),
    ([{**TASK, "choices": []}], r"field 'choices' must be a non-empty list of strings"),
    ([["a", "b"]], r"task.jsonl:1: a row must be a JSON object"),
])
def test_malformed_task_files(tmp_path, rows, match):
  path = _write(tmp_path / "task.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=match):
    multiple_choice.load_task(path)


def test_non_utf8_task_file(tmp_path):
  path = _write(tmp_path / "task.jsonl", b'{"context": "caf\xe9", "choices": ["a"], "label": 0}')
  with pytest.raises(ValueError, match=r"task.jsonl:1: not UTF-8 text: byte 0xe9"):
    multiple_choice.load_task(path)


def test_multiple_choice_command_line(ckpt, tmp_path, capsys):
  task = _write(tmp_path / "task.jsonl", json.dumps(TASK) + "\n")
  run = lambda argv, match: _user_error(multiple_choice.main, argv, multiple_choice.PROG,
                                        capsys, match)
  run(["--checkpoint", ckpt, "--tasks", _write(tmp_path / "empty.jsonl", "")],
      r"no examples in .*empty.jsonl")
  run(["--checkpoint", ckpt, "--tasks", str(tmp_path / "missing.jsonl")],
      r"--tasks='.*missing.jsonl': no such file")
  run(["--checkpoint", ckpt, "--tasks", task, "--max_length", str(LIMIT + 1)],
      rf"max_length={LIMIT + 1} must be in 1..{LIMIT}")
  run(["--checkpoint", ckpt, "--tasks", task, "--batch_size", "0"], r"batch_size must be")
  run(["--checkpoint", str(tmp_path / "nope"), "--tasks", task], r"--checkpoint='.*nope'")
