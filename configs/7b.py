"""Llama 7B with LCKV (preset 'lckv': w=2 warm-up layers), m=7, b=2; shard with mesh.fsdp."""

from lckv_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 32000
  c.model.hidden_size = 4096
  c.model.intermediate_size = 11008
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.layer_types = "lckv"
  c.model.forward_passes = 7
  c.model.backward_passes = 2
  c.model.max_position_embeddings = 2048
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  # The embedded corpus and the shipped 32,000-piece tokenizer: runs offline as written. Your own
  # data: --config.data.source=files --config.data.path='data/*.jsonl' --config.data.tokenizer=
  # tokenizer.model (a 32,000-token SentencePiece .model or tokenizer.json).
  c.data.source = "embedded"
  c.data.tokenizer = "kjv-bpe-32k"
  c.seq_len = 2048
  c.batch_size = 512
  c.steps = 100000
  c.optimizer.lr = 3e-4
  c.mesh.data = 1
  c.mesh.fsdp = -1  # ZeRO-3 style: parameters and optimizer state over all devices
  return c
