"""train.py, the command line: user errors in one line (exit 2), divergence (exit 3), SIGTERM
(exit 75), --init_from, and what a finished run prints and exports."""

import json
import os
import subprocess
import sys

import pytest

from lckv_jax import cli
from tests import ROOT
from tests.train.checkpointing_test import _saved_model, _steps


def test_train_py_reports_a_bad_config_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.model.layer_types=garbage"], cwd=ROOT, capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 2
  err = [l for l in out.stderr.splitlines() if l.startswith("train.py: error:")]
  assert len(err) == 1 and "layer_types='garbage'" in err[0]
  assert "Traceback" not in out.stderr


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  import signal
  import time
  args = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
          "--config.model.hidden_size=32", "--config.model.num_heads=4",
          "--config.model.intermediate_size=64", "--config.model.layer_types=cla",
          "--config.steps=100000", "--config.log_every=1", "--config.data.max_documents=20",
          "--config.checkpoint.every=0", "--config.progress_bar=False"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 150
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  assert proc.returncode == 75  # EX_TEMPFAIL: preempted, requeue
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert steps and steps[0] >= 2


def test_train_py_init_from_another_shape_trains_and_says_what_it_took(tmp_path):
  m = _saved_model(tmp_path / "m", hidden_size=48, num_layers=2, layer_types="llama",
                   max_position_embeddings=128)
  out = _train_py(f"--workdir={tmp_path / 'wd'}", f"--init_from={m}", "--max_steps=2",
                  "--config.steps=2", "--config.eval_every=0")
  assert out.returncode == 0, out.stderr[-2000:]
  took = next(l for l in out.stdout.splitlines() if "the model is the checkpoint's" in l)
  assert "hidden_size=48 (config: 192)" in took and "num_layers=2 (config: 4)" in took
  from lckv_jax import checkpoint
  assert checkpoint.load_config(str(tmp_path / "wd" / "model")).hidden_size == 48


def _train_py(*args, timeout=240):
  return subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config.model.layer_type=cla"], "did you mean config.model.layer_types?"),
    (["--config.optimizer.lr=-1"], "config.optimizer.lr must be a number in (0, inf)"),
    (["--config.optimizer.lr=abc"], "could not convert string to float"),
    (["--config=configs/nope.py"], "config file 'configs/nope.py' does not exist"),
])
def test_train_py_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
  out = _train_py(f"--workdir={tmp_path}", *args)
  assert out.returncode == cli.EXIT_USER_ERROR, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0] and lines[0].startswith("train.py: error:"), lines
  debug = _train_py(f"--workdir={tmp_path}", *args, "--debug")
  assert debug.returncode != 0 and ("Traceback" in debug.stderr or "FATAL" in debug.stderr or
                                    message in debug.stderr)


def test_train_py_divergence_exits_3_naming_the_step(tmp_path):
  out = _train_py(f"--workdir={tmp_path}", "--config.model.hidden_size=32",
                  "--config.model.num_heads=4", "--config.model.intermediate_size=64",
                  "--config.data.max_documents=20", "--config.progress_bar=False",
                  "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
                  "--config.checkpoint.every=1", "--max_steps=30")
  assert out.returncode == cli.EXIT_DIVERGED, out.stderr[-3000:]
  err = [line for line in out.stderr.splitlines() if "error:" in line]
  assert len(err) == 1 and "training diverged at step" in err[0], out.stderr[-3000:]
  assert _steps(str(tmp_path)) == []  # the first step overflowed: nothing non-finite saved


def test_a_finished_run_exports_its_model_and_the_printed_next_command_works(tmp_path):
  wd = tmp_path / "wd"
  out = _train_py(f"--workdir={wd}", "--config.model.hidden_size=32", "--config.model.num_heads=4",
                  "--config.model.intermediate_size=64", "--config.data.max_documents=20",
                  "--config.progress_bar=False", "--config.steps=3", "--config.eval_every=0")
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"exported the model to {wd / 'model'}" in out.stdout
  assert "done: step 3 of 3" in out.stdout and f"{wd}/metrics.jsonl" in out.stdout
  command = next(line.strip() for line in out.stdout.splitlines()
                 if line.strip().startswith("python generate.py"))
  args = [a.strip("'") for a in command.split(" ", 2)[2].split(" --prompt=")]
  gen = subprocess.run([sys.executable, "generate.py", args[0], f"--prompt={args[1]}",
                        "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert gen.stdout.startswith("In the beginning")
  # The picture and the TensorBoard command it prints work too (tensorboard is a requirement).
  assert f"plotted in {wd}/metrics.png" in out.stdout
  assert (wd / "metrics.png").read_bytes()[:4] == b"\x89PNG"
  assert f"tensorboard --logdir {wd}/tensorboard" in out.stdout
  import importlib.util
  assert importlib.util.find_spec("tensorboard") is not None
  # The printed evaluate command, as printed.
  command = next(line.strip() for line in out.stdout.splitlines()
                 if line.strip().endswith("--mode=evaluate"))
  assert command.startswith("python train.py ")
  ev = subprocess.run([sys.executable, *command.split(" ")[1:]], cwd=ROOT, capture_output=True,
                      text=True, timeout=240)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] == 3
  # An explicit export target that exists is refused before any training.
  again = _train_py(f"--workdir={tmp_path / 'wd2'}", f"--export_model={wd / 'model'}")
  assert again.returncode == cli.EXIT_USER_ERROR and "already exists" in again.stderr
  assert not os.path.exists(tmp_path / "wd2" / "checkpoints")
