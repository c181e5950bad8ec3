"""Next-token cross-entropy, in float32, with a loss mask and optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_BxTxV, tokens_BxT, loss_mask_BxT=None, z_loss: float = 0.0,
                    segment_ids_BxT=None):
  """Mean cross-entropy of predicting tokens[:, t+1] from logits[:, t].

  Args:
    logits_BxTxV: model output for every position.
    tokens_BxT: the input tokens (targets are the next ones).
    loss_mask_BxT: 1 where the token at t+1 should be predicted (e.g. 0 on padding); applies to
      the target position. Default: all ones.
    z_loss: coefficient of the PaLM z-loss, mean(log(Z)^2), keeping the softmax normaliser near 1.
    segment_ids_BxT: packed document ids; a target in another document than its context (the
      first token of each document) and padding targets (id 0) are not predicted.
  Returns:
    (loss, metrics) with metrics {'loss', 'log_z_sq', 'tokens'}: 'loss' is the cross-entropy alone;
    'log_z_sq' is mean(log(Z)^2), what the z-loss weighs (reported whatever the weight, since a
    growing normaliser is worth watching even with z_loss=0).
  """
  logits = logits_BxTxV[:, :-1].astype(jnp.float32)
  targets = tokens_BxT[:, 1:]
  mask = jnp.ones(targets.shape, jnp.float32)
  if loss_mask_BxT is not None:
    mask = mask * loss_mask_BxT[:, 1:].astype(jnp.float32)
  if segment_ids_BxT is not None:
    seg = segment_ids_BxT
    mask = mask * ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  count = jnp.maximum(mask.sum(), 1.0)
  ce = (nll * mask).sum() / count
  zl = (jnp.square(log_z) * mask).sum() / count
  return ce + z_loss * zl, {"loss": ce, "log_z_sq": zl, "tokens": mask.sum()}
