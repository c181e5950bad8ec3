"""Model checkpoints: a directory with `config.json` (the ModelConfig) and `params/` (orbax).

This is the format that `python -m lckv_jax.convert from-hf` writes and that `generate.py` and
fine-tuning in `train.py` read. Training runs keep their own CheckpointManager (optimizer and data
state too) and can export a step to this format.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lckv_jax.config import ModelConfig
from lckv_jax.model import Transformer, relayout


def config_to_dict(config: ModelConfig) -> dict:
  d = dataclasses.asdict(config)
  d["rope_scaling"] = config.rope_scaling_dict
  return d


def config_from_dict(d: dict) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"config.json: unknown ModelConfig field(s) {unknown}")
  return ModelConfig(**d)


def save_model(path: str, model: Transformer) -> None:
  """Writes `model` (config and parameters) to the directory `path` (created; must not exist)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "params")):
    raise FileExistsError(f"{path} already holds a checkpoint; choose a new directory")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_dict(model.config), f, indent=2)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params)


def load_config(path: str) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path} is not a model checkpoint: {cfg_path} is missing")
  with open(cfg_path) as f:
    return config_from_dict(json.load(f))


def load_model(path: str, **overrides) -> Transformer:
  """Reads a model written by `save_model`; `overrides` replace config fields (e.g. dtype).

  `scan_layers=False` loads a checkpoint saved with stacked layers into one array per layer (the
  fast layout for decoding, `lckv_jax.model.relayout`) without two copies on the device.
  """
  path = os.path.abspath(path)
  config = load_config(path)
  scan_layers = overrides.pop("scan_layers", config.scan_layers)
  if overrides:
    config = config.replace(**overrides)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.state(abstract, nnx.Param).to_pure_dict())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  param_state = nnx.state(abstract, nnx.Param)
  param_state.replace_by_pure_dict(params)
  model = nnx.merge(graphdef, state)
  nnx.update(model, param_state)
  return relayout(model, scan_layers, free_source=True)
