"""How every command-line entry point reports errors (lckv_jax.cli): a user error is one line on
stderr and exit code 2, `--debug` shows the traceback. The real `__main__` blocks, in processes;
`_user_error` runs one in-process (the command-line tests of each module use it)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from lckv_jax import cli
from lckv_jax.eval import perplexity as ppl
from tests import ROOT
from tests.checkpoint_test import damaged, dirs  # noqa: F401  (dirs: a module fixture)


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


_DRIVER = textwrap.dedent("""
    import contextlib, io, json, runpy, sys, traceback, warnings
    warnings.simplefilter("ignore")
    out = []
    for target, argv in json.loads(sys.argv[1]):
      err = io.StringIO()
      sys.argv = [target] + argv
      code = 0
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
          if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
          else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit as e:
          code = e.code
        except Exception:
          code, _ = "raised", traceback.print_exc(file=err)
      out.append([code, err.getvalue()])
    print(json.dumps(out))
""")


def _run(args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("LCKV_DEBUG", None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)


def test_clis_report_user_errors_in_one_line_and_exit_2(dirs, tmp_path):
  wd = tmp_path / "workdir"
  (wd / "checkpoints").mkdir(parents=True)
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café\n".encode("latin-1"))
  dmg = damaged(dirs["jax"], tmp_path / "dmg")
  ck = f"--checkpoint={dirs['jax']}"
  cases = [
      ("generate.py", [f"--checkpoint={tmp_path / 'nowhere'}", "--prompt=hi"], "does not exist"),
      ("generate.py", [f"--checkpoint={wd}", "--prompt=hi"], "training workdir"),
      ("generate.py", [ck, f"--prompts_file={latin}"], "not UTF-8"),
      ("generate.py", [ck, "--prompt=hi", "--temperature=-1"], "--temperature"),
      ("lckv_jax.convert", ["from-hf", dirs["hf"], dirs["hf"]], "is the source"),
      ("lckv_jax.convert", ["to-hf", str(wd), str(tmp_path / "x")], "training workdir"),
      ("generate.py", [ck, "--prompt=hi", "--temperature=-1", "--debug"], None),
  ]
  out = _run(["-c", _DRIVER, json.dumps([c[:2] for c in cases])])
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for (target, argv, message), (code, err) in zip(cases, results):
    if message is None:  # --debug: the traceback instead
      assert code == "raised" and "Traceback" in err and "--temperature" in err, err
      continue
    prog = "generate.py" if target == "generate.py" else "python -m lckv_jax.convert"
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), (argv, err)
    assert message in err, (argv, err)
  # A real process: orbax's noise ("Event loop is closed", advice) must not reach stderr.
  out = _run(["generate.py", f"--checkpoint={dmg}", "--prompt=hi"])
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and "damaged model checkpoint" in out.stderr, out.stderr


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
