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
