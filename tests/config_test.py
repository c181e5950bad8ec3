"""ModelConfig validation: every bad field is named in the error."""

import pytest

from lckv_jax import ModelConfig


def test_presets_resolve_at_construction(tiny_config):
  cfg = tiny_config(layer_types="lckv")
  assert cfg.layer_types == "0_2_2_3"
  assert cfg.layer_spec.kv_layers == (0, 2, 3)
  assert tiny_config().layer_types == "0_1_2_3"
  assert hash(cfg) == hash(tiny_config(layer_types="0_2_2_3"))


@pytest.mark.parametrize("changes,match", [
    (dict(layer_types="garbage"), r"layer_types='garbage' is invalid.*bad token 'garbage'"),
    (dict(layer_types="0_1_2"), r"layer_types.*3 tokens but num_layers is 4"),
    (dict(layer_types="0_1_2_7"), r"layer_types.*attends to layer 7"),
    (dict(num_kv_heads=3), r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    (dict(num_heads=5, num_kv_heads=1), r"num_heads \(5\) must divide hidden_size \(32\)"),
    (dict(num_heads=0), r"num_heads must be a positive integer"),
    (dict(head_dim=7), r"head_dim must be even"),
    (dict(sliding_window=0), r"sliding_window must be an integer >= 1"),
    (dict(layer_types="0s_1_2_3"), r"sliding_window must be set"),
    (dict(layer_types="1s_1_2_3", sliding_window=1), r"sliding_window=1 leaves no visible key"),
    (dict(forward_passes=-1), r"forward_passes must be an integer >= 0"),
    (dict(backward_passes=0), r"backward_passes must be a positive integer"),
    (dict(dtype="fp8"), r"dtype must be one of"),
    (dict(remat="some"), r"remat must be one of"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"rope_scaling: rope_type"),
    (dict(rms_norm_eps=0.0), r"rms_norm_eps must be > 0"),
])
def test_bad_fields_are_named(changes, match, tiny_config):
  with pytest.raises(ValueError, match=match):
    tiny_config(**changes)


def test_head_dim_may_be_given_explicitly(tiny_config):
  cfg = tiny_config(num_heads=5, num_kv_heads=1, head_dim=16)
  assert cfg.resolved_head_dim == 16


def test_rope_scaling_is_stored_hashable(tiny_config):
  cfg = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
  assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  hash(cfg)


# -- what the model is vs how it runs ---------------------------------------------------------


def test_every_field_is_either_the_model_or_how_it_runs(tiny_config):
  import dataclasses
  from lckv_jax.config import ARCHITECTURE_FIELDS, RUN_FIELDS, RunConfig
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  assert sorted(ARCHITECTURE_FIELDS + RUN_FIELDS) == sorted(fields)
  assert not set(ARCHITECTURE_FIELDS) & set(RUN_FIELDS)
  defaults = tiny_config()
  assert defaults.run == RunConfig()  # the same defaults in both places
  cfg = tiny_config(layer_types="lckv", dtype="bfloat16", remat="full")
  assert cfg.with_run(RunConfig()) == tiny_config(layer_types="lckv")
  assert cfg.with_run({"remat": "dots"}).remat == "dots"
  with pytest.raises(ValueError, match=r"run: unknown field\(s\) \['hidden_size'\]"):
    cfg.with_run({"hidden_size": 64})
  with pytest.raises(ValueError, match="ModelConfig.remat must be one of"):
    cfg.with_run({"remat": "sometimes"})
