"""AdamW with linear warm-up and cosine decay, a weight-decay mask, and global-norm clipping."""

from __future__ import annotations

import jax
import optax


def schedule(opt_cfg, steps: int) -> optax.Schedule:
  warmup = opt_cfg.warmup_steps
  if warmup < 0:
    warmup = int(round(opt_cfg.warmup_fraction * steps))
  warmup = min(max(warmup, 0), steps - 1) if steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)


def decay_mask(params: dict, opt_cfg) -> dict:
  """True where weight decay applies: matrices; norms and the embedding only if configured."""
  def decide(path, x):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if x.ndim <= 1 or "input_norm" in keys or "post_attention_norm" in keys or "final_norm" in keys:
      return bool(opt_cfg.decay_norms)
    if keys and keys[0] == "embed":
      return bool(opt_cfg.decay_embeddings)
    # Stacked norm scales are [layers, hidden]: 2-D, caught above by their module name.
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(opt_cfg, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(opt_cfg, steps)
  parts = []
  if opt_cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay,
                           mask=lambda p: decay_mask(p, opt_cfg)))
  return optax.chain(*parts), lr
