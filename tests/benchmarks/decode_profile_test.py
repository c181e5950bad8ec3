"""benchmarks.decode_profile: the profile of the decode loop, on the CPU."""

import json


def test_decode_profile_runs_and_reads_the_decode_loop_memory(tmp_path):
  # On the CPU the trace has no GPU kernels; the timing and XLA's memory analysis still run.
  import jax

  import benchmarks.decode_profile as dp
  out = tmp_path / "p.jsonl"
  dp.main(["--shape=tiny", "--layer_types=lckv", "--batch=2", "--prompt=8", "--gen=12",
           "--steps=4", f"--out={out}"])
  record = json.loads(out.read_text().splitlines()[0])
  on_gpu = jax.default_backend() == "gpu"
  assert (record["kernels_per_token"] > 0) == on_gpu and len(record["wall_ms_per_token"]) == 2
  assert record["decode_alias_bytes"] >= record["cache_bytes"] > 0
  kernels = [("b", 10, 4), ("a", 0, 6), ("a", 20, 6)]
  s = dp.summarize(sorted(kernels, key=lambda k: k[1]), steps=2)
  assert s["kernels_per_token"] == 1.5 and s["largest"][0]["name"] == "a"
  assert s["idle_fraction"] == round(1 - 16 / 26, 3)
