"""The dense reference attention that every kernel is checked against."""

import jax
import jax.numpy as jnp
import numpy as np


def test_zero_key_equals_attending_to_a_prepended_zero_slot():
  from lckv_jax.kernels.reference import dot_product_attention
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 3, 4, 8))
  k = jax.random.normal(ks[1], (2, 5, 2, 8))
  v = jax.random.normal(ks[2], (2, 5, 2, 8))
  mask = jax.random.bernoulli(ks[3], 0.6, (2, 3, 5))
  got = dot_product_attention(q, k, v, mask, zero_key=True)
  z = jnp.zeros((2, 1, 2, 8))
  want = dot_product_attention(q, jnp.concatenate([z, k], 1), jnp.concatenate([z, v], 1),
                               jnp.concatenate([jnp.ones((2, 3, 1), bool), mask], 2))
  np.testing.assert_allclose(got, want, atol=1e-6)
