"""benchmarks.serve_load: Poisson load on the server, end to end on a tiny model (CPU)."""

import json
import os


def test_serve_load_smoke(tmp_path):
  import benchmarks.serve_load as sl
  env = dict(os.environ)
  os.environ["JAX_PLATFORMS"] = "cpu"  # the server and the helper processes inherit it
  try:
    path = sl.main(["--smoke", "--out", str(tmp_path)])
  finally:
    os.environ.clear()
    os.environ.update(env)
  (record,) = json.load(open(path))
  assert record["setting"] == "tiny lckv 4 smoke" and record["max_batch"] == 4
  assert [r["rate"] for r in record["results"]] == [20.0, 80.0]
  for r in record["results"]:
    assert r["served"] + r["rejected"] == r["requests"] == 12 and r["served"] > 0
    assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert 0 < r["itl_p50_s"] <= r["itl_p99_s"]
