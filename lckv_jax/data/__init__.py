"""Training data: the embedded corpus, local/ArrayRecord/TFDS sources, tokenizers, grain packing."""

from lckv_jax.data.corpus import embedded_documents
from lckv_jax.data.pipeline import StepIterator, make_datasets, pack_documents
from lckv_jax.data.sources import (load_documents, load_tfds_documents, load_token_documents,
                                   split_documents)
from lckv_jax.data.tokenizer import check_vocab, load_tokenizer

__all__ = ["StepIterator", "check_vocab", "embedded_documents", "load_documents",
           "load_tfds_documents", "load_token_documents", "load_tokenizer", "make_datasets",
           "pack_documents", "split_documents"]
