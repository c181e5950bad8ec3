"""The embedded corpus."""

from lckv_jax.data import corpus


def test_embedded_corpus_is_english_text():
  docs = corpus.embedded_documents()
  assert len(docs) == 1189
  assert docs[0].startswith("In the beginning God created the heaven and the earth.")
  assert sum(map(len, docs)) > 4_000_000
