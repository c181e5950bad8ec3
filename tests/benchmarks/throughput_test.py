"""benchmarks.throughput: the batch search and the smoke run."""

import json


def test_find_max_batch_doubles_then_bisects():
  import benchmarks.throughput as tp
  for cap in (1, 37, 100, 1000, 4097):
    probes = []

    def fits(b, cap=cap):
      probes.append(b)
      return b <= cap

    for start in (1, 32, 5000):
      probes.clear()
      assert tp.find_max_batch(fits, start=start, resolution=0) == cap
      assert len(probes) < 40
  assert tp.find_max_batch(lambda b: False, start=8) == 0


def test_throughput_smoke(tmp_path):
  import benchmarks.throughput as tp
  path = tp.main(["--smoke", "--layer_types", "llama", "lckv", "--out", str(tmp_path)])
  records = json.load(open(path))
  assert [r["label"] for r in records] == ["tiny llama", "tiny lckv"]
  for r in records:
    assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["roofline_decode_s"] > 0 and r["prefill_flop_s"] > 0
    assert r["cache_bytes"] > 0 and r["batch"] == 2
  assert records[1]["cache_bytes"] < records[0]["cache_bytes"]  # LCKV caches 3 of 4 layers


def test_the_default_search_is_exact_to_one_row():
  import benchmarks.throughput as tp
  assert tp.find_max_batch(lambda b: b <= 4097, start=32) == 4097


def test_a_cap_in_bytes_caps_the_gpu_allocator(monkeypatch):
  import shutil
  import subprocess
  from benchmarks import common
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
  monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
  smi = subprocess.CompletedProcess([], 0, stdout="143771\n81559\n")  # MiB of GPUs 0 and 1
  monkeypatch.setattr(subprocess, "run", lambda *a, **kw: smi)
  assert common.cap_allocator(25_507_659_776) == 25_507_659_776 / (81559 << 20)
  assert common.cap_allocator(25_507_659_776) is None  # already set: left as it is
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
  assert common.cap_allocator(None) is None and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in __import__(
      "os").environ
  monkeypatch.setattr(shutil, "which", lambda name: None)  # no GPU tools: nothing to cap
  assert common.cap_allocator(1 << 30) is None
