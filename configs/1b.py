"""TinyLlama 1.1B with LCKV `0_20_..._20_21` (preset 'lckv'), m=7, b=2."""

from lckv_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 32000
  c.model.hidden_size = 2048
  c.model.intermediate_size = 5632
  c.model.num_layers = 22
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.layer_types = "lckv"
  c.model.forward_passes = 7
  c.model.backward_passes = 2
  c.model.max_position_embeddings = 2048
  c.model.dtype = "bfloat16"
  c.model.remat = "dots"
  # The embedded corpus and the shipped 32,000-piece tokenizer: runs offline as written. Your own
  # data: --config.data.source=files --config.data.path='data/*.jsonl' --config.data.tokenizer=
  # tokenizer.model (a 32,000-token SentencePiece .model or tokenizer.json).
  c.data.source = "embedded"
  c.data.tokenizer = "kjv-bpe-32k"
  c.seq_len = 2048
  c.batch_size = 256
  c.grad_accum = 0  # auto: as many micro-batches as keep 8 rows of 2,048 tokens on each device
  c.micro_batch_per_device = 8  # fits an 80 GB GPU (measured on an H100) with remat='dots'
  c.steps = 100000
  c.optimizer.lr = 4e-4
  return c
