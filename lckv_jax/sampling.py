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


def _top_k_top_p(scaled: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """[batch, vocab] logits with each row's tokens outside its top-k, then outside its top-p
  mass, at -inf (a row with top_k 0 or vocab and top_p 1 unchanged)."""
  vocab = scaled.shape[-1]
  k = jnp.where((top_k_B > 0) & (top_k_B < vocab), top_k_B, vocab)
  kth = jnp.take_along_axis(jnp.sort(scaled, axis=-1)[:, ::-1], (k - 1)[:, None], axis=-1)
  scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  threshold = jnp.min(jnp.where(before < top_p_B[:, None], sorted_desc, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where((top_p_B[:, None] < 1.0) & (scaled < threshold), -jnp.inf, scaled)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array,
                top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """Next tokens [batch] with each row's own settings and key (a server's batch mixes requests).

  Row r gives exactly `sample(logits[r:r+1], keys[r], temperature[r], top_k[r], top_p[r])`:
  greedy where the temperature is 0, else top-k, then top-p, then a draw with the row's key. The
  settings are arrays here (traced, not static), so one compiled step serves every mix.
  """
  logits = logits_BxV.astype(jnp.float32)
  vocab = logits.shape[-1]
  sampled_rows = temperature_B > 0
  scaled = logits / jnp.where(sampled_rows, temperature_B, 1.0)[:, None]
  filtered = sampled_rows & (((top_k_B > 0) & (top_k_B < vocab)) | (top_p_B < 1.0))
  # Top-k and top-p sort every row's logits, twice: at a 5,184-row batch and 32,000 tokens, two
  # sorts of 166M floats a step. Only a batch with a row that asks for them pays; a greedy
  # batch skips the draw too.
  scaled = jax.lax.cond(filtered.any(), lambda s: _top_k_top_p(s, top_k_B, top_p_B),
                        lambda s: s, scaled)
  drawn = jax.lax.cond(sampled_rows.any(), lambda s: jax.vmap(
      lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys_B, s),
      lambda s: jnp.zeros(s.shape[:1], jnp.int32), scaled)
  return jnp.where(sampled_rows, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
