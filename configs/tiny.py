"""A ~1.5M-parameter LCKV model on the embedded corpus, byte-level: trains on a CPU in minutes."""

from lckv_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 256  # byte-level tokenizer
  c.model.hidden_size = 192
  c.model.intermediate_size = 512
  c.model.num_layers = 4
  c.model.num_heads = 6
  c.model.num_kv_heads = 2
  c.model.layer_types = "lckv"  # 0_2_2_3
  c.model.forward_passes = 2  # m: a tiny model's KV converges in few iterations
  c.model.backward_passes = 1  # b
  c.model.max_position_embeddings = 256
  c.model.tie_word_embeddings = True
  c.data.tokenizer = "byte"
  c.seq_len = 128
  c.batch_size = 8
  c.steps = 300
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.log_every = 10
  c.eval_every = 100
  c.data.eval_batches = 8
  c.checkpoint.every = 100
  c.checkpoint.keep = 2
  return c
