"""benchmarks/hf_generate.py: HuggingFace's generate on our shapes, eager and with a static cache."""

import json

import pytest


def test_hf_generate_times_both_settings_and_writes_their_records(tmp_path):
  pytest.importorskip("transformers")
  from benchmarks import hf_generate, records
  # No compiler on a CI machine: the static cache runs uncompiled here; on a GPU it compiles.
  path = hf_generate.main(["--shape=tiny", "--batch=2", "--prompt=8", "--gen=5", "--warmup=1",
                           "--repeats=2", "--no_compile", f"--out={tmp_path}"])
  entries = {e["setting"]: e for e in records.read(path)}
  assert set(entries) == {"tiny_llama_b2_p8_g5_eager", "tiny_llama_b2_p8_g5_static"}
  for e in entries.values():
    # Recorded to 0.1 tokens/s (at a CPU's 14 tokens/s, more than 1e-3 of it), from the seconds
    # as recorded.
    assert e["tokens_per_s"] == round(2 * 5 / e["seconds"], 1)
    assert e["seconds"] == min(e["warm_s"]) and len(e["warm_s"]) == 2
    assert e["compiled"] is False and e["device"] == "cpu"
  json.dumps(entries)  # plain JSON


def test_the_hf_model_is_the_shape_of_our_llama():
  pytest.importorskip("transformers")
  from benchmarks import hf_generate
  from benchmarks.common import config_path
  from lckv_jax import roofline
  from lckv_jax.config import model_from_file
  model, config = hf_generate.hf_model("tiny", 64, "cpu")
  ours = model_from_file(config_path("tiny"), layer_types="llama")
  assert sum(p.numel() for p in model.parameters()) == roofline.param_count(ours)
  assert config.num_hidden_layers == ours.num_layers and config.vocab_size == ours.vocab_size
