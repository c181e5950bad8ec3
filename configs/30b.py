"""Llama 30B with LCKV (preset 'lckv': w=2 warm-up layers), m=7, b=2: the 7b recipe, wider."""

import os

from lckv_jax.train.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "7b.py"))
  c.model.update(hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52,
                 num_kv_heads=52)
  return c
