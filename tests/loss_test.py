import jax
import jax.numpy as jnp
import numpy as np

from lckv_jax.loss import next_token_loss


def _manual(logits, tokens, mask):
  lp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
  nll = -np.take_along_axis(np.asarray(lp), np.asarray(tokens)[:, 1:, None], -1)[..., 0]
  m = np.asarray(mask, np.float64)[:, 1:]
  return (nll * m).sum() / m.sum()


def test_matches_manual_cross_entropy():
  logits = jax.random.normal(jax.random.key(0), (2, 6, 11))
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
  loss, m = next_token_loss(logits, tokens)
  np.testing.assert_allclose(loss, _manual(logits, tokens, np.ones((2, 6))), rtol=1e-5)
  assert m["tokens"] == 10


def test_segments_mask_boundaries_and_padding():
  logits = jax.random.normal(jax.random.key(0), (1, 7, 5))
  tokens = jnp.array([[1, 2, 3, 4, 0, 1, 0]])
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
  loss, m = next_token_loss(logits, tokens, segment_ids_BxT=seg)
  # Predicted targets: positions 1, 2 (doc 1) and 4, 5 (doc 2); not 3 (new doc) nor 6 (padding).
  mask = np.array([[0, 1, 1, 0, 1, 1, 0]])
  np.testing.assert_allclose(loss, _manual(logits, tokens, mask), rtol=1e-5)
  assert m["tokens"] == 4


def test_loss_mask_and_z_loss():
  logits = jax.random.normal(jax.random.key(2), (2, 5, 7)) * 3
  tokens = jax.random.randint(jax.random.key(3), (2, 5), 0, 7)
  mask = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]])
  loss, m = next_token_loss(logits, tokens, mask, z_loss=1e-2)
  np.testing.assert_allclose(m["loss"], _manual(logits, tokens, mask), rtol=1e-5)
  log_z = np.asarray(jax.nn.logsumexp(logits[:, :-1], -1))
  zl = (log_z ** 2 * np.asarray(mask[:, 1:])).sum() / np.asarray(mask[:, 1:]).sum()
  np.testing.assert_allclose(loss, m["loss"] + 1e-2 * zl, rtol=1e-5)
  # The metric is named for what it measures: it is reported whatever the z-loss weight.
  np.testing.assert_allclose(m["log_z_sq"], zl, rtol=1e-5)
  _, m0 = next_token_loss(logits, tokens, mask)
  np.testing.assert_allclose(m0["log_z_sq"], zl, rtol=1e-5)
  assert "z_loss" not in m0


def test_float32_even_for_bf16_logits():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 9)).astype(jnp.bfloat16)
  loss, _ = next_token_loss(logits, jnp.zeros((1, 4), jnp.int32))
  assert loss.dtype == jnp.float32


def test_all_masked_gives_zero_not_nan():
  loss, m = next_token_loss(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32),
                            segment_ids_BxT=jnp.zeros((1, 3), jnp.int32))
  assert float(loss) == 0.0 and m["tokens"] == 0
