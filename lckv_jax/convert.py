"""HuggingFace interop: import Llama / lckv-llama checkpoints into lckv-jax, and export back.

    python -m lckv_jax.convert from-hf SRC DST --layer_types=lckv [--kv_init=average|copy]
    python -m lckv_jax.convert to-hf SRC DST

`from-hf` reads a HuggingFace directory (`config.json` + `*.safetensors`, sharded or not) of
`model_type` `llama` or `lckv-llama` (the authors' PyTorch code) and writes an lckv-jax model
checkpoint (`lckv_jax.checkpoint.save_model`) for ANY `layer_types` (docs/spec.md §6):

- every weight of the same name is copied;
- a KV-computing layer j gets Wk, Wv averaged over all layers i with `attends_to[i] == j`
  (`kv_init="average"`, MLKV-style) or keeps its own (`kv_init="copy"`). "The K/V weights of layer
  i" are those layer i used in the source: its own in a llama checkpoint, those of the layer it
  attended to in an lckv-llama one. Importing with the source's own `layer_types` is the identity.
- layers that compute no KV drop Wk, Wv.

`to-hf` writes safetensors + config.json with `model_type: llama` when the model is a plain Llama
(`layer_types` `0_1_..._L-1` without sliding windows or `force_nodiag`), else `lckv-llama` with
the extra fields `layer_types`, `forward_passes`, `backward_passes`, `sliding_window`,
`use_sequential`, `force_nodiag`. Tokenizer files found next to the source are copied.

Sliding window (docs/spec.md §3.4). Our window W covers the query and the W-1 keys before it, with
the diagonal masked one key less. The reference's flash-attention path (its default, with which
its checkpoints were trained) passes `window_size=(W_ref, W_ref)` to flash-attn, so a query sees
W_ref + 1 keys (itself and W_ref before); with the diagonal masked it drops the query's own key
and passes W_ref - 1 on the shifted keys, again one key more than our window of the same number.
Its eager path uses our convention. Hence, for `reference_attention="flash"` (default):
W_ours = W_ref + 1 on import and W_ref = W_ours - 1 on export; for "eager" the number is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lckv_jax import checkpoint, cli
from lckv_jax import hf as hf_io
from lckv_jax import layer_types as lt_lib
from lckv_jax.config import ModelConfig
from lckv_jax.model import Transformer

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "lckv-llama")
KV_INIT = ("average", "copy")
REFERENCE_ATTENTION = ("flash", "eager")
_IGNORED_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LCKV_FIELDS = ("layer_types", "forward_passes", "backward_passes", "sliding_window",
                "use_sequential", "force_nodiag")

# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
  """rope_theta and our rope_scaling from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
  (`rope_parameters`) fields."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    theta = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling")
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
      scaling = None
    elif kind not in ("linear", "llama3"):
      raise ValueError(f"config.json: rope type {kind!r} (rope_scaling/rope_parameters) is not "
                       "supported; supported: default, linear, llama3")
    else:
      scaling = {**scaling, "rope_type": kind}
      scaling.pop("type", None)
  return float(theta), scaling


def _check_supported(hf: dict) -> None:
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json: model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(MODEL_TYPES)}")
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name, False):
      raise ValueError(f"config.json: {name}={hf[name]!r} is not supported (lckv-jax Llama has no "
                       "biases); only false is allowed")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json: hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
  for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
               "vocab_size"):
    if name not in hf:
      raise ValueError(f"config.json: required field {name!r} is missing")


def source_layer_types(hf: dict) -> lt_lib.LayerTypes:
  """The layer_types the checkpoint was trained with: its own for lckv-llama, llama otherwise."""
  n = hf["num_hidden_layers"]
  spec = hf.get("layer_types") if hf.get("model_type") == "lckv-llama" else None
  spec = spec or lt_lib.llama(n)
  try:
    return lt_lib.parse(spec, n, force_nodiag=bool(hf.get("force_nodiag", False)))
  except ValueError as e:
    raise ValueError(f"config.json: field layer_types={spec!r} is invalid: {e}") from None


def sliding_window_from_reference(w: int | None, reference_attention: str = "flash") -> int | None:
  """The reference's `sliding_window` in our convention (see the module docstring)."""
  if reference_attention not in REFERENCE_ATTENTION:
    raise ValueError(f"reference_attention must be one of {REFERENCE_ATTENTION}, got "
                     f"{reference_attention!r}")
  if w is None:
    return None
  return int(w) + 1 if reference_attention == "flash" else int(w)


