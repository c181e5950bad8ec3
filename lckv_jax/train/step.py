"""The jitted train and eval steps over pure-dict parameters.

Parameters are a pure dict (`nnx.to_pure_dict(state)`); the model is rebuilt inside the step
from an abstract template (`nnx.eval_shape`), so nothing concrete is closed over. A batch is
`{'tokens', 'positions', 'segment_ids'}` of shape [micro_batches, batch, seq]: micro-batches
are scanned and their gradients summed weighted by predicted tokens, so k micro-batches give the
gradient of one batch of their union.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lckv_jax.config import ModelConfig
from lckv_jax.loss import next_token_loss
from lckv_jax.model import Transformer


def abstract_model(config: ModelConfig) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def init_params(config: ModelConfig, seed: int, shardings=None) -> dict:
  """Random parameters as a pure dict, created directly with `shardings` (no host copy)."""
  def init():
    model = Transformer(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return jax.jit(init, out_shardings=shardings)()


def model_apply_fn(config: ModelConfig, document_mask: bool = True) -> Callable:
  """fn(params, tokens, positions, segment_ids) -> float32 logits, following the plan.

  Without `document_mask` the packed row is one causal sequence (documents see the earlier ones
  in their row, as in GPT-style pretraining): positions and segments are not passed, so on a GPU
  the fused cuDNN kernel runs instead of a dense mask.
  """
  abstract = abstract_model(config)
  graphdef, _ = nnx.split(abstract)

  def apply(params, tokens, positions, segment_ids):
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if not document_mask:
      return model(tokens)
    return model(tokens, positions, segment_ids)
  return apply


def _loss_sum(apply, params, mb, z_loss):
  logits = apply(params, mb["tokens"], mb["positions"], mb["segment_ids"])
  loss, m = next_token_loss(logits, mb["tokens"], z_loss=z_loss,
                            segment_ids_BxT=mb["segment_ids"])
  # Sums (mean x count), so micro-batches combine exactly; the count is a constant.
  return loss * m["tokens"], {"loss": m["loss"] * m["tokens"],
                              "log_z_sq": m["log_z_sq"] * m["tokens"], "tokens": m["tokens"]}


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, lr_schedule,
                    z_loss: float = 0.0, document_mask: bool = True) -> Callable:
  """step(state, batch) -> (state, metrics); state = {'params', 'opt_state', 'step'}."""
  apply = model_apply_fn(config, document_mask)

  def train_step(state, batch):
    params = state["params"]
    grad_fn = jax.value_and_grad(lambda p, mb: _loss_sum(apply, p, mb, z_loss), has_aux=True)

    def micro(carry, mb):
      grads, sums = carry
      (_, m), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, m)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    sums0 = {"loss": 0.0, "log_z_sq": 0.0, "tokens": 0.0}
    sums0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), sums0)
    (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), batch)
    n = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": sums["loss"] / n, "log_z_sq": sums["log_z_sq"] / n, "tokens": sums["tokens"],
               "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_params),
               "lr": lr_schedule(state["step"])}
    return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return train_step


def make_eval_step(config: ModelConfig, document_mask: bool = True) -> Callable:
  """eval(params, batch) -> {'nll_sum', 'tokens'} over all micro-batches of the batch."""
  apply = model_apply_fn(config, document_mask)

  def eval_step(params, batch):
    def micro(carry, mb):
      _, m = _loss_sum(apply, params, mb, 0.0)
      return jax.tree.map(jnp.add, carry, {"nll_sum": m["loss"], "tokens": m["tokens"]}), None
    zero = {"nll_sum": jnp.zeros((), jnp.float32), "tokens": jnp.zeros((), jnp.float32)}
    out, _ = jax.lax.scan(micro, zero, batch)
    return out

  return eval_step
