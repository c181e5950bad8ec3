"""llama-tiny (~50M) LCKV of the paper: the reference recipe (wikitext-103 style, bf16)."""

from lckv_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 32000
  c.model.hidden_size = 512
  c.model.intermediate_size = 1024
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.layer_types = "0_6_6_6_6_6_6_7"
  c.model.max_position_embeddings = 1024
  c.model.dtype = "bfloat16"
  # The embedded corpus and the shipped 32,000-piece tokenizer: runs offline as written. Your own
  # data: --config.data.source=files --config.data.path='data/*.jsonl' --config.data.tokenizer=
  # tokenizer.model (a 32,000-token SentencePiece .model or tokenizer.json).
  c.data.source = "embedded"
  c.data.tokenizer = "kjv-bpe-32k"
  c.seq_len = 1024
  c.batch_size = 32
  c.steps = 20000
  c.optimizer.lr = 3e-4
  c.optimizer.weight_decay = 0.1
  return c
