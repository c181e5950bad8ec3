"""The model against references: HF Llama, a naive spec implementation, and the sequential mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lckv_jax import ModelConfig, Transformer, checkpoint, count_params, layer_types
from lckv_jax.generation import Generator, generate
from lckv_jax.model import check_inputs, relayout
from tests import reference
from tests.checkpoint_test import LIMIT, LIMITED, VOCAB
from tests.generation_test import prompts

# The models of this file: weights N(0, 0.1), so that every path moves the output; a vocabulary of
# 97; windows of 3 keys in the layers marked `s`.
MODEL = dict(std=0.1, vocab_size=97, sliding_window=3)


@functools.partial(nnx.jit, static_argnames=("m", "b"))
def forward(model, toks, pos=None, seg=None, m=None, b=None):
  """The parallel mode, compiled once per model structure and shape (eager scans recompile)."""
  return model(toks, pos, seg, forward_passes=m, backward_passes=b)


@nnx.jit
def sequential(model, toks):
  return model.sequential(toks)


def tokens(batch=2, length=12, seed=3, vocab=97):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


# -- HuggingFace Llama -----------------------------------------------------------------------------


@pytest.mark.parametrize("tied,kv_heads,scan", [(False, 2, True), (True, 2, True),
                                                (False, 4, False)])
def test_llama_matches_huggingface(tied, kv_heads, scan):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=8, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
      rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=64)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.1)
  cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3,
                    num_heads=8, num_kv_heads=kv_heads, tie_word_embeddings=tied,
                    rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=64,
                    scan_layers=scan)
  model = reference.model_from_hf(hf, cfg)
  toks = np.random.RandomState(1).randint(0, 97, (2, 13))
  with torch.no_grad():
    ref = hf(torch.tensor(toks)).logits.numpy()
  out = np.asarray(forward(model, jnp.asarray(toks)))
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4
  # The exact token-by-token mode is the same model too.
  seq = np.asarray(sequential(model, jnp.asarray(toks)))
  assert np.linalg.norm(seq - ref) / np.linalg.norm(ref) < 1e-4


# -- the iteration plan against the naive spec implementation --------------------------------------

PRESET_STRINGS = {
    "llama": "0_1_2_3",
    "lckv": "0_2_2_3",
    "lckv_w0": "3_3_3_3",
    "sandwich_cycle": "0_2_2_2_2_5",
    "cla": "0_0_2_2",
    "cla_top": "1_1_3_3",
    "yoco": "0s_1s_2_2",
    "mixed": "0s_3_3s_3",
}


@pytest.mark.parametrize("name", sorted(PRESET_STRINGS))
@pytest.mark.parametrize("m,b", [(0, 1), (2, 2)])
def test_parallel_matches_float64_reference(name, m, b, tiny_model):
  lt = PRESET_STRINGS[name]
  model = tiny_model(**MODEL, num_layers=len(lt.split("_")), layer_types=lt)
  toks = tokens(length=10)
  out = np.asarray(forward(model, toks, m=m, b=b))
  ref = reference.numpy_logits(model.config, reference.extract_params(model), toks, m, b)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["lckv", "lckv_w0", "sandwich_cycle", "cla_top", "mixed"])
def test_parallel_equals_sequential_when_iterations_cover_the_sequence(name, tiny_model):
  # docs/spec.md §4: after k iterations positions 0..k-1 are exact, so m + b >= T is exact.
  lt = PRESET_STRINGS[name]
  model = tiny_model(**MODEL, num_layers=len(lt.split("_")), layer_types=lt)
  toks = tokens(length=9)
  seq = sequential(model, toks)
  par = forward(model, toks, m=7, b=2)
  np.testing.assert_allclose(par, seq, atol=1e-5, rtol=1e-5)
  # With 3 iterations only positions 0..2 are exact; later ones differ (the test can fail).
  short = forward(model, toks, m=2, b=1)
  np.testing.assert_allclose(short[:, :3], seq[:, :3], atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(short[:, 3:] - seq[:, 3:]).max()) > 1e-3


def test_more_forward_passes_converge_to_the_sequential_mode(tiny_model):
  model = tiny_model(std=0.05, vocab_size=97, sliding_window=3, layer_types="3_3_3_3")
  toks = tokens(length=24)
  seq = sequential(model, toks)
  errors = [float(jnp.abs(forward(model, toks, m=m, b=2) - seq).max())
            for m in (0, 2, 4, 8, 16, 22)]
  assert errors[0] > 1e-2  # few passes give a measurably different answer
  assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
  assert errors[4] < 1e-3, errors  # 18 iterations on a 4-layer model
  assert errors[5] < 1e-5, errors  # 24 = T iterations: exact


# -- gradients -------------------------------------------------------------------------------------


def _loss_and_grads(model, toks, m, b):
  def loss_fn(model):
    return jnp.mean(model(toks, forward_passes=m, backward_passes=b) ** 2)
  return nnx.jit(nnx.value_and_grad(loss_fn))(model)


def _reference_grads(model, toks, m, b):
  p = reference.extract_params(model)
  loss = lambda p: jnp.mean(reference.logits(model.config, p, toks, m, b) ** 2)
  return jax.jit(jax.value_and_grad(loss))(p)


@pytest.mark.parametrize("m,b", [(3, 1), (1, 2), (0, 3)])
def test_gradients_flow_through_exactly_the_last_b_iterations(m, b, tiny_model):
  model = tiny_model(**MODEL, layer_types="0_3_3_3_3_5", num_layers=6)
  toks = tokens(length=6)
  loss, grads = _loss_and_grads(model, toks, m, b)
  ref_loss, ref = _reference_grads(model, toks, m, b)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for i in range(model.config.num_layers):
    r, blk, o = model.layer_location(i)
    got = nnx.to_pure_dict(jax.tree.map(lambda x: x[blk], grads.blocks[r].layers[o]))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6, rtol=2e-4),
                 got, ref["layers"][i])
  np.testing.assert_allclose(grads.embed[...], ref["embed"], atol=1e-6, rtol=2e-4)


def test_truncation_changes_gradients_but_not_values(tiny_model):
  # Same m + b, so the same forward; different b, so different gradients.
  model = tiny_model(**MODEL, layer_types="0_3_3_3_3_5", num_layers=6)
  toks = tokens(length=6)
  l1, g1 = _loss_and_grads(model, toks, 3, 1)
  l3, g3 = _loss_and_grads(model, toks, 1, 3)
  np.testing.assert_allclose(l1, l3, rtol=1e-6)
  r, blk, o = model.layer_location(1)
  q1 = g1.blocks[r].layers[o].attn.q_proj[...][blk]
  q3 = g3.blocks[r].layers[o].attn.q_proj[...][blk]
  assert float(jnp.abs(q1 - q3).max()) > 1e-4 * float(jnp.abs(q3).max())


# -- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["llama", "lckv", "lckv:0", "lckv:2", "sandwich", "cla",
                                    "cla:3", "yoco", "mixattention"])
def test_kv_weights_exist_only_for_kv_computing_layers(preset, tiny_model):
  cfg_kw = dict(layer_types=preset)
  model = tiny_model(**MODEL, **cfg_kw)
  lt = model.config.layer_spec
  llama = tiny_model(**MODEL, layer_types="llama")
  e, k, d = 32, 2, 8
  for i in range(4):
    has_kv = "k_proj" in model.layer_params(i)["attn"]
    assert has_kv == lt.computes_kv[i]
    assert ("v_proj" in model.layer_params(i)["attn"]) == lt.computes_kv[i]
  missing = 4 - len(lt.kv_layers)
  assert count_params(model) == count_params(llama) - missing * 2 * e * k * d


@pytest.mark.parametrize("preset", sorted(layer_types.PRESETS))
def test_every_preset_runs_forward_and_backward(preset, tiny_model):
  model = tiny_model(**MODEL, layer_types=preset, forward_passes=2, backward_passes=2)
  toks = tokens(length=8)

  def loss_fn(model):
    return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])
  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_scan_layers_does_not_change_the_function(tiny_model):
  scanned = tiny_model(**MODEL, layer_types="0_0_2_2_4_4", num_layers=6)
  plain = Transformer(scanned.config.replace(scan_layers=False), rngs=nnx.Rngs(5))
  assert len(plain.blocks) == 6 and len(scanned.blocks) == 1
  plain.embed[...] = scanned.embed[...]
  plain.final_norm.scale[...] = scanned.final_norm.scale[...]
  plain.lm_head[...] = scanned.lm_head[...]
  for i in range(6):
    plain.set_layer_params(i, nnx.to_pure_dict(scanned.layer_params(i)))
  toks = tokens()
  np.testing.assert_allclose(forward(plain, toks), forward(scanned, toks), atol=1e-6)


def test_remat_keeps_values_and_gradients(tiny_model):
  model = tiny_model(**MODEL, layer_types="lckv", forward_passes=2)
  remat = tiny_model(**MODEL, layer_types="lckv", forward_passes=2, remat="full")
  toks = tokens(length=6)
  l1, g1 = _loss_and_grads(model, toks, 2, 2)
  l2, g2 = _loss_and_grads(remat, toks, 2, 2)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5), g1, g2)


# -- masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lt", ["0_1_2_3", "0_2_2_3", "0s_1s_2_2"])
def test_packed_documents_do_not_attend_across_segments(lt, tiny_model):
  model = tiny_model(**MODEL, layer_types=lt, forward_passes=8, backward_passes=1)
  toks = tokens(batch=1, length=10)
  seg = jnp.array([[1] * 6 + [2] * 4])
  pos = jnp.array([list(range(6)) + list(range(4))])
  out = forward(model, toks, pos, seg)
  other = toks.at[0, 6:].set((toks[0, 6:] + 1) % 97)
  out2 = forward(model, other, pos, seg)
  np.testing.assert_allclose(out[:, :6], out2[:, :6], atol=1e-6)
  # Each document alone, with positions from 0, gives the same logits.
  np.testing.assert_allclose(out[:, :6], forward(model, toks[:, :6]), atol=2e-5)
  np.testing.assert_allclose(out[:, 6:], forward(model, toks[:, 6:]), atol=2e-5)


def test_padding_segments_are_never_attended(tiny_model):
  model = tiny_model(**MODEL, layer_types="lckv", forward_passes=8, backward_passes=1)
  toks = tokens(batch=1, length=8)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]])
  out = forward(model, toks, pos, seg)
  np.testing.assert_allclose(out[:, 3:], forward(model, toks[:, 3:]), atol=2e-5)


def test_first_token_of_a_diagonal_masked_layer_sees_nothing(tiny_model):
  # docs/spec.md §3.5: with no visible key the attention output is zeros, so with force_nodiag the
  # first position's hidden state only goes through the MLPs: changing any attention weight of
  # any layer cannot change it.
  model = tiny_model(**MODEL, layer_types="llama", force_nodiag=True)
  toks = tokens(length=5)
  before = forward(model, toks)
  for i in range(4):
    p = nnx.to_pure_dict(model.layer_params(i))
    p["attn"]["o_proj"] = p["attn"]["o_proj"] * 3.0
    model.set_layer_params(i, p)
  after = forward(model, toks)
  np.testing.assert_allclose(before[:, 0], after[:, 0], atol=1e-6)
  assert float(jnp.abs(before[:, 1:] - after[:, 1:]).max()) > 1e-3


def test_jit_matches_eager(tiny_model):
  model = tiny_model(**MODEL, layer_types="lckv")
  toks = tokens()
  np.testing.assert_allclose(forward(model, toks), model(toks), atol=1e-5)


def test_bad_token_shape_is_an_error(tiny_model):
  model = tiny_model(**MODEL)
  with pytest.raises(ValueError, match="tokens must be"):
    model(jnp.zeros((5,), jnp.int32))


# -- decode semantics ------------------------------------------------------------------------------


def test_whynlp_main_decode_drops_the_newest_top_kv(tiny_model):
  exact = tiny_model(**MODEL, layer_types="0_2_2_3")
  compat = Transformer(exact.config.replace(decode_semantics="whynlp_main"), rngs=nnx.Rngs(0))
  nnx.update(compat, nnx.state(exact))
  toks = tokens(length=6)
  a, b = sequential(exact, toks), sequential(compat, toks)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)  # nothing visible either way
  assert float(jnp.abs(a[:, 1:] - b[:, 1:]).max()) > 1e-3
  # The parallel mode (training, prefill) is the same in both semantics.
  np.testing.assert_allclose(forward(exact, toks), forward(compat, toks), atol=1e-6)
  # Without upward-attending layers there is nothing to change.
  llama = tiny_model(**MODEL, layer_types="llama")
  llama_compat = Transformer(llama.config.replace(decode_semantics="whynlp_main"),
                             rngs=nnx.Rngs(0))
  nnx.update(llama_compat, nnx.state(llama))
  np.testing.assert_allclose(sequential(llama, toks), sequential(llama_compat, toks), atol=1e-6)


# -- fused attention path --------------------------------------------------------------------------


@pytest.mark.parametrize("lt", ["0_1_2_3", "0_2_2_3", "0s_1s_2_2", "3s_3s_3_3"])
def test_fused_kernel_path_matches_the_dense_mask(lt, tiny_model):
  # `attention_impl='xla'` runs jax.nn.dot_product_attention with the causal flag, the local
  # window and the shifted masked diagonal: the same formulation cuDNN gets on a GPU.
  dense = tiny_model(**MODEL, layer_types=lt, attention_impl="dense", forward_passes=2)
  fused = Transformer(dense.config.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
  nnx.update(fused, nnx.state(dense))
  toks = tokens(length=9)
  np.testing.assert_allclose(forward(fused, toks), forward(dense, toks), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(forward(fused, toks[:, :1]), forward(dense, toks[:, :1]), atol=2e-5)
  # Explicit segments take the segment-masked fused path: one segment is the plain model.
  seg = jnp.ones_like(toks)
  np.testing.assert_allclose(forward(fused, toks, seg=seg), forward(dense, toks), atol=2e-5)


@pytest.mark.parametrize("lt", ["0_1_2_3", "0_2_2_3", "0s_1s_2_2", "3s_3s_3_3"])
def test_fused_kernel_path_with_packed_documents_matches_the_dense_mask(lt, tiny_model):
  # Packed rows: documents of 1, 4, 2 and 5 tokens, padding, positions restarting per document.
  # The fused kernel masks segments through a [B, 1, T, T] mask (what cuDNN gets on a GPU); a
  # one-token document's query sees nothing in diagonal-masked layers and must get zeros.
  dense = tiny_model(**MODEL, layer_types=lt, attention_impl="dense", forward_passes=2)
  fused = Transformer(dense.config.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
  nnx.update(fused, nnx.state(dense))
  seg = jnp.asarray([[1, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4, 4, 0],
                     [1, 1, 1, 1, 1, 1, 1, 2, 3, 3, 3, 0, 0]])
  pos = jnp.asarray([[0, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 0],
                     [0, 1, 2, 3, 4, 5, 6, 0, 0, 1, 2, 0, 0]])
  toks = tokens(length=13)
  real = (seg != 0)[..., None]
  np.testing.assert_allclose(jnp.where(real, forward(fused, toks, pos, seg), 0),
                             jnp.where(real, forward(dense, toks, pos, seg), 0),
                             atol=2e-5, rtol=1e-5)

  def loss(model):
    return jnp.sum(jnp.where(real, model(toks, pos, seg), 0) ** 2) / 100

  g_fused, g_dense = nnx.grad(loss)(fused), nnx.grad(loss)(dense)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


# -- bad inputs: ids and positions past the model's limits -----------------------------------------


@nnx.jit
def _fwd(model, toks, pos=None, seg=None):
  return model(toks, pos, seg)


def np_tokens(batch=2, length=8, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def test_model_raises_on_out_of_range_ids_and_positions_naming_the_limit(tiny_model):
  model = tiny_model(**LIMITED)
  t = np_tokens()
  for bad, shown in ((VOCAB, "256"), (300, "300"), (-1, "-1")):
    t_bad = t.copy()
    t_bad[1, 3] = bad
    msg = rf"token id {shown} is outside the vocabulary \[0, 256\) \(model.vocab_size=256\)"
    for call in (model, model.sequential):
      with pytest.raises(ValueError, match=msg):
        call(jnp.asarray(t_bad))
  pos = np.tile(np.arange(8), (2, 1))
  pos[0, -1] = LIMIT
  with pytest.raises(ValueError, match=r"position 32 is outside \[0, 32\) "
                                       r"\(max_position_embeddings=32\)"):
    model(t, pos)
  long = np_tokens(length=LIMIT + 1)
  for call in (model, lambda x: _fwd(model, x)):  # eager, and static under jit
    with pytest.raises(ValueError, match="33 tokens exceeds max_position_embeddings=32"):
      call(long)
  # Padding (segment 0) carries any id and position.
  seg = np.ones_like(t)
  seg[0, :2] = 0
  t[0, :2], pos[0, :2] = -1, 99
  pos[0, -1] = 7
  check_inputs(model.config, t, pos, seg)


def test_traced_bad_ids_give_nan_rows_and_leave_other_rows_and_gradients_alone(tiny_model):
  model = tiny_model(**LIMITED)
  good = np_tokens()
  bad = good.copy()
  bad[1, 5] = 300
  ref = np.asarray(_fwd(model, good))
  out = np.asarray(_fwd(model, bad))
  assert np.isnan(out[1]).all()
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
  # Traced positions past the limit and bad ids on padding.
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  pos[1, -1] = LIMIT
  out = np.asarray(_fwd(model, good, pos))
  assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
  seg = np.ones_like(good)
  seg[:, 0] = 0
  padded = good.copy()
  padded[:, 0] = -5
  assert np.isfinite(np.asarray(_fwd(model, padded, None, seg))).all()

  @nnx.jit
  def grads(model, toks):
    def loss(model):
      logits = model(toks)
      return jnp.mean(jax.nn.log_softmax(logits[0])[:, 0])  # row 0 only
    return nnx.grad(loss)(model)

  g_bad, g_good = grads(model, bad), grads(model, good)
  leaves_bad = jax.tree.leaves(nnx.state(g_bad, nnx.Param))
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves_bad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx.state(g_bad, nnx.Param), nnx.state(g_good, nnx.Param))

  # The whole batch's loss is NaN: a training loop's divergence check stops.
  @nnx.jit
  def batch_loss(model, toks):
    return jnp.mean(jax.nn.log_softmax(model(toks)))
  assert np.isnan(float(batch_loss(model, bad)))


# -- weight layout ---------------------------------------------------------------------------------


def test_relayout_keeps_the_function_and_loads_unstacked(tmp_path, tiny_model):
  # CLA: one scanned run of 2-layer blocks
  model = tiny_model(std=0.1, sliding_window=3, layer_types="0_0_2_2")
  assert model.config.scan_layers and len(model.runs) == 1
  flat = relayout(model, scan_layers=False)
  assert not flat.config.scan_layers and len(flat.runs) == 4
  tokens = jnp.asarray(prompts([12, 12], seed=7))
  np.testing.assert_allclose(flat(tokens), model(tokens), atol=1e-5)
  np.testing.assert_allclose(relayout(flat, scan_layers=True)(tokens), model(tokens), atol=1e-5)
  # Generator(unstack=True) decodes the same tokens from the per-layer copy.
  ps = prompts([6, 3], seed=8)
  assert (Generator(model, max_new_tokens=5, unstack=True).model.config.scan_layers is False)
  assert generate(model, ps, max_new_tokens=5).tokens == generate(flat, ps, max_new_tokens=5).tokens
  # A stacked checkpoint loads straight into the per-layer layout.
  checkpoint.save_model(str(tmp_path / "m"), model)
  loaded = checkpoint.load_model(str(tmp_path / "m"), scan_layers=False)
  assert not loaded.config.scan_layers
  np.testing.assert_allclose(loaded(tokens), model(tokens), atol=1e-5)
