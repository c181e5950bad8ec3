"""An independent, deliberately naive implementation of docs/spec.md, for tests.

No scans, no stacking, no shared code with `lckv_jax.model` beyond reading its parameters: a
Python loop over layers and iterations, masks built element by element, GQA by repeating heads.
Works in float32 (JAX, differentiable) or float64 (NumPy arrays through jnp with x64 off is float32,
so callers wanting float64 use `numpy_logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def extract_params(model) -> dict:
  """Per-layer parameter dicts of a `Transformer`, as plain arrays."""
  cfg = model.config
  layers = []
  for i in range(cfg.num_layers):
    lp = nnx.to_pure_dict(model.layer_params(i))
    layers.append(lp)
  p = {"embed": model.embed[...], "final_norm": model.final_norm.scale[...], "layers": layers}
  if not cfg.tie_word_embeddings:
    p["lm_head"] = model.lm_head[...]
  return p


def _mask(cfg, i, t_len, xp):
  lt = cfg.layer_spec
  m = np.zeros((t_len, t_len), bool)
  for q in range(t_len):
    for k in range(t_len):
      ok = k <= q
      if lt.diag_masked[i] and k == q:
        ok = False
      if lt.sliding[i] and q - k >= cfg.sliding_window:
        ok = False
      m[q, k] = ok
  return m


def _rope(x, positions, cfg, xp):
  d = x.shape[-1]
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
  ang = positions[:, None] * inv[None, :]
  cos = xp.asarray(np.cos(np.concatenate([ang, ang], -1)))[None, :, None, :]
  sin = xp.asarray(np.sin(np.concatenate([ang, ang], -1)))[None, :, None, :]
  half = d // 2
  rot = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rot * sin


def _rms(x, w, eps, xp):
  return w * x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)


def _softmax_or_zero(logits, mask, xp):
  logits = xp.where(mask, logits, -xp.inf)
  mx = xp.max(xp.where(mask, logits, -1e30), axis=-1, keepdims=True)
  e = xp.where(mask, xp.exp(logits - mx), 0.0)
  s = e.sum(-1, keepdims=True)
  return e / xp.where(s == 0, 1.0, s)


def _layer(cfg, i, p, h, kvs, positions, xp, silu):
  lt = cfg.layer_spec
  lp = p["layers"][i]
  x = _rms(h, lp["input_norm"]["scale"], cfg.rms_norm_eps, xp)
  if lt.computes_kv[i]:
    k = _rope(xp.einsum("bte,ekd->btkd", x, lp["attn"]["k_proj"]), positions, cfg, xp)
    v = xp.einsum("bte,ekd->btkd", x, lp["attn"]["v_proj"])
    kvs[i] = (k, v)
  k, v = kvs[lt.attends_to[i]]
  rep = cfg.num_heads // cfg.num_kv_heads
  k, v = xp.repeat(k, rep, axis=2), xp.repeat(v, rep, axis=2)
  q = _rope(xp.einsum("bte,ehd->bthd", x, lp["attn"]["q_proj"]), positions, cfg, xp)
  logits = xp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = _softmax_or_zero(logits, xp.asarray(_mask(cfg, i, h.shape[1], xp))[None, None], xp)
  a = xp.einsum("bhqk,bkhd->bqhd", probs, v)
  h = h + xp.einsum("bthd,hde->bte", a, lp["attn"]["o_proj"])
  x = _rms(h, lp["post_attention_norm"]["scale"], cfg.rms_norm_eps, xp)
  g = xp.einsum("bte,ef->btf", x, lp["mlp"]["gate_proj"])
  u = xp.einsum("bte,ef->btf", x, lp["mlp"]["up_proj"])
  return h + xp.einsum("btf,fe->bte", silu(g) * u, lp["mlp"]["down_proj"])


def logits(cfg, p, tokens, forward_passes, backward_passes, xp=jnp, stop=jax.lax.stop_gradient):
  """Parallel-mode logits by the letter of docs/spec.md §4 (m no-grad iterations, then b with
  grad)."""
  silu = (lambda x: x / (1 + xp.exp(-x)))
  lt = cfg.layer_spec
  t_len = tokens.shape[1]
  positions = np.arange(t_len, dtype=np.float64)
  h = p["embed"][tokens]
  kvs = {}
  for seg in lt.plan():
    if not seg.cyclic:
      for i in seg.layers:
        h = _layer(cfg, i, p, h, kvs, positions, xp, silu)
      continue
    h_in = h
    zeros = xp.zeros(h.shape[:2] + (cfg.num_kv_heads, cfg.resolved_head_dim), h.dtype)
    group = {j: (zeros, zeros) for j in seg.layers if lt.computes_kv[j]}
    for it in range(forward_passes + backward_passes):
      grad = it >= forward_passes
      if it == forward_passes:
        group = stop(group)
      pp, hh = (p, h_in) if grad else stop((p, h_in))
      local = {**kvs, **group}
      for i in seg.layers:
        hh = _layer(cfg, i, pp, hh, local, positions, xp, silu)
      group = {j: local[j] for j in group}
    h = hh
    kvs.update(group)
  h = _rms(h, p["final_norm"], cfg.rms_norm_eps, xp)
  head = p["embed"].T if cfg.tie_word_embeddings else p["lm_head"]
  return xp.einsum("bte,ev->btv", h, head)


def numpy_logits(cfg, p, tokens, forward_passes, backward_passes):
  """The same in float64 NumPy (no gradients)."""
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  return logits(cfg, p64, np.asarray(tokens), forward_passes, backward_passes, xp=np,
                stop=lambda x: x)


def model_from_hf(hf, cfg):
  """A `Transformer` holding the weights of a transformers `LlamaForCausalLM` (mapped by hand)."""
  from flax import nnx
  from lckv_jax import Transformer
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  model.embed[...] = jnp.asarray(sd["model.embed_tokens.weight"])
  model.final_norm.scale[...] = jnp.asarray(sd["model.norm.weight"])
  if not cfg.tie_word_embeddings:
    model.lm_head[...] = jnp.asarray(sd["lm_head.weight"].T)
  for i in range(cfg.num_layers):
    w = lambda n: sd[f"model.layers.{i}.{n}.weight"]
    model.set_layer_params(i, {
        "input_norm": {"scale": w("input_layernorm")},
        "post_attention_norm": {"scale": w("post_attention_layernorm")},
        "attn": {"q_proj": w("self_attn.q_proj").T.reshape(e, h, d),
                 "k_proj": w("self_attn.k_proj").T.reshape(e, k, d),
                 "v_proj": w("self_attn.v_proj").T.reshape(e, k, d),
                 "o_proj": w("self_attn.o_proj").T.reshape(h, d, e)},
        "mlp": {"gate_proj": w("mlp.gate_proj").T, "up_proj": w("mlp.up_proj").T,
                "down_proj": w("mlp.down_proj").T}})
  return model
