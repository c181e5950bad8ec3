"""Sampling: greedy, temperature, top-k, top-p, reproducibility and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lckv_jax.sampling import Sampling, filter_logits, sample

LOGITS = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1], [0.05, 0.05, 0.1, 0.8]]))


def test_greedy_is_argmax_and_ignores_the_key():
  assert sample(LOGITS, None).tolist() == [0, 3]
  assert sample(LOGITS, jax.random.key(1)).tolist() == [0, 3]


def test_same_key_same_tokens():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  a = sample(logits, jax.random.key(7), temperature=1.0)
  b = sample(logits, jax.random.key(7), temperature=1.0)
  c = sample(logits, jax.random.key(8), temperature=1.0)
  assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def _frequencies(n=4000, **kw):
  keys = jax.random.split(jax.random.key(0), n)
  toks = jax.vmap(lambda k: sample(LOGITS[:1], k, **kw)[0])(keys)
  return np.bincount(np.asarray(toks), minlength=4) / n


def test_temperature_one_follows_the_distribution():
  np.testing.assert_allclose(_frequencies(temperature=1.0), [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_top_k_and_top_p_keep_the_right_sets():
  assert _frequencies(temperature=1.0, top_k=2)[2:].sum() == 0
  np.testing.assert_allclose(_frequencies(temperature=1.0, top_k=2)[:2], [2 / 3, 1 / 3], atol=0.03)
  # top_p 0.7: 0.5 then 0.25 reach it; 0.15 and 0.1 are cut.
  assert _frequencies(temperature=1.0, top_p=0.7)[2:].sum() == 0
  assert _frequencies(temperature=1.0, top_p=0.5)[1:].sum() == 0  # the first reaches 0.5 alone
  kept = np.isfinite(np.asarray(filter_logits(LOGITS, top_p=0.9)))
  assert kept.tolist() == [[True, True, True, False], [False, False, True, True]]


def test_low_temperature_approaches_greedy():
  assert _frequencies(n=500, temperature=1e-3)[0] == 1.0


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k")])
def test_bad_settings_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    Sampling(**kw)
  with pytest.raises(ValueError, match=match):
    sample(LOGITS, jax.random.key(0), **{"temperature": 1.0, **kw})


def test_sample_rows_is_sample_of_each_row_with_its_own_settings_and_key():
  from lckv_jax.sampling import sample, sample_rows
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(6, 50) * 3, jnp.float32)
  t, k, p = [0.0, 1.0, 0.7, 1.3, 2.0, 0.5], [0, 0, 5, 0, 3, 60], [1.0, 1.0, 1.0, 0.6, 0.9, 0.3]
  for trial in range(20):
    keys = jax.random.split(jax.random.key(trial), 6)
    got = sample_rows(logits, keys, jnp.asarray(t), jnp.asarray(k), jnp.asarray(p)).tolist()
    assert got == [int(sample(logits[r:r + 1], keys[r], t[r], k[r], p[r])[0]) for r in range(6)]


def test_sample_rows_skips_the_sorts_and_draws_no_row_needs_and_gives_the_same_tokens():
  # A batch without top-k / top-p rows skips the two sorts, a greedy batch the draw too (`cond`);
  # each row still gives exactly `sample` of it alone.
  from lckv_jax.sampling import sample, sample_rows
  rng = np.random.RandomState(1)
  logits = jnp.asarray(rng.randn(5, 40) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(3), 5)
  for t, k, p in (([0.0] * 5, [0, 40, 0, 0, 0], [1.0] * 5),  # greedy (top-k 40 = vocab: none)
                  ([1.0, 0.0, 0.6, 2.0, 1.0], [0] * 5, [1.0] * 5),  # temperatures only
                  ([1.0, 0.0, 0.6, 2.0, 1.0], [0, 0, 0, 4, 0], [1.0] * 5)):  # one top-k row
    got = sample_rows(logits, keys, jnp.asarray(t), jnp.asarray(k), jnp.asarray(p)).tolist()
    assert got == [int(sample(logits[r:r + 1], keys[r], t[r], k[r], p[r])[0]) for r in range(5)]
  hlo = jax.jit(sample_rows).lower(logits, keys, jnp.asarray(t), jnp.asarray(k),
                                   jnp.asarray(p)).as_text()
  assert "stablehlo.case" in hlo  # the sorts and the draw sit in branches taken only when needed
