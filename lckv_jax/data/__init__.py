"""Training data: the embedded corpus, the registry of sources (`sources.SOURCES`), grain packing.
Tokenizers live in `lckv_jax.tokenizer`."""

from lckv_jax.data.corpus import embedded_documents
from lckv_jax.data.pipeline import StepIterator, make_datasets, pack_documents
from lckv_jax.data.sources import (SOURCES, load_documents, load_tfds_documents,
                                   load_token_documents, read_documents, split_documents)

__all__ = ["SOURCES", "StepIterator", "embedded_documents", "load_documents",
           "load_tfds_documents", "load_token_documents", "make_datasets", "pack_documents",
           "read_documents", "split_documents"]
