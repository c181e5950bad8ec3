"""The study runner's grid, records, table and plots (lckv_jax/train/study.py); the runner end to
end is in tests/study_py_test.py."""

import json
import os

import numpy as np
import pytest

from lckv_jax import layer_types as L
from lckv_jax.train import study


def test_the_paper_grid_has_every_configuration_once():
  entries = study.grid(12, reductions=(2, 4))
  names = [e.name for e in entries]
  assert names[:6] == ["llama", "llama-seed1", "sandwich-middle:6", "lasagna-bottom:6",
                       "pizza-bottom:6", "sandwich-top:6"]  # the paper's comparisons first
  for target in L.TARGETS:
    for partition in L.PARTITIONS:
      # lasagna-middle with groups of 2 is lasagna-bottom: it runs once, under the first name.
      if (partition, target) != ("lasagna", "middle"):
        assert f"{partition}-{target}:6" in names
      assert f"{partition}-{target}:3" in names
  assert len({(e.layer_types, e.overrides) for e in entries}) == len(entries)
  ablations = [e for e in entries if e.group in ("warm-up", "iterations")]
  assert [e.name for e in ablations] == ["lckv:0", "lckv:4", "lckv:2 m=2", "lckv:2 m=4",
                                         "lckv:2 m=7"]  # lckv:2 is sandwich-top:3, already in
  assert dict(ablations[2].overrides) == {"model.forward_passes": 2}
  # At the base config's m the ablation is lckv:2 (sandwich-top:3) itself: trained once.
  names = [e.name for e in study.grid(12, reductions=(2, 4), base_forward_passes=7)]
  assert "lckv:2 m=4" in names and "lckv:2 m=7" not in names
  by = {e.name: e for e in entries}
  assert by["sandwich-top:3"].kv_layers == 3 and by["sandwich-top:3"].cyclic
  assert not by["lasagna-bottom:6"].cyclic and by["lasagna-bottom:6"].group == "2x"


RECORDS = [
    dict(name="llama", layer_types="0_1_2_3", group="baseline", kv_layers=4, cyclic=False,
         eval_ppl=10.0, kv_bytes_per_token=4096, train_tokens_per_s=1000.0,
         tasks={"heldout_continuation.jsonl": dict(acc=0.5, acc_norm=0.5, n=10)},
         **{"decode_5+2043": dict(batch=8, tokens_per_s=100.0, decode_tokens_per_s=110.0),
            "decode_512+1024": dict(batch=4, tokens_per_s=50.0, decode_tokens_per_s=55.0)},
         prefill_latency_s=0.01),
    dict(name="llama-seed1", layer_types="0_1_2_3", group="baseline", kv_layers=4, cyclic=False,
         eval_ppl=10.4, kv_bytes_per_token=4096, train_tokens_per_s=1000.0),
    dict(name="sandwich-top:2", layer_types="0_2_2_3", group="2x", kv_layers=2, cyclic=True,
         eval_ppl=10.2, eval_ppl_sequential=10.3, kv_bytes_per_token=2048,
         train_tokens_per_s=500.0, **{"decode_5+2043": dict(batch=16, tokens_per_s=180.0,
                                                              decode_tokens_per_s=190.0)}),
    dict(name="lasagna-bottom:2", layer_types="0_0_2_2", group="2x", kv_layers=2, cyclic=False,
         eval_ppl=11.0, kv_bytes_per_token=2048, train_tokens_per_s=1040.0,
         **{"decode_5+2043": dict(batch=16, tokens_per_s=90.0, decode_tokens_per_s=95.0)}),
]


def test_the_report_from_a_fixed_record_file(tmp_path):
  path = tmp_path / study.RECORDS
  study.write_records(str(path), {r["name"]: r for r in RECORDS})
  records = study.read_records(str(path))
  assert list(records) == [r["name"] for r in RECORDS]
  written = study.report(records, str(tmp_path))
  assert sorted(os.path.basename(p) for p in written) == [
      "study.md", "study_ppl_vs_kv.png", "study_throughput_512_1024.png",
      "study_throughput_5_2043.png", "study_train_cost.png"]
  for p in written[1:]:
    assert os.path.getsize(p) > 10_000  # a drawn figure
  md = (tmp_path / "study.md").read_text()
  rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
          if line.startswith("| ") and "---" not in line}
  # Training cost against the mean of the baseline seeds; the exact perplexity where it differs.
  assert "| 2.00x |" in rows["sandwich-top:2"] and "| 10.30 |" in rows["sandwich-top:2"]
  assert "| 0.96x |" in rows["lasagna-bottom:2"]
  assert "| 100 (8) | 50 (4) | 0.010 |" in rows["llama"]
  assert "| 0.500 |" in rows["llama"] and "| – |" in rows["llama-seed1"]
  assert "(2 seeds): 10.000 to 10.400 (spread 0.400)" in md


def test_pareto_front_keeps_the_points_nothing_beats():
  pts = [(100, 10.0), (180, 10.2), (90, 11.0), (180, 10.5), (50, 9.5)]
  assert study.pareto(pts) == [4, 0, 1]


