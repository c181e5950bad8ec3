"""FLOP counts: a training token under the iteration plan (docs/spec.md §4) and MFU; the per-layer
matmul and attention counts that `roofline` builds decode and prefill counts from.

A layer of a cyclic group runs m forward-only passes (cost 1 each) and b passes with gradients
(cost 3 each: forward plus backward); any other layer costs 3. Matmul cost is 2 FLOPs per
multiply-add of every weight a token touches, plus attention's scores and values
(2 * 2 * seq * heads * head_dim per token and layer, full square, as in PaLM's MFU).
"""

from __future__ import annotations

import jax

from lckv_jax.config import ModelConfig

# Dense bf16 peak TFLOP/s per device, by `device_kind` substring.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6": 918.0}


def layer_matmul_params(config: ModelConfig, i: int) -> int:
  e, h, k, d, f = (config.hidden_size, config.num_heads, config.num_kv_heads,
                   config.resolved_head_dim, config.intermediate_size)
  n = 2 * e * h * d + 3 * e * f
  if config.layer_spec.computes_kv[i]:
    n += 2 * e * k * d
  return n


def attention_flops(config: ModelConfig, pairs: int) -> int:
  """QK^T and PV over `pairs` (query, key) pairs: 2 matmuls * 2 FLOPs * heads * head_dim."""
  return 2 * 2 * config.num_heads * config.resolved_head_dim * pairs


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """FLOPs of one training token (forward + backward, all passes of the plan)."""
  lt = config.layer_spec
  m, b = config.forward_passes, config.backward_passes
  attn = attention_flops(config, seq_len)  # the full square: every token against seq_len keys
  total = 0.0
  for seg in lt.plan():
    cost = (3 * b + m) if seg.cyclic else 3
    for i in seg.layers:
      total += cost * (2 * layer_matmul_params(config, i) + attn)
  total += 3 * 2 * config.hidden_size * config.vocab_size  # LM head
  return total


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in _PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None
