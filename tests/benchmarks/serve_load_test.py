"""benchmarks.serve_load: Poisson load on the server, end to end on a tiny model (CPU)."""

import json
import os

from tests.conftest import NO_XLA_CACHE


def test_serve_load_smoke(tmp_path):
  import benchmarks.serve_load as sl
  env = dict(os.environ)
  os.environ.update(JAX_PLATFORMS="cpu", **NO_XLA_CACHE)  # the server and helpers inherit them
  try:
    path = sl.main(["--smoke", "--out", str(tmp_path)])
  finally:
    os.environ.clear()
    os.environ.update(env)
  (record,) = json.load(open(path))
  assert record["setting"] == "tiny lckv 4 smoke" and record["max_batch"] == 4
  assert [r["rate"] for r in record["results"]][0] == 20.0  # the next unless saturated
  assert record["saturated_tokens_per_s"] > 0 and "sustained" in record
  for r in record["results"]:
    assert r["served"] + r["rejected"] == r["requests"] == 12 and r["served"] > 0
    assert r["output_tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
    assert 0 < r["itl_p50_s"] <= r["itl_p99_s"]


def _result(rate, rps, ttft99, rejected=0, tok=100.0):
  return dict(rate=rate, requests=10, served=10 - rejected, rejected=rejected, requests_per_s=rps,
              output_tokens_per_s=tok, ttft_p50_s=ttft99 / 2, ttft_p99_s=ttft99, itl_p50_s=0.01,
              itl_p99_s=0.02)


def test_sustained_rate_is_the_highest_rate_kept_up_with_under_the_ttft_limit(tmp_path):
  import benchmarks.serve_load as sl
  sweep = [_result(1, 0.98, 0.3, tok=50), _result(2, 1.95, 0.6, tok=90),
           _result(4, 3.5, 1.5, tok=160),  # fell behind the arrivals (< 90% of the rate)
           _result(8, 7.5, 3.0, tok=200),  # p99 TTFT over 2 s
           _result(16, 9.0, 0.5, rejected=3, tok=210)]  # rejected some
  assert sl.sustained_rate(sweep)["rate"] == 2
  assert sl.sustained_rate(sweep, ttft_p99_limit_s=5.0)["rate"] == 8
  assert sl.sustained_rate(sweep[2:4], ttft_p99_limit_s=1.0) is None
  assert sl.saturated_tokens_per_s(sweep) == 210
  entries = [dict(label="1b llama", max_batch=8, results=sweep),
             dict(label="1b lckv", max_batch=40, results=sweep[:3])]
  out = sl.plot(entries, str(tmp_path / "load.png"), "title")
  assert os.path.getsize(out) > 10_000
  table = sl.markdown([*entries, dict(label="7b lckv", max_batch=1234, cache_dtype="int8",
                                      results=sweep[2:4])]).splitlines()
  assert table[2] == "| 1b llama | bf16 | 8 | 2 | 0.30 / 0.60 | 10.0 / 20.0 | 210 |"
  assert table[3] == "| 1b lckv | bf16 | 40 | 2 | 0.30 / 0.60 | 10.0 / 20.0 | 160 |"
  assert table[4] == "| 7b lckv | int8 | 1,234 | none | – | – | 200 |"
