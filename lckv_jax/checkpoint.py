"""Model checkpoints: a directory with `config.json` (the ModelConfig) and `params/` (orbax).

`config.json` holds what the model is at its top level and, under `"run"`, how it was run
(`lckv_jax.config.RunConfig`): the defaults of `load_model`, which `run=` changes.

This is the format that `python -m lckv_jax.convert from-hf` writes and that `generate.py` and
fine-tuning in `train.py` read. Training runs keep their own CheckpointManager (optimizer and data
state too) and can export a step to this format.

Writers never touch what exists (`check_destination`); readers turn a missing, foreign or damaged
directory into one ValueError / FileNotFoundError naming it (orbax's own errors run to pages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lckv_jax import hf as hf_io
from lckv_jax.config import RUN_FIELDS, ModelConfig, RunConfig
from lckv_jax.model import Transformer, relayout

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def config_to_dict(config: ModelConfig) -> dict:
  """config.json: what the model is, and under "run" how it was run (the defaults of a load)."""
  return {**config.architecture(), "run": dataclasses.asdict(config.run)}


def config_from_dict(d: dict) -> ModelConfig:
  """The ModelConfig of a config.json; one written before the "run" section (all fields at the
  top level) reads the same."""
  d = dict(d)
  run = d.pop("run", {})
  if not isinstance(run, dict):
    raise ValueError(f"field 'run' must be an object of RunConfig fields, got {run!r}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields) + [f"run.{k}" for k in sorted(set(run) - set(RUN_FIELDS))]
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {unknown} (written by another version of "
                     f"lckv-jax?); known fields: {', '.join(sorted(fields))}")
  return ModelConfig(**d, **run)


# ---------------------------------------------------------------------------------------------
# Destinations: a writer refuses anything that exists, before doing any work.
# ---------------------------------------------------------------------------------------------


def _inside(path: str, parent: str) -> bool:
  """Whether `path` is `parent` or lies below it (symlinks resolved)."""
  path, parent = os.path.realpath(path), os.path.realpath(parent)
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_destination(path: str, source: str | None = None) -> None:
  """Raises unless `path` is a new or empty directory apart from `source` (neither inside the
  other): a conversion or export then never overwrites a file, its source's least of all."""
  if source is not None and _inside(path, source):
    where = "is the source" if _inside(source, path) else f"is inside the source {source}"
    raise FileExistsError(f"destination {path} {where}: choose a directory outside it")
  if source is not None and _inside(source, path):
    raise FileExistsError(f"destination {path} contains the source {source}: choose a new "
                          "directory outside it")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise FileExistsError(f"destination {path} is a file: choose a new directory")
  held = sorted(os.listdir(path)) if os.path.isdir(path) else []
  if held:
    names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    raise FileExistsError(f"destination {path} already holds files ({names}): choose a new "
                          "directory")


def save_model(path: str, model: Transformer) -> None:
  """Writes `model` (config and parameters) to the directory `path` (created; must be new or
  empty)."""
  path = os.path.abspath(path)
  check_destination(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "x") as f:
    json.dump(config_to_dict(model.config), f, indent=2)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), params)


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


def _is_training_workdir(path: str) -> bool:
  """A `train.py --workdir` (checkpoints/), its checkpoints/ folder, or one of its steps."""
  names = set(os.listdir(path))
  return ("checkpoints" in names or "metrics.jsonl" in names or {"state", "config"} <= names
          or any(n.isdigit() and os.path.isdir(os.path.join(path, n)) for n in names))


def _check_model_dir(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"model checkpoint {path} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"model checkpoint {path} is a file; expected a directory with "
                     f"{CONFIG_FILE} and {PARAMS_DIR}/")
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    return
  if _is_training_workdir(path):
    raise ValueError(f"{path} is a training workdir, not a model checkpoint: `python train.py "
                     f"--config=CONFIG --workdir={path} --export_model=DIR` writes one to DIR")
  raise FileNotFoundError(f"{path} is not a model checkpoint: {CONFIG_FILE} is missing (one is "
                          "written by `train.py --export_model=DIR` or `python -m "
                          "lckv_jax.convert from-hf SRC DIR`)")


