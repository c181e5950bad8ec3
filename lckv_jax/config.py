"""The model configuration: Llama's fields plus the cross-layer KV sharing ones.

`ModelConfig` holds two kinds of fields, and modules read both from it:

- what the model *is* (`ARCHITECTURE_FIELDS`: sizes, `layer_types`, RoPE, norms, windows,
  parameter dtype): a checkpoint's parameters mean something only under these, so a checkpoint
  stores them, a resumed run must keep them, and `--init_from` adopts them;
- how it *runs* (`RunConfig`: compute dtype, scanning, remat, kernels, the iteration plan's
  passes, the exact or the reference's decoding, the sequential mode): a checkpoint stores the
  values it was made with as defaults, and they may change on resume and when loading
  (`checkpoint.load_model(dir, run=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax.numpy as jnp

from lckv_jax import layer_types as lt_lib
from lckv_jax import quant

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "float64": jnp.float64}
_REMAT = ("none", "full", "dots", "dots_no_batch")
_ROPE_SCALING = ("linear", "llama3")
_DECODE_SEMANTICS = ("exact", "whynlp_main")
_ATTENTION_IMPLS = ("auto", "cudnn", "xla", "dense", "splash")
_DECODE_ATTENTION = ("auto", "pallas", "mosaic", "dense")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a model runs; the defaults are ModelConfig's. Validated where it is applied
  (`ModelConfig.with_run`)."""
  forward_passes: int = 7  # m: iterations of a cyclic group without gradients
  backward_passes: int = 2  # b: iterations with gradients (truncated backprop), >= 1
  use_sequential: bool = False  # run the exact token-by-token mode instead of the iteration plan
  decode_semantics: str = "exact"  # 'exact' (= sequential mode) or 'whynlp_main' (spec §5)
  dtype: str = "float32"  # compute dtype of activations
  scan_layers: bool = True  # scan runs of identical layers (fast compiles for deep models)
  remat: str = "none"  # rematerialisation of scanned blocks
  attention_impl: str = "auto"  # kernel of parallel chunks
  decode_attention: str = "auto"  # kernel of decode steps


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Llama with cross-layer KV sharing. Validated at construction."""
  vocab_size: int = 32000  # tokens in the vocabulary
  hidden_size: int = 2048  # width of the residual stream
  intermediate_size: int = 5632  # SwiGLU hidden width
  num_layers: int = 22  # decoder layers
  num_heads: int = 32  # query heads
  num_kv_heads: int = 4  # key/value heads (GQA); must divide num_heads
  head_dim: int | None = None  # per-head width; None means hidden_size // num_heads
  rope_theta: float = 10000.0  # RoPE base
  rope_scaling: Any = None  # HF-style {'rope_type': 'linear'|'llama3', 'factor': ...} or None
  rms_norm_eps: float = 1e-5  # RMSNorm epsilon
  tie_word_embeddings: bool = False  # LM head shares the embedding matrix
  max_position_embeddings: int = 2048  # longest position the model is meant for
  initializer_range: float = 0.02  # std of the normal init of every matrix
  # Cross-layer KV sharing.
  layer_types: str | None = None  # per-layer KV source, or a preset name ('lckv', 'cla:3', ...); None = llama
  forward_passes: int = 7  # m: iterations of a cyclic group without gradients
  backward_passes: int = 2  # b: iterations with gradients (truncated backprop), >= 1
  sliding_window: int | None = None  # window W of layers marked 's' (query + W-1 keys before it)
  use_sequential: bool = False  # run the exact token-by-token mode instead of the iteration plan
  force_nodiag: bool = False  # mask the diagonal in every layer (the reference's released models)
  decode_semantics: str = "exact"  # 'exact' (= sequential mode) or 'whynlp_main' (spec §5)
  # Numerics and compilation.
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = True  # scan runs of identical layers (fast compiles for deep models)
  remat: str = "none"  # rematerialisation of scanned blocks: none | full | dots | dots_no_batch
  attention_impl: str = "auto"  # parallel chunks: auto (cudnn on GPU, splash on TPU) | cudnn | xla | dense | splash
  decode_attention: str = "auto"  # decode steps: auto (pallas on GPU) | pallas | mosaic | dense

  def __post_init__(self):
    def positive(name):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings", "backward_passes"):
      positive(name)
    if not isinstance(self.forward_passes, int) or self.forward_passes < 0:
      raise ValueError(
          f"ModelConfig.forward_passes must be an integer >= 0, got {self.forward_passes!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads "
          f"({self.num_heads})")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"ModelConfig.num_heads ({self.num_heads}) must divide hidden_size "
            f"({self.hidden_size}) unless head_dim is given")
    else:
      positive("head_dim")
    if self.resolved_head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
    if self.rope_theta <= 0:
      raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
    if self.rms_norm_eps <= 0:
      raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
    if self.rope_scaling is not None:
      # Stored as sorted (key, value) pairs so the config stays hashable (it is static under jit).
      if isinstance(self.rope_scaling, Mapping):
        object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
      kind = self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type"))
      if kind not in _ROPE_SCALING:
        raise ValueError(
            f"ModelConfig.rope_scaling: rope_type must be one of {_ROPE_SCALING}, got {kind!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
            f"ModelConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
    if self.decode_semantics not in _DECODE_SEMANTICS:
      raise ValueError(f"ModelConfig.decode_semantics must be one of {_DECODE_SEMANTICS}, got "
                       f"{self.decode_semantics!r}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {_ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")
    if self.decode_attention == "xla":  # its name before "dense" meant the same kernel in both
      object.__setattr__(self, "decode_attention", "dense")  # knobs (checkpoints keep loading)
    if self.decode_attention not in _DECODE_ATTENTION:
      raise ValueError(f"ModelConfig.decode_attention must be one of {_DECODE_ATTENTION}, got "
                       f"{self.decode_attention!r}")
    if self.remat not in _REMAT:
      raise ValueError(f"ModelConfig.remat must be one of {_REMAT}, got {self.remat!r}")
    # Resolve presets once, so every consumer sees the literal string.
    spec = self.layer_types or "llama"
    try:
      resolved = lt_lib.resolve(spec, self.num_layers)
      lt_lib.parse(resolved, self.num_layers)
    except ValueError as e:
      raise ValueError(
          f"ModelConfig.layer_types={self.layer_types!r} is invalid: {e}. Use a string of "
          f"{self.num_layers} tokens or a preset: {', '.join(lt_lib.PRESETS)}") from None
    object.__setattr__(self, "layer_types", resolved)
    if any(self.layer_spec.sliding):
      if self.sliding_window is None:
        raise ValueError(
            "ModelConfig.sliding_window must be set: layer_types marks sliding-window layers "
            f"('s') in {resolved!r}")
    if self.sliding_window is not None and (
        not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(
          f"ModelConfig.sliding_window must be an integer >= 1, got {self.sliding_window!r}")
    if self.sliding_window == 1 and any(
        s and d for s, d in zip(self.layer_spec.sliding, self.layer_spec.diag_masked)):
      raise ValueError(
          "ModelConfig.sliding_window=1 leaves no visible key in a sliding layer whose diagonal "
          "is masked; use a window >= 2")

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @functools.cached_property
  def layer_spec(self) -> lt_lib.LayerTypes:
    return lt_lib.parse(self.layer_types, self.num_layers, force_nodiag=self.force_nodiag)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weights_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @property
  def run(self) -> RunConfig:
    """How this model runs (the fields of `RunConfig`)."""
    return RunConfig(**{f: getattr(self, f) for f in RUN_FIELDS})

  def with_run(self, run: "RunConfig | Mapping[str, Any]") -> "ModelConfig":
    """The same model run as `run` says (a RunConfig, or a dict of some of its fields)."""
    changes = dataclasses.asdict(run) if isinstance(run, RunConfig) else dict(run)
    unknown = sorted(set(changes) - set(RUN_FIELDS))
    if unknown:
      raise ValueError(f"run: unknown field(s) {unknown}; a RunConfig has {', '.join(RUN_FIELDS)}"
                       " (what the model is cannot change at load time)")
    return self.replace(**changes)

  def architecture(self) -> dict[str, Any]:
    """What the model is: every field but the run fields, as plain JSON values."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in RUN_FIELDS}
    d["rope_scaling"] = self.rope_scaling_dict
    return d

  def kv_cache_bytes_per_token(self, cache_dtype=None) -> int:
    """KV-cache bytes of one token: K, V (and a quantized cache's scales) of every KV layer, in
    `cache_dtype` (default the compute dtype; `lckv_jax.quant.CACHE_DTYPES`)."""
    return self.layer_spec.kv_bytes_per_token(
        self.num_kv_heads, self.resolved_head_dim,
        *quant.itemsizes(quant.cache_dtype(cache_dtype, self.compute_dtype)))


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                            if f.name not in RUN_FIELDS)


# ---------------------------------------------------------------------------------------------
# Config files (`configs/*.py`): what `--config=` names, read here so that tools outside
# training (benchmarks, serving) take a model's shape from them without importing `train/`.
# ---------------------------------------------------------------------------------------------


def read_config_file(path: str):
  """`get_config()` of a config file such as `configs/1b.py` (an ml_collections ConfigDict)."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location("lckv_config", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(config) -> ModelConfig:
  """The ModelConfig of a ConfigDict's `model` section; errors name the field."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  values = config.model.to_dict()
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"config.model has unknown field(s) {unknown}; allowed: {sorted(fields)}")
  return ModelConfig(**values)


def model_from_file(path: str, **changes) -> ModelConfig:
  """The ModelConfig of a config file's `model` section, with `changes` applied."""
  return model_config(read_config_file(path)).replace(**changes)
