"""The cache: KV layers only, bytes, ring buffers, the StreamingLLM sink cache, and the
KVCache pytree's own operations and checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import cache as cache_lib
from lckv_jax import generation as gen_lib
from lckv_jax import quant
from lckv_jax.attention import KV, apply_rope, rope_inv_freq, rope_tables
from lckv_jax.cache import KVCache
from lckv_jax.generation import generate
from lckv_jax.mode import Mode
from tests.generation_test import PRESETS, prompts

@pytest.mark.parametrize("layer_types,kv_layers,rings", [
    ("llama", (0, 1, 2, 3), ()), ("lckv", (0, 2, 3), ()), ("cla", (0, 2), ()),
    ("yoco", (0, 1, 2), (0, 1)), ("0s_3_3s_3", (0, 3), (0,)), ("0s_0_2s_2s", (0, 2), (2,))])
def test_cache_holds_exactly_the_kv_layers_and_its_bytes(layer_types, kv_layers, rings,
                                                          tiny_config):
  cfg = tiny_config(sliding_window=3, layer_types=layer_types)
  b, n = 3, 10
  cache = KVCache.create(cfg, b, n)
  assert cache.kv_layers == kv_layers and cache.batch == b
  assert cache_lib.ring_layers(cfg) == rings == cache.rings
  for j, e in cache.layers.items():
    assert e.k.shape == e.v.shape == (b, 3 if j in rings else n, 2, 8)
  slots = sum(3 if j in rings else n for j in kv_layers)
  assert cache_lib.cache_bytes(cfg, b, n) == cache.nbytes() == b * slots * 2 * 2 * 8 * 4
  assert cache_lib.cache_bytes(cfg, b, n, metadata=True) == cache.nbytes(metadata=True)
  if not rings:  # the docs/spec.md §8 formula
    assert cache_lib.cache_bytes(cfg, b, n) == b * n * len(kv_layers) * 2 * 2 * 8 * 4
  full = KVCache.create(cfg, b, n, ring=False)
  assert full.rings == () and full.nbytes() == b * n * len(kv_layers) * 2 * 2 * 8 * 4
  bf16 = KVCache.create(cfg, b, n, jnp.bfloat16)
  assert bf16.nbytes() == cache_lib.cache_bytes(cfg, b, n, jnp.bfloat16)
  # A window no shorter than the cache: nothing wraps, so no buffer is a ring to turn.
  assert KVCache.create(cfg, b, 3).rings == ()


def test_sequential_mode_on_ring_buffers_is_the_full_model(tiny_model):
  # `Transformer.sequential` now decodes into ring buffers of 3 slots for layers 0 and 1.
  model = tiny_model(std=0.1, sliding_window=3, layer_types="yoco")
  toks = jnp.asarray(prompts([12, 12], seed=7))
  np.testing.assert_allclose(model.sequential(toks), model(toks), atol=1e-5, rtol=1e-5)


def test_widen_and_compact_keep_the_last_slots_of_a_ring():
  b, s = 2, 4
  k = jnp.arange(b * s, dtype=jnp.float32).reshape(b, s, 1, 1)
  # A ring of 4 at end = 6 (row 0) and 3 (row 1): slot x at x % 4.
  pos = jnp.array([[4, 5, 2, 3], [0, 1, 2, 0]])
  seg = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  full = KV(k + 100, k + 100, pos, seg)  # layer 1 is not a ring: never turned
  ring = KVCache({0: KV(k, k, pos, seg), 1: full}, rings=(0,), window=4)
  end = jnp.array([6, 3])
  wide = ring.widen(end, 4)  # room for the window's 3 earlier keys and a chunk of 4
  # Slot x at x % 7: row 0 holds slots 2..5, row 1 slots 0..2.
  w = wide[0]
  assert w.pos[0].tolist() == [0, 0, 2, 3, 4, 5, 0] and w.seg[0].tolist() == [0, 0, 1, 1, 1, 1, 0]
  assert w.pos[1].tolist() == [0, 1, 2, 0, 0, 0, 0] and w.seg[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
  assert wide[1] is full and ring.widen(end, 1)[0].k.shape[1] == 4  # a decode step fits
  assert ring.widen(end, 4, empty=True)[0].k.shape[1] == 4  # an empty cache: the chunk alone
  back = wide.compact(end, like=ring)[0]
  assert back.pos.tolist() == pos.tolist() and back.seg.tolist() == seg.tolist()
  np.testing.assert_array_equal(back.k * back.seg[..., None, None], k * seg[..., None, None])


def test_kv_cache_is_a_pytree_whose_layout_is_static(tiny_config):
  cfg = tiny_config(sliding_window=3, layer_types="0s_3_3s_3")
  cache = KVCache.create(cfg, 2, 10, contiguous=True)
  leaves, tree = jax.tree.flatten(cache)
  assert len(leaves) == 4 * 2  # k, v, pos, seg of layers 0 and 3; nothing else is an array
  back = jax.tree.unflatten(tree, leaves)
  assert (back.rings, back.window, back.n_sink, back.contiguous) == ((0,), 3, None, True)
  # The layout is part of the structure: jit retraces for another, and a tree op keeps it.
  assert jax.jit(lambda c: c)(cache).rings == (0,)
  assert jax.tree.structure(KVCache.create(cfg, 2, 10)) != tree
  sink = KVCache.create_sink(cfg, 2, 1, 4)
  assert sink.n_sink == 1 and sink.rings == () and sink.slots(0) == 5 and sink.contiguous


def test_kv_cache_refuses_what_does_not_fit(tiny_config):
  cfg = tiny_config(layer_types="lckv")
  cache = KVCache.create(cfg, 2, 8)
  with pytest.raises(ValueError, match="differ at layer 0: 8 slots vs 6"):
    cache.insert_row(0, KVCache.create(cfg, 1, 6))
  with pytest.raises(ValueError, match="differ at layer 0: heads"):
    cache.insert_row(0, KVCache.create(cfg.replace(num_kv_heads=4), 1, 8))
  with pytest.raises(ValueError, match="cannot take layers"):
    cache.with_layers({0: cache[0]})
  with pytest.raises(ValueError, match="needs a sink cache"):
    cache.evict_sink(cfg, jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="batch >= 1 and max_len >= 1"):
    KVCache.create(cfg, 0, 8)
  e = cache[0]
  with pytest.raises(ValueError, match="chunk of 9 tokens does not fit a cache buffer of 8"):
    z = jnp.zeros((2, 9, 2, 8))
    cache_lib.write(e, z, z, jnp.zeros((2, 9), jnp.int32), jnp.ones((2, 9), jnp.int32),
                    jnp.zeros(2, jnp.int32))


def test_step_checks_its_mode_and_cache(tiny_model):
  model = tiny_model(layer_types="0_2_2_3")
  cache = KVCache.create(model.config, 2, 8)
  tok = jnp.ones((2, 3), jnp.int32)
  with pytest.raises(TypeError, match="must be a lckv_jax.cache.KVCache"):
    model.step(tok, dict(cache.layers), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="DECODE takes one token per row"):
    model.step(tok, cache, jnp.zeros(2, jnp.int32), mode=Mode.DECODE)
  with pytest.raises(ValueError, match="Mode.TRAIN is Transformer.__call__"):
    model.step(tok, cache, jnp.zeros(2, jnp.int32), mode=Mode.TRAIN)
  with pytest.raises(ValueError, match="write_index .* is required in Mode.PREFILL"):
    model.step(tok, cache)
  other = KVCache.create(model.config.replace(layer_types="llama"), 2, 8)
  with pytest.raises(ValueError, match=r"holds layers \(0, 1, 2, 3\), the model's KV layers"):
    model.step(tok, other, jnp.zeros(2, jnp.int32))


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
                  mode=Mode.DECODE)

  kept = []  # one {layer: (k unrotated, v)} per kept token
  logits_out = []
  for t, tok in enumerate(list(prompt) + list(generated[:-1])):
    if len(kept) == cap:
      kept.pop(n_sink)
    n = len(kept)
    cache = KVCache.create(cfg, 1, cap, ring=False)
    layers = dict(cache.layers)
    for j in layers:
      if n:
        ks = jnp.stack([e[j][0] for e in kept])[None]  # [1, n, K, D]
        ks = apply_rope(ks, rope_tables(inv, jnp.arange(n)[None]))
        vs = jnp.stack([e[j][1] for e in kept])[None]
        c = layers[j]
        layers[j] = KV(c.k.at[:, :n].set(ks), c.v.at[:, :n].set(vs),
                       c.pos.at[:, :n].set(jnp.arange(n)), c.seg.at[:, :n].set(1))
    logits, cache = step(jnp.asarray(tok), cache.with_layers(layers), jnp.asarray(n, jnp.int32))
    back = rope_tables(inv, jnp.full((1, 1), -n))
    kept.append({j: (apply_rope(e.k[:, n:n + 1], back)[0, 0], e.v[0, n])
                 for j, e in cache.layers.items()})
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
  before = state.cache.nbytes()
  assert before == cache_lib.sink_cache_bytes(model.config, 2, 1, 5)
  state = gen.decode(state)
  assert state.cache.nbytes() == before
  assert int(state.position.max()) <= 6
  batch = gen.results(state)
  for p, got in zip(ps, batch):
    assert got == gen.results(gen.decode(gen.start([p])))[0]


# -- the quantized layout (int8, fp8: lckv_jax.quant) -------------------------------------------

QUANTIZED = ["int8", "fp8"]


@pytest.mark.parametrize("layer_types,rings", [("lckv", ()), ("0s_3_3s_3", (0,)), ("yoco", (0, 1))])
def test_quantized_cache_bytes_are_half_of_bf16_plus_the_scales(layer_types, rings, tiny_config):
  cfg = tiny_config(sliding_window=3, layer_types=layer_types)  # K=2 heads of D=8
  b, n = 3, 10
  slots = sum(3 if j in rings else n for j in cfg.layer_spec.kv_layers)
  for name in QUANTIZED:
    cache = KVCache.create(cfg, b, n, name)
    assert cache.quantized and cache.dtype == quant.cache_dtype(name) and cache.rings == rings
    for e in cache.layers.values():
      b_, slots_, heads = e.k.shape[:3]  # the scales: [batch, kv_heads, slots]
      assert e.k_scale.shape == e.v_scale.shape == (b_, heads, slots_)
      assert e.k_scale.dtype == e.v_scale.dtype == jnp.float32
    # K and V: 1 byte an element; one float32 scale per slot and KV head for each.
    assert cache_lib.cache_bytes(cfg, b, n, name) == cache.nbytes() == b * slots * 2 * 2 * (8 + 4)
    assert (cache_lib.cache_bytes(cfg, b, n, name)
            == cache_lib.cache_bytes(cfg, b, n, jnp.bfloat16) // 2 + b * slots * 2 * 2 * 4)
    assert cache_lib.cache_bytes(cfg, b, n, name, metadata=True) == cache.nbytes(metadata=True)
    sink = KVCache.create_sink(cfg, b, 1, 5, dtype=name)
    assert sink.nbytes() == cache_lib.sink_cache_bytes(cfg, b, 1, 5, name) == b * 6 * 48 * len(
        cfg.layer_spec.kv_layers)
    assert cfg.kv_cache_bytes_per_token(name) == 48 * len(cfg.layer_spec.kv_layers)
  assert cfg.kv_cache_bytes_per_token() == 2 * 2 * 8 * 4 * len(cfg.layer_spec.kv_layers)
  with pytest.raises(ValueError, match="cache_dtype must be one of .*int8, float8_e4m3fn, fp8, "
                                       "got 'int4'"):
    KVCache.create(cfg, b, n, "int4")


def test_quantized_cache_is_a_pytree_with_its_scales(tiny_config):
  cfg = tiny_config(sliding_window=3, layer_types="0s_3_3s_3")
  cache = KVCache.create(cfg, 2, 10, "int8", contiguous=True)
  leaves, tree = jax.tree.flatten(cache)
  assert len(leaves) == 6 * 2  # k, v, pos, seg, k_scale, v_scale of layers 0 and 3
  back = jax.jit(lambda c: c)(cache)
  assert back.dtype == jnp.int8 and back.quantized and back.rings == (0,)
  assert tree != jax.tree.structure(KVCache.create(cfg, 2, 10, contiguous=True))
  with pytest.raises(ValueError, match="differ at layer 0: dtype int8 vs float32"):
    cache.insert_row(0, KVCache.create(cfg, 1, 10))


def _random_quantized(cfg, batch, slots, name, seed=0, sink=None):
  """A cache of `slots` slots holding random quantized KV in every slot, rows of random lengths
  (left-aligned for a sink cache, else ending at a random slot), and its float32 copy."""
  rs = np.random.RandomState(seed)
  cache = (KVCache.create(cfg, batch, slots, name) if sink is None
           else KVCache.create_sink(cfg, batch, *sink, dtype=name))
  layers = {}
  for j, e in cache.layers.items():
    s = e.k.shape[1]
    k, v = (jnp.asarray(rs.normal(size=e.k.shape), jnp.float32) for _ in range(2))
    (kq, ks), (vq, vs) = (quant.quantize(x, e.k.dtype) for x in (k, v))
    length = rs.randint(1, s + 1, batch)
    seg = (np.arange(s)[None] < length[:, None]).astype(np.int32)
    ks, vs = jnp.swapaxes(ks, 1, 2), jnp.swapaxes(vs, 1, 2)  # stored [batch, kv_heads, slots]
    layers[j] = e._replace(k=kq, v=vq, k_scale=ks, v_scale=vs,
                           pos=jnp.asarray(np.arange(s)[None] * seg), seg=jnp.asarray(seg))
  quantized = cache.with_layers(layers)
  return quantized, cache.with_layers({j: e.dequantized(jnp.float32) for j, e in layers.items()})


def _read(cache):
  return {j: e.dequantized(jnp.float32) for j, e in cache.layers.items()}


@pytest.mark.parametrize("name", QUANTIZED)
def test_slot_moves_carry_the_scales_with_the_values(name, tiny_config):
  # Every operation that moves slots, on the quantized cache, reads back as the same operation on
  # its float32 copy: exactly, since the values and their scales move together.
  cfg = tiny_config(sliding_window=4, layer_types="0s_3_3s_3")  # layer 0: a ring of 4 slots
  q, f = _random_quantized(cfg, 3, 10, name)
  assert q.rings == (0,)
  end = jnp.asarray([6, 3, 9])
  ops = {
      "widen": lambda c: c.widen(end, 4),
      "widen + compact": lambda c: c.widen(end, 4).compact(end + 1, like=c),
      "left_align": lambda c: c.left_align(jnp.asarray([2, 0, 5])),
      "insert_row": lambda c: c.insert_row(1, c, 2),
      "put_rows": lambda c: c.put_rows(jax.tree.map(lambda x: x[1:], c), 0),
  }
  for what, op in ops.items():
    got, want = _read(op(q)), op(f).layers
    for j in got:
      for a, b in zip(got[j], want[j]):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}, layer {j}")


@pytest.mark.parametrize("name,rtol", [("int8", None), ("fp8", 2.0**-4)])
def test_sink_eviction_requantizes_the_rotated_keys(name, rtol, tiny_config, caplog):
  cfg = tiny_config(layer_types="lckv")
  q, f = _random_quantized(cfg, 2, 0, name, seed=3, sink=(2, 6))
  # Re-encoding every kept key at each eviction: fp8 loses too much (kv_quant_cpu.md).
  assert ("sink cache in fp8" in caplog.text) == (name == "fp8")
  length = jnp.asarray([8, 5])  # row 0 is full and evicts, row 1 is not
  (qe, ql), (fe, fl) = q.evict_sink(cfg, length), f.evict_sink(cfg, length)
  assert ql.tolist() == fl.tolist() == [7, 5]
  for j, e in _read(qe).items():
    want = fe[j]
    for field in ("v", "pos", "seg"):
      np.testing.assert_array_equal(getattr(e, field), getattr(want, field))
    np.testing.assert_array_equal(e.k[:, :2], want.k[:, :2])  # the sinks are not rotated
    np.testing.assert_array_equal(e.k[1], want.k[1])  # a row that is not full is untouched
    # The rotated keys are quantized again: within half a step (int8) or e4m3's precision.
    err = jnp.abs(e.k[0, 2:] - want.k[0, 2:])
    if rtol is None:
      assert bool((err <= qe[j].k_scale[0, :, 2:].T[:, :, None] * (0.5 + 1e-5)).all())
    else:
      bound = jnp.maximum(jnp.abs(want.k[0, 2:]) * rtol,
                          qe[j].k_scale[0, :, 2:].T[:, :, None] * 2.0**-10)
      assert bool((err <= bound * (1 + 1e-5) + 1e-6).all())


# int8 on every preset, fp8 on the two with rings (its encoding is tested alone above; CI's time).
@pytest.mark.parametrize("name,window,qdtype,tol", [
    ("llama", 3, "int8", 0.05), ("lckv", 3, "int8", 0.05), ("cla", 3, "int8", 0.05),
    ("mixed", 3, "int8", 0.05), ("yoco", 8, "int8", 0.05), ("mixed", 3, "fp8", 0.25),
    ("yoco", 8, "fp8", 0.25)])
def test_quantized_cache_generates_close_to_the_float_cache(name, window, qdtype, tol,
                                                           tiny_model):
  # Prefill chunks (parallel, 7 iterations: the exact model) and decode steps write the
  # quantized cache. Against the float32 cache on the same tokens (the sequential mode), the
  # logits moved by at most 0.020 (int8) and 0.083 (fp8) when written, for logits up to ~2
  # (bf16 cache: 0.012). The same model with the same quantized cache, token by token
  # (`sequential(cache_dtype=...)`), gives the same logits (5e-7).
  model = tiny_model(std=0.1, layer_types=PRESETS[name], sliding_window=window)
  ps = prompts([7, 4])
  new = 6
  g = generate(model, ps, max_new_tokens=new, return_logits=True, prefill_mode="parallel",
               prefill_iterations=7, cache_dtype=qdtype)
  full, positions, segs, lengths = gen_lib.pad_prompts([p + t for p, t in zip(ps, g.tokens)], 64)
  args = (jnp.asarray(full), jnp.asarray(positions), jnp.asarray(segs))
  exact = np.asarray(model.sequential(*args))
  same = np.asarray(model.sequential(*args, cache_dtype=qdtype))
  compared = 0
  for r, p in enumerate(ps):
    at = slice(full.shape[1] - lengths[r] + len(p) - 1, None)
    at = slice(at.start, at.start + new)
    np.testing.assert_allclose(g.logits[r], exact[r, at], atol=tol)
    np.testing.assert_allclose(g.logits[r], same[r, at], atol=1e-4, rtol=1e-4)
    # Greedy tokens: the float cache's wherever its top-2 margin exceeds twice the tolerance.
    top2 = np.sort(exact[r, at], -1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > 2 * tol
    assert np.asarray(g.tokens[r])[sure].tolist() == exact[r, at].argmax(-1)[sure].tolist()
    compared += int(sure.sum())
  if qdtype == "int8":
    assert compared >= 2  # the greedy check is not vacuous


@pytest.mark.parametrize("qdtype,tol", [("int8", 0.03), ("fp8", 0.15)])
def test_quantized_sink_cache_runs_past_the_window_close_to_a_recomputation(qdtype, tol,
                                                                           tiny_model):
  # 18 evictions re-rotate (and requantize) the kept keys; against the float recomputation of
  # the same tokens the logits moved by at most 0.009 (int8; bf16 cache 0.0065) and 0.045 (fp8).
  model = tiny_model(std=0.1, sliding_window=3, layer_types="0s_2_2_3", max_position_embeddings=12)
  n_sink, window = 2, 6
  p = prompts([4], seed=9)[0]
  new = 4 * window
  g = generate(model, [p], max_new_tokens=new, sink=(n_sink, window), return_logits=True,
               cache_dtype=qdtype)
  assert len(g.tokens[0]) == new
  ref = _reference_sink_logits(model, p, g.tokens[0], n_sink, window)
  np.testing.assert_allclose(g.logits[0], ref, atol=tol)
