"""The cache: KV layers only, bytes, ring buffers, and the StreamingLLM sink cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import cache as cache_lib
from lckv_jax.attention import KV, apply_rope, rope_inv_freq, rope_tables
from lckv_jax.generation import generate
from tests.generation_test import prompts

@pytest.mark.parametrize("layer_types,kv_layers,rings", [
    ("llama", (0, 1, 2, 3), ()), ("lckv", (0, 2, 3), ()), ("cla", (0, 2), ()),
    ("yoco", (0, 1, 2), (0, 1)), ("0s_3_3s_3", (0, 3), (0,)), ("0s_0_2s_2s", (0, 2), (2,))])
def test_cache_holds_exactly_the_kv_layers_and_its_bytes(layer_types, kv_layers, rings,
                                                          tiny_config):
  cfg = tiny_config(sliding_window=3, layer_types=layer_types)
  b, n = 3, 10
  cache = cache_lib.init_cache(cfg, b, n)
  assert sorted(cache) == [("layer", j) for j in kv_layers]
  assert cache_lib.ring_layers(cfg) == rings
  for (_, j), e in cache.items():
    assert e.k.shape == e.v.shape == (b, 3 if j in rings else n, 2, 8)
  slots = sum(3 if j in rings else n for j in kv_layers)
  assert cache_lib.cache_bytes(cfg, b, n) == cache_lib.nbytes(cache) == b * slots * 2 * 2 * 8 * 4
  assert cache_lib.cache_bytes(cfg, b, n, metadata=True) == cache_lib.nbytes(cache, metadata=True)
  if not rings:  # the docs/spec.md §8 formula
    assert cache_lib.cache_bytes(cfg, b, n) == b * n * len(kv_layers) * 2 * 2 * 8 * 4
  full = cache_lib.init_cache(cfg, b, n, ring=False)
  assert cache_lib.nbytes(full) == b * n * len(kv_layers) * 2 * 2 * 8 * 4
  bf16 = cache_lib.init_cache(cfg, b, n, jnp.bfloat16)
  assert cache_lib.nbytes(bf16) == cache_lib.cache_bytes(cfg, b, n, jnp.bfloat16)


def test_sequential_mode_on_ring_buffers_is_the_full_model(tiny_model):
  # `Transformer.sequential` now decodes into ring buffers of 3 slots for layers 0 and 1.
  model = tiny_model(std=0.1, sliding_window=3, layer_types="yoco")
  toks = jnp.asarray(prompts([12, 12], seed=7))
  np.testing.assert_allclose(model.sequential(toks), model(toks), atol=1e-5, rtol=1e-5)


def test_relayout_keeps_the_last_slots():
  b, s = 2, 4
  k = jnp.arange(b * s, dtype=jnp.float32).reshape(b, s, 1, 1)
  # A ring of 4 at end = 6 (row 0) and 3 (row 1): slot x at x % 4.
  pos = jnp.array([[4, 5, 2, 3], [0, 1, 2, 0]])
  seg = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  ring = KV(k, k, pos, seg)
  end = jnp.array([6, 3])
  wide = cache_lib.relayout(ring, end, 7)
  # Slot x at x % 7: row 0 holds slots 2..5, row 1 slots 0..2.
  assert wide.pos[0].tolist() == [0, 0, 2, 3, 4, 5, 0] and wide.seg[0].tolist() == [0, 0, 1, 1, 1, 1, 0]
  assert wide.pos[1].tolist() == [0, 1, 2, 0, 0, 0, 0] and wide.seg[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
  back = cache_lib.relayout(wide, end, 4)
  assert back.pos.tolist() == pos.tolist() and back.seg.tolist() == seg.tolist()
  np.testing.assert_array_equal(back.k * back.seg[..., None, None], k * seg[..., None, None])


def test_rerotate_moves_keys_to_new_positions(tiny_config):
  cfg = tiny_config(sliding_window=3)
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
  at = lambda p: rope_tables(rope_inv_freq(cfg), jnp.asarray(p)[None])
  k7 = apply_rope(x, at([7, 8, 9, 10, 11]))
  k4 = apply_rope(x, at([4, 5, 6, 7, 8]))
  np.testing.assert_allclose(cache_lib.rerotate(cfg, k7, -3), k4, atol=1e-5)


# -- StreamingLLM sink cache ---------------------------------------------------------------------


def _reference_sink_logits(model, prompt, generated, n_sink, window):
  """Logits of each generated step, recomputed from a plain list of kept tokens.

  Keeps, per KV layer, every kept token's key un-rotated and its value; before each step evicts
  the oldest non-sink token if the cache is full, then builds a fresh cache with the kept keys
  rotated to their current cache positions 0..n-1 and runs the new token at position n.
  """
  cfg = model.config
  cap = n_sink + window
  inv = rope_inv_freq(cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(tok, cache, n):
    m = nnx.merge(graphdef, state)
    return m.step(tok[None, None], cache, n[None], n[None, None], jnp.ones((1, 1), jnp.int32),
                  iterations=1)

  kept = []  # one {layer: (k unrotated, v)} per kept token
  logits_out = []
  for t, tok in enumerate(list(prompt) + list(generated[:-1])):
    if len(kept) == cap:
      kept.pop(n_sink)
    n = len(kept)
    cache = cache_lib.init_cache(cfg, 1, cap, ring=False)
    for key in cache:
      if n:
        ks = jnp.stack([e[key][0] for e in kept])[None]  # [1, n, K, D]
        ks = apply_rope(ks, rope_tables(inv, jnp.arange(n)[None]))
        vs = jnp.stack([e[key][1] for e in kept])[None]
        c = cache[key]
        cache[key] = KV(c.k.at[:, :n].set(ks), c.v.at[:, :n].set(vs),
                        c.pos.at[:, :n].set(jnp.arange(n)), c.seg.at[:, :n].set(1))
    logits, cache = step(jnp.asarray(tok), cache, jnp.asarray(n, jnp.int32))
    back = rope_tables(inv, jnp.full((1, 1), -n))
    kept.append({key: (apply_rope(e.k[:, n:n + 1], back)[0, 0], e.v[0, n])
                 for key, e in cache.items()})
    if t >= len(prompt) - 1:
      logits_out.append(np.asarray(logits[0, 0]))
  return np.stack(logits_out)


def test_sink_cache_runs_past_the_window_and_matches_a_recomputation(tiny_model):
  model = tiny_model(std=0.1, sliding_window=3, layer_types="0s_2_2_3", max_position_embeddings=12)
  n_sink, window = 2, 6
  p = prompts([4], seed=9)[0]
  new = 4 * window  # 4x past the window, and past max_position_embeddings
  g = generate(model, [p], max_new_tokens=new, sink=(n_sink, window), return_logits=True)
  assert len(g.tokens[0]) == new
  ref = _reference_sink_logits(model, p, g.tokens[0], n_sink, window)
  np.testing.assert_allclose(g.logits[0], ref, atol=1e-4, rtol=1e-4)
  # The tokens are not those of the full-cache model once tokens are evicted.
  # The same weights with room for every position: the reference without a sink cache.
  full = generate(tiny_model(std=0.1, sliding_window=3, layer_types="0s_2_2_3",
                             max_position_embeddings=64), [p],
                  max_new_tokens=new, return_logits=True)
  assert float(np.abs(full.logits[0] - g.logits[0]).max()) > 1e-3
  np.testing.assert_allclose(full.logits[0, :window + n_sink - len(p)],
                             g.logits[0, :window + n_sink - len(p)], atol=1e-4, rtol=1e-4)


def test_sink_cache_memory_is_constant_and_batches_mix_lengths(tiny_model):
  from lckv_jax.generation import Generator
  model = tiny_model(std=0.1, sliding_window=3, layer_types="lckv")
  gen = Generator(model, max_new_tokens=20, sink=(1, 5))
  ps = prompts([2, 5], seed=11)
  state = gen.start(ps)
  before = cache_lib.nbytes(state.cache)
  assert before == cache_lib.sink_cache_bytes(model.config, 2, 1, 5)
  state = gen.decode(state)
  assert cache_lib.nbytes(state.cache) == before
  assert int(state.position.max()) <= 6
  batch = gen.results(state)
  for p, got in zip(ps, batch):
    assert got == gen.results(gen.decode(gen.start([p])))[0]