def test_labels_of_points_in_a_column_never_overlap_and_keep_their_order():
  # The study's points share KV sizes: nine labels on one x printed over one another. Drawn
  # from a random column plus a far point, whose label stays where it is.
  rng = np.random.default_rng(3)
  ys = list(rng.uniform(0, 20, size=9))
  points = [(100.0 + rng.uniform(0, 2), y) for y in ys] + [(400.0, 10.0)]
  widths = [60.0] * 10
  off = study.label_offsets(points, widths, height=7.0)
  assert off[-1] == 0.0  # alone in its column
  column = sorted(range(9), key=lambda i: -ys[i])
  placed = [ys[i] + off[i] for i in column]
  assert all(a - b >= 7.0 - 1e-9 for a, b in zip(placed, placed[1:]))  # apart, in order
  assert abs(np.mean(placed) - np.mean(ys)) < 1e-9  # centred on its points


def test_held_out_task_is_a_valid_multiple_choice_file(tmp_path):
  from lckv_jax.eval.multiple_choice import load_task
  docs = [" ".join(f"w{d}_{i}" for i in range(200)) for d in range(3)]
  path = study.heldout_task(docs, str(tmp_path / "t.jsonl"), n=5)
  examples = load_task(path)
  assert len(examples) == 5
  for ex in examples:
    assert len(ex["choices"]) == 4 and len(ex["context"].split()) == 24
    right = ex["choices"][ex["label"]].split()
    start = ex["context"].split()[-1]
    d, i = start[1:].split("_")
    assert right[0] == f"w{d}_{int(i) + 1}"  # the continuation of the context's own passage
  assert open(path).read() == open(study.heldout_task(docs, str(tmp_path / "u.jsonl"), n=5)
                                   ).read()  # deterministic
  with pytest.raises(ValueError, match="too short"):
    study.heldout_task(["a b c"], str(tmp_path / "v.jsonl"))


def test_throughput_runs_are_the_papers_settings_and_are_read_back(monkeypatch, tmp_path):
  calls = []

  def fake_run(cmd, settings, capture=False, env=None):
    calls.append(cmd)
    prompt = int(next(a for a in cmd if a.startswith("--prompt=")).split("=")[1])
    strings = cmd[cmd.index("--layer_types") + 1:cmd.index("--repeats=1")]
    rows = [dict(label=f"study_110m {lt}", batch=16 if "16" in cmd else 40 - prompt // 32 + k,
                 prompt=prompt, tokens_per_s=1000.0 + prompt + k, decode_tokens_per_s=1100.0,
                 prefill_s=0.25 + k) for k, lt in enumerate(strings)]
    return "ceilings: ...\n" + "\n".join(json.dumps(r) for r in rows) + "\n"

  monkeypatch.setattr(study, "_run", fake_run)
  lckv = L.lckv(12, 2)
  entries = [study.Entry("sandwich-top:3", lckv, "2x"),
             study.Entry("lckv:2 m=4", lckv, "iterations", (("model.forward_passes", 4),)),
             study.Entry("llama", L.llama(12), "baseline")]
  settings = study.Settings(config="configs/study_110m.py", workdir=str(tmp_path), steps=1,
                            cap_bytes=25_507_659_776, decode_steps=64)
  out = {}
  for measured in study.measure_throughput(entries, settings, "study_110m"):  # one per process
    for name, got in measured.items():
      out.setdefault(name, {}).update(got)
  assert out["sandwich-top:3"] == {
      "decode_5+2043": dict(batch=40, tokens_per_s=1005.0, decode_tokens_per_s=1100.0),
      "decode_512+1024": dict(batch=24, tokens_per_s=1512.0, decode_tokens_per_s=1100.0),
      "prefill_latency_s": 0.25, "prefill_tokens": 2046, "prefill_rows": 16}
  assert out["llama"]["decode_5+2043"]["batch"] == 41 and out["llama"]["prefill_latency_s"] == 1.25
  # Two processes' worth of settings: the default iterations (two models), and m = 4 (m + b).
  assert len(calls) == 6
  for cmd in calls:
    assert cmd[1:4] == ["-m", "benchmarks.throughput", "--shape=study_110m"]
    assert "--cap_bytes=25507659776" in cmd
  default, m4 = calls[:3], calls[3:]
  assert all(cmd[cmd.index("--layer_types") + 1:cmd.index("--repeats=1")] == [lckv, L.llama(12)]
             and not any(a.startswith("--prefill_iterations") for a in cmd) for cmd in default)
  assert all("--prefill_iterations=6" in cmd for cmd in m4)
  short, long, prefill = default
  assert {"--prompt=5", "--gen=2043", "--max_batch", "--decode_steps=64"} <= set(short)
  assert {"--prompt=512", "--gen=1024", "--max_batch"} <= set(long)
  assert {"--prompt=2046", "--gen=2", "--repeats=3"} <= set(prefill)
  # At most `per_process` configurations a process; each process's results come as it ends.
  calls.clear()
  parts = list(study.measure_throughput(entries, settings, "study_110m", per_process=1))
  assert len(calls) == len(parts) == 9
  assert [sorted(p) for p in parts[:3]] == [["sandwich-top:3"]] * 3
  assert prefill[-3:-1] == ["--batch", "16"]
  assert out["lckv:2 m=4"]["decode_5+2043"]["batch"] == 40


