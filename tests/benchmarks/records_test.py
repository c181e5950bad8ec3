"""benchmarks.records: a record file keeps one entry per setting, one file per benchmark and
device; the records' settings are those a re-run names."""

import argparse
import glob
import os
import re

import pytest

from benchmarks import records
from tests import ROOT as REPO

RESULTS = os.path.join(REPO, "benchmarks", "results")


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_a_rerun_of_a_setting_replaces_its_entry(tmp_path, ext):
  path = str(tmp_path / f"throughput_cpu.{ext}")
  records.update(path, [records.entry("a", tokens_per_s=1.0), records.entry("b", tokens_per_s=2.0)])
  records.update(path, [records.entry("a", tokens_per_s=3.0)])  # the re-run
  records.update(path, [records.entry("c", tokens_per_s=4.0)])  # a new setting
  got = records.read(path)
  assert [(e["setting"], e["tokens_per_s"]) for e in got] == [("a", 3.0), ("b", 2.0), ("c", 4.0)]
  assert list(got[0]) == ["setting", "tokens_per_s"]  # the setting first
  with pytest.raises(ValueError, match="setting"):
    records.update(path, [{"tokens_per_s": 5.0}])
  assert len(records.read(path)) == 3  # a failed update leaves the file as it was
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind


def test_merging_a_record_file_from_another_machine(tmp_path, capsys):
  into, out = tmp_path / "results", tmp_path / "out"
  kind = "NVIDIA H100 80GB HBM3"
  records.update(str(into / "train_speed_h100_80gb_hbm3.json"),
                 [records.entry("x", device=kind, step_s=1.0),
                  records.entry("y", device=kind, step_s=2.0)])
  new = str(out / "train_speed_h100_80gb_hbm3.json")
  records.update(new, [records.entry("y", device=kind, step_s=0.5),
                       records.entry("z", device=kind, step_s=3.0)])
  records.main([new, "--into", str(into)])
  assert "1 added, 1 replaced" in capsys.readouterr().out
  got = records.read(str(into / "train_speed_h100_80gb_hbm3.json"))
  assert [(e["setting"], e["step_s"]) for e in got] == [("x", 1.0), ("y", 0.5), ("z", 3.0)]
  records.update(str(out / "train_speed_h200.json"), [records.entry("w", device=kind)])
  with pytest.raises(SystemExit, match="not the device"):
    records.main([str(out / "train_speed_h200.json"), "--into", str(into)])


def test_device_slugs():
  assert records.device_slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
  assert records.device_slug("NVIDIA H200") == "h200"
  assert records.device_slug("NVIDIA A100-SXM4-40GB") == "a100_sxm4_40gb"
  assert records.device_slug("TPU v5 lite") == "tpu_v5_lite"
  assert records.device_slug("cpu") == "cpu"
  assert records.record_path("out", "throughput", "cpu") == os.path.join("out",
                                                                         "throughput_cpu.json")


BENCHMARKS = ("throughput", "decode_profile", "decode_speed", "train_speed", "prefill_iterations",
              "prefill_speed", "first_step", "train_py", "kv_quant", "hf_generate", "serve_load",
              "hbm_ceilings")  # hbm_ceilings: a probe of `lckv_jax.roofline`'s measurements


def test_results_are_one_record_file_per_benchmark_and_device():
  files = sorted(glob.glob(os.path.join(RESULTS, "*.json*")))
  assert files
  for path in files:
    name = os.path.basename(path)
    m = re.fullmatch(rf"({'|'.join(BENCHMARKS)})_([a-z0-9_]+)\.(json|jsonl)", name)
    assert m, f"{name}: not <benchmark>_<device>.json"
    assert (m[3] == "jsonl") == (m[1] == "decode_profile"), name
    entries = records.read(path)
    settings = [e["setting"] for e in entries]
    assert len(set(settings)) == len(settings), f"{name}: a setting twice"
    for e in entries:
      assert records.device_slug(e["device"]) == m[2], f"{name}: {e['setting']} ran elsewhere"
      assert "command" in e or m[1] == "decode_profile", f"{name}: {e['setting']} has no command"


def test_settings_of_the_records_are_those_a_rerun_gets():
  # A re-run replaces an entry only if the script names the setting as the record does.
  import benchmarks.decode_profile as dp
  import benchmarks.throughput as tp
  for e in records.read(os.path.join(RESULTS, "throughput_h100_80gb_hbm3.json")):
    assert tp.setting(e) == e["setting"]
  for e in records.read(os.path.join(RESULTS, "decode_profile_h100_80gb_hbm3.jsonl")):
    args = argparse.Namespace(**{k: e[k] for k in ("shape", "layer_types", "batch", "prompt",
                                                   "gen", "tag")})
    assert dp.setting(args) == e["setting"]
  for e in records.read(os.path.join(RESULTS, "prefill_iterations_cpu.json")):
    assert e["setting"] == e["tag"]
