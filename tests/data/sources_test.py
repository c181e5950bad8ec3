"""A user's bad day with data and evaluation, on purpose: non-string or non-UTF-8 text, empty
files, windows past the model's positions, ids past its vocabulary, malformed task files, bad
flags. Each is an error naming the file, line or flag, never a silent number or a traceback; each
command line prints one line on stderr and exits 2 (a traceback with --debug)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lckv_jax import checkpoint, cli
from lckv_jax import tokenizer as tok_lib
from lckv_jax import layer_types as L
from lckv_jax import visualize
from lckv_jax.data import pretokenize, sources, train_tokenizer
from lckv_jax.eval import lm_eval_adapter, multiple_choice
from lckv_jax.eval import perplexity as ppl
from tests import ROOT, tiny
from tests.eval.perplexity_test import MODEL

LIMIT = MODEL["max_position_embeddings"]
TASK = {"context": "The sky is", "choices": ["blue", "green"], "label": 0}


@pytest.fixture(scope="module")
def model():
  return tiny.tiny_model(0, **MODEL, layer_types="0_2_2_3", forward_passes=2, backward_passes=1)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("faults") / "ckpt")
  checkpoint.save_model(path, model)
  return path


def _write(path, data):
  (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
  return str(path)


def _user_error(main, argv, prog, capsys, match):
  """Runs `main` as its `__main__` block does: exit 2 and one line `prog: error: ...`."""
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, argv, prog)
  err = capsys.readouterr().err.splitlines()
  assert exit_info.value.code == cli.EXIT_USER_ERROR, err
  assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
  assert re.search(match, err[0]), err[0]
  return err[0]


# -- data readers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value,kind", [(None, "null"), (12345, "int"), (["a"], "list"),
                                        (1.5, "float")])
def test_jsonl_non_string_text_names_file_and_line(tmp_path, value, kind):
  path = _write(tmp_path / "data.jsonl", json.dumps({"text": "fine"}) + "\n\n"
                + json.dumps({"text": value}) + "\n")
  with pytest.raises(ValueError, match=rf"data.jsonl:3: field 'text' is {kind}, not a string"):
    sources.load_documents(path)


@pytest.mark.parametrize("values,match", [(["a", None], r"row 1 .*'text' is null"),
                                          ([7, 8], r"row 0 .*'text' is int")])
def test_parquet_non_string_text_names_file_and_row(tmp_path, values, match):
  pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (optional)")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": values}), tmp_path / "d.parquet")
  with pytest.raises(ValueError, match=r"d.parquet: " + match):
    sources.load_documents(str(tmp_path / "d.parquet"))
  with pytest.raises(ValueError, match=r"d.parquet: no column data.text_field='body'"):
    sources.load_documents(str(tmp_path / "d.parquet"), "body")


@pytest.mark.parametrize("name,data,match", [
    ("a.txt", b"caf\xe9 latin-1", r"a.txt: not UTF-8 text: byte 0xe9 at byte offset 3"),
    ("b.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"b.jsonl:2: not UTF-8 .* offset 25"),
])
def test_non_utf8_files_name_the_file(tmp_path, name, data, match):
  with pytest.raises(ValueError, match=match):
    sources.load_documents(_write(tmp_path / name, data))


def test_reader_flags(tmp_path):
  with pytest.raises(ValueError, match=r"max_documents must be an integer >= 0.*got -1"):
    sources.read_texts("embedded", max_documents=-1)  # would drop the last document
  with pytest.raises(IsADirectoryError, match=r"--input: .* is a directory"):
    sources.read_texts(str(tmp_path), flag="--input")
  crlf = _write(tmp_path / "w.txt", b"a\r\nb\r\n\r\n\r\n\r\nc")  # as open() reads it
  assert sources.load_documents(crlf) == ["a\nb", "c"]


# -- perplexity and the scorers -------------------------------------------------------------------

def test_perplexity_of_nothing_is_an_error(model):
  for tokens in ([], [5], np.zeros(0, np.int64)):
    with pytest.raises(ValueError, match="no tokens to score"):
      ppl.perplexity(model, tokens, context_len=8)  # was Perplexity(0, 0): ppl 1.0
  with pytest.raises(ValueError, match="no tokens to score"):
    ppl.perplexity_of_text(model, tok_lib.ByteTokenizer(), "a", context_len=8)


def test_windows_past_the_model_are_errors(model):
  tokens = np.random.RandomState(0).randint(0, 128, 20)
  for context_len in (LIMIT + 1, 2048, 0):
    with pytest.raises(ValueError, match=rf"context_len={context_len} must be in 1..{LIMIT} "
                                         rf"\(the model's max_position_embeddings={LIMIT}\)"):
      ppl.perplexity(model, tokens, context_len=context_len)
  with pytest.raises(ValueError, match=r"stride=9 must be in 1..context_len=8"):
    ppl.perplexity(model, tokens, context_len=8, stride=9)
  with pytest.raises(ValueError, match=rf"max_length={LIMIT + 1} must be in 1..{LIMIT}"):
    lm_eval_adapter.LCKVEvalModel(model, max_length=LIMIT + 1)


def test_ids_past_the_vocabulary_are_errors(model):
  with pytest.raises(ValueError, match=r"id 200 is outside 0..127 \(model.vocab_size=128\)"):
    ppl.perplexity(model, [1, 200, 3], context_len=8)
  with pytest.raises(ValueError, match=r"id -1 is outside 0..127"):
    ppl.Scorer(model)(np.array([[1, -1]]), np.array([[2, 3]]))
  with pytest.raises(ValueError, match=r"dtype float64, not integer token ids"):
    ppl.perplexity(model, np.array([1.5, 2.0, 3.0]), context_len=8)
  lm = lm_eval_adapter.LCKVEvalModel(model, max_length=16)
  with pytest.raises(ValueError, match=r"prompt: id 195 .*model.vocab_size=128"):
    lm.greedy_tokens(list("é".encode()), 2)  # UTF-8 bytes >= 128


def test_adapter_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"pretrained='.*nope' does not exist"):
    lm_eval_adapter.LCKVEvalModel.from_checkpoint(str(tmp_path / "nope"), flag="pretrained")
  with pytest.raises(FileNotFoundError, match=r"tokenizer='.*nope': no such file"):
    tok_lib.load_tokenizer(str(tmp_path / "nope"), flag="tokenizer", transformers=True)
  with pytest.raises(FileNotFoundError, match=r"holds no tokenizer files"):
    tok_lib.load_tokenizer(str(tmp_path), flag="tokenizer", transformers=True)
  broken = _write(tmp_path / "tokenizer.json", '{"not": "a tokenizer"')  # was: bytes + warning
  with pytest.raises(ValueError, match=r"tokenizer='.*tokenizer.json': could not load"):
    tok_lib.load_tokenizer(broken, flag="tokenizer", transformers=True)


# -- multiple-choice task files -------------------------------------------------------------------

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


# -- command lines: one line, exit 2 --------------------------------------------------------------

def test_perplexity_command_line(ckpt, tmp_path, capsys):
  text = _write(tmp_path / "t.txt", "hello there")
  run = lambda argv, match: _user_error(ppl.main, argv, ppl.PROG, capsys, match)
  run(["--checkpoint", str(tmp_path / "nope"), "--text_file", text],
      r"--checkpoint='.*nope' does not exist")
  run(["--checkpoint", str(tmp_path), "--text_file", text], re.escape(str(tmp_path)))
  run(["--checkpoint", ckpt, "--text_file", str(tmp_path / "missing.txt")],
      r"--text_file='.*missing.txt': no such file")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "2048"],
      rf"context_len=2048 must be in 1..{LIMIT} \(the model's max_position_embeddings={LIMIT}\)")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "0"], r"context_len=0")
  run(["--checkpoint", ckpt, "--text_file", text, "--context_len", "8", "--stride", "9"],
      r"stride=9 must be in 1..context_len=8")
  run(["--checkpoint", ckpt, "--text_file", text, "--stride", "0"], r"stride=0")
  run(["--checkpoint", ckpt, "--text_file", text, "--batch_size", "0"], r"--batch_size must be")
  for name, data in (("empty.txt", ""), ("one.txt", "a")):
    run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file", _write(tmp_path / name, data)],
        rf"no tokens to score in .*{name}")
  run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file",
       _write(tmp_path / "l1.txt", b"\xe9t\xe9")], r"l1.txt: not UTF-8 text")
  run(["--checkpoint", ckpt, "--byte_tokenizer", "--text_file", _write(tmp_path / "e.txt", "é!")],
      r"e.txt \(tokenized\): id 195 is outside 0..127 \(model.vocab_size=128\)")
  np.save(tmp_path / "ids.npy", np.array([1, 2, 500]))
  run(["--checkpoint", ckpt, "--tokens", str(tmp_path / "ids.npy")],
      r"--tokens='.*ids.npy': id 500 is outside")
  run(["--checkpoint", ckpt, "--tokens", text], r"--tokens='.*t.txt' is not a .npy file")


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


def test_data_command_lines(tmp_path, capsys):
  bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": None}) + "\n")
  out = str(tmp_path / "out.array_record")
  run = lambda argv, match: _user_error(pretokenize.main, argv, pretokenize.PROG, capsys, match)
  run([f"--input={bad}", f"--output={out}"], r"bad.jsonl:1: field 'text' is null, not a string")
  run([f"--input={tmp_path / 'no*.jsonl'}", f"--output={out}"], r"--input: .* matches no file")
  run(["--max_documents=-1", f"--output={out}"], r"--max_documents must be an integer >= 0")
  run(["--max_documents=1", f"--output={tmp_path}"], r"is a directory")
  run = lambda argv, match: _user_error(train_tokenizer.main, argv, train_tokenizer.PROG, capsys,
                                        match)
  prefix = f"--output={tmp_path / 'tok'}"
  run([f"--input={bad}", "--vocab_size=50", prefix], r"bad.jsonl:1: field 'text' is null")
  run(["--vocab_size=0", prefix], r"vocab_size must be a positive integer, got 0")
  run(["--vocab_size=50", f"--output={tmp_path}"], r"must be a file prefix")
  pytest.importorskip("sentencepiece")
  text = _write(tmp_path / "t.txt", "the quick brown fox jumps over the lazy dog\n" * 5)
  run([f"--input={text}", "--vocab_size=5", prefix],
      r"sentencepiece training failed with vocab_size=5.*Vocabulary size is smaller")


def test_layer_types_and_visualize_command_lines(tmp_path, capsys):
  show = visualize.show_main  # `python -m lckv_jax.layer_types show`
  msg = _user_error(show, ["show", "lckvv"], L.PROG, capsys, r"layer_types 'lckvv' is neither")
  assert "llama, lckv, sandwich" in msg and "'0_2_2_3'" in msg  # what is allowed
  _user_error(show, ["show", "0_1_x_3"], L.PROG, capsys, r"bad token 'x' at position 2")
  _user_error(show, ["show", "lckv"], L.PROG, capsys, r"'lckv' needs num_layers")
  _user_error(show, ["show", "lckv:9", "--num_layers", "8"], L.PROG, capsys,
              r"warmup_layers must be in 0..7")
  _user_error(visualize.main, [str(tmp_path / "x.png"), "0_1_x"], visualize.PROG, capsys,
              r"bad token 'x'")
  with pytest.raises(ValueError, match="bad token"):  # --debug: the exception, not one line
    cli.run(show, ["show", "0_1_x", "--debug"], L.PROG)


def _module(args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT, LCKV_DEBUG="0", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=120)


def test_end_to_end_exit_codes(tmp_path):
  """The real `__main__` blocks (seconds each): one line and exit 2; with --debug the traceback."""
  text = _write(tmp_path / "t.txt", "hello")
  r = _module(["lckv_jax.eval.perplexity", "--checkpoint", "nope", "--text_file", text], tmp_path)
  assert r.returncode == 2 and r.stderr.splitlines() == [
      f"{ppl.PROG}: error: --checkpoint='nope' does not exist; give an lckv-jax model checkpoint "
      "directory (config.json and params/)"], r.stderr
  bad = _write(tmp_path / "bad.jsonl", b'{"text": "\xff"}\n')
  r = _module(["lckv_jax.data.pretokenize", f"--input={bad}", "--output=o.ar", "--debug"],
              tmp_path)
  assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
  assert r.stderr.strip().endswith("bad.jsonl:1: not UTF-8 text: byte 0xff at byte offset 10 "
                                   "(invalid start byte); convert the file to UTF-8")
