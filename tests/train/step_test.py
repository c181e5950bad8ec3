"""The jitted train step: gradient accumulation, the document mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lckv_jax.data import pipeline
from lckv_jax.train import optim, step as step_lib
from lckv_jax.train.config import model_config


def test_grad_accumulation_equals_one_big_batch(tiny_train_config):
  c = tiny_train_config()
  c.model.update(num_layers=2, layer_types="cla")  # accumulation does not depend on the plan
  mc = model_config(c)
  tx, lr = optim.make_optimizer(c.optimizer, c.steps)
  ds = pipeline.make_datasets(c.data, c.seq_len, c.batch_size, mc.vocab_size)
  batch = ds.train[0]
  params = step_lib.init_params(mc, 0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  fn = jax.jit(step_lib.make_train_step(mc, tx, lr))
  out = {}
  for k in (1, 4):
    b = {n: jnp.asarray(x).reshape(k, -1, x.shape[-1]) for n, x in batch.items()}
    out[k] = fn(state, b)
  np.testing.assert_allclose(out[1][1]["loss"], out[4][1]["loss"], rtol=1e-6)
  chex.assert_trees_all_close(out[1][0]["params"], out[4][0]["params"], atol=1e-6, rtol=0)


def test_document_mask_off_runs_the_packed_row_as_one_causal_sequence(tiny_train_config):
  c = tiny_train_config()
  mc = model_config(c)
  params = step_lib.init_params(mc, 0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  segments = jnp.asarray([[1] * 6 + [2] * 10] * 2)
  positions = jnp.asarray([list(range(6)) + list(range(10))] * 2)
  masked = step_lib.model_apply_fn(mc)(params, tokens, positions, segments)
  row = step_lib.model_apply_fn(mc, document_mask=False)(params, tokens, positions, segments)
  plain = step_lib.model_apply_fn(mc)(params, tokens, jnp.arange(16)[None].repeat(2, 0),
                                      jnp.ones_like(tokens))
  np.testing.assert_allclose(row, plain, atol=1e-5)
  np.testing.assert_allclose(row[:, :6], masked[:, :6], atol=1e-5)  # first document: same
  assert float(jnp.abs(row[:, 6:] - masked[:, 6:]).max()) > 1e-3  # the second sees the first