def sliding_window_to_reference(w: int | None, reference_attention: str = "flash") -> int | None:
  """Our `sliding_window` in the reference's convention (inverse of the above)."""
  if reference_attention not in REFERENCE_ATTENTION:
    raise ValueError(f"reference_attention must be one of {REFERENCE_ATTENTION}, got "
                     f"{reference_attention!r}")
  if w is None:
    return None
  return int(w) - 1 if reference_attention == "flash" else int(w)


def _hf_dtype(hf: dict) -> str:
  d = hf.get("dtype", hf.get("torch_dtype")) or "float32"
  return d if d in ("float32", "bfloat16", "float16") else "float32"


def config_from_hf(hf: dict, *, layer_types: str | None = None,
                   forward_passes: int | None = None, backward_passes: int | None = None,
                   sliding_window: int | None = None, force_nodiag: bool | None = None,
                   reference_attention: str = "flash", dtype: str | None = None,
                   param_dtype: str | None = None, **overrides) -> ModelConfig:
  """Maps a HuggingFace `config.json` (llama or lckv-llama) to a ModelConfig.

  Args:
    layer_types: the target layer types (string or preset); default the checkpoint's own.
    forward_passes, backward_passes, force_nodiag: override the checkpoint's values.
    sliding_window: the window in OUR convention, overriding the mapped reference value.
    reference_attention: 'flash' or 'eager': which reference path defines the imported window.
    dtype, param_dtype: compute and parameter dtypes; default float32 and the checkpoint's.
    overrides: any other ModelConfig field (e.g. scan_layers, remat).
  """
  _check_supported(hf)
  src = source_layer_types(hf)
  n, hidden, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim is not None and hidden % heads == 0 and head_dim == hidden // heads:
    head_dim = None
  theta, scaling = _rope_from_hf(hf)
  lckv = hf["model_type"] == "lckv-llama"
  ref_window = sliding_window_from_reference(hf.get("sliding_window"), reference_attention) \
      if lckv else None
  fields: dict[str, Any] = dict(
      vocab_size=hf["vocab_size"],
      hidden_size=hidden,
      intermediate_size=hf["intermediate_size"],
      num_layers=n,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      layer_types=layer_types if layer_types is not None else str(src),
      forward_passes=hf.get("forward_passes", 7) if forward_passes is None else forward_passes,
      backward_passes=hf.get("backward_passes", 2) if backward_passes is None else backward_passes,
      sliding_window=ref_window if sliding_window is None else sliding_window,
      use_sequential=bool(hf.get("use_sequential", False)),
      force_nodiag=src.force_nodiag if force_nodiag is None else bool(force_nodiag),
      dtype=dtype or "float32",
      param_dtype=param_dtype or _hf_dtype(hf),
  )
  fields.update(overrides)
  config = ModelConfig(**fields)
  if lckv and sliding_window is None and any(config.layer_spec.sliding):
    log.warning("sliding_window: the checkpoint's %s (reference %s-attention convention) becomes "
                "%s in lckv-jax (a window covers the query and the %s keys before it)",
                hf.get("sliding_window"), reference_attention, config.sliding_window,
                config.sliding_window - 1)
  return config


