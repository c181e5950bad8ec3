"""The NAACL study's 110M model (12 layers, 768 wide, GPT-2 small's shape in Llama form), on the
embedded corpus with the shipped 32,000-piece tokenizer: the base config of `python study.py`."""

from lckv_jax.train.config import default_config


def get_config():
  c = default_config()
  c.model.vocab_size = 32000
  c.model.hidden_size = 768
  c.model.intermediate_size = 2048
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.tie_word_embeddings = True  # 110M parameters with the embedding counted once
  c.model.layer_types = "llama"  # each study configuration sets its own
  c.model.forward_passes = 7  # m, as in both papers
  c.model.backward_passes = 2  # b
  c.model.max_position_embeddings = 2048  # the longest decode setting: 5 + 2043
  c.model.dtype = "bfloat16"
  c.data.source = "embedded"
  c.data.tokenizer = "kjv-bpe-32k"
  c.seq_len = 1024
  c.batch_size = 32
  c.steps = 2000
  c.optimizer.lr = 6e-4
  c.eval_every = 0  # held-out loss once, at the end (the study evaluates again itself)
  c.log_every = 20
  c.checkpoint.every = 500
  c.checkpoint.keep = 1
  return c
