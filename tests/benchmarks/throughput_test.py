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


def test_a_quantized_cache_is_in_the_memory_model_the_record_and_the_setting(tmp_path):
  import argparse

  import benchmarks.throughput as tp
  from lckv_jax.cache import cache_bytes
  path = tp.main(["--smoke", "--layer_types", "lckv", "--cache_dtype", "int8", "--out",
                  str(tmp_path)])
  [r] = json.load(open(path))
  assert r["cache_dtype"] == "int8" and r["setting"] == "tiny_lckv_p8_g4_b2_int8"
  assert r["tokens_per_s"] > 0 and r["batch"] == 2
  model = tp.serving_model(argparse.Namespace(shape="tiny", prompt=8, gen=4, sliding_window=None),
                           "lckv")
  cfg = model.config
  assert r["cache_bytes"] == cache_bytes(cfg, 2, tp.cache_len(8, 4), "int8")
  # The default (bf16) names no cache in the setting: the records made before the flag keep
  # their names.
  assert tp.setting(dict(r, cache_dtype="bfloat16")) == "tiny_lckv_p8_g4_b2"
  assert tp.setting({k: v for k, v in r.items() if k != "cache_dtype"}) == "tiny_lckv_p8_g4_b2"
  assert tp.setting(dict(r, cache_dtype="float8_e4m3fn"), "_x") == "tiny_lckv_p8_g4_b2_fp8_x"
  # A max-batch run is named by the cap asked for, not the allocator's limit under it.
  big = dict(r, max_batch=True, bytes_limit=25_398_607_872, cache_dtype="bfloat16")
  assert tp.setting(big).endswith("_max_25.4GB")
  assert tp.setting(dict(big, cap_bytes=25_507_659_776)).endswith("_max_25.5GB")
  # Memory: the int8 cache takes about half the bytes, so more rows fit.
  need = lambda b, dtype: tp.memory_need(cfg, b, 512, 1536, 0, 0, cache_dtype=dtype)
  bf16_cache = cache_bytes(cfg, 64, tp.cache_len(512, 1536), metadata=True)
  int8_cache = cache_bytes(cfg, 64, tp.cache_len(512, 1536), "int8", metadata=True)
  assert need(64, None) - need(64, "int8") == bf16_cache - int8_cache > 0.4 * bf16_cache


def test_a_run_under_a_limit_records_the_memory_models_count_beside_its_peak(tmp_path, capsys):
  import argparse

  import benchmarks.throughput as tp
  from lckv_jax.cache import reserve_bytes
  cap = 1 << 30
  path = tp.main(["--smoke", "--layer_types", "lckv", "--cap_bytes", str(cap), "--out",
                  str(tmp_path)])
  [r] = json.load(open(path))
  model = tp.serving_model(argparse.Namespace(shape="tiny", prompt=8, gen=4, sliding_window=None),
                           "lckv")
  weights = r["weights_bytes"]
  assert r["reserve_bytes"] == reserve_bytes(cap)
  need = tp.memory_need(model.config, 2, 8, 4, weights, cap)
  assert r["memory_model_bytes"] == need - reserve_bytes(cap) > weights
  # A peak over the count (a GPU's; the CPU reports none) is said, with both numbers.
  args = argparse.Namespace(prompt=8, gen=4, cache_copies=1, cache_dtype="bfloat16")
  counted = r["memory_model_bytes"]
  assert tp.memory_count(model.config, 2, args, weights, cap, counted - 1) == {
      "memory_model_bytes": counted, "reserve_bytes": reserve_bytes(cap)}
  assert "above" not in capsys.readouterr().out
  tp.memory_count(model.config, 2, args, weights, cap, counted + 2_000_000_000)
  said = capsys.readouterr().out
  assert f"2.00 GB above the memory model's count ({counted / 1e9:.2f} GB)" in said


def test_ceilings_are_measured_once_into_a_file_and_read_back_for_the_same_device(tmp_path,
                                                                                  monkeypatch):
  import benchmarks.throughput as tp
  path = str(tmp_path / "ceilings.json")
  first = tp.measured_ceilings(smoke=True, path=path)
  saved = json.load(open(path))
  assert saved.pop("device") == "cpu" and saved == json.loads(json.dumps(first))

  def measured(*args, **kwargs):
    raise AssertionError("measured again")
  monkeypatch.setattr(tp.rl, "ceilings", measured)
  assert tp.measured_ceilings(smoke=True, path=path) == saved
  with open(path, "w") as f:  # another device's ceilings are not this one's
    json.dump(dict(saved, device="NVIDIA H200"), f)
  monkeypatch.setattr(tp.rl, "ceilings", lambda *a, **k: {"hbm_bytes_per_s": 1.0})
  assert tp.measured_ceilings(smoke=True, path=path) == {"hbm_bytes_per_s": 1.0}
