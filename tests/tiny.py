"""The tiny model the tests build, defined once: its shape (`TINY`), its `ModelConfig`, a
`Transformer` of it, and a train.py config that trains it.

In a test function, ask for the factory fixtures of the same names (tests/conftest.py):

    def test_something(tiny_model):
      model = tiny_model(layer_types="lckv", vocab_size=97)

Where no fixture reaches (parametrize, module-scoped fixtures, helpers, scripts run in a
subprocess), import this module: `from tests import tiny`, then `tiny.tiny_model(...)`.

A test that depends on a value (a vocabulary of 97 or 256, a sliding window, a position limit, a
seed) passes it as an override, so the value is visible where it matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lckv_jax import ModelConfig, Transformer

# E=32, H=4, K=2, D=8, F=64, V=64, 4 layers; everything else is ModelConfig's default.
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
            num_kv_heads=2)


def tiny_config(**overrides) -> ModelConfig:
  """ModelConfig of `TINY` with `overrides` (any ModelConfig field)."""
  return ModelConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, std: float | None = None, draw: str = "jax",
               **overrides) -> Transformer:
  """A Transformer of `tiny_config(**overrides)`.

  std=None: the model's own initialisation from `nnx.Rngs(seed)`.
  std=s: every parameter drawn again, N(0, s) (N(1, s) for norm scales), so that every path
  moves the output:
    draw="jax": built from `nnx.Rngs(seed)`, then one `jax.random.key(seed + 1)` split over the
      parameters (in the order of their paths);
    draw="numpy": `np.random.RandomState(seed)` over the parameters of the abstract model, without
      the slow eager initialisation.
  """
  config = tiny_config(**overrides)
  if std is None:
    return Transformer(config, rngs=nnx.Rngs(seed))
  if draw == "numpy":
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = nnx.state(abstract, nnx.Param)
    rng = np.random.RandomState(seed)
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
                                    + std * rng.standard_normal(x.shape), jnp.float32),
        nnx.to_pure_dict(params)))
    model = nnx.merge(graphdef, state)
    nnx.update(model, params)
    return model
  if draw != "jax":
    raise ValueError(f"draw must be 'jax' or 'numpy', got {draw!r}")
  model = Transformer(config, rngs=nnx.Rngs(seed))
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  new = [(1.0 if "scale" in jax.tree_util.keystr(p) else 0.0)
         + std * jax.random.normal(k, x.shape, x.dtype) for (p, x), k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, new))
  nnx.update(model, params)
  return model


def tiny_train_config(**overrides):
  """A train.py config (ml_collections) of the tiny LCKV model, vocabulary 256 (bytes), on a slice
  of the embedded corpus. `overrides`: top-level fields or whole sections."""
  from lckv_jax.train.config import default_config
  c = default_config()
  c.model.update({**TINY, "vocab_size": 256, "layer_types": "lckv", "forward_passes": 1,
                  "backward_passes": 1, "max_position_embeddings": 64})
  c.update(seq_len=32, batch_size=8, steps=50, log_every=5, eval_every=0, progress_bar=False)
  c.optimizer.update(lr=1e-2, warmup_steps=5)
  c.data.update(max_documents=30, eval_batches=2)
  c.checkpoint.update(every=10, keep=5)
  for k, v in overrides.items():
    c[k] = v
  return c
