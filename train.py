"""Train (or evaluate) an LCKV / cross-layer-KV-sharing model.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny          # train; run again to resume
  python train.py --config=configs/tiny.py --config.model.layer_types=cla --workdir=/tmp/cla
  python train.py --config=configs/tiny.py --workdir=/tmp/tiny --mode=evaluate

Metrics go to <workdir>/metrics.jsonl and TensorBoard events in <workdir>/tensorboard;
checkpoints to <workdir>/checkpoints. SIGTERM or Ctrl-C saves a checkpoint and stops.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                          "train (resumes from the workdir) or evaluate (perplexity of the newest "
                          "checkpoint on the held-out split).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this step (the schedule still "
                                  "spans config.steps); run again to continue.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Start from the parameters of a model "
                                 "checkpoint (lckv_jax.checkpoint format, e.g. converted from HF); "
                                 "ignored when the workdir already has a checkpoint.")
_EXPORT = flags.DEFINE_string("export_model", None, "After training, also write the parameters "
                              "as a model checkpoint (lckv_jax.checkpoint format) to this dir.")

_USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.getLogger().setLevel(logging.INFO)
  from lckv_jax.train import sharding
  sharding.maybe_initialize_distributed()
  from lckv_jax.train.trainer import Trainer
  try:
    trainer = Trainer(_CONFIG.value, _WORKDIR.value)
  except _USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  mc = trainer.model_config
  print(f"model: {mc.num_layers} layers, layer_types={mc.layer_types}, "
        f"m={mc.forward_passes} b={mc.backward_passes}; mesh {dict(trainer.mesh.shape)}; "
        f"train tokens {trainer.data.train_tokens:,}, held-out {trainer.data.eval_tokens:,}")
  if _MODE.value == "evaluate":
    restored = trainer.restore_params()
    if restored is None:
      print(f"error: no checkpoint in {_WORKDIR.value}/checkpoints", file=sys.stderr)
      sys.exit(1)
    step, params = restored
    print(json.dumps({"step": step, **trainer.evaluate(params)}))
    return
  try:
    state, history = trainer.train(_MAX_STEPS.value, init_from=_INIT_FROM.value)
  except _USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  evals = [h for h in history if "eval_loss" in h]
  if evals:
    print(json.dumps(evals[-1]))
  if _EXPORT.value:
    from flax import nnx
    from lckv_jax import checkpoint
    from lckv_jax.train.step import abstract_model
    model = abstract_model(mc)
    params_state = nnx.state(model, nnx.Param)
    params_state.replace_by_pure_dict(state["params"])
    nnx.update(model, params_state)
    checkpoint.save_model(_EXPORT.value, model)
    print(f"exported the model to {_EXPORT.value}")


if __name__ == "__main__":
  app.run(main)
