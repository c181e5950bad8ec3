"""benchmarks.prefill_speed: warm prefill calls against their FLOPs, on the CPU."""

import json

import pytest


@pytest.mark.parametrize("what,extra", [("start", []), ("chunks", []), ("chunks", ["--dense"])])
def test_prefill_speed_times_each_kind_of_call(tmp_path, what, extra, monkeypatch):
  import benchmarks.prefill_speed as ps
  from lckv_jax.kernels import dispatch
  monkeypatch.setattr(dispatch, "choose", dispatch.choose)  # --dense replaces it: undone after
  out = tmp_path / "p.json"
  ps.main([what, "--shape=tiny", "--layer_types=lckv", "--rows=2", "--prompt=12", "--chunk=8",
           "--max_len=20", "--reps=2", "--flops_per_s=1e12", f"--out={out}", *extra])
  (record,) = json.loads(out.read_text())
  assert record["setting"].startswith(f"{what}_tiny_lckv_r2_p12")
  assert record["iterations"] > 1 and record["flop_ms" if what == "start" else
                                             "flop_ms_per_full_chunk"] > 0
  if what == "chunks":
    assert len(record["ms_per_chunk"]) == 2 and record["dense"] == bool(extra)  # 4 + 8 tokens
    assert record["setting"].endswith("_dense") == bool(extra)
  else:
    assert len(record["ms"]) == 2 and record["vs_flops"] > 0
    assert record["kernels_per_token"] == 0  # no GPU kernels in a CPU trace


def test_dense_chunks_leaves_every_other_choice(tiny_config, monkeypatch):
  import jax

  import benchmarks.prefill_speed as ps
  from lckv_jax.kernels import dispatch
  from lckv_jax.mode import Mode
  monkeypatch.setattr(dispatch, "choose", dispatch.choose)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  config = tiny_config(dtype="bfloat16")
  mask = dispatch.Mask(True, None)
  kw = dict(own_keys=False, contiguous=True, slots=128)
  assert dispatch.choose(config, Mode.PREFILL, mask, **kw) == "cudnn_masked"
  ps.dense_chunks()
  assert dispatch.choose(config, Mode.PREFILL, mask, **kw) == "dense"
  assert dispatch.choose(config, Mode.DECODE, mask, **kw) == "pallas"
  assert dispatch.choose(config, Mode.TRAIN, mask, **{**kw, "own_keys": True}) == "cudnn"
