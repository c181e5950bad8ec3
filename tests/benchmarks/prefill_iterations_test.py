"""benchmarks.prefill_iterations: the smoke run, its record, and the numerics it relies on."""

import jax
import numpy as np
import pytest

from benchmarks import records


@pytest.fixture(scope="module")
def bench():
  import benchmarks.prefill_iterations as module
  return module


PROMPT = 8


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
  out = tmp_path_factory.mktemp("prefill_iterations")
  # Random token ids (never zeros) through a random float32 LCKV model with a cycle (0_2_2_3);
  # k = PROMPT iterations must reproduce the sequential model exactly.
  result = bench.main(["--smoke", "--data", "random", "--iterations", "1", "2", str(PROMPT),
                       "--prompt_len", str(PROMPT), "--gen", "4", "--num_prompts", "2",
                       "--repeats", "1", "--out", str(out)])
  path = records.record_path(str(out), "prefill_iterations", jax.devices()[0].device_kind)
  saved = records.find(records.read(path), "smoke")
  return result, saved


def test_json_fields(smoke):
  _, saved = smoke
  assert saved["tag"] == "smoke"
  for key in ("command", "device", "backend", "jax", "model", "data", "prompt_len", "gen",
              "num_prompts", "exact", "results", "quality_stops_at", "sequential_timing",
              "table_markdown"):
    assert key in saved, key
  assert saved["model"]["layer_types"] == "0_2_2_3"
  assert saved["model"]["dtype"] == "float32"
  assert [r["k"] for r in saved["results"]] == [1, 2, PROMPT]
  for r in saved["results"]:
    for key in ("prompt_max_abs_err", "prompt_mean_abs_err", "last_max_abs_err",
                "last_mean_abs_err", "exact_prefix_len", "mean_abs_err_by_position",
                "top1_last_agree", "top1_prompt_agree", "prompt_ppl", "prompt_ppl_rel_exact",
                "cont_ppl", "cont_ppl_rel_exact", "cont_ppl_rel_ref", "cont_max_abs_err",
                "cont_steps_max_abs_err", "cont_mean_abs_err_by_position",
                "prefill_ms", "prefill_tokens_per_s", "cost_vs_k1"):
      assert key in r, key
    assert len(r["mean_abs_err_by_position"]) == PROMPT
    assert r["prefill_ms"] > 0 and np.isfinite(r["prompt_ppl"]) and np.isfinite(r["cont_ppl"])
    assert 0 <= r["top1_last_agree"] <= 1
  assert saved["quality_stops_at"]["cont_ppl"] in (1, 2, PROMPT)
  assert saved["exact"]["prompt_ppl"] > 1 and saved["exact"]["cont_ppl"] > 1
  assert "| k |" in saved["table_markdown"]


def test_prefill_with_k_at_least_prompt_len_is_exact(smoke):
  result, _ = smoke
  by_k = {r["k"]: r for r in result["results"]}
  exact = by_k[PROMPT]
  assert exact["prompt_max_abs_err"] < 1e-4
  assert exact["last_max_abs_err"] < 1e-4
  assert exact["cont_max_abs_err"] < 1e-4  # the cache it leaves is exact too
  assert exact["cont_steps_max_abs_err"] < 1e-4
  assert exact["exact_prefix_len"] == PROMPT
  assert abs(exact["prompt_ppl_rel_exact"]) < 1e-5 and abs(exact["cont_ppl_rel_exact"]) < 1e-5
  assert exact["top1_prompt_agree"] == 1.0
  # One iteration is not exact on a random model with a cycle, and errors shrink with k.
  assert by_k[1]["prompt_max_abs_err"] > 1e-2
  assert by_k[1]["prompt_max_abs_err"] > 100 * exact["prompt_max_abs_err"]
  # ... and the later exact single-token steps read its approximate prompt cache.
  assert by_k[1]["cont_steps_max_abs_err"] > 1e-3
  mean_err = [by_k[k]["prompt_mean_abs_err"] for k in (1, 2, PROMPT)]
  assert mean_err[0] > mean_err[1] > mean_err[2]
  # Positions 0..k-1 are exact after k iterations (docs/spec.md §4).
  for k, r in by_k.items():
    assert r["exact_prefix_len"] >= k


def test_heldout_windows(bench):
  w = bench.heldout_windows(5, 40)
  assert w.shape == (5, 40) and w.dtype == np.int32
  assert (w > 0).all()  # bytes of text: no zeros
  assert len({tuple(r) for r in w}) == 5
  from lckv_jax.data.corpus import embedded_documents
  from lckv_jax.data.sources import split_documents
  _, held = split_documents(list(embedded_documents()), bench.EVAL_FRACTION)
  assert bytes(w[0].astype(np.uint8)) == held[0].encode("utf-8")[:40]


def test_stop_k(bench):
  rows = [dict(k=k, cont_ppl_rel_exact=e, cont_ppl_rel_ref=r)
          for k, e, r in [(1, 0.1, 0.1), (2, 0.004, 0.0), (3, 0.006, 0.002), (5, 0.001, 0.0),
                          (9, 0.0, 0.0)]]
  assert bench.stop_k(rows, "cont_ppl", 0.005) == 5  # k=2 is close, but k=3 moves out again
  assert bench.stop_k(rows, "cont_ppl", 0.005, ("ref",)) == 2
  rows[-1]["cont_ppl_rel_exact"] = 0.01
  assert bench.stop_k(rows, "cont_ppl", 0.005) is None