def test_the_cost_compares_the_timing_pass_once_the_baseline_has_one(tmp_path):
  # The logged tokens/s of jobs sharing a device say nothing of the cost; the timing pass does.
  timed = {r["name"]: dict(r) for r in RECORDS}
  timed["llama"].update(train_speed_tokens_per_s=2000.0, train_shared_device=True)
  timed["sandwich-top:2"].update(train_speed_tokens_per_s=1000.0, train_shared_device=True)
  md = study.table(timed)
  rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
          if line.startswith("| ") and "---" not in line}
  assert "train tok/s (alone)" in md.splitlines()[0]
  assert "| 2,000 | 1.00x |" in rows["llama"] and "| 1,000 | 2.00x |" in rows["sandwich-top:2"]
  assert "| – | – |" in rows["lasagna-bottom:2"]  # not timed alone: no cost rather than a mixed one
  assert "train tok/s (logged)" in study.table({r["name"]: r for r in RECORDS}).splitlines()[0]


def test_the_timing_pass_runs_one_process_per_iteration_count(tmp_path, monkeypatch):
  entries = [study.Entry("llama", "0_1_2_3", "baseline"),
             study.Entry("lckv", "0_2_2_3", "custom"),
             study.Entry("lckv m=2", "0_2_2_3", "iterations", (("model.forward_passes", 2),))]
  calls = []

  def fake_run(cmd, settings, capture=False, env=None, log_file=None):
    calls.append(cmd)
    m = int(next(c for c in cmd if c.startswith("--m="))[4:])
    lts = cmd[cmd.index("--layer_types") + 1:cmd.index(f"--m={m}")]
    return "\n".join(json.dumps(dict(layer_types=lt, step_s=0.1 * m, tokens_per_s=1000 / m))
                     for lt in lts) + "\nnot json\n"
  monkeypatch.setattr(study, "_run", fake_run)
  settings = study.Settings(config="configs/tiny.py", workdir=str(tmp_path), steps=4,
                            train_shape=study.TrainShape(batch=2, seq=32, forward_passes=7))
  got = study.measure_train_speed(entries, settings, "tiny")
  assert len(calls) == 2  # m=7: llama and lckv together; m=2: alone
  assert calls[0][calls[0].index("--layer_types") + 1:][:2] == ["0_1_2_3", "0_2_2_3"]
  assert "--batch=2" in calls[0] and "--seq=32" in calls[0] and "--tag=m2" in calls[1]
  assert got["lckv"]["train_step_s"] == pytest.approx(0.7)
  assert got["lckv m=2"]["train_speed_tokens_per_s"] == 500


def test_jobs_get_their_own_gpu_or_share_without_preallocating():
  one = study.Settings(config="c", workdir="w", steps=1)
  assert study.job_env(0, one) is None  # one job: the environment as it is
  spread = study.Settings(config="c", workdir="w", steps=1, jobs=2, devices=("0", "1"))
  assert [study.job_env(s, spread)["CUDA_VISIBLE_DEVICES"] for s in (0, 1)] == ["0", "1"]
  assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in study.job_env(1, spread)
  shared = study.Settings(config="c", workdir="w", steps=1, jobs=3, devices=("0",))
  env = study.job_env(2, shared)
  assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert study.shared_devices(shared) and not study.shared_devices(spread)


def test_a_shared_device_run_shows_no_cost_until_the_timing_pass():
  rows = {r["name"]: dict(r) for r in RECORDS}
  rows["sandwich-top:2"]["train_shared_device"] = True
  line = next(l for l in study.table(rows).splitlines() if l.startswith("| sandwich-top:2"))
  assert "| – | – |" in line  # its logged tok/s is not a cost


def test_a_study_refuses_to_mix_budgets(tmp_path):
  settings = study.Settings(config="configs/study_110m.py", workdir=str(tmp_path), steps=300,
                            train_args=("--config.batch_size=16",))
  assert study.budget(settings) == dict(config="study_110m.py", steps=300,
                                        train_args=["--config.batch_size=16"])
  same = {"llama": dict(name="llama", **study.budget(settings)),
          "old": dict(name="old", steps=300)}  # a record from before the budget was kept
  study.check_budget(same, settings, "study.json")
  for key, value in (("steps", 2000), ("train_args", []), ("config", "1b.py")):
    mixed = {**same, "other": dict(study.budget(settings), **{key: value})}
    with pytest.raises(ValueError, match=f"'other' in study.json was trained with {key}="):
      study.check_budget(mixed, settings, "study.json")
