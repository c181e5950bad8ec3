"""study.py end to end on two tiny configurations: train, measure, resume an interrupted
configuration, skip finished ones, report (the runner's parts: tests/train/study_test.py)."""

import json
import os
import subprocess
import sys

from tests import ROOT

FLAGS = ["--config=configs/tiny.py", "--steps=4", "--set", "batch_size=2", "--set", "seq_len=32",
         "--set", "log_every=1"]


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("LCKV_DEBUG", None)
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


def test_the_study_trains_measures_resumes_and_reports(tmp_path):
  wd = str(tmp_path / "study")
  # An interrupted configuration: lckv stopped after 2 of its 4 steps, with a checkpoint.
  out = _run("train.py", f"--workdir={wd}/lckv", "--config=configs/tiny.py",
             "--config.model.layer_types=0_2_2_3", "--config.steps=4", "--config.batch_size=2",
             "--config.seq_len=32", "--config.log_every=1", "--max_steps=2")
  assert out.returncode == 0, out.stderr[-2000:]
  # Both at once, sharing the (CPU) device: each trains with its progress in its own log.
  out = _run("study.py", f"--workdir={wd}", "--grid=llama,lckv", "--no_throughput",
             "--task_examples=10", "--jobs=2", *FLAGS)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  log = out.stdout
  assert "study: 2 configurations, 0 done, 2 to run (4 steps each) in" in log
  assert "; 2 at once" in log
  for name in ("llama", "lckv"):
    assert f"{name}: training, progress in {wd}/{name}.log" in log
    assert "step" in open(os.path.join(wd, f"{name}.log")).read()
  assert "[1/2] llama (baseline): layer_types=0_1_2_3, 4 KV layers" in log
  assert "[2/2] lckv (custom): layer_types=0_2_2_3, 3 KV layers, iterative (resuming)" in log
  with open(os.path.join(wd, "lckv", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4]  # resumed at step 3, nothing trained twice
  with open(os.path.join(wd, "study.json")) as f:
    records = {r["name"]: r for r in json.load(f)}
  assert sorted(records) == ["lckv", "llama"]
  lckv = records["lckv"]
  assert lckv["kv_layers"] == 3 and lckv["cyclic"] and lckv["steps"] == 4
  # The parallel plan and the exact sequential model score the same held-out tokens.
  assert lckv["eval_tokens"] == records["llama"]["eval_tokens"] > 0
  assert abs(lckv["eval_loss_sequential"] - lckv["eval_loss"]) < 0.5
  assert "eval_loss_sequential" not in records["llama"]  # no cycle: the two are one model
  task = lckv["tasks"]["heldout_continuation.jsonl"]
  assert task["n"] == 10 and 0 <= task["acc"] <= 1
  assert records["llama"]["kv_bytes_per_token"] == 4 / 3 * lckv["kv_bytes_per_token"]
  assert lckv["train_tokens_per_s"] > 0 and lckv["train_shared_device"]
  for name in ("study.md", "study_ppl_vs_kv.png"):
    assert os.path.getsize(os.path.join(wd, name)) > 0
  # Both shared the device and no timing pass ran (--no_throughput): no cost is drawn from their
  # logged tokens/s (tests/train/study_test.py draws the figure from timed records).
  assert not os.path.exists(os.path.join(wd, "study_train_cost.png"))
  # Done configurations are skipped; the report can be drawn again on its own.
  out = _run("study.py", f"--workdir={wd}", "--grid=llama,lckv", "--no_throughput", *FLAGS)
  assert out.returncode == 0 and "2 done, 0 to run" in out.stdout, out.stderr[-2000:]
  out = _run("study.py", f"--workdir={wd}", "--report_only", "--config=configs/tiny.py")
  assert out.returncode == 0 and "wrote " in out.stdout


def test_the_study_refuses_bad_flags_in_one_line(tmp_path):
  out = _run("study.py", f"--workdir={tmp_path}", "--config=configs/tiny.py", "--set", "steps")
  assert out.returncode == 2 and "give FIELD=VALUE" in out.stderr
  assert out.stderr.count("\n") == 1, out.stderr
  out = _run("study.py", f"--workdir={tmp_path}", "--config=configs/tiny.py", "--grid=llama,0_9")
  assert out.returncode == 2 and "0_9" in out.stderr, out.stderr
  out = _run("study.py", f"--workdir={tmp_path}", "--config=configs/tiny.py", "--report_only")
  assert out.returncode == 2 and "no records" in out.stderr
