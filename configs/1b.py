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
  c.data.tokenizer = ""  # set to the 32000-token Llama SentencePiece .model / tokenizer.json
  c.data.source = "files"
  c.seq_len = 2048
  c.batch_size = 256
  c.steps = 100000
  c.optimizer.lr = 4e-4
  return c
