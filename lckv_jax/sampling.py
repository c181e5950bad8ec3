"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), one PRNG key per call.

`sample(logits_BxV, key, temperature=0.0)` is greedy (the key is unused); the same key and logits
always give the same tokens. The settings are static under `jit` (they choose the code path).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick the next token. Hashable, so it can be a static argument of `jit`."""
  temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before sampling
  top_k: int = 0  # keep the k most likely tokens; 0 = no limit
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p

  def __post_init__(self):
    validate(self.temperature, self.top_k, self.top_p)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def validate(temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError naming the bad setting and what is allowed."""
  if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
      temperature >= 0.0):
    raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
  if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
  if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = no limit), got {top_p!r}")


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets the logits outside the top-k / top-p set to -inf (the most likely token always stays)."""
  logits = logits_BxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token is kept while the probability mass before it is below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits_BxV: jax.Array, key: jax.Array | None, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Next tokens [batch] (int32) from logits [batch, vocab]."""
  validate(temperature, top_k, top_p)
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  logits = filter_logits(logits_BxV.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_with(settings: Sampling, logits_BxV: jax.Array, key: jax.Array | None) -> jax.Array:
  return sample(logits_BxV, key, settings.temperature, settings.top_k, settings.top_p)