def config_to_hf(config: ModelConfig, reference_attention: str = "flash") -> dict:
  """The HuggingFace `config.json` of a ModelConfig: `llama` if nothing LCKV-specific, else
  `lckv-llama` (the reference's format)."""
  lt = config.layer_spec
  plain = str(lt) == lt_lib.llama(config.num_layers) and not config.force_nodiag
  dtype = config.param_dtype
  out: dict[str, Any] = {
      "architectures": ["LlamaForCausalLM" if plain else "LCKVLlamaForCausalLM"],
      "model_type": "llama" if plain else "lckv-llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.resolved_head_dim,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "max_position_embeddings": config.max_position_embeddings,
      "initializer_range": config.initializer_range,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": config.rope_scaling_dict,
      "rope_parameters": {"rope_type": "default", **(config.rope_scaling_dict or {}),
                          "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_word_embeddings,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }
  if not plain:
    out.update(
        layer_types=str(lt),
        forward_passes=config.forward_passes,
        backward_passes=config.backward_passes,
        sliding_window=sliding_window_to_reference(config.sliding_window, reference_attention),
        use_sequential=config.use_sequential,
        force_nodiag=config.force_nodiag,
    )
    bad = [i for i, j in enumerate(lt.attends_to) if lt.attends_to[j] != j]
    if bad:
      log.warning("layer_types %s: layers %s attend to a layer that does not attend to itself; the "
                  "reference code refuses such configs", lt, bad)
  return out


# ---------------------------------------------------------------------------------------------
# Tensors.
# ---------------------------------------------------------------------------------------------


def _layer_hf_shapes(config: ModelConfig, computes_kv: bool) -> dict[str, tuple[int, ...]]:
  e, f = config.hidden_size, config.intermediate_size
  h, k, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
  shapes = {
      "self_attn.q_proj.weight": (h * d, e),
      "self_attn.o_proj.weight": (e, h * d),
      "mlp.gate_proj.weight": (f, e),
      "mlp.up_proj.weight": (f, e),
      "mlp.down_proj.weight": (e, f),
      "input_layernorm.weight": (e,),
      "post_attention_layernorm.weight": (e,),
  }
  if computes_kv:
    shapes["self_attn.k_proj.weight"] = (k * d, e)
    shapes["self_attn.v_proj.weight"] = (k * d, e)
  return shapes


def expected_hf_shapes(config: ModelConfig, computes_kv: Sequence[bool]) -> dict[str, tuple]:
  """Every tensor a checkpoint of this config holds (K/V only where `computes_kv`)."""
  shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
            "model.norm.weight": (config.hidden_size,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
  for i, kv in enumerate(computes_kv):
    shapes.update({f"model.layers.{i}.{n}": s for n, s in _layer_hf_shapes(config, kv).items()})
  return shapes


def check_tensors(reader: hf_io.TensorReader, config: ModelConfig,
                  src: lt_lib.LayerTypes) -> None:
  """Fails naming the first missing, misshapen or unexpected tensor of the checkpoint."""
  expected = expected_hf_shapes(config, src.computes_kv)
  for name, shape in expected.items():
    if name not in reader:
      raise ValueError(f"{reader.path}: tensor {name!r} (shape {shape}) is missing from the "
                       "checkpoint")
    if reader.shape(name) != shape:
      raise ValueError(f"{reader.path}: tensor {name!r} has shape {reader.shape(name)}, expected "
                       f"{shape} from config.json")
  allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
  extra = [n for n in reader.names()
           if n not in expected and n not in allowed_extra and not _IGNORED_TENSORS.match(n)]
  if extra:
    raise ValueError(f"{reader.path}: unexpected tensor(s) {extra[:5]} for layer_types "
                     f"{src} (K/V weights exist only for KV-computing layers {src.kv_layers})")


def _layer_from_hf(get: Callable[[str], np.ndarray], i: int, config: ModelConfig, kv=None) -> dict:
  """Layer i's params in our layout; `kv` = (Wk, Wv) in HF layout or None."""
  e, h, k, d = (config.hidden_size, config.num_heads, config.num_kv_heads,
                config.resolved_head_dim)
  p = f"model.layers.{i}."
  attn = {"q_proj": get(p + "self_attn.q_proj.weight").T.reshape(e, h, d),
          "o_proj": get(p + "self_attn.o_proj.weight").T.reshape(h, d, e)}
  if kv is not None:
    attn["k_proj"] = kv[0].T.reshape(e, k, d)
    attn["v_proj"] = kv[1].T.reshape(e, k, d)
  return {
      "attn": attn,
      "mlp": {"gate_proj": get(p + "mlp.gate_proj.weight").T,
              "up_proj": get(p + "mlp.up_proj.weight").T,
              "down_proj": get(p + "mlp.down_proj.weight").T},
      "input_norm": {"scale": get(p + "input_layernorm.weight")},
      "post_attention_norm": {"scale": get(p + "post_attention_layernorm.weight")},
  }


def kv_sources(target: lt_lib.LayerTypes, src: lt_lib.LayerTypes, kv_init: str
               ) -> dict[int, list[int]]:
  """For each KV-computing target layer j, the source layers whose K/V weights it averages.

  Layer i's K/V weights in the source are those of `src.attends_to[i]` (its own in a llama).
  """
  if kv_init not in KV_INIT:
    raise ValueError(f"kv_init must be one of {KV_INIT}, got {kv_init!r}")
  out = {}
  for j in target.kv_layers:
    users = [i for i, a in enumerate(target.attends_to) if a == j] if kv_init == "average" else [j]
    out[j] = [src.attends_to[i] for i in users]
  return out


def _model_from_layers(config: ModelConfig, top: dict, layers: Sequence[dict]) -> Transformer:
  """Builds a Transformer from per-layer param dicts without random initialisation."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  dtype = config.weights_dtype

  def fill(ref, value, where):
    value = np.asarray(value)
    if tuple(value.shape) != tuple(ref.shape):
      raise ValueError(f"{where}: expected shape {tuple(ref.shape)}, got {tuple(value.shape)}")
    return jnp.asarray(value, dtype)

  params = {name: fill(target[name], value, name) if not isinstance(value, dict) else
            {k: fill(target[name][k], v, f"{name}.{k}") for k, v in value.items()}
            for name, value in top.items()}
  params["blocks"] = {}
  for r, run in enumerate(abstract.runs):
    block = {}
    for o in range(run.period):
      idx = [run.layer(b, o) for b in range(run.num_blocks)]
      block[o] = jax.tree.map(
          lambda ref, *vs: fill(ref, np.stack(vs), f"layers {idx}"),
          target["blocks"][r]["layers"][o], *[layers[i] for i in idx])
    params["blocks"][r] = {"layers": block}
  param_state = nnx.state(abstract, nnx.Param)
  nnx.replace_by_pure_dict(param_state, params)
  model = nnx.merge(graphdef, state)
  nnx.update(model, param_state)
  return model


def import_hf(path: str, *, kv_init: str = "average", **config_options) -> Transformer:
  """Loads a HuggingFace llama / lckv-llama checkpoint directory as a Transformer.

  `config_options` go to `config_from_hf` (layer_types, forward_passes, sliding_window, ...).
  """
  hf = hf_io.read_config(path)
  config = config_from_hf(hf, **config_options)
  src = source_layer_types(hf)
  reader = hf_io.TensorReader(path)
  check_tensors(reader, config, src)
  target = config.layer_spec
  f32 = lambda name: np.asarray(reader.get(name), np.float32) if config.param_dtype == "float32" \
      else reader.get(name)
  sources = kv_sources(target, src, kv_init)
  layers = []
  for i in range(config.num_layers):
    kv = None
    if i in sources:
      def mean(kind):
        ws = [np.asarray(reader.get(f"model.layers.{s}.self_attn.{kind}_proj.weight"), np.float32)
              for s in sources[i]]
        return ws[0] if len(ws) == 1 else np.mean(np.stack(ws), axis=0)
      kv = (mean("k"), mean("v"))
      if sources[i] != [i]:
        log.info("layer %d: K/V weights = %s of source layers %s", i,
                 "mean" if len(sources[i]) > 1 else "copy", sources[i])
    layers.append(_layer_from_hf(f32, i, config, kv))
  top = {"embed": f32("model.embed_tokens.weight"),
         "final_norm": {"scale": f32("model.norm.weight")}}
  if not config.tie_word_embeddings:
    top["lm_head"] = f32("lm_head.weight").T
  return _model_from_layers(config, top, layers)


def hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """The HuggingFace state dict of a model (parameter dtype kept; K/V for KV layers only)."""
  config = model.config
  e, h, k, d = (config.hidden_size, config.num_heads, config.num_kv_heads,
                config.resolved_head_dim)
  out = {"model.embed_tokens.weight": np.asarray(model.embed[...]),
         "model.norm.weight": np.asarray(model.final_norm.scale[...])}
  if not config.tie_word_embeddings:
    out["lm_head.weight"] = np.asarray(model.lm_head[...]).T
  for i in range(config.num_layers):
    lp = jax.tree.map(np.asarray, nnx.to_pure_dict(model.layer_params(i)))
    p = f"model.layers.{i}."
    out[p + "self_attn.q_proj.weight"] = lp["attn"]["q_proj"].reshape(e, h * d).T
    if "k_proj" in lp["attn"]:
      out[p + "self_attn.k_proj.weight"] = lp["attn"]["k_proj"].reshape(e, k * d).T
      out[p + "self_attn.v_proj.weight"] = lp["attn"]["v_proj"].reshape(e, k * d).T
    out[p + "self_attn.o_proj.weight"] = lp["attn"]["o_proj"].reshape(h * d, e).T
    out[p + "mlp.gate_proj.weight"] = lp["mlp"]["gate_proj"].T
    out[p + "mlp.up_proj.weight"] = lp["mlp"]["up_proj"].T
    out[p + "mlp.down_proj.weight"] = lp["mlp"]["down_proj"].T
    out[p + "input_layernorm.weight"] = lp["input_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = lp["post_attention_norm"]["scale"]
  return {n: np.ascontiguousarray(v) for n, v in out.items()}


def special_token_ids(directory: str | None, vocab_size: int) -> dict[str, int | None] | None:
  """The bos / eos / pad ids of the model in `directory`: its `generation_config.json` (kept from
  an import), else its tokenizer's; {bos: None, eos: None} for a byte-level model without a
  tokenizer; None when unknown. HuggingFace assumes 1 and 2 where config.json names no ids, which
  is wrong for most tokenizers, so the export writes what the model was trained with."""
  if directory and os.path.exists(os.path.join(directory, hf_io.GENERATION_CONFIG)):
    gen = hf_io.read_json(os.path.join(directory, hf_io.GENERATION_CONFIG))
    return {k: gen[k] for k in hf_io.SPECIAL_TOKENS if k in gen}
  from lckv_jax import tokenizer as tok_lib
  if directory and any(os.path.exists(os.path.join(directory, n))
                       for n in tok_lib.TOKENIZER_FILES):
    try:
      tok = tok_lib.load_tokenizer(directory)
    except (OSError, ValueError, ImportError) as e:
      log.warning("%s: tokenizer not readable (%s); config.json gets no bos/eos ids", directory,
                  cli.one_line(e))
      return None
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
  if vocab_size == tok_lib.ByteTokenizer.vocab_size:
    return {"bos_token_id": None, "eos_token_id": None}  # UTF-8 bytes: no special tokens
  return None


def export_hf(model: Transformer, path: str, *, reference_attention: str = "flash",
              max_shard_bytes: int | None = None, tokenizer_from: str | None = None) -> dict:
  """Writes `model` as a HuggingFace checkpoint directory; returns the config.json written.

  `path` must be new or an empty directory (nothing is overwritten), outside `tokenizer_from`.
  The bos / eos / pad ids go into config.json and `generation_config.json` (`special_token_ids`).
  """
  checkpoint.check_destination(path, tokenizer_from)
  os.makedirs(path, exist_ok=True)
  hf = config_to_hf(model.config, reference_attention)
  if hf["model_type"] == "lckv-llama" and model.config.sliding_window is not None:
    log.warning("sliding_window: lckv-jax %d is written as %s (reference %s-attention convention)",
                model.config.sliding_window, hf["sliding_window"], reference_attention)
  ids = special_token_ids(tokenizer_from, model.config.vocab_size)
  if ids is None:
    log.warning("no tokenizer or %s in %s: config.json names no bos/eos ids (HuggingFace then "
                "assumes 1 and 2)", hf_io.GENERATION_CONFIG, tokenizer_from)
  hf.update(ids or {})
  hf_io.write_tensors(path, hf_tensors(model), max_shard_bytes)
  with open(os.path.join(path, "config.json"), "x") as f:
    json.dump(hf, f, indent=2)
  copied = hf_io.copy_tokenizer_files(tokenizer_from, path) if tokenizer_from else []
  if ids is not None and hf_io.GENERATION_CONFIG not in copied:
    write_generation_config(path, ids)
  return hf


def write_generation_config(path: str, ids: dict[str, int | None]) -> None:
  """A `generation_config.json` with the model's special token ids, as transformers writes it."""
  gen = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
  with open(os.path.join(path, hf_io.GENERATION_CONFIG), "x") as f:
    json.dump(gen, f, indent=2)


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------


def _parse_size(s: str | None) -> int | None:
  if s is None:
    return None
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", s.upper())
  size = None if m is None else int(float(m.group(1)) * {
      "": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30,
      "GB": 2**30}[m.group(2)])
  if not size:
    raise cli.UserError(f"--max_shard_size: expected a positive size such as 5GB, 500MB or a "
                        f"number of bytes, got {s!r}")
  return size


def _check_source(path: str, command: str) -> None:
  """A source directory of the kind `command` reads (the other kind names the other command)."""
  what = "a HuggingFace" if command == "from-hf" else "an lckv-jax model"
  if not os.path.exists(path):
    raise FileNotFoundError(f"source {path} does not exist")
  if not os.path.isdir(path):
    raise cli.UserError(f"source {path} is a file; expected {what} checkpoint directory")
  ours = os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR))
  theirs = any(f.endswith(".safetensors") for f in os.listdir(path))
  if command == "from-hf" and ours and not theirs:
    raise cli.UserError(f"source {path} is an lckv-jax model checkpoint (params/), not a "
                        "HuggingFace one: `to-hf` converts it")
  if command == "to-hf" and theirs and not ours:
    raise cli.UserError(f"source {path} is a HuggingFace checkpoint (*.safetensors), not an "
                        "lckv-jax one: `from-hf` converts it")


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def main(argv: Sequence[str] | None = None) -> None:
  """The command line; user errors raise (`cli.run` prints them as one line)."""
  parser = cli.ArgumentParser(prog="python -m lckv_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-hf", help="HuggingFace llama / lckv-llama -> lckv-jax checkpoint")
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--layer_types", default=None,
                 help="target layer_types string or preset (lckv, cla:2, ...); default the source's")
  p.add_argument("--kv_init", choices=KV_INIT, default="average")
  p.add_argument("--forward_passes", type=int, default=None)
  p.add_argument("--backward_passes", type=int, default=None)
  p.add_argument("--sliding_window", type=int, default=None,
                 help="window in lckv-jax's convention (query + W-1 keys); overrides the mapping")
  p.add_argument("--force_nodiag", type=_bool, default=None)
  p.add_argument("--reference_attention", choices=REFERENCE_ATTENTION, default="flash",
                 help="which reference attention path defines an lckv-llama sliding_window")
  p.add_argument("--dtype", default=None, help="compute dtype (default float32)")
  p.add_argument("--param_dtype", default=None, help="parameter dtype (default the checkpoint's)")
  q = sub.add_parser("to-hf", help="lckv-jax checkpoint -> HuggingFace llama / lckv-llama")
  q.add_argument("src")
  q.add_argument("dst")
  q.add_argument("--reference_attention", choices=REFERENCE_ATTENTION, default="flash")
  q.add_argument("--max_shard_size", default=None, help="e.g. 5GB; default one file")
  for sp in (p, q):
    sp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  args = parser.parse_args(argv)
  # Every check before any work: a refused conversion leaves both directories as they were.
  _check_source(args.src, args.command)
  checkpoint.check_destination(args.dst, args.src)
  max_shard_bytes = _parse_size(getattr(args, "max_shard_size", None))
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
  log.setLevel(logging.INFO)  # also when another library configured logging first
  if args.command == "from-hf":
    model = import_hf(args.src, kv_init=args.kv_init, layer_types=args.layer_types,
                      forward_passes=args.forward_passes, backward_passes=args.backward_passes,
                      sliding_window=args.sliding_window, force_nodiag=args.force_nodiag,
                      reference_attention=args.reference_attention, dtype=args.dtype,
                      param_dtype=args.param_dtype)
    checkpoint.save_model(args.dst, model)
    copied = hf_io.copy_tokenizer_files(args.src, args.dst)
    ids = {k: v for k, v in hf_io.read_config(args.src).items() if k in hf_io.SPECIAL_TOKENS}
    if hf_io.GENERATION_CONFIG not in copied and ids:  # kept, so to-hf writes them back
      write_generation_config(args.dst, ids)
    c = model.config
    print(f"wrote {args.dst}: layer_types={c.layer_types}, KV layers {list(c.layer_spec.kv_layers)}, "
          f"kv_init={args.kv_init}, sliding_window={c.sliding_window}, force_nodiag={c.force_nodiag}"
          + (f"; tokenizer files {copied}" if copied else ""))
  else:
    model = checkpoint.load_model(args.src)
    hf = export_hf(model, args.dst, reference_attention=args.reference_attention,
                   max_shard_bytes=max_shard_bytes, tokenizer_from=args.src)
    print(f"wrote {args.dst}: model_type={hf['model_type']}"
          + (f", sliding_window={hf.get('sliding_window')} ({args.reference_attention} convention)"
             if hf["model_type"] == "lckv-llama" else ""))


if __name__ == "__main__":
  cli.run(main, prog="python -m lckv_jax.convert")
