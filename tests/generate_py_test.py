"""generate.py, the command line: its flags and files, in-process and as a process."""

import sys

import pytest

from lckv_jax import cli
from tests import ROOT
from tests.checkpoint_test import dirs  # noqa: F401  (a module fixture)
from tests.generation_test import _run

sys.path.insert(0, ROOT)
import generate as generate_py  # noqa: E402  (the CLI script at the repository root)


@pytest.mark.parametrize("flags,message", [
    (["--temperature=-1"], "--temperature must be a finite number >= 0"),
    (["--top_p=0"], r"--top_p must be in \(0, 1\]"),
    (["--top_p=1.5"], r"--top_p must be in \(0, 1\]"),
    (["--top_k=-3"], "--top_k must be >= 0"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (["--sink", "2", "0"], "--sink N_SINK WINDOW needs"),
    (["--dtype=float8"], "--dtype must be one of"),
    (["--cache_dtype=int4"], "--cache_dtype must be one of float32, bfloat16, float16, int8, fp8"),
])
def test_generate_cli_bad_flags(dirs, flags, message):
  with pytest.raises(cli.UserError, match=message):
    generate_py.main([f"--checkpoint={dirs['jax']}", "--prompt=hi", *flags])


def test_generate_cli_bad_files(dirs, tmp_path):
  run = lambda *a: generate_py.main(list(a))
  with pytest.raises(cli.UserError, match="--checkpoint=DIR is required"):
    run("--prompt=hi")
  with pytest.raises(cli.UserError, match="does not exist"):
    run(f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi")
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café\n".encode("latin-1"))
  with pytest.raises(cli.UserError, match=f"--prompts_file {latin} is not UTF-8 text"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={latin}")
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  with pytest.raises(cli.UserError, match="holds no prompt"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={blank}")
  with pytest.raises(cli.UserError, match="--prompts_file .*nope.txt: No such file"):
    run(f"--checkpoint={dirs['jax']}", f"--prompts_file={tmp_path / 'nope.txt'}")
  with pytest.raises(cli.UserError, match="give --prompt"):
    run(f"--checkpoint={dirs['jax']}")
  with pytest.raises(cli.UserError, match="prompt 1 is empty"):
    run(f"--checkpoint={dirs['jax']}", "--prompt=a", "--prompt=")


def test_cli_without_checkpoint_explains_and_exits_2():
  out = _run(["generate.py", "--prompt=hi"])
  assert out.returncode == 2
  assert "train.py --config=configs/tiny.py" in out.stderr
  assert "lckv_jax.convert from-hf" in out.stderr


def test_cli_streams_from_a_checkpoint(tmp_path, tiny_model):
  from lckv_jax.checkpoint import save_model
  save_model(str(tmp_path / "ckpt"),
             tiny_model(std=0.1, sliding_window=3, layer_types="lckv", vocab_size=256))
  (tmp_path / "prompts.txt").write_text("ab\nxyz\n")
  out = _run(["generate.py", f"--checkpoint={tmp_path / 'ckpt'}", "--max_new_tokens=4",
              f"--prompts_file={tmp_path / 'prompts.txt'}"])
  assert out.returncode == 0, out.stderr
  assert "tokens/s" in out.stderr
  assert out.stdout.count("xyz") == 1


def test_cli_generates_with_a_quantized_cache(tmp_path, tiny_model, capsys):
  from lckv_jax.checkpoint import save_model
  save_model(str(tmp_path / "ckpt"),
             tiny_model(std=0.1, sliding_window=3, layer_types="lckv", vocab_size=256))
  for cache in ("int8", "fp8"):
    assert generate_py.main([f"--checkpoint={tmp_path / 'ckpt'}", "--max_new_tokens=4",
                             "--prompt=ab", "--prompt=xyz", f"--cache_dtype={cache}"]) == 0
    out = capsys.readouterr()
    assert out.out.count("xyz") == 1 and "tokens/s" in out.err
