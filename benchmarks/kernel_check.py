"""On a GPU: the cuDNN path against the dense-mask path, bf16, per preset (relative error).

  python benchmarks/kernel_check.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from lckv_jax import ModelConfig, Transformer

for lt in ["llama", "lckv", "cla", "yoco", "lckv:0"]:
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=6,
                    num_heads=8, num_kv_heads=2, layer_types=lt, sliding_window=64,
                    dtype="bfloat16", attention_impl="dense")
  dense = Transformer(cfg, rngs=nnx.Rngs(0))
  fused = Transformer(cfg.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(1), (4, 1024), 0, 512)
  f = nnx.jit(lambda m, t: m(t))
  a, b = f(dense, toks), f(fused, toks)
  grad = nnx.jit(nnx.grad(lambda m, t: jnp.mean(m(t) ** 2)))
  ga, gb = jax.tree.leaves(grad(dense, toks)), jax.tree.leaves(grad(fused, toks))
  gerr = max(float(jnp.linalg.norm(x - y) / (jnp.linalg.norm(x) + 1e-30)) for x, y in zip(ga, gb))
  print(f"{lt:8s} logits rel err {float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)):.2e}  "
        f"max grad rel err {gerr:.2e}")
