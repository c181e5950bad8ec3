"""On a GPU: the cuDNN path against the dense-mask path, bf16, per preset (relative error),
for one causal sequence per row and for packed documents (segment ids, positions restarting).
Prints its numbers; writes no record.

  python -m benchmarks.kernel_check
"""
import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import packed_rows
from lckv_jax import ModelConfig, Transformer


def rel(x, y):
  return float(jnp.linalg.norm((x - y).astype(jnp.float32)) /
               (jnp.linalg.norm(x.astype(jnp.float32)) + 1e-30))


def main(argv=None):
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
  for lt in ["llama", "lckv", "cla", "yoco", "lckv:0"]:
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=6,
                      num_heads=8, num_kv_heads=2, layer_types=lt, sliding_window=64,
                      dtype="bfloat16", attention_impl="dense")
    dense = Transformer(cfg, rngs=nnx.Rngs(0))
    fused = Transformer(cfg.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(1), (4, 1024), 0, 512)
    for docs in (1, 16):
      pos, seg = (None, None) if docs == 1 else packed_rows(4, 1024, docs)
      f = nnx.jit(lambda m, t, p, s: m(t, p, s))
      a, b = f(dense, toks, pos, seg), f(fused, toks, pos, seg)
      grad = nnx.jit(nnx.grad(lambda m, t, p, s: jnp.mean(m(t, p, s) ** 2)))
      ga = jax.tree.leaves(grad(dense, toks, pos, seg))
      gb = jax.tree.leaves(grad(fused, toks, pos, seg))
      gerr = max(rel(x, y) for x, y in zip(ga, gb))
      print(f"{lt:8s} documents/row {docs:2d}  logits rel err {rel(a, b):.2e}  "
            f"max grad rel err {gerr:.2e}", flush=True)


if __name__ == "__main__":
  main()