def load_config(path: str) -> ModelConfig:
  path = os.path.abspath(path)
  _check_model_dir(path)
  cfg_path = os.path.join(path, CONFIG_FILE)
  d = hf_io.read_json(cfg_path)
  try:
    return config_from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{cfg_path}: {e}") from None


def _cause(e: BaseException) -> str:
  """The first line of an orbax / tensorstore error, without its specs and advice."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = re.split(r"\s*(?:\[tensorstore_spec|See full TensorStore|To enable it)", text)[0]
  return text if len(text) <= 200 else text[:197] + "..."


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  name = lambda p: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
  return {name(p): tuple(x.shape) for p, x in leaves}


def _check_shapes(params_dir: str, stored, target, overrides: dict) -> None:
  """Names the first parameter that the config (with `overrides`) and the checkpoint disagree on."""
  have, want = _shapes(stored), _shapes(target)
  hint = f" with the overrides {overrides}" if overrides else ""
  for name, shape in want.items():
    if name not in have:
      raise ValueError(f"{params_dir}: parameter {name} {shape} that the config{hint} needs is "
                       "not in the checkpoint")
    if have[name] != shape:
      raise ValueError(f"{params_dir}: parameter {name} has shape {have[name]} in the checkpoint "
                       f"but {shape} for the config{hint}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"{params_dir}: the checkpoint has parameter(s) {extra[:3]} that the "
                     f"config{hint} does not have")


def drop_closed_loop_noise() -> None:
  """Silences 'RuntimeError: Event loop is closed', which tensorstore reports through
  sys.unraisablehook for reads that orbax abandoned after a failure, even after the call returns;
  our own error says what went wrong. Every other unraisable exception is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, "lckv_quiet", False):
    return

  def hook(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      previous(u)

  hook.lckv_quiet = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_orbax():
  """orbax's WARNING lines about an unreadable checkpoint: the ValueError we raise replaces them."""
  drop_closed_loop_noise()
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _restore(path: str, target, overrides: dict):
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise ValueError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/: the checkpoint is "
                     "incomplete (interrupted save?)")
  damaged = f"{path}: damaged model checkpoint, cannot read {PARAMS_DIR}/"
  with ocp.StandardCheckpointer() as ckptr, _quiet_orbax():
    try:
      metadata = ckptr.metadata(params_dir).item_metadata
    except Exception as e:  # noqa: BLE001 - orbax raises anything from OSError to Exception
      raise ValueError(f"{damaged} ({_cause(e)})") from e
    if metadata is None:  # orbax only logs that it could not read the arrays' metadata
      raise ValueError(f"{damaged} (its array metadata is unreadable)")
    _check_shapes(params_dir, metadata.tree, target, overrides)
    try:
      return ckptr.restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 - as above
      raise ValueError(f"{damaged} ({_cause(e)})") from e


def load_model(path: str, run: RunConfig | dict | None = None, **overrides) -> Transformer:
  """Reads a model written by `save_model`.

  `run` says how to run it (a RunConfig, or a dict of some of its fields: dtype, kernels, remat,
  passes, ...); unset fields keep the values it was saved with. `overrides` replace config fields
  by name, run fields or not (e.g. `param_dtype` casts the parameters as they load).
  `scan_layers=False` loads a checkpoint saved with stacked layers into one array per layer (the
  fast layout for decoding, `lckv_jax.model.relayout`) without two copies on the device.
  """
  path = os.path.abspath(path)
  config = load_config(path)
  if run is not None:
    config = config.with_run(run)
  scan_layers = overrides.pop("scan_layers", config.scan_layers)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise ValueError(f"load_model: unknown ModelConfig field(s) {unknown} in the overrides")
  if overrides:
    config = config.replace(**overrides)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  params = _restore(path, target, overrides)
  param_state = nnx.state(abstract, nnx.Param)
  nnx.replace_by_pure_dict(param_state, params)
  model = nnx.merge(graphdef, state)
  nnx.update(model, param_state)
  return relayout(model, scan_layers, free_source=True)
