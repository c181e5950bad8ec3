"""The data pipeline: packing documents into rows, and deterministic, resumable batches."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lckv_jax.data import pipeline
from lckv_jax.train.config import default_config


def _data_cfg(**kw):
  c = default_config().data
  c.update(kw)
  return c


def test_pack_segments_and_positions():
  docs = [np.arange(5) + 1, np.arange(7) + 10, np.arange(3) + 20]
  rows = pipeline.pack_documents(docs, 4)
  np.testing.assert_array_equal(rows["tokens"].ravel()[:15], np.concatenate(docs))
  np.testing.assert_array_equal(rows["segment_ids"],
                                [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(rows["positions"],
                                [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 0]])


def test_packed_documents_do_not_attend_across_boundaries(tiny_model):
  """Perturbing the other document of a packed row leaves this document's logits unchanged."""
  model = tiny_model(layer_types="lckv", forward_passes=1, backward_passes=1)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 64, 6), rng.integers(0, 64, 10)
  rows = pipeline.pack_documents([a, b], 16)
  b2 = (b + 1 + rng.integers(0, 62, 10)) % 64
  rows2 = pipeline.pack_documents([a, b2], 16)
  apply = nnx.jit(lambda m, t, p, s: m(t, p, s))
  f = lambda r: apply(model, jnp.asarray(r["tokens"]), jnp.asarray(r["positions"]),
                      jnp.asarray(r["segment_ids"]))
  l1, l2 = f(rows), f(rows2)
  np.testing.assert_allclose(l1[0, :6], l2[0, :6], atol=1e-6)  # document a unchanged
  assert np.abs(np.asarray(l1[0, 6:] - l2[0, 6:])).max() > 1e-3
  # Document b alone (positions from 0) gives the same logits as packed after a.
  alone = apply(model, jnp.asarray(b)[None], None, None)
  np.testing.assert_allclose(l1[0, 6:], alone[0], atol=1e-5)


def test_train_batches_are_deterministic_and_resumable():
  ds = pipeline.make_datasets(_data_cfg(max_documents=40), seq_len=32, batch_size=4,
                              model_vocab_size=256)
  it = pipeline.StepIterator(ds.train)
  first = [next(it) for _ in range(5)]
  again = pipeline.StepIterator(ds.train)
  again.set_state({"step": 3})
  for want in first[3:]:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert first[0]["tokens"].shape == (4, 32)
  assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
  # Two processes see disjoint halves of the rows.
  p0 = pipeline.train_dataset(pipeline.pack_documents([np.arange(64)], 4), 2, 0, 0, 2)
  p1 = pipeline.train_dataset(pipeline.pack_documents([np.arange(64)], 4), 2, 0, 1, 2)
  rows0 = {tuple(r) for i in range(4) for r in p0[i]["tokens"]}
  rows1 = {tuple(r) for i in range(4) for r in p1[i]["tokens"]}
  assert rows0 and rows1 and not rows0 & rows1
