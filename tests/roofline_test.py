"""The decode roofline: bytes and FLOPs against hand counts and the model, and the two
measurements."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import ModelConfig, Transformer
from lckv_jax import roofline as rf
from lckv_jax.kernels.reference import make_mask

# The tiny model with F=48: E=32, H=4, K=2, D=8, F=48, V=64: per layer q = o = 1024, k + v = 1024,
# MLP 4608, norms 64.
F48 = dict(intermediate_size=48)
KV_PER_KEY = 2 * 2 * 8 * 4  # K and V, 2 kv heads, head_dim 8, float32


def flat_params(config):
  """(path, ShapeDtypeStruct) of every parameter of the model, built abstractly.

  `nnx.eval_shape` runs the real constructor without computing the initial values (eager
  construction takes tens of seconds on a loaded CPU); shapes and dtypes are all we count.
  """
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  return [(path, v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def nbytes(x):
  return x.size * jnp.dtype(x.dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Bytes.
# ---------------------------------------------------------------------------------------------


def test_llama_bytes_by_hand(tiny_config):
  cfg = tiny_config(**F48)
  b = rf.decode_step_bytes(cfg, batch=3, context=10)
  # 4 layers * 7744 + final norm 32 + LM head 2048, plus 3 embedding rows of 32, in float32.
  assert b["weights"] == (4 * 7744 + 32 + 2048 + 3 * 32) * 4 == 132608
  assert b["kv_read"] == 4 * 3 * 10 * KV_PER_KEY == 15360
  assert b["kv_write"] == 4 * 3 * KV_PER_KEY == 1536
  assert b["total"] == 132608 + 15360 + 1536
  half = rf.decode_step_bytes(cfg, 3, 10, param_bytes=2, cache_itemsize=2)
  assert (half["weights"], half["kv_read"], half["kv_write"]) == (132608 // 2, 7680, 768)
  # An int8 cache: 1 byte an element and a float32 scale per K and V vector of each KV head.
  int8 = rf.decode_step_bytes(cfg, 3, 10, cache_dtype="int8")
  per_key = 2 * cfg.num_kv_heads * (cfg.resolved_head_dim + 4)
  assert (int8["kv_read"], int8["kv_write"]) == (4 * 3 * 10 * per_key, 4 * 3 * per_key)
  assert int8["kv_read"] == 15360 // 4 + 4 * 3 * 10 * 2 * cfg.num_kv_heads * 4


@pytest.mark.parametrize("layer_types,tie,param_dtype", [
    ("llama", False, "float32"), ("lckv", False, "bfloat16"), ("cla", True, "float32"),
    ("lckv", True, "bfloat16")])
def test_weights_match_the_model_parameters(layer_types, tie, param_dtype, tiny_config):
  cfg = tiny_config(**F48, layer_types=layer_types, tie_word_embeddings=tie,
                    param_dtype=param_dtype)
  params = flat_params(cfg)
  total = sum(nbytes(x) for _, x in params)
  embed = dict(params)[("embed",)]
  assert embed.shape == (64, 32)
  batch = int(np.random.default_rng(0).integers(1, 40))
  rows = nbytes(embed) if tie else batch * nbytes(embed) // 64
  assert rf.param_count(cfg) == sum(x.size for _, x in params)
  assert rf.decode_step_bytes(cfg, batch, 7)["weights"] == total - nbytes(embed) + rows


def test_lckv_reads_the_same_kv_but_one_key_less_on_diag_masked_layers(tiny_config):
  rng = np.random.default_rng(1)
  batch, context = (int(x) for x in rng.integers(2, 50, size=2))
  llama = rf.decode_step_bytes(tiny_config(**F48), batch, context)
  lckv_cfg = tiny_config(**F48, layer_types="lckv")
  assert lckv_cfg.layer_types == "0_2_2_3"  # layer 1 attends upward: its diagonal is masked
  lckv = rf.decode_step_bytes(lckv_cfg, batch, context)
  assert llama["kv_read"] - lckv["kv_read"] == 1 * batch * KV_PER_KEY
  assert lckv["kv_write"] == 3 * batch * KV_PER_KEY  # KV layers 0, 2, 3
  assert llama["kv_write"] == 4 * batch * KV_PER_KEY
  # Fewer weights: layer 1 has no k/v projection.
  assert llama["weights"] - lckv["weights"] == 2 * 32 * 2 * 8 * 4
  nodiag = rf.decode_step_bytes(tiny_config(**F48, force_nodiag=True), batch, context)
  assert llama["kv_read"] - nodiag["kv_read"] == 4 * batch * KV_PER_KEY


def test_sliding_window_caps_the_keys_read(tiny_config):
  cfg = tiny_config(**F48, layer_types="0s_1s_2_3", sliding_window=4)
  assert rf.decode_step_bytes(cfg, 2, 10)["kv_read"] == 2 * (4 + 4 + 10 + 10) * KV_PER_KEY
  assert rf.decode_step_bytes(cfg, 2, 3)["kv_read"] == 2 * 4 * 3 * KV_PER_KEY  # within window
  # A diag-masked sliding layer sees the W-1 keys before the query (kernels.reference.make_mask).
  up = tiny_config(**F48, layer_types="0s_2s_2_3", sliding_window=4)
  assert rf.decode_step_bytes(up, 2, 10)["kv_read"] == 2 * (4 + 3 + 10 + 10) * KV_PER_KEY


@pytest.mark.parametrize("layer_types", ["llama", "lckv", "0s_2s_2_3", "yoco", "mixattention"])
def test_visible_keys_agree_with_the_attention_mask(layer_types, tiny_config):
  cfg = tiny_config(**F48, layer_types=layer_types, sliding_window=3)
  lt = cfg.layer_spec
  for context in np.random.default_rng(2).integers(1, 30, size=5):
    context = int(context)
    k_pos = np.arange(context)[None]  # numpy: make_mask is plain operators, no need to dispatch
    q_pos = np.full((1, 1), context - 1)
    for i in range(cfg.num_layers):
      mask = make_mask(q_pos, np.ones_like(q_pos), k_pos, np.ones_like(k_pos),
                       diag_masked=lt.diag_masked[i],
                       window=cfg.sliding_window if lt.sliding[i] else None)
      assert rf.visible_keys(cfg, i, context) == int(mask.sum()), (i, context)


# ---------------------------------------------------------------------------------------------
# FLOPs and the roofline.
# ---------------------------------------------------------------------------------------------


def test_decode_flops_by_hand_and_from_the_parameters(tiny_config):
  cfg = tiny_config(**F48)
  f = rf.decode_step_flops(cfg, batch=3, context=10)
  assert f["matmul"] == 2 * 3 * (4 * 7680 + 2048) == 196608
  assert f["attention"] == 4 * 2 * 2 * 3 * 4 * 8 * 10 == 15360
  assert f["total"] == 196608 + 15360
  for layer_types, tie in (("lckv", False), ("cla", True)):
    cfg = tiny_config(**F48, layer_types=layer_types, tie_word_embeddings=tie)
    params = flat_params(cfg)
    # Matmul weights: everything but norm scales and the embedding gather; a tied table is the head.
    weights = sum(x.size for p, x in params if p[-1] != "scale" and p != ("embed",))
    weights += 64 * 32 if tie else 0
    assert rf.decode_step_flops(cfg, 5, 9)["matmul"] == 2 * 5 * weights


def test_roofline_takes_the_slower_roof():
  assert rf.roofline_seconds(1e9, 1e9, 1e12, 1e15) == pytest.approx(1e-3)
  assert rf.roofline_bound(1e9, 1e9, 1e12, 1e15) == "bytes"
  assert rf.roofline_seconds(1e6, 1e13, 1e12, 1e15) == pytest.approx(1e-2)
  assert rf.roofline_bound(1e6, 1e13, 1e12, 1e15) == "flops"
  # A 1b-like decode at batch 1 is memory bound; a huge batch becomes compute bound.
  cfg = ModelConfig(dtype="bfloat16", param_dtype="bfloat16")
  for batch, bound in ((1, "bytes"), (4096, "flops")):
    b, f = rf.decode_step_bytes(cfg, batch, 16), rf.decode_step_flops(cfg, batch, 16)
    assert rf.roofline_bound(b["total"], f["total"], 3.35e12, 989e12) == bound


def test_prefill_flops_by_hand_and_linear_in_iterations_for_cyclic_layers_only(tiny_config):
  b, t = 2, 5
  llama = tiny_config(**F48)
  # 4 layers * (matmuls 2*B*T*7680 + causal attention 2*2*B*H*D*T(T+1)/2) + head 2*B*E*V.
  by_hand = 4 * (2 * b * t * 7680 + 2 * 2 * b * 4 * 8 * 15) + 2 * b * 32 * 64
  assert [rf.prefill_flops(llama, b, t, it) for it in (1, 2, 9)] == [by_hand] * 3
  lckv = tiny_config(**F48, layer_types="lckv")  # cyclic group: layers 1 (no KV, nodiag) and 2
  f = [rf.prefill_flops(lckv, b, t, it) for it in (1, 2, 3, 9)]
  per_iteration = (2 * b * t * 6656 + 2 * 2 * b * 4 * 8 * 10) + (2 * b * t * 7680 + 2 * 2 * b * 4 * 8 * 15)
  assert [x - f[0] for x in f] == [0, per_iteration, 2 * per_iteration, 8 * per_iteration]
  assert f[0] == by_hand - 2 * b * t * 1024 - 2 * 2 * b * 4 * 8 * 5  # no k/v on 1, no diagonal


# ---------------------------------------------------------------------------------------------
# Measurements (tiny on CPU) and the plot.
# ---------------------------------------------------------------------------------------------


def test_measurements_are_positive_and_finite():
  bw = rf.measure_hbm_bandwidth(nbytes=2**20, repeats=2)
  rate = rf.measure_matmul_rate(n=128, repeats=2)
  for x in (bw, rate):
    assert isinstance(x, float) and math.isfinite(x) and x > 0


def test_the_ceiling_is_the_best_of_every_bandwidth_measured(monkeypatch):
  monkeypatch.setattr(rf, "warm_up_device", lambda: 0)
  monkeypatch.setattr(rf, "measure_copy_bandwidth", lambda **kw: 4.3e12)
  monkeypatch.setattr(rf, "measure_read_bandwidth", lambda **kw: 4.1e12)
  monkeypatch.setattr(rf, "measure_hbm_bandwidth", lambda **kw: 3.2e12)
  monkeypatch.setattr(rf, "measure_matmul_rate", lambda **kw: 790e12)
  monkeypatch.setattr(rf.jax, "devices", lambda: [type("D", (), {"device_kind": "NVIDIA H200"})])
  c = rf.ceilings(extra_hbm={"decode_kernel": 4.4e12})
  assert c["hbm_bytes_per_s"] == 4.4e12 and c["hbm_ceiling_source"] == "decode_kernel"
  assert c["hbm_measured_bytes_per_s"]["elementwise"] == 3.2e12
  assert c["hbm_vs_datasheet"] == round(4.4 / 4.8, 3) and c["matmul_vs_datasheet"] == 0.799
  monkeypatch.setattr(rf.jax, "devices", lambda: [type("D", (), {"device_kind": "cpu"})])
  assert "datasheet" not in rf.ceilings()


def test_a_ceiling_is_timed_by_its_fastest_run_after_a_warm_up(monkeypatch):
  durations = iter([0.5, 0.03, 0.01, 0.02])  # the untimed first call, then three timed
  calls = []
  monkeypatch.setattr(rf.time, "perf_counter", lambda: sum(calls))

  def fn():
    calls.append(next(durations))
  assert rf._best_seconds(fn, 3) == pytest.approx(0.01)
  # Calls in a row: the per-call time of the fastest timing (two calls each).
  durations, calls[:] = iter([0.5, 0.03, 0.03, 0.01, 0.03]), []
  assert rf._best_seconds(fn, 2, calls=2) == pytest.approx(0.02)
  assert rf.warm_up_device(seconds=0.0) == 0  # nothing to do at 0 s
  monkeypatch.undo()
  assert rf.warm_up_device(seconds=0.01, n=64) >= 1
  # A callable extra reading is measured inside `ceilings`, after its warm-up.
  order = []
  monkeypatch.setattr(rf, "warm_up_device", lambda: order.append("warm"))
  for name in ("measure_copy_bandwidth", "measure_read_bandwidth", "measure_hbm_bandwidth"):
    monkeypatch.setattr(rf, name, lambda **kw: 1e12)
  monkeypatch.setattr(rf, "measure_matmul_rate", lambda **kw: 1e14)
  c = rf.ceilings(extra_hbm={"decode_kernel": lambda: order.append("kernel") or 2e12})
  assert order == ["warm", "kernel"] and c["hbm_ceiling_source"] == "decode_kernel"


def test_copy_read_and_decode_kernel_readings_run_on_small_sizes():
  for x in (rf.measure_copy_bandwidth(nbytes=2**20, repeats=2),
            rf.measure_read_bandwidth(nbytes=2**20, repeats=2),
            # One timed call: the interpreted kernel takes seconds a call on a CPU.
            rf.measure_decode_kernel_bandwidth(nbytes=2**22, repeats=1, calls=1,
                                               interpret=True)):
    assert isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.gpu
def test_the_ceilings_on_a_gpu_are_below_its_datasheet_and_not_far_below():
  c = rf.ceilings(extra_hbm={"decode_kernel": rf.measure_decode_kernel_bandwidth()})
  if "datasheet" not in c:
    pytest.skip(f"no datasheet figures for {rf.jax.devices()[0].device_kind}")
  assert 0.6 < c["hbm_vs_datasheet"] <= 1.02 and 0.5 < c["matmul_vs_datasheet"] <= 1.02, c
