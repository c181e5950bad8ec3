"""benchmarks.kv_quant: the smoke run and its record."""

import jax

from benchmarks import records


def test_kv_quant_smoke(tmp_path):
  import benchmarks.kv_quant as kq
  result = kq.main(["--smoke", "--out", str(tmp_path)])
  saved = records.find(records.read(records.record_path(str(tmp_path), "kv_quant",
                                                        jax.devices()[0].device_kind)), "smoke")
  assert saved["command"].startswith("python -m benchmarks.kv_quant")
  assert saved["table_markdown"] == result["table_markdown"] == kq.table(saved["full"]["results"])
  for part in ("full", "sink"):
    rows = {r["cache_dtype"]: r for r in saved[part]["results"]}
    assert list(rows) == ["float32", "bfloat16", "int8", "fp8"]
    ref = rows["bfloat16"]
    assert ref["max_abs_err"] == 0 and ref["ppl_rel"] == 0 and ref["top1_agree"] == 1
    for name in ("float32", "int8", "fp8"):  # every cache differs from bf16, a little
      assert 0 < rows[name]["mean_abs_err"] <= rows[name]["max_abs_err"] < 1
      assert abs(rows[name]["ppl_rel"]) < 0.05
    # The smoke model: 3 KV layers (0, 2, 3 of 0_2_2_3), K and V of 2 heads of width 8.
    assert rows["int8"]["kv_bytes_per_token"] == rows["fp8"]["kv_bytes_per_token"] == 3 * 2 * 2 * (
        8 + 4)
    assert rows["bfloat16"]["kv_bytes_per_token"] == 3 * 2 * 2 * 8 * 2
  # The sink windows run past the cache: 24 tokens through 2 + 6 slots, so 16 evictions.
  sink = saved["sink"]
  assert (sink["n_sink"], sink["window"], sink["length"]) == (2, 6, 24)
  assert "mean_abs_err_last_quarter" in sink["results"][2]
